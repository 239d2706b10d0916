//! Seeded randomness, and the seed corpus: well-formed frames and where their headers are.
use std::net::{Ipv4Addr, Ipv6Addr};

use smtpflow_common::rules::tcp_flags::{ACK, FIN, PSH, RST, SYN};
use smtpflow_tests::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, Eth, Ext, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6,
    NEXTHDR_NONE, Tcp, arp_request, udp,
};

/// SplitMix64: tiny, fast, and plenty for choosing mutations.
#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The generator of frame `index` of run `seed`: every frame can be made again on its own.
    pub(crate) fn for_frame(seed: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next();
        r
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// True with probability `p` percent.
    pub(crate) fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    pub(crate) fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// One of `xs`, or (as often as any one of them) a random value.
    pub(crate) fn pick16(&mut self, xs: &[u16]) -> u16 {
        match self.below(xs.len() + 1) {
            i if i < xs.len() => xs[i],
            _ => self.next() as u16,
        }
    }

    pub(crate) fn pick8(&mut self, xs: &[u8]) -> u8 {
        match self.below(xs.len() + 1) {
            i if i < xs.len() => xs[i],
            _ => self.byte(),
        }
    }

    pub(crate) fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

// ---------------------------------------------------------------------------------------------
// The seed corpus: well-formed frames, and where their headers are.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L3 {
    V4,
    V6,
    Other,
}

/// A frame and the offsets of its headers, kept up to date by the structural mutations (an
/// offset becomes `None` when its header is cut out).
#[derive(Clone, Debug)]
pub(crate) struct Shaped {
    pub(crate) frame: Vec<u8>,
    pub(crate) l3_kind: L3,
    pub(crate) l3: Option<usize>,
    /// IPv6 extension headers, in order.
    pub(crate) ext: Vec<usize>,
    /// TCP (or UDP) header.
    pub(crate) l4: Option<usize>,
}

impl Shaped {
    pub(crate) fn shift(off: &mut Option<usize>, at: usize, by: isize) {
        if let Some(o) = *off
            && o >= at
        {
            *off = o.checked_add_signed(by);
        }
    }

    pub(crate) fn insert(&mut self, at: usize, bytes: &[u8]) {
        let at = at.min(self.frame.len());
        self.frame.splice(at..at, bytes.iter().copied());
        let n = bytes.len() as isize;
        Self::shift(&mut self.l3, at, n);
        Self::shift(&mut self.l4, at, n);
        for e in &mut self.ext {
            if *e >= at {
                *e += bytes.len();
            }
        }
    }

    pub(crate) fn remove(&mut self, at: usize, n: usize) {
        let end = (at + n).min(self.frame.len());
        if at >= end {
            return;
        }
        self.frame.drain(at..end);
        let gone = |o: usize| (at..end).contains(&o);
        let fix = |o: Option<usize>| match o {
            Some(o) if gone(o) => None,
            Some(o) if o >= end => Some(o - (end - at)),
            o => o,
        };
        self.l3 = fix(self.l3);
        self.l4 = fix(self.l4);
        self.ext = self.ext.iter().filter_map(|&o| fix(Some(o))).collect();
    }

    /// Sets the byte at `at` if the frame has it.
    pub(crate) fn set(&mut self, at: usize, v: u8) {
        if let Some(b) = self.frame.get_mut(at) {
            *b = v;
        }
    }

    pub(crate) fn set16(&mut self, at: usize, v: u16) {
        let [hi, lo] = v.to_be_bytes();
        self.set(at, hi);
        self.set(at + 1, lo);
    }

    pub(crate) fn get(&self, at: usize) -> u8 {
        self.frame.get(at).copied().unwrap_or(0)
    }
}

pub(crate) const MAC_GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub(crate) const MAC_PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// MSS, SACK permitted, timestamps, NOP, window scale.
pub(crate) const SYN_OPTIONS: [u8; 20] =
    [2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
/// NOP, NOP, timestamps.
pub(crate) const DATA_OPTIONS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 1];

pub(crate) fn peer_v4() -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 7)
}

pub(crate) fn gw_v4() -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1)
}

pub(crate) fn peer_v6() -> Ipv6Addr {
    "2001:db8::7".parse().unwrap()
}

pub(crate) fn gw_v6() -> Ipv6Addr {
    "2001:db8::1".parse().unwrap()
}

pub(crate) fn tcp_seed(eth: &Eth, ip: &Ipv4, tcp: &Tcp) -> Shaped {
    let l3 = 14 + 4 * eth.tags.len();
    Shaped {
        frame: eth.ipv4(ip, &tcp.bytes()),
        l3_kind: L3::V4,
        l3: Some(l3),
        ext: Vec::new(),
        l4: Some(l3 + 20 + ip.options.len()),
    }
}

pub(crate) fn tcp6_seed(eth: &Eth, ip: &Ipv6, next: u8, l4: &[u8]) -> Shaped {
    let l3 = 14 + 4 * eth.tags.len();
    let mut ext = Vec::new();
    let mut at = l3 + 40;
    for e in &ip.ext {
        ext.push(at);
        at += e.size();
    }
    Shaped { frame: eth.ipv6(ip, next, l4), l3_kind: L3::V6, l3: Some(l3), ext, l4: Some(at) }
}

