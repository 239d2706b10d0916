//! `--peer-counts log`: the per-peer counts as a log the kernel appends to and userspace adds
//! up, instead of the kernel's per-peer LRU map.
//!
//! Each counted packet appends one [`PeerRecord`] (its peer and what it adds) to the `PEER_LOG`
//! ring buffer: no lookup, no insert and no eviction on the packet's path, which is what a SYN
//! flood from new sources costs the per-peer map ("The floor round" in docs/benchmarks.md). A
//! thread reads the ring every [`PEER_LOG_POLL_MS`] and adds each record to its peer in a
//! [`PeerTable`], bounded by `--max-peers`; the drain reads it first ([`PeerLog::pump`]), so a
//! reading holds every record written before it. The table then stands where the kernel's map
//! stood: the per-peer reader streams its entries the same way.
use std::{
    hash::{BuildHasher as _, Hasher as _},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    thread,
    time::Duration,
};

use super::ring::RecordRing;
use anyhow::Context as _;
use hashbrown::{DefaultHashBuilder, HashTable};
use smtpflow_common::{
    PeerCounters, PeerKey, PeerRecord,
    peer::{PEER_LOG_BYTES, PEER_LOG_POLL_MS},
};

/// Userspace's per-peer table: the counts of at most `capacity` peers (`--max-peers`). A new
/// peer in a full table evicts one, and the eviction is counted. Which one: CLOCK, the
/// second-chance approximation of least recently used. A peer counted since the clock's hand
/// last passed it is spared once; a new peer starts unmarked, so a flood of sources seen once
/// evicts its own kind before a peer that keeps coming back.
///
/// Laid out for the caches: the entries side by side in one vector (a count adds to one entry in
/// place, a reading walks them in order), found through an index of their positions. A record
/// is added to its entry as it is read from the ring: the records of one connection (a SYN, its
/// SYN-ACK, the RST) come microseconds apart, so the entry is still in the cache for the second
/// and third. Each entry keeps its key's hash, so a record's key is hashed once, and an eviction
/// finds the evicted entry's place in the index without hashing again. Keys come from the wire
/// (a flood chooses its source addresses), so the hash is keyed at random when the table is
/// made (foldhash, hashbrown's default).
#[derive(Debug)]
pub struct PeerTable {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    hasher: DefaultHashBuilder,
    /// The clock's hand: the next slot an eviction looks at.
    hand: usize,
    capacity: usize,
    evictions: u64,
}

#[derive(Debug)]
struct Slot {
    key: PeerKey,
    hash: u64,
    counters: PeerCounters,
    /// Counted since the hand last passed.
    referenced: bool,
}

impl PeerTable {
    /// An empty table for `capacity` peers (at least one). Its room is reserved at once, so
    /// the table is never copied to grow (a copy would hold the old entries and the new ones in
    /// memory together); the pages of entries not yet made are not touched, so a big
    /// `--max-peers` costs memory only once that many peers were seen. Where the system will
    /// not reserve that much, the table grows as peers come instead.
    pub fn new(capacity: u32) -> Self {
        let capacity = (capacity as usize).max(1);
        let mut slots = Vec::new();
        let mut index = HashTable::new();
        if slots.try_reserve_exact(capacity).is_err()
            || index.try_reserve(capacity, |_: &u32| 0).is_err()
        {
            log::debug!("per-peer log: no room reserved for {capacity} peers; the table grows");
        }
        Self {
            index,
            slots,
            hasher: DefaultHashBuilder::default(),
            hand: 0,
            capacity,
            evictions: 0,
        }
    }

    /// Adds one record of the log to its peer's entry, creating it (and evicting one when the
    /// table is full): the same bumps the kernel adds to a per-peer map entry.
    pub fn add(&mut self, r: &PeerRecord) {
        let hash = self.hash(&r.peer);
        let Self { index, slots, .. } = self;
        if let Some(&at) = index.find(hash, |&at| slots[at as usize].key == r.peer) {
            let slot = &mut slots[at as usize];
            slot.counters.add_record(r);
            slot.referenced = true;
            return;
        }
        let mut slot = Slot { key: r.peer, hash, counters: PeerCounters::ZERO, referenced: false };
        slot.counters.add_record(r);
        if slots.len() < self.capacity {
            index.insert_unique(hash, slots.len() as u32, |&at| slots[at as usize].hash);
            slots.push(slot);
            return;
        }
        // The new entry takes the evicted one's place, and the hand moves past it: it is the
        // last the hand comes back to, so a peer whose connection is under way (its first
        // records added, the rest to come) is not the next one evicted.
        let at = self.victim();
        let Self { index, slots, .. } = self;
        let gone = std::mem::replace(&mut slots[at], slot);
        if let Ok(entry) = index.find_entry(gone.hash, |&i| i as usize == at) {
            entry.remove();
        }
        index.insert_unique(hash, at as u32, |&i| slots[i as usize].hash);
        self.hand = at + 1;
        self.evictions += 1;
    }

