//! Reading the kernel maps into a [`Snapshot`]: exact counters and histograms summed over CPUs,
//! a bounded view of the per-peer maps ([`crate::peers`]), and the programs' own bookkeeping;
//! and sweeping the flow table ([`flows`]) for handshakes that timed out (the one outcome
//! counted here, since it is the absence of a packet); the same listing counts the open
//! connections ([`open`]). The payload events' counts ([`tls`]) are kept here too.
//!
//! The sweep never writes a flow: the kernel decides from its own clock whether an answer came
//! in time ([`smtpflow_common::flow::step`]); the sweep reads `CLOCK_MONOTONIC` (the same
//! clock) and counts each attempt with no answer in time once, remembering what it counted
//! ([`Timeouts`]). Flows not written for [`flow::IDLE_NS`] are no longer shown (the kernel
//! gives their ways to new flows).
pub mod batch;
pub mod flows;
pub mod open;
pub mod peer_log;
pub mod peers;
pub mod ring;
pub mod tls;
pub mod totals;

use flows::FlowTable;
use ring::RecordRing;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    hash::BuildHasher as _,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
};

use self::{
    open::{OpenConnections, OpenPeer},
    peer_log::{PeerLog, SharedPeerLog},
    peers::{PeerReader, PeerTimeouts, PeerView, ReadSchedule, series::SeriesLimits},
    tls::TlsFunnel,
    totals::Totals,
};
use crate::{kernel::MapSizes, output::peer_label::PeerLabel};
use hashbrown::DefaultHashBuilder;
use lru::LruCache;
use smtpflow_common::{
    Config, Counter, Direction, Event, FAMILY_V4, FlowKey, FlowState, HIST_BUCKETS, HistKind,
    Histogram, PeerCounters, PeerGreetingKey, PeerKey, Scope, Side, Stat, flow, flow_table, names,
    payload::{PAYLOAD_RING_BYTES, PayloadEvent},
    peer::peer_counts,
};

/// Most peers whose timed-out handshakes are counted one by one (the least recently timed out
/// are forgotten first; the totals stay exact). Only the exported peers' counts are exported
/// and the diagnosis names five peers, so this need not follow `--max-peers`: at a million peers
/// that would be some 90 MiB for counts nobody reads.
const PEER_TIMEOUTS_KEPT: usize = 65_536;

/// Owned handles on the kernel maps, and what userspace itself counts.
pub struct Maps {
    totals: Totals,
    sweep: FlowSweep,
    peers: PeerMaps,
    stats: PerCpuArray<MapData, u64>,
    /// The payload events' ring buffer ([`Maps::read_payloads`]).
    payloads: RecordRing,
    pub peers_capacity: u32,
    /// The reply-code entries `--max-peers` makes room for ([`crate::kernel::Sizes::max_peer_replies`]).
    peer_replies_capacity: u32,
    pub flows_capacity: u32,
    /// The entries the LRU maps are created with (their capacity and the room Linux's LRU
    /// keeps free), what bounds their live entries.
    map_sizes: MapSizes,
    /// Highest eviction counts reported so far (the estimates only ever grow).
    peer_evictions: u64,
    peer_reply_evictions: u64,
    /// How long the last drain that read the per-peer maps took.
    full_drain_seconds: f64,
    /// What userspace counts from the payload events.
    tls: TlsFunnel,
}

/// The flow table, swept for handshakes that timed out, and the timeouts counted.
struct FlowSweep {
    flows: FlowTable,
    timeouts: Timeouts,
    /// Timed-out handshakes per peer entry, for the [`PEER_TIMEOUTS_KEPT`] most recent.
    peer_timeouts: LruCache<PeerKey, PeerTimeouts>,
    /// The established connections the last listing showed.
    open: OpenConnections,
}

