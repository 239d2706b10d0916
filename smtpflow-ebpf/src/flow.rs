//! One SMTP connection attempt's way in the flow table (`smtpflow_common::flow_table`),
//! advanced by the state machine in `smtpflow_common::flow::step`. Userspace's sweep reads the
//! table in place to count the attempts that got no answer in time; only these programs write
//! it.
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::addr_of_mut,
};

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use smtpflow_common::{
    Direction, FlowKey, FlowState, Outcome, Stat,
    flow::{ACTIVE_SHIFT, Actions, FlowPacket, IDLE_NS, step_may_change_into, unreachable},
    flow_table::{
        BUSY, FLOW_WAYS, FlowSet, FlowTags, candidate_sets, flow_hash, holds_flow, same_key, tag,
    },
    reply::HEAD_LEN,
};

use crate::{
    maps::{FLOW_TAGS, FLOWS, bump, config, failed},
    packet::{Packet, opaque},
    parse::{Segment, icmp::Quoted},
};

/// Where a packet belongs: what `track` needs besides the segment and the packet (one argument,
/// as BPF calls take at most five).
#[derive(Clone, Copy)]
pub struct Where {
    pub ifindex: u32,
    pub direction: Direction,
}

/// Reads what the state machine needs from the payload into `fp`: on a plaintext port the
/// reply line or command its first bytes hold, and whether it ends a line; from the client, its
/// first byte. Its own subprogram, called beside [`track`] (not from it), so that the head and
/// its parsing take stack in a frame of their own, not in the chain of calls the verifier adds
/// up.
///
/// [`HEAD_LEN`] (16) bytes in two loads when the payload has them, else 8, else 4, each at a
/// constant offset from the payload's start: a read ending at the payload's end (the last 8 of
/// a shorter payload) is at a variable offset LLVM re-derives below the checked pointer, which
/// the verifier refuses. A reply segment of 9 to 15 bytes (`452 4.5.3\r\n`, with no text) is
/// read to its first 8: its code counts, its status reads as none.
#[inline(never)]
pub fn read_payload<P: Packet>(p: &P, seg: &Segment, fp: &mut FlowPacket) {
    let len = seg.payload_len as usize;
    let off = seg.payload_off;
    let mut head = [0u8; HEAD_LEN];
    let mut head_len = 0;
    if fp.plaintext {
        // Whole words (one load each, in memory order): read as bytes, LLVM loads and spills
        // them one by one.
        if len >= 8
            && let Ok(first) = p.load::<u64>(off)
        {
            head[..8].copy_from_slice(&first.to_ne_bytes());
            head_len = 8;
            if len >= HEAD_LEN
                && let Ok(second) = p.load::<u64>(off + 8)
            {
                head[8..].copy_from_slice(&second.to_ne_bytes());
                head_len = HEAD_LEN as u8;
            }
        } else if len >= 4
            && let Ok(first) = p.load::<u32>(off)
        {
            head[..4].copy_from_slice(&first.to_ne_bytes());
            head_len = 4;
        }
        fp.read_head(&head, head_len);
    }
    if fp.from_client {
        fp.first_byte = if head_len > 0 { head[0] } else { first_byte(p, off) };
    } else if len > 0 {
        fp.ends_line = second_of_two(p, off + len - 2, b'\n') == b'\n';
    }
}

/// A payload's first byte at `off` (the byte before it, the TCP header's last, always exists);
/// 0 when unreadable.
#[inline(always)]
pub fn first_byte<P: Packet>(p: &P, off: usize) -> u8 {
    second_of_two(p, off - 1, 0)
}

/// The second of the two bytes at `at`, or `missing` when they are unreadable (past what we
/// inspect). Read as the second of two: a used one-byte packet read lets LLVM turn
/// `p + 1 > end` into `p >= end`, which gives the verifier no range; the byte before the
/// payload always exists (the TCP header's last). For the payload's last byte (`\n` when
/// missing: assume the segment ended a line, as SMTP replies do) and the client's first.
#[inline(always)]
fn second_of_two<P: Packet>(p: &P, at: usize, missing: u8) -> u8 {
    // One 16-bit load, its error path given a value, and the value made opaque: otherwise LLVM
    // tests the loaded bits speculatively, on the error path too, where the register is unset
    // (it held the context pointer, and the verifier refuses masking a pointer).
    let v = p.load::<u16>(at).unwrap_or(u16::from_ne_bytes([0, missing]));
    let [_, second] = (opaque(usize::from(v)) as u16).to_ne_bytes();
    second
}

