//! The per-peer maps, read into a bounded [`PeerView`].
//!
//! The kernel's per-peer LRU map holds up to `--max-peers` entries (a million is a supported
//! size). Copying every entry into userspace, ranking them in a hash map and walking them once
//! per consumer cost 280 MiB and seconds per drain at that size (docs/benchmarks.md). Instead
//! the entries are streamed once ([`crate::batch`], thousands per syscall, from one reused
//! buffer) into structures whose size does not depend on the map's:
//! - the exported per-peer series: monotonic totals per label, kept for a bounded set of labels
//!   and chosen stickily by recent activity ([`series`], `--max-peer-series`,
//!   `--peer-series-idle`); the entries of untracked labels that were the most active since the
//!   last read ([`ActivitySketch`]) are the candidates;
//! - the number of entries, and of distinct peers (one 64-bit hash per entry, reused);
//! - for each [`Figure`] the diagnosis and the live view name peers by, its largest values.
//!
//! Reading even a bounded summary of a big map costs the kernel about 0.3 µs an entry, so
//! [`ReadSchedule`] spaces the reads of a big map out; see there.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    hash::{BuildHasher as _, RandomState},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use smtpflow_common::{
    DEFAULT_MAX_PEERS, Direction, Event, Outcome, PeerCounters, PeerGreetingKey, PeerKey, Side,
};

use super::batch;
use crate::{
    output::peer_label::PeerLabel,
    sites::{SiteMap, SiteView, Sites, attribute::DEFAULT_MAX_SITE_SERIES},
};

pub mod series;

use series::{Accumulator, LabelId, PeerSeries, SeriesLimits};

/// A peer as the series cap counts them: one address on one interface.
pub type PeerId = (u32, u8, [u8; 16]);

pub fn peer_id(k: &PeerKey) -> PeerId {
    (k.ifindex, k.family, k.addr)
}

/// Candidate entries kept per exported label while the map is read, and members followed per
/// tracked label: room for labels whose activity is spread over several entries (ports,
/// directions, the addresses of a prefix). See [`PeerReader::select`].
pub const ENTRY_SLACK: usize = 8;

/// Largest values kept per [`Figure`]: the diagnosis names 5 peers per cause and the live view
/// 5; the rest is room for peers whose count rises later in the window.
pub const FIGURE_KEEP: usize = 256;

/// Per-peer figures the diagnosis and the live view name peers by. A reading keeps, for each,
/// the [`FIGURE_KEEP`] largest nonzero values (by entry: peer, port and direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    /// Zero windows we advertised (the diagnosis' local_receive_stall).
    ZeroWindowsSent,
    /// Zero windows the peer advertised (peer_receive_stall).
    ZeroWindowsReceived,
    /// Our handshakes the peer refused with a RST (remote_refusing).
    OutboundRefused,
    /// Our handshakes the peer never answered (remote_unreachable).
    OutboundTimeouts,
    /// Our handshakes answered by an ICMP destination unreachable (remote_unreachable).
    OutboundUnreachable,
    /// Refused handshakes in either direction (the live view's failed handshakes).
    Refused,
    /// Timed-out handshakes in either direction (the live view's failed handshakes).
    Timeouts,
    /// Our handshakes the peer answered with a SYN-ACK: the sessions remote_throttling's share
    /// is of, and part of the attempts of remote_refusing and remote_unreachable.
    OutboundEstablished,
    /// Our sessions with a throttling reply from the peer (remote_throttling).
    OutboundThrottled,
}

impl Figure {
    pub const COUNT: usize = 9;
}

/// What one full read of the per-peer maps keeps. Its size is bounded by `--max-peer-series`
/// and [`FIGURE_KEEP`], however many entries the maps hold.
#[derive(Debug, Default)]
pub struct PeerView {
    /// Entries alive in the per-peer map.
    pub entries: usize,
    /// Entries alive in the per-peer reply map (a peer's count of a reply code, by kind).
    pub reply_entries: usize,
    /// Distinct peers (address and interface) among them.
    pub tracked: usize,
    /// Labels (interface and `--peer-label`) exported as per-peer series (at most
    /// `--max-peer-series`).
    pub exported_peers: usize,
    /// The exported per-peer series: monotonic totals, sorted by label.
    pub series: Vec<PeerSeries>,
    /// The exported labels by identity, with their `peer` label value: what a peer's key is
    /// looked up by to add to an exported series that is not read from the per-peer maps (its
    /// open connections).
    pub exported_labels: HashMap<LabelId, Arc<str>>,
    /// By [`Figure`]: the largest nonzero values, largest first.
    figures: [Vec<(PeerKey, u64)>; Figure::COUNT],
    /// When the read started (`None`: never read).
    pub read_at: Option<SystemTime>,
    /// The per-site series, and the sites of the peers the figures name.
    pub sites: SiteView,
}