/// The handshake timeouts the sweep counts: pure bookkeeping over listings of the flow table,
/// so that the decision can be tested against the kernel's state machine without a kernel.
///
/// An attempt is counted once, when a listing shows it [`flow::sweep`]-timed-out: its first SYN
/// older than the timeout plus a grace, and no answer in time. Its way of the table remembers
/// it: a flow keeps its way while it lives, so every later listing finds it counted there, and
/// a new attempt in that way (another flow, or a new first SYN on the same ports) is a new one.
///
/// An attempt is remembered by a fingerprint: a 64-bit keyed hash (foldhash, keys random per
/// process) of its flow key and first-SYN time, one word a way. A table full of timed-out
/// attempts (a flood from spoofed sources: the default's 524,288 ways) holds 4 MiB, and a
/// sweep neither sorts nor searches; the pages of ways that never held a timed-out attempt are
/// never touched (zeroed memory from the allocator). Before, two sorted vectors held the
/// fingerprints a listing showed and those it had counted: 8 MiB at their peak with that table,
/// and a sort and a binary search a sweep. A new attempt has its way's previous fingerprint
/// with a probability of 2⁻⁶³; the cost would be one timeout not counted.
pub struct Timeouts {
    timeout_ns: u64,
    /// Keys of the fingerprints.
    fingerprint: DefaultHashBuilder,
    /// By way of the table: the fingerprint of the timed-out attempt it held when counted
    /// (odd), or 0.
    counted: Vec<u64>,
    /// Timed-out handshakes by scope.
    by_scope: BTreeMap<Scope, u64>,
}

impl Timeouts {
    /// For a table of `ways` ways.
    pub fn new(handshake_timeout: Duration, ways: usize) -> Self {
        Self {
            timeout_ns: u64::try_from(handshake_timeout.as_nanos()).unwrap_or(u64::MAX),
            fingerprint: DefaultHashBuilder::default(),
            counted: vec![0; ways],
            by_scope: BTreeMap::new(),
        }
    }

    /// Way `way`'s entry of a listing read at or after `now`: whether the attempt timed out and
    /// was not counted before (now it is), and whether the entry is idle.
    pub fn entry(&mut self, way: usize, key: &FlowKey, st: &FlowState, now: u64) -> (bool, bool) {
        let swept = flow::sweep(st, now, self.timeout_ns);
        let mut counted = false;
        if swept.timeout
            && let Some(seen) = self.counted.get_mut(way)
        {
            let attempt = self.fingerprint.hash_one((key, st.syn_ns)) | 1;
            // A flow shows in two ways only if two CPUs inserted it at the same moment, each
            // finding no way for it: then its timeout could count twice.
            counted = *seen != attempt;
            if counted {
                *seen = attempt;
                if let Some(direction) = Direction::from_repr(key.direction) {
                    let scope = Scope { ifindex: key.ifindex, port: key.server_port, direction };
                    *self.by_scope.entry(scope).or_default() += 1;
                }
            }
        }
        (counted, swept.idle)
    }
}

/// The per-peer maps: how they are read, when, and the last reading.
struct PeerMaps {
    peers: HashMap<MapData, PeerKey, PeerCounters>,
    /// With `--peer-counts log`: the per-peer log and userspace's table, read instead of
    /// `peers` (then a map of one entry the programs never touch).
    log: Option<SharedPeerLog>,
    greetings: HashMap<MapData, PeerGreetingKey, u64>,
    reader: PeerReader,
    /// `--peer-label`, to find the exported label of a peer with open connections.
    labeler: PeerLabel,
    schedule: ReadSchedule,
    view: Arc<PeerView>,
    /// When the current read started, and the CPU time its first step took on its thread.
    read_started: Instant,
    entries_cpu: Duration,
}

/// Whether a drain reads the per-peer maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRead {
    /// When [`ReadSchedule`] says so (every drain while they are small).
    WhenDue,
    /// Now: for a verdict that must reflect the last moment.
    Now,
}

