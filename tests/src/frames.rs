//! Hand-written frame builders, and a raw AF_PACKET socket to put the frames on a wire as given.
//!
//! Each builder renders one layer to bytes and takes the layer above as its payload, so a frame
//! reads outside in:
//!
//! ```
//! use smtpflow_tests::frames::{Eth, IPPROTO_TCP, Ipv4, Tcp};
//!
//! let syn = Tcp::new(40000, 25, 0x02).bytes();
//! let ip = Ipv4::new([192, 0, 2, 1].into(), [192, 0, 2, 2].into(), IPPROTO_TCP);
//! let frame = Eth::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).dot1q(100).ipv4(&ip, &syn);
//! assert_eq!(frame.len(), 14 + 4 + 20 + 20);
//! ```
//!
//! Lengths (IPv4 total length, IPv6 payload length, UDP length, header length fields) are computed
//! unless overridden; checksums are left 0 (smtpflow runs before any checksum is checked). To make
//! a truncated frame, build it whole and cut it with [`Vec::truncate`].
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::{Netns, in_netns};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 next-header values of the extension headers, and "no next header".
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;

/// Ethernet header, with VLAN tags in the order they appear on the wire.
#[derive(Clone, Debug)]
pub struct Eth {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// `(TPID, TCI)` of each tag, outermost first.
    pub tags: Vec<(u16, u16)>,
}

impl Eth {
    pub fn new(dst: [u8; 6], src: [u8; 6]) -> Self {
        Self { dst, src, tags: Vec::new() }
    }

    /// Adds a VLAN tag inside the ones already there.
    pub fn tag(mut self, tpid: u16, vid: u16) -> Self {
        self.tags.push((tpid, vid & 0x0fff));
        self
    }

    /// An 802.1Q tag.
    pub fn dot1q(self, vid: u16) -> Self {
        self.tag(ETH_P_8021Q, vid)
    }

    /// QinQ: an 802.1ad service tag, then an 802.1Q customer tag.
    pub fn qinq(self, outer_vid: u16, inner_vid: u16) -> Self {
        self.tag(ETH_P_8021AD, outer_vid).tag(ETH_P_8021Q, inner_vid)
    }

    /// The whole frame: header, tags, `ethertype`, then `payload`. No padding is added.
    pub fn frame(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + 4 * self.tags.len() + payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.src);
        for &(tpid, tci) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn ipv4(&self, ip: &Ipv4, payload: &[u8]) -> Vec<u8> {
        self.frame(ETH_P_IP, &ip.packet(payload))
    }

    pub fn ipv6(&self, ip: &Ipv6, next_header: u8, payload: &[u8]) -> Vec<u8> {
        self.frame(ETH_P_IPV6, &ip.packet(next_header, payload))
    }
}

/// The Internet checksum over the concatenation of `parts` (each of even length but the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header. The header length follows the options unless [`Ipv4::ihl`] overrides it.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// The version nibble: 4 unless a test wants it wrong.
    pub version: u8,
    pub ttl: u8,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub frag_offset: u16,
    /// Options, padded with zeros (end of option list) to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// The IHL field (header length in 32-bit words), when not the true length.
    pub ihl: Option<u8>,
    /// The total length field, when not the true length.
    pub total_len: Option<u16>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Self {
            src,
            dst,
            protocol,
            version: 4,
            ttl: 64,
            id: 0x1234,
            dont_fragment: false,
            more_fragments: false,
            frag_offset: 0,
            options: Vec::new(),
            ihl: None,
            total_len: None,
        }
    }

    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self.options.resize(options.len().next_multiple_of(4), 0);
        self
    }

    pub fn ihl(mut self, words: u8) -> Self {
        self.ihl = Some(words);
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn total_len(mut self, bytes: u16) -> Self {
        self.total_len = Some(bytes);
        self
    }

    pub fn version(mut self, version: u8) -> Self {
        self.version = version;
        self
    }

    /// A fragment at `offset` (8-byte units), with the more-fragments flag as given.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.frag_offset = offset;
        self.more_fragments = more;
        self
    }

    /// Header then `payload`; the total length covers both unless overridden.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
        let flags = u16::from(self.dont_fragment) << 14 | u16::from(self.more_fragments) << 13;
        let mut p = Vec::with_capacity(hlen + payload.len());
        p.push(self.version << 4 | (ihl & 0x0f));
        p.push(0); // DSCP/ECN
        let total_len = self.total_len.unwrap_or((hlen + payload.len()) as u16);
        p.extend_from_slice(&total_len.to_be_bytes());
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&(flags | (self.frag_offset & 0x1fff)).to_be_bytes());
        p.push(self.ttl);
        p.push(self.protocol);
        p.extend_from_slice(&[0, 0]); // checksum
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.options);
        p.extend_from_slice(payload);
        p
    }
}

