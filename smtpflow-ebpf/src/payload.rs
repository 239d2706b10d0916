//! Payload events: the segment's first bytes, copied into the `PAYLOADS` ring buffer when the
//! flow state machine asks for them ([`smtpflow_common::flow::Actions::payload`]). The kernel
//! only copies; userspace parses.
use smtpflow_common::{
    PeerKey, Stat,
    payload::{PAYLOAD_BYTES, PayloadEvent, PayloadKind},
};

use crate::{
    maps::{PAYLOADS, failed},
    packet::{Packet, opaque},
    parse::Segment,
};

/// Reserves a record, fills it with the segment's peer and at most [`PAYLOAD_BYTES`] of its
/// payload, and submits it; a full ring buffer loses the event, counted. Its own subprogram,
/// called beside the flow's steps (not from them), so that its frame is not added to theirs.
/// The record is written in place: nothing of its 544 bytes is on the stack.
#[inline(never)]
pub fn emit<P: Packet>(p: &P, seg: &Segment, peer: &PeerKey, kind: PayloadKind) {
    let Some(mut entry) = PAYLOADS.reserve::<PayloadEvent>(0) else {
        return failed(Stat::PayloadsLost, 0);
    };
    let ev = entry.as_mut_ptr();
    let payload_len = seg.payload_len;
    let want = payload_len.clamp(1, PAYLOAD_BYTES as u32) as usize;
    // 1 to PAYLOAD_BYTES with no branch the verifier must follow: the helper needs a length of
    // at least 1, bounded by the record's buffer.
    let len = ((opaque(want) - 1) & (PAYLOAD_BYTES - 1)) + 1;
    // SAFETY: `ev` points to a reserved record of `size_of::<PayloadEvent>()` bytes; `len` is
    // at most the size of its `bytes`.
    unsafe {
        (*ev).peer = *peer;
        (*ev).kind = kind as u8;
        (*ev)._pad = 0;
        (*ev).payload_len = payload_len;
        let copied =
            p.copy_bytes(seg.payload_off as u32, (&raw mut (*ev).bytes).cast(), len as u32);
        (*ev).len = if copied.is_ok() { len as u16 } else { 0 };
    }
    entry.submit(0);
}