impl PeerView {
    /// The largest nonzero values of a figure, largest first.
    pub fn figure(&self, f: Figure) -> &[(PeerKey, u64)] {
        &self.figures[f as usize]
    }
}

/// Keeps the `cap` largest items offered, in memory for `cap` items.
#[derive(Debug)]
struct TopN<T> {
    cap: usize,
    /// A min-heap: its root is the smallest item kept, the one a larger offer replaces.
    heap: BinaryHeap<Reverse<T>>,
}

impl<T: Ord> TopN<T> {
    fn new(cap: usize) -> Self {
        Self { cap, heap: BinaryHeap::new() }
    }

    fn offer(&mut self, item: T) {
        if self.heap.len() < self.cap {
            if self.heap.capacity() == 0 {
                // Room for `cap` items at once, not the next power of two.
                self.heap.reserve_exact(self.cap);
            }
            self.heap.push(Reverse(item));
        } else if let Some(mut smallest) = self.heap.peek_mut()
            && item > smallest.0
        {
            *smallest = Reverse(item);
        }
    }

    /// The items kept, largest first; empties the heap and keeps its allocation.
    fn take_sorted(&mut self) -> Vec<T> {
        let mut items: Vec<T> = self.heap.drain().map(|Reverse(t)| t).collect();
        items.sort_unstable_by(|a, b| b.cmp(a));
        items
    }
}

/// An entry of an untracked label competing to be tracked, ranked by its recent activity (what
/// [`ActivitySketch`] saw it rise by); between equals, the smaller peer (then port, direction)
/// ranks higher, so the choice is stable.
#[derive(Debug)]
struct Candidate {
    activity: u64,
    key: PeerKey,
    counters: PeerCounters,
}

