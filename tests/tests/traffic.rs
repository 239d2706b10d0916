//! Real TCP connections between namespaces, counted by the real `smtpflow watch`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use smtpflow_tests::{Netns, Pair, Watch, in_netns, require_root};

const EVENTS: &str = "smtpflow_tcp_events_total";
const PEER_EVENTS: &str = "smtpflow_peer_tcp_events_total";

/// Listens on `addr` inside `ns` and accepts (then closes) `n` connections on a thread.
fn serve(ns: &Netns, addr: &str, n: usize) -> thread::JoinHandle<()> {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind test server"));
    thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        }
    })
}

/// Connects `n` times from `ns` and closes each connection at once.
fn connect_n(ns: &Netns, addr: &str, n: usize) {
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        for _ in 0..n {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            drop(s);
        }
    });
}

/// Connects once from `ns` to a closed port; must be refused.
fn connect_refused(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        let err = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect_err("port must be closed");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    });
}

fn labels<'a>(iface: &'a str, dir: &'a str, port: &'a str, event: &'a str, side: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("iface", iface), ("direction", dir), ("port", port), ("event", event), ("side", side)]
}

fn peer_labels<'a>(peer: &'a str, dir: &'a str, port: &'a str, event: &'a str, side: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("iface", Pair::LOCAL_IF), ("peer", peer), ("direction", dir), ("port", port), ("event", event), ("side", side)]
}

/// Inbound connections to a listening port 25 and to a closed port 587, outbound connections
/// to a server in the peer namespace: every event with exact totals and per-peer counts.
fn connections(mode: &str, v6: bool) {
    let pair = Pair::new();
    let (local_ip, peer_ip) = if v6 { (Pair::LOCAL_V6, Pair::PEER_V6) } else { (Pair::LOCAL_V4, Pair::PEER_V4) };
    let sock = |ip: &str, port: u16| if v6 { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") };
    let w = Watch::start(&pair.local, Pair::LOCAL_IF, &["--mode", mode]);

    const N_IN: usize = 7;
    const N_OUT: usize = 4;
    let server = serve(&pair.local, &sock(local_ip, 25), N_IN);
    connect_n(&pair.peer, &sock(local_ip, 25), N_IN);
    server.join().unwrap();
    connect_refused(&pair.peer, &sock(local_ip, 587));
    let remote = serve(&pair.peer, &sock(peer_ip, 25), N_OUT);
    connect_n(&pair.local, &sock(peer_ip, 25), N_OUT);
    remote.join().unwrap();
    connect_refused(&pair.local, &sock(peer_ip, 465));

    let i = Pair::LOCAL_IF;
    let tc = mode == "tc";
    // XDP sees ingress only: what the peer sends.
    let local = |n: u64| if tc { n } else { 0 };
    let n_in = N_IN as u64;
    let n_out = N_OUT as u64;
    let expected = vec![
        (EVENTS, labels(i, "inbound", "25", "syn", "peer"), n_in),
        (EVENTS, labels(i, "inbound", "25", "syn_ack", "local"), local(n_in)),
        (EVENTS, labels(i, "inbound", "587", "syn", "peer"), 1),
        (EVENTS, labels(i, "inbound", "587", "rst", "local"), local(1)),
        (EVENTS, labels(i, "outbound", "25", "syn", "local"), local(n_out)),
        (EVENTS, labels(i, "outbound", "25", "syn_ack", "peer"), n_out),
        (EVENTS, labels(i, "outbound", "465", "syn", "local"), local(1)),
        (EVENTS, labels(i, "outbound", "465", "rst", "peer"), 1),
        // Nothing else at all: every other series stays 0.
        (EVENTS, vec![], 2 * n_in + 2 * n_out + 4 - if tc { 0 } else { n_in + n_out + 2 }),
        (EVENTS, vec![("event", "zero_window")], 0),
        (PEER_EVENTS, peer_labels(peer_ip, "inbound", "25", "syn", "peer"), n_in),
        (PEER_EVENTS, peer_labels(peer_ip, "inbound", "25", "syn_ack", "local"), local(n_in)),
        (PEER_EVENTS, peer_labels(peer_ip, "inbound", "587", "rst", "local"), local(1)),
        (PEER_EVENTS, peer_labels(peer_ip, "outbound", "25", "syn", "local"), local(n_out)),
        (PEER_EVENTS, peer_labels(peer_ip, "outbound", "25", "syn_ack", "peer"), n_out),
        (PEER_EVENTS, peer_labels(peer_ip, "outbound", "465", "rst", "peer"), 1),
        (PEER_EVENTS, vec![], 2 * n_in + 2 * n_out + 4 - if tc { 0 } else { n_in + n_out + 2 }),
        ("smtpflow_peers_tracked", vec![], 1),
        ("smtpflow_malformed_packets_total", vec![], 0),
        ("smtpflow_lost_events_total", vec![], 0),
    ];
    let m = w.expect_settled(&pair.local, &expected);
    // Every combination is exported from the start, zeros included: 3 ports x 2 directions x
    // 4 events x 2 sides.
    assert_eq!(m.matching(EVENTS, &[]).count(), 48, "{}", m.text);
}

#[test]
fn tc_ipv4_connections() {
    require_root!();
    connections("tc", false);
}

#[test]
fn tc_ipv6_connections() {
    require_root!();
    connections("tc", true);
}

#[test]
fn xdp_ipv4_connections() {
    require_root!();
    connections("xdp", false);
}

#[test]
fn xdp_ipv6_connections() {
    require_root!();
    connections("xdp", true);
}
