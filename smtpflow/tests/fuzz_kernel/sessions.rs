//! Whole sessions against the flow state machine: payload events, TLS stages, handshake
//! outcomes and SYN retransmissions, per-peer resets and per-peer reply codes.
//!
//! TC: both TC programs of one object (sharing its maps) see a session, the peer's segments at
//! ingress and the local host's at egress; XDP sees the peer's only. The model reads every
//! frame the program sees with the reference ([`reference::parse`], [`reference::flow_packet`]),
//! advances its own flow map with `smtpflow_common::flow::step`, and says what the kernel must
//! have written: the ring buffer's records (kind, peer, the payload's first bytes, `len`,
//! `payload_len`, in order), the `starttls` counters (the stages the kernel counts, `completed`
//! and `failed` included), the handshake outcomes and SYN retransmissions, each peer's resets
//! by phase, and each peer's reply codes (greetings and every reply). Scripted sessions
//! (EHLO/HELO, EHLO replies with and without STARTTLS, STARTTLS 220 then TLS records, implicit
//! TLS on 465, resets and FINs mid-handshake, retransmissions, payloads longer than an event
//! carries) and seeded random ones (the client's SYN again among their segments: a
//! retransmission with its first sequence number, else a new attempt). Each mode runs twice: with
//! the per-peer map, and with the per-peer log (`--peer-counts log`), whose records are added up
//! as smtpflow adds them.
use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use smtpflow::{
    drain::totals::Totals,
    kernel::{self, Sizes},
};
use smtpflow_common::{
    Config, Counter, CounterKey, DEFAULT_MAX_PEERS, DropConfig, FlowKey, FlowState, PeerCounters,
    PeerGreetingKey, PeerKey, Scope, Side, direction_of,
    flow::step,
    names,
    payload::{PAYLOAD_BYTES, PayloadEvent, PayloadKind},
    peer::{PEER_RESET_SLOTS, peer_counts},
    reference::{self, Parsed},
    rules::tcp_flags::{ACK, FIN, PSH, RST, SYN},
    smtp_port,
};
use smtpflow_tests::{
    frames::{Eth, IPPROTO_TCP, Ipv4, Tcp, hex},
    require_root,
};

use super::{
    PLAINTEXT, PORTS,
    corpus::{MAC_GW, MAC_PEER, Rng, gw_v4, peer_v4},
    programs::{add_up_peer_log, kernel_available, lo_ifindex},
};

/// A payload event as compared: the kernel's record, or the model's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    kind: Option<PayloadKind>,
    peer: PeerKey,
    bytes: Vec<u8>,
    len: u16,
    payload_len: u32,
}

impl Record {
    fn of(e: &PayloadEvent) -> Self {
        Self {
            kind: PayloadKind::from_repr(e.kind),
            peer: e.peer,
            bytes: e.payload().to_vec(),
            len: e.len,
            payload_len: e.payload_len,
        }
    }
}

/// A watched interface the test runs send nothing on (not loopback, whose ifindex is 1).
const OTHER_IFINDEX: u32 = 6;

/// What a session did to the maps the comparison covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen {
    records: Vec<Record>,
    /// `starttls` counters (every stage), non-zero.
    stages: BTreeMap<CounterKey, u64>,
    /// Handshake outcomes and SYN retransmissions, non-zero.
    attempts: BTreeMap<CounterKey, u64>,
    /// Per-peer resets by phase, non-zero.
    resets: BTreeMap<PeerKey, [u64; PEER_RESET_SLOTS]>,
    /// Per-peer reply codes (greetings and every reply).
    replies: BTreeMap<PeerGreetingKey, u64>,
}

/// One copy of the object with the programs of a mode loaded (not attached).
struct Programs {
    xdp: bool,
    ebpf: Ebpf,
    counters: Totals,
    peers: HashMap<MapData, PeerKey, PeerCounters>,
    /// With `--peer-counts log`: the per-peer log, read instead of `peers`.
    peer_log: Option<RingBuf<MapData>>,
    greetings: HashMap<MapData, PeerGreetingKey, u64>,
    payloads: RingBuf<MapData>,
    /// The counters compared ([`followed`]) as read last (they are cumulative).
    followed: BTreeMap<CounterKey, u64>,
}

