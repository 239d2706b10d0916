//! Every map and global the programs share with the loader, and the small typed updates the
//! programs make to them: exact per-CPU counters and duration histograms, bounded LRU maps of
//! per-peer counters and of flows, and the programs' own bookkeeping.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use aya_log_ebpf::debug;
use smtpflow_common::{
    COUNTERS_CAPACITY, Config, Counter, CounterKey, DEFAULT_MAX_FLOWS, DEFAULT_MAX_PEERS,
    Direction, DropConfig, HISTS_DEFAULT, HistKind, Histogram, PeerCounters, PeerGreetingKey,
    PeerKey, PeerRecord, SCOPE_COUNTS_DEFAULT, SCOPE_SLOTS, SCOPES_DEFAULT, Stat,
    flow_table::{FlowSet, FlowTags, sets_for},
    names::KERNEL_LOG_TARGET,
    payload::PAYLOAD_RING_BYTES,
    peer::{BUMP_NONE, PEER_EVENT_SLOTS, PEER_OUTCOME_SLOTS, PEER_RESET_SLOTS, peer_counts},
};

use crate::packet::opaque;

const EEXIST: i32 = 17;

/// Set by the loader before load (`--ports`); read-only for the program.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

/// Set by the loader before load; `enabled` stays 0 when BTF lacks what the drop programs need.
#[unsafe(no_mangle)]
static DROP_CONFIG: DropConfig = DropConfig::DISABLED;

/// The seeded exact counters ([`Counter::seeded`]) of every watched scope, in runs of
/// [`SCOPE_SLOTS`] at [`Config::scope_index`]: an array, so the hot path costs a bounds check
/// (the verifier inlines the lookup), no hash. Sized by the loader.
#[map(name = "SCOPE_COUNTS")]
static SCOPE_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SCOPE_COUNTS_DEFAULT, 0);

/// The sparse exact counters: reply codes, statuses and drop reasons, created as they appear;
/// also a seeded counter of a scope `SCOPES` does not list (none: the programs run only on the
/// interfaces the loader listed), so that no count is ever lost.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(COUNTERS_CAPACITY, 0);

/// Handshake and greeting durations, in runs of [`HistKind::COUNT`] at
/// [`Config::scope_index`]; sized by the loader.
#[map(name = "HISTS")]
static HISTS: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(HISTS_DEFAULT, 0);

/// [`Config::scope_index`] by [`Config::scope_key`], [`NO_SCOPE`] for a scope not watched;
/// sized and written by the loader before it attaches. Read, not computed: see
/// [`Config::scope_key`].
#[map(name = "SCOPES")]
static SCOPES: Array<u32> = Array::with_max_entries(SCOPES_DEFAULT, 0);

/// Per-peer counters; resized by the loader (`--max-peers`). Evicted entries lose only their
/// per-peer view: the counters above are kept separately.
#[map(name = "PEERS")]
static PEERS: LruHashMap<PeerKey, PeerCounters> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PEERS, 0);

/// The per-peer log (`--peer-counts log`): one [`PeerRecord`] a counted packet, added up per
/// peer by userspace, which polls it (the records ask for no wakeup). One page as built, for
/// the per-peer map's way; the loader sizes it in log mode
/// ([`smtpflow_common::peer::PEER_LOG_BYTES`]).
#[map(name = "PEER_LOG")]
static PEER_LOG: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Where a new peer's entry is built before it is inserted, counts included, so that the
/// insert needs no lookup after it (a lookup also marks the entry recently used, which makes the
/// LRU's evictions scan further). A per-CPU slot, not the stack: the frames of a packet's calls
/// share 512 bytes, and Linux 6.1 counts them all.
#[map(name = "PEER_NEW")]
static PEER_NEW: PerCpuArray<PeerCounters> = PerCpuArray::with_max_entries(1, 0);

/// Per-peer reply codes: greetings, and every reply ([`smtpflow_common::peer::reply_kind`]);
/// resized by the loader (four entries a peer of `--max-peers`). Evicted entries are counted
/// as `PEERS`' are: new ones bump [`Stat::PeerReplyInserts`].
#[map(name = "PEER_GREETINGS")]
static PEER_GREETINGS: LruHashMap<PeerGreetingKey, u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PEERS, 0);

/// The flow table ([`smtpflow_common::flow_table`]): one way per SMTP connection attempt,
/// advanced by [`crate::flow::track`]; its sets resized by the loader (`--max-flows`). The
/// sets' tags, a cache line a set; and their flows, keys and states, in `FLOWS` below. Arrays,
/// so a lookup is an address computation the verifier inlines, with no lock and no LRU list.
/// The tags are mappable: userspace's sweep reads them in place, and reads a set's flows
/// (timeouts, open connections) only where its tags say it holds one. Only the programs write
/// them.
#[map(name = "FLOW_TAGS")]
pub static FLOW_TAGS: Array<FlowTags> =
    Array::with_max_entries(sets_for(DEFAULT_MAX_FLOWS), BPF_F_MMAPABLE);

