//! Real TCP connections between namespaces, counted by the real `smtpflow watch`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use smtpflow_tests::{
    Pair, Watch, in_netns,
    names::{EVENTS, LOST, MALFORMED, PEER_EVENTS, PEERS_TRACKED},
    require_root,
    traffic::{connect_n, connect_refused, serve},
};

fn labels<'a>(
    iface: &'a str,
    dir: &'a str,
    port: &'a str,
    event: &'a str,
    side: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![("iface", iface), ("direction", dir), ("port", port), ("event", event), ("side", side)]
}

fn peer_labels<'a>(
    peer: &'a str,
    dir: &'a str,
    port: &'a str,
    event: &'a str,
    side: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("iface", Pair::LOCAL_IF),
        ("peer", peer),
        ("direction", dir),
        ("port", port),
        ("event", event),
        ("side", side),
    ]
}

/// Inbound connections to a listening port 25 and to a closed port 587, outbound connections
/// to a server in the peer namespace: every event with exact totals and per-peer counts.
fn connections(mode: &str, v6: bool) {
    let pair = Pair::new();
    let (local_ip, peer_ip) =
        if v6 { (Pair::LOCAL_V6, Pair::PEER_V6) } else { (Pair::LOCAL_V4, Pair::PEER_V4) };
    let sock = |ip: &str, port: u16| {
        if v6 { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
    };
    // IPv4 runs at `--log-level debug`: the kernel programs then carry their reporting code
    // (the verifier walks it), and a healthy run must report nothing.
    let log_level = if v6 { "info" } else { "debug" };
    let w = Watch::start(&pair.local, Pair::LOCAL_IF, &["--mode", mode, "--log-level", log_level]);

    const N_IN: usize = 7;
    const N_OUT: usize = 4;
    let server = serve(&pair.local, &sock(local_ip, 25), N_IN);
    let _inbound = connect_n(&pair.peer, &sock(local_ip, 25), N_IN);
    server.join().unwrap();
    connect_refused(&pair.peer, &sock(local_ip, 587), 1);
    let remote = serve(&pair.peer, &sock(peer_ip, 25), N_OUT);
    let _outbound = connect_n(&pair.local, &sock(peer_ip, 25), N_OUT);
    remote.join().unwrap();
    connect_refused(&pair.local, &sock(peer_ip, 465), 1);

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
        (PEERS_TRACKED, vec![], 1),
        (MALFORMED, vec![], 0),
        (LOST, vec![], 0),
    ];
    let m = w.expect_settled(&pair.local, &expected);
    // Every combination is exported from the start, zeros included: 3 ports x 2 directions x
    // 4 events x 2 sides.
    assert_eq!(m.matching(EVENTS, &[]).count(), 48, "{}", m.text);
    let log = w.stderr();
    let announced = log.contains("the kernel programs report their failures here");
    assert_eq!(announced, !v6, "the kernel's reports are on at debug only:\n{log}");
    let reports: Vec<&str> = log.lines().filter(|l| l.contains("] kernel: ")).collect();
    assert_eq!(reports, Vec::<&str>::new(), "no kernel failure in a healthy run");
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

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

fn set_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a valid socket with a valid int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            4,
        )
    };
    assert_eq!(rc, 0);
}

/// Writes to `s` until the receiver's window is closed: writes have blocked for 300 ms.
fn fill_until_stalled(s: &mut TcpStream) {
    use std::io::Write;
    s.set_nonblocking(true).unwrap();
    let chunk = [b'x'; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut blocked_since = None;
    while std::time::Instant::now() < deadline {
        match s.write(&chunk) {
            Ok(_) => blocked_since = None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    panic!("the receiver never stalled");
}

/// A receiver that stops reading until its window is zero, then the connection is reset by it.
/// `local_stalls`: the gateway's server stalls (zero windows sent by `local`); otherwise the peer
/// client stalls (zero windows sent by the `peer`). The expected counts come from an independent
/// capture at the far end of the veth.
fn receive_stall(mode: &str, local_stalls: bool) {
    let pair = Pair::new();
    let w = Watch::start(&pair.local, Pair::LOCAL_IF, &["--mode", mode]);
    // Capture what the staller sends, on the interface that receives it.
    let (cap_ns, cap_if) =
        if local_stalls { (&pair.peer, Pair::PEER_IF) } else { (&pair.local, Pair::LOCAL_IF) };
    let cap = smtpflow_tests::capture::Capture::start(cap_ns, cap_if);

    let addr: SocketAddr = format!("{}:25", Pair::LOCAL_V4).parse().unwrap();
    let listener = in_netns(&pair.local, move || TcpListener::bind(addr).unwrap());
    let mut client = in_netns(&pair.peer, move || TcpStream::connect(addr).unwrap());
    let (mut server, _) = listener.accept().unwrap();
    let (writer, staller) =
        if local_stalls { (&mut client, &mut server) } else { (&mut server, &mut client) };
    set_rcvbuf(staller, 4096);
    fill_until_stalled(writer);
    // Let a few zero-window probes happen; then the staller closes with unread data, which the
    // kernel answers with a reset.
    thread::sleep(Duration::from_millis(1500));
    if local_stalls {
        drop(server);
        thread::sleep(Duration::from_millis(300));
        drop(client);
    } else {
        drop(client);
        thread::sleep(Duration::from_millis(300));
        drop(server);
    }
    thread::sleep(Duration::from_millis(500));
    let frames = cap.finish();

    let staller_port_is_src = local_stalls; // the server (port 25) stalls when local stalls
    let from_staller: Vec<_> = frames
        .iter()
        .filter_map(|f| smtpflow_tests::capture::ipv4_tcp(f))
        .filter(|s| if staller_port_is_src { s.src_port == 25 } else { s.dst_port == 25 })
        .collect();
    let zero_windows =
        from_staller.iter().filter(|s| s.window == 0 && s.flags & (SYN | FIN | RST) == 0).count()
            as u64;
    let resets = from_staller.iter().filter(|s| s.flags & RST != 0).count() as u64;
    eprintln!("capture: {zero_windows} zero-window segments and {resets} resets from the staller");
    assert!(zero_windows > 0, "the staller never advertised a zero window");
    assert!(resets >= 1, "the staller did not reset the connection");

    let i = Pair::LOCAL_IF;
    let side = if local_stalls { "local" } else { "peer" };
    let other = if local_stalls { "peer" } else { "local" };
    let seen = |n: u64, s: &str| if mode == "xdp" && s == "local" { 0 } else { n };
    let expected = vec![
        (EVENTS, labels(i, "inbound", "25", "zero_window", side), seen(zero_windows, side)),
        (EVENTS, labels(i, "inbound", "25", "zero_window", other), 0),
        (EVENTS, labels(i, "inbound", "25", "rst", side), seen(resets, side)),
        (EVENTS, labels(i, "inbound", "25", "syn", "peer"), 1),
        (EVENTS, labels(i, "inbound", "25", "syn_ack", "local"), seen(1, "local")),
        (
            PEER_EVENTS,
            peer_labels(Pair::PEER_V4, "inbound", "25", "zero_window", side),
            seen(zero_windows, side),
        ),
    ];
    w.expect_settled(&pair.local, &expected);
}

#[test]
fn tc_local_receive_stall() {
    require_root!();
    receive_stall("tc", true);
}

#[test]
fn tc_peer_receive_stall() {
    require_root!();
    receive_stall("tc", false);
}

#[test]
fn xdp_peer_receive_stall() {
    require_root!();
    receive_stall("xdp", false);
}