impl Candidate {
    fn order_key(&self) -> (PeerId, u16, u8) {
        (peer_id(&self.key), self.key.port, self.key.direction)
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.activity.cmp(&other.activity).then_with(|| other.order_key().cmp(&self.order_key()))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Candidate {}

/// A figure's value for one entry; between equals the smaller key ranks higher.
type Valued = (u64, Reverse<PeerKey>);

/// What the reads of the per-peer map remember of each entry, to tell how much it rose since the
/// last read (the candidates for export, by recent activity) without a copy of the map: a table
/// of 64-bit slots (a 40-bit fingerprint of the entry's key and the low 24 bits of its total), in
/// buckets of [`Self::WAYS`], two possible buckets per entry (a new entry takes the less full),
/// with 1.5 slots per entry of the map's capacity (at most [`Self::MAX_BUCKETS`] buckets,
/// 12 MiB at a 1M-entry map).
/// - An entry found in its slot rose by the difference (modulo 2²⁴ between two reads); one whose
///   total went down was created again: all of it is recent.
/// - An entry in no slot is new since the last read (slots of entries gone are freed at each
///   read): all of it is recent.
/// - An entry whose two buckets are full of others counts as not active: simulated, 4 in a
///   million entries of a full map, none below two thirds full. (Two slots per entry, four to a
///   bucket, first the one bucket then the other, took 16 MiB and left 3 in a thousand.)
#[derive(Debug)]
pub struct ActivitySketch {
    slots: Vec<u64>,
    /// One bit per slot: seen in this read (kept until the next read, which frees the others).
    seen: Vec<u64>,
    /// Buckets, less one (a power of two).
    mask: usize,
}

impl ActivitySketch {
    pub const MAX_BUCKETS: usize = 1 << 18;
    pub const WAYS: usize = 6;
    const LOW: u64 = (1 << 24) - 1;

    /// A sketch for a per-peer map of `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        // A multiple of 64 slots (the `seen` words): 6 × 32.
        let buckets = (capacity / 4).next_power_of_two().clamp(256, Self::MAX_BUCKETS);
        let n = buckets * Self::WAYS;
        Self { slots: vec![0; n], seen: vec![0; n / 64], mask: buckets - 1 }
    }

    /// Starts a read: frees the slots of entries the last read did not see.
    pub fn start(&mut self) {
        for (word, seen) in self.seen.iter_mut().enumerate() {
            if *seen != u64::MAX {
                for bit in 0..64 {
                    if *seen & (1 << bit) == 0 {
                        self.slots[word * 64 + bit] = 0;
                    }
                }
            }
            *seen = 0;
        }
    }

    /// The two buckets an entry whose key hashes to `h` may have its slot in.
    fn buckets(&self, h: u64) -> [usize; 2] {
        [(h as usize) & self.mask, ((h >> 20) as usize) & self.mask]
    }

    /// Asks the CPU to fetch the buckets of the entry whose key hashes to `h`, which
    /// [`Self::observe`] will read a few entries later. A bucket is 48 bytes, so it may span two
    /// cache lines: its first and last slots are fetched.
    pub fn prefetch(&self, h: u64) {
        for bucket in self.buckets(h) {
            let first = bucket * Self::WAYS;
            for i in [first, first + Self::WAYS - 1] {
                if let Some(slot) = self.slots.get(i) {
                    prefetch(slot);
                }
            }
        }
    }

    /// How much the entry whose key hashes to `h` rose by since the last read, its total being
    /// `total`.
    pub fn observe(&mut self, h: u64, total: u64) -> u64 {
        let fp = (h >> 24) | 1;
        let lo = total & Self::LOW;
        let [a, b] = self.buckets(h);
        let ways = |bucket: usize| bucket * Self::WAYS..(bucket + 1) * Self::WAYS;
        // Per bucket: its first free slot and how many are free.
        let mut free = [(None, 0); 2];
        for (side, bucket) in [a, b].into_iter().enumerate() {
            for i in ways(bucket) {
                let slot = self.slots[i];
                if slot >> 24 == fp {
                    self.take(i, fp, lo);
                    let last = slot & Self::LOW;
                    return if lo >= last { lo - last } else { total };
                }
                if slot == 0 {
                    let (first, n) = &mut free[side];
                    first.get_or_insert(i);
                    *n += 1;
                }
            }
        }
        // The less full bucket (the first on a tie).
        let [(in_a, free_a), (in_b, free_b)] = free;
        match if free_b > free_a { in_b } else { in_a.or(in_b) } {
            Some(i) => {
                self.take(i, fp, lo);
                total
            }
            None => 0,
        }
    }

    fn take(&mut self, i: usize, fp: u64, lo: u64) {
        self.slots[i] = (fp << 24) | lo;
        self.seen[i / 64] |= 1 << (i % 64);
    }
}

/// Asks the CPU to bring the cache line holding `value` closer, without waiting for it: a hint
/// that reads nothing the program sees (a no-op where there is no such instruction here).
#[inline(always)]
fn prefetch<T>(value: &T) {
    // SAFETY: SSE, which the instruction needs, is part of every x86_64 CPU; a prefetch reads
    // nothing into the program and never faults, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// How many entries [`PeerReader::add_entry`] reads ahead of the one it adds: with a big map
/// each entry's sketch buckets are a cache miss or two, and the CPU fetches those of the next
/// entries meanwhile it adds this one. A few hundred ns of work an entry covers a miss at 8.
const LOOKAHEAD: usize = 8;

/// An entry read ahead ([`LOOKAHEAD`]), with its hash in the sketch.
#[derive(Debug)]
struct Ahead {
    key: PeerKey,
    counters: PeerCounters,
    entry_hash: u64,
}

/// One per-peer entry's timed-out handshakes: the sweep's count, and how many of them its site
/// was given ([`Sites::timeouts`]). Kept together in the sweep's bounded table, so that a peer
/// forgotten there is forgotten by both at once, and no second table of 65,536 peers is kept
/// for the sites.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTimeouts {
    pub total: u64,
    pub attributed: u64,
}

/// A keyed hasher for the per-peer series' maps, looked up once per entry of every read: the
/// 128-bit-product folding of [`PeerReader::peer_hash`] (SipHash would cost a tenth of a read of
/// a million entries). Keys are random per process, so crafted addresses cannot be made to
/// collide.
#[derive(Clone, Debug)]
pub struct FoldState([u64; 2]);

impl Default for FoldState {
    fn default() -> Self {
        let random = RandomState::new();
        Self([random.hash_one(0u8) | 1, random.hash_one(1u8) | 1])
    }
}

impl std::hash::BuildHasher for FoldState {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher { h: self.0[0], k: self.0[1] }
    }
}

#[derive(Debug)]
pub struct FoldHasher {
    h: u64,
    k: u64,
}

impl std::hash::Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.h = fold(self.h ^ n, self.k);
    }

    fn finish(&self) -> u64 {
        fold(self.h, self.k.rotate_left(32))
    }
}

