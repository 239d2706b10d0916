//! Frame parser: Ethernet (up to two VLAN tags) → IPv4/IPv6 (options, extension headers,
//! fragments) → TCP. Each layer is a small function reading through [`Packet`] only.
mod ip;
mod tcp;

use smtpflow_common::FAMILY_V4;

use crate::packet::Packet;

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
}

impl From<()> for Skip {
    /// A read past the end of the frame: the header being read is truncated.
    fn from((): ()) -> Self {
        Skip::Malformed
    }
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
    pub const fn new(family: u8) -> Self {
        Self {
            family,
            src: [0; 16],
            dst: [0; 16],
            src_port: 0,
            dst_port: 0,
            flags: 0,
            window: 0,
            seq: 0,
            payload_off: 0,
            payload_len: 0,
        }
    }
}

/// Whether the frame's ethertype can lead to TCP at all: the cheap first test of every packet,
/// made before any per-packet state is built (ARP and the like cost one read).
#[inline(always)]
pub fn may_carry_tcp<P: Packet>(p: &P) -> bool {
    p.read_at::<u16>(ETH_HLEN - 2).is_ok_and(|et| {
        matches!(u16::from_be(et), ETH_P_IP | ETH_P_IPV6 | ETH_P_8021Q | ETH_P_8021AD)
    })
}

/// Parses a frame from its Ethernet header down to the TCP header. Not inlined: its header copies
/// live in their own BPF stack frame, beside (not on top of) the flow tracker's.
#[inline(never)]
pub fn parse<P: Packet>(p: &P, seg: &mut Segment) -> Result<(), Skip> {
    let mut ethertype = u16::from_be(p.read_at::<u16>(ETH_HLEN - 2)?);
    let mut off = ETH_HLEN;
    // A tag already stripped into metadata counts against the two.
    let in_frame = MAX_VLAN_TAGS - p.stripped_vlan_tags().min(MAX_VLAN_TAGS);
    for i in 0..MAX_VLAN_TAGS {
        if i >= in_frame || (ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD) {
            break;
        }
        // The tag is TCI (2 bytes) then the encapsulated ethertype (2 bytes).
        ethertype = u16::from_be(p.read_at::<u16>(off + 2)?);
        off += VLAN_HLEN;
    }
    let l4 = match ethertype {
        ETH_P_IP => {
            seg.family = FAMILY_V4;
            ip::v4(p, off, seg)?
        }
        ETH_P_IPV6 => {
            seg.family = smtpflow_common::FAMILY_V6;
            ip::v6(p, off, seg)?
        }
        _ => return Err(Skip::NotTcp),
    };
    tcp::header(p, l4, seg)
}
