//! Crafted frames, sent raw from the peer namespace, against the real `smtpflow watch` on the
//! gateway's ingress: each case has one exact effect (one event, nothing, or one malformed frame),
//! asserted per peer (every case has its own source address) and in total.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use smtpflow_common::{
    Direction, Event,
    rules::tcp_flags::{ACK, FIN, PSH, RST, SYN},
};
use smtpflow_tests::{
    Metrics, Pair, Watch,
    frames::{
        ETH_P_ARP, Eth, Ext, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, NEXTHDR_NONE, RawSocket, Tcp,
        arp_request, hex, send_frames, udp,
    },
    names::{ATTACHMENT_INFO, EVENTS, LOST, MALFORMED, PEER_EVENTS, PEERS_TRACKED},
    require_root,
    smtpflow::INTERVAL,
    wait_for,
};

const IN: Direction = Direction::Inbound;
const OUT: Direction = Direction::Outbound;

/// What one frame must do to the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Exactly one event, `side="peer"` (every frame arrives on the watched ingress).
    Counted(Event, Direction, u16),
    /// No event and not malformed.
    Ignored,
    /// No event; `smtpflow_malformed_packets_total` goes up by exactly 1.
    Malformed,
}

use Effect::{Counted, Ignored, Malformed};

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counted(e, d, port) => write!(f, "{} {} {port}", e.label(), d.label()),
            Ignored => f.write_str("nothing"),
            Malformed => f.write_str("malformed"),
        }
    }
}

struct Case {
    n: u8,
    name: &'static str,
    /// The source address, the per-peer `peer` label if the frame counts.
    peer: IpAddr,
    frame: Vec<u8>,
    effect: Effect,
}

/// The cases being listed, numbered from 1; case `n` is sent from 198.51.100.`n` (IPv4) or
/// 2001:db8::`n` (IPv6) to the gateway, so that every peer series belongs to one case.
#[derive(Default)]
struct Table {
    cases: Vec<Case>,
}

impl Table {
    /// A case whose frame `build` makes from an IPv4 header (TCP) of its own source address.
    fn v4(&mut self, name: &'static str, effect: Effect, build: impl FnOnce(Ipv4) -> Vec<u8>) {
        let n = self.cases.len() as u8 + 1;
        let src = Ipv4Addr::new(198, 51, 100, n);
        let gw: Ipv4Addr = Pair::LOCAL_V4.parse().unwrap();
        let frame = build(Ipv4::new(src, gw, IPPROTO_TCP));
        self.cases.push(Case { n, name, peer: src.into(), frame, effect });
    }

    /// Like [`Table::v4`], from an IPv6 header.
    fn v6(&mut self, name: &'static str, effect: Effect, build: impl FnOnce(Ipv6) -> Vec<u8>) {
        let n = self.cases.len() as u8 + 1;
        // The case number's decimal digits as the last group: case 17 is 2001:db8::17.
        let last = u16::from_str_radix(&n.to_string(), 16).unwrap();
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last);
        let gw: Ipv6Addr = Pair::LOCAL_V6.parse().unwrap();
        let frame = build(Ipv6::new(src, gw));
        self.cases.push(Case { n, name, peer: src.into(), frame, effect });
    }
}

/// A segment from a client's ephemeral port to `port`.
fn to(port: u16, flags: u8) -> Tcp {
    Tcp::new(40000, port, flags)
}

/// A segment from `port` to a client's ephemeral port.
fn from(port: u16, flags: u8) -> Tcp {
    Tcp::new(port, 40000, flags)
}

fn syn_to(port: u16) -> Vec<u8> {
    to(port, SYN).bytes()
}

/// The frame's first `len` bytes.
fn cut(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    assert!(len < frame.len(), "cutting a {}-byte frame to {len}", frame.len());
    frame.truncate(len);
    frame
}