/// Reads the per-peer maps into [`PeerView`]s, keeping its buffers from one read to the next,
/// and the per-peer series' totals ([`series::Accumulator`]) from one read to the next.
///
/// A read has these steps, in this order: every entry of the per-peer map
/// ([`add_entry`](Self::add_entry), then [`count_tracked`](Self::count_tracked); together
/// [`read_entries`](Self::read_entries)), the labels newly tracked
/// ([`select`](Self::select)), then the timed-out handshakes and greetings
/// ([`add_timeouts`](Self::add_timeouts), [`add_greeting`](Self::add_greeting)), and
/// [`finish`](Self::finish), which chooses the exported series (together
/// [`read_rest`](Self::read_rest)).
#[derive(Debug)]
pub struct PeerReader {
    /// Random keys of [`Self::peer_hash`].
    hash_keys: [u64; 4],
    /// One hash per entry's peer: sorted and deduplicated, their number is the peers tracked.
    peer_hashes: Vec<u64>,
    candidates: TopN<Candidate>,
    figures: [TopN<Valued>; Figure::COUNT],
    /// The per-peer series and what tells recent activity (`None`: `--max-peer-series 0`).
    series: Option<(Accumulator, ActivitySketch)>,
    /// Names learnt and the per-site totals, given every entry of every read.
    sites: Sites,
    /// The entries read but not added yet, at most [`LOOKAHEAD`]: their sketch buckets are on
    /// their way from memory meanwhile.
    ahead: VecDeque<Ahead>,
    /// The CPU time of the threads the batched reads of the current read ran the kernel's walk
    /// on ([`batch::for_each_raw`]).
    walker_cpu: Duration,
    /// When the current read started.
    now: Instant,
    view: PeerView,
}

impl PeerReader {
    /// `max_series`: `--max-peer-series` (0: no per-peer series, only the counts and figures),
    /// with peers labelled by address, the default idle time and a map of the default size.
    pub fn new(max_series: usize) -> Self {
        Self::with_series(SeriesLimits::new(max_series), PeerLabel::Ip, DEFAULT_MAX_PEERS as usize)
    }

    /// A reader exporting `limits.max` labels made by `labeler`, for a per-peer map of
    /// `capacity` entries.
    pub fn with_series(limits: SeriesLimits, labeler: PeerLabel, capacity: usize) -> Self {
        let series = (limits.max > 0)
            .then(|| (Accumulator::new(limits, labeler), ActivitySketch::new(capacity)));
        Self {
            hash_keys: {
                let random = RandomState::new();
                std::array::from_fn(|i| random.hash_one(i) | 1)
            },
            peer_hashes: Vec::new(),
            candidates: TopN::new(limits.max.saturating_mul(ENTRY_SLACK)),
            figures: std::array::from_fn(|_| TopN::new(FIGURE_KEEP)),
            series,
            sites: Sites::new(SiteMap::default(), DEFAULT_MAX_SITE_SERIES, &[]),
            ahead: VecDeque::with_capacity(LOOKAHEAD),
            walker_cpu: Duration::ZERO,
            now: Instant::now(),
            view: PeerView::default(),
        }
    }

    /// Sets `--peer-series-idle`.
    pub fn set_series_idle(&mut self, idle: Duration) {
        if let Some((acc, _)) = &mut self.series {
            acc.set_idle(idle);
        }
    }

    /// Sets what sites are attributed with (`--site-map`, `--max-site-series`, the ports).
    pub fn set_sites(&mut self, sites: Sites) {
        self.sites = sites;
    }

    /// The names learnt and per-site totals (to learn names between reads).
    pub fn sites_mut(&mut self) -> &mut Sites {
        &mut self.sites
    }

    /// The CPU time the current (or last) read's batched reads used on threads of their own,
    /// besides the threads that called [`Self::read_entries`] and [`Self::read_rest`].
    pub fn walker_cpu(&self) -> Duration {
        self.walker_cpu
    }

    /// Labels tracked and members followed by the series' accumulator (for tests).
    pub fn series_tracked(&self) -> (usize, usize) {
        self.series.as_ref().map_or((0, 0), |(acc, _)| acc.tracked())
    }

    /// A full read, first step: starts it and streams every entry of the per-peer map (the
    /// long part with a big map: it can run on another thread meanwhile the drain goes on).
    pub fn read_entries(
        &mut self,
        peers: &BpfHashMap<MapData, PeerKey, PeerCounters>,
    ) -> anyhow::Result<()> {
        self.start(Instant::now());
        let read = batch::for_each_entry(peers, "per-peer", |k, v| self.add_entry(k, v))?;
        self.walker_cpu += read.walker_cpu;
        self.count_tracked();
        Ok(())
    }