/// The exact counters the sessions compare, and where in [`Seen`] each goes.
fn followed<'a>(seen: &'a mut Seen, key: &CounterKey) -> Option<&'a mut BTreeMap<CounterKey, u64>> {
    match key.decode()?.1 {
        Counter::Starttls(_) => Some(&mut seen.stages),
        Counter::Handshake(_) | Counter::SynRetransmit => Some(&mut seen.attempts),
        _ => None,
    }
}

impl Programs {
    /// `log`: the per-peer counts go through the per-peer log (`--peer-counts log`).
    fn load(xdp: bool, log: bool) -> anyhow::Result<Self> {
        let mut config = Config::from_ports(PORTS, PLAINTEXT).context("ports")?;
        config.peer_log = if log { peer_counts::LOG } else { peer_counts::MAP };
        // The test run's device in the second slot, after an interface no packet comes in on:
        // the scopes of a second interface, told apart by a mask.
        config.set_ifaces(&[OTHER_IFINDEX, lo_ifindex()]).context("interfaces")?;
        let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows: 65_536 };
        let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, 0)?;
        let names: &[&str] =
            if xdp { &[names::PROG_XDP] } else { &[names::PROG_TC_INGRESS, names::PROG_TC_EGRESS] };
        for &name in names {
            let prog = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
            if xdp {
                let p: &mut Xdp = prog.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
            } else {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
            }
        }
        let mut take = |map: &str| ebpf.take_map(map).with_context(|| format!("no map {map}"));
        let peers = take(names::MAP_PEERS)?.try_into()?;
        let peer_log = if log { Some(take(names::MAP_PEER_LOG)?.try_into()?) } else { None };
        let greetings = take(names::MAP_PEER_GREETINGS)?.try_into()?;
        let payloads = take(names::MAP_PAYLOADS)?.try_into()?;
        let counters = Totals::take(&mut ebpf, &config)?;
        Ok(Self {
            xdp,
            ebpf,
            counters,
            peers,
            peer_log,
            greetings,
            payloads,
            followed: BTreeMap::new(),
        })
    }

    /// The program that sees a frame sent by `side`; `None` where none does (XDP: egress).
    fn program(&self, side: Side) -> Option<&'static str> {
        match (self.xdp, side) {
            (true, Side::Peer) => Some(names::PROG_XDP),
            (true, Side::Local) => None,
            (false, Side::Peer) => Some(names::PROG_TC_INGRESS),
            (false, Side::Local) => Some(names::PROG_TC_EGRESS),
        }
    }

    fn run(&self, name: &str, frame: &[u8]) -> anyhow::Result<()> {
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..TestRunOptions::default() };
        let prog = self.ebpf.program(name).context("program")?;
        let verdict = if self.xdp {
            let p: &Xdp = prog.try_into()?;
            p.test_run(opts)?.return_value
        } else {
            let p: &SchedClassifier = prog.try_into()?;
            p.test_run(opts)?.return_value
        };
        let want = if self.xdp { 2 } else { u32::MAX };
        anyhow::ensure!(verdict == want, "{name}: verdict {verdict:#x} on\n{}", hex(frame));
        Ok(())
    }

    /// What changed since the last call; the per-peer maps are emptied, the ring drained.
    fn take(&mut self) -> anyhow::Result<Seen> {
        let mut seen = Seen::default();
        while let Some(item) = self.payloads.next() {
            anyhow::ensure!(
                item.len() == size_of::<PayloadEvent>(),
                "a {}-byte record",
                item.len()
            );
            // SAFETY: exactly a PayloadEvent's bytes; any bit pattern is valid.
            let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PayloadEvent>()) };
            seen.records.push(Record::of(&e));
        }
        let now = self.counters.read_keys()?;
        for (k, &n) in &now {
            let d = n - self.followed.get(k).copied().unwrap_or(0);
            if d != 0
                && let Some(into) = followed(&mut seen, k)
            {
                into.insert(*k, d);
            }
        }
        self.followed = now;
        let mut peers: BTreeMap<PeerKey, PeerCounters> = BTreeMap::new();
        if let Some(log) = &mut self.peer_log {
            add_up_peer_log(log, &mut peers)?;
        }
        let keys: Vec<PeerKey> = self.peers.keys().collect::<Result<_, _>>()?;
        for k in keys {
            peers.insert(k, self.peers.get(&k, 0)?);
            self.peers.remove(&k)?;
        }
        for (k, v) in peers {
            if v.resets.iter().any(|&n| n != 0) {
                seen.resets.insert(k, v.resets);
            }
        }
        let keys: Vec<PeerGreetingKey> = self.greetings.keys().collect::<Result<_, _>>()?;
        for k in keys {
            seen.replies.insert(k, self.greetings.get(&k, 0)?);
            self.greetings.remove(&k)?;
        }
        Ok(seen)
    }
}

