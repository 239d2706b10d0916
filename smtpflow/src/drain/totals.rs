//! The exact counters and the duration histograms, read back as the kernel keeps them: the
//! seeded counters of every watched scope in the `SCOPE_COUNTS` array and the histograms in the
//! `HISTS` array, both in runs at [`Config::scope_index`], and the sparse counters (reply
//! codes, statuses, drop reasons) in the `COUNTERS` hash map. One reader for the drain and the
//! kernel's differential fuzz, so both see the layout the kernel writes.
use std::{collections::BTreeMap, os::fd::AsFd as _};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use smtpflow_common::{
    Config, Counter, CounterKey, HistKind, Histogram, SCOPE_SLOTS, Scope, names,
};

use super::batch;

/// Handles on the counter and histogram maps, and the scopes their arrays hold.
pub struct Totals {
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    by_scope: PerCpuArray<MapData, u64>,
    hists: PerCpuArray<MapData, Histogram>,
    /// Every watched scope with its [`Config::scope_index`].
    scopes: Vec<(u32, Scope)>,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    nr_cpus: usize,
}

/// What [`Totals::read`] returns: the exact counters and the histograms, summed over CPUs.
pub type Read = (BTreeMap<(Scope, Counter), u64>, BTreeMap<(Scope, HistKind), Histogram>);

impl Totals {
    /// Takes the maps from a loaded object whose configuration is `config`.
    pub fn take(ebpf: &mut Ebpf, config: &Config) -> anyhow::Result<Self> {
        let mut take = |name: &str| super::take_map(ebpf, name);
        Ok(Self {
            counters: take(names::MAP_COUNTERS)?.try_into()?,
            by_scope: take(names::MAP_SCOPE_COUNTS)?.try_into()?,
            hists: take(names::MAP_HISTS)?.try_into()?,
            scopes: config.scopes().collect(),
            nr_cpus: aya::util::nr_cpus().map_err(|(_, e)| e).context("reading the CPU count")?,
        })
    }

    /// The exact counters and the histograms, decoded: every seeded counter and histogram of
    /// every watched scope (zeros included, so each series exists from the start) and every
    /// sparse counter the kernel created. A hash key that does not decode (a kernel object of
    /// another version) is left out.
    pub fn read(&self) -> anyhow::Result<Read> {
        let mut counters = BTreeMap::new();
        for (key, n) in self.read_keys()? {
            if let Some(decoded) = key.decode() {
                *counters.entry(decoded).or_default() += n;
            }
        }
        let hists_by_index =
            read_array(&self.hists, "histograms", self.nr_cpus, Histogram::ZERO, |v| {
                let mut h = Histogram::ZERO;
                for cpu in v {
                    for (sum, b) in h.buckets.iter_mut().zip(cpu.buckets) {
                        *sum += b;
                    }
                    h.sum_ns += cpu.sum_ns;
                }
                h
            })?;
        let mut hists = BTreeMap::new();
        for &(at, scope) in &self.scopes {
            for kind in HistKind::ALL {
                let i = at as usize * HistKind::COUNT + kind as usize;
                hists.insert(
                    (scope, kind),
                    hists_by_index.get(i).copied().unwrap_or(Histogram::ZERO),
                );
            }
        }
        Ok((counters, hists))
    }

    /// The exact counters by map key, summed over CPUs: the seeded counters of every watched
    /// scope (zeros included) added to the hash map's keys.
    pub fn read_keys(&self) -> anyhow::Result<BTreeMap<CounterKey, u64>> {
        let mut out = read_hash(&self.counters, "counters", self.nr_cpus)?;
        let by_index =
            read_array(&self.by_scope, "per-scope counters", self.nr_cpus, 0, |v| v.sum())?;
        for &(at, scope) in &self.scopes {
            for counter in Counter::seeded() {
                let Some(slot) = counter.scope_slot() else { continue };
                let n = by_index.get(at as usize * SCOPE_SLOTS + slot).copied().unwrap_or(0);
                *out.entry(CounterKey::new(scope, counter)).or_default() += n;
            }
        }
        Ok(out)
    }
}

/// Sums each key's per-CPU values of the counters hash map: batched (a few syscalls for the
/// whole map), else key by key, skipping keys deleted while we iterate.
fn read_hash(
    map: &PerCpuHashMap<MapData, CounterKey, u64>,
    what: &str,
    nr_cpus: usize,
) -> anyhow::Result<BTreeMap<CounterKey, u64>> {
    let mut out = BTreeMap::new();
    let batched = batch::for_each_per_cpu::<CounterKey, u64>(
        map.map().fd().as_fd(),
        nr_cpus,
        batch::DEFAULT_CHUNK,
        |k, values| {
            out.insert(*k, values.sum());
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
                out.insert(key, values.iter().sum());
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
        }
    }
    Ok(out)
}

/// Every entry of a per-CPU array, its CPUs' values folded into one, by index: batched, else
/// index by index.
fn read_array<V: aya::Pod>(
    map: &PerCpuArray<MapData, V>,
    what: &str,
    nr_cpus: usize,
    zero: V,
    mut fold: impl FnMut(&mut dyn Iterator<Item = V>) -> V,
) -> anyhow::Result<Vec<V>> {
    let len = map.len() as usize;
    let mut out = vec![zero; len];
    let batched = batch::for_each_per_cpu::<u32, V>(
        map.map().fd().as_fd(),
        nr_cpus,
        batch::DEFAULT_CHUNK,
        |&i, values| {
            if let Some(slot) = out.get_mut(i as usize) {
                *slot = fold(values);
            }
        },
    );
    match batched {
        Ok(_) => return Ok(out),
        Err(e) if batch::batch_unsupported(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("reading the {what} map")),
    }
    for (i, slot) in out.iter_mut().enumerate() {
        let values = map.get(&(i as u32), 0).with_context(|| format!("reading the {what} map"))?;
        *slot = fold(&mut values.iter().copied());
    }
    Ok(out)
}
