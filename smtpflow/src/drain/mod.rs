//! Reading the kernel maps into a [`Snapshot`]: exact counters and histograms summed over CPUs,
//! a bounded view of the per-peer maps ([`crate::peers`]), and the programs' own bookkeeping;
//! and sweeping the flow map for handshakes that timed out (the one outcome decided here, since
//! it is the absence of a packet).
pub mod batch;
pub mod peers;

use std::{
    collections::BTreeMap,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{
        HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
};
use std::os::fd::AsFd as _;

use self::peers::{PeerReader, PeerView, ReadSchedule, series::SeriesLimits};
use crate::output::peer_label::PeerLabel;
use lru::LruCache;
use smtpflow_common::{
    Counter, CounterKey, Direction, Event, FAMILY_V4, FlowKey, FlowState, HIST_BUCKETS, HistKey,
    HistKind, Histogram, PeerCounters, PeerGreetingKey, PeerKey, Scope, Side, Stat, flow::state,
    names,
};

/// Most peers whose timed-out handshakes are counted one by one (the least recently timed out
/// are forgotten first; the totals stay exact). Only the exported peers' counts are exported
/// and the diagnosis names five peers, so this need not follow `--max-peers`: at a million peers
/// that would be some 90 MiB for counts nobody reads.
const PEER_TIMEOUTS_KEPT: usize = 65_536;

/// `bpf_map_update_elem` flags: create only; update only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Owned handles on the kernel maps, and what userspace itself counts.
pub struct Maps {
    totals: Totals,
    sweep: FlowSweep,
    peers: PeerMaps,
    stats: PerCpuArray<MapData, u64>,
    pub peers_capacity: u32,
    pub flows_capacity: u32,
    /// Highest eviction counts reported so far (the estimates only ever grow).
    peer_evictions: u64,
    flow_evictions: u64,
    /// How long the last drain that read the per-peer maps took.
    full_drain_seconds: f64,
}

/// The exact counters and the histograms, summed over CPUs.
struct Totals {
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    hists: PerCpuHashMap<MapData, HistKey, Histogram>,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    nr_cpus: usize,
}

/// The flow map, swept for handshakes that timed out, and the timeouts counted.
struct FlowSweep {
    flows: HashMap<MapData, FlowKey, FlowState>,
    /// A second handle on the flow map, to mark timed-out flows while `flows` lists it.
    marker: HashMap<MapData, FlowKey, FlowState>,
    handshake_timeout: Duration,
    /// Timed-out handshakes.
    timeouts: BTreeMap<Scope, u64>,
    /// Timed-out handshakes per peer entry, for the [`PEER_TIMEOUTS_KEPT`] most recent.
    peer_timeouts: LruCache<PeerKey, u64>,
}

/// The per-peer maps: how they are read, when, and the last reading.
struct PeerMaps {
    peers: HashMap<MapData, PeerKey, PeerCounters>,
    greetings: HashMap<MapData, PeerGreetingKey, u64>,
    reader: PeerReader,
    schedule: ReadSchedule,
    view: Arc<PeerView>,
    /// When the current read started, and how long its first step took.
    read_started: Instant,
    entries_took: Duration,
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
    let map = ebpf.take_map(name).with_context(|| {
        format!("map {name} missing from the embedded object (a build problem)")
    })?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn is_exists(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// Sums each key's per-CPU values: batched (a few syscalls for the whole map), else key by
/// key, skipping keys deleted while we iterate.
fn read_per_cpu<K: aya::Pod + Ord, V: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
    what: &str,
    nr_cpus: usize,
    mut fold: impl FnMut(&mut dyn Iterator<Item = V>) -> V,
) -> anyhow::Result<BTreeMap<K, V>> {
    let mut out = BTreeMap::new();
    let batched = batch::for_each_per_cpu::<K, V>(
        map.map().fd().as_fd(),
        nr_cpus,
        batch::DEFAULT_CHUNK,
        |k, values| {
            out.insert(*k, fold(values));
        },
    );
    match batched {
        Ok(_) => return Ok(out),
        Err(e) if batch::batch_unsupported(&e) => out.clear(),
        Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
    }
    for item in map.iter() {
        match item {
            Ok((key, values)) => {
                out.insert(key, fold(&mut values.iter().copied()));
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
        }
    }
    Ok(out)
}

/// A second handle on an LRU hash map (a duplicate of its descriptor).
fn second_handle<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let fd = map.map().fd().as_fd().try_clone_to_owned().with_context(|| {
        format!("duplicating the {name} map's descriptor (out of descriptors?)")
    })?;
    let data = MapData::from_fd(fd).with_context(|| format!("reopening the {name} map"))?;
    HashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    /// `max_peer_series`: how many labels the per-peer readings export as series (0: none),
    /// made by `labeler`.
    pub fn take(
        ebpf: &mut Ebpf,
        peers_capacity: u32,
        flows_capacity: u32,
        handshake_timeout: Duration,
        max_peer_series: usize,
        labeler: PeerLabel,
    ) -> anyhow::Result<Self> {
        let flows = take(ebpf, names::MAP_FLOWS)?;
        let marker = second_handle(&flows, names::MAP_FLOWS)?;
        let timeouts_kept = (peers_capacity as usize).min(PEER_TIMEOUTS_KEPT);
        Ok(Self {
            totals: Totals {
                counters: take(ebpf, names::MAP_COUNTERS)?,
                hists: take(ebpf, names::MAP_HISTS)?,
                nr_cpus: aya::util::nr_cpus()
                    .map_err(|(_, e)| e)
                    .context("reading the CPU count")?,
            },
            sweep: FlowSweep {
                flows,
                marker,
                handshake_timeout,
                timeouts: BTreeMap::new(),
                peer_timeouts: LruCache::new(
                    NonZeroUsize::new(timeouts_kept).unwrap_or(NonZeroUsize::MIN),
                ),
            },
            peers: PeerMaps {
                peers: take(ebpf, names::MAP_PEERS)?,
                greetings: take(ebpf, names::MAP_PEER_GREETINGS)?,
                reader: PeerReader::with_series(
                    SeriesLimits::new(max_peer_series),
                    labeler,
                    peers_capacity as usize,
                ),
                schedule: ReadSchedule::new(),
                view: Arc::default(),
                read_started: Instant::now(),
                entries_took: Duration::ZERO,
            },
            stats: take(ebpf, names::MAP_STATS)?,
            peers_capacity,
            flows_capacity,
            peer_evictions: 0,
            flow_evictions: 0,
            full_drain_seconds: 0.0,
        })
    }

    /// Sets `--peer-series-idle`: how long an exported per-peer label stays without increasing.
    pub fn set_peer_series_idle(&mut self, idle: Duration) {
        self.peers.reader.set_series_idle(idle);
    }

    /// Creates every fixed counter and histogram of the watched interfaces and ports at zero, so
    /// the kernel only ever looks them up and every series exists from the first scrape.
    pub fn seed(&mut self, ifindexes: &[u32], ports: &[u16]) -> anyhow::Result<()> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("reading the CPU count")?;
        for scope in scopes(ifindexes, ports) {
            for counter in Counter::seeded() {
                let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus]).context("per-CPU zeros")?;
                match self.totals.counters.insert(
                    CounterKey::new(scope, counter),
                    zeros,
                    BPF_NOEXIST,
                ) {
                    Ok(()) => {}
                    Err(e) if is_exists(&e) => {}
                    Err(e) => return Err(e).context("seeding the counters map"),
                }
            }
            for kind in HistKind::ALL {
                let zeros = PerCpuValues::try_from(vec![Histogram::ZERO; nr_cpus])
                    .context("per-CPU zeros")?;
                match self.totals.hists.insert(HistKey::new(scope, kind), zeros, BPF_NOEXIST) {
                    Ok(()) => {}
                    Err(e) if is_exists(&e) => {}
                    Err(e) => return Err(e).context("seeding the histograms map"),
                }
            }
            self.sweep.timeouts.entry(scope).or_default();
        }
        Ok(())
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
        let read_peers = peers == PeerRead::Now || self.peers.schedule.due(started);
        let (flows, (counters, hists)) = if read_peers {
            let (peer_maps, sweep, totals) = (&mut self.peers, &mut self.sweep, &self.totals);
            // Listing a big per-peer map is most of a full drain (about 0.5 s for a million
            // entries, mostly in the kernel): it runs on a second thread meanwhile the flow map
            // and the totals are read.
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
            let entries = self.peers.read_rest(self.sweep.peer_timeouts.iter())?;
            self.peer_evictions = self
                .peer_evictions
                .max(inserted[Stat::PeerInserts as usize].saturating_sub(entries as u64));
        }
        let stats = self.read_stats()?;
        // Between readings of the per-peer map: live entries never exceed its capacity, and
        // the kernel never deletes any, so at least inserts - capacity were evicted.
        self.peer_evictions = self
            .peer_evictions
            .max(stats[Stat::PeerInserts as usize].saturating_sub(u64::from(self.peers_capacity)));
        let flow_gone = stats[Stat::FlowDeletes as usize] + flows as u64;
        self.flow_evictions =
            self.flow_evictions.max(inserted[Stat::FlowInserts as usize].saturating_sub(flow_gone));
        let drain_seconds = started.elapsed().as_secs_f64();
        if read_peers {
            self.full_drain_seconds = drain_seconds;
        }
        Ok(Snapshot {
            counters,
            hists,
            peers: self.peers.view.clone(),
            peers_fresh: read_peers,
            timeouts: self.sweep.timeouts.clone(),
            stats,
            peer_evictions: self.peer_evictions,
            peers_capacity: self.peers_capacity,
            flows,
            flow_evictions: self.flow_evictions,
            flows_capacity: self.flows_capacity,
            drain_seconds,
            full_drain_seconds: self.full_drain_seconds,
            pressure: Default::default(),
            ifaces_up: Vec::new(),
        })
    }
}