    /// [`Self::read_entries`] of userspace's per-peer table (`--peer-counts log`) instead of
    /// the kernel's map.
    pub fn read_table<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a PeerKey, &'a PeerCounters)>,
    ) {
        self.start(Instant::now());
        for (k, v) in entries {
            self.add_entry(k, v);
        }
        self.count_tracked();
    }

    /// A full read, second step: tracks new labels, then takes the timed-out handshakes
    /// userspace counts per peer and the per-peer greetings map, and chooses the exported series.
    pub fn read_rest<'a>(
        &mut self,
        greetings: &BpfHashMap<MapData, PeerGreetingKey, u64>,
        timeouts: impl IntoIterator<Item = (&'a PeerKey, &'a mut PeerTimeouts)>,
    ) -> anyhow::Result<PeerView> {
        self.select();
        for (k, t) in timeouts {
            self.add_timeouts(k, t);
        }
        let read = batch::for_each_entry(greetings, "per-peer greetings", |k, n| {
            self.add_greeting(k, *n);
        })?;
        self.walker_cpu += read.walker_cpu;
        Ok(self.finish())
    }

    /// Starts a read at `now` (the clock of `--peer-series-idle`).
    pub fn start(&mut self, now: Instant) {
        self.view = PeerView { read_at: Some(SystemTime::now()), ..PeerView::default() };
        self.now = now;
        self.peer_hashes.clear();
        // Left by a read that failed part way: not this read's.
        self.ahead.clear();
        self.walker_cpu = Duration::ZERO;
        self.sites.start(now);
        if let Some((acc, sketch)) = &mut self.series {
            acc.start(now);
            sketch.start();
        }
    }

    /// A keyed 64-bit hash of the entry's peer: two multiplications, where SipHash took a
    /// tenth of the whole read of a million entries. Keys are random per process, so crafted
    /// addresses cannot be made to collide (which would lower `smtpflow_peers_tracked`).
    fn peer_hash(&self, k: &PeerKey) -> u64 {
        let [k0, k1, k2, k3] = self.hash_keys;
        let (lo, hi) = k.addr.split_at(8);
        let lo = u64::from_le_bytes(lo.try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(hi.try_into().expect("8 bytes"));
        let rest = (u64::from(k.ifindex) << 8) | u64::from(k.family);
        fold(fold(lo ^ k0, hi ^ k1) ^ rest ^ k2, k3)
    }

    /// The same, of the whole entry key (peer, port and direction).
    fn entry_hash(&self, peer_hash: u64, k: &PeerKey) -> u64 {
        let rest = (u64::from(k.port) << 8) | u64::from(k.direction);
        fold(peer_hash ^ rest, self.hash_keys[0])
    }

    /// One entry of the per-peer map: counted and hashed now, its sketch buckets fetched, and
    /// added [`LOOKAHEAD`] entries later (or by [`Self::count_tracked`], which ends the entries).
    /// The entries are added in the order they came.
    pub fn add_entry(&mut self, k: &PeerKey, v: &PeerCounters) {
        self.view.entries += 1;
        let peer_hash = self.peer_hash(k);
        self.peer_hashes.push(peer_hash);
        let entry_hash = self.entry_hash(peer_hash, k);
        if let Some((_, sketch)) = &self.series {
            sketch.prefetch(entry_hash);
        }
        if self.ahead.len() == LOOKAHEAD
            && let Some(a) = self.ahead.pop_front()
        {
            self.add_ahead(&a);
        }
        self.ahead.push_back(Ahead { key: *k, counters: *v, entry_hash });
    }

    /// Adds the entries still ahead.
    fn add_entries_ahead(&mut self) {
        while let Some(a) = self.ahead.pop_front() {
            self.add_ahead(&a);
        }
    }

    /// Adds one entry [`Self::add_entry`] read ahead.
    fn add_ahead(&mut self, a: &Ahead) {
        let (k, v) = (&a.key, &a.counters);
        self.sites.entry(k, v);
        if let Some((acc, sketch)) = &mut self.series {
            let recent = sketch.observe(a.entry_hash, v.total());
            if !acc.entry(k, v, recent) && recent > 0 {
                self.candidates.offer(Candidate { activity: recent, key: *k, counters: *v });
            }
        }
        let outbound = k.direction == Direction::Outbound as u8;
        let refused = v.outcomes[Outcome::Refused as usize];
        self.offer(
            Figure::ZeroWindowsSent,
            k,
            v.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)],
        );
        self.offer(
            Figure::ZeroWindowsReceived,
            k,
            v.counts[PeerCounters::index(Event::ZeroWindow, Side::Peer)],
        );
        self.offer(Figure::Refused, k, refused);
        if outbound {
            self.offer(Figure::OutboundRefused, k, refused);
            self.offer(Figure::OutboundThrottled, k, v.throttled);
            self.offer(Figure::OutboundEstablished, k, v.outcome(Outcome::Established));
            self.offer(Figure::OutboundUnreachable, k, v.outcome(Outcome::Unreachable));
        }
    }

    /// Tracks the labels of the entries that rose the most since the last read among those
    /// whose label is not tracked yet ([`Accumulator::admit`]).
    ///
    /// Only the [`ENTRY_SLACK`] × `--max-peer-series` most recently active such entries are
    /// kept while the map is read, so a label whose activity is spread thinly over many
    /// entries can rank lower than its sum; its other entries are followed from the next read.
    pub fn select(&mut self) {
        let Some((acc, _)) = &mut self.series else { return };
        let kept = self.candidates.take_sorted();
        acc.admit(kept.into_iter().map(|c| (c.key, c.counters, c.activity)));
    }

    /// The handshakes of one entry that timed out (counted by userspace's sweep).
    pub fn add_timeouts(&mut self, k: &PeerKey, t: &mut PeerTimeouts) {
        self.sites.timeouts(k, t);
        let n = t.total;
        if let Some((acc, _)) = &mut self.series {
            acc.timeouts(k, n);
        }
        self.offer(Figure::Timeouts, k, n);
        if k.direction == Direction::Outbound as u8 {
            self.offer(Figure::OutboundTimeouts, k, n);
        }
    }

    /// One entry of the per-peer greetings map (entries counting every reply are for sites).
    pub fn add_greeting(&mut self, k: &PeerGreetingKey, n: u64) {
        self.view.reply_entries += 1;
        self.sites.reply(k, n);
        if k.kind != smtpflow_common::peer::reply_kind::GREETING {
            return;
        }
        if let Some((acc, _)) = &mut self.series {
            acc.greeting(k, n);
        }
    }

    /// Ends the entries: adds those still ahead, and counts the distinct peers among them
    /// (sorting their hashes).
    pub fn count_tracked(&mut self) {
        self.add_entries_ahead();
        self.peer_hashes.sort_unstable();
        self.peer_hashes.dedup();
        self.view.tracked = self.peer_hashes.len();
    }

    /// Ends the read.
    pub fn finish(&mut self) -> PeerView {
        for (out, top) in self.view.figures.iter_mut().zip(&mut self.figures) {
            *out = top.take_sorted().into_iter().map(|(n, Reverse(k))| (k, n)).collect();
        }
        self.view.sites = self.sites.finish(self.view.figures.iter().flatten().map(|(k, _)| k));
        if let Some((acc, _)) = &mut self.series {
            (self.view.series, self.view.exported_peers) = acc.finish();
            self.view.exported_labels = acc.exported_labels().collect();
        }
        std::mem::take(&mut self.view)
    }

    fn offer(&mut self, f: Figure, k: &PeerKey, n: u64) {
        if n > 0 {
            self.figures[f as usize].offer((n, Reverse(*k)));
        }
    }

    /// A view of these entries, timeouts and greetings, as a read of maps holding them makes
    /// (for tests and benchmarks).
    pub fn view_of(
        &mut self,
        entries: &[(PeerKey, PeerCounters)],
        timeouts: &[(PeerKey, u64)],
        greetings: &[(PeerGreetingKey, u64)],
    ) -> PeerView {
        self.view_at(Instant::now(), entries, timeouts, greetings)
    }

    /// [`Self::view_of`], read at `now`.
    pub fn view_at(
        &mut self,
        now: Instant,
        entries: &[(PeerKey, PeerCounters)],
        timeouts: &[(PeerKey, u64)],
        greetings: &[(PeerGreetingKey, u64)],
    ) -> PeerView {
        self.start(now);
        for (k, v) in entries {
            self.add_entry(k, v);
        }
        self.count_tracked();
        self.select();
        // Each reading a first: all of a peer's timeouts go to its site.
        for (k, n) in timeouts {
            self.add_timeouts(k, &mut PeerTimeouts { total: *n, attributed: 0 });
        }
        for (k, n) in greetings {
            self.add_greeting(k, *n);
        }
        self.finish()
    }
}

