//! Userspace-only helpers: `aya::Pod` for the shared types, and turning keys back into labels.
extern crate std;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    Config, CounterKey, DropConfig, FAMILY_V4, FAMILY_V6, FlowKey, FlowState, HistKey, Histogram,
    PayloadEvent, PeerCounters, PeerGreetingKey, PeerKey,
    flow_table::{FlowSet, FlowTags},
};

// SAFETY: all are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with no padding
// (the sizes are asserted in lib.rs and flow.rs), so every bit pattern is valid.
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for DropConfig {}
unsafe impl aya::Pod for CounterKey {}
unsafe impl aya::Pod for PeerKey {}
unsafe impl aya::Pod for PeerCounters {}
unsafe impl aya::Pod for PeerGreetingKey {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowState {}
unsafe impl aya::Pod for FlowSet {}
unsafe impl aya::Pod for FlowTags {}
unsafe impl aya::Pod for HistKey {}
unsafe impl aya::Pod for Histogram {}
unsafe impl aya::Pod for PayloadEvent {}

impl Config {
    /// Builds the kernel configuration from the SMTP ports and those of them whose replies are
    /// read, with the default handshake timeout; `None` when there are too many ports.
    pub fn from_ports(ports: &[u16], plaintext: &[u16]) -> Option<Self> {
        if ports.len() > crate::MAX_PORTS {
            return None;
        }
        let mut cfg = Config::EMPTY;
        cfg.ports[..ports.len()].copy_from_slice(ports);
        cfg.port_count = ports.len() as u32;
        cfg.handshake_timeout_ns = crate::DEFAULT_HANDSHAKE_TIMEOUT_NS;
        // Random per process: the std hasher's keys are.
        cfg.flow_seed = {
            use std::hash::BuildHasher as _;
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
        };
        for (i, &p) in ports.iter().enumerate() {
            cfg.port_set[usize::from(p >> 6)] |= 1 << (p & 63);
            if plaintext.contains(&p) {
                cfg.plaintext_mask |= 1 << i;
            }
        }
        Some(cfg)
    }
}

impl Config {
    /// Gives the watched interfaces their slots, in order, and the smallest
    /// [`Config::iface_mask`] that tells them apart; `None` when there are more than
    /// [`crate::MAX_IFACES`], or two that no mask up to [`crate::MAX_IFACE_MASK`] tells apart
    /// (their ifindexes differ by a multiple of 65,536).
    pub fn set_ifaces(&mut self, ifindexes: &[u32]) -> Option<()> {
        if ifindexes.len() > crate::MAX_IFACES {
            return None;
        }
        let apart = |mask: u32| {
            let mut seen = std::collections::BTreeSet::new();
            ifindexes.iter().all(|&i| seen.insert(i & mask))
        };
        let mask = (0..=16).map(|bits| (1u32 << bits) - 1).find(|&m| apart(m))?;
        self.ifindexes = [0; crate::MAX_IFACES];
        self.ifindexes[..ifindexes.len()].copy_from_slice(ifindexes);
        self.iface_count = ifindexes.len() as u32;
        self.iface_mask = mask;
        Some(())
    }

    /// The watched interfaces, by slot.
    pub fn ifaces(&self) -> &[u32] {
        &self.ifindexes[..(self.iface_count as usize).min(crate::MAX_IFACES)]
    }

    /// Every watched scope with its [`Config::scope_index`].
    pub fn scopes(&self) -> impl Iterator<Item = (u32, crate::Scope)> + '_ {
        self.scope_keys().map(|(_, at, scope)| (at, scope))
    }

    /// Every watched scope with its [`Config::scope_key`] and [`Config::scope_index`]: what the
    /// loader writes into the `SCOPES` map.
    pub fn scope_keys(&self) -> impl Iterator<Item = (u32, u32, crate::Scope)> + '_ {
        self.ifaces().iter().zip(0u32..).flat_map(move |(&ifindex, slot)| {
            self.ports().iter().enumerate().flat_map(move |(index, &port)| {
                crate::Direction::ALL.into_iter().map(move |direction| {
                    let key = self.scope_key(ifindex, index, direction);
                    let at = self.scope_index(slot, index, direction);
                    (key, at, crate::Scope { ifindex, port, direction })
                })
            })
        })
    }
}

impl PeerKey {
    /// The peer address as Rust's `IpAddr` (displayed compressed and lower case for IPv6).
    pub fn ip(&self) -> Option<IpAddr> {
        match self.family {
            FAMILY_V4 => {
                let [a, b, c, d, ..] = self.addr;
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(self.addr))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn peer_addresses_display_like_ipaddr() {
        let mut k =
            PeerKey { ifindex: 1, addr: [0; 16], port: 25, family: FAMILY_V4, direction: 0 };
        k.addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(k.ip().unwrap().to_string(), "192.0.2.7");
        k.family = FAMILY_V6;
        k.addr = "2001:DB8:0:0:0:0:0:1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(k.ip().unwrap().to_string(), "2001:db8::1");
        k.family = 9;
        assert_eq!(k.ip(), None);
    }

    #[test]
    fn scopes_number_every_slot_once() {
        let mut c = Config::from_ports(&[25, 465, 587], &[25]).unwrap();
        c.set_ifaces(&[7, 3]).unwrap();
        let scopes: std::vec::Vec<_> = c.scopes().collect();
        assert_eq!(scopes.len(), c.scope_count() as usize);
        let mut at: std::vec::Vec<u32> = scopes.iter().map(|(i, _)| *i).collect();
        at.sort_unstable();
        assert_eq!(at, (0..c.scope_count()).collect::<std::vec::Vec<_>>(), "dense, no repeats");
        let (i, s) = scopes[scopes.len() - 1];
        assert_eq!((i, s.ifindex, s.port, s.direction), (11, 3, 587, crate::Direction::ALL[1]));
        let keys: std::collections::BTreeSet<u32> = c.scope_keys().map(|(k, ..)| k).collect();
        assert_eq!(keys.len(), scopes.len(), "distinct keys");
        assert!(keys.iter().all(|&k| k < c.scope_keys_len()));
        assert_eq!(c.iface_mask, 7, "7 and 3 share their two low bits, not three");
        assert!(c.set_ifaces(&[1; crate::MAX_IFACES + 1]).is_none());
        assert!(c.set_ifaces(&[5, 5 + 65_536]).is_none(), "no mask tells them apart");
        c.set_ifaces(&[2]).unwrap();
        assert_eq!((c.iface_mask, c.scope_keys_len()), (0, 32), "one interface: no mask");
    }

    #[test]
    fn config_from_ports() {
        let c = Config::from_ports(&[25, 465, 587], &[25, 587]).unwrap();
        assert_eq!(c.ports(), &[25, 465, 587]);
        assert!(c.is_plaintext(0) && !c.is_plaintext(1) && c.is_plaintext(2) && !c.is_plaintext(3));
        let set: std::vec::Vec<u16> = (0..=u16::MAX).filter(|&p| c.is_smtp_port(p)).collect();
        assert_eq!(set, [25, 465, 587]);
        let edges = Config::from_ports(&[0, 63, 64, 65535], &[]).unwrap();
        assert!([0, 63, 64, 65535].iter().all(|&p| edges.is_smtp_port(p)));
        assert_eq!((0..=u16::MAX).filter(|&p| edges.is_smtp_port(p)).count(), 4);
        assert!(Config::from_ports(&[1; 17], &[]).is_none());
        assert_eq!(Config::from_ports(&[7; 16], &[]).unwrap().ports().len(), 16);
    }
}
