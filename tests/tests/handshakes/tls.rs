//! The STARTTLS funnel and the TLS versions, from real TLS: a rustls SMTP server on the gateway
//! offering STARTTLS (TLS 1.3 on port 25, TLS 1.2 only on 587) and speaking implicit TLS 1.3 on
//! 465, driven from the peer by `openssl s_client` (through the whole handshake) and by a client
//! that resets right after the server's hello. The expected counts come from the wire: captures
//! on both ends of the link hold every segment, and each stage is counted per connection from
//! the bytes that crossed it (the EHLO reply listing STARTTLS, the client's STARTTLS, the
//! server's 220, the server's ServerHello record, the client's first application-data record).
use std::collections::BTreeSet;

use smtpflow_common::rules::tcp_flags::{ACK, SYN};
use smtpflow_tests::{
    Pair, Watch,
    capture::Capture,
    expect::{self, present},
    names::{STARTTLS, TLS_VERSIONS},
    pki::Pki,
    require_root, smtp,
    smtpflow::INTERVAL,
    starttls::{self, Mode},
};

use crate::{IF, PEER, series::addr};

/// One TCP segment of a captured IPv4 frame: ports, flags, payload.
struct Segment {
    src_port: u16,
    dst_port: u16,
    flags: u8,
    payload: Vec<u8>,
}

fn segment(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = 14 + ihl;
    let end = (14 + total).min(frame.len());
    if tcp + 20 > end {
        return None;
    }
    let data = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
    Some(Segment {
        src_port: u16::from_be_bytes([frame[tcp], frame[tcp + 1]]),
        dst_port: u16::from_be_bytes([frame[tcp + 2], frame[tcp + 3]]),
        flags: frame[tcp + 13],
        payload: frame.get(data..end).unwrap_or_default().to_vec(),
    })
}

/// What crossed the wire for the sessions to one server port: the client ports of the
/// connections that reached each stage.
#[derive(Debug, Default)]
struct Funnel {
    established: BTreeSet<u16>,
    offered: BTreeSet<u16>,
    requested: BTreeSet<u16>,
    accepted: BTreeSet<u16>,
    server_hellos: BTreeSet<u16>,
    completed: BTreeSet<u16>,
}

impl Funnel {
    fn of(segments: &[Segment], port: u16) -> Self {
        let mut f = Funnel::default();
        for s in segments {
            let p = &s.payload;
            if s.src_port == port {
                let client = s.dst_port;
                if s.flags & (SYN | ACK) == SYN | ACK {
                    f.established.insert(client);
                }
                if p.starts_with(b"250-")
                    && p.windows(14).any(|w| w.eq_ignore_ascii_case(b"\n250-STARTTLS\r"))
                {
                    f.offered.insert(client);
                }
                if p.starts_with(b"220 2.0.0") {
                    f.accepted.insert(client);
                }
                if p.len() > 5 && p[0] == 0x16 && p[1] == 3 && p[5] == 2 {
                    f.server_hellos.insert(client);
                }
            } else if s.dst_port == port {
                let client = s.src_port;
                if p.len() >= 8 && p[..8].eq_ignore_ascii_case(b"STARTTLS") {
                    f.requested.insert(client);
                }
                if p.first() == Some(&0x17) {
                    f.completed.insert(client);
                }
            }
        }
        f
    }

    /// Connections whose TLS started (STARTTLS accepted, or any on an implicit-TLS port) and
    /// that never completed: every connection has ended, so these failed.
    fn failed(&self, implicit: bool) -> u64 {
        let started = if implicit { &self.established } else { &self.accepted };
        started.difference(&self.completed).count() as u64
    }
}

/// Where smtpflow watches from, and which way the sessions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Tc,
    /// Ingress only.
    Xdp,
}

/// What smtpflow can count of a stage or a ServerHello, given what the wire shows (`wire`):
/// everything in TC mode. In XDP mode only the remote's segments show:
/// - inbound (the client is the remote): `requested` (its STARTTLS), and on an implicit-TLS port
///   `completed` and `failed` (its first application-data record, its RST), since the TLS
///   handshake there starts with the TCP handshake, which the client's ACK completes. Not
///   `offered`, `accepted` nor a ServerHello (the local server's segments), so a STARTTLS
///   session's TLS is never seen starting: no `completed` or `failed` on 25 and 587.
/// - outbound (the server is the remote): the EHLO reply is only read after the client's EHLO,
///   the 220 only answers a STARTTLS seen, and neither shows: nothing of a STARTTLS session. On an
///   implicit-TLS port the TLS handshake starts with the TCP one (the server's SYN-ACK), so the
///   server's ServerHello shows, not the client's records: the version, no `completed`/`failed`.
fn visible(seen: Seen, outbound: bool, implicit: bool, what: &str, wire: u64) -> u64 {
    let shown = match (seen, outbound) {
        (Seen::Tc, _) => true,
        (Seen::Xdp, false) => {
            what == "requested" || (implicit && (what == "completed" || what == "failed"))
        }
        (Seen::Xdp, true) => implicit && what == "server_hello",
    };
    if shown { wire } else { 0 }
}

