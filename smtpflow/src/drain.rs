//! Reading the kernel maps into a [`Snapshot`]: exact counters and histograms summed over CPUs,
//! the per-peer LRU entries, and the programs' own bookkeeping; and sweeping the flow map for
//! handshakes that timed out (the one outcome decided here, since it is the absence of a packet).
use std::{
    collections::BTreeMap,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{
        HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
};
use std::os::fd::AsFd as _;

use crate::batch;
use lru::LruCache;
use smtpflow_common::{
    CounterKey, Direction, Event, FAMILY_V4, FlowKey, FlowState, HIST_BUCKETS, HistKey, HistKind,
    Histogram, Metric, Outcome, PeerCounters, PeerGreetingKey, PeerKey, Phase, Side, Stat,
    flow::state, names,
};

/// `bpf_map_update_elem` flags: create only; update only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Owned handles on the kernel maps, and what userspace itself counts.
pub struct Maps {
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    hists: PerCpuHashMap<MapData, HistKey, Histogram>,
    peers: HashMap<MapData, PeerKey, PeerCounters>,
    peer_greetings: HashMap<MapData, PeerGreetingKey, u64>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    stats: PerCpuArray<MapData, u64>,
    pub peers_capacity: u32,
    pub flows_capacity: u32,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    nr_cpus: usize,
    handshake_timeout: Duration,
    /// Timed-out handshakes by (ifindex, port, direction).
    timeouts: BTreeMap<(u32, u16, u8), u64>,
    /// Timed-out handshakes per peer, bounded like the kernel's per-peer map.
    peer_timeouts: LruCache<PeerKey, u64>,
    /// Highest eviction counts reported so far (the estimates only ever grow).
    peer_evictions: u64,
    flow_evictions: u64,
}

/// One reading of the kernel maps.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Exact counters, summed over CPUs.
    pub counters: BTreeMap<CounterKey, u64>,
    /// Duration histograms, summed over CPUs.
    pub hists: BTreeMap<HistKey, Histogram>,
    /// Every per-peer entry alive in the LRU map.
    pub peers: Vec<(PeerKey, PeerCounters)>,
    pub peer_greetings: Vec<(PeerGreetingKey, u64)>,
    /// Timed-out handshakes by (ifindex, port, direction), and per peer.
    pub timeouts: BTreeMap<(u32, u16, u8), u64>,
    pub peer_timeouts: Vec<(PeerKey, u64)>,
    /// [`Stat`] counters summed over CPUs.
    pub stats: [u64; Stat::COUNT],
    pub peer_evictions: u64,
    pub peers_capacity: u32,
    pub flows: usize,
    pub flow_evictions: u64,
    pub flows_capacity: u32,
    pub drain_seconds: f64,
    /// The kernel's pressure signals, read beside the maps.
    pub pressure: crate::pressure::Pressure,
    /// Whether each watched interface is still there.
    pub ifaces_up: Vec<(String, bool)>,
}

impl Snapshot {
    /// Event totals by key (the `Metric::Event` counters).
    pub fn events(&self) -> impl Iterator<Item = (&CounterKey, u64)> {
        self.counters.iter().filter(|(k, _)| k.metric == Metric::Event as u8).map(|(k, v)| (k, *v))
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

/// Whether a batch lookup failed because the kernel or map type has none (then the maps are
/// read key by key, as before Linux 5.6).
fn batch_unsupported(e: &std::io::Error) -> bool {
    /// The kernel's internal ENOTSUPP, which BPF syscalls can return.
    const ENOTSUPP: i32 = 524;
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
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
        Err(e) if batch_unsupported(&e) => out.clear(),
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

/// Every entry: batched, else key by key, skipping keys evicted while we iterate.
fn read_all<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    what: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    match batch::for_each::<K, V>(map.map().fd().as_fd(), batch::DEFAULT_CHUNK, |k, v| {
        out.push((*k, *v));
    }) {
        Ok(_) => return Ok(out),
        Err(e) if batch_unsupported(&e) => out.clear(),
        Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
    }
    for item in map.iter() {
        match item {
            Ok(entry) => out.push(entry),
            // Evicted between listing its key and reading it.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
        }
    }
    Ok(out)
}

impl Maps {
    pub fn take(
        ebpf: &mut Ebpf,
        peers_capacity: u32,
        flows_capacity: u32,
        handshake_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            counters: take(ebpf, names::MAP_COUNTERS)?,
            hists: take(ebpf, names::MAP_HISTS)?,
            peers: take(ebpf, names::MAP_PEERS)?,
            peer_greetings: take(ebpf, names::MAP_PEER_GREETINGS)?,
            flows: take(ebpf, names::MAP_FLOWS)?,
            stats: take(ebpf, names::MAP_STATS)?,
            peers_capacity,
            flows_capacity,
            nr_cpus: aya::util::nr_cpus().map_err(|(_, e)| e).context("reading the CPU count")?,
            handshake_timeout,
            timeouts: BTreeMap::new(),
            peer_timeouts: LruCache::new(
                NonZeroUsize::new(peers_capacity as usize).unwrap_or(NonZeroUsize::MIN),
            ),
            peer_evictions: 0,
            flow_evictions: 0,
        })
    }

