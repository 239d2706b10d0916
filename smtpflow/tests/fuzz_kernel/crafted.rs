//! The crafted cases of `tests/tests/frames.rs`, against the reference and the kernel.
use std::net::IpAddr;

use smtpflow_common::{
    Direction, Event, Side,
    reference::{self, Effect, Malformed},
    rules::tcp_flags::{ACK, FIN, PSH, RST, SYN},
};
use smtpflow_tests::{
    frames::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, Eth, Ext, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6,
        NEXTHDR_NONE, Tcp, arp_request, hex, udp,
    },
    require_root,
};

use super::{
    MAX_FRAME, MIN_FRAME, PORTS,
    corpus::{MAC_GW, MAC_PEER, SYN_OPTIONS, corpus, gw_v4, gw_v6, peer_v4, peer_v6},
    mutate::mutant,
    programs::{Hook, Kernel, counts_of, expected, kernel_available, lo_ifindex},
};

/// The effect a crafted case must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Counted(Event, Direction, u16),
    Ignored,
    Malformed,
}

pub(crate) struct Crafted {
    pub(crate) name: &'static str,
    pub(crate) frame: Vec<u8>,
    pub(crate) want: Want,
}

pub(crate) fn crafted() -> Vec<Crafted> {
    use Want::{Counted, Ignored, Malformed};
    pub(crate) const IN: Direction = Direction::Inbound;
    pub(crate) const OUT: Direction = Direction::Outbound;
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let v4 = || Ipv4::new(peer_v4(), gw_v4(), IPPROTO_TCP);
    let v6 = || Ipv6::new(peer_v6(), gw_v6());
    let to = |port, flags| Tcp::new(40000, port, flags);
    let from = |port, flags| Tcp::new(port, 40000, flags);
    let syn_to = |port| to(port, SYN).bytes();
    let syn = |port| Counted(Event::Syn, IN, port);
    let cut = |mut f: Vec<u8>, n| {
        f.truncate(n);
        f
    };
    let c = |name, want, frame| Crafted { name, frame, want };
    let dest8 = (0..8).fold(v6(), |ip, _| ip.ext(Ext::DEST_OPTS));
    let dest9 = dest8.clone().ext(Ext::DEST_OPTS);
    vec![
        c("IPv4 SYN to 25", syn(25), eth.ipv4(&v4(), &syn_to(25))),
        c("802.1Q IPv4 SYN", syn(25), eth.clone().dot1q(100).ipv4(&v4(), &syn_to(25))),
        c("QinQ IPv4 SYN", syn(25), eth.clone().qinq(200, 100).ipv4(&v4(), &syn_to(25))),
        c(
            "IPv4 IHL 8 SYN to 465",
            syn(465),
            eth.ipv4(&v4().options(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]), &syn_to(465)),
        ),
        c("IPv6 SYN to 587", syn(587), eth.ipv6(&v6(), IPPROTO_TCP, &syn_to(587))),
        c(
            "IPv6 SYN behind 4 extension headers",
            syn(587),
            eth.ipv6(
                &v6()
                    .ext(Ext::HOP_BY_HOP)
                    .ext(Ext::DEST_OPTS)
                    .ext(Ext::Routing)
                    .ext(Ext::fragment(0, false)),
                IPPROTO_TCP,
                &syn_to(587),
            ),
        ),
        c("802.1Q IPv6 SYN", syn(25), eth.clone().dot1q(100).ipv6(&v6(), IPPROTO_TCP, &syn_to(25))),
        c("IPv4 first fragment", syn(25), eth.ipv4(&v4().fragment(0, true), &syn_to(25))),
        c(
            "IPv6 first fragment",
            syn(25),
            eth.ipv6(&v6().ext(Ext::fragment(0, true)), IPPROTO_TCP, &syn_to(25)),
        ),
        c(
            "SYN with options",
            syn(465),
            eth.ipv4(&v4(), &to(465, SYN).options(&SYN_OPTIONS).bytes()),
        ),
        c(
            "SYN-ACK from 25",
            Counted(Event::SynAck, OUT, 25),
            eth.ipv4(&v4(), &from(25, SYN | ACK).bytes()),
        ),
        c(
            "RST|ACK to 587",
            Counted(Event::Rst, IN, 587),
            eth.ipv4(&v4(), &to(587, RST | ACK).bytes()),
        ),
        c(
            "RST|SYN to 25",
            Counted(Event::Rst, IN, 25),
            eth.ipv4(&v4(), &to(25, RST | SYN).bytes()),
        ),
        c(
            "ACK window 0 to 25",
            Counted(Event::ZeroWindow, IN, 25),
            eth.ipv4(&v4(), &to(25, ACK).window(0).bytes()),
        ),
        c(
            "PSH|ACK window 0 from 25",
            Counted(Event::ZeroWindow, OUT, 25),
            eth.ipv4(&v4(), &from(25, PSH | ACK).window(0).payload(b"250 ok\r\n").bytes()),
        ),
        c("SYN 25 -> 587", syn(587), eth.ipv4(&v4(), &Tcp::new(25, 587, SYN).bytes())),
        c(
            "IPv6 SYN-ACK from 465",
            Counted(Event::SynAck, OUT, 465),
            eth.ipv6(&v6(), IPPROTO_TCP, &from(465, SYN | ACK).bytes()),
        ),
        c(
            "IPv6 RST behind 8 destination options",
            Counted(Event::Rst, IN, 25),
            eth.ipv6(&dest8, IPPROTO_TCP, &to(25, RST).bytes()),
        ),
        c(
            "IPv4 total length 20, SYN as a trailer",
            syn(25),
            eth.ipv4(&v4().total_len(20), &syn_to(25)),
        ),
        c(
            "IPv6 SYN at offset 1022",
            syn(25),
            eth.ipv6(&v6().ext(Ext::HopByHop { len: 120 }), IPPROTO_TCP, &syn_to(25)),
        ),
        c("FIN|ACK window 0", Ignored, eth.ipv4(&v4(), &to(25, FIN | ACK).window(0).bytes())),
        c("ACK window 5", Ignored, eth.ipv4(&v4(), &to(25, ACK).window(5).bytes())),
        c("SYN 80 -> 443", Ignored, eth.ipv4(&v4(), &Tcp::new(80, 443, SYN).bytes())),
        c("IPv4 non-first fragment", Ignored, eth.ipv4(&v4().fragment(185, false), &syn_to(25))),
        c(
            "IPv6 non-first fragment",
            Ignored,
            eth.ipv6(&v6().ext(Ext::fragment(185, true)), IPPROTO_TCP, &syn_to(25)),
        ),
        c(
            "UDP to 25",
            Ignored,
            eth.ipv4(&v4().protocol(IPPROTO_UDP), &udp(40000, 25, b"EHLO x\r\n")),
        ),
        c("ARP", Ignored, eth.frame(ETH_P_ARP, &arp_request(MAC_PEER, peer_v4(), gw_v4()))),
        c("IPv6 no next header", Ignored, eth.ipv6(&v6(), NEXTHDR_NONE, &syn_to(25))),
        c("IPv6 9 destination options", Ignored, eth.ipv6(&dest9, IPPROTO_TCP, &syn_to(25))),
        c(
            "IPv6 SYN at offset 1030",
            Ignored,
            eth.ipv6(&v6().ext(Ext::HopByHop { len: 121 }), IPPROTO_TCP, &syn_to(25)),
        ),
        c("3 VLAN tags", Ignored, eth.clone().qinq(300, 200).dot1q(100).ipv4(&v4(), &syn_to(25))),
        c("IPv4 IHL 4", Malformed, eth.ipv4(&v4().ihl(4), &syn_to(25))),
        c("IPv4 IHL 15 in 54 bytes", Malformed, eth.ipv4(&v4().ihl(15), &syn_to(25))),
        c("IPv4 version 6", Malformed, eth.ipv4(&v4().version(6), &syn_to(25))),
        c("IPv4 cut after 10", Malformed, cut(eth.ipv4(&v4(), &syn_to(25)), 24)),
        c("Ethernet only", Malformed, cut(eth.ipv4(&v4(), &syn_to(25)), 14)),
        c("TCP data offset 4", Malformed, eth.ipv4(&v4(), &to(25, SYN).data_offset(4).bytes())),
        c(
            "TCP data offset 15 in 54 bytes",
            Malformed,
            eth.ipv4(&v4(), &to(25, SYN).data_offset(15).bytes()),
        ),
        c("TCP cut after 12", Malformed, cut(eth.ipv4(&v4(), &syn_to(25)), 46)),
        c("IPv6 cut after 30", Malformed, cut(eth.ipv6(&v6(), IPPROTO_TCP, &syn_to(25)), 44)),
        c(
            "IPv6 TCP data offset 4",
            Malformed,
            eth.ipv6(&v6(), IPPROTO_TCP, &to(587, SYN).data_offset(4).bytes()),
        ),
        c(
            "IPv6 hop-by-hop past the end",
            Malformed,
            cut(eth.ipv6(&v6().ext(Ext::HopByHop { len: 10 }), IPPROTO_TCP, &syn_to(25)), 70),
        ),
        // At a real TC ingress the kernel drops this before the program; a test run hands it
        // over as is, like XDP.
        c(
            "802.1Q tag cut after 2 bytes",
            Malformed,
            cut(eth.clone().dot1q(100).ipv4(&v4(), &syn_to(25)), 16),
        ),
    ]
}