impl Totals {
    /// The exact counters and the histograms, summed over CPUs and decoded. A key that does not
    /// decode (a kernel object of another version) is left out.
    #[expect(clippy::type_complexity, reason = "two maps keyed by what they count")]
    fn read(
        &self,
    ) -> anyhow::Result<(BTreeMap<(Scope, Counter), u64>, BTreeMap<(Scope, HistKind), Histogram>)>
    {
        let counters = read_per_cpu(&self.counters, "counters", self.nr_cpus, |v| v.sum())?;
        let counters = counters.into_iter().filter_map(|(k, v)| Some((k.decode()?, v))).collect();
        let hists = read_per_cpu(&self.hists, "histograms", self.nr_cpus, |v| {
            let mut h = Histogram::ZERO;
            for cpu in v {
                for (sum, b) in h.buckets.iter_mut().zip(cpu.buckets) {
                    *sum += b;
                }
                h.sum_ns += cpu.sum_ns;
            }
            h
        })?;
        let hists = hists.into_iter().filter_map(|(k, h)| Some((k.decode()?, h))).collect();
        Ok((counters, hists))
    }
}

impl FlowSweep {
    /// Marks pending handshakes older than the timeout as timed out and counts them, while
    /// listing the flow map once (that listing is also the number of live flows, returned). The
    /// flows stay, so that a late retransmission or answer is recognised and adds no second
    /// outcome.
    fn sweep(&mut self) -> anyhow::Result<usize> {
        let now = monotonic_ns();
        let limit = self.handshake_timeout.as_nanos() as u64;
        let mut failed = None;
        let live = batch::for_each_entry(&self.flows, "flows", |key, st| {
            let expired = st.state == state::SYN_SENT && now.saturating_sub(st.syn_ns) > limit;
            if !expired || failed.is_some() {
                return;
            }
            match mark_timed_out(&mut self.marker, key) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    failed = Some(e);
                    return;
                }
            }
            if let Some(direction) = Direction::from_repr(key.direction) {
                let scope = Scope { ifindex: key.ifindex, port: key.server_port, direction };
                *self.timeouts.entry(scope).or_default() += 1;
            }
            *self.peer_timeouts.get_or_insert_mut(timed_out_peer(key), || 0) += 1;
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(live),
        }
    }
}

