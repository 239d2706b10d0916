//! The counters the programs keep: exact per-CPU counters and duration histograms, and bounded
//! LRU maps of per-peer counters. [`observe`] is the per-packet path of the TC and XDP programs.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
};
use smtpflow_common::{
    COUNTERS_CAPACITY, Config, CounterKey, DEFAULT_MAX_PEERS, Direction, Event, HISTS_CAPACITY,
    HistKey, HistKind, Histogram, Metric, Outcome, PeerCounters, PeerGreetingKey, PeerKey, Side,
    Stat, classify, direction_of, flow::Actions, smtp_port,
};

use crate::{
    flow,
    packet::{Frame as _, Packet, opaque},
    parse::{Located, Ports, Segment, Skip, locate, segment},
};

pub const EEXIST: i32 = 17;

/// Set by the loader before load (`--ports`); read-only for the program.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

/// Exact counters ([`Metric`]); the loader pre-creates the keys of every watched interface and
/// port, so the hot path is a lookup.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(COUNTERS_CAPACITY, 0);

/// Handshake and greeting durations.
#[map(name = "HISTS")]
static HISTS: PerCpuHashMap<HistKey, Histogram> =
    PerCpuHashMap::with_max_entries(HISTS_CAPACITY, 0);

/// Per-peer counters; resized by the loader (`--max-peers`). Evicted entries lose only their
/// per-peer view: the counters above are kept separately.
#[map(name = "PEERS")]
static PEERS: LruHashMap<PeerKey, PeerCounters> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PEERS, 0);

/// Per-peer greeting codes; sized like `PEERS`.
#[map(name = "PEER_GREETINGS")]
static PEER_GREETINGS: LruHashMap<PeerGreetingKey, u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_PEERS, 0);

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

#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; these programs are not re-entered on the same CPU.
        unsafe { *v += 1 };
    }
}

/// Adds one to an exact counter, creating it when needed. Not inlined: one copy serves every
/// caller, and its key slot is not repeated in theirs.
#[inline(never)]
pub fn count(key: &CounterKey) {
    for _ in 0..2 {
        if let Some(v) = COUNTERS.get_ptr_mut(key) {
            // SAFETY: per-CPU value; these programs are not re-entered on the same CPU.
            unsafe { *v += 1 };
            return;
        }
        match COUNTERS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
            Ok(()) => return,
            // Another CPU created it first: count into it on the next pass.
            Err(e) if e == -EEXIST => continue,
            Err(_) => break,
        }
    }
    bump(Stat::CounterInsertFailed);
}

/// Adds a duration to its histogram. The loader creates every histogram up front (a zeroed value
/// is too big for the BPF stack), so a missing one is only counted.
#[inline(always)]
fn observe_duration(key: &HistKey, ns: u64) {
    let Some(h) = HISTS.get_ptr_mut(key) else {
        return bump(Stat::HistInsertFailed);
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

/// Which per-peer counter a packet adds to.
#[derive(Clone, Copy)]
enum PeerSlot {
    Event(usize),
    Outcome(usize),
}

const COUNTS: usize = smtpflow_common::Event::COUNT * smtpflow_common::Side::COUNT;
const OUTCOMES: usize = 2;
const _: () = assert!(COUNTS.is_power_of_two() && OUTCOMES.is_power_of_two());

// Not inlined: a BPF subprogram has its own 512-byte stack frame.
#[inline(never)]
fn count_peer(key: &PeerKey, slot: PeerSlot) {
    let pick = |c: *mut PeerCounters| -> Option<*mut u64> {
        // SAFETY: `c` points into a live map value or our stack copy. The index is made opaque
        // so that LLVM keeps the bounds check the verifier needs.
        unsafe {
            match slot {
                // Masked, not bounds-checked: no branch whose dead side an old verifier
                // (6.1) would walk with contradictory bounds.
                PeerSlot::Event(i) => Some(&raw mut (*c).counts[opaque(i) & (COUNTS - 1)]),
                PeerSlot::Outcome(i) => Some(&raw mut (*c).outcomes[opaque(i) & (OUTCOMES - 1)]),
            }
        }
    };
    if let Some(v) = PEERS.get_ptr_mut(key) {
        if let Some(s) = pick(v) {
            add_one(s);
        }
        return;
    }
    let mut init = PeerCounters::default();
    if let Some(s) = pick(&mut init) {
        // SAFETY: points into `init`.
        unsafe { *s = 1 };
    }
    match PEERS.insert(key, init, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(Stat::PeerInserts),
        Err(e) if e == -EEXIST => match PEERS.get_ptr_mut(key).and_then(pick) {
            Some(s) => add_one(s),
            None => bump(Stat::PeerInsertFailed),
        },
        Err(_) => bump(Stat::PeerInsertFailed),
    }
}

#[inline(never)]
fn count_peer_greeting(key: &PeerGreetingKey) {
    if let Some(v) = PEER_GREETINGS.get_ptr_mut(key) {
        return add_one(v);
    }
    match PEER_GREETINGS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            if let Some(v) = PEER_GREETINGS.get_ptr_mut(key) {
                add_one(v);
            }
        }
        Err(_) => bump(Stat::PeerInsertFailed),
    }
}

/// What the per-packet steps need, built once by [`inspect`].
struct Seen {
    seg: Segment,
    peer: PeerKey,
    at: flow::Where,
    event: Option<Event>,
}

