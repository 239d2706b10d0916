//! Open connections: `smtpflow_open_connections` and `smtpflow_peer_open_connections`, gauges
//! of the connections established and not ended, held open both ways between the gateway and
//! its peer, then closed. The expected values come from the wire: a capture on each end of the
//! link (each receives what the other sent, so together they hold every segment), from which a
//! connection is open once its handshake completed and until it ended (a FIN from both sides, or
//! a RST), as far as the observation point can see.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use smtpflow_common::rules::tcp_flags::{ACK, FIN, RST, SYN};
use smtpflow_tests::{
    Netns, Pair, Watch,
    capture::{self, Capture},
    expect::{self, present},
    in_netns,
    names::{OPEN, PEER_OPEN},
    require_root, smtp,
    smtpflow::INTERVAL,
};

use crate::{IF, PEER, series::addr};

/// Inbound connections go to the gateway's port 25, outbound ones to the peer's port 587, so a
/// segment's direction is its server port.
const IN_PORT: u16 = 25;
const OUT_PORT: u16 = 587;

/// Both ends of `n` connections from `client_ns` to `server` (listening in `server_ns`), each
/// greeted with a 220 line the client has read: open, with payload from the server.
struct Held {
    clients: Vec<TcpStream>,
    servers: Vec<TcpStream>,
}

fn hold(server_ns: &Netns, client_ns: &Netns, server: &str, n: usize) -> Held {
    let listener = smtp::listen(server_ns, server, 64);
    let to: SocketAddr = server.parse().expect("socket address");
    let clients: Vec<TcpStream> = in_netns(client_ns, move || {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connect {to}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
                s
            })
            .collect()
    });
    let servers: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = smtp::accept_within(&listener, Duration::from_secs(10));
            s.write_all(b"220 held ESMTP\r\n").expect("greeting");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
            s
        })
        .collect();
    for mut c in &clients {
        let mut line = [0u8; 16];
        c.read_exact(&mut line).expect("the greeting");
        assert_eq!(&line, b"220 held ESMTP\r\n");
    }
    Held { clients, servers }
}

impl Held {
    /// Closes every connection in order: the client's FIN, the server reads the end and closes
    /// (its FIN), the client reads the end. No RST.
    fn close(self) {
        for c in &self.clients {
            c.shutdown(Shutdown::Write).expect("client FIN");
        }
        for mut s in self.servers {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("the client's end");
            assert!(rest.is_empty(), "the client sent nothing: {rest:?}");
        }
        for mut c in self.clients {
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).expect("the server's end");
        }
    }
}

/// Captures on both ends of the link: `local` is what the gateway received (ingress), `peer`
/// what it sent.
struct Wire {
    local: Capture,
    peer: Capture,
}

impl Wire {
    fn start(pair: &Pair) -> Self {
        Self {
            local: Capture::start(&pair.local, IF),
            peer: Capture::start(&pair.peer, Pair::PEER_IF),
        }
    }

    /// Stops both captures, after the last segments had time to arrive.
    fn finish(self) -> Segments {
        std::thread::sleep(Duration::from_millis(200));
        let parse = |frames: Vec<Vec<u8>>| -> Vec<capture::Seen> {
            frames.iter().filter_map(|f| capture::ipv4_tcp(f)).collect()
        };
        Segments { ingress: parse(self.local.finish()), egress: parse(self.peer.finish()) }
    }
}

/// The TCP segments of a phase of the test, by the gateway's side of the link.
struct Segments {
    ingress: Vec<capture::Seen>,
    egress: Vec<capture::Seen>,
}

/// Which connections (by client port) of the server port `port` a set of segments shows
/// handshaking, ending with a client FIN, a server FIN, or a RST.
#[derive(Default, Debug)]
struct Shown {
    established: BTreeSet<u16>,
    client_fin: BTreeSet<u16>,
    server_fin: BTreeSet<u16>,
    reset: BTreeSet<u16>,
}

fn shown<'a>(segments: impl IntoIterator<Item = &'a capture::Seen>, port: u16, xdp: bool) -> Shown {
    let mut s = Shown::default();
    for seg in segments {
        let from_server = seg.src_port == port;
        if !from_server && seg.dst_port != port {
            continue;
        }
        let client = if from_server { seg.dst_port } else { seg.src_port };
        let flags = seg.flags;
        if flags & RST != 0 {
            s.reset.insert(client);
        }
        if flags & FIN != 0 {
            if from_server { &mut s.server_fin } else { &mut s.client_fin }.insert(client);
        }
        // The SYN-ACK completes a handshake; where it is not seen (XDP, inbound) the client's
        // first ACK does.
        let synack = from_server && flags & (SYN | ACK) == SYN | ACK;
        let client_ack = xdp && !from_server && flags & (SYN | ACK | RST | FIN) == ACK;
        if synack || client_ack {
            s.established.insert(client);
        }
    }
    s
}