/// Every case, with its effect in `mode`.
fn cases(mode: &str, eth: &Eth, peer_mac: [u8; 6]) -> Vec<Case> {
    let tc = mode == "tc";
    let mut t = Table::default();
    let syn = |port| Counted(Event::Syn, IN, port);

    // Counted: one event each.
    t.v4("IPv4 SYN to 25", syn(25), |ip| eth.ipv4(&ip, &syn_to(25)));
    // At TC ingress the kernel has already moved the outer tag into the skb's metadata, so the
    // program sees 0 (802.1Q) or 1 (QinQ) tags in the frame; XDP sees them all.
    t.v4("802.1Q-tagged IPv4 SYN to 25", syn(25), |ip| {
        eth.clone().dot1q(100).ipv4(&ip, &syn_to(25))
    });
    t.v4("QinQ (802.1ad then 802.1Q) IPv4 SYN to 25", syn(25), |ip| {
        eth.clone().qinq(200, 100).ipv4(&ip, &syn_to(25))
    });
    // Record route with two empty slots (11 bytes) and end of list: 12 bytes, IHL 8.
    t.v4("IPv4 with 12 bytes of options (IHL 8) SYN to 465", syn(465), |ip| {
        let ip = ip.options(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ip.packet(&[])[0], 0x48, "IHL 8");
        eth.ipv4(&ip, &syn_to(465))
    });
    t.v6("IPv6 SYN to 587", syn(587), |ip| eth.ipv6(&ip, IPPROTO_TCP, &syn_to(587)));
    t.v6(
        "IPv6 SYN to 587 behind hop-by-hop, destination options, routing, fragment (offset 0)",
        syn(587),
        |ip| {
            let ip = ip
                .ext(Ext::HOP_BY_HOP)
                .ext(Ext::DEST_OPTS)
                .ext(Ext::Routing)
                .ext(Ext::fragment(0, false));
            eth.ipv6(&ip, IPPROTO_TCP, &syn_to(587))
        },
    );
    t.v6("802.1Q-tagged IPv6 SYN to 25", syn(25), |ip| {
        eth.clone().dot1q(100).ipv6(&ip, IPPROTO_TCP, &syn_to(25))
    });
    t.v4("IPv4 first fragment (MF, offset 0) SYN to 25", syn(25), |ip| {
        eth.ipv4(&ip.fragment(0, true), &syn_to(25))
    });
    t.v6("IPv6 first fragment (M, offset 0) SYN to 25", syn(25), |ip| {
        eth.ipv6(&ip.ext(Ext::fragment(0, true)), IPPROTO_TCP, &syn_to(25))
    });
    // MSS, SACK permitted, timestamps, NOP, window scale: 20 bytes, data offset 10.
    t.v4("SYN with 20 bytes of TCP options to 465", syn(465), |ip| {
        let opts = [2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
        eth.ipv4(&ip, &to(465, SYN).options(&opts).bytes())
    });
    t.v4("SYN-ACK from 25", Counted(Event::SynAck, OUT, 25), |ip| {
        eth.ipv4(&ip, &from(25, SYN | ACK).bytes())
    });
    t.v4("RST|ACK to 587", Counted(Event::Rst, IN, 587), |ip| {
        eth.ipv4(&ip, &to(587, RST | ACK).bytes())
    });
    t.v4("RST|SYN to 25", Counted(Event::Rst, IN, 25), |ip| {
        eth.ipv4(&ip, &to(25, RST | SYN).bytes())
    });
    t.v4("ACK, window 0, to 25", Counted(Event::ZeroWindow, IN, 25), |ip| {
        eth.ipv4(&ip, &to(25, ACK).window(0).bytes())
    });
    t.v4("PSH|ACK, window 0, from 25", Counted(Event::ZeroWindow, OUT, 25), |ip| {
        eth.ipv4(&ip, &from(25, PSH | ACK).window(0).payload(b"250 ok\r\n").bytes())
    });
    t.v4("SYN from 25 to 587 (both SMTP ports: the destination wins)", syn(587), |ip| {
        eth.ipv4(&ip, &Tcp::new(25, 587, SYN).bytes())
    });
    t.v6("IPv6 SYN-ACK from 465", Counted(Event::SynAck, OUT, 465), |ip| {
        eth.ipv6(&ip, IPPROTO_TCP, &from(465, SYN | ACK).bytes())
    });
    t.v6(
        "IPv6 RST to 25 behind 8 destination-options headers (the most walked)",
        Counted(Event::Rst, IN, 25),
        |ip| {
            let ip = (0..8).fold(ip, |ip, _| ip.ext(Ext::DEST_OPTS));
            eth.ipv6(&ip, IPPROTO_TCP, &to(25, RST).bytes())
        },
    );
    // AMBIGUOUS: the parser bounds headers by the frame, not by the IP total length, so bytes
    // past the IPv4 packet (a trailer) are read as its TCP header. The kernel would trim them and
    // see no TCP segment. Asserted as the parser does it: counted.
    t.v4("IPv4 total length 20 (no payload), then SYN-to-25 bytes as a trailer", syn(25), |ip| {
        eth.ipv4(&ip.total_len(20), &syn_to(25))
    });
    // A TCP header may start at most 1024 bytes in; 14 + 40 + 968 = 1022 is the deepest start
    // an untagged IPv6 chain can have within that. Counted, although the header ends past 1024.
    // (Before ec7808a reads were refused past 1024 too, and this frame counted as malformed.)
    t.v6("IPv6 SYN to 25 at frame offset 1022 (968-byte hop-by-hop)", syn(25), |ip| {
        eth.ipv6(&ip.ext(Ext::HopByHop { len: 120 }), IPPROTO_TCP, &syn_to(25))
    });

    // Ignored: not an SMTP-port TCP event, and not malformed.
    t.v4("FIN|ACK, window 0, to 25", Ignored, |ip| {
        eth.ipv4(&ip, &to(25, FIN | ACK).window(0).bytes())
    });
    t.v4("ACK, window 5, to 25", Ignored, |ip| eth.ipv4(&ip, &to(25, ACK).window(5).bytes()));
    t.v4("SYN from 80 to 443", Ignored, |ip| eth.ipv4(&ip, &Tcp::new(80, 443, SYN).bytes()));
    // Offset 185 (1480 bytes): the payload would read as a SYN to 25 if taken for a TCP header.
    t.v4(
        "IPv4 non-first fragment (offset 185) whose payload looks like a SYN to 25",
        Ignored,
        |ip| eth.ipv4(&ip.fragment(185, false), &syn_to(25)),
    );
    t.v6(
        "IPv6 non-first fragment (offset 185) whose payload looks like a SYN to 25",
        Ignored,
        |ip| eth.ipv6(&ip.ext(Ext::fragment(185, true)), IPPROTO_TCP, &syn_to(25)),
    );
    t.v4("UDP to 25", Ignored, |ip| {
        eth.ipv4(&ip.protocol(IPPROTO_UDP), &udp(40000, 25, b"EHLO x\r\n"))
    });
    t.v4("ARP request", Ignored, |ip| eth.frame(ETH_P_ARP, &arp_request(peer_mac, ip.src, ip.dst)));
    t.v6("IPv6 no next header (59) followed by SYN-to-25 bytes", Ignored, |ip| {
        eth.ipv6(&ip, NEXTHDR_NONE, &syn_to(25))
    });
    t.v6(
        "IPv6 SYN to 25 behind 9 destination-options headers (one more than walked)",
        Ignored,
        |ip| {
            let ip = (0..9).fold(ip, |ip, _| ip.ext(Ext::DEST_OPTS));
            eth.ipv6(&ip, IPPROTO_TCP, &syn_to(25))
        },
    );
    // 14 + 40 + 976 = 1030, past 1024: deeper than the parser inspects.
    t.v6("IPv6 SYN to 25 at frame offset 1030 (976-byte hop-by-hop)", Ignored, |ip| {
        eth.ipv6(&ip.ext(Ext::HopByHop { len: 121 }), IPPROTO_TCP, &syn_to(25))
    });
    // Three tags: more than the two the contract walks, in both modes. XDP sees all three; at
    // TC ingress the kernel has already moved the outer one into the skb's metadata, and the
    // program counts it against the two.
    t.v4("3 VLAN tags (802.1ad, 802.1Q, 802.1Q) IPv4 SYN to 25", Ignored, |ip| {
        eth.clone().qinq(300, 200).dot1q(100).ipv4(&ip, &syn_to(25))
    });

    // Malformed: counted in smtpflow_malformed_packets_total only.
    t.v4("IPv4 IHL 4, SYN to 25 behind", Malformed, |ip| eth.ipv4(&ip.ihl(4), &syn_to(25)));
    // 14 + 20 + 20 = 54 bytes; IHL 15 claims a 60-byte IPv4 header.
    t.v4("IPv4 IHL 15 in a 54-byte frame", Malformed, |ip| eth.ipv4(&ip.ihl(15), &syn_to(25)));
    t.v4("IPv4 ethertype carrying version 6", Malformed, |ip| {
        eth.ipv4(&ip.version(6), &syn_to(25))
    });
    t.v4("IPv4 header cut after 10 bytes", Malformed, |ip| {
        cut(eth.ipv4(&ip, &syn_to(25)), 14 + 10)
    });
    t.v4("Ethernet header only (14 bytes, ethertype IPv4)", Malformed, |ip| {
        cut(eth.ipv4(&ip, &syn_to(25)), 14)
    });
    t.v4("TCP data offset 4, SYN to 25", Malformed, |ip| {
        eth.ipv4(&ip, &to(25, SYN).data_offset(4).bytes())
    });
    t.v4("TCP data offset 15 in a 54-byte frame, SYN to 25", Malformed, |ip| {
        eth.ipv4(&ip, &to(25, SYN).data_offset(15).bytes())
    });
    t.v4("TCP header cut after 12 bytes, SYN to 25", Malformed, |ip| {
        cut(eth.ipv4(&ip, &syn_to(25)), 14 + 20 + 12)
    });
    t.v6("IPv6 header cut after 30 bytes", Malformed, |ip| {
        cut(eth.ipv6(&ip, IPPROTO_TCP, &syn_to(25)), 14 + 30)
    });
    t.v6("IPv6 TCP data offset 4, SYN to 587", Malformed, |ip| {
        eth.ipv6(&ip, IPPROTO_TCP, &to(587, SYN).data_offset(4).bytes())
    });
    // The 88-byte hop-by-hop header claims to end at 142; the frame ends at 70.
    t.v6("IPv6 hop-by-hop header running past the frame end", Malformed, |ip| {
        cut(eth.ipv6(&ip.ext(Ext::HopByHop { len: 10 }), IPPROTO_TCP, &syn_to(25)), 14 + 40 + 16)
    });
    // The frame ends inside the 802.1Q tag. XDP: the parser cannot read the inner ethertype,
    // malformed. TC: the kernel drops the frame while untagging it (it needs the tag and the
    // ethertype after it), before TC ingress runs, so the program never sees it.
    let cut_tag = if tc { Ignored } else { Malformed };
    t.v4("802.1Q tag cut after 2 bytes (16-byte frame)", cut_tag, |ip| {
        cut(eth.clone().dot1q(100).ipv4(&ip, &syn_to(25)), 16)
    });
    t.cases
}

/// A selection of the cases above with 5000 bytes of TCP payload: bigger than a page, so
/// nonlinear at TC (see [`tc_nonlinear_frames`]). The same effect in every mode.
fn big_cases(_mode: &str, eth: &Eth, _peer_mac: [u8; 6]) -> Vec<Case> {
    let big = |tcp: Tcp| tcp.payload(&[0x5a; 5000]).bytes();
    let syn = |port| Counted(Event::Syn, IN, port);
    let mut t = Table::default();
    t.v4("big IPv4 SYN to 25", syn(25), |ip| eth.ipv4(&ip, &big(to(25, SYN))));
    t.v4("big 802.1Q-tagged IPv4 SYN to 25", syn(25), |ip| {
        eth.clone().dot1q(100).ipv4(&ip, &big(to(25, SYN)))
    });
    t.v4("big QinQ IPv4 SYN to 25", syn(25), |ip| {
        eth.clone().qinq(200, 100).ipv4(&ip, &big(to(25, SYN)))
    });
    t.v4("big IPv4 (IHL 8) SYN-ACK from 465", Counted(Event::SynAck, OUT, 465), |ip| {
        eth.ipv4(&ip.options(&[7, 11, 4]), &big(from(465, SYN | ACK)))
    });
    t.v4("big PSH|ACK, window 0, from 587", Counted(Event::ZeroWindow, OUT, 587), |ip| {
        eth.ipv4(&ip, &big(from(587, PSH | ACK).window(0)))
    });
    // The 40 bytes after the fixed header are options as far as the parser can tell.
    t.v4("big TCP data offset 15 SYN to 25", syn(25), |ip| {
        eth.ipv4(&ip, &big(to(25, SYN).data_offset(15)))
    });
    t.v6("big IPv6 SYN to 587 behind 4 extension headers", syn(587), |ip| {
        let ip = ip
            .ext(Ext::HOP_BY_HOP)
            .ext(Ext::DEST_OPTS)
            .ext(Ext::Routing)
            .ext(Ext::fragment(0, true));
        eth.ipv6(&ip, IPPROTO_TCP, &big(to(587, SYN)))
    });
    t.v6("big IPv6 RST to 25 at frame offset 1022", Counted(Event::Rst, IN, 25), |ip| {
        eth.ipv6(&ip.ext(Ext::HopByHop { len: 120 }), IPPROTO_TCP, &big(to(25, RST)))
    });
    t.v6("big IPv6 SYN to 25 at frame offset 1030", Ignored, |ip| {
        eth.ipv6(&ip.ext(Ext::HopByHop { len: 121 }), IPPROTO_TCP, &big(to(25, SYN)))
    });
    t.v4("big IPv4 non-first fragment", Ignored, |ip| {
        eth.ipv4(&ip.fragment(185, true), &big(to(25, SYN)))
    });
    t.v4("big IPv4 IHL 4", Malformed, |ip| eth.ipv4(&ip.ihl(4), &big(to(25, SYN))));
    t.v4("big TCP data offset 4", Malformed, |ip| eth.ipv4(&ip, &big(to(25, SYN).data_offset(4))));
    t.cases
}

type Labels = Vec<(&'static str, String)>;

/// The labels of the one per-peer series a counted case makes.
fn peer_series(c: &Case) -> Option<Labels> {
    let Counted(event, direction, port) = c.effect else { return None };
    Some(vec![
        ("iface", Pair::LOCAL_IF.into()),
        ("peer", c.peer.to_string()),
        ("direction", direction.label().into()),
        ("port", port.to_string()),
        ("event", event.label().into()),
        ("side", "peer".into()),
    ])
}

fn borrow(labels: &Labels) -> Vec<(&str, &str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn count(cases: &[Case], f: impl Fn(Effect) -> bool) -> u64 {
    cases.iter().filter(|c| f(c.effect)).count() as u64
}

fn is_counted(e: Effect) -> bool {
    matches!(e, Counted(..))
}

/// What one case is checked against right after it was sent.
#[derive(Debug, PartialEq, Eq)]
struct After {
    /// `smtpflow_tcp_events_total`, all series.
    events: u64,
    malformed: u64,
    /// This case's peer: the values of its per-peer series.
    peer_series: Vec<u64>,
}

/// Checks the effect of the last of `sent`, sent just now: the grand total and the malformed
/// counter moved exactly as it says, and its peer has exactly its one series at 1, or none.
fn expect_case(w: &Watch, pair: &Pair, sent: &[Case]) {
    let c = sent.last().expect("a case");
    if !is_counted(c.effect) {
        // Nothing must change, so there is nothing to wait for: leave the frame a few drains to
        // show up if it (wrongly) counts.
        std::thread::sleep(INTERVAL * 3);
    }
    let want = After {
        events: count(sent, is_counted),
        malformed: count(sent, |e| e == Malformed),
        peer_series: if is_counted(c.effect) { vec![1] } else { vec![] },
    };
    let peer = c.peer.to_string();
    let after = |m: &Metrics| After {
        events: m.sum(EVENTS, &[]),
        malformed: m.sum(MALFORMED, &[]),
        peer_series: m.matching(PEER_EVENTS, &[("peer", &peer)]).map(|(_, v)| v as u64).collect(),
    };
    // (Which series it is, is checked by the final settled check.) Generous: a frame shows up
    // within a drain interval or two, but an emulated VM on a busy host can stall for seconds.
    let ok =
        wait_for(Duration::from_secs(30), || (after(&w.scrape(&pair.local)) == want).then_some(()));
    if ok.is_none() {
        let m = w.scrape(&pair.local);
        panic!(
            "case {} ({}) must count {}:\n  got  {:?}\n  want {want:?}\nits per-peer series: \
             {:?}\nframe ({} bytes):\n{}\nsmtpflow stderr:\n{}",
            c.n,
            c.name,
            c.effect,
            after(&m),
            m.matching(PEER_EVENTS, &[("peer", &peer)]).collect::<Vec<_>>(),
            c.frame.len(),
            hex(&c.frame),
            w.stderr()
        );
    }
}

/// The exact counter values after every case was sent once.
fn expectations(cases: &[Case]) -> Vec<(&'static str, Labels, u64)> {
    let mut exp = Vec::new();
    let mut totals: BTreeMap<(Direction, u16, Event), u64> = BTreeMap::new();
    for c in cases {
        let (Counted(event, direction, port), Some(series)) = (c.effect, peer_series(c)) else {
            continue;
        };
        *totals.entry((direction, port, event)).or_default() += 1;
        exp.push((PEER_EVENTS, series, 1));
        // And nothing else for this peer.
        exp.push((PEER_EVENTS, vec![("peer", c.peer.to_string())], 1));
    }
    for ((direction, port, event), n) in totals {
        exp.push((
            EVENTS,
            vec![
                ("iface", Pair::LOCAL_IF.into()),
                ("direction", direction.label().into()),
                ("port", port.to_string()),
                ("event", event.label().into()),
                ("side", "peer".into()),
            ],
            n,
        ));
    }
    // Nothing beyond the cases: the grand totals are the sums of the above.
    let counted = count(cases, is_counted);
    exp.push((EVENTS, vec![], counted));
    exp.push((PEER_EVENTS, vec![], counted));
    exp.push((PEERS_TRACKED, vec![], counted));
    exp.push((MALFORMED, vec![], count(cases, |e| e == Malformed)));
    exp.push((LOST, vec![], 0));
    exp
}

/// Peers of the cases that count nothing must have no per-peer series at all.
fn assert_no_peer_series(m: &Metrics, cases: &[Case]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|c| !matches!(c.effect, Counted(..)))
        .filter_map(|c| {
            let peer = c.peer.to_string();
            let found: Vec<String> = m
                .matching(PEER_EVENTS, &[("peer", &peer)])
                .map(|(labels, v)| format!("{labels:?} {v}"))
                .collect();
            (!found.is_empty()).then(|| {
                format!("case {} ({}, want {}): {}", c.n, c.name, c.effect, found.join("; "))
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "peers of cases that must count nothing have per-peer series:\n  {}",
        wrong.join("\n  ")
    );
}

/// How the gateway is watched.
#[derive(Clone, Copy)]
enum Setup {
    Tc,
    /// XDP in driver mode (`--xdp-mode driver`: a veth supports it at the default MTU).
    XdpDriver,
    /// XDP in generic mode, where `--mode xdp` attaches on a veth by default; at an MTU of 9000
    /// (for frames bigger than a page), where a veth would refuse driver mode.
    XdpGeneric,
    /// TC, with an MTU of 9000 on both ends (for frames bigger than a page).
    TcJumbo,
}

impl Setup {
    fn mode(self) -> &'static str {
        match self {
            Setup::Tc | Setup::TcJumbo => "tc",
            Setup::XdpDriver | Setup::XdpGeneric => "xdp",
        }
    }

    /// The flags `watch` runs with.
    fn args(self) -> &'static [&'static str] {
        match self {
            Setup::Tc | Setup::TcJumbo => &["--mode", "tc"],
            Setup::XdpDriver => &["--mode", "xdp", "--xdp-mode", "driver"],
            Setup::XdpGeneric => &["--mode", "xdp"],
        }
    }

    /// The `method` label of `smtpflow_attachment_info` for XDP.
    fn xdp_method(self) -> Option<&'static str> {
        match self {
            Setup::XdpDriver => Some("xdp driver mode"),
            Setup::XdpGeneric => Some("xdp generic mode"),
            Setup::Tc | Setup::TcJumbo => None,
        }
    }

    fn jumbo(self) -> bool {
        matches!(self, Setup::XdpGeneric | Setup::TcJumbo)
    }
}

/// Watches the gateway as `setup` says, sends the cases from the peer one at a time checking
/// each, then checks the settled totals of them all.
fn run(setup: Setup, make: fn(&str, &Eth, [u8; 6]) -> Vec<Case>) {
    let mode = setup.mode();
    let pair = Pair::new();
    if setup.jumbo() {
        pair.local.ip(&["link", "set", Pair::LOCAL_IF, "mtu", "9000"]);
        pair.peer.ip(&["link", "set", Pair::PEER_IF, "mtu", "9000"]);
    }
    let gw_mac = Pair::mac(&pair.local, Pair::LOCAL_IF);
    let peer_mac = Pair::mac(&pair.peer, Pair::PEER_IF);
    let cases = make(mode, &Eth::new(gw_mac, peer_mac), peer_mac);
    // Printed so a failure's peer labels can be read as cases.
    eprintln!("{mode}: {} cases", cases.len());
    for c in &cases {
        eprintln!("  #{:<2} {:<16} {:<23} {}", c.n, c.peer, c.effect.to_string(), c.name);
    }

    let w = Watch::start(&pair.local, Pair::LOCAL_IF, setup.args());
    // One frame at a time, each checked before the next: every case's own effect.
    for sent in 1..=cases.len() {
        send_frames(&pair.peer, Pair::PEER_IF, std::slice::from_ref(&cases[sent - 1].frame));
        expect_case(&w, &pair, &cases[..sent]);
    }
    // A frame shorter than an Ethernet header cannot be sent at all: the kernel refuses it
    // (`dev_validate_header`), so the parser's "< 14 bytes" path is unreachable from a veth.
    let runt = cut(cases[0].frame.clone(), 13);
    let refused = RawSocket::open(&pair.peer, Pair::PEER_IF).send(&runt);
    assert_eq!(
        refused.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EINVAL)),
        "a 13-byte frame was not refused:\n{}",
        hex(&runt)
    );

    // All of them, settled: exact totals, and nothing counted beyond the cases.
    let owned = expectations(&cases);
    let expected: Vec<_> =
        owned.iter().map(|(name, labels, v)| (*name, borrow(labels), *v)).collect();
    let m = w.expect_settled(&pair.local, &expected);
    assert_no_peer_series(&m, &cases);
    if let Some(method) = setup.xdp_method() {
        let attached = [("iface", Pair::LOCAL_IF), ("hook", "xdp"), ("method", method)];
        assert_eq!(
            m.get(ATTACHMENT_INFO, &attached),
            Some(1.0),
            "XDP is not attached in {method}:\n{}",
            w.stderr()
        );
    }
}

#[test]
fn tc_crafted_frames() {
    require_root!();
    run(Setup::Tc, cases);
}

#[test]
fn xdp_crafted_frames() {
    require_root!();
    run(Setup::XdpDriver, cases);
}

#[test]
fn xdp_generic_crafted_frames() {
    require_root!();
    run(Setup::XdpGeneric, cases);
}

/// Frames too big for one page: AF_PACKET then puts only the Ethernet header in the skb's linear
/// area (`packet_alloc_skb`), so at TC ingress the direct packet reads end after 14 bytes and the
/// parser reads every header through its `bpf_skb_load_bytes` fallback.
#[test]
fn tc_nonlinear_frames() {
    require_root!();
    run(Setup::TcJumbo, big_cases);
}

/// The same frames through generic XDP (which hands the program a linear copy).
#[test]
fn xdp_generic_big_frames() {
    require_root!();
    run(Setup::XdpGeneric, big_cases);
}
