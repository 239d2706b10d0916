//! IPv4 and IPv6 headers: [`v4`] and [`v6`] validate a header and return the offset of the TCP
//! header and the header's length field ([`end`] turns it into the packet's end); the
//! `*_addresses` functions read the addresses once the port matched.
//! [`v4_upper`] and [`v6_upper`] are the validation itself, for any protocol: the ICMP parser
//! reads the outer header and the quoted one with them. A fixed
//! header is bounds-checked once, then its fields read at their offsets in the header structs.
use core::mem::offset_of;

use smtpflow_common::{
    FAMILY_V4,
    icmp::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};

use super::Skip;
use crate::packet::{Fields as _, Frame};

/// Where the IP layer says the TCP header starts.
pub type L4 = usize;

/// What a validated IP header says of what it carries: its protocol, where it starts, and its
/// length field as it lies in the header ([`end`] makes it an offset). The length is read in
/// the same load as a field the validation reads anyway, and left raw: no load and no
/// arithmetic of its own before the port test.
#[derive(Clone, Copy)]
pub struct Upper {
    pub protocol: u8,
    pub l4: L4,
    pub len: RawLen,
}

/// An IP header's length field in network order: IPv4's total length, IPv6's payload length.
pub type RawLen = u16;

/// Where the packet whose IP header of `family` is at `l3` (and its TCP header at `l4`) ends,
/// by its length field `len`; 0 when the header gives no length (a TSO/BIG TCP super-packet, an
/// IPv6 jumbogram): the frame's end counts then.
#[inline(always)]
pub fn end(family: u8, l3: usize, l4: L4, len: RawLen) -> usize {
    let len = usize::from(u16::from_be(len));
    if family == FAMILY_V4 {
        if len > l4 - l3 { l3 + len } else { 0 }
    } else if len > 0 {
        l3 + IPV6_HLEN + len
    } else {
        0
    }
}

/// How deep a TCP header may start; deeper extension-header chains are not inspected.
pub const MAX_L4_OFFSET: usize = 1024;

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

/// The fixed IPv4 header.
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

/// IPv4: IHL < 5 or a header (options included) past the end of the frame is malformed;
/// non-first fragments and other protocols are not TCP (ICMP is [`Skip::Icmp`]).
#[inline(always)]
pub fn v4<P: Frame>(p: &P, off: usize) -> Result<Upper, Skip> {
    tcp_or_why(v4_upper(p, off)?, IPPROTO_ICMP)
}

/// TCP at `l4`, or why not: `icmp` (the family's ICMP) is [`Skip::Icmp`]. TCP is tested first
/// and marked likely, so that the ICMP test costs a TCP segment nothing.
#[inline(always)]
fn tcp_or_why(upper: Upper, icmp: u8) -> Result<Upper, Skip> {
    if core::intrinsics::likely(upper.protocol == IPPROTO_TCP) {
        return Ok(upper);
    }
    Err(if upper.protocol == icmp { Skip::Icmp } else { Skip::NotTcp })
}

/// The IPv4 header at `off` validated as [`v4`] says: its protocol, the offset of what it
/// carries and its total length. A non-first fragment carries no header: not TCP.
#[inline(always)]
pub fn v4_upper<P: Frame>(p: &P, off: usize) -> Result<Upper, Skip> {
    let h = p.header::<IPV4_MIN_HLEN>(off)?;
    // Version and IHL, TOS, total length: one load.
    let [ver_ihl, _tos, t0, t1] = h.get::<u32>(offset_of!(Ipv4Hdr, ver_ihl)).to_le_bytes();
    let hlen = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || hlen < IPV4_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    if hlen > IPV4_MIN_HLEN {
        // The options must be inside the frame too.
        p.load::<u8>(off + hlen - 1)?;
    }
    let frag_off = u16::from_be(h.get(offset_of!(Ipv4Hdr, frag_off)));
    if frag_off & IPV4_FRAG_OFFSET_MASK != 0 {
        return Err(Skip::NotTcp);
    }
    Ok(Upper {
        protocol: h.get(offset_of!(Ipv4Hdr, protocol)),
        l4: off + hlen,
        len: u16::from_ne_bytes([t0, t1]),
    })
}

