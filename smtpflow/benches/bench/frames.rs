//! Ethernet frames for the benchmarks, built with the tests' frame builders
//! (`smtpflow_tests::frames`), with valid IPv4 and TCP checksums (the live SYN generator sends
//! them through a real TCP stack).
use std::net::{IpAddr, Ipv4Addr};

pub use smtpflow_common::rules::tcp_flags::{ACK, PSH, RST, SYN};
use smtpflow_tests::frames::{self as f, ETH_P_ARP, ETH_P_IP, Eth, IPPROTO_TCP, IPPROTO_UDP};
pub use smtpflow_tests::frames::{ETH_P_8021AD, ETH_P_8021Q, checksum};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// The options a Linux SYN carries: MSS, SACK permitted, timestamps, window scale (20 bytes).
pub const SYN_OPTIONS: [u8; 20] =
    [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
/// The options of an established segment: NOP, NOP, timestamps (12 bytes).
pub const DATA_OPTIONS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 1];

/// A TCP segment to build.
#[derive(Clone)]
pub struct Tcp<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// TPIDs of VLAN tags, outermost first (each gets VLAN id 100).
    pub vlans: &'a [u16],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

impl Tcp<'_> {
    /// A client SYN from `src:sport` to `dst:dport`.
    pub fn syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Tcp<'static> {
        Tcp {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            vlans: &[],
            src,
            dst,
            sport,
            dport,
            flags: SYN,
            seq: 1000,
            ack: 0,
            window: 64240,
            options: &SYN_OPTIONS,
            payload: &[],
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4), "TCP options must be 32-bit aligned");
        let segment = f::Tcp {
            seq: self.seq,
            ack: self.ack,
            window: self.window,
            ..f::Tcp::new(self.sport, self.dport, self.flags)
        }
        .options(self.options)
        .payload(self.payload)
        .bytes_checksummed(self.src, self.dst);
        ip_frame(self.src_mac, self.dst_mac, self.vlans, self.src, self.dst, IPPROTO_TCP, &segment)
    }
}

/// An IP packet carrying `proto` with `l4` (whose checksum is already set) in a frame.
pub fn ip_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlans: &[u16],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let eth = vlans.iter().fold(Eth::new(dst_mac, src_mac), |eth, tpid| eth.tag(*tpid, 100));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = f::Ipv4 { dont_fragment: true, ..f::Ipv4::new(s, d, proto) };
            eth.frame(ETH_P_IP, &ip.packet_checksummed(l4))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(&f::Ipv6::new(s, d), proto, l4),
        _ => panic!("mixed address families"),
    }
}

/// A UDP datagram (a DNS query's size) between two IPv4 addresses.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    // The checksum is optional over IPv4.
    ip_frame(MAC_A, MAC_B, &[], src, dst, IPPROTO_UDP, &f::udp(sport, dport, &[0x5a; 40]))
}

/// An ARP request (who-has), padded to the minimum frame size.
pub fn arp() -> Vec<u8> {
    let who_has = f::arp_request(MAC_A, Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
    let mut frame = Eth::new([0xff; 6], MAC_A).frame(ETH_P_ARP, &who_has);
    frame.resize(60, 0);
    frame
}

/// Rewrites an IPv4 TCP frame (no VLAN tags) in place with a new source address and port,
/// fixing both checksums. For the live SYN generator, which sends millions of frames.
pub fn set_v4_source(frame: &mut [u8], src: [u8; 4], sport: u16) {
    const IP: usize = 14;
    let ihl = usize::from(frame[IP] & 0x0f) * 4;
    let tcp = IP + ihl;
    frame[IP + 12..IP + 16].copy_from_slice(&src);
    frame[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&frame[IP..IP + ihl]]);
    frame[IP + 10..IP + 12].copy_from_slice(&sum.to_be_bytes());
    frame[tcp..tcp + 2].copy_from_slice(&sport.to_be_bytes());
    frame[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
    let total = usize::from(u16::from_be_bytes([frame[IP + 2], frame[IP + 3]]));
    let tcp_len = total - ihl;
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&frame[IP + 12..IP + 16]);
    pseudo[4..8].copy_from_slice(&frame[IP + 16..IP + 20]);
    pseudo[9] = IPPROTO_TCP;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = checksum(&[&pseudo, &frame[tcp..tcp + tcp_len]]);
    frame[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
}