/// One reading of the kernel maps.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Exact counters, summed over CPUs, by what they count.
    pub counters: BTreeMap<(Scope, Counter), u64>,
    /// Duration histograms, summed over CPUs.
    pub hists: BTreeMap<(Scope, HistKind), Histogram>,
    /// The last full reading of the per-peer maps (shared by the snapshots until the next).
    pub peers: Arc<PeerView>,
    /// Whether [`Snapshot::peers`] was read in this drain (else it is an earlier reading).
    pub peers_fresh: bool,
    /// Timed-out handshakes (decided by the sweep, not counted in the kernel).
    pub timeouts: BTreeMap<Scope, u64>,
    /// [`Stat`] counters summed over CPUs.
    pub stats: [u64; Stat::COUNT],
    pub peer_evictions: u64,
    pub peers_capacity: u32,
    /// Per-peer reply-code entries evicted, and the entries `--max-peers` makes room for.
    pub peer_reply_evictions: u64,
    pub peer_replies_capacity: u32,
    pub flows: usize,
    pub flow_evictions: u64,
    pub flows_capacity: u32,
    pub drain_seconds: f64,
    /// How long the last drain that read the per-peer maps took (itself included).
    pub full_drain_seconds: f64,
    /// The kernel's pressure signals, read beside the maps.
    pub pressure: crate::host::pressure::Pressure,
    /// Whether each watched interface is still there.
    pub ifaces_up: Vec<(String, bool)>,
    /// Established connections not ended, by scope (every watched scope, 0 when none), as the
    /// flow map showed them in this drain ([`open::is_open`]).
    pub open_by_scope: BTreeMap<Scope, u64>,
    /// The same by per-peer entry (the client of inbound connections, the server of outbound
    /// ones); only entries with an open connection.
    pub open_by_peer: StdHashMap<PeerKey, u64>,
    /// `smtpflow_site_open_connections`: open connections by site, direction and port.
    pub site_open: Vec<crate::sites::SiteOpen>,
    /// `smtpflow_peer_open_connections`: for each exported peer label, direction and port of
    /// [`Snapshot::peers`], its open connections (0 when none).
    pub open_peers: Vec<OpenPeer>,
    /// What userspace counts from the payload events: STARTTLS offered, TLS versions.
    pub tls: TlsFunnel,
    /// The payload events read from the kernel's ring buffer in this drain
    /// ([`Maps::read_payloads`]), in the order they were written. Each is read once: a later
    /// snapshot holds only newer ones.
    pub payloads: Vec<PayloadEvent>,
}

