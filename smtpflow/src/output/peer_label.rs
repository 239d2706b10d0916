//! `--peer-label`: how peers are written in exported series and log lines, so a gateway can
//! export its peers without exposing full client addresses. Peers that share a label (a prefix)
//! are summed into one series.
use std::net::IpAddr;

use sha2::{Digest as _, Sha256};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerLabel {
    /// The address, as Rust's `IpAddr` displays it.
    Ip,
    /// The network of the address: `192.0.2.0/24`, `2001:db8::/64`.
    Prefix { v4: u8, v6: u8 },
    /// A keyed hash of the address (`h:` and 16 hex digits): peers can be followed across
    /// series and gateways sharing the key, not identified.
    Hash { key: Vec<u8> },
}

impl PeerLabel {
    /// The address bytes every peer sharing `addr`'s label shares (a key's `family` and `addr`):
    /// its network with `Prefix`, the address itself otherwise. Cheap, for every entry of a
    /// read; the label string is only made for the labels exported.
    pub fn group(&self, family: u8, addr: &[u8; 16]) -> [u8; 16] {
        let bits = match (self, family) {
            (PeerLabel::Prefix { v4, .. }, smtpflow_common::FAMILY_V4) => (*v4).min(32),
            (PeerLabel::Prefix { v6, .. }, _) => (*v6).min(128),
            _ => return *addr,
        };
        let mut out = [0u8; 16];
        let (whole, rest) = (usize::from(bits / 8), bits % 8);
        out[..whole].copy_from_slice(&addr[..whole]);
        if rest > 0 {
            out[whole] = addr[whole] & (0xff << (8 - rest));
        }
        out
    }

    pub fn label(&self, ip: IpAddr) -> String {
        match self {
            PeerLabel::Ip => ip.to_string(),
            PeerLabel::Prefix { v4, v6 } => match ip {
                IpAddr::V4(a) => {
                    let bits = u32::from(*v4.min(&32));
                    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                    format!("{}/{bits}", std::net::Ipv4Addr::from(u32::from(a) & mask))
                }
                IpAddr::V6(a) => {
                    let bits = u32::from(*v6.min(&128));
                    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                    format!("{}/{bits}", std::net::Ipv6Addr::from(u128::from(a) & mask))
                }
            },
            PeerLabel::Hash { key } => {
                let mut h = Sha256::new();
                h.update(key);
                h.update(ip.to_string().as_bytes());
                let digest = h.finalize();
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("h:{hex}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn labels() {
        assert_eq!(PeerLabel::Ip.label(ip("2001:DB8::1")), "2001:db8::1");
        let p = PeerLabel::Prefix { v4: 24, v6: 64 };
        assert_eq!(p.label(ip("192.0.2.77")), "192.0.2.0/24");
        assert_eq!(p.label(ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(PeerLabel::Prefix { v4: 0, v6: 0 }.label(ip("192.0.2.1")), "0.0.0.0/0");
        assert_eq!(PeerLabel::Prefix { v4: 40, v6: 200 }.label(ip("192.0.2.1")), "192.0.2.1/32");
        let h = PeerLabel::Hash { key: b"k".to_vec() };
        let a = h.label(ip("192.0.2.1"));
        assert!(a.starts_with("h:") && a.len() == 18, "{a}");
        assert_eq!(a, h.label(ip("192.0.2.1")), "stable");
        assert_ne!(a, h.label(ip("192.0.2.2")));
        assert_ne!(a, PeerLabel::Hash { key: b"other".to_vec() }.label(ip("192.0.2.1")), "keyed");
    }

    #[test]
    fn groups_are_what_a_label_keeps_of_the_address() {
        let v4 = |a: [u8; 4]| {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&a);
            x
        };
        let p = PeerLabel::Prefix { v4: 22, v6: 64 };
        assert_eq!(p.group(4, &v4([192, 0, 7, 77])), v4([192, 0, 4, 0]));
        assert_eq!(
            PeerLabel::Prefix { v4: 40, v6: 0 }.group(4, &v4([1, 2, 3, 4])),
            v4([1, 2, 3, 4])
        );
        let v6: [u8; 16] = "2001:db8:1:2:3:4:5:6".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let net: [u8; 16] = "2001:db8:1:2::".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(p.group(6, &v6), net);
        assert_eq!(PeerLabel::Ip.group(6, &v6), v6);
        assert_eq!(PeerLabel::Hash { key: vec![1] }.group(6, &v6), v6);
    }
}
