//! Reply codes and enhanced status codes, read by the kernel from server segments, against the
//! pure state machine (`smtpflow_common::flow::step` and `smtpflow_common::reply`).
//!
//! Each case is a connection of its own (a client port per case): the server's SYN-ACK, then one
//! server segment. Every reply text is also cut at every length, so that each way the kernel
//! reads a payload head (16 bytes, 8, 4) is compared with the model byte for byte.
use std::collections::BTreeMap;

use smtpflow_common::{
    Counter, Direction, Scope, Side,
    flow::{FlowPacket, FlowState, step},
    reference,
    rules::tcp_flags::{ACK, PSH, SYN},
};
use smtpflow_tests::{
    frames::{Eth, IPPROTO_TCP, Ipv4, Tcp, hex},
    require_root,
};

use super::{
    corpus::{MAC_GW, MAC_PEER, gw_v4, peer_v4},
    programs::{Hook, Kernel, kernel_available, lo_ifindex},
};

/// Server replies: greylisting, transient trouble, throttling, odd and broken codes.
const REPLIES: &[&[u8]] = &[
    b"220 mx.example ESMTP\r\n",
    b"421 4.3.2 System not accepting network messages\r\n",
    b"421-4.7.0 Try again later, closing connection.\r\n",
    b"421 mx busy\r\n",
    b"450 4.2.0 greylisted\r\n",
    b"451 4.7.1 Please try again later\r\n",
    b"450 4.7.1 Recipient address rejected: Greylisted\r\n",
    b"450 4.3.0 temporary\r\n",
    b"451 4.3.0 Internal error\r\n",
    b"452 4.2.2 Mailbox full\r\n",
    b"451 4.7.500 Server busy. Please try again later\r\n",
    b"450 4.7.650 The mail server is temporarily rate limited\r\n",
    b"452 4.5.3 Too many recipients\r\n",
    b"451 4.4.5 Insufficient system storage\r\n",
    b"450-4.2.1 The user is receiving mail at a rate\r\n",
    b"550 5.7.28 flood\r\n",
    b"554 5.7.1 rejected\r\n",
    b"550 4.7.1 class mismatch\r\n",
    b"451 4.123.456 subject too big\r\n",
    b"451 4.7.1000 detail too long\r\n",
    b"452 4.5.3\r\n",
    b"421 4.3.2",
    b"451 4.7.1",
    b"250 2.1.5 Ok\r\n",
    b"599 9.9.9 odd\r\n",
];

/// The counters a server segment decides, as the kernel keys them.
type Counts = BTreeMap<(Scope, Counter), u64>;

fn is_reply_counter(c: &Counter) -> bool {
    matches!(
        c,
        Counter::Reply(_)
            | Counter::Greeting(_)
            | Counter::ReplyStatus(..)
            | Counter::Throttled
            | Counter::Starttls(_)
    )
}

/// The reply counters of the kernel so far, summed over CPUs.
fn reply_counts(k: &Kernel) -> Counts {
    let mut out = Counts::new();
    for (key, n) in k.counters.read_keys().expect("counters") {
        let Some((scope, counter)) = key.decode() else { continue };
        if is_reply_counter(&counter) && n != 0 {
            out.insert((scope, counter), n);
        }
    }
    out
}

/// What the kernel reads of a server payload: the model's [`FlowPacket`].
fn server_packet(seq: u32, payload: &[u8]) -> FlowPacket {
    let len = payload.len();
    let (head, n) = reference::kernel_head(payload);
    let mut p = FlowPacket {
        flags: ACK | PSH,
        from_client: false,
        seq,
        payload_len: len as u32,
        ends_line: payload.last().is_none_or(|&b| b == b'\n'),
        plaintext: true,
        ..FlowPacket::default()
    };
    p.read_head(&head, n);
    p
}

/// The counters the model decides for a SYN-ACK then `payload` from the server.
fn model(scope: Scope, payload: &[u8]) -> Counts {
    let mut st = FlowState::default();
    let syn_ack = FlowPacket { flags: SYN | ACK, seq: 1000, ..FlowPacket::default() };
    step(&mut st, false, &syn_ack, 1, 0);
    let a = step(&mut st, true, &server_packet(1001, payload), 2, 0);
    let mut out = Counts::new();
    if let Some(r) = a.reply {
        out.insert((scope, Counter::Reply(r.code)), 1);
        if r.code >= 400 {
            out.insert((scope, Counter::ReplyStatus(r.code, r.status)), 1);
        }
        if a.greeting {
            out.insert((scope, Counter::Greeting(r.code)), 1);
        }
    }
    if a.throttled {
        out.insert((scope, Counter::Throttled), 1);
    }
    out
}

fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(k, &n)| {
            let d = n - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}

#[test]
pub(crate) fn kernel_reads_reply_statuses_as_the_model_does() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let ifindex = lo_ifindex();
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let ip = Ipv4::new(peer_v4(), gw_v4(), IPPROTO_TCP);
    // Every reply, and every cut of it from 4 bytes on.
    let mut payloads: Vec<&[u8]> = Vec::new();
    for r in REPLIES {
        payloads.extend((4..r.len()).map(|n| &r[..n]));
        payloads.push(r);
    }
    let mut statuses = 0;
    for hook in [Hook::TcIn, Hook::Xdp] {
        assert_eq!(hook.side(), Side::Peer);
        let k = Kernel::load(hook).expect("load");
        let mut wrong = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            // A connection of its own: the server (the peer, port 25) answers our client port.
            let client_port = 20_000 + i as u16;
            let mut syn_ack = Tcp::new(25, client_port, SYN | ACK);
            syn_ack.seq = 1000;
            let mut data = Tcp::new(25, client_port, ACK | PSH).payload(payload);
            data.seq = 1001;
            let scope = Scope { ifindex, port: 25, direction: Direction::Outbound };
            let before = reply_counts(&k);
            for frame in [eth.ipv4(&ip, &syn_ack.bytes()), eth.ipv4(&ip, &data.bytes())] {
                let verdict = k.run(&frame).expect("test run").expect("not refused");
                assert_eq!(verdict, hook.verdict());
            }
            let got = delta(&before, &reply_counts(&k));
            let want = model(scope, payload);
            statuses += want.keys().filter(|(_, c)| matches!(c, Counter::ReplyStatus(..))).count();
            if got != want {
                wrong.push(format!(
                    "{hook:?} {:?}: kernel {got:?}\n  model {want:?}\n{}",
                    String::from_utf8_lossy(payload),
                    hex(payload)
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} disagree:\n{}",
            wrong.len(),
            payloads.len(),
            wrong.join("\n")
        );
    }
    assert!(statuses > 200, "the cases carry statuses ({statuses})");
}
