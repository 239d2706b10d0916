//! A reference frame classifier: the README's event contract ("The event contract" and its
//! parsing rules) in plain Rust, over a byte slice.
//!
//! It is written apart from the kernel parser (`smtpflow-ebpf/src/parse`) on purpose: the
//! differential fuzz test (`smtpflow/tests/fuzz_kernel.rs`) runs the real programs on millions of
//! hostile frames and checks that every frame changes the kernel's counters exactly as this
//! module says. It favours plainness over speed and is never used on the hot path.
//!
//! How the contract reads here, layer by layer (every "past the end" means past the end of the
//! frame: lengths inside the headers, such as the IPv4 total length, never bound a header):
//!
//! - Ethernet: 14 bytes, or the frame is malformed. Then at most two VLAN tags (TPID 0x8100 or
//!   0x88a8, four bytes each, the encapsulated ethertype in the last two); a tag running past the
//!   end is malformed. A tag the kernel already moved into metadata (`stripped_tags`: at TC
//!   ingress the outer tag is taken out of the frame) counts against the two. A frame still
//!   tagged after that is ignored, as is any ethertype other than IPv4 and IPv6.
//! - IPv4: the 20-byte header past the end, a version nibble other than 4, IHL < 5, or options
//!   past the end: malformed (whatever the protocol). A non-first fragment (offset ≠ 0) or a
//!   protocol other than TCP: ignored.
//! - IPv6: the 40-byte header past the end or a version nibble other than 6: malformed. The
//!   chain of hop-by-hop (0), routing (43), destination-options (60) and fragment (44) headers is
//!   walked, at most 8 of them; each must lie wholly inside the frame, or the frame is malformed.
//!   A non-first fragment, a ninth extension header, or any other next header (59 "no next
//!   header" included): ignored.
//! - Depth: nothing that starts more than [`MAX_L4_OFFSET`] bytes into the frame is inspected:
//!   such a TCP header (or an extension header leading to one) is ignored. A header that starts
//!   at or before that offset is read whole, even when it ends past it.
//! - TCP: the 20-byte header past the end, data offset < 5, or options past the end: malformed.
//!
//! A TCP header then yields at most one event by [`classify`], on the SMTP port [`smtp_port`]
//! picks, in the direction [`direction_of`] gives; the peer is the source address when the
//! packet was sent by the peer (ingress), the destination when sent by the local host (egress).
use crate::{
    Counter, CounterKey, FAMILY_V4, FAMILY_V6, PeerCounters, PeerKey, Scope, Side, classify,
    direction_of,
    flow::FlowPacket,
    icmp::{self, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, QUOTED_TCP_LEN, Quoted},
    reply::HEAD_LEN,
    rules::Event,
    smtp_port,
};

/// VLAN tags walked (802.1Q, or 802.1ad then 802.1Q), stripped ones included.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked.
pub const MAX_EXT_HEADERS: usize = 8;
/// The deepest offset in the frame at which a TCP header is inspected.
pub const MAX_L4_OFFSET: usize = 1024;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_TCP: u8 = 6;
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_DEST_OPTS: u8 = 60;

/// Why a frame is malformed: which header is short or invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an Ethernet header.
    Ethernet,
    /// A VLAN tag runs past the end.
    VlanTag { offset: usize },
    /// Fewer than 20 bytes left for the IPv4 header.
    Ipv4Header,
    /// An IPv4 ethertype whose header does not say version 4.
    Ipv4Version(u8),
    /// IHL below 5.
    Ipv4Ihl(u8),
    /// The IPv4 options run past the end.
    Ipv4Options { header_len: usize },
    /// Fewer than 40 bytes left for the IPv6 header.
    Ipv6Header,
    /// An IPv6 ethertype whose header does not say version 6.
    Ipv6Version(u8),
    /// An IPv6 extension header of type `kind`, starting at `offset`, runs past the end; `index`
    /// headers of the chain came before it.
    Ipv6Extension { offset: usize, kind: u8, index: usize },
    /// Fewer than 20 bytes left for the TCP header.
    TcpHeader { offset: usize },
    /// Data offset below 5.
    TcpDataOffset { offset: usize, words: u8 },
    /// The TCP options run past the end.
    TcpOptions { offset: usize, header_len: usize },
}