/// The model: the flows of the frames the programs saw, and what they must have written.
#[derive(Default)]
struct Model {
    flows: BTreeMap<FlowKey, FlowState>,
    seen: Seen,
}

impl Model {
    /// Advances the model by `frame`, seen by a program of `side` (`xdp`: ingress only).
    fn observe(&mut self, frame: &[u8], side: Side, xdp: bool, ifindex: u32) {
        let Parsed::Tcp(tcp) = reference::parse(frame, 0) else { return };
        let Some(m) = smtp_port(tcp.src_port, tcp.dst_port, PORTS) else { return };
        let direction = direction_of(side, m.sender_is_client);
        let (client, server, client_port, server_port) = if m.sender_is_client {
            (tcp.src, tcp.dst, tcp.src_port, tcp.dst_port)
        } else {
            (tcp.dst, tcp.src, tcp.dst_port, tcp.src_port)
        };
        let key = FlowKey {
            ifindex,
            client,
            server,
            client_port,
            server_port,
            family: tcp.family,
            direction: direction as u8,
            _pad: [0; 2],
        };
        let plaintext = PLAINTEXT.contains(&m.port);
        let fp = reference::flow_packet(frame, &tcp, m.sender_is_client, plaintext, xdp);
        let stored = self.flows.get(&key).copied();
        let mut st = stored.unwrap_or_default();
        // One clock instant: every frame is within the handshake timeout.
        let a =
            step(&mut st, stored.is_some(), &fp, 1, smtpflow_common::DEFAULT_HANDSHAKE_TIMEOUT_NS);
        if a.delete {
            self.flows.remove(&key);
        } else if a.store {
            self.flows.insert(key, st);
        }
        let peer = PeerKey {
            ifindex,
            addr: match side {
                Side::Peer => tcp.src,
                Side::Local => tcp.dst,
            },
            port: m.port,
            family: tcp.family,
            direction: direction as u8,
        };
        let scope = Scope { ifindex, port: m.port, direction };
        if let Some(phase) = a.reset {
            self.seen.resets.entry(peer).or_default()[phase as usize] += 1;
        }
        if let Some(r) = a.reply {
            *self.seen.replies.entry(PeerGreetingKey::any(peer, r.code)).or_default() += 1;
            if a.greeting {
                *self.seen.replies.entry(PeerGreetingKey::greeting(peer, r.code)).or_default() += 1;
            }
        }
        for stage in [a.starttls, a.tls].into_iter().flatten() {
            *self
                .seen
                .stages
                .entry(CounterKey::new(scope, Counter::Starttls(stage)))
                .or_default() += 1;
        }
        let attempts =
            [a.outcome.map(Counter::Handshake), a.syn_retransmit.then_some(Counter::SynRetransmit)];
        for counter in attempts.into_iter().flatten() {
            *self.seen.attempts.entry(CounterKey::new(scope, counter)).or_default() += 1;
        }
        if let Some(kind) = a.payload {
            let payload = tcp.payload(frame);
            let n = payload.len().min(PAYLOAD_BYTES);
            self.seen.records.push(Record {
                kind: Some(kind),
                peer,
                bytes: payload[..n].to_vec(),
                len: n as u16,
                payload_len: payload.len() as u32,
            });
        }
    }
}

/// One segment of a session script.
#[derive(Clone, Debug)]
struct Seg {
    from_client: bool,
    flags: u8,
    payload: Vec<u8>,
    /// Sent again with the sequence number of the sender's previous segment.
    retransmit: bool,
}

fn c(payload: &[u8]) -> Seg {
    Seg { from_client: true, flags: ACK | PSH, payload: payload.to_vec(), retransmit: false }
}

fn s(payload: &[u8]) -> Seg {
    Seg { from_client: false, flags: ACK | PSH, payload: payload.to_vec(), retransmit: false }
}

