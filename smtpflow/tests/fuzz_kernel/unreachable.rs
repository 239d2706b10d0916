//! ICMP and ICMPv6 destination unreachables, read by the kernel (the message, the IP and TCP
//! header it quotes, the flow it answers), against the reference (`reference::unreachable`) and
//! the pure state machine (`flow::unreachable`).
//!
//! Each seed is an unreachable (IPv4 and IPv6; tagged; outer and quoted IPv4 options and IPv6
//! extension headers; 8 quoted TCP bytes or the whole SYN; the depth limit from both sides; and
//! messages that must count nothing: fragmentation needed, packet too big, a quoted UDP
//! datagram, a quoted SYN-ACK of ours). Before every frame the flow map holds the attempt the
//! seed's message answers, in one of four states (pending, late, answered, already
//! unreachable); the frame is the seed cut at every length, or mutated (the structure-aware
//! mutations of the main fuzz, aimed at the outer or the quoted headers, ICMP types and codes,
//! the quoted sequence number, byte noise). Then exactly what the reference and the model say
//! must change: `Handshake(Unreachable)` and `Unreachable(reason)` in `COUNTERS`, the per-peer
//! unreachable slot in `PEERS`, and (the frame may have become TCP) the events and malformed
//! frames as the main fuzz compares them. The verdict is always the hook's.
use std::collections::BTreeMap;

use smtpflow_common::{
    Counter, Direction, FAMILY_V4, FAMILY_V6, FlowKey, FlowState, Outcome, PeerKey, Scope, Side,
    flow::{self, ACTIVE_SHIFT, flag, state},
    icmp::Quoted,
    reference,
    rules::tcp_flags::{ACK, SYN},
    smtp_port,
};
use smtpflow_tests::{
    frames::{Eth, Ext, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, Tcp, hex, udp},
    require_root,
};