impl PeerMaps {
    /// A full read, first step: every entry of the per-peer map.
    fn read_entries(&mut self) -> anyhow::Result<()> {
        self.read_started = Instant::now();
        self.reader.read_entries(&self.peers)?;
        self.entries_took = self.read_started.elapsed();
        Ok(())
    }

    /// A full read, second step: the exported peers' timeouts and greetings. Replaces the
    /// view, schedules the next read, and returns the number of per-peer entries.
    fn read_rest<'a>(
        &mut self,
        timeouts: impl IntoIterator<Item = (&'a PeerKey, &'a u64)>,
    ) -> anyhow::Result<usize> {
        let started = Instant::now();
        let view = self.reader.read_rest(&self.greetings, timeouts)?;
        self.schedule.done(self.read_started, self.entries_took + started.elapsed());
        let entries = view.entries;
        self.view = Arc::new(view);
        Ok(entries)
    }
}

/// Marks a flow timed out if it still waits for an answer (one may have arrived since it was
/// listed). `Ok(false)`: nothing to decide any more.
fn mark_timed_out(
    flows: &mut HashMap<MapData, FlowKey, FlowState>,
    key: &FlowKey,
) -> anyhow::Result<bool> {
    let mut st = match flows.get(key, 0) {
        Ok(st) if st.state == state::SYN_SENT => st,
        _ => return Ok(false),
    };
    st.state = state::TIMED_OUT;
    match flows.insert(key, st, BPF_EXIST) {
        Ok(()) => Ok(true),
        // Evicted or reset meanwhile.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e).context("marking a timed-out flow"),
    }
}

/// The per-peer entry a timed-out handshake belongs to: the peer is the client of inbound
/// connections and the server of outbound ones.
fn timed_out_peer(key: &FlowKey) -> PeerKey {
    let inbound = key.direction == Direction::Inbound as u8;
    PeerKey {
        ifindex: key.ifindex,
        addr: if inbound { key.client } else { key.server },
        port: key.server_port,
        family: key.family,
        direction: key.direction,
    }
}

/// Every watched [`Scope`]: each interface, port and direction.
fn scopes<'a>(ifindexes: &'a [u32], ports: &'a [u16]) -> impl Iterator<Item = Scope> + 'a {
    ifindexes.iter().flat_map(move |&ifindex| {
        ports.iter().flat_map(move |&port| {
            Direction::ALL.into_iter().map(move |direction| Scope { ifindex, port, direction })
        })
    })
}

const _: () = assert!(HIST_BUCKETS == 18 && FAMILY_V4 == 4);
