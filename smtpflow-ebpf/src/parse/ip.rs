//! IPv4 and IPv6 headers: [`v4`] and [`v6`] validate a header and return the offset of the TCP
//! header; the `*_addresses` and `*_end` functions read the rest once the port matched.
//! [`v4_upper`] and [`v6_upper`] are the validation itself, for any protocol: the ICMP parser
//! reads the outer header and the quoted one with them. A fixed
//! header is bounds-checked once, then its fields read at their offsets in the header structs.
use core::mem::offset_of;

use smtpflow_common::icmp::{IPPROTO_ICMP, IPPROTO_ICMPV6};

use super::Skip;
use crate::packet::{Fields as _, Frame};

/// Where the IP layer says the TCP header starts.
pub type L4 = usize;

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
pub fn v4<P: Frame>(p: &P, off: usize) -> Result<L4, Skip> {
    let (protocol, l4) = v4_upper(p, off)?;
    upper(protocol, l4, IPPROTO_ICMP)
}

/// TCP at `l4`, or why not: `icmp` (the family's ICMP) is [`Skip::Icmp`]. TCP is tested first
/// and marked likely, so that the ICMP test costs a TCP segment nothing.
#[inline(always)]
fn upper(protocol: u8, l4: L4, icmp: u8) -> Result<L4, Skip> {
    if core::intrinsics::likely(protocol == IPPROTO_TCP) {
        return Ok(l4);
    }
    Err(if protocol == icmp { Skip::Icmp } else { Skip::NotTcp })
}

/// The IPv4 header at `off` validated as [`v4`] says: its protocol and the offset of what it
/// carries. A non-first fragment carries no header: not TCP.
#[inline(always)]
pub fn v4_upper<P: Frame>(p: &P, off: usize) -> Result<(u8, L4), Skip> {
    let h = p.header::<IPV4_MIN_HLEN>(off)?;
    let ver_ihl: u8 = h.get(offset_of!(Ipv4Hdr, ver_ihl));
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
    Ok((h.get(offset_of!(Ipv4Hdr, protocol)), off + hlen))
}

/// IPv6: walks hop-by-hop, routing, destination-options and fragment headers; only a first
/// fragment carries the TCP header (ICMPv6 is [`Skip::Icmp`]).
#[inline(always)]
pub fn v6<P: Frame>(p: &P, off: usize) -> Result<L4, Skip> {
    let (next, l4) = v6_upper(p, off)?;
    upper(next, l4, IPPROTO_ICMPV6)
}

/// The IPv6 header at `off` and its extension headers, walked as [`v6`] says: the next header
/// after them and its offset. A non-first fragment, a chain too long or too deep: not TCP.
#[inline(always)]
pub fn v6_upper<P: Frame>(p: &P, off: usize) -> Result<(u8, L4), Skip> {
    let h = p.header::<IPV6_HLEN>(off)?;
    let version: u8 = h.get(offset_of!(Ipv6Hdr, ver_tc_flow));
    if version >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let mut next: u8 = h.get(offset_of!(Ipv6Hdr, next_header));
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
            _ => return Ok((next, off)),
        }
        if off > MAX_L4_OFFSET {
            // Deeper than we inspect: not a header chain SMTP traffic uses.
            return Err(Skip::NotTcp);
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => Err(Skip::NotTcp),
        _ => Ok((next, off)),
    }
}

/// Source and destination of the IPv4 header at `off` (which [`v4`] validated).
#[inline(always)]
pub fn v4_addresses<P: Frame>(p: &P, off: usize) -> Result<[[u8; 4]; 2], ()> {
    p.read_at(off + offset_of!(Ipv4Hdr, src))
}

/// Source and destination of the IPv6 header at `off` (which [`v6`] validated).
#[inline(always)]
pub fn v6_addresses<P: Frame>(p: &P, off: usize) -> Result<[[u8; 16]; 2], ()> {
    p.read_at(off + offset_of!(Ipv6Hdr, src))
}

/// End of the IPv4 packet whose header is at `off` and `hlen` long; 0 when the header gives no
/// length (a TSO/BIG TCP super-packet): the frame's end counts then.
#[inline(always)]
pub fn v4_end<P: Frame>(p: &P, off: usize, hlen: usize) -> Result<usize, ()> {
    let total = usize::from(u16::from_be(p.load(off + offset_of!(Ipv4Hdr, tot_len))?));
    Ok(if total > hlen { off + total } else { 0 })
}

/// End of the IPv6 packet whose header is at `off`; 0 for an IPv6 jumbogram (no length).
#[inline(always)]
pub fn v6_end<P: Frame>(p: &P, off: usize) -> Result<usize, ()> {
    let payload = usize::from(u16::from_be(p.load(off + offset_of!(Ipv6Hdr, payload_len))?));
    Ok(if payload > 0 { off + IPV6_HLEN + payload } else { 0 })
}