/// Why a well-formed frame carries no TCP header to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, an 802.3 length field, ...).
    Ethertype(u16),
    /// Still VLAN-tagged after the tags walked.
    TooManyVlanTags,
    /// An IPv4 fragment other than the first.
    Ipv4Fragment,
    /// IPv4 carrying another protocol.
    Ipv4Protocol(u8),
    /// An IPv6 fragment other than the first.
    Ipv6Fragment,
    /// The IPv6 chain ends in something other than TCP.
    Ipv6NextHeader(u8),
    /// More extension headers than walked.
    Ipv6ChainTooLong,
    /// The next header would start past [`MAX_L4_OFFSET`].
    TooDeep { offset: usize },
}

/// A TCP header found in a frame. Addresses in network order; IPv4 uses the first 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHeader {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
    pub window: u16,
    pub seq: u32,
    /// Where the TCP header starts in the frame.
    pub offset: usize,
    /// Where the payload starts in the frame (after the TCP options).
    pub payload_off: usize,
    /// Payload bytes: up to the end of the IP packet (its total or payload length; Ethernet
    /// padding excluded), or of the frame when that comes first or the IP length is unusable
    /// (an IPv4 total length not past its header, an IPv6 payload length of 0).
    pub payload_len: usize,
}

impl TcpHeader {
    /// The payload bytes.
    pub fn payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        frame.get(self.payload_off..self.payload_off + self.payload_len).unwrap_or(&[])
    }
}

/// What parsing a frame gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Malformed(Malformed),
    Ignored(Ignored),
    Tcp(TcpHeader),
}