use super::{
    MAX_FRAME, MIN_FRAME, PORTS,
    corpus::{L3, MAC_GW, MAC_PEER, Rng, SYN_OPTIONS, Shaped, gw_v4, gw_v6, peer_v4, peer_v6},
    env_u64,
    mutate::{reshape, rewrite_field, scribble},
    programs::{Hook, Kernel, counts_of, expected, kernel_available, lo_ifindex},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const DEFAULT_FRAMES: u64 = 20_000;

/// An ICMP message: type, code, checksum (not checked by anyone here), 4 unused bytes, then
/// what it quotes.
fn icmp(kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(quoted);
    m
}

/// A seed: the frame, with its outer and quoted headers' offsets, and the attempt it answers.
#[derive(Clone)]
struct Seed {
    name: &'static str,
    /// Offsets of the outer IP header and the ICMP header.
    outer: Shaped,
    /// The same frame, with offsets of the quoted IP and TCP headers.
    quoted: Shaped,
    /// Where the ICMP header starts.
    icmp_at: usize,
    /// The flow the message answers, and its SYN's sequence number (`None`: none of ours).
    flow: Option<(FlowKey, u32)>,
}

/// Our SYN from `client_port` to `port`, quoting `tcp_len` bytes of its TCP header.
fn syn(client_port: u16, port: u16, isn: u32, tcp_len: usize) -> Vec<u8> {
    let mut t = Tcp::new(client_port, port, SYN).options(&SYN_OPTIONS);
    t.seq = isn;
    let mut b = t.bytes();
    b.truncate(tcp_len);
    b
}

struct Builder {
    next_port: u16,
    seeds: Vec<Seed>,
    ifindex: u32,
}

impl Builder {
    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    /// The attempt of ours whose ports and sequence number the quoted bytes `l4` carry, from
    /// the gateway to the peer: the flow the map holds for the seed. Taken from the bytes as
    /// built, not from the reference, and for every seed, the ones that must count nothing
    /// (a quoted UDP datagram, our SYN-ACK, a header too deep) included: the kernel must not
    /// match them to it.
    fn flow_for(&self, family: u8, l4: &[u8]) -> Option<(FlowKey, u32)> {
        let (a, b) = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
        let (client_port, server_port) = if PORTS.contains(&b) { (a, b) } else { (b, a) };
        let (mut client, mut server) = ([0u8; 16], [0u8; 16]);
        if family == FAMILY_V4 {
            client[..4].copy_from_slice(&gw_v4().octets());
            server[..4].copy_from_slice(&peer_v4().octets());
        } else {
            (client, server) = (gw_v6().octets(), peer_v6().octets());
        }
        let key = FlowKey {
            ifindex: self.ifindex,
            client,
            server,
            client_port,
            server_port,
            family,
            direction: Direction::Outbound as u8,
            _pad: [0; 2],
        };
        Some((key, u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?)))
    }

    #[expect(clippy::too_many_arguments, reason = "one seed's whole shape, said once")]
    fn v4(
        &mut self,
        name: &'static str,
        eth: &Eth,
        outer_opts: &[u8],
        kind: u8,
        code: u8,
        inner: Ipv4,
        l4: &[u8],
    ) {
        let outer = Ipv4::new(peer_v4(), gw_v4(), IPPROTO_ICMP).options(outer_opts);
        let quoted_ip = inner.packet(l4);
        let frame = eth.ipv4(&outer, &icmp(kind, code, &quoted_ip));
        let l3 = 14 + 4 * eth.tags.len();
        let icmp_at = l3 + 20 + outer.options.len();
        let inner_at = icmp_at + 8;
        let shaped = |l3, l4| Shaped {
            frame: frame.clone(),
            l3_kind: L3::V4,
            l3: Some(l3),
            ext: Vec::new(),
            l4: Some(l4),
        };
        let seed = Seed {
            name,
            outer: shaped(l3, icmp_at),
            quoted: shaped(inner_at, inner_at + 20 + inner.options.len()),
            icmp_at,
            flow: self.flow_for(FAMILY_V4, l4),
        };
        self.seeds.push(seed);
    }

    #[expect(clippy::too_many_arguments, reason = "one seed's whole shape, said once")]
    fn v6(
        &mut self,
        name: &'static str,
        eth: &Eth,
        outer_ext: &[Ext],
        kind: u8,
        code: u8,
        inner_ext: &[Ext],
        next: u8,
        l4: &[u8],
    ) {
        let outer = outer_ext.iter().fold(Ipv6::new(peer_v6(), gw_v6()), |ip, &e| ip.ext(e));
        let inner = inner_ext.iter().fold(Ipv6::new(gw_v6(), peer_v6()), |ip, &e| ip.ext(e));
        let frame = eth.ipv6(&outer, IPPROTO_ICMPV6, &icmp(kind, code, &inner.packet(next, l4)));
        let l3 = 14 + 4 * eth.tags.len();
        let exts = |start: usize, chain: &[Ext]| {
            let mut at = start + 40;
            let mut offs = Vec::new();
            for e in chain {
                offs.push(at);
                at += e.size();
            }
            (offs, at)
        };
        let (outer_offs, icmp_at) = exts(l3, outer_ext);
        let inner_at = icmp_at + 8;
        let (inner_offs, th) = exts(inner_at, inner_ext);
        let shaped = |l3, ext, l4| Shaped {
            frame: frame.clone(),
            l3_kind: L3::V6,
            l3: Some(l3),
            ext,
            l4: Some(l4),
        };
        let seed = Seed {
            name,
            outer: shaped(l3, outer_offs, icmp_at),
            quoted: shaped(inner_at, inner_offs, th),
            icmp_at,
            flow: self.flow_for(FAMILY_V6, l4),
        };
        self.seeds.push(seed);
    }
}

fn key(ifindex: u32, u: &Quoted) -> FlowKey {
    FlowKey {
        ifindex,
        client: u.src,
        server: u.dst,
        client_port: u.src_port,
        server_port: u.dst_port,
        family: u.family,
        direction: Direction::Outbound as u8,
        _pad: [0; 2],
    }
}