/// The per-packet path of the TC and XDP programs. Most packets are not SMTP: they cost the
/// header reads of [`locate`] in place and two loads of the port set, in the program itself
/// (no call, no per-packet state). Only a segment of an SMTP port goes on to [`observe_smtp`].
#[inline(always)]
pub fn observe<P: Packet>(p: &P, side: Side) {
    let linear = p.linear();
    let found = match locate(&linear, is_smtp) {
        // Headers past the linear data of an skb may still be in its fragments.
        Err(Skip::Malformed) if linear.len() < p.len() => locate_whole(p),
        found => found,
    };
    match found {
        Ok(loc) => observe_smtp(p, &loc, side),
        Err(Skip::Malformed) => bump(Stat::Malformed),
        Err(Skip::NotTcp | Skip::OtherPorts) => {}
    }
}

/// Whether either port is an SMTP port: two loads of the port set.
#[inline(always)]
fn is_smtp(ports: &Ports) -> bool {
    let config = config();
    config.is_smtp_port(ports.dst) || config.is_smtp_port(ports.src)
}

/// [`locate`] through the helper that reads an skb's fragments too. Not inlined: rarely needed,
/// and its buffers stay out of the program's own frame.
#[inline(never)]
fn locate_whole<P: Packet>(p: &P) -> Result<Located, Skip> {
    locate(p, is_smtp)
}

/// Counts a segment of an SMTP port. Each step is its own BPF subprogram, called one after the
/// other, so their stack frames sit side by side (the 512-byte stack limit applies to a whole
/// call chain), and they share one [`Seen`] instead of copying it.
#[inline(never)]
fn observe_smtp<P: Packet>(p: &P, loc: &Located, side: Side) {
    let ifindex = p.ifindex();
    let mut seen = Seen {
        seg: Segment::EMPTY,
        peer: PeerKey { ifindex, addr: [0; 16], port: 0, family: 0, direction: 0 },
        at: flow::Where {
            ifindex,
            direction: Direction::Inbound,
            sender_is_client: false,
            plaintext: false,
            now: 0,
        },
        event: None,
    };
    if !inspect(p, loc, side, &mut seen) {
        return;
    }
    if let Some(event) = seen.event {
        count_event(&seen.peer, event, side);
    }
    let actions = flow::track(p, &seen.seg, &seen.at);
    record(&actions, &seen.peer, side);
}

/// Reads the segment and matches its SMTP port; `false` if the frame changed under us.
#[inline(never)]
fn inspect<P: Packet>(p: &P, loc: &Located, side: Side, seen: &mut Seen) -> bool {
    if segment(p, loc, &mut seen.seg).is_err() {
        return false;
    }
    let seg = &seen.seg;
    let config = config();
    let Some(m) = smtp_port(seg.src_port, seg.dst_port, config.ports()) else {
        return false;
    };
    let direction = direction_of(side, m.sender_is_client);
    seen.peer.addr = match side {
        Side::Peer => seg.src,
        Side::Local => seg.dst,
    };
    seen.peer.port = m.port;
    seen.peer.family = seg.family;
    seen.peer.direction = direction as u8;
    seen.event = classify(seg.flags, seg.window);
    seen.at.direction = direction;
    seen.at.sender_is_client = m.sender_is_client;
    seen.at.plaintext = config.is_plaintext(m.index);
    // SAFETY: plain helper call.
    seen.at.now = unsafe { bpf_ktime_get_ns() };
    true
}

#[inline(never)]
fn count_event(peer: &PeerKey, event: Event, side: Side) {
    let Some(direction) = Direction::from_u8(peer.direction) else {
        return;
    };
    count(&CounterKey::event(peer.ifindex, peer.port, event, direction, side));
    count_peer(peer, PeerSlot::Event(PeerCounters::index(event, side)));
}

/// Counts what the flow tracker decided. Not inlined, to keep the entry frame small (the BPF
/// stack limit of 512 bytes is for a whole call chain).
#[inline(never)]
fn record(a: &Actions, peer: &PeerKey, side: Side) {
    let (ifindex, port) = (peer.ifindex, peer.port);
    let Some(direction) = Direction::from_u8(peer.direction) else {
        return;
    };
    let key = |metric| CounterKey::new(ifindex, port, metric, direction);
    if let Some(outcome) = a.outcome {
        let mut k = key(Metric::Handshake);
        k.a = outcome as u8;
        count(&k);
        if outcome != Outcome::Timeout {
            count_peer(peer, PeerSlot::Outcome(outcome as usize));
        }
    }
    if a.syn_retransmit {
        count(&key(Metric::SynRetransmit));
    }
    if let Some(phase) = a.reset {
        let mut k = key(Metric::Reset);
        k.a = phase as u8;
        k.b = side as u8;
        count(&k);
    }
    if let Some(ns) = a.handshake_ns {
        observe_duration(&hist_key(ifindex, port, direction, HistKind::Handshake), ns);
    }
    if let Some(ns) = a.greeting_ns {
        observe_duration(&hist_key(ifindex, port, direction, HistKind::Greeting), ns);
    }
    if let Some(code) = a.reply {
        let mut k = key(Metric::Reply);
        k.code = code;
        count(&k);
        if a.greeting {
            k.metric = Metric::Greeting as u8;
            count(&k);
            count_peer_greeting(&PeerGreetingKey { peer: *peer, code, _pad: [0; 2] });
        }
    }
}

#[inline(always)]
fn hist_key(ifindex: u32, port: u16, direction: Direction, kind: HistKind) -> HistKey {
    HistKey { ifindex, port, direction: direction as u8, kind: kind as u8 }
}