impl Ipv4 {
    /// [`Ipv4::packet`] with the header checksum filled in (frames a real stack accepts).
    pub fn packet_checksummed(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.packet(payload);
        let hlen = 20 + self.options.len();
        let sum = checksum(&[&p[..hlen]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }
}

/// An IPv6 extension header. Its next-header field is filled in when the chain is rendered.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options; `len` is the header extension length (8-byte units after the first 8).
    HopByHop { len: u8 },
    /// Destination options, sized like [`Ext::HopByHop`].
    DestOpts { len: u8 },
    /// A routing header of an unassigned type with no segments left (which nodes skip).
    Routing,
    /// Fragment header: `offset` in 8-byte units, `more` the M flag.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    /// The smallest (8-byte) hop-by-hop header.
    pub const HOP_BY_HOP: Ext = Ext::HopByHop { len: 0 };
    /// The smallest (8-byte) destination-options header.
    pub const DEST_OPTS: Ext = Ext::DestOpts { len: 0 };

    pub fn fragment(offset: u16, more: bool) -> Self {
        Ext::Fragment { offset, more, id: 0x5eed }
    }

    /// The next-header value that announces this header.
    pub fn protocol(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => NEXTHDR_HOP,
            Ext::DestOpts { .. } => NEXTHDR_DEST,
            Ext::Routing => NEXTHDR_ROUTING,
            Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
        }
    }

    /// The header's length in bytes.
    pub fn size(self) -> usize {
        match self {
            Ext::HopByHop { len } | Ext::DestOpts { len } => (usize::from(len) + 1) * 8,
            Ext::Routing | Ext::Fragment { .. } => 8,
        }
    }

    fn render(self, next_header: u8, out: &mut Vec<u8>) {
        match self {
            Ext::HopByHop { len } | Ext::DestOpts { len } => {
                out.extend_from_slice(&[next_header, len]);
                pad_options(self.size() - 2, out);
            }
            // Routing type 253 (RFC 4727, experimental), segments left 0, 4 reserved bytes.
            Ext::Routing => out.extend_from_slice(&[next_header, 0, 253, 0, 0, 0, 0, 0]),
            Ext::Fragment { offset, more, id } => {
                out.extend_from_slice(&[next_header, 0]);
                out.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
}

/// `n` bytes of IPv6 options padding: PadN options (Pad1 for a single byte).
fn pad_options(mut n: usize, out: &mut Vec<u8>) {
    while n > 0 {
        if n == 1 {
            out.push(0); // Pad1
            return;
        }
        // PadN: type 1, then the length of the zeros that follow (at most 255).
        let zeros = (n - 2).min(255);
        out.extend_from_slice(&[1, zeros as u8]);
        out.resize(out.len() + zeros, 0);
        n -= zeros + 2;
    }
}

/// IPv6 header and its extension-header chain.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Extension headers in wire order.
    pub ext: Vec<Ext>,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self { src, dst, hop_limit: 64, ext: Vec::new() }
    }

    /// Appends an extension header to the chain.
    pub fn ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    /// Header, extension headers, then `payload`, announced as `next_header` by the last header.
    pub fn packet(&self, next_header: u8, payload: &[u8]) -> Vec<u8> {
        let ext_len: usize = self.ext.iter().map(|e| e.size()).sum();
        // The next-header field of each header names the one after it.
        let mut chain: Vec<u8> = self.ext.iter().map(|e| e.protocol()).collect();
        chain.push(next_header);
        let mut p = Vec::with_capacity(40 + ext_len + payload.len());
        p.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
        p.extend_from_slice(&((ext_len + payload.len()) as u16).to_be_bytes());
        p.push(chain[0]);
        p.push(self.hop_limit);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        for (ext, &next) in self.ext.iter().zip(&chain[1..]) {
            ext.render(next, &mut p);
        }
        p.extend_from_slice(payload);
        p
    }
}

/// TCP header (and payload). The data offset follows the options unless overridden.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// The flags byte (see `smtpflow_common::rules::tcp_flags`).
    pub flags: u8,
    pub window: u16,
    /// Options, padded with zeros (end of option list) to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// The data offset field (header length in 32-bit words), when not the true length.
    pub data_offset: Option<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    /// A segment with a typical open window (64240).
    pub fn new(src_port: u16, dst_port: u16, flags: u8) -> Self {
        Self {
            src_port,
            dst_port,
            seq: 0x0100_0000,
            ack: 0,
            flags,
            window: 64240,
            options: Vec::new(),
            data_offset: None,
            payload: Vec::new(),
        }
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self.options.resize(options.len().next_multiple_of(4), 0);
        self
    }