/// Connections open per direction after `phases` (in order), as smtpflow sees them: in TC mode
/// every segment, a connection ends with a FIN from both sides or a RST; in XDP mode the
/// ingress only, where a connection ends with the remote's FIN or RST (the client's for
/// inbound, the server's for outbound: the gateway's own never shows).
fn open_after(phases: &[&Segments], xdp: bool) -> (u64, u64) {
    let count = |port: u16, remote_is_client: bool| {
        let segs: Vec<&capture::Seen> = phases
            .iter()
            .flat_map(|p| {
                let egress: &[capture::Seen] = if xdp { &[] } else { &p.egress };
                p.ingress.iter().chain(egress)
            })
            .collect();
        let s = shown(segs, port, xdp);
        s.established
            .iter()
            .filter(|c| {
                let ended = if xdp {
                    let fin = if remote_is_client { &s.client_fin } else { &s.server_fin };
                    fin.contains(c)
                } else {
                    s.client_fin.contains(c) && s.server_fin.contains(c)
                };
                !ended && !s.reset.contains(c)
            })
            .count() as u64
    };
    (count(IN_PORT, true), count(OUT_PORT, false))
}

/// Waits until the gauges read the expected values, each series present, and still read them
/// five drains later.
fn expect_open(w: &Watch, pair: &Pair, inbound: u64, outbound: u64) {
    let (i, o) = ("inbound", "outbound");
    let (ip, op) = (IN_PORT.to_string(), OUT_PORT.to_string());
    let (m, wrong) = expect::settle(Duration::from_secs(30), INTERVAL * 5, || {
        let m = w.scrape(&pair.local);
        let mut wrong = Vec::new();
        let si = [("iface", IF), ("direction", i), ("port", ip.as_str())];
        let so = [("iface", IF), ("direction", o), ("port", op.as_str())];
        let pi = [si[0], si[1], si[2], ("peer", PEER)];
        let po = [so[0], so[1], so[2], ("peer", PEER)];
        wrong.extend(present(&m, OPEN, &si, inbound));
        wrong.extend(present(&m, OPEN, &so, outbound));
        wrong.extend(present(&m, PEER_OPEN, &pi, inbound));
        wrong.extend(present(&m, PEER_OPEN, &po, outbound));
        wrong.extend(present(&m, OPEN, &[], inbound + outbound));
        (m, wrong)
    });
    assert!(
        wrong.is_empty(),
        "open connections did not settle:\n  {}\nseries: {:?} {:?}\nsmtpflow stderr:\n{}",
        wrong.join("\n  "),
        m.nonzero(OPEN),
        m.nonzero(PEER_OPEN),
        w.stderr()
    );
}

/// Holds `n_in` connections from the peer to the gateway and `n_out` from the gateway to the
/// peer, checks the gauges against the wire, closes them all, checks again: 0.
fn held_then_closed(mode: &[&str], xdp: bool) {
    let pair = Pair::new();
    let w = Watch::start(&pair.local, IF, mode);
    const N_IN: usize = 3;
    const N_OUT: usize = 2;
    let wire = Wire::start(&pair);
    let inbound = hold(&pair.local, &pair.peer, &addr(Pair::LOCAL_V4, IN_PORT), N_IN);
    let outbound = hold(&pair.peer, &pair.local, &addr(PEER, OUT_PORT), N_OUT);
    let held = wire.finish();
    let (open_in, open_out) = open_after(&[&held], xdp);
    eprintln!("held: the wire shows {open_in} inbound and {open_out} outbound connections open");
    // The wire agrees with what the clients hold (the oracle is no tautology of the test).
    assert_eq!((open_in, open_out), (N_IN as u64, N_OUT as u64));
    expect_open(&w, &pair, open_in, open_out);

    let wire = Wire::start(&pair);
    inbound.close();
    outbound.close();
    let closed = wire.finish();
    let (left_in, left_out) = open_after(&[&held, &closed], xdp);
    assert_eq!((left_in, left_out), (0, 0), "every connection ended on the wire");
    expect_open(&w, &pair, left_in, left_out);
}

/// TC sees both directions: a connection is open from its SYN-ACK to the FIN of both sides.
#[test]
fn tc_open_connections_held_then_closed() {
    require_root!();
    held_then_closed(&[], false);
}

/// XDP sees ingress only: an inbound connection is open from the client's ACK to the client's
/// FIN (the gateway's SYN-ACK and FIN leave through egress, unseen), an outbound one from the
/// peer's SYN-ACK to the peer's FIN. Held connections read the same as in TC mode, and 0 once
/// closed.
#[test]
fn xdp_open_connections_held_then_closed() {
    require_root!();
    held_then_closed(&["--mode", "xdp"], true);
}