/// The TCP segments of the corpus: every event, non-events, both directions, SMTP and not.
pub(crate) fn segments() -> Vec<Tcp> {
    let to = |port, flags| Tcp::new(40000, port, flags);
    let from = |port, flags| Tcp::new(port, 40000, flags);
    vec![
        to(25, SYN).options(&SYN_OPTIONS),
        to(465, SYN).options(&SYN_OPTIONS),
        to(587, SYN),
        from(25, SYN | ACK).options(&SYN_OPTIONS),
        from(465, SYN | ACK),
        to(25, RST),
        from(587, RST | ACK),
        to(25, ACK).window(0),
        from(25, PSH | ACK).window(0).options(&DATA_OPTIONS).payload(b"250 ok\r\n"),
        to(25, FIN | ACK).window(0),
        to(25, PSH | ACK).options(&DATA_OPTIONS).payload(b"EHLO client.example\r\n"),
        from(25, PSH | ACK).options(&DATA_OPTIONS).payload(b"220 mx.example ESMTP\r\n"),
        from(587, ACK).window(501),
        Tcp::new(25, 587, SYN),
        Tcp::new(80, 443, SYN),
        Tcp::new(2525, 40001, RST),
    ]
}

pub(crate) fn corpus() -> Vec<Shaped> {
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let v4 = || Ipv4::new(peer_v4(), gw_v4(), IPPROTO_TCP);
    let v6 = || Ipv6::new(peer_v6(), gw_v6());
    let syn = Tcp::new(40000, 25, SYN).options(&SYN_OPTIONS);
    let data = Tcp::new(25, 40000, PSH | ACK).window(0).payload(b"421 busy\r\n");
    let mut c = Vec::new();

    // Every segment over plain IPv4 and IPv6.
    for t in segments() {
        c.push(tcp_seed(&eth, &v4(), &t));
        c.push(tcp6_seed(&eth, &v6(), IPPROTO_TCP, &t.bytes()));
    }
    // VLAN stacks.
    let stacks: [&[u16]; 6] = [
        &[ETH_P_8021Q],
        &[ETH_P_8021AD],
        &[ETH_P_8021AD, ETH_P_8021Q],
        &[ETH_P_8021Q, ETH_P_8021Q],
        &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q],
        &[ETH_P_8021Q, ETH_P_8021Q, ETH_P_8021Q, ETH_P_8021Q],
    ];
    for tags in stacks {
        let tagged = tags.iter().fold(eth.clone(), |e, &t| e.tag(t, 100));
        c.push(tcp_seed(&tagged, &v4(), &syn));
        c.push(tcp6_seed(&tagged, &v6(), IPPROTO_TCP, &data.bytes()));
    }
    // IPv4 options, fragments, flags.
    let record_route = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for ip in [
        v4().options(&[1, 1, 1, 0]),
        v4().options(&record_route),
        v4().options(&[1; 40]),
        v4().fragment(0, true),
        v4().fragment(185, false),
        v4().fragment(1, true),
        Ipv4 { dont_fragment: true, ..v4() },
        v4().total_len(20),
        v4().total_len(1500),
    ] {
        c.push(tcp_seed(&eth, &ip, &syn));
        c.push(tcp_seed(&eth, &ip, &data));
    }
    // IPv6 extension-header chains.
    let chains: Vec<Vec<Ext>> = vec![
        vec![Ext::HOP_BY_HOP],
        vec![Ext::DEST_OPTS, Ext::Routing],
        vec![Ext::HOP_BY_HOP, Ext::DEST_OPTS, Ext::Routing, Ext::fragment(0, false)],
        vec![Ext::fragment(0, true)],
        vec![Ext::fragment(185, true)],
        vec![Ext::HopByHop { len: 3 }, Ext::fragment(1, false)],
        vec![Ext::DEST_OPTS; 7],
        vec![Ext::DEST_OPTS; 8],
        vec![Ext::DEST_OPTS; 9],
        vec![Ext::HopByHop { len: 119 }],
        vec![Ext::HopByHop { len: 120 }],
        vec![Ext::HopByHop { len: 121 }],
        vec![Ext::HopByHop { len: 118 }, Ext::DEST_OPTS],
        vec![Ext::HopByHop { len: 120 }, Ext::DEST_OPTS],
    ];
    for chain in chains {
        let ip = chain.iter().fold(v6(), |ip, &e| ip.ext(e));
        c.push(tcp6_seed(&eth, &ip, IPPROTO_TCP, &syn.bytes()));
        c.push(tcp6_seed(&eth, &ip, IPPROTO_TCP, &data.bytes()));
    }
    // The depth limit from both sides with VLAN tags: a TCP header at 1026 (one tag, 968-byte
    // hop-by-hop) is too deep, one at 1022 (two tags, 960 bytes) is not.
    let tagged = eth.clone().dot1q(100);
    c.push(tcp6_seed(&tagged, &v6().ext(Ext::HopByHop { len: 120 }), IPPROTO_TCP, &syn.bytes()));
    let qinq = eth.clone().qinq(200, 100);
    c.push(tcp6_seed(&qinq, &v6().ext(Ext::HopByHop { len: 119 }), IPPROTO_TCP, &syn.bytes()));
    // Not TCP.
    let u = udp(40000, 25, b"EHLO x\r\n");
    let mut udp4 = tcp_seed(&eth, &v4().protocol(IPPROTO_UDP), &syn);
    udp4.frame = eth.ipv4(&v4().protocol(IPPROTO_UDP), &u);
    c.push(udp4);
    c.push(tcp6_seed(&eth, &v6().ext(Ext::HOP_BY_HOP), IPPROTO_UDP, &u));
    c.push(tcp6_seed(&eth, &v6(), NEXTHDR_NONE, &syn.bytes()));
    c.push(Shaped {
        frame: eth.frame(ETH_P_ARP, &arp_request(MAC_PEER, peer_v4(), gw_v4())),
        l3_kind: L3::Other,
        l3: Some(14),
        ext: Vec::new(),
        l4: None,
    });
    c
}