/// The flow table's flows, set by set as in `FLOW_TAGS`. Mappable too: the sweep reads the
/// flows in place, mapping a window of sets at a time (Linux maps every page of a mapping at
/// once, so the whole table mapped would count in smtpflow's RSS).
#[map(name = "FLOWS")]
pub static FLOWS: Array<FlowSet> =
    Array::with_max_entries(sets_for(DEFAULT_MAX_FLOWS), BPF_F_MMAPABLE);

/// Payload events ([`smtpflow_common::payload::PayloadEvent`]), a few per session, written by
/// [`crate::payload::emit`] and drained by userspace; a record that does not fit is lost and
/// counted ([`Stat::PayloadsLost`]).
#[map(name = "PAYLOADS")]
pub static PAYLOADS: RingBuf = RingBuf::with_byte_size(PAYLOAD_RING_BYTES, 0);

/// The programs' own bookkeeping, indexed by [`Stat`].
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT as u32, 0);

/// The loader's configuration, read in place.
#[inline(always)]
pub fn config() -> &'static Config {
    // SAFETY: CONFIG lives for the program's lifetime. The loader writes it before load; the
    // opaque pointer keeps the compiler from folding the placeholder value (and from copying
    // it onto the small BPF stack, as a volatile read would).
    unsafe { &*(opaque(&raw const CONFIG as usize) as *const Config) }
}

/// The drop programs' configuration, read in place: each field is one load from read-only
/// data, whose values the verifier knows (so it can check the field offsets the drop programs
/// add to kernel pointers against the kernel's BTF), and nothing is copied to the stack.
#[inline(always)]
pub fn drop_config() -> &'static DropConfig {
    // SAFETY: as for CONFIG: it lives for the program's lifetime, the loader writes it before
    // load, and the opaque pointer keeps the compiler from folding the placeholder value.
    unsafe { &*(opaque(&raw const DROP_CONFIG as usize) as *const DropConfig) }
}

#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; these programs are not re-entered on the same CPU.
        unsafe { *v += 1 };
    }
}

/// Counts a failure of the programs' own bookkeeping (a map update refused, the payload ring
/// full, a state that cannot happen) in `STATS`, as [`bump`] does, and the 1st, 2nd, 4th, 8th…
/// time on a CPU also says what failed, and the helper's error `err` (a negative errno; 0 where
/// there is none), in the kernel's log (aya-log, level debug: `--log-level debug`). At most 64
/// lines a CPU over the programs' life, so a failure that repeats on every packet cannot flood
/// the log or the ring it goes through; the count in `STATS` stays exact. Only failure paths
/// call it, never a packet's normal path; below debug it costs the read of one global. Not
/// inlined: one copy of the records' code serves every caller.
#[inline(never)]
pub fn failed(stat: Stat, err: i32) {
    let Some(v) = STATS.get_ptr_mut(stat as u32) else {
        return;
    };
    // SAFETY: per-CPU slot; these programs are not re-entered on the same CPU.
    let n = unsafe {
        *v += 1;
        *v
    };
    if n & (n - 1) != 0 {
        return;
    }
    let ctx = ();
    match stat {
        Stat::CounterInsertFailed => {
            debug!(&ctx, target: KERNEL_LOG_TARGET, "kernel: COUNTERS insert failed ({}): a count lost, #{}", err, n)
        }
        Stat::HistInsertFailed => {
            debug!(&ctx, target: KERNEL_LOG_TARGET, "kernel: no histogram for the scope: a duration lost, #{}", n)
        }
        Stat::PeerInsertFailed => {
            debug!(&ctx, target: KERNEL_LOG_TARGET, "kernel: per-peer insert failed ({}): peer counts lost, #{}", err, n)
        }
        Stat::FlowInsertFailed => {
            debug!(&ctx, target: KERNEL_LOG_TARGET, "kernel: FLOWS insert failed ({}; -16: the way taken by another CPU): attempt not tracked, #{}", err, n)
        }
        Stat::PayloadsLost => {
            debug!(&ctx, target: KERNEL_LOG_TARGET, "kernel: PAYLOADS ring full: a payload event lost, #{}", n)
        }
        Stat::Malformed
        | Stat::PeerInserts
        | Stat::FlowInserts
        | Stat::FlowDeletes
        | Stat::FlowEvictions
        | Stat::PeerReplyInserts => {}
    }
}