/// Advances the packet's flow in the flow table and writes what to count into `out`; only for
/// a packet that [`FlowPacket::may_change_flow`]. A flow that ends frees its way; a new one
/// takes a way ([`insert`]). Not inlined: a BPF subprogram has its own stack frame.
#[inline(never)]
pub fn track(seg: &Segment, at: &Where, fp: &FlowPacket, out: &mut Actions, flow: &mut Scratch) {
    let Where { ifindex, direction } = *at;
    let (client, server, client_port, server_port) = if fp.from_client {
        (seg.src, seg.dst, seg.src_port, seg.dst_port)
    } else {
        (seg.dst, seg.src, seg.dst_port, seg.src_port)
    };
    flow.key = FlowKey {
        ifindex,
        client,
        server,
        client_port,
        server_port,
        family: seg.family,
        direction: direction as u8,
        _pad: [0; 2],
    };
    let key = &flow.key;
    let table = Table::of(key);
    let found = table.find(key);
    // SAFETY: a place in a live value of the table.
    let stored = found.map(|at| unsafe { addr_of_mut!((*at.set).states[at.way]) });
    // SAFETY: a live way of the table; concurrent updates of one flow from two CPUs can at
    // worst lose a state change of that flow, never a count in the exact counters.
    flow.state = stored.map(|s| unsafe { *s }).unwrap_or_default();
    // The clock is read only where the step needs it (not for a retransmitted SYN).
    // SAFETY: plain helper call.
    let now = || unsafe { bpf_ktime_get_ns() };
    let timeout = config().handshake_timeout_ns;
    step_may_change_into(&mut flow.state, stored.is_some(), fp, now, timeout, out);
    let actions = &*out;
    if actions.delete {
        if let Some(at) = found
            && table.release(at)
        {
            bump(Stat::FlowDeletes);
        }
    } else if actions.store {
        match stored {
            // SAFETY: as above.
            Some(s) => unsafe { *s = flow.state },
            None => {
                let [left, right] = table.sets;
                let err = insert(left, right, table.hash, &flow.key, &flow.state);
                if err != 0 {
                    failed(Stat::FlowInsertFailed, err);
                }
            }
        }
    }
}

/// Where [`track`] builds a packet's flow key and its flow's new state: in the packet's per-CPU
/// slot, not on the stack, whose 512 bytes the frames of a packet's calls share (Linux 6.1
/// counts them all).
pub struct Scratch {
    key: FlowKey,
    state: FlowState,
}

/// A flow's place in the table: its two candidate sets and its tag.
///
/// The verifier follows each branch on an unknown value as a path of its own, and a branch per
/// way that carried on into the packet's step made the paths multiply past the million
/// instructions it allows. So a lookup ends with one unknown number (which set, which way) and
/// one branch (found or not): the ways' scan leaves its result in a map value ([`set_hit`]),
/// the free ways are counted with arithmetic, and a set is picked by its index, never by
/// choosing between two pointers.
struct Table {
    sets: [u32; 2],
    hash: u64,
    tag: u64,
}

/// A way of the table: its set's tags and flows (live values of `FLOW_TAGS` and `FLOWS`) and
/// its index in them (below [`FLOW_WAYS`]).
#[derive(Clone, Copy)]
struct Way {
    tags: *mut FlowTags,
    set: *mut FlowSet,
    way: usize,
}

/// One CAS of a way's tag, `from` to `to`: whether it was `from` (and is now `to`). The claim
/// that keeps two CPUs from writing one way, and a full barrier where the kernel's JIT needs
/// one (the key and state written before a way is published are seen with it).
#[inline(always)]
fn swap_tag(at: Way, from: u64, to: u64) -> bool {
    // SAFETY: `at.tags` is a live value of the table (an array map: never freed while the
    // program runs), `at.way` < FLOW_WAYS; a BPF cmpxchg on a map value, which the verifier
    // allows.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            addr_of_mut!((*at.tags).tags[at.way]),
            from,
            to,
        )
        .1
    }
}

impl Table {
    /// The candidate sets of `key`'s flow.
    #[inline(always)]
    fn of(key: &FlowKey) -> Self {
        let config = config();
        let hash = flow_hash(key, config.flow_seed);
        Self { sets: candidate_sets(hash, config.flow_sets), hash, tag: tag(hash) }
    }