    /// Creates every fixed counter and histogram of the watched interfaces and ports at zero, so
    /// the kernel only ever looks them up and every series exists from the first scrape.
    pub fn seed(&mut self, ifindexes: &[u32], ports: &[u16]) -> anyhow::Result<()> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("reading the CPU count")?;
        for key in fixed_counter_keys(ifindexes, ports) {
            let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus]).context("per-CPU zeros")?;
            match self.counters.insert(key, zeros, BPF_NOEXIST) {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(e).context("seeding the counters map"),
            }
        }
        for &ifindex in ifindexes {
            for &port in ports {
                for direction in Direction::ALL {
                    for kind in [HistKind::Handshake, HistKind::Greeting] {
                        let key =
                            HistKey { ifindex, port, direction: direction as u8, kind: kind as u8 };
                        let zeros = PerCpuValues::try_from(vec![Histogram::ZERO; nr_cpus])
                            .context("per-CPU zeros")?;
                        match self.hists.insert(key, zeros, BPF_NOEXIST) {
                            Ok(()) => {}
                            Err(e) if is_exists(&e) => {}
                            Err(e) => return Err(e).context("seeding the histograms map"),
                        }
                    }
                }
            }
        }
        for &ifindex in ifindexes {
            for &port in ports {
                for direction in Direction::ALL {
                    self.timeouts.entry((ifindex, port, direction as u8)).or_default();
                }
            }
        }
        Ok(())
    }

    /// Marks pending handshakes older than the timeout as timed out and counts them. The flows
    /// stay, so that a late retransmission or answer is recognised and adds no second outcome.
    fn sweep_timeouts(&mut self) -> anyhow::Result<usize> {
        let now = monotonic_ns();
        let limit = self.handshake_timeout.as_nanos() as u64;
        let flows = read_all(&self.flows, "flows")?;
        let live = flows.len();
        let expired: Vec<FlowKey> = flows
            .into_iter()
            .filter(|(_, st)| st.state == state::SYN_SENT && now.saturating_sub(st.syn_ns) > limit)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            // Look again right before marking: an answer may have arrived meanwhile.
            let mut st = match self.flows.get(&key, 0) {
                Ok(st) if st.state == state::SYN_SENT => st,
                _ => continue,
            };
            st.state = state::TIMED_OUT;
            match self.flows.insert(key, st, BPF_EXIST) {
                Ok(()) => {}
                // Evicted or reset meanwhile: nothing to decide any more.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("marking a timed-out flow"),
            }
            *self.timeouts.entry((key.ifindex, key.server_port, key.direction)).or_default() += 1;
            let inbound = key.direction == Direction::Inbound as u8;
            let peer = PeerKey {
                ifindex: key.ifindex,
                addr: if inbound { key.client } else { key.server },
                port: key.server_port,
                family: key.family,
                direction: key.direction,
            };
            *self.peer_timeouts.get_or_insert_mut(peer, || 0) += 1;
        }
        Ok(live)
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

    pub fn drain(&mut self) -> anyhow::Result<Snapshot> {
        let started = Instant::now();
        // Evictions are estimated as inserts - live entries - deletions. Inserts are read before
        // the maps are listed and deletions after, so the estimate can only be too low at one
        // moment (never too high), and keeping the largest one seen is exact over time.
        let inserted = self.read_stats()?;
        // The sweep lists the flows once; that listing is also their count.
        let flows = self.sweep_timeouts()?;
        let nr_cpus = self.nr_cpus;
        let counters = read_per_cpu(&self.counters, "counters", nr_cpus, |v| v.sum())?;
        let hists = read_per_cpu(&self.hists, "histograms", nr_cpus, |v| {
            let mut h = Histogram::ZERO;
            for cpu in v {
                for (sum, b) in h.buckets.iter_mut().zip(cpu.buckets) {
                    *sum += b;
                }
                h.sum_ns += cpu.sum_ns;
            }
            h
        })?;
        let peers = read_all(&self.peers, "per-peer")?;
        let peer_greetings = read_all(&self.peer_greetings, "per-peer greetings")?;
        let stats = self.read_stats()?;
        self.peer_evictions = self
            .peer_evictions
            .max(inserted[Stat::PeerInserts as usize].saturating_sub(peers.len() as u64));
        let flow_gone = stats[Stat::FlowDeletes as usize] + flows as u64;
        self.flow_evictions =
            self.flow_evictions.max(inserted[Stat::FlowInserts as usize].saturating_sub(flow_gone));
        Ok(Snapshot {
            counters,
            hists,
            peers,
            peer_greetings,
            timeouts: self.timeouts.clone(),
            peer_timeouts: self.peer_timeouts.iter().map(|(k, v)| (*k, *v)).collect(),
            stats,
            peer_evictions: self.peer_evictions,
            peers_capacity: self.peers_capacity,
            flows,
            flow_evictions: self.flow_evictions,
            flows_capacity: self.flows_capacity,
            drain_seconds: started.elapsed().as_secs_f64(),
            pressure: Default::default(),
            ifaces_up: Vec::new(),
        })
    }
}

/// Every counter of a watched interface and port that should exist (as zero) from the start.
pub fn fixed_counter_keys(ifindexes: &[u32], ports: &[u16]) -> Vec<CounterKey> {
    let mut keys = Vec::new();
    for &ifindex in ifindexes {
        for &port in ports {
            for direction in Direction::ALL {
                for event in Event::ALL {
                    for side in Side::ALL {
                        keys.push(CounterKey::event(ifindex, port, event, direction, side));
                    }
                }
                for outcome in [Outcome::Established, Outcome::Refused] {
                    let mut k = CounterKey::new(ifindex, port, Metric::Handshake, direction);
                    k.a = outcome as u8;
                    keys.push(k);
                }
                keys.push(CounterKey::new(ifindex, port, Metric::SynRetransmit, direction));
                for phase in Phase::ALL {
                    for side in Side::ALL {
                        let mut k = CounterKey::new(ifindex, port, Metric::Reset, direction);
                        k.a = phase as u8;
                        k.b = side as u8;
                        keys.push(k);
                    }
                }
            }
        }
    }
    keys
}

const _: () = assert!(HIST_BUCKETS == 18 && FAMILY_V4 == 4);