/// The bytes `[at, at + n)` of the frame, or `None` when any of them is past the end.
fn take(frame: &[u8], at: usize, n: usize) -> Option<&[u8]> {
    frame.get(at..at.checked_add(n)?)
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    take(frame, at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Parses `frame` (starting at its Ethernet header) as the contract says. `stripped_tags`: VLAN
/// tags the kernel took out of the frame before the program saw it (0 for XDP and for
/// `BPF_PROG_TEST_RUN`; 1 at TC ingress for a tagged frame).
pub fn parse(frame: &[u8], stripped_tags: usize) -> Parsed {
    match parse_inner(frame, stripped_tags) {
        Ok(tcp) => Parsed::Tcp(tcp),
        Err(p) => p,
    }
}

fn parse_inner(frame: &[u8], stripped_tags: usize) -> Result<TcpHeader, Parsed> {
    let bad = |m| Parsed::Malformed(m);
    let skip = |i| Parsed::Ignored(i);

    let (ethertype, at) = link(frame, stripped_tags)?;
    let (family, ip) = network(frame, at, ethertype)?;
    if ip.protocol != PROTO_TCP {
        return Err(skip(match family {
            FAMILY_V4 => Ignored::Ipv4Protocol(ip.protocol),
            _ => Ignored::Ipv6NextHeader(ip.protocol),
        }));
    }
    let (src, dst, tcp_at, ip_end) = (ip.src, ip.dst, ip.upper, ip.end);

    if tcp_at > MAX_L4_OFFSET {
        return Err(skip(Ignored::TooDeep { offset: tcp_at }));
    }
    let tcp = take(frame, tcp_at, 20).ok_or(bad(Malformed::TcpHeader { offset: tcp_at }))?;
    let words = tcp[12] >> 4;
    if words < 5 {
        return Err(bad(Malformed::TcpDataOffset { offset: tcp_at, words }));
    }
    let header_len = usize::from(words) * 4;
    if take(frame, tcp_at, header_len).is_none() {
        return Err(bad(Malformed::TcpOptions { offset: tcp_at, header_len }));
    }
    let payload_off = tcp_at + header_len;
    let end = if ip_end != 0 && ip_end < frame.len() { ip_end } else { frame.len() };
    Ok(TcpHeader {
        family,
        src,
        dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        flags: tcp[13],
        window: u16::from_be_bytes([tcp[14], tcp[15]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        offset: tcp_at,
        payload_off,
        payload_len: end.saturating_sub(payload_off),
    })
}

/// The Ethernet header and its VLAN tags: the ethertype they end in, and where what it carries
/// starts.
fn link(frame: &[u8], stripped_tags: usize) -> Result<(u16, usize), Parsed> {
    let bad = |m| Parsed::Malformed(m);
    // Ethernet: two addresses, then the ethertype (or a TPID).
    let mut ethertype = be16(frame, 12).ok_or(bad(Malformed::Ethernet))?;
    let mut at = 14;
    let mut tags_left = MAX_VLAN_TAGS.saturating_sub(stripped_tags);
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags_left == 0 {
            return Err(Parsed::Ignored(Ignored::TooManyVlanTags));
        }
        // The tag as seen from `at`: TCI, then the ethertype it encapsulates.
        let tag = take(frame, at, 4).ok_or(bad(Malformed::VlanTag { offset: at }))?;
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        at += 4;
        tags_left -= 1;
    }
    Ok((ethertype, at))
}

/// An IP header (with its options or extension headers) as the contract reads it: the protocol
/// it carries, its addresses, and where what it carries starts.
struct IpLayer {
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    upper: usize,
    /// Where the IP packet ends by its own length field; 0 when that field is unusable.
    end: usize,
}

/// The IPv4 or IPv6 header at `at` of the frame (by `ethertype`), validated as the contract
/// says, up to the protocol it carries (which the caller judges). Not IP: ignored.
fn network(frame: &[u8], at: usize, ethertype: u16) -> Result<(u8, IpLayer), Parsed> {
    let bad = |m| Parsed::Malformed(m);
    let skip = |i| Parsed::Ignored(i);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    match ethertype {
        ETH_P_IP => {
            let ip = take(frame, at, 20).ok_or(bad(Malformed::Ipv4Header))?;
            let version = ip[0] >> 4;
            if version != 4 {
                return Err(bad(Malformed::Ipv4Version(version)));
            }
            let ihl = ip[0] & 0xf;
            if ihl < 5 {
                return Err(bad(Malformed::Ipv4Ihl(ihl)));
            }
            let header_len = usize::from(ihl) * 4;
            if take(frame, at, header_len).is_none() {
                return Err(bad(Malformed::Ipv4Options { header_len }));
            }
            let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            if fragment_offset != 0 {
                return Err(skip(Ignored::Ipv4Fragment));
            }
            src[..4].copy_from_slice(&ip[12..16]);
            dst[..4].copy_from_slice(&ip[16..20]);
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let end = if total > header_len { at + total } else { 0 };
            Ok((FAMILY_V4, IpLayer { protocol: ip[9], src, dst, upper: at + header_len, end }))
        }
        ETH_P_IPV6 => {
            let ip = take(frame, at, 40).ok_or(bad(Malformed::Ipv6Header))?;
            let version = ip[0] >> 4;
            if version != 6 {
                return Err(bad(Malformed::Ipv6Version(version)));
            }
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let end = if payload > 0 { at + 40 + payload } else { 0 };
            let mut next = ip[6];
            let mut here = at + 40;
            let mut walked = 0;
            loop {
                if here > MAX_L4_OFFSET {
                    return Err(skip(Ignored::TooDeep { offset: here }));
                }
                let len = match next {
                    EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_FRAGMENT => {
                        if walked == MAX_EXT_HEADERS {
                            return Err(skip(Ignored::Ipv6ChainTooLong));
                        }
                        let short = bad(Malformed::Ipv6Extension {
                            offset: here,
                            kind: next,
                            index: walked,
                        });
                        // The fragment header is 8 bytes; the others say their length in
                        // 8-byte units, not counting the first 8.
                        let len = if next == EXT_FRAGMENT {
                            8
                        } else {
                            (usize::from(*frame.get(here + 1).ok_or(short)?) + 1) * 8
                        };
                        let ext = take(frame, here, len).ok_or(short)?;
                        if next == EXT_FRAGMENT && u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                            return Err(skip(Ignored::Ipv6Fragment));
                        }
                        next = ext[0];
                        len
                    }
                    _ => break,
                };
                here += len;
                walked += 1;
            }
            Ok((FAMILY_V6, IpLayer { protocol: next, src, dst, upper: here, end }))
        }
        other => Err(skip(Ignored::Ethertype(other))),
    }
}

/// One counted event: the exact counter it adds one to, and the per-peer counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    pub event: Event,
    pub counter: CounterKey,
    pub peer: PeerKey,
    /// Index into [`PeerCounters::counts`].
    pub peer_slot: usize,
}

/// What one frame does to the event counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing but the malformed-frames counter goes up by one.
    Malformed(Malformed),
    /// No counter changes: not TCP, not an SMTP port, or a TCP packet that is no event.
    Nothing,
    /// Exactly one event.
    Counted(Counted),
}