    pub fn data_offset(mut self, words: u8) -> Self {
        self.data_offset = Some(words);
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let doff = self.data_offset.unwrap_or((hlen / 4) as u8);
        let mut s = Vec::with_capacity(hlen + self.payload.len());
        s.extend_from_slice(&self.src_port.to_be_bytes());
        s.extend_from_slice(&self.dst_port.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.push(doff << 4);
        s.push(self.flags);
        s.extend_from_slice(&self.window.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        s.extend_from_slice(&self.options);
        s.extend_from_slice(&self.payload);
        s
    }
}

impl Tcp {
    /// [`Tcp::bytes`] with the checksum over the pseudo-header of `src` and `dst` filled in.
    pub fn bytes_checksummed(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut s = self.bytes();
        let len = s.len();
        let sum = match (src, dst) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mut pseudo = [0u8; 12];
                pseudo[..4].copy_from_slice(&a.octets());
                pseudo[4..8].copy_from_slice(&b.octets());
                pseudo[9] = IPPROTO_TCP;
                pseudo[10..].copy_from_slice(&(len as u16).to_be_bytes());
                checksum(&[&pseudo, &s])
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mut pseudo = [0u8; 40];
                pseudo[..16].copy_from_slice(&a.octets());
                pseudo[16..32].copy_from_slice(&b.octets());
                pseudo[32..36].copy_from_slice(&(len as u32).to_be_bytes());
                pseudo[39] = IPPROTO_TCP;
                checksum(&[&pseudo, &s])
            }
            _ => panic!("mixed address families"),
        };
        s[16..18].copy_from_slice(&sum.to_be_bytes());
        s
    }
}

/// A UDP datagram.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + payload.len());
    d.extend_from_slice(&src_port.to_be_bytes());
    d.extend_from_slice(&dst_port.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]); // checksum
    d.extend_from_slice(payload);
    d
}

/// An ARP request (Ethernet/IPv4): who has `target_ip`, tell `sender_ip`. Ethertype [`ETH_P_ARP`].
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&[0, 1]); // hardware type: Ethernet
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.extend_from_slice(&[6, 4, 0, 1]); // address lengths, operation: request
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip.octets());
    a
}

