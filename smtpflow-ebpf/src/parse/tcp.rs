//! TCP header: [`header`] validates it and reads the ports (data offset < 5 or a header past
//! the end is malformed); [`rest`] reads the flags, window and sequence number; [`quoted`]
//! reads the 8 bytes of a header an ICMP error quotes.
use core::mem::offset_of;

use super::Skip;
use crate::packet::{Fields as _, Frame};

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

/// A valid TCP header: its ports (host order) and length.
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
    pub hlen: usize,
}

/// The fields read once the port matched, in host order.
pub struct Rest {
    pub flags: u8,
    pub window: u16,
    pub seq: u32,
}

#[inline(always)]
pub fn header<P: Frame>(p: &P, off: usize) -> Result<Ports, Skip> {
    let h = p.header::<TCP_MIN_HLEN>(off)?;
    // Both ports in one load: the source port is the first two bytes.
    let [s0, s1, d0, d1] = h.get::<u32>(offset_of!(TcpHdr, src_port)).to_le_bytes();
    let doff: u8 = h.get(offset_of!(TcpHdr, doff));
    let hlen = usize::from(doff >> 4) * 4;
    if hlen < TCP_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    if hlen > TCP_MIN_HLEN {
        // The options must be inside the frame too.
        p.load::<u8>(off + hlen - 1)?;
    }
    Ok(Ports { src: u16::from_be_bytes([s0, s1]), dst: u16::from_be_bytes([d0, d1]), hlen })
}

/// Offsets of the flags and window in a TCP header (read by [`rest`], and by the quiet test
/// of `parse::header`).
pub const FLAGS_OFFSET: usize = offset_of!(TcpHdr, flags);
pub const WINDOW_OFFSET: usize = offset_of!(TcpHdr, window);

/// The flags, window and sequence number of the header at `off` (which [`header`] validated).
#[inline(always)]
pub fn rest<P: Frame>(p: &P, off: usize) -> Result<Rest, ()> {
    Ok(Rest {
        flags: p.load(off + FLAGS_OFFSET)?,
        window: u16::from_be(p.load(off + WINDOW_OFFSET)?),
        seq: u32::from_be(p.load(off + offset_of!(TcpHdr, seq))?),
    })
}

/// The first 8 bytes of a TCP header quoted by an ICMP error (all RFC 792 requires): the
/// ports and the sequence number, in host order. Nothing else of the header is read.
#[inline(always)]
pub fn quoted<P: Frame>(p: &P, off: usize) -> Result<(Ports, u32), ()> {
    let [s0, s1, d0, d1] = p.load::<u32>(off + offset_of!(TcpHdr, src_port))?.to_le_bytes();
    let seq = u32::from_be(p.load(off + offset_of!(TcpHdr, seq))?);
    let ports =
        Ports { src: u16::from_be_bytes([s0, s1]), dst: u16::from_be_bytes([d0, d1]), hlen: 0 };
    Ok((ports, seq))
}