impl Snapshot {
    /// Event totals: the [`Counter::Event`] counters.
    pub fn events(&self) -> impl Iterator<Item = (&Scope, Event, Side, u64)> {
        self.counters.iter().filter_map(|((scope, counter), v)| match *counter {
            Counter::Event(e, s) => Some((scope, e, s, *v)),
            _ => None,
        })
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    T::try_from(take_map(ebpf, name)?).with_context(|| format!("map {name} has an unexpected type"))
}

/// The map `name` of the loaded object, taken out of it.
fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the embedded object (a build problem)"))
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Maps {
    /// The maps of an object loaded with `config` and `sizes`. `max_peer_series`: how many
    /// labels the per-peer readings export as series (0: none), made by `labeler`.
    pub fn take(
        ebpf: &mut Ebpf,
        config: &Config,
        sizes: &crate::kernel::Sizes,
        handshake_timeout: Duration,
        max_peer_series: usize,
        labeler: PeerLabel,
        sites: crate::sites::Sites,
    ) -> anyhow::Result<Self> {
        let (peers_capacity, flows_capacity) = (sizes.max_peers, sizes.max_flows);
        let map_sizes = sizes.maps(crate::kernel::possible_cpus()?);
        let mut reader = PeerReader::with_series(
            SeriesLimits::new(max_peer_series),
            labeler.clone(),
            peers_capacity as usize,
        );
        reader.set_sites(sites);
        let flows = FlowTable::take(ebpf, config.flow_seed)?;
        let ways = flows.sets() as usize * flow_table::FLOW_WAYS;
        let log = (config.peer_log != peer_counts::MAP)
            .then(|| {
                RecordRing::take(ebpf, names::MAP_PEER_LOG)
                    .map(|ring| SharedPeerLog::new(PeerLog::new(ring, peers_capacity)))
            })
            .transpose()?;
        let timeouts_kept = (peers_capacity as usize).min(PEER_TIMEOUTS_KEPT);
        Ok(Self {
            totals: Totals::take(ebpf, config)?,
            sweep: FlowSweep {
                flows,
                timeouts: Timeouts::new(handshake_timeout, ways),
                peer_timeouts: LruCache::new(
                    NonZeroUsize::new(timeouts_kept).unwrap_or(NonZeroUsize::MIN),
                ),
                open: OpenConnections::default(),
            },
            peers: PeerMaps {
                peers: take(ebpf, names::MAP_PEERS)?,
                log,
                greetings: take(ebpf, names::MAP_PEER_GREETINGS)?,
                reader,
                labeler,
                schedule: ReadSchedule::new(),
                view: Arc::default(),
                read_started: Instant::now(),
                entries_cpu: Duration::ZERO,
            },
            stats: take(ebpf, names::MAP_STATS)?,
            payloads: RecordRing::take(ebpf, names::MAP_PAYLOADS)?,
            peers_capacity,
            peer_replies_capacity: sizes.max_peer_replies(),
            flows_capacity,
            map_sizes,
            peer_evictions: 0,
            peer_reply_evictions: 0,
            full_drain_seconds: 0.0,
            tls: TlsFunnel::default(),
        })
    }

    /// Sets `--peer-series-idle`: how long an exported per-peer label stays without increasing.
    pub fn set_peer_series_idle(&mut self, idle: Duration) {
        self.peers.reader.set_series_idle(idle);
        self.peers.reader.sites_mut().set_idle(idle);
    }

    /// Learns the remote names payload events say (before the per-peer read of the same
    /// drain, so that the rises it reads go to the sites just named).
    pub fn learn_names(&mut self, payloads: &[smtpflow_common::PayloadEvent]) {
        if !payloads.is_empty() {
            self.peers.reader.sites_mut().learn(payloads, Instant::now());
        }
    }

    /// Starts userspace's own counts of every watched scope at zero (timeouts, open
    /// connections, the STARTTLS funnel), so that every series exists from the first scrape. The
    /// kernel's counters and histograms need no seeding: their arrays hold every watched scope
    /// from the start ([`totals`]).
    pub fn seed(&mut self, config: &Config) {
        for (_, scope) in config.scopes() {
            self.sweep.timeouts.by_scope.entry(scope).or_default();
            self.sweep.open.watch(scope);
            self.tls.watch(scope);
        }
    }

    /// Counts the payload events read from the kernel's ring buffer (each once): the STARTTLS
    /// `offered` stage and the TLS versions. Returns the totals so far.
    pub fn count_payloads(&mut self, events: &[PayloadEvent]) -> &TlsFunnel {
        for e in events {
            self.tls.count(e);
        }
        &self.tls
    }

    /// Drains the payload events the kernel wrote since the last call, calling `f` on each, and
    /// returns how many were read. A record of another size than [`PayloadEvent`] (a kernel
    /// object of another version) is skipped. At most a ring buffer's worth is read per call, so
    /// that a kernel writing as fast as this reads cannot keep the drain here.
    pub fn read_payloads(&mut self, mut f: impl FnMut(&PayloadEvent)) -> usize {
        const MOST: usize = PAYLOAD_RING_BYTES as usize / size_of::<PayloadEvent>() + 1;
        self.payloads.read(MOST, "payload", |ev: PayloadEvent| f(&ev))
    }

    /// The [`Stat`] counters, summed over CPUs.
    fn read_stats(&self) -> anyhow::Result<[u64; Stat::COUNT]> {
        let mut stats = [0u64; Stat::COUNT];
        for (i, slot) in stats.iter_mut().enumerate() {
            let values = self.stats.get(&(i as u32), 0).context("reading the stats map")?;
            *slot = values.iter().sum();
        }
        Ok(stats)
    }

    /// Reads the maps. The per-peer maps are read when `peers` says so; otherwise the snapshot
    /// carries their last reading.
    pub fn drain(&mut self, peers: PeerRead) -> anyhow::Result<Snapshot> {
        let started = Instant::now();
        // Evictions are estimated as inserts - live entries - deletions. Inserts are read before
        // the maps are listed and deletions after, so the estimate can only be too low at one
        // moment (never too high), and keeping the largest one seen is exact over time.
        let inserted = self.read_stats()?;
        if let Some(log) = &mut self.peers.log {
            log.start_polling()?;
        }
        let read_peers = peers == PeerRead::Now || self.peers.schedule.due(started);
        let (flows, (counters, hists)) = if read_peers {
            let (peer_maps, sweep, totals) = (&mut self.peers, &mut self.sweep, &self.totals);
            // Listing a big per-peer map is most of a full drain (about 0.7 s for a million
            // entries, mostly the kernel's walk, which runs on a thread of its own besides:
            // `batch::for_each_raw`): it runs on a second thread meanwhile the flow map and the
            // totals are read.
            std::thread::scope(|s| {
                let entries = s.spawn(|| peer_maps.read_entries());
                let rest = sweep.sweep().and_then(|flows| Ok((flows, totals.read()?)));
                let entries = entries.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                entries.and(rest)
            })?
        } else {
            (self.sweep.sweep()?, self.totals.read()?)
        };
        if read_peers {
            let (entries, reply_entries) =
                self.peers.read_rest(self.sweep.peer_timeouts.iter_mut(), self.map_sizes)?;
            self.peer_evictions = self
                .peer_evictions
                .max(inserted[Stat::PeerInserts as usize].saturating_sub(entries as u64));
            self.peer_reply_evictions = self.peer_reply_evictions.max(
                inserted[Stat::PeerReplyInserts as usize].saturating_sub(reply_entries as u64),
            );
        }
        let stats = self.read_stats()?;
        // Between readings of the per-peer maps: live entries never exceed a map's size, and
        // the kernel never deletes any, so at least inserts - size were evicted.
        let sizes = self.map_sizes;
        self.peer_evictions = self
            .peer_evictions
            .max(stats[Stat::PeerInserts as usize].saturating_sub(u64::from(sizes.peers)));
        self.peer_reply_evictions = self.peer_reply_evictions.max(
            stats[Stat::PeerReplyInserts as usize].saturating_sub(u64::from(sizes.peer_replies)),
        );
        if let Some(log) = &self.peers.log {
            // Exact: userspace's own table counts what it evicts.
            self.peer_evictions = log.evictions();
        }
        let drain_seconds = started.elapsed().as_secs_f64();
        if read_peers {
            self.full_drain_seconds = drain_seconds;
        }
        Ok(Snapshot {
            counters,
            hists,
            peers: self.peers.view.clone(),
            peers_fresh: read_peers,
            timeouts: self.sweep.timeouts.by_scope.clone(),
            stats,
            peer_evictions: self.peer_evictions,
            peers_capacity: self.peers_capacity,
            peer_reply_evictions: self.peer_reply_evictions,
            peer_replies_capacity: self.peer_replies_capacity,
            flows,
            // Exact: the kernel counts every flow it overwrites.
            flow_evictions: stats[Stat::FlowEvictions as usize],
            flows_capacity: self.flows_capacity,
            drain_seconds,
            full_drain_seconds: self.full_drain_seconds,
            pressure: Default::default(),
            ifaces_up: Vec::new(),
            open_by_scope: self.sweep.open.by_scope.clone(),
            open_peers: self.sweep.open.peer_series(&self.peers.view, &self.peers.labeler),
            open_by_peer: self.sweep.open.by_peer.clone(),
            site_open: self.peers.reader.sites_mut().open_connections(&self.sweep.open.by_peer),
            tls: self.tls.clone(),
            payloads: Vec::new(),
        })
    }
}

impl FlowSweep {
    /// Lists the flow table once: counts the attempts that timed out (each once), and the open
    /// connections. Returns the number of flows followed (those not idle). Never writes a flow.
    fn sweep(&mut self) -> anyhow::Result<usize> {
        // Read before the listing: a flow is read at or after `now`, so one shown pending with
        // its first SYN older than the timeout plus the grace had no answer in time.
        let now = monotonic_ns();
        let (timeouts, peer_timeouts, open) =
            (&mut self.timeouts, &mut self.peer_timeouts, &mut self.open);
        open.start();
        let mut live = 0;
        self.flows.for_each(|way, key, st| {
            let (timed_out, is_idle) = timeouts.entry(way, key, st, now);
            if timed_out {
                peer_timeouts.get_or_insert_mut(flow_peer(key), PeerTimeouts::default).total += 1;
            }
            // An idle flow is no longer followed: its way goes to the next new flow that needs
            // it, and it is not open.
            if !is_idle {
                open.entry(key, st);
                live += 1;
            }
        })?;
        Ok(live)
    }
}

impl PeerMaps {
    /// A full read, first step: every entry of the per-peer map.
    fn read_entries(&mut self) -> anyhow::Result<()> {
        self.read_started = Instant::now();
        let cpu = batch::thread_cpu_time();
        match &self.log {
            Some(log) => self.reader.read_table(log.read().table().iter()),
            None => self.reader.read_entries(&self.peers)?,
        }
        self.entries_cpu = batch::thread_cpu_time().saturating_sub(cpu);
        Ok(())
    }