fn seeds(ifindex: u32) -> Vec<Seed> {
    let mut b = Builder { next_port: 41_000, seeds: Vec::new(), ifindex };
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let tagged = eth.clone().dot1q(100);
    let qinq = eth.clone().qinq(200, 100);
    let v4 = || Ipv4::new(gw_v4(), peer_v4(), IPPROTO_TCP);
    let rr = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut isn = 0x1000_0000u32;
    let mut next_isn = || {
        isn += 0x0101;
        isn
    };
    // IPv4.
    let (p, i) = (b.port(), next_isn());
    b.v4("host unreachable, 8 bytes of TCP", &eth, &[], 3, 1, v4(), &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v4("admin prohibited, the whole SYN", &eth, &[], 3, 13, v4(), &syn(p, 25, i, 40));
    let (p, i) = (b.port(), next_isn());
    b.v4("quoted IPv4 options", &eth, &[], 3, 10, v4().options(&rr), &syn(p, 587, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v4(
        "outer IPv4 options, port unreachable",
        &eth,
        &[1, 1, 1, 0],
        3,
        3,
        v4(),
        &syn(p, 465, i, 12),
    );
    let (p, i) = (b.port(), next_isn());
    b.v4("802.1Q, net unreachable", &tagged, &[], 3, 0, v4(), &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v4("QinQ, code 5", &qinq, &[], 3, 5, v4(), &syn(p, 25, i, 20));
    let (p, i) = (b.port(), next_isn());
    b.v4("fragmentation needed", &eth, &[], 3, 4, v4(), &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v4("time exceeded", &eth, &[], 11, 0, v4(), &syn(p, 25, i, 8));
    let p = b.port();
    b.v4("quoted UDP", &eth, &[], 3, 3, v4().protocol(IPPROTO_UDP), &udp(p, 25, b"x"));
    let mut ours = Tcp::new(25, b.port(), SYN | ACK);
    ours.seq = next_isn();
    b.v4("quoted SYN-ACK of ours", &eth, &[], 3, 1, v4(), &ours.bytes()[..8]);
    // IPv6.
    let (p, i) = (b.port(), next_isn());
    b.v6("address unreachable", &eth, &[], 1, 3, &[], IPPROTO_TCP, &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v6("admin prohibited, the whole SYN", &eth, &[], 1, 1, &[], IPPROTO_TCP, &syn(p, 587, i, 40));
    let (p, i) = (b.port(), next_isn());
    let chain = [Ext::HOP_BY_HOP, Ext::DEST_OPTS];
    b.v6("outer extension headers", &tagged, &chain, 1, 4, &[], IPPROTO_TCP, &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    let frag = [Ext::fragment(0, false)];
    b.v6("quoted first fragment", &eth, &[], 1, 0, &frag, IPPROTO_TCP, &syn(p, 465, i, 8));
    let (p, i) = (b.port(), next_isn());
    let frag = [Ext::fragment(1, false)];
    b.v6("quoted non-first fragment", &eth, &[], 1, 0, &frag, IPPROTO_TCP, &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    b.v6("packet too big", &eth, &[], 2, 0, &[], IPPROTO_TCP, &syn(p, 25, i, 8));
    // The depth limit: a quoted TCP header at 990 is read, one at 1062 is not.
    let (p, i) = (b.port(), next_isn());
    let deep = [Ext::HopByHop { len: 110 }];
    b.v6("quoted TCP at 990", &eth, &deep, 1, 6, &[], IPPROTO_TCP, &syn(p, 25, i, 8));
    let (p, i) = (b.port(), next_isn());
    let deeper = [Ext::HopByHop { len: 119 }];
    b.v6("quoted TCP at 1062", &eth, &deeper, 1, 6, &[], IPPROTO_TCP, &syn(p, 25, i, 8));
    b.seeds
}

/// The state the flow map holds for the seed's attempt before a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Before {
    Pending,
    /// Its first SYN older than the handshake timeout.
    Late,
    /// Answered by a SYN-ACK.
    Answered,
    /// Already decided by an earlier unreachable.
    Decided,
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn flow_state(before: Before, isn: u32, now: u64) -> FlowState {
    let pending = FlowState {
        syn_ns: now,
        client_isn: isn,
        state: state::SYN_SENT,
        active: (now >> ACTIVE_SHIFT) as u32,
        ..FlowState::default()
    };
    match before {
        Before::Pending => pending,
        Before::Late => FlowState { syn_ns: now - 6_000_000_000, ..pending },
        Before::Answered => FlowState { state: state::ESTABLISHED, established_ns: now, ..pending },
        Before::Decided => FlowState { flags: flag::UNREACHABLE, ..pending },
    }
}

/// What the unreachable counters hold: the exact counters' unreachable keys, and each peer's
/// unreachable slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct UnreachableCounts {
    counters: BTreeMap<(Scope, Counter), u64>,
    peers: BTreeMap<PeerKey, u64>,
}

fn unreachable_counters(k: &Kernel) -> BTreeMap<(Scope, Counter), u64> {
    let mut out = BTreeMap::new();
    for (key, n) in k.counters.read_keys().expect("counters") {
        let Some((scope, counter)) = key.decode() else { continue };
        if n != 0
            && matches!(counter, Counter::Handshake(Outcome::Unreachable) | Counter::Unreachable(_))
        {
            out.insert((scope, counter), n);
        }
    }
    out
}

fn unreachable_peers(k: &Kernel) -> BTreeMap<PeerKey, u64> {
    let mut out = BTreeMap::new();
    for kv in k.peers.iter() {
        let (key, v) = kv.expect("peers");
        let n = v.outcome(Outcome::Unreachable);
        if n != 0 {
            out.insert(key, n);
        }
    }
    out
}

/// What a frame must change, per the reference and the model, given the attempt in the map.
fn model(
    hook: Hook,
    frame: &[u8],
    flow: Option<(FlowKey, u32)>,
    before: Before,
    now: u64,
    ifindex: u32,
) -> UnreachableCounts {
    let mut want = UnreachableCounts::default();
    if hook.side() != Side::Peer {
        return want; // the answers to our SYNs come in
    }
    let (Some(u), Some((flow_key, isn))) = (reference::unreachable(frame, 0), flow) else {
        return want;
    };
    let Some(m) = smtp_port(u.src_port, u.dst_port, PORTS) else { return want };
    if !m.sender_is_client || key(ifindex, &u) != flow_key {
        return want;
    }
    let mut st = flow_state(before, isn, now);
    // The kernel's clock is read a little later than `now`: well within the timeout.
    let a = flow::unreachable(&mut st, u.seq, now, smtpflow_common::DEFAULT_HANDSHAKE_TIMEOUT_NS);
    if a.outcome != Some(Outcome::Unreachable) {
        return want;
    }
    let scope = Scope { ifindex, port: m.port, direction: Direction::Outbound };
    want.counters.insert((scope, Counter::Handshake(Outcome::Unreachable)), 1);
    want.counters.insert((scope, Counter::Unreachable(u.reason)), 1);
    let peer = PeerKey {
        ifindex,
        addr: u.dst,
        port: m.port,
        family: u.family,
        direction: Direction::Outbound as u8,
    };
    want.peers.insert(peer, 1);
    want
}

/// Frame `index` of the run: a seed, mutated, and the state its attempt is in.
fn mutant(seeds: &[Seed], seed: u64, index: u64) -> (usize, Vec<u8>, Before) {
    let mut r = Rng::for_frame(seed ^ 0x1c3f, index);
    let which = r.below(seeds.len());
    let s = &seeds[which];
    let before = match r.below(10) {
        0 => Before::Late,
        1 => Before::Answered,
        2 => Before::Decided,
        _ => Before::Pending,
    };
    // Aim the structure-aware mutations at the outer headers or at the quoted ones.
    let mut f = if r.percent(50) { s.outer.clone() } else { s.quoted.clone() };
    let others: Vec<Shaped> = seeds.iter().map(|s| s.outer.clone()).collect();
    if r.percent(40) {
        match r.below(4) {
            // Type and code.
            0 => {
                f.set(s.icmp_at, r.pick8(&[3, 1, 2, 4, 0, 8, 11, 128]));
                f.set(s.icmp_at + 1, r.pick8(&[0, 1, 3, 4, 5, 6, 7, 13, 15, 16]));
            }
            1 => f.set(s.icmp_at + 1, r.byte()),
            // The quoted sequence number.
            2 => {
                if let Some(th) = s.quoted.l4 {
                    f.set(th + 4 + r.below(4), r.byte());
                }
            }
            // Cut right after 7, 8 or 9 quoted TCP bytes.
            _ => {
                if let Some(th) = s.quoted.l4 {
                    f.frame.truncate(th + r.pick(&[7, 8, 9]));
                }
            }
        }
    }
    for _ in 0..r.below(3) {
        rewrite_field(&mut f, &mut r);
    }
    if r.percent(25) {
        reshape(&mut f, &mut r, &others);
    }
    for _ in 0..r.pick(&[0, 0, 0, 1, 2]) {
        scribble(&mut f, &mut r);
    }
    if r.percent(15) {
        let len = r.below(f.frame.len() + 1);
        f.frame.truncate(len);
    }
    let mut frame = f.frame;
    while frame.len() < MIN_FRAME {
        frame.push(r.byte());
    }
    frame.truncate(MAX_FRAME);
    (which, frame, before)
}

#[test]
fn kernel_reads_unreachables_as_the_reference_does() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let ifindex = lo_ifindex();
    let seeds = seeds(ifindex);
    // The seeds themselves, in their own words.
    let counted: Vec<&str> = seeds
        .iter()
        .filter(|s| {
            model(Hook::TcIn, &s.outer.frame, s.flow, Before::Pending, 1, ifindex)
                != UnreachableCounts::default()
        })
        .map(|s| s.name)
        .collect();
    assert_eq!(
        counted,
        [
            "host unreachable, 8 bytes of TCP",
            "admin prohibited, the whole SYN",
            "quoted IPv4 options",
            "outer IPv4 options, port unreachable",
            "802.1Q, net unreachable",
            "QinQ, code 5",
            "address unreachable",
            "admin prohibited, the whole SYN",
            "outer extension headers",
            "quoted first fragment",
            "quoted TCP at 990",
        ],
        "the seeds the reference counts"
    );
    let seed = env_u64("SMTPFLOW_FUZZ_SEED", super::DEFAULT_SEED);
    let frames = env_u64("SMTPFLOW_FUZZ_ICMP_FRAMES", DEFAULT_FRAMES);
    let mut cases: Vec<(usize, Vec<u8>, Before, String)> = Vec::new();
    for (i, s) in seeds.iter().enumerate() {
        for len in MIN_FRAME..=s.outer.frame.len() {
            for before in [Before::Pending, Before::Late] {
                let origin = format!("{} cut to {len}", s.name);
                cases.push((i, s.outer.frame[..len].to_vec(), before, origin));
            }
        }
    }
    let sweep = cases.len();
    for n in 0..frames {
        let (i, frame, before) = mutant(&seeds, seed, n);
        cases.push((i, frame, before, format!("seed {seed:#x} index {n}")));
    }
    let mut total_counted = 0;
    for hook in Hook::ALL {
        let mut k = Kernel::load(hook).expect("load");
        let mut wrong = Vec::new();
        let mut counted = 0u64;
        for (i, frame, before, origin) in &cases {
            let flow = seeds[*i].flow;
            let now = monotonic_ns();
            if let Some((fk, isn)) = flow {
                k.flows.insert(&fk, &flow_state(*before, isn, now)).expect("flow");
            }
            k.delta().expect("read");
            let counters = unreachable_counters(&k);
            let Some(verdict) = k.run(frame).expect("test run") else { continue };
            let got = UnreachableCounts {
                counters: delta(&counters, &unreachable_counters(&k)),
                peers: unreachable_peers(&k),
            };
            let events = k.delta().expect("read");
            let want = model(hook, frame, flow, *before, now, ifindex);
            counted += u64::from(!want.peers.is_empty());
            let want_events = counts_of(&expected(hook, frame, ifindex));
            if verdict != hook.verdict() || got != want || events != want_events {
                wrong.push(format!(
                    "{hook:?} {origin} ({before:?}, {} bytes): verdict {verdict:#x}\n  kernel \
                     {got:?} {}\n  model  {want:?} {}\n{}",
                    frame.len(),
                    events.describe(),
                    want_events.describe(),
                    hex(frame)
                ));
                if wrong.len() >= 8 {
                    break;
                }
            }
        }
        assert!(wrong.is_empty(), "kernel and model disagree:\n{}", wrong.join("\n"));
        eprintln!(
            "  {hook:?}: {} ICMP frames ({sweep} of the truncation sweep), {counted} counted \
             unreachable; kernel and reference agree",
            cases.len()
        );
        total_counted += counted;
    }
    assert!(total_counted > 100, "the cases reach the counting path ({total_counted})");
}

fn delta(
    before: &BTreeMap<(Scope, Counter), u64>,
    after: &BTreeMap<(Scope, Counter), u64>,
) -> BTreeMap<(Scope, Counter), u64> {
    after
        .iter()
        .filter_map(|(k, &n)| {
            let d = n - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}
