//! Batched reads of a kernel hash map (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+): thousands of
//! entries per syscall, where aya 0.14's iterator makes two syscalls per entry
//! (`BPF_MAP_GET_NEXT_KEY`, then `BPF_MAP_LOOKUP_ELEM`). On a 1M-entry per-peer map that is the
//! difference between seconds and tens of milliseconds (see docs/benchmarks.md).
//!
//! Entries are handed to a callback one at a time from a reused buffer, so a caller that keeps
//! only what it needs (e.g. the top peers) uses memory for one chunk, not for the whole map.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd`: `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries fetched per syscall unless the caller says otherwise.
pub const DEFAULT_CHUNK: usize = 4096;

/// What a batch read reports besides the entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub entries: usize,
    pub syscalls: usize,
}

/// Reads every entry of a (non-per-CPU) hash or LRU hash map, calling `f` with each key and
/// value. `K` and `V` must be the map's exact key and value types (`#[repr(C)]`, no padding).
pub fn for_each<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    mut f: impl FnMut(&K, &V),
) -> io::Result<BatchStats> {
    for_each_raw(map, size_of::<K>(), size_of::<V>(), chunk, |k, v| {
        // SAFETY: the kernel wrote a whole K and V (their exact sizes) at these offsets; Pod
        // types accept any bytes, and read_unaligned copes with the buffer's alignment.
        let (k, v) = unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
            )
        };
        f(&k, &v);
    })
}

/// Reads every entry of a per-CPU hash map, calling `f` with each key and its values summed by
/// `fold` over the `nr_cpus` possible CPUs (`aya::util::nr_cpus`).
pub fn for_each_per_cpu<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    nr_cpus: usize,
    chunk: usize,
    mut f: impl FnMut(&K, &mut dyn Iterator<Item = V>),
) -> io::Result<BatchStats> {
    // The kernel lays out one value per CPU, each rounded up to 8 bytes.
    let stride = size_of::<V>().div_ceil(8) * 8;
    for_each_raw(map, size_of::<K>(), stride * nr_cpus, chunk, |k, v| {
        // SAFETY: as in `for_each`.
        let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<K>()) };
        let mut values = v
            .chunks_exact(stride)
            // SAFETY: each chunk starts with a whole V written by the kernel.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<V>()) });
        f(&key, &mut values);
    })
}

/// The batch loop over raw bytes: `key_size` and `value_size` as the kernel lays them out.
pub fn for_each_raw(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> io::Result<BatchStats> {
    let mut chunk = chunk.max(1);
    let mut keys = vec![0u8; key_size * chunk];
    let mut values = vec![0u8; value_size * chunk];
    // Opaque position tokens (a u32 bucket index for hash maps); sized generously.
    let mut token_in = [0u64; 4];
    let mut token_out = [0u64; 4];
    let mut first = true;
    let mut stats = BatchStats::default();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for this command; the buffers it points to
        // hold `chunk` keys and values and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        stats.syscalls += 1;
        let err = (rc < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // ENOSPC: one hash bucket holds more entries than `chunk`; retry with more room.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                keys.resize(key_size * chunk, 0);
                values.resize(value_size * chunk, 0);
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        let n = attr.count as usize;
        for i in 0..n {
            f(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        stats.entries += n;
        // ENOENT: the walk reached the end of the map (`count` still says what this call read).
        if err.is_some() {
            return Ok(stats);
        }
        token_in = token_out;
        first = false;
    }
}

/// Whether a batch lookup failed because the kernel or map type has none (then the maps are
/// read key by key, as before Linux 5.6).
pub fn batch_unsupported(e: &io::Error) -> bool {
    /// The kernel's internal ENOTSUPP, which BPF syscalls can return.
    const ENOTSUPP: i32 = 524;
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
}

/// Calls `f` with every entry of a (non-per-CPU) hash or LRU hash map: batched, else key by key
/// through aya's iterator (two syscalls an entry), skipping keys evicted between listing and
/// reading them. Returns how many entries `f` saw. `what` names the map in errors.
pub fn for_each_entry<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    what: &str,
    mut f: impl FnMut(&K, &V),
) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    use aya::maps::{IterableMap as _, MapError};
    use std::os::fd::AsFd as _;
    let mut seen = 0;
    let batched = for_each::<K, V>(map.map().fd().as_fd(), DEFAULT_CHUNK, |k, v| {
        seen += 1;
        f(k, v);
    });
    match batched {
        Ok(_) => return Ok(seen),
        // Unsupported shows on the first call, before any entry; starting over key by key after
        // some entries were seen would count those twice.
        Err(e) if batch_unsupported(&e) && seen == 0 => {}
        Err(e) if seen > 0 => {
            return Err(e).with_context(|| {
                format!("reading the {what} map: the batched read failed after {seen} entries")
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
    }
    for item in map.iter() {
        match item {
            Ok((k, v)) => {
                seen += 1;
                f(&k, &v);
            }
            // Evicted between listing its key and reading it.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
        }
    }
    Ok(seen)
}