    /// `k`'s hash: its 24 bytes as three words, three steps of the hasher (the derived `Hash`
    /// takes six, one a field, and was a third of the thread's time).
    fn hash(&self, k: &PeerKey) -> u64 {
        let a = &k.addr;
        let word = |b: [u8; 8]| u64::from_ne_bytes(b);
        let mut h = self.hasher.build_hasher();
        h.write_u64(
            u64::from(k.ifindex) | u64::from(u32::from_ne_bytes([a[0], a[1], a[2], a[3]])) << 32,
        );
        h.write_u64(word([a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11]]));
        h.write_u64(
            u64::from(u32::from_ne_bytes([a[12], a[13], a[14], a[15]]))
                | u64::from(k.port) << 32
                | u64::from(k.family) << 48
                | u64::from(k.direction) << 56,
        );
        h.finish()
    }

    /// The first unmarked entry from the hand on, unmarking those it passes: at most one turn
    /// and a slot. The table is full (and so not empty).
    fn victim(&mut self) -> usize {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if !slot.referenced {
                return self.hand;
            }
            slot.referenced = false;
            self.hand += 1;
        }
    }

    /// Peers in the table.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Entries evicted to make room, since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerKey, &PeerCounters)> {
        self.slots.iter().map(|s| (&s.key, &s.counters))
    }

    /// One peer's counts.
    pub fn get(&self, k: &PeerKey) -> Option<&PeerCounters> {
        let at = self.index.find(self.hash(k), |&at| self.slots[at as usize].key == *k)?;
        Some(&self.slots[*at as usize].counters)
    }
}

/// The ring the kernel writes and the table it is added up into.
pub struct PeerLog {
    ring: RecordRing,
    table: PeerTable,
}

impl PeerLog {
    pub fn new(ring: RecordRing, capacity: u32) -> Self {
        Self { ring, table: PeerTable::new(capacity) }
    }

    /// Adds every record the kernel wrote since the last call to the table, and returns how
    /// many. At most a ring's worth per call, so that a kernel writing as fast as this reads
    /// cannot keep the caller here.
    pub fn pump(&mut self) -> usize {
        const MOST: usize = PEER_LOG_BYTES as usize / size_of::<PeerRecord>();
        let table = &mut self.table;
        self.ring.read(MOST, "per-peer log", |r: PeerRecord| table.add(&r))
    }

    pub fn table(&self) -> &PeerTable {
        &self.table
    }
}

/// The log, shared between the drain and the thread that reads the ring between drains.
pub struct SharedPeerLog {
    log: Arc<Mutex<PeerLog>>,
    polling: bool,
}

impl SharedPeerLog {
    pub fn new(log: PeerLog) -> Self {
        Self { log: Arc::new(Mutex::new(log)), polling: false }
    }

    /// Starts the thread that reads the ring every [`PEER_LOG_POLL_MS`], once. Started by the
    /// first drain, not when the maps are taken: `watch` drops its capabilities while it has
    /// one thread (capabilities belong to threads), between the two. The thread ends when the
    /// log is dropped.
    pub fn start_polling(&mut self) -> anyhow::Result<()> {
        if self.polling {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.log);
        thread::Builder::new()
            .name("peer-log".into())
            .spawn(move || poll(&weak))
            .context("starting the thread that reads the per-peer log")?;
        self.polling = true;
        Ok(())
    }

    /// Entries the table evicted to make room, since the start.
    pub fn evictions(&self) -> u64 {
        lock(&self.log).table.evictions()
    }

    /// The log, with every record written so far added up.
    pub fn read(&self) -> MutexGuard<'_, PeerLog> {
        let mut log = lock(&self.log);
        log.pump();
        log
    }
}

fn lock(log: &Mutex<PeerLog>) -> MutexGuard<'_, PeerLog> {
    // A panic while the table was held leaves whole records added: the table stays usable.
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