    /// The way holding `key`'s flow: the two sets' tags read (a cache line each, in
    /// [`set_hit`]), and the key compared where the tag matches (the last match, if a race
    /// left two).
    #[inline(always)]
    fn find(&self, key: &FlowKey) -> Option<Way> {
        let [left, right] = self.sets;
        let hit = tag_hit(left, right, self.tag);
        if hit == 0 {
            return None;
        }
        let hit = hit - 1;
        let at = self.way(hit / FLOW_WAYS as u64, hit as usize % FLOW_WAYS)?;
        // SAFETY: a live value of the table.
        same_key(unsafe { &(*at.set).keys[at.way] }, key).then_some(at)
    }

    /// Way `way` of candidate set `which` (0 or 1).
    #[inline(always)]
    fn way(&self, which: u64, way: usize) -> Option<Way> {
        let [left, right] = self.sets;
        let index = pick(which, u64::from(right), u64::from(left)) as u32;
        Some(Way { tags: FLOW_TAGS.get_ptr_mut(index)?, set: FLOWS.get_ptr_mut(index)?, way })
    }

    /// Frees the way of a flow that ended: whether it still held it (another CPU may have
    /// given the way to a new flow meanwhile).
    #[inline(always)]
    fn release(&self, at: Way) -> bool {
        swap_tag(at, self.tag, 0)
    }
}

/// Stores a new flow: in a free way of the candidate set with more of them (the left one on
/// a tie), else over a flow of the two sets picked by the hash, counted in
/// [`Stat::FlowEvictions`] unless it was idle. Claimed with a CAS, written, then published
/// with its tag. 0 when stored; else the attempt is not followed, and the caller counts it in
/// [`Stat::FlowInsertFailed`] with the error returned: [`EBUSY`] when another CPU claimed the
/// way at the same moment, [`ENOENT`] when a candidate set is not in the table (cannot happen:
/// the sets are below `flow_sets`, the maps' size; counted all the same, not lost).
/// Not inlined: its frame is not stacked under the failure report's.
#[inline(never)]
fn insert(left: u32, right: u32, hash: u64, key: &FlowKey, st: &FlowState) -> i32 {
    let table = Table { sets: [left, right], hash, tag: tag(hash) };
    let [Some(left_set), Some(right_set)] = [left, right].map(|i| FLOW_TAGS.get_ptr_mut(i)) else {
        return ENOENT;
    };
    let right_freer = is_negative(free_ways(left_set).wrapping_sub(free_ways(right_set)));
    let Some(chosen) = table.way(right_freer, 0) else { return ENOENT };
    // The first free way of that set, FLOW_WAYS for none.
    let mut free = FLOW_WAYS as u64;
    for w in (0..FLOW_WAYS).rev() {
        // SAFETY: a live value of the table.
        free = pick(is_zero(unsafe { (*chosen.tags).tags[w] }), w as u64, free);
    }
    // With no free way, one of the two sets' picked by the hash. Picked with arithmetic too:
    // LLVM made the two choices two branches on one test, and Linux 6.1's verifier, following
    // the second one's side that the first had ruled out, lost the pointer the way indexes.
    let none = is_zero(free ^ FLOW_WAYS as u64);
    let which = pick(none, hash >> 40 & 1, right_freer);
    let way = pick(none, hash >> 41, free) as usize % FLOW_WAYS;
    let Some(at) = table.way(which, way) else { return ENOENT };
    // SAFETY: a live value of the table.
    let old = unsafe { (*at.tags).tags[at.way] };
    if !(old == 0 || holds_flow(old)) || !swap_tag(at, old, BUSY) {
        return EBUSY;
    }
    // SAFETY: the way is this CPU's until published: its tag is BUSY.
    unsafe {
        if old != 0 && !idle(&(*at.set).states[at.way], st) {
            bump(Stat::FlowEvictions);
        }
        (*at.set).keys[at.way] = *key;
        (*at.set).states[at.way] = *st;
    }
    swap_tag(at, BUSY, table.tag);
    bump(Stat::FlowInserts);
    0
}

/// [`insert`]'s errors, as the kernel's errnos (negative), for the debug log's line.
const EBUSY: i32 = -16;
const ENOENT: i32 = -2;

/// Which way of the sets `left` and `right` has the tag `tag`: 1 + the way's index among the
/// two sets' (left first), 0 for none. The right set is read only when the left one does not
/// have it.
#[inline(always)]
fn tag_hit(left: u32, right: u32, tag: u64) -> u64 {
    let l = set_hit(left, tag);
    if l != 0 {
        return l;
    }
    let r = set_hit(right, tag);
    r + (FLOW_WAYS as u64 & is_zero(r).wrapping_sub(1))
}

