//! IPv4 and IPv6 headers. Both return the offset of the TCP header.
use super::{Segment, Skip};
use crate::packet::Packet;

/// Where the IP layer says the TCP header starts and where the IP packet ends.
pub struct L4 {
    pub off: usize,
    /// End of the IP packet in the frame; 0 when the IP header gives no length (a TSO/BIG TCP
    /// super-packet, or an IPv6 jumbogram): the frame's end counts then.
    pub end: usize,
}

/// How deep a TCP header may start; deeper extension-header chains are not inspected.
const MAX_L4_OFFSET: usize = 1024;

const IPPROTO_TCP: u8 = 6;
const IPV4_MIN_HLEN: usize = 20;
/// Fragment offset bits of the IPv4 flags/fragment field.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (hop-by-hop, routing, destination options and
/// fragment can each appear; 8 leaves room for repeats).
const MAX_EXT_HEADERS: usize = 8;

/// The fixed IPv4 header. Read whole before anything else, so that the verifier knows all of it
/// is inside the packet (a check on the options' end alone would let LLVM drop the checks it
/// implies, which the verifier cannot follow).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

/// The fixed IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_tc_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_MIN_HLEN && size_of::<Ipv6Hdr>() == IPV6_HLEN);

/// IPv4: IHL < 5 or a header past the end of the frame is malformed; non-first fragments and
/// other protocols are not TCP.
#[inline(always)]
pub fn v4<P: Packet>(p: &P, off: usize, seg: &mut Segment) -> Result<L4, Skip> {
    let h: Ipv4Hdr = p.read_at(off)?;
    let hlen = usize::from(h.ver_ihl & 0x0f) * 4;
    if h.ver_ihl >> 4 != 4 || hlen < IPV4_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    // The whole header, options included, must be inside the frame.
    p.read_at::<u8>(off + hlen - 1)?;
    if u16::from_be(h.frag_off) & IPV4_FRAG_OFFSET_MASK != 0 || h.protocol != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    seg.src[..4].copy_from_slice(&h.src);
    seg.dst[..4].copy_from_slice(&h.dst);
    let total = usize::from(u16::from_be(h.tot_len));
    Ok(L4 { off: off + hlen, end: if total > hlen { off + total } else { 0 } })
}

/// IPv6: walks hop-by-hop, routing, destination-options and fragment headers; only a first
/// fragment carries the TCP header.
#[inline(always)]
pub fn v6<P: Packet>(p: &P, off: usize, seg: &mut Segment) -> Result<L4, Skip> {
    let h: Ipv6Hdr = p.read_at(off)?;
    if h.ver_tc_flow[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let mut next = h.next_header;
    seg.src = h.src;
    seg.dst = h.dst;
    let payload = usize::from(u16::from_be(h.payload_len));
    let end = if payload > 0 { off + IPV6_HLEN + payload } else { 0 };
    let mut off = off + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Ok(L4 { off, end }),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [nh, len]: [u8; 2] = p.read_at(off)?;
                next = nh;
                off += (usize::from(len) + 1) * 8;
                // The whole header must be inside the frame, as IPv4 and TCP options must.
                p.read_at::<u8>(off - 1)?;
            }
            NEXTHDR_FRAGMENT => {
                // The fragment header is 8 bytes, all inside the frame.
                let [nh, _reserved, frag_hi, frag_lo, ..]: [u8; 8] = p.read_at(off)?;
                if u16::from_be_bytes([frag_hi, frag_lo]) >> 3 != 0 {
                    return Err(Skip::NotTcp);
                }
                next = nh;
                off += 8;
            }
            _ => return Err(Skip::NotTcp),
        }
        if off > MAX_L4_OFFSET {
            // Deeper than we inspect: not a header chain SMTP traffic uses.
            return Err(Skip::NotTcp);
        }
    }
    if next == IPPROTO_TCP { Ok(L4 { off, end }) } else { Err(Skip::NotTcp) }
}