/// An AF_PACKET/SOCK_RAW socket bound to one interface: frames go out exactly as given.
pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Opens the socket inside `ns`, bound to `ifname`. Protocol 0: it receives nothing.
    pub fn open(ns: &Netns, ifname: &str) -> Self {
        Self::try_open(ns, ifname).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RawSocket::open`] with the failure returned.
    pub fn try_open(ns: &Netns, ifname: &str) -> io::Result<Self> {
        let ifname = ifname.to_owned();
        let fd = in_netns(ns, move || -> io::Result<OwnedFd> {
            let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
            let failed = |what: String| {
                let e = io::Error::last_os_error();
                io::Error::new(e.kind(), format!("{what}: {e}"))
            };
            // SAFETY: plain socket syscalls with valid arguments.
            unsafe {
                let index = libc::if_nametoindex(name.as_ptr());
                if index == 0 {
                    return Err(failed(format!("no interface {name:?}")));
                }
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                if fd < 0 {
                    return Err(failed("AF_PACKET socket".to_owned()));
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                if rc != 0 {
                    return Err(failed(format!("bind AF_PACKET to {name:?}")));
                }
                Ok(fd)
            }
        })?;
        Ok(Self { fd })
    }

    /// Sends one frame; the kernel may refuse it (e.g. shorter than an Ethernet header).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: a valid buffer of `frame.len()` bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize != frame.len() => {
                Err(io::Error::other(format!("sent {n} of {} bytes", frame.len())))
            }
            _ => Ok(()),
        }
    }
}

/// Sends each frame out of `ifname` in `ns`, as given (no padding), panicking if one is refused.
pub fn send_frames(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) {
    let sock = RawSocket::open(ns, ifname);
    for (i, frame) in frames.iter().enumerate() {
        sock.send(frame).unwrap_or_else(|e| {
            panic!("sending frame {i} ({} bytes) on {ifname}: {e}\n{}", frame.len(), hex(frame))
        });
    }
}

/// Bytes as hex, 16 a line, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| line.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn tagged_ipv4_tcp_layout() {
        let ip = Ipv4::new(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2), IPPROTO_TCP)
            .options(&[1, 1, 1]);
        let f = Eth::new(A, B).qinq(10, 20).ipv4(&ip, &Tcp::new(40000, 25, 0x02).bytes());
        assert_eq!(f.len(), 14 + 8 + 24 + 20);
        assert_eq!(&f[12..22], &[0x88, 0xa8, 0, 10, 0x81, 0x00, 0, 20, 0x08, 0x00]);
        let ip = &f[22..];
        assert_eq!(ip[0], 0x46, "version 4, IHL 6");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 44, "total length");
        assert_eq!(&ip[20..24], &[1, 1, 1, 0], "options padded");
        let tcp = &ip[24..];
        assert_eq!(&tcp[..4], &[0x9c, 0x40, 0, 25]);
        assert_eq!(tcp[12], 0x50, "data offset 5");
        assert_eq!(tcp[13], 0x02);
        assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 64240);
    }

    #[test]
    fn fragment_fields() {
        let ip =
            Ipv4::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, IPPROTO_TCP).fragment(185, true);
        let p = ip.packet(&[]);
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), 0x2000 | 185);
    }

    #[test]
    fn ipv6_chain_links_next_headers() {
        let ip = Ipv6::new(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)
            .ext(Ext::HOP_BY_HOP)
            .ext(Ext::DestOpts { len: 1 })
            .ext(Ext::Routing)
            .ext(Ext::fragment(3, true));
        let p = ip.packet(IPPROTO_TCP, &[0xaa]);
        assert_eq!(p.len(), 40 + 8 + 16 + 8 + 8 + 1);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 41, "payload length");
        assert_eq!(p[6], NEXTHDR_HOP);
        assert_eq!(&p[40..48], &[NEXTHDR_DEST, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(&p[48..50], &[NEXTHDR_ROUTING, 1]);
        assert_eq!(&p[50..54], &[1, 12, 0, 0], "PadN over the rest");
        assert_eq!(p[64], NEXTHDR_FRAGMENT);
        assert_eq!(&p[72..76], &[IPPROTO_TCP, 0, 0, 3 << 3 | 1]);
        assert_eq!(p[80], 0xaa);
    }

    #[test]
    fn options_padding_sizes() {
        for n in 2..300 {
            let mut out = Vec::new();
            pad_options(n, &mut out);
            assert_eq!(out.len(), n, "{n}");
        }
    }
}
