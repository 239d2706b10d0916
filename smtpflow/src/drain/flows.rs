//! The kernel's flow table (`FLOW_TAGS` and `FLOWS`, [`smtpflow_common::flow_table`]), read
//! in place as the kernel writes it, through windows: the tags of [`TAGS_WINDOW`] sets mapped
//! read-only (64 bytes a set), then, within them, the flows of up to [`FLOWS_WINDOW`] sets from
//! the first set whose tags hold a flow to the last (640 bytes a set), and each way's key and
//! state read only where its tag holds a flow. Both maps are mappable arrays, and a window is
//! unmapped before the next is mapped: Linux maps every page of a mapping at once, so the whole
//! table mapped (4 MiB of tags and 40 MiB of flows at the default) would count in smtpflow's
//! RSS, where the windows add at most 576 KiB, and only while they are read. No flow is copied
//! (reading them with `BPF_MAP_LOOKUP_BATCH` copied every set of a run of sets): a sweep costs
//! a map and an unmap a window, 32 syscalls for the default table's tags and up to 256 more for
//! its flows. Tests write a flow where the kernel finds it.
use std::{
    mem::offset_of,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{Ordering, fence},
};

use anyhow::Context as _;
use aya::maps::{Array, IterableMap as _, Map, MapData};
use smtpflow_common::{
    FlowKey, FlowState,
    flow_table::{
        FLOW_WAYS, FlowSet, FlowTags, candidate_sets, flow_hash, holds_flow, same_key, tag,
    },
    names,
};

use super::ring::Mapping;

/// Sets whose tags are mapped at a time: 256 KiB, 64 pages of 4 KiB.
pub const TAGS_WINDOW: u32 = 4096;

/// Sets whose flows are mapped at a time at most, within a window of tags: 320 KiB, 80 pages.
/// With the tags', 576 KiB mapped at most, and only while they are read.
pub const FLOWS_WINDOW: u32 = 512;

/// Where a set's keys and states start in it.
const KEYS: usize = offset_of!(FlowSet, keys);
const STATES: usize = offset_of!(FlowSet, states);

/// `BPF_F_MMAPABLE`: the kernel object creates `FLOW_TAGS` and `FLOWS` with it.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The flow table of a loaded object, read through windows of its maps.
pub struct FlowTable {
    tags: Map,
    /// `tags`' descriptor, which lives as long as it.
    tags_fd: i32,
    flows: Array<MapData, FlowSet>,
    sets: u32,
    /// The hash seed the object was loaded with ([`smtpflow_common::Config::flow_seed`]).
    seed: u64,
    page: usize,
    /// A window's tags as the listing first read them.
    before: Vec<[u64; FLOW_WAYS]>,
}

/// Bytes `from..to` of a mappable array's values, mapped read-only (rounded out to whole
/// pages), and unmapped on drop.
struct Window {
    map: Mapping,
    /// The byte of the values the mapping starts at.
    base: usize,
}

impl Window {
    fn new(fd: i32, from: usize, to: usize, page: usize) -> std::io::Result<Self> {
        let base = from / page * page;
        let len = to.div_ceil(page) * page - base;
        Ok(Self { map: Mapping::new(fd, len, libc::PROT_READ, base)?, base })
    }

    /// The `T` at byte `at` of the values (inside the window), read whole and volatile: the
    /// kernel may write it meanwhile.
    fn read<T: Copy>(&self, at: usize) -> T {
        let off = at.checked_sub(self.base).expect("a byte before the window");
        assert!(off + size_of::<T>() <= self.map.len(), "a byte past the window");
        // SAFETY: inside the mapping (checked above). The values are plain data (any bytes are
        // a value), laid out from a page-aligned start at their size's stride, so a field
        // read at its offset in a value is aligned.
        unsafe { std::ptr::read_volatile(self.map.start().add(off).cast::<T>()) }
    }
}

