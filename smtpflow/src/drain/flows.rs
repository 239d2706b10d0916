//! The kernel's flow table (`FLOW_TAGS` and `FLOWS`, [`smtpflow_common::flow_table`]), mapped
//! read-only and read in place: the sweep lists its flows with no syscall and no copy of the
//! table, reading every set's tags (a cache line a set) and a set's flows only where its tags
//! say it holds one, so that only the pages of those flows are in smtpflow's memory; tests find
//! a flow by its key as the kernel does.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};
use smtpflow_common::{
    FlowKey, FlowState,
    flow_table::{
        FLOW_WAYS, FlowSet, FlowTags, candidate_sets, flow_hash, read_way, same_key, tag,
    },
    names,
};

use super::ring::Mapping;

/// `BPF_F_MMAPABLE`: the kernel object creates `FLOWS` with it.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The flow table of a loaded object, mapped for reading.
pub struct FlowTable {
    tags: Mapping,
    flows: Mapping,
    sets: u32,
    /// The hash seed the object was loaded with ([`smtpflow_common::Config::flow_seed`]).
    seed: u64,
    /// Kept so the maps live as long as their mappings (and for the tests' writes).
    tags_map: Map,
    flows_map: Map,
}

impl FlowTable {
    /// `FLOW_TAGS` and `FLOWS` of the loaded object, which was loaded with `seed` as its flow
    /// hash seed.
    pub fn take(ebpf: &mut aya::Ebpf, seed: u64) -> anyhow::Result<Self> {
        let (tags_map, tags, sets) = map::<FlowTags>(ebpf, names::MAP_FLOW_TAGS)?;
        let (flows_map, flows, flow_sets) = map::<FlowSet>(ebpf, names::MAP_FLOWS)?;
        anyhow::ensure!(
            sets == flow_sets,
            "the flow table's maps differ in sets (a build problem)"
        );
        Ok(Self { tags, flows, sets, seed, tags_map, flows_map })
    }

    /// The table's sets.
    pub fn sets(&self) -> u32 {
        self.sets
    }

    /// Set `i`'s tags and flows, in the mappings.
    fn set(&self, i: u32) -> (*const FlowTags, *const FlowSet) {
        let i = i as usize;
        assert!(
            (i + 1) * size_of::<FlowTags>() <= self.tags.len()
                && (i + 1) * size_of::<FlowSet>() <= self.flows.len()
        );
        // SAFETY: inside the mappings (checked above); the arrays' values are 8-byte aligned
        // and start their page-aligned mappings.
        unsafe {
            (
                self.tags.start().cast::<FlowTags>().add(i),
                self.flows.start().cast::<FlowSet>().add(i),
            )
        }
    }

    /// Calls `f` with every flow in the table, read as it is while the kernel writes it (a way
    /// that changes while read is skipped: it is a new flow, for the next listing). Returns how
    /// many flows it showed.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowState)) -> usize {
        let mut shown = 0;
        for i in 0..self.sets {
            let (tags, set) = self.set(i);
            for way in 0..FLOW_WAYS {
                // SAFETY: `tags` and `set` are in the mappings.
                if let Some((key, st)) = unsafe { read_way(tags, set, way) } {
                    f(&key, &st);
                    shown += 1;
                }
            }
        }
        shown
    }

    /// The flow of `key`, found as the kernel finds it.
    pub fn get(&self, key: &FlowKey) -> Option<FlowState> {
        let h = flow_hash(key, self.seed);
        candidate_sets(h, self.sets).into_iter().find_map(|i| {
            let (tags, set) = self.set(i);
            (0..FLOW_WAYS).find_map(|way| {
                // SAFETY: `tags` and `set` are in the mappings.
                let (k, st) = unsafe { read_way(tags, set, way) }?;
                same_key(&k, key).then_some(st)
            })
        })
    }

    /// Writes `st` as `key`'s flow, in its way or else in a free way of its candidate sets, as
    /// a test's starting state: through the maps' update calls (the mappings are read-only), the
    /// flow before its tag, with no program running. Fails when both sets are full.
    pub fn insert(&mut self, key: &FlowKey, st: &FlowState) -> anyhow::Result<()> {
        let h = flow_hash(key, self.seed);
        let sets = candidate_sets(h, self.sets);
        let mut tags: Array<&mut MapData, FlowTags> = (&mut self.tags_map).try_into()?;
        let mut flows: Array<&mut MapData, FlowSet> = (&mut self.flows_map).try_into()?;
        let mut place = None;
        for pass in [true, false] {
            for &i in &sets {
                let (t, set) = (tags.get(&i, 0)?, flows.get(&i, 0)?);
                let way = (0..FLOW_WAYS).find(|&w| match pass {
                    // Its own way first, then a free one.
                    true => t.tags[w] == tag(h) && same_key(&set.keys[w], key),
                    false => t.tags[w] == 0,
                });
                if place.is_none()
                    && let Some(w) = way
                {
                    place = Some((i, t, set, w));
                }
            }
        }
        let (i, mut t, mut set, way) = place.context("both of the flow's sets are full")?;
        set.keys[way] = *key;
        set.states[way] = *st;
        flows.set(i, set, 0)?;
        t.tags[way] = tag(h);
        tags.set(i, t, 0)?;
        Ok(())
    }
}

/// The array map `name` of the loaded object, of `T`s, mapped read-only: the map, the mapping
/// and its entries.
fn map<T>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<(Map, Mapping, u32)> {
    let map = super::take_map(ebpf, name)?;
    let Map::Array(data) = &map else {
        anyhow::bail!("map {name} is not an array (a build problem)");
    };
    let info = data.info()?;
    let (entries, value) = (info.max_entries(), info.value_size() as usize);
    anyhow::ensure!(
        value == size_of::<T>() && info.map_flags() & BPF_F_MMAPABLE != 0,
        "{name}'s entries are {value} bytes (flags {:#x}), this build's {} and mappable: the \
         kernel object and smtpflow are of different builds",
        info.map_flags(),
        size_of::<T>()
    );
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let len = (entries as usize * value).div_ceil(page) * page;
    let fd = data.fd().as_fd().as_raw_fd();
    let mapping =
        Mapping::new(fd, len, libc::PROT_READ, 0).with_context(|| format!("mmap of {name}"))?;
    Ok((map, mapping, entries))
}
