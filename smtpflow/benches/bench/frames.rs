//! Ethernet frames for the benchmarks, with valid IPv4 and TCP checksums (the live SYN generator
//! sends them through a real TCP stack).
use std::net::IpAddr;

pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

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
        let mut tcp = Vec::with_capacity(20 + self.options.len() + self.payload.len());
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        assert!(self.options.len().is_multiple_of(4), "TCP options must be 32-bit aligned");
        tcp.push((((20 + self.options.len()) / 4) as u8) << 4);
        tcp.push(self.flags);
        tcp.extend_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(self.options);
        tcp.extend_from_slice(self.payload);
        let sum = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut pseudo = Vec::with_capacity(12);
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, 6]);
                pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                checksum(&[&pseudo, &tcp])
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut pseudo = Vec::with_capacity(40);
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 6]);
                checksum(&[&pseudo, &tcp])
            }
            _ => panic!("mixed address families"),
        };
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        ip_frame(self.src_mac, self.dst_mac, self.vlans, self.src, self.dst, 6, &tcp)
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

fn eth(src: [u8; 6], dst: [u8; 6], vlans: &[u16], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for tpid in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&100u16.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
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
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut f = eth(src_mac, dst_mac, vlans, ETH_P_IP);
            let start = f.len();
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]); // id, DF, ttl, proto
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            let sum = checksum(&[&f[start..start + 20]]);
            f[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(l4);
            f
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(src_mac, dst_mac, vlans, ETH_P_IPV6);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(l4);
            f
        }
        _ => panic!("mixed address families"),
    }
}

/// A UDP datagram (a DNS query's size) between two IPv4 addresses.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let payload = [0x5au8; 40];
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // checksum optional over IPv4
    udp.extend_from_slice(&payload);
    ip_frame(MAC_A, MAC_B, &[], src, dst, 17, &udp)
}

/// An ARP request (who-has).
pub fn arp() -> Vec<u8> {
    let mut f = eth(MAC_A, [0xff; 6], &[], ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[192, 0, 2, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[192, 0, 2, 2]);
    f.resize(60, 0); // minimum frame size
    f
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
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = checksum(&[&pseudo, &frame[tcp..tcp + tcp_len]]);
    frame[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
}
