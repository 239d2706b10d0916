//! One SMTP connection attempt's entry in the flow map, advanced by the state machine in
//! `smtpflow_common::flow::step`. Userspace's sweep counts the attempts that got no answer in
//! time and deletes idle entries; it never writes one.
use aya_ebpf::bindings::BPF_NOEXIST;
use smtpflow_common::{
    Direction, FlowKey, Stat,
    flow::{Actions, FlowPacket, step},
    reply::HEAD_LEN,
};

use crate::{
    maps::{FLOWS, bump, config},
    packet::Packet,
    parse::Segment,
};

/// Where a packet belongs: what `track` needs besides the segment (one argument, as BPF calls
/// take at most five).
#[derive(Clone, Copy)]
pub struct Where {
    pub ifindex: u32,
    pub direction: Direction,
    pub sender_is_client: bool,
    /// Replies on this port are read.
    pub plaintext: bool,
    pub now: u64,
}

/// Reads what the state machine needs from the payload: its first bytes (a reply code with
/// its enhanced status, or STARTTLS) and whether it ends a line.
///
/// Up to [`HEAD_LEN`] bytes: 16 in one read when the payload has them; a shorter payload of 8
/// or more is read as its first 8 and its last 8 bytes (overlapping), the tail shifted into
/// place, so that a short `451 4.7.1\r\n` is read whole; under 8, its first 4.
#[inline(always)]
fn read_payload<P: Packet>(p: &P, seg: &Segment, fp: &mut FlowPacket, from_server: bool) {
    let len = seg.payload_len as usize;
    if len >= HEAD_LEN {
        if let Ok(head) = p.read_at::<[u8; HEAD_LEN]>(seg.payload_off) {
            fp.head = head;
            fp.head_len = HEAD_LEN as u8;
        }
    } else if len >= 8 {
        if let Ok(first) = p.read_at::<[u8; 8]>(seg.payload_off) {
            fp.head[..8].copy_from_slice(&first);
            fp.head_len = 8;
            // Bytes 8..len: the last 8 bytes hold them at their end.
            if len > 8
                && let Ok(last) = p.read_at::<[u8; 8]>(seg.payload_off + len - 8)
            {
                let tail = u64::from_le_bytes(last) >> (8 * (HEAD_LEN - len));
                fp.head[8..].copy_from_slice(&tail.to_le_bytes());
                fp.head_len = len as u8;
            }
        }
    } else if len >= 4
        && let Ok(head) = p.read_at::<[u8; 4]>(seg.payload_off)
    {
        fp.head[..4].copy_from_slice(&head);
        fp.head_len = 4;
    }
    if from_server && len > 0 {
        // The last byte, read as the second of two: a used one-byte packet read lets LLVM turn
        // `p + 1 > end` into `p >= end`, which gives the verifier no range. The byte before the
        // payload always exists (the TCP header's last). Unreadable (past what we inspect):
        // assume the segment ended a line, as SMTP replies do.
        fp.ends_line =
            p.read_at::<[u8; 2]>(seg.payload_off + len - 2).map_or(true, |[_, last]| last == b'\n');
    }
}

/// Advances the packet's flow and returns what to count. Not inlined: a BPF subprogram has its
/// own 512-byte stack frame.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the 44-byte key stays in this frame; a by-value key would be copied per call"
)]
pub fn track<P: Packet>(p: &P, seg: &Segment, at: &Where) -> Actions {
    let Where { ifindex, direction, sender_is_client, plaintext, now } = *at;
    let (client, server, client_port, server_port) = if sender_is_client {
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
    let mut fp = FlowPacket {
        flags: seg.flags,
        from_client: sender_is_client,
        seq: seg.seq,
        payload_len: seg.payload_len,
        ends_line: true,
        plaintext,
        ingress_only: P::INGRESS_ONLY,
        ..FlowPacket::default()
    };
    if plaintext && seg.payload_len > 0 {
        read_payload(p, seg, &mut fp, !sender_is_client);
    }

    let stored = FLOWS.get_ptr_mut(&key);
    // SAFETY: a live map value; concurrent updates of one flow from two CPUs can at worst lose
    // a state change of that flow, never a count in the exact counters.
    let mut st = stored.map(|s| unsafe { *s }).unwrap_or_default();
    let actions = step(&mut st, stored.is_some(), &fp, now, config().handshake_timeout_ns);
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
                Err(_) => bump(Stat::FlowInsertFailed),
            },
        }
    }
    actions
}
