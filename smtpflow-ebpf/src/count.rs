//! Turns a parsed segment into counter updates: exact per-CPU totals, and a bounded LRU map of
//! per-peer counters.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
};
use smtpflow_common::{
    Config, DEFAULT_MAX_PEERS, PeerCounters, PeerKey, Side, Stat, TOTALS_CAPACITY, TotalKey,
    classify, direction_of, smtp_port,
};

use crate::{
    packet::Packet,
    parse::{Skip, parse},
};

const EEXIST: i32 = 17;

/// Set by the loader before load (`--ports`); read-only for the program.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

/// Exact totals; userspace pre-creates the keys of every watched interface and port.
#[map(name = "TOTALS")]
static TOTALS: PerCpuHashMap<TotalKey, u64> = PerCpuHashMap::with_max_entries(TOTALS_CAPACITY, 0);

/// Per-peer counters; resized by the loader (`--max-peers`). Evicted entries lose only their
/// per-peer view: the totals above are kept separately.
#[map(name = "PEERS")]
static PEERS: LruHashMap<PeerKey, PeerCounters> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PEERS, 0);

/// The program's own bookkeeping, indexed by [`Stat`].
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT as u32, 0);

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; this program is not re-entered on the same CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
pub fn observe<P: Packet>(p: &P, ifindex: u32, side: Side) {
    let seg = match parse(p) {
        Ok(seg) => seg,
        Err(Skip::Malformed) => return bump(Stat::Malformed),
        Err(Skip::NotTcp) => return,
    };
    // SAFETY: the loader writes CONFIG before load; volatile keeps the compiler from folding the
    // placeholder value.
    let config = unsafe { core::ptr::read_volatile(&CONFIG) };
    let Some(m) = smtp_port(seg.src_port, seg.dst_port, config.ports()) else {
        return;
    };
    let Some(event) = classify(seg.flags, seg.window) else {
        return;
    };
    let direction = direction_of(side, m.sender_is_client);

    let total = TotalKey {
        ifindex,
        port: m.port,
        event: event as u8,
        direction: direction as u8,
        side: side as u8,
        _pad: [0; 3],
    };
    count_total(&total);

    let peer = PeerKey {
        ifindex,
        addr: match side {
            Side::Peer => seg.src,
            Side::Local => seg.dst,
        },
        port: m.port,
        family: seg.family,
        direction: direction as u8,
    };
    count_peer(&peer, PeerCounters::index(event, side));
}

#[inline(always)]
fn count_total(key: &TotalKey) {
    for _ in 0..2 {
        if let Some(v) = TOTALS.get_ptr_mut(key) {
            // SAFETY: per-CPU value; this program is not re-entered on the same CPU.
            unsafe { *v += 1 };
            return;
        }
        match TOTALS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
            Ok(()) => return,
            // Another CPU created it first: count into it on the next pass.
            Err(e) if e == -EEXIST => continue,
            Err(_) => break,
        }
    }
    bump(Stat::TotalsInsertFailed);
}

#[inline(always)]
fn add_one(counters: *mut PeerCounters, index: usize) {
    // SAFETY: `counters` points into a live map value. The map is shared by all CPUs, so the
    // add is atomic (a BPF `lock xadd`; core's AtomicU64::fetch_add needs CAS, which the bpf
    // target does not advertise).
    unsafe {
        if let Some(slot) = (*counters).counts.get_mut(index) {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1);
        }
    }
}

#[inline(always)]
fn count_peer(key: &PeerKey, index: usize) {
    if let Some(v) = PEERS.get_ptr_mut(key) {
        return add_one(v, index);
    }
    let mut init = PeerCounters::default();
    if let Some(slot) = init.counts.get_mut(index) {
        *slot = 1;
    }
    match PEERS.insert(key, init, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(Stat::PeerInserts),
        Err(e) if e == -EEXIST => match PEERS.get_ptr_mut(key) {
            Some(v) => add_one(v, index),
            None => bump(Stat::PeerInsertFailed),
        },
        Err(_) => bump(Stat::PeerInsertFailed),
    }
}