/// Which way of set `index` has the tag `tag`: 1 + its index, 0 for none. The scan
/// ([`scan_set`], not inlined) leaves it in [`FLOW_HIT`] rather than returning it: its loop
/// ends early (a compare a way, until the tag), and each way it ends at is a path of its own
/// for the verifier; read back from a map value, the result is one unknown number whichever
/// way the scan ended at, so the verifier walks the rest of the packet's step once, not once
/// for each.
#[inline(always)]
fn set_hit(index: u32, tag: u64) -> u64 {
    scan_set(index, tag);
    // SAFETY: this CPU's slot, written by `scan_set` just now.
    FLOW_HIT.get_ptr(0).map_or(0, |hit| unsafe { *hit })
}

/// The scan of [`set_hit`]: into [`FLOW_HIT`], 1 + the first way of set `index` whose tag is
/// `tag`, 0 for none.
#[inline(never)]
fn scan_set(index: u32, tag: u64) {
    let Some(out) = FLOW_HIT.get_ptr_mut(0) else { return };
    let mut hit = 0;
    if let Some(set) = FLOW_TAGS.get_ptr(index) {
        for way in 0..FLOW_WAYS {
            // SAFETY: a live value of the table.
            if unsafe { (*set).tags[way] } == tag {
                hit = way as u64 + 1;
                break;
            }
        }
    }
    // SAFETY: this CPU's slot, this program's alone while it runs.
    unsafe { *out = hit };
}

/// Where [`scan_set`] leaves what it found, one slot per CPU.
#[map(name = "FLOW_HIT")]
static FLOW_HIT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `yes` when `cond` (0 or 1) is 1, else `no`, with no branch: the mask goes through an
/// opaque step, or LLVM makes the select a branch again.
#[inline(always)]
fn pick(cond: u64, yes: u64, no: u64) -> u64 {
    let mask = opaque(cond.wrapping_neg() as usize) as u64;
    no ^ ((no ^ yes) & mask)
}

/// 1 when `x` is 0, else 0, computed with no branch (BPF has no compare that sets a register:
/// LLVM makes `x == 0` a branch, and the verifier follows each side as a path of its own).
/// `x | -x` has its top bit set for every `x` but 0. Each step goes through an opaque one, or
/// LLVM folds it back into a compare.
#[inline(always)]
fn is_zero(x: u64) -> u64 {
    let any = opaque((x | x.wrapping_neg()) as usize);
    (opaque(any >> 63) as u64) ^ 1
}

/// 1 when `x`, read as signed, is negative, else 0, with no branch.
#[inline(always)]
fn is_negative(x: u64) -> u64 {
    opaque(opaque(x as usize) >> 63) as u64
}

/// Free ways of a set, counted with no branch.
#[inline(always)]
fn free_ways(set: *mut FlowTags) -> u64 {
    let mut free = 0;
    for way in 0..FLOW_WAYS {
        // SAFETY: a live value of the table.
        free += is_zero(unsafe { (*set).tags[way] });
    }
    free
}

/// Whether the flow `old` had not been written for [`IDLE_NS`] when `new` was (its `active`):
/// no longer followed, so overwriting it loses nothing (userspace's sweep no longer shows it).
#[inline(always)]
fn idle(old: &FlowState, new: &FlowState) -> bool {
    new.active.wrapping_sub(old.active) > (IDLE_NS >> ACTIVE_SHIFT) as u32
}

/// Advances the flow of our connection attempt that an ICMP destination unreachable quotes (the
/// quoted source is the client: us), and returns the outcome it decides: `unreachable`, once,
/// for a pending attempt whose SYN carried the quoted sequence number. Only an existing flow is
/// written; a message quoting no flow of ours creates none.
#[inline(never)]
pub fn track_unreachable(q: &Quoted, ifindex: u32, now: u64) -> Option<Outcome> {
    let key = FlowKey {
        ifindex,
        client: q.src,
        server: q.dst,
        client_port: q.src_port,
        server_port: q.dst_port,
        family: q.family,
        direction: Direction::Outbound as u8,
        _pad: [0; 2],
    };
    let at = Table::of(&key).find(&key)?;
    // SAFETY: a place in a live value of the table.
    let stored = unsafe { addr_of_mut!((*at.set).states[at.way]) };
    // SAFETY: a live way of the table; as in `track`, a concurrent update of the same flow can
    // at worst lose a state change of that flow.
    let mut st = unsafe { *stored };
    let actions = unreachable(&mut st, q.seq, now, config().handshake_timeout_ns);
    if actions.store {
        // SAFETY: as above.
        unsafe { *stored = st };
    }
    actions.outcome
}
