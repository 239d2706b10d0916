//! Reading the kernel maps into a [`Snapshot`]: exact totals summed over CPUs, the per-peer LRU
//! entries, and the program's own bookkeeping.
use std::{collections::BTreeMap, time::Instant};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use smtpflow_common::{
    Direction, Event, PeerCounters, PeerKey, Side, Stat, TOTALS_CAPACITY, TotalKey, names,
};

/// `bpf_map_update_elem` flag: create only.
const BPF_NOEXIST: u64 = 1;

/// Owned handles on the kernel maps.
pub struct Maps {
    totals: PerCpuHashMap<MapData, TotalKey, u64>,
    peers: HashMap<MapData, PeerKey, PeerCounters>,
    stats: PerCpuArray<MapData, u64>,
    pub peers_capacity: u32,
    /// Highest eviction count reported so far (the estimate only ever grows).
    evictions: u64,
}

/// One reading of the kernel maps.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Exact event totals, summed over CPUs.
    pub totals: BTreeMap<TotalKey, u64>,
    /// Every per-peer entry alive in the LRU map.
    pub peers: Vec<(PeerKey, PeerCounters)>,
    /// [`Stat`] counters summed over CPUs.
    pub stats: [u64; Stat::COUNT],
    /// Per-peer entries evicted by the LRU so far.
    pub peer_evictions: u64,
    pub peers_capacity: u32,
    pub drain_seconds: f64,
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

impl Maps {
    pub fn take(ebpf: &mut Ebpf, peers_capacity: u32) -> anyhow::Result<Self> {
        Ok(Self {
            totals: take(ebpf, names::MAP_TOTALS)?,
            peers: take(ebpf, names::MAP_PEERS)?,
            stats: take(ebpf, names::MAP_STATS)?,
            peers_capacity,
            evictions: 0,
        })
    }

    /// Creates every totals key of the watched interfaces and ports at zero, so the kernel only
    /// ever looks keys up and every series exists from the first scrape.
    pub fn seed_totals(&mut self, ifindexes: &[u32], ports: &[u16]) -> anyhow::Result<()> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("reading the CPU count")?;
        for key in all_total_keys(ifindexes, ports) {
            let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus]).context("per-CPU zeros")?;
            self.totals
                .insert(key, zeros, BPF_NOEXIST)
                .or_else(|e| match e {
                    MapError::SyscallError(ref s)
                        if s.io_error.raw_os_error() == Some(libc::EEXIST) =>
                    {
                        Ok(())
                    }
                    e => Err(e),
                })
                .context("seeding the totals map")?;
        }
        Ok(())
    }

    pub fn drain(&mut self) -> anyhow::Result<Snapshot> {
        let started = Instant::now();
        let mut totals = BTreeMap::new();
        for item in self.totals.iter() {
            match item {
                Ok((key, values)) => {
                    totals.insert(key, values.iter().sum::<u64>());
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading the totals map"),
            }
        }
        let mut peers = Vec::with_capacity(self.peers_capacity.min(1 << 20) as usize);
        for item in self.peers.iter() {
            match item {
                Ok(entry) => peers.push(entry),
                // Evicted between listing its key and reading it.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading the per-peer map"),
            }
        }
        let mut stats = [0u64; Stat::COUNT];
        for (i, slot) in stats.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(i as u32), 0)
                .context("reading the stats map")?;
            *slot = values.iter().sum();
        }
        let inserts = stats[Stat::PeerInserts as usize];
        self.evictions = self
            .evictions
            .max(inserts.saturating_sub(peers.len() as u64));
        Ok(Snapshot {
            totals,
            peers,
            stats,
            peer_evictions: self.evictions,
            peers_capacity: self.peers_capacity,
            drain_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Every (event, direction, side) of every interface and port.
pub fn all_total_keys(ifindexes: &[u32], ports: &[u16]) -> Vec<TotalKey> {
    let mut keys = Vec::new();
    for &ifindex in ifindexes {
        for &port in ports {
            for direction in Direction::ALL {
                for event in Event::ALL {
                    for side in Side::ALL {
                        keys.push(TotalKey::new(ifindex, port, event, direction, side));
                    }
                }
            }
        }
    }
    debug_assert!(keys.len() <= TOTALS_CAPACITY as usize);
    keys
}
