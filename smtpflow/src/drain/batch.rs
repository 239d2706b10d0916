//! Batched reads of a kernel hash map (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+): thousands of
//! entries per syscall, where aya 0.14's iterator makes two syscalls per entry
//! (`BPF_MAP_GET_NEXT_KEY`, then `BPF_MAP_LOOKUP_ELEM`). On a 1M-entry per-peer map that is the
//! difference between seconds and tens of milliseconds (see docs/benchmarks.md).
//!
//! Entries are handed to a callback one at a time from two reused buffers (one the kernel fills
//! while the callback takes the other), so a caller that keeps only what it needs (e.g. the top
//! peers) uses memory for one chunk, not for the whole map.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::mpsc,
    time::Duration,
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

/// Entries in memory at a time unless the caller says otherwise: half of them fetched per
/// syscall, into each of [`for_each_raw`]'s two buffers.
pub const DEFAULT_CHUNK: usize = 4096;

/// What a batch read reports besides the entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub entries: usize,
    pub syscalls: usize,
    /// The CPU time of the second thread that made the calls, if one did ([`for_each_raw`]):
    /// what the read cost besides the caller's thread.
    pub walker_cpu: Duration,
}

/// The CPU time the calling thread has used so far (its own, not the process's).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
///
/// When the map holds more than one call's worth, a second thread makes the calls while this
/// one hands the entries of the call before to `f`: in a big map the kernel's walk is most of
/// the read (its entries are cache misses: 0.6–0.7 µs each on the benchmarks' host), and `f`'s
/// work on one chunk overlaps the kernel's on the next. `chunk` entries are in memory at a
/// time, in two buffers of half as many; a map that fits in one is read on this thread alone.
pub fn for_each_raw(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> io::Result<BatchStats> {
    let mut walk = Walk::new(map, key_size, value_size, chunk.div_ceil(2));
    let mut current = Chunk::default();
    let mut entries = 0;
    let mut hand = |c: &Chunk| {
        for (k, v) in c.keys.chunks_exact(key_size).zip(c.values.chunks_exact(value_size)).take(c.n)
        {
            f(k, v);
        }
        c.n
    };
    if !walk.next(&mut current)? {
        entries += hand(&current);
        return Ok(BatchStats { entries, syscalls: walk.syscalls, walker_cpu: Duration::ZERO });
    }
    std::thread::scope(|s| {
        // Filled chunks to this thread, emptied ones back: one of each in flight.
        let (full_tx, full_rx) = mpsc::sync_channel::<(Chunk, io::Result<bool>)>(1);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Chunk>(1);
        let walker =
            std::thread::Builder::new().name("batch-read".into()).spawn_scoped(s, move || {
                while let Ok(mut c) = empty_rx.recv() {
                    let more = walk.next(&mut c);
                    let go_on = matches!(more, Ok(true));
                    if full_tx.send((c, more)).is_err() || !go_on {
                        break;
                    }
                }
                (walk.syscalls, thread_cpu_time())
            })?;
        let _ = empty_tx.send(Chunk::default());
        let result = loop {
            entries += hand(&current);
            // The walker sends until its last chunk or an error, so a chunk comes.
            let Ok((next, more)) = full_rx.recv() else {
                break Err(io::Error::other("the batched read's thread ended early"));
            };
            let done = std::mem::replace(&mut current, next);
            match more {
                Ok(true) => {
                    let _ = empty_tx.send(done);
                }
                Ok(false) => {
                    entries += hand(&current);
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        // Ends the walker's wait for an empty chunk.
        drop(empty_tx);
        let (syscalls, walker_cpu) = walker.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        result.map(|()| BatchStats { entries, syscalls, walker_cpu })
    })
}

/// A batched read's place in the map: one `BPF_MAP_LOOKUP_BATCH` call at a time.
struct Walk<'fd> {
    map: BorrowedFd<'fd>,
    key_size: usize,
    value_size: usize,
    /// Entries a call may return: grown when one hash bucket holds more.
    chunk: usize,
    /// Opaque position tokens (a u32 bucket index for hash maps); sized generously.
    token_in: [u64; 4],
    token_out: [u64; 4],
    first: bool,
    syscalls: usize,
}

/// Room for one call's entries, and how many it returned.
#[derive(Default)]
struct Chunk {
    keys: Vec<u8>,
    values: Vec<u8>,
    n: usize,
}

impl<'fd> Walk<'fd> {
    fn new(map: BorrowedFd<'fd>, key_size: usize, value_size: usize, chunk: usize) -> Self {
        Self {
            map,
            key_size,
            value_size,
            chunk: chunk.max(1),
            token_in: [0; 4],
            token_out: [0; 4],
            first: true,
            syscalls: 0,
        }
    }

    /// Reads the next entries into `c`. `Ok(false)`: the walk reached the end of the map (`c`
    /// still holds the entries of this last call).
    fn next(&mut self, c: &mut Chunk) -> io::Result<bool> {
        loop {
            c.keys.resize(self.key_size * self.chunk, 0);
            c.values.resize(self.value_size * self.chunk, 0);
            let mut attr = BatchAttr {
                in_batch: if self.first { 0 } else { self.token_in.as_ptr() as u64 },
                out_batch: self.token_out.as_mut_ptr() as u64,
                keys: c.keys.as_mut_ptr() as u64,
                values: c.values.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: self.map.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` is a valid bpf_attr prefix for this command; the buffers it points
            // to hold `chunk` keys and values and outlive the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>() as libc::c_uint,
                )
            };
            self.syscalls += 1;
            let err = (rc < 0).then(io::Error::last_os_error);
            match err.as_ref().and_then(io::Error::raw_os_error) {
                // ENOSPC: one hash bucket holds more entries than `chunk`; retry with more room.
                Some(libc::ENOSPC) if attr.count == 0 => {
                    self.chunk *= 2;
                    continue;
                }
                None | Some(libc::ENOENT) => {}
                Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
            }
            c.n = attr.count as usize;
            // ENOENT: the walk reached the end of the map (`count` still says what this call
            // read).
            if err.is_some() {
                return Ok(false);
            }
            self.token_in = self.token_out;
            self.first = false;
            return Ok(true);
        }
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
/// reading them. Returns how many entries `f` saw (and, batched, the calls and the second
/// thread's CPU time). `what` names the map in errors.
pub fn for_each_entry<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    what: &str,
    mut f: impl FnMut(&K, &V),
) -> anyhow::Result<BatchStats> {
    use anyhow::Context as _;
    use aya::maps::{IterableMap as _, MapError};
    use std::os::fd::AsFd as _;
    let mut seen = 0;
    let batched = for_each::<K, V>(map.map().fd().as_fd(), DEFAULT_CHUNK, |k, v| {
        seen += 1;
        f(k, v);
    });
    match batched {
        Ok(stats) => return Ok(stats),
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
    Ok(BatchStats { entries: seen, ..BatchStats::default() })
}