    /// A full read, second step: the exported peers' timeouts and greetings. Replaces the
    /// view, schedules the next read, and returns the number of entries in the per-peer map
    /// and in the per-peer reply map, at most their `sizes` ([`within_sizes`]).
    fn read_rest<'a>(
        &mut self,
        timeouts: impl IntoIterator<Item = (&'a PeerKey, &'a mut PeerTimeouts)>,
        sizes: MapSizes,
    ) -> anyhow::Result<(usize, usize)> {
        let cpu = batch::thread_cpu_time();
        let mut view = self.reader.read_rest(&self.greetings, timeouts)?;
        within_sizes(&mut view, sizes);
        // Its CPU time on every thread: the two steps' (on two threads) and the batched
        // reads' own threads'.
        let rest_cpu = batch::thread_cpu_time().saturating_sub(cpu);
        let cost = self.entries_cpu + rest_cpu + self.reader.walker_cpu();
        self.schedule.done(self.read_started, cost);
        let entries = (view.entries, view.reply_entries);
        self.view = Arc::new(view);
        Ok(entries)
    }
}

/// Bounds a read's entry counts by the maps' sizes. A read walks a hash map's buckets while
/// the kernel changes it: under a flood, an entry evicted after its bucket was read makes room
/// for a new one in a bucket not read yet, so the read can count more entries than the map
/// ever holds at once (27 over 65,920 in a million-source flood here). No map holds more than
/// its size, so that is the count; the peers tracked are among those entries.
fn within_sizes(view: &mut PeerView, sizes: MapSizes) {
    view.entries = view.entries.min(sizes.peers as usize);
    view.reply_entries = view.reply_entries.min(sizes.peer_replies as usize);
    view.tracked = view.tracked.min(view.entries);
}