/// The 128-bit product, folded: the mixing step of foldhash and ahash.
fn fold(x: u64, y: u64) -> u64 {
    let p = u128::from(x) * u128::from(y);
    (p as u64) ^ ((p >> 64) as u64)
}

/// When the per-peer maps are read in full. Reading costs the kernel about 0.3 µs an entry
/// (bucket locks and copies; 20–25 ms for 65,536 entries, 0.5 s or more for a million), which
/// on every 1 s drain would be 2–50 % of a core for numbers that change slowly. So a read that
/// cost `t` of CPU time (on every thread it ran on: a big map's read runs the kernel's walk on a
/// second thread) is followed by the next no sooner than `t` / [`ReadSchedule::SHARE`] later
/// (at most 1 % of one core on average), and no later than [`ReadSchedule::MAX_PAUSE`]. Small
/// maps (up to about 30,000 entries) are still read on every 1 s drain. The exact totals do not
/// depend on this: they come from the counters map, read on every drain.
#[derive(Debug)]
pub struct ReadSchedule {
    next: Instant,
}

impl Default for ReadSchedule {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadSchedule {
    /// Fraction of one core the reads of the per-peer maps may use on average.
    pub const SHARE: f64 = 0.01;
    /// Longest pause between two reads: per-peer series are never older than this.
    pub const MAX_PAUSE: Duration = Duration::from_secs(60);