/// IPv6: walks hop-by-hop, routing, destination-options and fragment headers; only a first
/// fragment carries the TCP header (ICMPv6 is [`Skip::Icmp`]).
#[inline(always)]
pub fn v6<P: Frame>(p: &P, off: usize) -> Result<Upper, Skip> {
    tcp_or_why(v6_upper(p, off)?, IPPROTO_ICMPV6)
}

/// The IPv6 header at `off` and its extension headers, walked as [`v6`] says: the next header
/// after them, its offset and the header's payload length. A non-first fragment, a chain too
/// long or too deep: not TCP.
#[inline(always)]
pub fn v6_upper<P: Frame>(p: &P, off: usize) -> Result<Upper, Skip> {
    let h = p.header::<IPV6_HLEN>(off)?;
    let version: u8 = h.get(offset_of!(Ipv6Hdr, ver_tc_flow));
    if version >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    // Payload length, next header, hop limit: one load.
    let [l0, l1, mut next, _hop_limit] =
        h.get::<u32>(offset_of!(Ipv6Hdr, payload_len)).to_le_bytes();
    let len = u16::from_ne_bytes([l0, l1]);
    let mut off = off + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Next header, then the length in 8-byte units after the first 8.
                let [nh, len] = p.load::<u16>(off)?.to_le_bytes();
                next = nh;
                off += (usize::from(len) + 1) * 8;
                // The whole header must be inside the frame, as IPv4 and TCP options must.
                p.load::<u8>(off - 1)?;
            }
            NEXTHDR_FRAGMENT => {
                // Next header, reserved, then the offset in its top 13 bits; all 8 bytes of the
                // header inside the frame.
                let [nh, _reserved, frag_hi, frag_lo, ..] = p.load::<u64>(off)?.to_le_bytes();
                if u16::from_be_bytes([frag_hi, frag_lo]) >> 3 != 0 {
                    return Err(Skip::NotTcp);
                }
                next = nh;
                off += 8;
            }
            _ => return Ok(Upper { protocol: next, l4: off, len }),
        }
        if off > MAX_L4_OFFSET {
            // Deeper than we inspect: not a header chain SMTP traffic uses.
            return Err(Skip::NotTcp);
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => Err(Skip::NotTcp),
        _ => Ok(Upper { protocol: next, l4: off, len }),
    }
}

/// Source and destination of the IPv4 header at `off` (which [`v4`] validated): one bounds
/// check and a 32-bit load each (read as bytes, LLVM would load them one at a time, the address
/// being unaligned).
#[inline(always)]
pub fn v4_addresses<P: Frame>(p: &P, off: usize) -> Result<[[u8; 4]; 2], ()> {
    let h = p.header::<8>(off + offset_of!(Ipv4Hdr, src))?;
    Ok([h.get::<u32>(0).to_ne_bytes(), h.get::<u32>(4).to_ne_bytes()])
}

/// Source and destination of the IPv6 header at `off` (which [`v6`] validated): one bounds
/// check and two 64-bit loads each.
#[inline(always)]
pub fn v6_addresses<P: Frame>(p: &P, off: usize) -> Result<[[u8; 16]; 2], ()> {
    let h = p.header::<32>(off + offset_of!(Ipv6Hdr, src))?;
    let address = |at: usize| {
        let [hi, lo] = [h.get::<u64>(at).to_ne_bytes(), h.get::<u64>(at + 8).to_ne_bytes()];
        let mut a = [0; 16];
        a[..8].copy_from_slice(&hi);
        a[8..].copy_from_slice(&lo);
        a
    };
    Ok([address(0), address(16)])
}