/// The per-peer entry a connection belongs to (its timed-out handshake, its open connection):
/// the peer is the client of inbound connections and the server of outbound ones.
pub fn flow_peer(key: &FlowKey) -> PeerKey {
    let inbound = key.direction == Direction::Inbound as u8;
    PeerKey {
        ifindex: key.ifindex,
        addr: if inbound { key.client } else { key.server },
        port: key.server_port,
        family: key.family,
        direction: key.direction,
    }
}

const _: () = assert!(HIST_BUCKETS == 18 && FAMILY_V4 == 4);

#[cfg(test)]
mod tests {
    use smtpflow_common::{
        Outcome,
        flow::{FlowPacket, IDLE_NS, step},
        rules::tcp_flags::{ACK, RST, SYN},
    };

    use super::*;

    #[test]
    fn a_read_counts_no_more_entries_than_the_maps_hold() {
        let sizes = MapSizes { peers: 65_920, peer_replies: 262_528, flow_sets: 65_536 };
        let read = |entries, reply_entries, tracked| {
            let mut view = PeerView::default();
            (view.entries, view.reply_entries, view.tracked) = (entries, reply_entries, tracked);
            within_sizes(&mut view, sizes);
            (view.entries, view.reply_entries, view.tracked)
        };
        // A read under a flood met 27 entries too many: the counts stop at the maps' sizes.
        assert_eq!(read(65_947, 262_600, 65_947), (65_920, 262_528, 65_920));
        // Below them, nothing changes.
        assert_eq!(read(300, 1_200, 290), (300, 1_200, 290));
    }

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;
    const TIMEOUT: u64 = 5 * S;
    const SYN_AT: u64 = 10 * S;

    fn key() -> FlowKey {
        FlowKey {
            ifindex: 2,
            client: [10; 16],
            server: [20; 16],
            client_port: 40000,
            server_port: 25,
            family: FAMILY_V4,
            direction: Direction::Outbound as u8,
            _pad: [0; 2],
        }
    }

    fn pkt(flags: u8, from_client: bool) -> FlowPacket {
        FlowPacket { flags, from_client, seq: 7, ends_line: true, ..FlowPacket::default() }
    }