    /// A schedule whose first read is due now.
    pub fn new() -> Self {
        Self { next: Instant::now() }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Records a read that started at `started` and cost `cpu` (CPU time, all threads').
    pub fn done(&mut self, started: Instant, cpu: Duration) {
        self.next = started + cpu.div_f64(Self::SHARE).min(Self::MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtpflow_common::FAMILY_V4;

    fn key(last: u8, port: u16, direction: Direction) -> PeerKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 51, 100, last]);
        PeerKey { ifindex: 2, addr, port, family: FAMILY_V4, direction: direction as u8 }
    }

    fn syns(n: u64) -> PeerCounters {
        let mut c = PeerCounters::default();
        c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = n;
        c
    }

    /// The last byte of each exported peer's address.
    fn exported_addrs(v: &PeerView) -> Vec<u8> {
        let last = |p: &str| p.parse::<std::net::Ipv4Addr>().expect("an address").octets()[3];
        let mut a: Vec<u8> = v.series.iter().map(|s| last(&s.peer)).collect();
        a.sort_unstable();
        a.dedup();
        a
    }

    #[test]
    fn counts_entries_and_distinct_peers() {
        let mut r = PeerReader::new(10);
        let entries = [
            (key(1, 25, Direction::Inbound), syns(1)),
            (key(1, 587, Direction::Inbound), syns(1)),
            (key(1, 25, Direction::Outbound), syns(1)),
            (key(2, 25, Direction::Inbound), syns(1)),
        ];
        let v = r.view_of(&entries, &[], &[]);
        // Each entry has one series (its SYNs).
        assert_eq!((v.entries, v.tracked, v.exported_peers, v.series.len()), (4, 2, 2, 4));
        assert!(v.read_at.is_some());
        // The same peer on another interface, or as IPv6, is another peer.
        let mut other = key(1, 25, Direction::Inbound);
        other.ifindex = 3;
        let mut v6 = key(1, 25, Direction::Inbound);
        v6.family = smtpflow_common::FAMILY_V6;
        let v = r.view_of(&[entries[0], (other, syns(1)), (v6, syns(1))], &[], &[]);
        assert_eq!((v.entries, v.tracked), (3, 3), "buffers are reused, not accumulated");
    }

    #[test]
    fn ranks_peers_by_their_summed_entries() {
        // Peer 1 has the busiest single entry (5); peer 2 more in total (3 + 3 + 3).
        let entries = [
            (key(1, 25, Direction::Inbound), syns(5)),
            (key(2, 25, Direction::Inbound), syns(3)),
            (key(2, 465, Direction::Inbound), syns(3)),
            (key(2, 587, Direction::Inbound), syns(3)),
            (key(3, 25, Direction::Inbound), syns(4)),
        ];
        let v = PeerReader::new(1).view_of(&entries, &[], &[]);
        assert_eq!(exported_addrs(&v), [2]);
        assert_eq!(v.series.len(), 3, "all of the chosen peer's entries");
        let v = PeerReader::new(2).view_of(&entries, &[], &[]);
        assert_eq!(exported_addrs(&v), [1, 2]);
    }

    #[test]
    fn ties_are_broken_by_address_whatever_the_order() {
        let mut entries: Vec<_> =
            (1..=10).map(|i| (key(i, 25, Direction::Inbound), syns(1))).collect();
        let a = PeerReader::new(4).view_of(&entries, &[], &[]);
        entries.reverse();
        let b = PeerReader::new(4).view_of(&entries, &[], &[]);
        assert_eq!(exported_addrs(&a), [1, 2, 3, 4]);
        assert_eq!(exported_addrs(&b), [1, 2, 3, 4]);
        assert!(PeerReader::new(0).view_of(&entries, &[], &[]).series.is_empty());
    }

    #[test]
    fn keeps_a_bounded_number_of_candidates() {
        // Many more entries than ENTRY_SLACK × 2 candidates: the two busiest peers still win.
        let mut entries: Vec<_> =
            (0..=200u8).map(|i| (key(i, 25, Direction::Inbound), syns(u64::from(i)))).collect();
        entries.rotate_left(77);
        let mut r = PeerReader::new(2);
        let v = r.view_of(&entries, &[], &[]);
        assert_eq!(exported_addrs(&v), [199, 200]);
        assert_eq!((v.entries, v.tracked), (201, 201));
        assert!(r.candidates.heap.capacity() <= 4 * 2 * ENTRY_SLACK, "bounded by the cap");
        let (labels, members) = r.series_tracked();
        assert!(labels <= SeriesLimits::new(2).tracked() && members <= labels * ENTRY_SLACK);
    }

    #[test]
    fn timeouts_and_greetings_follow_the_chosen_peers() {
        let (busy, quiet) = (key(1, 25, Direction::Outbound), key(2, 25, Direction::Outbound));
        let entries = [(busy, syns(9)), (quiet, syns(1))];
        let greeting = PeerGreetingKey::greeting;
        let v = PeerReader::new(1).view_of(
            &entries,
            &[(busy, 2), (quiet, 7)],
            &[(greeting(busy, 220), 4), (greeting(quiet, 421), 3)],
        );
        let values: Vec<(series::Counted, u64)> =
            v.series.iter().map(|s| (s.counted, s.value)).collect();
        assert_eq!(
            values,
            [
                (series::Counted::Event(Event::Syn, Side::Peer), 9),
                (series::Counted::Outcome(Outcome::Timeout), 2),
                (series::Counted::Greeting(220), 4),
            ]
        );
        assert_eq!(exported_addrs(&v), [1]);
        // The figures cover every peer, chosen or not.
        assert_eq!(v.figure(Figure::OutboundTimeouts), [(quiet, 7), (busy, 2)]);
        assert_eq!(v.figure(Figure::Timeouts), [(quiet, 7), (busy, 2)]);
    }

    #[test]
    fn figures_keep_the_largest_nonzero_values_by_direction() {
        let mut stalled = PeerCounters::default();
        stalled.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] = 3;
        stalled.outcomes[Outcome::Refused as usize] = 2;
        stalled.outcomes[Outcome::Established as usize] = 5;
        stalled.throttled = 4;
        let (inbound, outbound) = (key(1, 25, Direction::Inbound), key(2, 25, Direction::Outbound));
        let v = PeerReader::new(0).view_of(&[(inbound, stalled), (outbound, stalled)], &[], &[]);
        assert_eq!(v.figure(Figure::ZeroWindowsSent), [(inbound, 3), (outbound, 3)]);
        assert!(v.figure(Figure::ZeroWindowsReceived).is_empty(), "zeros are not kept");
        assert_eq!(v.figure(Figure::Refused), [(inbound, 2), (outbound, 2)]);
        assert_eq!(v.figure(Figure::OutboundRefused), [(outbound, 2)]);
        assert_eq!(v.figure(Figure::OutboundThrottled), [(outbound, 4)]);
        assert_eq!(v.figure(Figure::OutboundEstablished), [(outbound, 5)]);
        let many: Vec<_> = (0..=255u8)
            .flat_map(|i| {
                [
                    (key(i, 25, Direction::Outbound), stalled),
                    (key(i, 587, Direction::Outbound), stalled),
                ]
            })
            .collect();
        let v = PeerReader::new(0).view_of(&many, &[], &[]);
        assert_eq!(v.figure(Figure::OutboundRefused).len(), FIGURE_KEEP);
    }

    #[test]
    fn big_reads_are_spaced_out() {
        let mut s = ReadSchedule::new();
        let t0 = Instant::now();
        assert!(s.due(t0));
        s.done(t0, Duration::from_millis(2));
        assert!(s.due(t0 + Duration::from_millis(200)), "a cheap read is due on the next drain");
        s.done(t0, Duration::from_millis(25));
        assert!(!s.due(t0 + Duration::from_secs(2)));
        assert!(s.due(t0 + Duration::from_millis(2500)));
        s.done(t0, Duration::from_secs(5));
        assert!(s.due(t0 + ReadSchedule::MAX_PAUSE), "never older than MAX_PAUSE");
    }
}