pub(crate) fn want_of(e: &Effect) -> Want {
    match e {
        Effect::Malformed(_) => Want::Malformed,
        Effect::Nothing => Want::Ignored,
        Effect::Counted(c) => {
            let (scope, _) = c.counter.decode().expect("a key that decodes");
            Want::Counted(c.event, scope.direction, scope.port)
        }
    }
}

#[test]
pub(crate) fn reference_agrees_with_the_crafted_cases() {
    let cases = crafted();
    let mut wrong = Vec::new();
    for c in &cases {
        let got = want_of(&reference::effect(&c.frame, 0, Side::Peer, 1, PORTS));
        if got != c.want {
            wrong.push(format!(
                "{}: reference {got:?}, want {:?}\n{}",
                c.name,
                c.want,
                hex(&c.frame)
            ));
        }
        // The TC view of a tagged frame: the outer tag in metadata, gone from the bytes.
        let ty = u16::from_be_bytes([c.frame[12], c.frame[13]]);
        if (ty == ETH_P_8021Q || ty == ETH_P_8021AD) && c.frame.len() >= 18 {
            let mut untagged = c.frame.clone();
            untagged.drain(12..16);
            let got = want_of(&reference::effect(&untagged, 1, Side::Peer, 1, PORTS));
            if got != c.want {
                wrong.push(format!("{} (TC view): reference {got:?}, want {:?}", c.name, c.want));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The peer is the source address on ingress.
    let Effect::Counted(counted) = reference::effect(&cases[0].frame, 0, Side::Peer, 1, PORTS)
    else {
        panic!("case 1 counts");
    };
    assert_eq!(counted.peer.ip(), Some(IpAddr::V4(peer_v4())));
}

#[test]
pub(crate) fn kernel_agrees_with_the_crafted_cases() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let ifindex = lo_ifindex();
    for hook in Hook::ALL {
        let mut k = Kernel::load(hook).expect("load");
        for c in crafted() {
            let Some((verdict, got)) = k.observe(&c.frame).expect("test run") else {
                assert_ne!(hook, Hook::Xdp, "{}: XDP test run refused it", c.name);
                continue;
            };
            let want = expected(hook, &c.frame, ifindex);
            assert_eq!(verdict, hook.verdict(), "{hook:?} {}", c.name);
            assert_eq!(
                got,
                counts_of(&want),
                "{hook:?} {}: kernel {} vs reference {want:?}\n{}",
                c.name,
                got.describe(),
                hex(&c.frame)
            );
        }
    }
}

/// An IPv6 extension header that runs past the end of the frame is malformed, whatever follows
/// it, as IPv4 and TCP options running past the end are (found by this fuzz, fixed in the
/// kernel parser); the same frames one byte longer in that header are still malformed.
#[test]
pub(crate) fn truncated_ipv6_extension_headers_are_malformed() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let ifindex = lo_ifindex();
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let v6 = || Ipv6::new(peer_v6(), gw_v6());
    let syn = Tcp::new(40000, 25, SYN).bytes();
    let cut = |mut f: Vec<u8>, n: usize| {
        f.truncate(n);
        f
    };
    let later_fragment = eth.ipv6(&v6().ext(Ext::fragment(185, true)), IPPROTO_TCP, &syn);
    let hop_then_udp =
        eth.ipv6(&v6().ext(Ext::HopByHop { len: 1 }), IPPROTO_UDP, &udp(40000, 25, b"x"));
    let hop_then_tcp = eth.ipv6(&v6().ext(Ext::HopByHop { len: 1 }), IPPROTO_TCP, &syn);
    let cases = [
        cut(later_fragment.clone(), 14 + 40 + 4),
        cut(later_fragment, 14 + 40 + 3),
        cut(hop_then_udp.clone(), 14 + 40 + 2),
        cut(hop_then_udp, 14 + 40 + 1),
        cut(hop_then_tcp, 14 + 40 + 2),
    ];
    for hook in [Hook::TcIn, Hook::Xdp] {
        let mut k = Kernel::load(hook).expect("load");
        for frame in &cases {
            let contract = expected(hook, frame, ifindex);
            assert!(
                matches!(contract, Effect::Malformed(Malformed::Ipv6Extension { .. })),
                "{hook:?}: the reference must call {} malformed",
                hex(frame)
            );
            let Some((_, got)) = k.observe(frame).expect("test run") else {
                panic!("{hook:?} refused\n{}", hex(frame));
            };
            assert_eq!(
                got,
                counts_of(&contract),
                "{hook:?}: kernel {} (contract: {contract:?}):\n{}",
                got.describe(),
                hex(frame)
            );
        }
    }
}

#[test]
pub(crate) fn mutants_are_reproducible_and_varied() {
    let corpus = corpus();
    let a: Vec<_> = (0..2000).map(|i| mutant(&corpus, 7, i)).collect();
    let b: Vec<_> = (0..2000).map(|i| mutant(&corpus, 7, i)).collect();
    assert_eq!(a, b, "the same seed makes the same frames");
    assert!(a.iter().all(|f| (MIN_FRAME..=MAX_FRAME).contains(&f.len())));
    // Every kind of effect shows up in quantity, and malformed frames of many kinds.
    let effects: Vec<Effect> =
        a.iter().map(|f| reference::effect(f, 0, Side::Peer, 1, PORTS)).collect();
    let n = |p: fn(&Effect) -> bool| effects.iter().filter(|e| p(e)).count();
    assert!(n(|e| matches!(e, Effect::Counted(_))) > 200, "counted");
    assert!(n(|e| matches!(e, Effect::Nothing)) > 200, "nothing");
    assert!(n(|e| matches!(e, Effect::Malformed(_))) > 200, "malformed");
    let mut kinds: Vec<String> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Malformed(m) => {
                Some(format!("{m:?}").split([' ', '(']).next().unwrap().to_owned())
            }
            _ => None,
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    assert!(kinds.len() >= 9, "malformed kinds: {kinds:?}");
}