/// No scope in the per-scope arrays: `SCOPES` does not list the packet's. Past the end of both
/// arrays, and still past them when [`scope_counter`] and [`observe_duration`] scale it.
pub const NO_SCOPE: u32 = u32::MAX;

/// The [`Config::scope_index`] of a packet's scope, or [`NO_SCOPE`]: one read of `SCOPES` (an
/// array lookup the verifier inlines), so that the verifier carries one unknown value on from
/// here, whatever path the packet took.
#[inline(always)]
pub fn scope_of(ifindex: u32, port_index: usize, direction: Direction) -> u32 {
    match SCOPES.get(config().scope_key(ifindex, port_index, direction)) {
        Some(&at) => at,
        None => NO_SCOPE,
    }
}

/// Where `counter` of `scope` lives in `SCOPE_COUNTS`: past its end for a sparse counter or no
/// scope (then [`count`] keys it in `COUNTERS`). No branch on `scope`: the array's bounds
/// check is the only test.
#[inline(always)]
pub fn scope_counter(scope: u32, counter: Counter) -> u32 {
    match counter.scope_slot() {
        Some(slot) => scope.wrapping_mul(SCOPE_SLOTS as u32).wrapping_add(slot as u32),
        None => NO_SCOPE,
    }
}

/// Adds one to an exact counter: at `at` in `SCOPE_COUNTS` ([`scope_counter`]), in place (an
/// array lookup the verifier inlines: no call), else keyed by `key` in `COUNTERS`
/// ([`count_sparse`]).
#[inline(always)]
pub fn count(key: &CounterKey, at: u32) {
    if let Some(v) = SCOPE_COUNTS.get_ptr_mut(at) {
        // SAFETY: per-CPU value; these programs are not re-entered on the same CPU.
        unsafe { *v += 1 };
        return;
    }
    count_sparse(key);
}

/// Adds one to the exact counter keyed by `key` in `COUNTERS`, created when needed. Not
/// inlined: one copy serves every caller, and its key slot is not repeated in theirs.
#[inline(never)]
fn count_sparse(key: &CounterKey) {
    let mut err = 0;
    for _ in 0..2 {
        if let Some(v) = COUNTERS.get_ptr_mut(key) {
            // SAFETY: per-CPU value; these programs are not re-entered on the same CPU.
            unsafe { *v += 1 };
            return;
        }
        match COUNTERS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
            Ok(()) => return,
            // Another CPU created it first: count into it on the next pass.
            Err(e) if e == -EEXIST => err = e,
            Err(e) => {
                err = e;
                break;
            }
        }
    }
    failed(Stat::CounterInsertFailed, err);
}

/// Adds a duration to `scope`'s histogram of `kind`. A scope with no place in the array
/// ([`NO_SCOPE`]) loses the duration, counted.
#[inline(always)]
pub fn observe_duration(scope: u32, kind: HistKind, ns: u64) {
    let at = scope.wrapping_mul(HistKind::COUNT as u32).wrapping_add(kind as u32);
    let Some(h) = HISTS.get_ptr_mut(at) else {
        return failed(Stat::HistInsertFailed, 0);
    };
    let bucket = Histogram::bucket(ns);
    // SAFETY: per-CPU value; these programs are not re-entered on the same CPU.
    unsafe {
        if let Some(b) = (*h).buckets.get_mut(opaque(bucket)) {
            *b += 1;
        }
        (*h).sum_ns += ns;
    }
}

/// Adds one to a shared (not per-CPU) LRU counter.
#[inline(always)]
fn add_one(slot: *mut u64) {
    // SAFETY: `slot` points into a live map value. The map is shared by all CPUs, so the add is
    // atomic (a BPF `lock xadd`; core's AtomicU64::fetch_add needs CAS, which the bpf target
    // does not advertise).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
}

/// The per-peer counters one packet adds to, applied by [`count_peer`] with one lookup of the
/// peer's entry: an (event, side) slot, an outcome, a reset phase (each [`PeerBumps::NONE`] when
/// not counted) and a throttled session.
#[derive(Clone, Copy)]
pub struct PeerBumps {
    pub event: u8,
    pub outcome: u8,
    pub reset: u8,
    pub throttled: bool,
}

impl PeerBumps {
    /// A slot not counted (never a valid index: the slots are masked below it).
    pub const NONE: u8 = BUMP_NONE;
    pub const EMPTY: Self =
        Self { event: Self::NONE, outcome: Self::NONE, reset: Self::NONE, throttled: false };

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.event & self.outcome & self.reset & Self::NONE != 0 && !self.throttled
    }
}

