//! TCP header: ports, flags and window. Data offset < 5 or a header past the end is malformed.
use super::{Segment, Skip, ip::L4};
use crate::packet::Packet;

const TCP_MIN_HLEN: usize = 20;

/// The fixed part of the TCP header, as it lies on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack_seq: u32,
    /// Data offset in the high nibble.
    doff: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg_ptr: u16,
}

const _: () = assert!(size_of::<TcpHdr>() == TCP_MIN_HLEN);

#[inline(always)]
pub fn header<P: Packet>(p: &P, l4: L4, seg: &mut Segment) -> Result<(), Skip> {
    let off = l4.off;
    let h: TcpHdr = p.read_at(off)?;
    let hlen = usize::from(h.doff >> 4) * 4;
    if hlen < TCP_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    // Options included, the whole header must be inside the frame.
    p.read_at::<u8>(off + hlen - 1)?;
    seg.src_port = u16::from_be(h.src_port);
    seg.dst_port = u16::from_be(h.dst_port);
    seg.flags = h.flags;
    seg.window = u16::from_be(h.window);
    seg.seq = u32::from_be(h.seq);
    seg.payload_off = off + hlen;
    let frame_end = p.len();
    let end = if l4.end != 0 && l4.end < frame_end { l4.end } else { frame_end };
    seg.payload_len = end.saturating_sub(seg.payload_off) as u32;
    Ok(())
}
