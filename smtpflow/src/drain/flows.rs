//! The kernel's flow table (`FLOW_TAGS` and `FLOWS`, [`smtpflow_common::flow_table`]), read
//! as the kernel writes it: the tags of every set in place, mapped read-only (64 bytes a set,
//! 4 MiB at the default), and the flows only of the sets whose tags say they hold one, read a
//! run of sets at a time (`BPF_MAP_LOOKUP_BATCH`: one syscall for up to [`READ_SETS`] sets,
//! where a lookup a set made a sweep of a full table 65,536 syscalls). So a sweep costs a pass
//! over the tags and a syscall for each run of sets with flows, and smtpflow's memory holds the
//! tags and one run, not the table (Linux maps a mappable array's every page at once: mapped
//! whole, the default table's 46 MB counted in smtpflow's RSS). Tests write a flow where the
//! kernel finds it.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::maps::{Array, IterableMap as _, Map, MapData};
use smtpflow_common::{
    FlowKey, FlowState,
    flow_table::{
        FLOW_WAYS, FlowSet, FlowTags, candidate_sets, flow_hash, holds_flow, same_key, tag,
    },
    names,
};

use super::{batch, ring::Mapping};

/// Sets read with one syscall at most: the sets from the first to the last with flows among
/// this many (40 KiB of flows; one bit a set in a word says which hold flows). Reading a set between them that holds none costs a copy, far
/// less than a syscall.
const READ_SETS: u32 = u64::BITS;

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
    /// The last run of sets read, as the kernel lays them out, and their indices.
    run: Vec<u8>,
    run_keys: Vec<u32>,
    /// Whether this kernel reads an array in batches (Linux 5.6+); else a set a lookup.
    batched: bool,
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
        Ok(Self {
            tags,
            flows,
            sets,
            seed,
            tags_map,
            run: vec![0; READ_SETS as usize * size_of::<FlowSet>()],
            run_keys: vec![0; READ_SETS as usize],
            batched: true,
        })
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

    /// Whether the sets are read in batches (else a lookup a set: a kernel before 5.6).
    pub fn batched(&self) -> bool {
        self.batched
    }

    /// Calls `f` with every flow in the table and its way (set × [`FLOW_WAYS`] + way: a flow
    /// keeps its way while it lives), read as it is while the kernel writes it, and returns
    /// how many flows it showed. A set's flows are read only where its tags hold one,
    /// and shown only where it still holds them after: a way the kernel gave to another flow
    /// meanwhile went through `BUSY`, so its tag differs, and it is left for the next listing.
    pub fn for_each(
        &mut self,
        mut f: impl FnMut(usize, &FlowKey, &FlowState),
    ) -> anyhow::Result<usize> {
        let mut shown = 0;
        let mut before = [[0u64; FLOW_WAYS]; READ_SETS as usize];
        for start in (0..self.sets).step_by(READ_SETS as usize) {
            let end = (start + READ_SETS).min(self.sets);
            // Bit k: set start + k holds a flow.
            let mut holding = 0u64;
            for (k, i) in (start..end).enumerate() {
                before[k] = self.tags(i);
                if before[k].iter().any(|&t| holds_flow(t)) {
                    holding |= 1 << k;
                }
            }
            if holding == 0 {
                continue;
            }
            let first = start + holding.trailing_zeros();
            let last = start + (u64::BITS - 1 - holding.leading_zeros());
            self.read_run(first, (last - first + 1) as usize)?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            for i in (first..=last).filter(|i| holding & 1 << (i - start) != 0) {
                let was = &before[(i - start) as usize];
                let after = self.tags(i);
                let set = self.run_set((i - first) as usize);
                for w in (0..FLOW_WAYS).filter(|&w| holds_flow(was[w]) && after[w] == was[w]) {
                    f(i as usize * FLOW_WAYS + w, &set.keys[w], &set.states[w]);
                    shown += 1;
                }
            }
        }
        Ok(shown)
    }

    /// Reads sets `first..first + n` (`n` ≤ [`READ_SETS`]) into the run: one batch, or where
    /// the kernel has none, a lookup each.
    fn read_run(&mut self, first: u32, n: usize) -> anyhow::Result<()> {
        let set_size = size_of::<FlowSet>();
        if self.batched {
            let fd = self.flows.map().fd().as_fd();
            let read = batch::read_array_range(
                fd,
                first,
                set_size,
                &mut self.run_keys[..n],
                &mut self.run[..n * set_size],
            );
            match read {
                Ok(read) if read == n => return Ok(()),
                Ok(read) => anyhow::bail!(
                    "the flow table (FLOWS) gave {read} of sets {first}..{}: it has {}",
                    first as usize + n,
                    self.sets
                ),
                Err(e) if batch::batch_unsupported(&e) => self.batched = false,
                Err(e) => return Err(e).context("reading sets of the flow table (FLOWS)"),
            }
        }
        for k in 0..n {
            let set = self
                .flows
                .get(&(first + k as u32), 0)
                .context("reading a set of the flow table (FLOWS)")?;
            // SAFETY: `run` holds READ_SETS sets and k < n ≤ READ_SETS; FlowSet is plain data.
            unsafe {
                std::ptr::write_unaligned(self.run.as_mut_ptr().cast::<FlowSet>().add(k), set);
            }
        }
        Ok(())
    }

    /// Set `k` of the last run read.
    fn run_set(&self, k: usize) -> FlowSet {
        assert!((k + 1) * size_of::<FlowSet>() <= self.run.len());
        // SAFETY: inside the run (checked above), written whole by the kernel or `read_run`;
        // FlowSet is plain data (any bytes are a value).
        unsafe { std::ptr::read_unaligned(self.run.as_ptr().cast::<FlowSet>().add(k)) }
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