/// On port 25, `K` sessions of `openssl s_client -starttls smtp -tls1_3` and one that resets
/// after the server's hello; on 587 (a TLS 1.2-only server) one with `-tls1_2`; on 465 one
/// implicit TLS 1.3 session: inbound (the gateway serves) or outbound (the peer serves). Every
/// stage counts as often as the wire shows it, per port, as far as `seen` can see it
/// ([`visible`]); the versions are the servers' (the hello of the session that reset counts
/// too: it crossed the wire); nothing is `unknown`; 465 has no clear-text stage.
fn funnel(seen: Seen, outbound: bool) {
    let pair = Pair::new();
    let mode: &[&str] = if seen == Seen::Xdp { &["--mode", "xdp"] } else { &[] };
    let w = Watch::start(&pair.local, IF, mode);
    let pki = Pki::new();
    let tls13 = starttls::server_config(&pki, &rustls::version::TLS13);
    let tls12 = starttls::server_config(&pki, &rustls::version::TLS12);
    const K: usize = 2;
    let (server_ns, server_ip, client_ns) = if outbound {
        (&pair.peer, PEER, &pair.local)
    } else {
        (&pair.local, Pair::LOCAL_V4, &pair.peer)
    };
    let at = |port| addr(server_ip, port);
    let listen = |port| smtp::listen(server_ns, &at(port), 16);
    let s25 = starttls::serve(listen(25), K + 1, tls13.clone(), Mode::Starttls);
    let s587 = starttls::serve(listen(587), 1, tls12, Mode::Starttls);
    let s465 = starttls::serve(listen(465), 1, tls13, Mode::Implicit);
    let (cap_in, cap_out) =
        (Capture::start(&pair.local, IF), Capture::start(&pair.peer, Pair::PEER_IF));

    for _ in 0..K {
        let out = starttls::s_client(client_ns, &at(25), true, "-tls1_3");
        assert!(out.stdout.contains("221 2.0.0 Bye"), "s_client on 25: {out:?}");
    }
    let read = starttls::reset_mid_handshake(client_ns, &at(25), &rustls::version::TLS13);
    eprintln!("the client that reset read {read} bytes of the server's hello");
    let out = starttls::s_client(client_ns, &at(587), true, "-tls1_2");
    assert!(out.stdout.contains("221 2.0.0 Bye"), "s_client on 587: {out:?}");
    let out = starttls::s_client(client_ns, &at(465), false, "-tls1_3");
    assert!(out.stdout.contains("221 2.0.0 Bye"), "s_client on 465: {out:?}");
    let r25 = s25.join().expect("server on 25");
    assert_eq!(r25.iter().filter(|r| r.is_ok()).count(), K, "{r25:?}");
    assert_eq!(s587.join().expect("server on 587"), [Ok(())]);
    assert_eq!(s465.join().expect("server on 465"), [Ok(())]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let segments: Vec<Segment> =
        cap_in.finish().into_iter().chain(cap_out.finish()).filter_map(|f| segment(&f)).collect();

    let (f25, f587, f465) =
        (Funnel::of(&segments, 25), Funnel::of(&segments, 587), Funnel::of(&segments, 465));
    eprintln!("the wire: 25 {f25:?}\n587 {f587:?}\n465 {f465:?}");
    // The wire agrees with what the clients did (the oracle is no tautology of the test).
    let n = |s: &BTreeSet<u16>| s.len() as u64;
    let k = K as u64;
    assert_eq!((n(&f25.offered), n(&f25.accepted), n(&f25.completed)), (k + 1, k + 1, k));
    assert_eq!(n(&f25.server_hellos), k + 1);
    assert_eq!(f25.failed(false), 1, "the client that reset");
    assert_eq!((n(&f587.completed), n(&f465.completed), n(&f465.offered)), (1, 1, 0));

    let d = if outbound { "outbound" } else { "inbound" };
    let mut want: Vec<expect::Expected<'_>> = Vec::new();
    for (port, f, implicit, version) in [
        ("25", &f25, false, "TLSv1.3"),
        ("587", &f587, false, "TLSv1.2"),
        ("465", &f465, true, "TLSv1.3"),
    ] {
        let scope = |extra: (&'static str, &'static str)| {
            vec![("iface", IF), ("direction", d), ("port", port), extra]
        };
        for (stage, v) in [
            ("offered", n(&f.offered)),
            ("requested", n(&f.requested)),
            ("accepted", n(&f.accepted)),
            ("refused", 0),
            ("completed", n(&f.completed)),
            ("failed", f.failed(implicit)),
        ] {
            want.push((
                STARTTLS,
                scope(("stage", stage)),
                visible(seen, outbound, implicit, stage, v),
            ));
        }
        for v in ["TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3", "unknown"] {
            let hellos = if v == version { n(&f.server_hellos) } else { 0 };
            let hellos = visible(seen, outbound, implicit, "server_hello", hellos);
            want.push((TLS_VERSIONS, scope(("version", v)), hellos));
        }
    }
    let (m, wrong) = expect::settle(std::time::Duration::from_secs(30), INTERVAL * 5, || {
        let m = w.scrape(&pair.local);
        let wrong: Vec<String> =
            want.iter().filter_map(|(name, labels, v)| present(&m, name, labels, *v)).collect();
        (m, wrong)
    });
    assert!(
        wrong.is_empty(),
        "the STARTTLS funnel did not settle:\n  {}\nnon-zero: {:?} {:?}\nsmtpflow stderr:\n{}",
        wrong.join("\n  "),
        m.nonzero(STARTTLS),
        m.nonzero(TLS_VERSIONS),
        w.stderr()
    );
}

#[test]
fn tc_inbound_starttls_funnel_and_versions() {
    require_root!();
    funnel(Seen::Tc, false);
}

#[test]
fn tc_outbound_starttls_funnel_and_versions() {
    require_root!();
    funnel(Seen::Tc, true);
}

#[test]
fn xdp_inbound_starttls_funnel_what_ingress_shows() {
    require_root!();
    funnel(Seen::Xdp, false);
}

#[test]
fn xdp_outbound_starttls_funnel_what_ingress_shows() {
    require_root!();
    funnel(Seen::Xdp, true);
}
