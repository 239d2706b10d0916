//! A reader of the kernel's ring buffers (`BPF_MAP_TYPE_RINGBUF`: `PAYLOADS`, `PEER_LOG`) that
//! gives the kernel its room back once a batch of records, not once a record.
//!
//! The position this reader has consumed to is a word the kernel reads on every record it
//! reserves, to see whether the record fits. aya's reader stores it after every record, so under
//! a flood each record moves that word's cache line between the reading CPU and the writing one
//! twice: a miss in the kernel's packet path and one here. This reader stores it every
//! [`RecordRing::COMMIT_EVERY`] of the ring and at the end of a read.
//!
//! The layout is the kernel's (`kernel/bpf/ringbuf.c`): a page holding the consumer position,
//! which the reader maps read-write; then a page holding the producer position, and the data
//! pages, mapped twice in a row so that a record that wraps around the end reads as one, all
//! read-only. Each record starts with an 8-byte header whose first word is its length, with a
//! busy bit while the kernel is still writing it and a discard bit for a record it dropped, and
//! records are 8-byte aligned.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData};

/// A record type read straight from a ring's bytes.
///
/// # Safety
/// Every bit pattern of the type's size must be a valid value: `#[repr(C)]` plain integers and
/// arrays of them, no padding the kernel leaves unwritten that a reader relies on.
pub unsafe trait PlainRecord: Copy {}

// SAFETY: `#[repr(C)]` integers and byte arrays only.
unsafe impl PlainRecord for smtpflow_common::payload::PayloadEvent {}
// SAFETY: `#[repr(C)]` integers and byte arrays only.
unsafe impl PlainRecord for smtpflow_common::PeerRecord {}

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

/// One ring buffer map, mapped for reading.
pub struct RecordRing {
    /// The consumer position's page, read-write.
    consumer: Mapping,
    /// The producer position's page, then the data pages twice, read-only.
    producer: Mapping,
    page: usize,
    /// The data's size - 1 (a power of two).
    mask: usize,
    /// Where this reader is: past the last record it read.
    pos: usize,
    /// Kept so the map lives as long as its mappings' reader.
    _map: MapData,
}

impl RecordRing {
    /// The share of the ring read between two stores of the consumer position: the kernel gets
    /// its room back in sixteenths of the ring while a long backlog is read.
    const COMMIT_EVERY: usize = 16;

    /// The ring buffer map `name` of the loaded object, mapped for reading.
    pub fn take(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<Self> {
        match super::take_map(ebpf, name)? {
            Map::RingBuf(data) => {
                Self::new(data).with_context(|| format!("reading the ring buffer {name}"))
            }
            _ => anyhow::bail!("map {name} is not a ring buffer (a build problem)"),
        }
    }

    fn new(map: MapData) -> anyhow::Result<Self> {
        let size = map.info()?.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        anyhow::ensure!(
            size.is_power_of_two() && size >= page,
            "a ring of {size} bytes: the kernel makes them a power of two pages"
        );
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)
            .context("mmap of the consumer page")?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)
            .context("mmap of the producer page and the data")?;
        let pos = consumer.position().load(Ordering::Acquire);
        Ok(Self { consumer, producer, page, mask: size - 1, pos, _map: map })
    }

    /// Reads at most `most` records (so that a kernel writing as fast as this reads cannot keep
    /// the caller here), calling `f` on each, and returns how many were read: the kernel has
    /// their room back when this returns. A record of another size than `T` (a kernel object of
    /// another version) is skipped, and said at debug level as `what` records.
    pub fn read<T: PlainRecord>(&mut self, most: usize, what: &str, mut f: impl FnMut(T)) -> usize {
        let commit_every = (self.mask + 1) / Self::COMMIT_EVERY;
        let (mut read, mut skipped, mut uncommitted) = (0, 0, 0);
        let mut end = self.producer.position().load(Ordering::Acquire);
        // Discarded and skipped records count towards `most` too.
        for _ in 0..most {
            if self.pos == end {
                // Caught up with what was there: one more look, for what came in meanwhile.
                end = self.producer.position().load(Ordering::Acquire);
                if self.pos == end {
                    break;
                }
            }
            let at = self.page + (self.pos & self.mask);
            // The kernel clears the busy bit with a release store once the record is written.
            let header = self.producer.u32_at(at).load(Ordering::Acquire);
            if header & BUSY != 0 {
                break;
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            if header & DISCARD == 0 {
                if len == size_of::<T>() {
                    // SAFETY: the record's `len` bytes follow its header inside the mapping
                    // (the data pages are mapped twice, so a record that wraps reads as one),
                    // the kernel no longer writes them (not busy), and every bit pattern is a
                    // valid `T` (`PlainRecord`).
                    let record = unsafe {
                        self.producer.ptr.as_ptr().add(at + HEADER).cast::<T>().read_unaligned()
                    };
                    f(record);
                    read += 1;
                } else {
                    skipped += 1;
                }
            }
            let step = (HEADER + len).next_multiple_of(8);
            self.pos = self.pos.wrapping_add(step);
            uncommitted += step;
            if uncommitted >= commit_every {
                self.commit();
                uncommitted = 0;
            }
        }
        if uncommitted != 0 {
            self.commit();
        }
        if skipped != 0 {
            log::debug!("skipped {skipped} {what} records of an unexpected size");
        }
        read
    }

    /// Gives the kernel the room of every record read so far. Release: the kernel may write
    /// over a record only after this reader is done with it.
    fn commit(&self) {
        self.consumer.position().store(self.pos, Ordering::Release);
    }
}

/// A shared mapping of a map's pages, unmapped on drop.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, accessed through atomics and reads of records the
// kernel has finished; the pointer is not tied to a thread.
unsafe impl Send for Mapping {}

impl Mapping {
    pub(super) fn new(fd: i32, len: usize, prot: i32, offset: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: a fresh mapping of `len` bytes of the map's file at `offset`; nothing else
        // refers to the address range it returns.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap returned a null mapping");
        Ok(Self { ptr, len })
    }

    /// The mapping's first byte (page-aligned), valid for [`Mapping::len`] bytes.
    pub(super) fn start(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The word at the mapping's start: the consumer's or the producer's position (`unsigned
    /// long` in the kernel).
    fn position(&self) -> &AtomicUsize {
        // SAFETY: a mapping is at least a page, and page-aligned; the kernel writes the word
        // atomically.
        unsafe { &*self.ptr.as_ptr().cast::<AtomicUsize>() }
    }

    /// The 32-bit word at `at` (a record's length and flags).
    fn u32_at(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at + HEADER <= self.len && at.is_multiple_of(8));
        // SAFETY: records are 8-byte aligned inside the data pages, and their header is in
        // the mapping (the data is mapped twice, a header never starts in the second copy's
        // last 8 bytes); the kernel writes it atomically.
        unsafe { &*self.ptr.as_ptr().add(at).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` mapped; nothing refers to it past this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
