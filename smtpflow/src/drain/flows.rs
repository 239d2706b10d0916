//! The kernel's flow table (`FLOW_TAGS` and `FLOWS`, [`smtpflow_common::flow_table`]), read
//! as the kernel writes it: the tags of every set in place, mapped read-only (64 bytes a set,
//! 4 MiB at the default), and a set's flows, with one lookup, only where its tags say it holds
//! one. So a sweep costs a pass over the tags and a syscall a set with flows, and smtpflow's
//! memory holds the tags, not the table (Linux maps a mappable array's every page at once:
//! mapped whole, the default table's 46 MB counted in smtpflow's RSS). Tests write a flow
//! where the kernel finds it.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};
use smtpflow_common::{
    FlowKey, FlowState,
    flow_table::{
        FLOW_WAYS, FlowSet, FlowTags, candidate_sets, flow_hash, holds_flow, same_key, tag,
    },
    names,
};

use super::ring::Mapping;

/// `BPF_F_MMAPABLE`: the kernel object creates `FLOW_TAGS` with it.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The flow table of a loaded object: its tags mapped for reading, its flows read by set.
pub struct FlowTable {
    tags: Mapping,
    flows: Array<MapData, FlowSet>,
    sets: u32,
    /// The hash seed the object was loaded with ([`smtpflow_common::Config::flow_seed`]).
    seed: u64,
    /// Kept so the map lives as long as its mapping (and for the tests' writes).
    tags_map: Map,
}

impl FlowTable {
    /// `FLOW_TAGS` and `FLOWS` of the loaded object, which was loaded with `seed` as its flow
    /// hash seed.
    pub fn take(ebpf: &mut aya::Ebpf, seed: u64) -> anyhow::Result<Self> {
        let tags_map = super::take_map(ebpf, names::MAP_FLOW_TAGS)?;
        let Map::Array(data) = &tags_map else {
            anyhow::bail!("map {} is not an array (a build problem)", names::MAP_FLOW_TAGS);
        };
        let info = data.info()?;
        let (sets, value) = (info.max_entries(), info.value_size() as usize);
        anyhow::ensure!(
            value == size_of::<FlowTags>() && info.map_flags() & BPF_F_MMAPABLE != 0,
            "the flow table's tags are {value} bytes (flags {:#x}), this build's {} and \
             mappable: the kernel object and smtpflow are of different builds",
            info.map_flags(),
            size_of::<FlowTags>()
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (sets as usize * value).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        let tags = Mapping::new(fd, len, libc::PROT_READ, 0).context("mmap of FLOW_TAGS")?;
        let flows: Array<MapData, FlowSet> =
            super::take_map(ebpf, names::MAP_FLOWS)?.try_into().with_context(|| {
                format!("map {} is not an array of flow sets (a build problem)", names::MAP_FLOWS)
            })?;
        anyhow::ensure!(
            flows.len() == sets,
            "the flow table's maps differ in sets (a build problem)"
        );
        Ok(Self { tags, flows, sets, seed, tags_map })
    }

    /// The table's sets.
    pub fn sets(&self) -> u32 {
        self.sets
    }

    /// Set `i`'s tags as they are now, read in place (volatile: the kernel writes them).
    fn tags(&self, i: u32) -> [u64; FLOW_WAYS] {
        let i = i as usize;
        assert!((i + 1) * size_of::<FlowTags>() <= self.tags.len());
        // SAFETY: inside the mapping (checked above); the array's values are 8-byte aligned and
        // start its page-aligned mapping; the kernel writes each tag whole.
        unsafe {
            let at = self.tags.start().cast::<FlowTags>().add(i);
            std::ptr::read_volatile(std::ptr::addr_of!((*at).tags))
        }
    }

    /// Calls `f` with every flow in the table, read as it is while the kernel writes it, and
    /// returns how many flows it showed. A set's flows are read only where its tags hold one,
    /// and shown only where it still holds them after: a way the kernel gave to another flow
    /// meanwhile went through `BUSY`, so its tag differs, and it is left for the next listing.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowState)) -> anyhow::Result<usize> {
        let mut shown = 0;
        for i in 0..self.sets {
            let before = self.tags(i);
            if !before.iter().any(|&t| holds_flow(t)) {
                continue;
            }
            let set = self.flows.get(&i, 0).context("reading a set of the flow table (FLOWS)")?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let after = self.tags(i);
            for w in (0..FLOW_WAYS).filter(|&w| holds_flow(before[w]) && after[w] == before[w]) {
                f(&set.keys[w], &set.states[w]);
                shown += 1;
            }
        }
        Ok(shown)
    }

    /// Writes `st` as `key`'s flow, in its way or else in a free way of its candidate sets, as
    /// a test's starting state: through the maps' update calls (the mappings are read-only), the
    /// flow before its tag, with no program running. Fails when both sets are full.
    pub fn insert(&mut self, key: &FlowKey, st: &FlowState) -> anyhow::Result<()> {
        let h = flow_hash(key, self.seed);
        let sets = candidate_sets(h, self.sets);
        let mut tags: Array<&mut MapData, FlowTags> = (&mut self.tags_map).try_into()?;
        let flows = &mut self.flows;
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