fn flag(from_client: bool, flags: u8) -> Seg {
    Seg { from_client, flags, payload: Vec::new(), retransmit: false }
}

fn again(mut seg: Seg) -> Seg {
    seg.retransmit = true;
    seg
}

/// A TLS record header and `len` bytes of body (a pattern, so that cuts show).
fn tls_record(kind: u8, len: usize) -> Vec<u8> {
    let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
    r.extend((0..len).map(|i| (i * 7 + 1) as u8));
    r
}

fn long_greeting() -> Vec<u8> {
    let mut g = Vec::new();
    for i in 0..12 {
        g.extend_from_slice(
            format!("220-mx.example line {i} of a long banner text\r\n").as_bytes(),
        );
    }
    g.extend_from_slice(b"220 mx.example ESMTP\r\n");
    g
}

const EHLO_REPLY_TLS: &[u8] =
    b"250-mx.example Hello\r\n250-SIZE 52428800\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n";
const EHLO_REPLY_PLAIN: &[u8] = b"250-mx.example\r\n250-SIZE 10240000\r\n250 HELP\r\n";

/// The scripted sessions: a port, whether the peer is the client (inbound), and the segments
/// after the TCP handshake.
fn scripts() -> Vec<(&'static str, u16, bool, Vec<Seg>)> {
    let hello = tls_record(0x16, 600);
    let server_hello = tls_record(0x16, 1200);
    let starttls = || {
        vec![
            s(b"220 mx.example ESMTP\r\n"),
            c(b"EHLO client.example\r\n"),
            s(EHLO_REPLY_TLS),
            c(b"STARTTLS\r\n"),
            s(b"220 2.0.0 Ready to start TLS\r\n"),
            c(&tls_record(0x16, 600)),
        ]
    };
    let with = |mut a: Vec<Seg>, b: Vec<Seg>| {
        a.extend(b);
        a
    };
    let mut out = Vec::new();
    for inbound in [true, false] {
        out.extend([
            (
                "STARTTLS completed",
                25,
                inbound,
                with(
                    starttls(),
                    vec![
                        s(&server_hello),
                        again(s(&server_hello)),
                        c(&[0x14, 3, 3, 0, 1, 1, 0x17, 3, 3, 0, 53]),
                        c(&tls_record(0x17, 80)),
                        c(&tls_record(0x17, 40)),
                        s(&tls_record(0x17, 100)),
                        flag(true, FIN | ACK),
                        flag(false, FIN | ACK),
                    ],
                ),
            ),
            (
                "STARTTLS, RST from the server mid-handshake",
                587,
                inbound,
                with(starttls(), vec![s(&tls_record(0x15, 2)), flag(false, RST | ACK)]),
            ),
            (
                "STARTTLS, FIN from the client mid-handshake",
                25,
                inbound,
                with(
                    starttls(),
                    vec![s(&server_hello), flag(true, FIN | ACK), flag(false, FIN | ACK)],
                ),
            ),
            (
                "STARTTLS, RST from the client after the ServerHello",
                25,
                inbound,
                with(starttls(), vec![s(&server_hello), flag(true, RST)]),
            ),
            (
                "STARTTLS refused",
                25,
                inbound,
                vec![
                    s(b"220 mx.example ESMTP\r\n"),
                    c(b"ehlo client.example\r\n"),
                    s(EHLO_REPLY_PLAIN),
                    c(b"STARTTLS\r\n"),
                    s(b"454 4.7.0 TLS not available\r\n"),
                    c(b"MAIL FROM:<a@example.org>\r\n"),
                    s(b"250 2.1.0 Ok\r\n"),
                    c(b"QUIT\r\n"),
                    Seg { flags: ACK | PSH | FIN, ..s(b"221 2.0.0 Bye\r\n") },
                ],
            ),
            (
                "HELO, retransmissions, a long greeting",
                25,
                inbound,
                vec![
                    s(&long_greeting()),
                    again(s(&long_greeting())),
                    c(b"HELO client.example\r\n"),
                    again(c(b"HELO client.example\r\n")),
                    s(b"250 mx.example\r\n"),
                    again(s(b"250 mx.example\r\n")),
                    c(b"EHLO second.example\r\n"),
                    s(b"250 again\r\n"),
                    flag(false, RST | ACK),
                ],
            ),
            (
                "a greeting split mid-line, EHLO before it",
                587,
                inbound,
                vec![
                    c(b"EHLO eager.example\r\n"),
                    s(b"220 mx.example"),
                    s(b" ESMTP ready\r\n"),
                    s(b"250-mx.example\r\n250 STARTTLS\r\n"),
                    flag(true, RST),
                ],
            ),
            (
                "a RST before the greeting",
                25,
                inbound,
                vec![flag(false, RST | ACK), flag(true, RST)],
            ),
            (
                "implicit TLS completed",
                465,
                inbound,
                vec![
                    c(&hello),
                    s(&server_hello),
                    again(s(&server_hello)),
                    c(&tls_record(0x17, 53)),
                    s(&tls_record(0x17, 200)),
                    c(&tls_record(0x17, 30)),
                    flag(true, FIN | ACK),
                    flag(false, FIN | ACK),
                ],
            ),
            (
                "implicit TLS, RST from the server after the ClientHello",
                465,
                inbound,
                vec![c(&hello), flag(false, RST | ACK)],
            ),
            (
                "implicit TLS, FIN from the server after its ServerHello",
                465,
                inbound,
                vec![
                    c(&hello),
                    Seg { flags: ACK | PSH | FIN, ..s(&tls_record(0x16, 300)) },
                    flag(true, FIN | ACK),
                ],
            ),
            (
                "implicit TLS, no payload",
                465,
                inbound,
                vec![flag(true, FIN | ACK), flag(false, FIN | ACK)],
            ),
        ]);
    }
    out
}