    /// How an attempt is answered, `at` after its first SYN.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        SynAck,
        /// A SYN-ACK, then a RST from the server 10 ms later (a late answer quickly closed).
        SynAckThenRst,
        Rst,
        /// The client's ACK (XDP, which sees no SYN-ACK).
        ClientAck,
        /// An ICMP destination unreachable quoting the SYN.
        Unreachable,
        /// An ICMP unreachable, then a SYN-ACK 10 ms later (to a retransmission the client sent
        /// after a soft error): the SYN-ACK decides nothing.
        UnreachableThenSynAck,
        Never,
    }

    /// What reaches the kernel for an attempt: a segment of the flow, or an ICMP unreachable
    /// quoting its SYN (sequence number 7).
    #[derive(Clone, Copy, Debug)]
    enum Seen {
        Segment(FlowPacket),
        Unreachable,
    }

    /// The packets of one attempt, by the time the kernel read its clock for each: the SYN,
    /// its retransmissions after 1 s and 3 s (as Linux sends them) while it is not answered,
    /// and the answer.
    fn attempt(answer: Answer, at: u64) -> Vec<(u64, Seen)> {
        let t = SYN_AT + at;
        let seg = |flags, from_client| Seen::Segment(pkt(flags, from_client));
        let mut p: Vec<(u64, Seen)> = [SYN_AT, SYN_AT + S, SYN_AT + 3 * S]
            .into_iter()
            .filter(|&syn| syn == SYN_AT || syn < t)
            .map(|syn| (syn, seg(SYN, true)))
            .collect();
        match answer {
            Answer::SynAck => p.push((t, seg(SYN | ACK, false))),
            Answer::SynAckThenRst => {
                p.push((t, seg(SYN | ACK, false)));
                p.push((t + 10 * MS, seg(RST | ACK, false)));
            }
            Answer::Rst => p.push((t, seg(RST | ACK, false))),
            Answer::ClientAck => p.push((t, seg(ACK, true))),
            Answer::Unreachable => p.push((t, Seen::Unreachable)),
            Answer::UnreachableThenSynAck => {
                p.push((t, Seen::Unreachable));
                p.push((t + 10 * MS, seg(SYN | ACK, false)));
            }
            Answer::Never => {}
        }
        p.sort_by_key(|(t, _)| *t);
        p
    }

    /// The flow entry after the packets written by `at` (each written `write_delay` after its
    /// clock read), as a map holds it; and the outcomes the kernel counted for them.
    fn kernel(
        packets: &[(u64, Seen)],
        at: u64,
        write_delay: u64,
    ) -> (Option<FlowState>, Vec<Outcome>) {
        let mut entry: Option<FlowState> = None;
        let mut outcomes = Vec::new();
        for (t, p) in packets.iter().filter(|(t, _)| t + write_delay <= at) {
            let mut st = entry.unwrap_or_default();
            let a = match p {
                Seen::Segment(p) => step(&mut st, entry.is_some(), p, *t, TIMEOUT),
                // The kernel writes only a flow it found.
                Seen::Unreachable if entry.is_some() => {
                    smtpflow_common::flow::unreachable(&mut st, 7, *t, TIMEOUT)
                }
                Seen::Unreachable => continue,
            };
            outcomes.extend(a.outcome);
            if a.delete {
                entry = None;
            } else if a.store {
                entry = Some(st);
            }
        }
        (entry, outcomes)
    }

    /// One attempt against sweeps every `interval`, each reading its clock and then the entry
    /// `lag` later (a sweep in progress while the kernel goes on). Returns the kernel's outcomes
    /// and the timeouts the sweeps counted.
    fn race(
        packets: &[(u64, Seen)],
        interval: u64,
        lag: u64,
        write_delay: u64,
    ) -> (Vec<Outcome>, u64) {
        let mut timeouts = Timeouts::new(Duration::from_nanos(TIMEOUT), 1);
        let mut now = 0;
        while now < SYN_AT + 60 * S {
            if let (Some(st), _) = kernel(packets, now + lag, write_delay) {
                timeouts.entry(0, &key(), &st, now);
            }
            now += interval;
        }
        let (_, outcomes) = kernel(packets, u64::MAX, 0);
        (outcomes, timeouts.by_scope.values().sum())
    }

    /// A late SYN-ACK (or RST, or client ACK, or ICMP unreachable) against a sweep in progress
    /// never yields two outcomes, nor none: whatever the order of the kernel's write and the
    /// sweep's read, an attempt is `established`/`refused`/`unreachable` if answered within the
    /// timeout, else one `timeout`.
    #[test]
    fn a_late_answer_against_a_sweep_in_progress_is_one_outcome() {
        let grace = smtpflow_common::flow::SWEEP_GRACE_NS;
        let ats = [
            0,
            S,
            TIMEOUT - MS,
            TIMEOUT - 1,
            TIMEOUT,
            TIMEOUT + 1,
            TIMEOUT + MS,
            TIMEOUT + grace / 2,
            TIMEOUT + grace - 1,
            TIMEOUT + grace,
            TIMEOUT + grace + 1,
            TIMEOUT + grace + 300 * MS,
            2 * TIMEOUT,
            8 * TIMEOUT,
        ];
        let answers = [
            Answer::SynAck,
            Answer::SynAckThenRst,
            Answer::Rst,
            Answer::ClientAck,
            Answer::Unreachable,
            Answer::UnreachableThenSynAck,
            Answer::Never,
        ];
        let mut runs = 0;
        for answer in answers {
            for at in ats {
                let packets = attempt(answer, at);
                for interval in [100 * MS, S, 1_300 * MS, 7 * S] {
                    for lag in [0, 1, 200 * MS, 3 * S] {
                        for write_delay in [0, 1_000, 900 * MS] {
                            let (outcomes, timeouts) = race(&packets, interval, lag, write_delay);
                            let what = format!(
                                "{answer:?} after {at} ns; sweeps every {interval} ns reading \
                                 {lag} ns after their clock; kernel writes {write_delay} ns \
                                 after its clock: kernel {outcomes:?}, timeouts {timeouts}"
                            );
                            let in_time = at <= TIMEOUT;
                            let want = match answer {
                                Answer::SynAck | Answer::SynAckThenRst | Answer::ClientAck
                                    if in_time =>
                                {
                                    (vec![Outcome::Established], 0)
                                }
                                Answer::Rst if in_time => (vec![Outcome::Refused], 0),
                                Answer::Unreachable | Answer::UnreachableThenSynAck if in_time => {
                                    (vec![Outcome::Unreachable], 0)
                                }
                                _ => (vec![], 1),
                            };
                            assert_eq!((outcomes, timeouts), want, "{what}");
                            runs += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(runs, answers.len() * ats.len() * 4 * 4 * 3);
    }

    /// A counted attempt is remembered in its way, however many listings show it, and whatever
    /// the other ways hold; a new attempt in the way (a new first SYN on the same ports) is a new
    /// one.
    #[test]
    fn counted_attempts_are_remembered_in_their_way() {
        let mut t = Timeouts::new(Duration::from_nanos(TIMEOUT), 2);
        let mut st = FlowState::default();
        step(&mut st, false, &pkt(SYN, true), SYN_AT, TIMEOUT);
        let late = SYN_AT + 7 * S;
        assert_eq!(t.entry(1, &key(), &st, late), (true, false));
        assert_eq!(t.entry(1, &key(), &st, late + S), (false, false), "once");
        let mut other = FlowState::default();
        step(&mut other, false, &pkt(SYN, true), SYN_AT + 1, TIMEOUT);
        assert_eq!(t.entry(0, &key(), &other, late), (true, false), "another way's attempt");
        assert_eq!(t.entry(1, &key(), &st, late + 2 * S), (false, false), "still once");
        let mut again = pkt(SYN, true);
        again.seq = 99;
        step(&mut st, true, &again, late + 2 * S, TIMEOUT);
        assert_eq!(t.entry(1, &key(), &st, late + 9 * S), (true, false), "a new attempt");
        assert_eq!(t.entry(1, &key(), &st, late + 10 * S), (false, false), "counted once");
        assert_eq!(t.entry(9, &key(), &st, late + 10 * S), (false, false), "no such way");
        let scope = Scope { ifindex: 2, port: 25, direction: Direction::Outbound };
        assert_eq!(t.by_scope.get(&scope), Some(&3));
        // Idle: not written for the idle time.
        assert!(t.entry(1, &key(), &st, late + 2 * S + IDLE_NS + 2 * S).1);
    }
}
