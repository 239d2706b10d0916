//! Frame parser: Ethernet (up to two VLAN tags) → IPv4/IPv6 (options, extension headers,
//! fragments) → TCP. Each layer is a small function reading through [`Frame`] only.
//!
//! Two steps, so that a packet of another port costs only header reads: [`locate`] validates
//! the headers and finds the TCP ports without copying anything, and [`segment`] reads the
//! rest (the addresses) once a port matched. An ICMP or ICMPv6 message is [`Skip::Icmp`], and
//! [`icmp::unreachable`] reads it again on its own path.
pub mod icmp;
mod ip;
mod tcp;

pub use tcp::Ports;

use smtpflow_common::{FAMILY_V4, FAMILY_V6};

use crate::packet::Frame;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags walked: 802.1Q, or 802.1ad + 802.1Q (QinQ).
const MAX_VLAN_TAGS: usize = 2;
const VLAN_HLEN: usize = 4;

/// Why a frame yields no TCP segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A header is invalid or runs past the end of the frame. Counted, never classified.
    Malformed,
    /// Not TCP, or a fragment without the TCP header: ignored.
    NotTcp,
    /// A valid TCP segment of ports nobody asked for: ignored.
    OtherPorts,
    /// An ICMP or ICMPv6 message (not a non-first fragment): ignored here, read by
    /// [`icmp::unreachable`].
    Icmp,
}

impl From<()> for Skip {
    /// A read past the end of the frame: the header being read is truncated.
    fn from((): ()) -> Self {
        Skip::Malformed
    }
}

/// A valid TCP segment's place in the frame and its TCP header's fields, as [`locate`] found
/// them.
#[derive(Clone, Copy)]
pub struct Located {
    pub family: u8,
    /// Offset of the IP header, where [`segment`] reads the addresses.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// The IP header's length field, raw ([`ip::end`]).
    pub ip_len: ip::RawLen,
    pub ports: tcp::Ports,
    /// What `wanted` said of the ports (never 0).
    pub wanted: u8,
}

impl Located {
    /// A placeholder for [`locate`] to overwrite.
    pub const EMPTY: Self = Self {
        family: 0,
        l3: 0,
        l4: 0,
        ip_len: 0,
        ports: tcp::Ports { src: 0, dst: 0, hlen: 0, flags: 0, window: 0 },
        wanted: 0,
    };
}

/// What the counters need from a TCP segment. Addresses are in network order; IPv4 addresses use
/// the first four bytes.
pub struct Segment {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
    pub window: u16,
    pub seq: u32,
    /// Offset of the TCP payload in the frame.
    pub payload_off: usize,
    /// Payload bytes, from the IP length (Ethernet padding excluded) and the frame length.
    pub payload_len: u32,
}

impl Segment {
    pub const EMPTY: Self = Self {
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        flags: 0,
        window: 0,
        seq: 0,
        payload_off: 0,
        payload_len: 0,
    };
}

/// Validates a frame from its Ethernet header down to the TCP header and, if `wanted` takes its
/// ports (says something other than 0 of them), says where the TCP segment is. A frame too
/// short for an Ethernet header, or of an ethertype that cannot lead to TCP, is not TCP (ARP
/// and the like cost one read). The ports are tested before anything is kept, so that a
/// segment of another port costs only reads.
#[inline(always)]
pub fn locate<P: Frame>(p: &P, wanted: impl Fn(&tcp::Ports) -> u8) -> Result<Located, Skip> {
    let (ethertype, off) = link(p)?;
    let (family, upper) = match ethertype {
        ETH_P_IP => (FAMILY_V4, ip::v4(p, off)?),
        ETH_P_IPV6 => (FAMILY_V6, ip::v6(p, off)?),
        _ => return Err(Skip::NotTcp),
    };
    let ports = tcp::header(p, upper.l4)?;
    let wanted = wanted(&ports);
    // Other ports marked likely: theirs is the path with the tightest budget (1.25× an empty
    // program), and the hint keeps it the straight one.
    if core::intrinsics::likely(wanted == 0) {
        return Err(Skip::OtherPorts);
    }
    Ok(Located { family, l3: off, l4: upper.l4, ip_len: upper.len, ports, wanted })
}

/// The Ethernet header and up to [`MAX_VLAN_TAGS`] tags: the ethertype they end in and the
/// offset of what it carries. Too short for an Ethernet header: not TCP.
#[inline(always)]
fn link<P: Frame>(p: &P) -> Result<(u16, usize), Skip> {
    let mut ethertype = u16::from_be(p.load::<u16>(ETH_HLEN - 2).map_err(|()| Skip::NotTcp)?);
    let mut off = ETH_HLEN;
    let is_tag = |ethertype| ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD;
    if is_tag(ethertype) {
        // A tag already stripped into metadata counts against the two.
        let in_frame = MAX_VLAN_TAGS - p.stripped_vlan_tags().min(MAX_VLAN_TAGS);
        for i in 0..MAX_VLAN_TAGS {
            if i >= in_frame || !is_tag(ethertype) {
                break;
            }
            // The tag is TCI (2 bytes) then the encapsulated ethertype (2 bytes).
            ethertype = u16::from_be(p.load::<u16>(off + 2)?);
            off += VLAN_HLEN;
        }
    }
    Ok((ethertype, off))
}

/// A located segment's payload: its offset and length (what [`segment`] records too). No read.
#[inline(always)]
pub fn payload<P: Frame>(p: &P, loc: &Located) -> (usize, usize) {
    let off = loc.l4 + loc.ports.hlen;
    (off, payload_len(p, ip::end(loc.family, loc.l3, loc.l4, loc.ip_len), off))
}

/// Payload bytes from `payload_off` to the end the IP header gives (`ip_end`; 0 when it gives
/// none: a TSO/BIG TCP super-packet, an IPv6 jumbogram), or to the frame's end if that comes
/// first: Ethernet padding is not payload.
#[inline(always)]
fn payload_len<P: Frame>(p: &P, ip_end: usize, payload_off: usize) -> usize {
    let frame_end = p.len();
    let end = if ip_end != 0 && ip_end < frame_end { ip_end } else { frame_end };
    end.saturating_sub(payload_off)
}

/// The whole segment of a located frame: its TCP fields and the IP addresses. Not inlined: the
/// addresses are copied in its own BPF stack frame.
#[inline(never)]
pub fn segment<P: Frame>(p: &P, loc: &Located, seg: &mut Segment) -> Result<(), ()> {
    let Located { family, l3, l4, ports, .. } = *loc;
    if family == FAMILY_V4 {
        let [src, dst] = ip::v4_addresses(p, l3)?;
        seg.src[..4].copy_from_slice(&src);
        seg.dst[..4].copy_from_slice(&dst);
    } else {
        [seg.src, seg.dst] = ip::v6_addresses(p, l3)?;
    }
    seg.seq = tcp::seq(p, l4)?;
    seg.family = family;
    seg.src_port = ports.src;
    seg.dst_port = ports.dst;
    seg.flags = ports.flags;
    seg.window = ports.window;
    let (payload_off, payload_len) = payload(p, loc);
    seg.payload_off = payload_off;
    seg.payload_len = payload_len as u32;
    Ok(())
}