// Powers of two below NONE (asserted in smtpflow-common and here), so a mask keeps an index in
// range.
const COUNTS: usize = PEER_EVENT_SLOTS;
const OUTCOMES: usize = PEER_OUTCOME_SLOTS;
const RESETS: usize = PEER_RESET_SLOTS;
const _: () = assert!(COUNTS <= PeerBumps::NONE as usize && OUTCOMES <= COUNTS && RESETS <= COUNTS);

/// Adds a packet's [`PeerBumps`] to its peer's entry, creating the entry when needed; or, with
/// `--peer-counts log`, appends them to the per-peer log ([`log_peer`]). Not inlined: a BPF
/// subprogram has its own 512-byte stack frame.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the new value is passed where it lies, in its per-CPU slot; by value it would be \
              copied onto the stack"
)]
pub fn count_peer(key: &PeerKey, b: &PeerBumps) {
    if config().peer_log != peer_counts::MAP {
        return log_peer(key, b);
    }
    if let Some(v) = PEERS.get_ptr_mut(key) {
        return apply_peer::<true>(v, b);
    }
    let Some(new) = PEER_NEW.get_ptr_mut(0) else {
        return failed(Stat::PeerInsertFailed, 0);
    };
    // SAFETY: the per-CPU slot is this program's alone while it runs (not re-entered on a CPU).
    unsafe { *new = PeerCounters::ZERO };
    apply_peer::<false>(new, b);
    // SAFETY: as above; the helper copies the value.
    match PEERS.insert(key, unsafe { &*new }, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(Stat::PeerInserts),
        // Another CPU created it meanwhile: count into theirs.
        Err(e) if e == -EEXIST => match PEERS.get_ptr_mut(key) {
            Some(v) => apply_peer::<true>(v, b),
            // Evicted again before the count: lost, and counted as lost.
            None => failed(Stat::PeerInsertFailed, e),
        },
        Err(e) => failed(Stat::PeerInsertFailed, e),
    }
}

/// Appends a packet's [`PeerBumps`] to the per-peer log: one copy into the ring, no lookup, no
/// insert, no eviction. A record that does not fit (userspace fell behind by a whole ring) is
/// lost and counted as a per-peer insert that failed.
#[inline(always)]
fn log_peer(key: &PeerKey, b: &PeerBumps) {
    let record = PeerRecord {
        peer: *key,
        event: b.event,
        outcome: b.outcome,
        reset: b.reset,
        throttled: u8::from(b.throttled),
        _pad: 0,
    };
    if let Err(e) = PEER_LOG.output::<PeerRecord>(&record, u64::from(BPF_RB_NO_WAKEUP)) {
        failed(Stat::PeerInsertFailed, e);
    }
}

/// Adds `b` to the counters at `c`: atomically in a shared map's value, plainly in a value
/// being built in a per-CPU slot.
#[inline(always)]
fn apply_peer<const SHARED: bool>(c: *mut PeerCounters, b: &PeerBumps) {
    let add = |slot: *mut u64| if SHARED { add_one(slot) } else { add_plain(slot) };
    // SAFETY: `c` points into a live map value. Each index is made opaque and masked (not
    // bounds-checked: no branch whose dead side an old verifier (6.1) would walk with
    // contradictory bounds), so LLVM keeps the mask the verifier needs.
    unsafe {
        if b.event & PeerBumps::NONE == 0 {
            add(&raw mut (*c).counts[opaque(usize::from(b.event)) & (COUNTS - 1)]);
        }
        if b.outcome & PeerBumps::NONE == 0 {
            add(&raw mut (*c).outcomes[opaque(usize::from(b.outcome)) & (OUTCOMES - 1)]);
        }
        if b.reset & PeerBumps::NONE == 0 {
            add(&raw mut (*c).resets[opaque(usize::from(b.reset)) & (RESETS - 1)]);
        }
        if b.throttled {
            add(&raw mut (*c).throttled);
        }
    }
}

/// Adds one to a counter only this CPU can see (a value being built).
#[inline(always)]
fn add_plain(slot: *mut u64) {
    // SAFETY: `slot` points into this CPU's slot of a per-CPU map.
    unsafe { *slot += 1 };
}

/// Adds one to a peer's count of a reply code, creating the entry when needed; a new entry is
/// counted ([`Stat::PeerReplyInserts`]), so that userspace can tell the entries the LRU map
/// evicted.
#[inline(never)]
pub fn count_peer_greeting(key: &PeerGreetingKey) {
    if let Some(v) = PEER_GREETINGS.get_ptr_mut(key) {
        return add_one(v);
    }
    match PEER_GREETINGS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(Stat::PeerReplyInserts),
        Err(e) if e == -EEXIST => {
            if let Some(v) = PEER_GREETINGS.get_ptr_mut(key) {
                add_one(v);
            }
        }
        Err(e) => failed(Stat::PeerInsertFailed, e),
    }
}