/// The segments a random session is made of.
fn palette() -> Vec<Seg> {
    vec![
        s(b"220 mx.example ESMTP\r\n"),
        s(b"421 4.7.0 busy\r\n"),
        s(EHLO_REPLY_TLS),
        s(EHLO_REPLY_PLAIN),
        s(b"220 go ahead\r\n"),
        s(b"250 ok\r\n"),
        s(b"451 4.7.1 greylisted\r\n"),
        s(b"220 partial"),
        s(&long_greeting()),
        s(&tls_record(0x16, 900)),
        s(&tls_record(0x17, 60)),
        s(&[0x16]),
        c(b"EHLO a.example\r\n"),
        c(b"HELO b\r\n"),
        c(b"helo\r\n"),
        c(b"STARTTLS\r\n"),
        c(b"QUIT\r\n"),
        c(&tls_record(0x16, 520)),
        c(&tls_record(0x17, 40)),
        c(&[0x17]),
        c(&[0x17, 3]),
        c(&[0x14, 3, 3, 0, 1, 1]),
        flag(true, FIN | ACK),
        flag(false, FIN | ACK),
        flag(true, RST),
        flag(false, RST | ACK),
        flag(true, ACK),
        // The client's SYN again: with its initial sequence number a retransmission (the step
        // that reads no clock), else a new attempt on the same ports.
        again(flag(true, SYN)),
        flag(true, SYN),
    ]
}

fn random_session(seed: u64, i: u64) -> (u16, bool, Vec<Seg>) {
    let mut r = Rng::for_frame(seed, i);
    let port = r.pick(PORTS);
    let inbound = r.percent(50);
    let palette = palette();
    let n = 2 + r.below(14);
    let mut segs = Vec::new();
    for _ in 0..n {
        let mut seg = palette[r.below(palette.len())].clone();
        seg.retransmit = r.percent(15);
        if r.percent(5) {
            seg.flags |= FIN;
        }
        segs.push(seg);
    }
    (port, inbound, segs)
}

