//! One SMTP connection attempt's entry in the flow map, advanced by the state machine in
//! `smtpflow_common::flow::step`. Userspace's sweep counts the attempts that got no answer in
//! time and deletes idle entries; it never writes one.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use smtpflow_common::{
    Direction, FlowKey, Outcome, Stat,
    flow::{Actions, FlowPacket, step_may_change_into, unreachable},
    reply::HEAD_LEN,
};

use crate::{
    maps::{FLOWS, bump, config, failed},
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

/// Advances the packet's flow and writes what to count into `out`; only for a packet that
/// [`FlowPacket::may_change_flow`]. Not inlined: a BPF subprogram has its
/// own 512-byte stack frame.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the 44-byte key stays in this frame; a by-value key would be copied per call"
)]
pub fn track(seg: &Segment, at: &Where, fp: &FlowPacket, out: &mut Actions) {
    let Where { ifindex, direction } = *at;
    let (client, server, client_port, server_port) = if fp.from_client {
        (seg.src, seg.dst, seg.src_port, seg.dst_port)
    } else {
        (seg.dst, seg.src, seg.dst_port, seg.src_port)
    };
    let key = FlowKey {
        ifindex,
        client,
        server,
        client_port,
        server_port,
        family: seg.family,
        direction: direction as u8,
        _pad: [0; 2],
    };

    let stored = FLOWS.get_ptr_mut(&key);
    // SAFETY: a live map value; concurrent updates of one flow from two CPUs can at worst lose
    // a state change of that flow, never a count in the exact counters.
    let mut st = stored.map(|s| unsafe { *s }).unwrap_or_default();
    // The clock is read only where the step needs it (not for a retransmitted SYN).
    // SAFETY: plain helper call.
    let now = || unsafe { bpf_ktime_get_ns() };
    step_may_change_into(&mut st, stored.is_some(), fp, now, config().handshake_timeout_ns, out);
    let actions = &*out;
    if actions.delete {
        if FLOWS.remove(&key).is_ok() {
            bump(Stat::FlowDeletes);
        }
    } else if actions.store {
        match stored {
            // SAFETY: as above.
            Some(s) => unsafe { *s = st },
            None => match FLOWS.insert(&key, st, u64::from(BPF_NOEXIST)) {
                Ok(()) => bump(Stat::FlowInserts),
                Err(e) => failed(Stat::FlowInsertFailed, e),
            },
        }
    }
}

/// Advances the flow of our connection attempt that an ICMP destination unreachable quotes (the
/// quoted source is the client: us), and returns the outcome it decides: `unreachable`, once,
/// for a pending attempt whose SYN carried the quoted sequence number. Only an existing flow is
/// written; a message quoting no flow of ours creates none.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the 44-byte key stays in this frame; a by-value key would be copied per call"
)]
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
    let stored = FLOWS.get_ptr_mut(&key)?;
    // SAFETY: a live map value; as in `track`, a concurrent update of the same flow can at worst
    // lose a state change of that flow.
    let mut st = unsafe { *stored };
    let actions = unreachable(&mut st, q.seq, now, config().handshake_timeout_ns);
    if actions.store {
        // SAFETY: as above.
        unsafe { *stored = st };
    }
    actions.outcome
}