/// The effect of `frame` seen by a program on interface `ifindex`, sent by `side` (`Peer` at
/// ingress, `Local` at egress), with SMTP `ports` configured.
pub fn effect(
    frame: &[u8],
    stripped_tags: usize,
    side: Side,
    ifindex: u32,
    ports: &[u16],
) -> Effect {
    let tcp = match parse(frame, stripped_tags) {
        Parsed::Malformed(m) => return Effect::Malformed(m),
        Parsed::Ignored(_) => return Effect::Nothing,
        Parsed::Tcp(tcp) => tcp,
    };
    let Some(m) = smtp_port(tcp.src_port, tcp.dst_port, ports) else {
        return Effect::Nothing;
    };
    let Some(event) = classify(tcp.flags, tcp.window) else {
        return Effect::Nothing;
    };
    let direction = direction_of(side, m.sender_is_client);
    let addr = match side {
        Side::Peer => tcp.src,
        Side::Local => tcp.dst,
    };
    Effect::Counted(Counted {
        event,
        counter: CounterKey::new(
            Scope { ifindex, port: m.port, direction },
            Counter::Event(event, side),
        ),
        peer: PeerKey {
            ifindex,
            addr,
            port: m.port,
            family: tcp.family,
            direction: direction as u8,
        },
        peer_slot: PeerCounters::index(event, side),
    })
}

/// What the kernel reads of a segment for the flow state machine ([`crate::flow::step`]): its
/// flags, sequence number and payload length; on a `plaintext` port the first [`HEAD_LEN`]
/// bytes of the payload when it has that many, else 8, else 4, else none
/// ([`FlowPacket::read_head`]), and whether a server's payload ends a line; the client's first
/// payload byte on every port. `ingress_only`: seen by XDP.
pub fn flow_packet(
    frame: &[u8],
    tcp: &TcpHeader,
    from_client: bool,
    plaintext: bool,
    ingress_only: bool,
) -> FlowPacket {
    let payload = tcp.payload(frame);
    let mut p = FlowPacket {
        flags: tcp.flags,
        from_client,
        seq: tcp.seq,
        payload_len: payload.len() as u32,
        ends_line: true,
        plaintext,
        ingress_only,
        ..FlowPacket::default()
    };
    if payload.is_empty() {
        return p;
    }
    if plaintext {
        let (head, n) = kernel_head(payload);
        p.read_head(&head, n);
        if !from_client {
            p.ends_line = payload.last() == Some(&b'\n');
        }
    }
    if from_client {
        p.first_byte = payload[0];
    }
    p
}

/// What the kernel reads of a payload's start (`flow::read_payload`): whole loads only, so
/// nothing of a payload under 4 bytes, its first 4 under 8, its first 8 under [`HEAD_LEN`],
/// else the first [`HEAD_LEN`]; the rest of the head is zero. Returns the head and how many
/// bytes it holds.
pub fn kernel_head(payload: &[u8]) -> ([u8; HEAD_LEN], u8) {
    let n = match payload.len() {
        0..4 => 0,
        4..8 => 4,
        8..HEAD_LEN => 8,
        _ => HEAD_LEN,
    };
    let mut head = [0u8; HEAD_LEN];
    head[..n].copy_from_slice(&payload[..n]);
    (head, n as u8)
}

