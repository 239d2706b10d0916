//! TCP header: [`header`] validates it and reads the ports, flags and window (data offset < 5
//! or a header past the end is malformed); [`seq`] reads the sequence number; [`quoted`] reads
//! the 8 bytes of a header an ICMP error quotes.
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

/// A valid TCP header: its ports (host order), length, flags and window (host order).
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
    pub hlen: usize,
    pub flags: u8,
    pub window: u16,
}

#[inline(always)]
pub fn header<P: Frame>(p: &P, off: usize) -> Result<Ports, Skip> {
    let h = p.header::<TCP_MIN_HLEN>(off)?;
    // Both ports in one load: the source port is the first two bytes.
    let [s0, s1, d0, d1] = h.get::<u32>(offset_of!(TcpHdr, src_port)).to_le_bytes();
    // Data offset, flags and window in one load too: what the quiet test of a transfer's
    // segments needs costs no read of its own.
    let [doff, flags, w0, w1] = h.get::<u32>(offset_of!(TcpHdr, doff)).to_le_bytes();
    let hlen = usize::from(doff >> 4) * 4;
    if hlen < TCP_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    if hlen > TCP_MIN_HLEN {
        // The options must be inside the frame too.
        p.load::<u8>(off + hlen - 1)?;
    }
    Ok(Ports {
        src: u16::from_be_bytes([s0, s1]),
        dst: u16::from_be_bytes([d0, d1]),
        hlen,
        flags,
        window: u16::from_be_bytes([w0, w1]),
    })
}

const _: () = assert!(
    offset_of!(TcpHdr, flags) == offset_of!(TcpHdr, doff) + 1
        && offset_of!(TcpHdr, window) == offset_of!(TcpHdr, doff) + 2
);

/// The sequence number (host order) of the header at `off` (which [`header`] validated).
#[inline(always)]
pub fn seq<P: Frame>(p: &P, off: usize) -> Result<u32, ()> {
    Ok(u32::from_be(p.load(off + offset_of!(TcpHdr, seq))?))
}

/// The first 8 bytes of a TCP header quoted by an ICMP error (all RFC 792 requires): the
/// source and destination ports and the sequence number, in host order. Nothing else of the
/// header is read.
#[inline(always)]
pub fn quoted<P: Frame>(p: &P, off: usize) -> Result<([u16; 2], u32), ()> {
    let [s0, s1, d0, d1] = p.load::<u32>(off + offset_of!(TcpHdr, src_port))?.to_le_bytes();
    let ports = [u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1])];
    Ok((ports, seq(p, off)?))
}