fn poll(log: &Weak<Mutex<PeerLog>>) {
    let every = Duration::from_millis(PEER_LOG_POLL_MS);
    while let Some(log) = log.upgrade() {
        lock(&log).pump();
        drop(log);
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use smtpflow_common::{Event, Outcome, Phase, Side, peer::BUMP_NONE};

    use super::*;

    fn record(last: u8, event: u8, outcome: u8, reset: u8, throttled: u8) -> PeerRecord {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, last]);
        PeerRecord {
            peer: PeerKey { ifindex: 2, addr, port: 25, family: 4, direction: 0 },
            event,
            outcome,
            reset,
            throttled,
            _pad: 0,
        }
    }

    fn add(t: &mut PeerTable, r: &PeerRecord) {
        t.add(r);
    }

    fn syn(n: u8) -> PeerRecord {
        record(n, PeerCounters::index(Event::Syn, Side::Peer) as u8, BUMP_NONE, BUMP_NONE, 0)
    }

    #[test]
    fn records_add_up_as_the_kernel_map_counts() {
        let mut t = PeerTable::new(4);
        let syn = PeerCounters::index(Event::Syn, Side::Peer) as u8;
        add(&mut t, &record(1, syn, BUMP_NONE, BUMP_NONE, 0));
        add(&mut t, &record(1, syn, Outcome::Established as u8, BUMP_NONE, 0));
        add(&mut t, &record(1, BUMP_NONE, BUMP_NONE, Phase::Handshake as u8, 1));
        // Nothing counted: the entry is still made, as the kernel's insert makes it.
        add(&mut t, &record(2, BUMP_NONE, BUMP_NONE, BUMP_NONE, 0));
        let c = t.get(&record(1, 0, 0, 0, 0).peer).unwrap();
        assert_eq!(c.event(Event::Syn, Side::Peer), 2);
        assert_eq!(c.outcome(Outcome::Established), 1);
        assert_eq!(c.resets(Phase::Handshake), 1);
        assert_eq!(c.throttled, 1);
        assert_eq!(c.total(), 4);
        assert_eq!(t.get(&record(2, 0, 0, 0, 0).peer), Some(&PeerCounters::ZERO));
        assert_eq!((t.len(), t.evictions()), (2, 0));
    }

    #[test]
    fn a_full_table_evicts_a_peer_not_counted_again_and_counts_it() {
        let mut t = PeerTable::new(2);
        let peer = |n| record(n, 0, 0, 0, 0).peer;
        add(&mut t, &syn(1));
        add(&mut t, &syn(2));
        // 1 counted again: 2 goes first.
        add(&mut t, &syn(1));
        add(&mut t, &syn(3));
        assert_eq!((t.len(), t.evictions()), (2, 1));
        assert!(t.get(&peer(2)).is_none());
        assert_eq!(t.get(&peer(1)).unwrap().event(Event::Syn, Side::Peer), 2);
        assert_eq!(t.get(&peer(3)).unwrap().event(Event::Syn, Side::Peer), 1);
        // 3 took 2's place, and the hand moved past it: 1 (unmarked by the hand's pass) goes
        // next, not 3, whose connection may still be under way.
        add(&mut t, &syn(4));
        assert!(t.get(&peer(1)).is_none());
        assert_eq!(t.get(&peer(3)).unwrap().event(Event::Syn, Side::Peer), 1);
        add(&mut t, &syn(3));
        assert_eq!(t.get(&peer(3)).unwrap().event(Event::Syn, Side::Peer), 2);
        assert_eq!((t.len(), t.evictions()), (2, 2));
    }

    #[test]
    fn peers_that_fit_are_never_evicted_and_a_flood_evicts_its_own_kind() {
        let mut t = PeerTable::new(200);
        for _ in 0..3 {
            for n in 0..200u8 {
                add(&mut t, &syn(n));
            }
        }
        assert_eq!((t.len(), t.evictions()), (200, 0));
        assert!(t.iter().all(|(_, c)| c.event(Event::Syn, Side::Peer) == 3));
        // 100 peers keep coming back while 10,000 sources come once each: the sources evict
        // one another, and the peers that came back stay.
        let mut t = PeerTable::new(200);
        let other = |n: u32| {
            let mut r = syn(0);
            r.peer.addr[..4].copy_from_slice(&(0x0a00_0000 + n).to_be_bytes());
            r
        };
        for n in 0..10_000u32 {
            if n % 50 == 0 {
                for p in 0..100u8 {
                    add(&mut t, &syn(p));
                }
            }
            add(&mut t, &other(n));
        }
        assert_eq!(t.len(), 200);
        assert_eq!(t.evictions(), 100 + 10_000 - 200);
        for p in 0..100u8 {
            let c = t.get(&syn(p).peer).map(|c| c.event(Event::Syn, Side::Peer));
            assert_eq!(c, Some(200), "peer {p}");
        }
    }

    #[test]
    fn every_byte_of_a_key_changes_its_hash() {
        let t = PeerTable::new(1);
        let base = syn(1).peer;
        let mut keys = vec![base];
        for i in 0..16 {
            let mut k = base;
            k.addr[i] ^= 0x80;
            keys.push(k);
        }
        keys.push(PeerKey { ifindex: base.ifindex + 1, ..base });
        keys.push(PeerKey { port: base.port + 1, ..base });
        keys.push(PeerKey { family: 6, ..base });
        keys.push(PeerKey { direction: 1, ..base });
        let mut hashes: Vec<u64> = keys.iter().map(|k| t.hash(k)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), keys.len());
    }
}