impl FlowTable {
    /// `FLOW_TAGS` and `FLOWS` of the loaded object, which was loaded with `seed` as its flow
    /// hash seed.
    pub fn take(ebpf: &mut aya::Ebpf, seed: u64) -> anyhow::Result<Self> {
        let tags = super::take_map(ebpf, names::MAP_FLOW_TAGS)?;
        let Map::Array(data) = &tags else {
            anyhow::bail!("map {} is not an array (a build problem)", names::MAP_FLOW_TAGS);
        };
        let tags_info = data.info()?;
        let tags_fd = data.fd().as_fd().as_raw_fd();
        let flows: Array<MapData, FlowSet> =
            super::take_map(ebpf, names::MAP_FLOWS)?.try_into().with_context(|| {
                format!("map {} is not an array of flow sets (a build problem)", names::MAP_FLOWS)
            })?;
        let flows_info = flows.map().info()?;
        for (info, size) in
            [(&tags_info, size_of::<FlowTags>()), (&flows_info, size_of::<FlowSet>())]
        {
            let value = info.value_size() as usize;
            anyhow::ensure!(
                value == size && info.map_flags() & BPF_F_MMAPABLE != 0,
                "a flow table map's values are {value} bytes (flags {:#x}), this build's {size} \
                 and mappable: the kernel object and smtpflow are of different builds",
                info.map_flags(),
            );
        }
        let sets = tags_info.max_entries();
        anyhow::ensure!(
            flows_info.max_entries() == sets,
            "the flow table's maps differ in sets (a build problem)"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        Ok(Self {
            tags,
            tags_fd,
            flows,
            sets,
            seed,
            page,
            before: vec![[0; FLOW_WAYS]; TAGS_WINDOW as usize],
        })
    }

    /// The table's sets.
    pub fn sets(&self) -> u32 {
        self.sets
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
        let tags_fd = self.tags_fd;
        let flows_fd = self.flows.map().fd().as_fd().as_raw_fd();
        let (tags_size, set_size) = (size_of::<FlowTags>(), size_of::<FlowSet>());
        let mut shown = 0;
        for start in (0..self.sets).step_by(TAGS_WINDOW as usize) {
            let end = (start + TAGS_WINDOW).min(self.sets);
            let tags = Window::new(
                tags_fd,
                start as usize * tags_size,
                end as usize * tags_size,
                self.page,
            )
            .with_context(|| {
                format!("mapping the tags of sets {start}..{end} of the flow table")
            })?;
            let tags_of = |i: u32| tags.read::<[u64; FLOW_WAYS]>(i as usize * tags_size);
            for i in start..end {
                self.before[(i - start) as usize] = tags_of(i);
            }
            let before = &self.before;
            let was = |i: u32| &before[(i - start) as usize];
            let holds = |i: &u32| was(*i).iter().any(|&t| holds_flow(t));
            for part in (start..end).step_by(FLOWS_WINDOW as usize) {
                let mut holding = (part..(part + FLOWS_WINDOW).min(end)).filter(holds);
                let Some(first) = holding.next() else { continue };
                let last = holding.next_back().unwrap_or(first);
                let flows = Window::new(
                    flows_fd,
                    first as usize * set_size,
                    (last as usize + 1) * set_size,
                    self.page,
                )
                .with_context(|| format!("mapping sets {first}..={last} of the flow table"))?;
                for i in (first..=last).filter(holds) {
                    let was = was(i);
                    let set = i as usize * set_size;
                    // The flows after their tags were read, the tags again after the flows.
                    fence(Ordering::Acquire);
                    let read: [_; FLOW_WAYS] = std::array::from_fn(|w| {
                        holds_flow(was[w]).then(|| {
                            let key: FlowKey = flows.read(set + KEYS + w * size_of::<FlowKey>());
                            let st: FlowState =
                                flows.read(set + STATES + w * size_of::<FlowState>());
                            (key, st)
                        })
                    });
                    fence(Ordering::Acquire);
                    let after = tags_of(i);
                    for (w, flow) in read.iter().enumerate() {
                        if let Some((key, st)) = flow
                            && after[w] == was[w]
                        {
                            f(i as usize * FLOW_WAYS + w, key, st);
                            shown += 1;
                        }
                    }
                }
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
        let mut tags: Array<&mut MapData, FlowTags> = (&mut self.tags).try_into()?;
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