/// The ICMP answer contract ("Unreachable" in the README), over a frame: an ICMP (in IPv4) or
/// ICMPv6 (in IPv6, behind extension headers walked as above) destination unreachable of a
/// code [`icmp::reason`] classes, quoting an IP header of the same family read as the outer
/// one is (options, extension headers, a non-first fragment ignored) that carries TCP, and at
/// least the first 8 bytes of its TCP header (ports and sequence number), starting at or
/// before [`MAX_L4_OFFSET`]. `None` for every other frame; none of them is malformed.
pub fn unreachable(frame: &[u8], stripped_tags: usize) -> Option<Quoted> {
    let (ethertype, at) = link(frame, stripped_tags).ok()?;
    let (family, outer) = network(frame, at, ethertype).ok()?;
    let icmp_proto = if family == FAMILY_V4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    if outer.protocol != icmp_proto {
        return None;
    }
    let head = take(frame, outer.upper, 2)?;
    let reason = icmp::reason(family, head[0], head[1])?;
    let (_, inner) = network(frame, outer.upper + ICMP_HLEN, ethertype).ok()?;
    if inner.protocol != PROTO_TCP || inner.upper > MAX_L4_OFFSET {
        return None;
    }
    let tcp = take(frame, inner.upper, QUOTED_TCP_LEN)?;
    Some(Quoted {
        family,
        reason,
        src: inner.src,
        dst: inner.dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use crate::UnreachableReason;
    use std::{vec, vec::Vec};

    use super::*;
    use crate::{
        Direction,
        rules::tcp_flags::{ACK, FIN, RST, SYN},
    };

    const PORTS: &[u16] = &[25, 465, 587];

    /// A 20-byte TCP header: ports, flags, window.
    fn tcp(src: u16, dst: u16, flags: u8, window: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.to_be_bytes());
        t[2..4].copy_from_slice(&dst.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&window.to_be_bytes());
        t
    }

    fn eth(tpids: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        for &t in tpids {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 100]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn v4(options: &[u8], protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let mut p = vec![0x40 | (hlen / 4) as u8, 0];
        p.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0, 198, 51, 100, 7, 192, 0, 2, 1]);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        p
    }

    /// IPv6 with extension headers `(kind, length in bytes)` before `next`.
    fn v6(ext: &[(u8, usize)], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut kinds: Vec<u8> = ext.iter().map(|e| e.0).collect();
        kinds.push(next);
        let ext_len: usize = ext.iter().map(|e| e.1).sum();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((ext_len + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[kinds[0], 64]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        for (&(kind, len), &next) in ext.iter().zip(&kinds[1..]) {
            let mut h = vec![0u8; len];
            h[0] = next;
            if kind != EXT_FRAGMENT {
                h[1] = (len / 8 - 1) as u8;
            }
            p.extend_from_slice(&h);
        }
        p.extend_from_slice(payload);
        p
    }

    fn syn25() -> Vec<u8> {
        tcp(40000, 25, SYN, 64240)
    }

    fn peer_effect(frame: &[u8]) -> Effect {
        effect(frame, 0, Side::Peer, 1, PORTS)
    }

    fn counted(e: Effect) -> Option<(Event, Direction, u16)> {
        match e {
            Effect::Counted(c) => {
                let (scope, _) = c.counter.decode().expect("a key that decodes");
                Some((c.event, scope.direction, scope.port))
            }
            _ => None,
        }
    }

    /// An ICMP error quoting `quoted` (an IP packet), after the 8-byte ICMP header.
    fn icmp(kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, code, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(quoted);
        m
    }

    /// Our SYN as quoted: from 192.0.2.1 port 40000 to 198.51.100.7 port 25 (the `v4` helper's
    /// addresses, swapped), cut to `tcp_len` bytes of TCP header.
    fn quoted_v4(tcp_len: usize) -> Vec<u8> {
        let mut t = tcp(40000, 25, SYN, 64240);
        t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        let mut ip = v4(&[], PROTO_TCP, 0, &t[..tcp_len]);
        // From us to the remote.
        ip[12..16].copy_from_slice(&[192, 0, 2, 1]);
        ip[16..20].copy_from_slice(&[198, 51, 100, 7]);
        ip
    }

    #[test]
    fn unreachable_reads_the_quoted_header() {
        let frame = eth(&[], ETH_P_IP, &v4(&[], IPPROTO_ICMP, 0, &icmp(3, 1, &quoted_v4(8))));
        let u = unreachable(&frame, 0).expect("a host unreachable quoting 8 bytes of TCP");
        assert_eq!(u.reason, UnreachableReason::Host);
        assert_eq!((u.family, u.src_port, u.dst_port, u.seq), (FAMILY_V4, 40000, 25, 0x0102_0304));
        assert_eq!((&u.src[..4], &u.dst[..4]), (&[192, 0, 2, 1][..], &[198, 51, 100, 7][..]));
        // Seven bytes of TCP are too few; twenty (the whole header) are fine.
        let short = eth(&[], ETH_P_IP, &v4(&[], IPPROTO_ICMP, 0, &icmp(3, 1, &quoted_v4(7))));
        assert_eq!(unreachable(&short, 0), None);
        let whole = eth(&[], ETH_P_IP, &v4(&[], IPPROTO_ICMP, 0, &icmp(3, 13, &quoted_v4(20))));
        assert_eq!(unreachable(&whole, 0).map(|u| u.reason), Some(UnreachableReason::Admin));
        // Fragmentation needed, an echo, an ICMP in a non-first fragment: none.
        for (kind, code, frag) in [(3, 4, 0), (8, 0, 0), (3, 1, 5)] {
            let f =
                eth(&[], ETH_P_IP, &v4(&[], IPPROTO_ICMP, frag, &icmp(kind, code, &quoted_v4(8))));
            assert_eq!(unreachable(&f, 0), None, "type {kind} code {code} fragment {frag}");
        }
        // Quoting UDP: none. Tagged: read.
        let mut udp = quoted_v4(8);
        udp[9] = 17;
        let f = eth(&[], ETH_P_IP, &v4(&[], IPPROTO_ICMP, 0, &icmp(3, 1, &udp)));
        assert_eq!(unreachable(&f, 0), None);
        let tagged =
            eth(&[ETH_P_8021Q], ETH_P_IP, &v4(&[], IPPROTO_ICMP, 0, &icmp(3, 3, &quoted_v4(8))));
        assert_eq!(unreachable(&tagged, 0).map(|u| u.reason), Some(UnreachableReason::Port));
        // Not malformed for the event contract, whatever it holds.
        assert_eq!(parse(&short, 0), Parsed::Ignored(Ignored::Ipv4Protocol(IPPROTO_ICMP)));
        // ICMPv6 behind a destination-options header, quoting IPv6.
        let mut t = tcp(40000, 25, SYN, 64240);
        t[4..8].copy_from_slice(&7u32.to_be_bytes());
        let inner = v6(&[], PROTO_TCP, &t[..8]);
        let f =
            eth(&[], ETH_P_IPV6, &v6(&[(EXT_DEST_OPTS, 8)], IPPROTO_ICMPV6, &icmp(1, 3, &inner)));
        let u = unreachable(&f, 0).expect("an address unreachable");
        assert_eq!((u.family, u.reason, u.seq), (FAMILY_V6, UnreachableReason::Host, 7));
        // Packet too big is not one.
        let f = eth(&[], ETH_P_IPV6, &v6(&[], IPPROTO_ICMPV6, &icmp(2, 0, &inner)));
        assert_eq!(unreachable(&f, 0), None);
        // ICMP (v4) in IPv6 is not ICMPv6.
        let f = eth(&[], ETH_P_IPV6, &v6(&[], IPPROTO_ICMP, &icmp(1, 3, &inner)));
        assert_eq!(unreachable(&f, 0), None);
    }

    #[test]
    fn counts_plain_and_tagged_syns() {
        let want = Some((Event::Syn, Direction::Inbound, 25));
        let ip = v4(&[], PROTO_TCP, 0, &syn25());
        assert_eq!(counted(peer_effect(&eth(&[], ETH_P_IP, &ip))), want);
        assert_eq!(counted(peer_effect(&eth(&[ETH_P_8021Q], ETH_P_IP, &ip))), want);
        let qinq = eth(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IP, &ip);
        assert_eq!(counted(peer_effect(&qinq)), want);
        let three = eth(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], ETH_P_IP, &ip);
        assert_eq!(parse(&three, 0), Parsed::Ignored(Ignored::TooManyVlanTags));
        // At TC ingress the outer tag is already in metadata: QinQ shows one tag in the frame,
        // and one more is still walked; three tags show two, one too many.
        let inner = eth(&[ETH_P_8021Q], ETH_P_IP, &ip);
        assert_eq!(counted(effect(&inner, 1, Side::Peer, 1, PORTS)), want);
        let two_left = eth(&[ETH_P_8021Q, ETH_P_8021Q], ETH_P_IP, &ip);
        assert_eq!(parse(&two_left, 1), Parsed::Ignored(Ignored::TooManyVlanTags));
        // A tag cut short.
        let cut = &eth(&[ETH_P_8021Q], ETH_P_IP, &ip)[..16];
        assert_eq!(parse(cut, 0), Parsed::Malformed(Malformed::VlanTag { offset: 14 }));
    }

    #[test]
    fn event_key_and_peer() {
        let ip = v4(&[], PROTO_TCP, 0, &tcp(25, 40000, SYN | ACK, 100));
        let Effect::Counted(c) = effect(&eth(&[], ETH_P_IP, &ip), 0, Side::Peer, 7, PORTS) else {
            panic!("not counted");
        };
        assert_eq!(
            c.counter,
            CounterKey::new(
                Scope { ifindex: 7, port: 25, direction: Direction::Outbound },
                Counter::Event(Event::SynAck, Side::Peer)
            )
        );
        assert_eq!(&c.peer.addr[..4], &[198, 51, 100, 7], "ingress: the source");
        assert_eq!(c.peer.family, FAMILY_V4);
        assert_eq!(c.peer_slot, PeerCounters::index(Event::SynAck, Side::Peer));
        // Egress: the destination is the peer, and our SYN-ACK answers an inbound client.
        let Effect::Counted(c) = effect(&eth(&[], ETH_P_IP, &ip), 0, Side::Local, 7, PORTS) else {
            panic!("not counted");
        };
        assert_eq!(
            c.counter,
            CounterKey::new(
                Scope { ifindex: 7, port: 25, direction: Direction::Inbound },
                Counter::Event(Event::SynAck, Side::Local)
            )
        );
        assert_eq!(&c.peer.addr[..4], &[192, 0, 2, 1]);
    }

    #[test]
    fn ipv4_rules() {
        let frame = |ip: Vec<u8>| eth(&[], ETH_P_IP, &ip);
        let mut bad_ihl = v4(&[], PROTO_TCP, 0, &syn25());
        bad_ihl[0] = 0x44;
        assert_eq!(parse(&frame(bad_ihl), 0), Parsed::Malformed(Malformed::Ipv4Ihl(4)));
        let mut long_ihl = v4(&[], PROTO_TCP, 0, &syn25());
        long_ihl[0] = 0x4f;
        assert!(matches!(
            parse(&frame(long_ihl), 0),
            Parsed::Malformed(Malformed::Ipv4Options { .. })
        ));
        let mut v6_nibble = v4(&[], PROTO_TCP, 0, &syn25());
        v6_nibble[0] = 0x65;
        assert_eq!(parse(&frame(v6_nibble), 0), Parsed::Malformed(Malformed::Ipv4Version(6)));
        let options =
            v4(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0], PROTO_TCP, 0, &tcp(1, 465, SYN, 9));
        assert_eq!(
            counted(peer_effect(&frame(options))),
            Some((Event::Syn, Direction::Inbound, 465))
        );
        // First fragment (MF, offset 0) counts; a later one is ignored even if it looks like TCP.
        let first = v4(&[], PROTO_TCP, 0x2000, &syn25());
        assert!(counted(peer_effect(&frame(first))).is_some());
        let later = v4(&[], PROTO_TCP, 185, &syn25());
        assert_eq!(parse(&frame(later), 0), Parsed::Ignored(Ignored::Ipv4Fragment));
        let udp = v4(&[], 17, 0, &syn25());
        assert_eq!(parse(&frame(udp), 0), Parsed::Ignored(Ignored::Ipv4Protocol(17)));
        // Truncations: every cut inside the IP or TCP header is malformed.
        let whole = frame(v4(&[1, 1, 1, 1], PROTO_TCP, 0, &syn25()));
        for len in 0..whole.len() {
            assert!(
                matches!(parse(&whole[..len], 0), Parsed::Malformed(_)),
                "cut at {len}: {:?}",
                parse(&whole[..len], 0)
            );
        }
        assert!(matches!(parse(&whole, 0), Parsed::Tcp(_)));
    }

    #[test]
    fn tcp_rules() {
        let frame = |t: Vec<u8>| eth(&[], ETH_P_IP, &v4(&[], PROTO_TCP, 0, &t));
        let mut short = syn25();
        short[12] = 4 << 4;
        assert!(matches!(
            parse(&frame(short), 0),
            Parsed::Malformed(Malformed::TcpDataOffset { words: 4, .. })
        ));
        let mut long = syn25();
        long[12] = 15 << 4;
        assert!(matches!(parse(&frame(long), 0), Parsed::Malformed(Malformed::TcpOptions { .. })));
        // The contract's events, and what is not one.
        let e = |flags, window| counted(peer_effect(&frame(tcp(40000, 25, flags, window))));
        assert_eq!(e(RST | ACK, 5), Some((Event::Rst, Direction::Inbound, 25)));
        assert_eq!(e(ACK, 0), Some((Event::ZeroWindow, Direction::Inbound, 25)));
        assert_eq!(e(FIN | ACK, 0), None);
        assert_eq!(e(ACK, 5), None);
        assert_eq!(counted(peer_effect(&frame(tcp(80, 443, SYN, 5)))), None);
    }

    #[test]
    fn ipv6_chains() {
        let frame = |ip: Vec<u8>| eth(&[], ETH_P_IPV6, &ip);
        let chain = [(EXT_HOP_BY_HOP, 8), (EXT_DEST_OPTS, 16), (EXT_ROUTING, 8), (EXT_FRAGMENT, 8)];
        let f = frame(v6(&chain, PROTO_TCP, &tcp(40000, 587, SYN, 1)));
        assert_eq!(counted(peer_effect(&f)), Some((Event::Syn, Direction::Inbound, 587)));
        let Parsed::Tcp(t) = parse(&f, 0) else { panic!() };
        assert_eq!(t.offset, 14 + 40 + 40);
        assert_eq!(t.family, FAMILY_V6);
        assert_eq!(t.src[15], 7);
        // Eight walked, nine not.
        let eight = frame(v6(&[(EXT_DEST_OPTS, 8); 8], PROTO_TCP, &syn25()));
        assert!(matches!(parse(&eight, 0), Parsed::Tcp(_)));
        let nine = frame(v6(&[(EXT_DEST_OPTS, 8); 9], PROTO_TCP, &syn25()));
        assert_eq!(parse(&nine, 0), Parsed::Ignored(Ignored::Ipv6ChainTooLong));
        // Depth: a TCP header at 1022 is read (it ends past 1024); one at 1030 is not.
        let at_1022 = frame(v6(&[(EXT_HOP_BY_HOP, 968)], PROTO_TCP, &syn25()));
        assert!(matches!(parse(&at_1022, 0), Parsed::Tcp(TcpHeader { offset: 1022, .. })));
        let at_1030 = frame(v6(&[(EXT_HOP_BY_HOP, 976)], PROTO_TCP, &syn25()));
        assert_eq!(parse(&at_1030, 0), Parsed::Ignored(Ignored::TooDeep { offset: 1030 }));
        // Fragments: the first counts, a later one is ignored.
        let mut later = frame(v6(&[(EXT_FRAGMENT, 8)], PROTO_TCP, &syn25()));
        later[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&((185u16 << 3) | 1).to_be_bytes());
        assert_eq!(parse(&later, 0), Parsed::Ignored(Ignored::Ipv6Fragment));
        // No next header, and UDP.
        let none = frame(v6(&[], 59, &syn25()));
        assert_eq!(parse(&none, 0), Parsed::Ignored(Ignored::Ipv6NextHeader(59)));
        // An extension header running past the end, whatever follows it.
        let cut = &frame(v6(&[(EXT_HOP_BY_HOP, 88)], 17, &syn25()))[..14 + 40 + 16];
        assert_eq!(
            parse(cut, 0),
            Parsed::Malformed(Malformed::Ipv6Extension {
                offset: 54,
                kind: EXT_HOP_BY_HOP,
                index: 0
            })
        );
        let mut v4_nibble = frame(v6(&[], PROTO_TCP, &syn25()));
        v4_nibble[14] = 0x40;
        assert_eq!(parse(&v4_nibble, 0), Parsed::Malformed(Malformed::Ipv6Version(4)));
    }

    /// The payload ends where the IP packet says (Ethernet padding excluded), or at the end of
    /// the frame when that comes first or the length is unusable; the client's first byte and a
    /// plaintext head are read from it.
    #[test]
    fn payload_bounds_and_what_the_kernel_reads_of_it() {
        let mut t = tcp(40000, 25, ACK, 100);
        t.extend_from_slice(b"EHLO a.example\r\n");
        let mut frame = eth(&[], ETH_P_IP, &v4(&[], PROTO_TCP, 0, &t));
        frame.extend_from_slice(&[0; 6]); // padding
        let Parsed::Tcp(h) = parse(&frame, 0) else { panic!() };
        assert_eq!(h.payload(&frame), b"EHLO a.example\r\n");
        let p = flow_packet(&frame, &h, true, true, false);
        assert!(p.ehlo && p.first_byte == b'E' && p.payload_len == 16);
        // A total length not past the header: up to the end of the frame.
        frame[16..18].copy_from_slice(&20u16.to_be_bytes());
        let Parsed::Tcp(h) = parse(&frame, 0) else { panic!() };
        assert_eq!(h.payload_len, 16 + 6);
        // A total length past the frame: the frame ends it.
        frame[16..18].copy_from_slice(&2000u16.to_be_bytes());
        let Parsed::Tcp(h) = parse(&frame, 0) else { panic!() };
        assert_eq!(h.payload_len, 16 + 6);
        // A TLS port: no head, the client's first byte only.
        let p = flow_packet(&frame, &h, true, false, false);
        assert!(!p.ehlo && p.first_byte == b'E');
    }

    #[test]
    fn short_and_foreign_frames() {
        assert_eq!(parse(&[0; 13], 0), Parsed::Malformed(Malformed::Ethernet));
        assert_eq!(
            parse(&eth(&[], 0x0806, &[0; 28]), 0),
            Parsed::Ignored(Ignored::Ethertype(0x0806))
        );
        assert_eq!(parse(&eth(&[], ETH_P_IP, &[]), 0), Parsed::Malformed(Malformed::Ipv4Header));
    }
}