/// The frames of a session: the handshake, then `segs`, each with who sent it (the peer's
/// side or ours).
fn frames(port: u16, inbound: bool, client_port: u16, segs: &[Seg]) -> Vec<(Side, Vec<u8>)> {
    let (peer, local) = (peer_v4(), gw_v4());
    let to_local = Eth::new(MAC_GW, MAC_PEER);
    let to_peer = Eth::new(MAC_PEER, MAC_GW);
    let isn = [5_000u32, 90_000u32]; // client, server
    let mut next = isn;
    let mut prev = next;
    let mut out = Vec::new();
    let mut send = |from_client: bool, flags: u8, payload: &[u8], retransmit: bool| {
        let i = usize::from(!from_client);
        // A SYN sent again carries the initial sequence number.
        let seq = match (retransmit, flags & SYN != 0) {
            (true, true) => isn[i],
            (true, false) => prev[i],
            (false, _) => next[i],
        };
        let (sport, dport) = if from_client { (client_port, port) } else { (port, client_port) };
        let mut t = Tcp::new(sport, dport, flags).payload(payload);
        t.seq = seq;
        // The peer sends when it is the client of an inbound connection, or the server of an
        // outbound one.
        let by_peer = from_client == inbound;
        let (side, frame) = if by_peer {
            (Side::Peer, to_local.ipv4(&Ipv4::new(peer, local, IPPROTO_TCP), &t.bytes()))
        } else {
            (Side::Local, to_peer.ipv4(&Ipv4::new(local, peer, IPPROTO_TCP), &t.bytes()))
        };
        out.push((side, frame));
        if !retransmit {
            prev[i] = seq;
            let syn_fin = u32::from(flags & (SYN | FIN) != 0);
            next[i] = seq.wrapping_add(payload.len() as u32 + syn_fin);
        }
    };
    send(true, SYN, &[], false);
    send(false, SYN | ACK, &[], false);
    send(true, ACK, &[], false);
    for seg in segs {
        send(seg.from_client, seg.flags, &seg.payload, seg.retransmit);
    }
    out
}

/// Runs one session through the programs and the model; `Err` describes a disagreement.
fn check(
    k: &mut Programs,
    ifindex: u32,
    name: &str,
    port: u16,
    inbound: bool,
    client_port: u16,
    segs: &[Seg],
) -> anyhow::Result<Result<Seen, String>> {
    let mut model = Model::default();
    for (side, frame) in frames(port, inbound, client_port, segs) {
        let Some(prog) = k.program(side) else { continue };
        k.run(prog, &frame)?;
        model.observe(&frame, side, k.xdp, ifindex);
    }
    let got = k.take()?;
    if got == model.seen {
        return Ok(Ok(got));
    }
    let mode = match (k.xdp, k.peer_log.is_some()) {
        (false, false) => "TC",
        (true, false) => "XDP",
        (false, true) => "TC --peer-counts log",
        (true, true) => "XDP --peer-counts log",
    };
    Ok(Err(format!(
        "{mode} {name} (port {port}, {}):\n  kernel {got:?}\n  model  {:?}",
        if inbound { "inbound" } else { "outbound" },
        model.seen
    )))
}

#[test]
fn kernel_follows_sessions_as_the_model_does() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let ifindex = lo_ifindex();
    let seed = super::env_u64("SMTPFLOW_FUZZ_SEED", super::DEFAULT_SEED);
    let mut wrong = Vec::new();
    let mut kinds = BTreeMap::new();
    let mut stages = BTreeMap::new();
    for (xdp, log) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut k = Programs::load(xdp, log).expect("load");
        let mut client_port = 30_000u16;
        let mut run = |name: String, port, inbound, segs: &[Seg]| {
            client_port += 1;
            match check(&mut k, ifindex, &name, port, inbound, client_port, segs).expect("run") {
                Ok(seen) => {
                    for r in &seen.records {
                        *kinds.entry((xdp, r.kind.map(PayloadKind::label))).or_insert(0) += 1;
                    }
                    for (key, n) in &seen.stages {
                        if let Some((_, Counter::Starttls(stage))) = key.decode() {
                            *stages.entry((xdp, stage.label())).or_insert(0) += n;
                        }
                    }
                }
                Err(e) => wrong.push(e),
            }
        };
        for (name, port, inbound, segs) in scripts() {
            run(name.to_string(), port, inbound, &segs);
        }
        for i in 0..400 {
            let (port, inbound, segs) = random_session(seed, i);
            run(format!("random session {i} of seed {seed:#x} {segs:?}"), port, inbound, &segs);
        }
    }
    assert!(wrong.is_empty(), "{} sessions disagree:\n{}", wrong.len(), wrong.join("\n\n"));
    eprintln!("payload events by (xdp, kind): {kinds:?}\nTLS stages by (xdp, stage): {stages:?}");
    // The scripts reach every kind and stage in TC.
    for kind in PayloadKind::ALL {
        assert!(kinds.contains_key(&(false, Some(kind.label()))), "no {kind:?} event in TC");
    }
    for stage in ["completed", "failed", "accepted", "refused", "requested"] {
        assert!(stages.contains_key(&(false, stage)), "no {stage} stage in TC");
    }
}
