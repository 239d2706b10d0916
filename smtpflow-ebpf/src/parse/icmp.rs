//! ICMP and ICMPv6 destination unreachable: the message's type and code, and the IP and TCP
//! headers it quotes. The cold path: only frames [`super::locate`] found to be ICMP come here,
//! and it reads them again from the Ethernet header, through the same layer functions.
//!
//! The quoted packet is read as the outer one is (IPv4 options, IPv6 extension headers, each
//! bounds-checked), then only the first 8 bytes of its TCP header: the ports and the sequence
//! number, all an ICMP error must quote (RFC 792). Anything short, invalid, or not a
//! destination unreachable quoting TCP is ignored: never counted as malformed, since the
//! contract's malformed frames are about the frames it counts events of.
pub use smtpflow_common::icmp::Quoted;
use smtpflow_common::{
    FAMILY_V4, FAMILY_V6,
    icmp::{self, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6},
};

use super::{ETH_P_IP, ETH_P_IPV6, ip, link, tcp};
use crate::packet::Frame;

const IPPROTO_TCP: u8 = 6;

/// Reads a destination unreachable quoting a TCP segment into `q`; `Err` for any other frame.
/// Not inlined: its own BPF subprogram, with the quoted addresses in its own stack frame.
#[inline(never)]
pub fn unreachable<P: Frame>(p: &P, q: &mut Quoted) -> Result<(), ()> {
    let (ethertype, l3) = link(p).map_err(|_| ())?;
    let (family, l4) = match ethertype {
        ETH_P_IP => match ip::v4_upper(p, l3) {
            Ok(ip::Upper { protocol: IPPROTO_ICMP, l4, .. }) => (FAMILY_V4, l4),
            _ => return Err(()),
        },
        ETH_P_IPV6 => match ip::v6_upper(p, l3) {
            Ok(ip::Upper { protocol: IPPROTO_ICMPV6, l4, .. }) => (FAMILY_V6, l4),
            _ => return Err(()),
        },
        _ => return Err(()),
    };
    // Type, then code.
    let [kind, code] = p.load::<u16>(l4)?.to_le_bytes();
    q.reason = icmp::reason(family, kind, code).ok_or(())?;
    let inner = l4 + ICMP_HLEN;
    let th = if family == FAMILY_V4 {
        let ip::Upper { protocol: IPPROTO_TCP, l4: th, .. } =
            ip::v4_upper(p, inner).map_err(|_| ())?
        else {
            return Err(());
        };
        let [src, dst] = ip::v4_addresses(p, inner)?;
        q.src[..4].copy_from_slice(&src);
        q.dst[..4].copy_from_slice(&dst);
        th
    } else {
        let ip::Upper { protocol: IPPROTO_TCP, l4: th, .. } =
            ip::v6_upper(p, inner).map_err(|_| ())?
        else {
            return Err(());
        };
        [q.src, q.dst] = ip::v6_addresses(p, inner)?;
        th
    };
    if th > ip::MAX_L4_OFFSET {
        // As for a TCP header of the frame itself: deeper is not inspected.
        return Err(());
    }
    let ([src_port, dst_port], seq) = tcp::quoted(p, th)?;
    q.family = family;
    q.src_port = src_port;
    q.dst_port = dst_port;
    q.seq = seq;
    Ok(())
}
