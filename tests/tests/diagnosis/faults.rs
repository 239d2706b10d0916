//! One real fault at a time, at the default diagnosis thresholds, beside the healthy part of the
//! noisy gateway's traffic (mail to and from the main MX, 5 % of it greylisted): the matching
//! cause turns on, names the faulty peer with what crossed the wire (per-peer causes), the log
//! says so, and no other cause is active at any scrape. Each fault is big enough to pass the
//! default `--min-failures` (10) and `--min-share` (0.1): 25 sessions or attempts, or 20 where
//! the kernel-wide conntrack limit is lowered; the stalls pass `--min-zero-windows` (10) with
//! three stalled connections probed for seconds.
//!
//! smtpflow runs as in [`crate::noisy`]: the default diagnosis flags, a 20 s window.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use smtpflow_tests::{
    Metrics, Netns, Pair, Watch,
    diagnosis::{active, active_lines, evidence_of, top_peers},
    expect::present,
    gateway::{
        self, BACKUP_MX, BUSY_MX, GATEWAY, MailFlow, NoisyGateway, Stall, backup_mx_unanswered,
        gateway_firewall,
    },
    in_netns,
    names::{CT_STAT, LISTEN_QUEUE_LENGTH, REPLY_STATUSES, TCP_STAT, THROTTLED},
    procfs::{CONNTRACK_COUNT, ConntrackMax, netstat, ns_sysctl},
    report, require_root,
    smtp::{self, Mx, Policy},
    traffic::{burst, connect_refused},
    wait_for,
};

use crate::{IF, checks::serial, noisy::watch_with_default_rules};

/// Sessions or attempts of each remote fault: above `--min-failures` 10, and a share of the
/// peer's attempts far above `--min-share` 0.1.
const N: usize = 25;
/// How long a client waits for an unanswered handshake (one SYN retransmission).
const GIVE_UP: Duration = Duration::from_millis(1500);
/// How long a cause may take to show: the default handshake timeout (5 s) and its sweep's
/// grace, drains and scrapes, with room for a slow (emulated) machine. Returns as soon as it
/// holds.
const SHOWS_WITHIN: Duration = Duration::from_secs(40);

/// Scrapes (every 250 ms, at most [`SHOWS_WITHIN`]) until `cause` is active and, for a per-peer
/// cause, names `peer` on `sf0` (with `count` when given) and no other peer; at no scrape may another cause
/// be active. Then a line of the log says the cause is active (naming the peer), and no other
/// cause's. Returns that scrape.
fn expect_cause(w: &Watch, ns: &Netns, cause: &str, peer: Option<(&str, Option<u64>)>) -> Metrics {
    let mut last = String::from("no scrape");
    let found = wait_for(SHOWS_WITHIN, || {
        let m = w.scrape(ns);
        let on = active(&m);
        let others: Vec<&&str> = on.iter().filter(|c| **c != cause).collect();
        assert!(
            others.is_empty(),
            "{others:?} active during a {cause} fault (active: {on:?}); top peers {:?}; \
             evidence {:?}\nsmtpflow stderr:\n{}",
            others.iter().map(|c| (**c, top_peers(&m, c))).collect::<Vec<_>>(),
            others.iter().map(|c| (**c, evidence_of(&m, c))).collect::<Vec<_>>(),
            w.stderr()
        );
        let peers = top_peers(&m, cause);
        // The faulty peer with its count, and no other peer (the greylisting MX is not one).
        let named = peer.is_none_or(|(p, n)| {
            peers.iter().any(|(i, q, v)| i == IF && q == p && n.is_none_or(|n| *v == n as f64))
                && peers.iter().all(|(_, q, _)| q == p)
        });
        last = format!("active {on:?}, top peers {peers:?}, evidence {:?}", evidence_of(&m, cause));
        (on == [cause] && named).then_some(m)
    });
    let m = found.unwrap_or_else(|| {
        panic!(
            "after {SHOWS_WITHIN:?}, not {cause} alone naming {peer:?}: {last}\nsmtpflow \
             stderr:\n{}",
            w.stderr()
        )
    });
    let stderr = w.stderr();
    let on = format!("diagnosis: {cause} is active");
    let lines = active_lines(&stderr);
    let line = lines
        .iter()
        .filter(|l| l.contains(&on))
        .find(|l| peer.is_none_or(|(p, _)| l.contains(p)))
        .unwrap_or_else(|| panic!("no {on:?} line naming {peer:?} in smtpflow's log:\n{stderr}"));
    let others: Vec<&&str> = lines.iter().filter(|l| !l.contains(&on)).collect();
    assert!(others.is_empty(), "other causes in the log: {others:?}");
    eprintln!("{line}");
    m
}

/// Background mail is still all fine after the fault.
fn mail_ok(flow: MailFlow) {
    let mail = flow.stop();
    assert!(mail.failures.is_empty(), "background mail failed: {:?}", mail.failures);
    eprintln!("background mail: {mail:?}");
}

/// A pair with the remote hosts, smtpflow at the default thresholds, and mail both ways,
/// already with greylisted sessions in the window (so that they are part of what the fault is
/// told apart from).
fn gateway_with_mail() -> (Pair, Watch, MailFlow) {
    let pair = Pair::new();
    gateway::add_remote_hosts(&pair);
    gateway_firewall(&pair.local);
    let w = watch_with_default_rules(&pair.local);
    let flow = MailFlow::start(&pair, NoisyGateway::EVERY);
    greylisted_some(&flow);
    (pair, w, flow)
}

/// [`gateway_with_mail`] for faults that break the gateway's own listener: outbound mail only,
/// and no firewall.
fn gateway_with_outbound_mail() -> (Pair, Watch, MailFlow) {
    let pair = Pair::new();
    gateway::add_remote_hosts(&pair);
    let w = watch_with_default_rules(&pair.local);
    let flow = MailFlow::outbound_only(&pair, NoisyGateway::EVERY);
    greylisted_some(&flow);
    (pair, w, flow)
}

/// Waits (60 s at most: 40 sessions, slower on an emulated machine) until the main MX has
/// greylisted two sessions.
fn greylisted_some(flow: &MailFlow) {
    let ok = wait_for(Duration::from_secs(60), || (flow.remote_mx.greylisted() >= 2).then_some(()));
    assert!(ok.is_some(), "no greylisting within 60 s: {:?}", flow.remote_mx.counts);
}

/// A remote MX greets every session with `421 4.7.0` (too many connections, slow down): 25
/// sessions, each seeing only the 421. `remote_throttling` names that MX with its 25, and (new
/// in issue #13) smtpflow counts 25 throttled sessions and 25 replies of status 4.7.0, class
/// `throttling`, on series that exist.
#[test]
fn remote_throttling_a_421_on_every_session() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_mail();
    let busy = Mx::start(&pair.peer, &gateway::addr(BUSY_MX, 25), Policy::Throttle);
    let to: SocketAddr = gateway::addr(BUSY_MX, 25).parse().unwrap();
    let sessions = in_netns(&pair.local, move || {
        (0..N).map(|_| smtp::mail(to, Duration::from_secs(5))).collect::<Vec<_>>()
    });
    let codes: Vec<_> = sessions.iter().map(|s| s.as_ref().map(|m| m.replies.clone())).collect();
    assert!(codes.iter().all(|c| matches!(c, Ok(r) if r == &[421])), "{codes:?}");
    let sent = busy.counts.throttled.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sent, N as u64, "421 greetings written");

    let m = expect_cause(&w, &pair.local, "remote_throttling", Some((BUSY_MX, Some(N as u64))));
    let out = [("direction", "outbound"), ("port", "25")];
    let wrong: Vec<String> = [
        present(&m, THROTTLED, &out, N as u64),
        present(
            &m,
            REPLY_STATUSES,
            &[&out[..], &[("code", "421"), ("status", "4.7.0"), ("class", "throttling")]].concat(),
            N as u64,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(wrong.is_empty(), "throttling counts:\n  {}", wrong.join("\n  "));
    drop(sessions);
    mail_ok(flow);
}

/// Nothing listens on the backup MX's port 25: 25 attempts, each refused (RST).
/// `remote_refusing` names it with its 25.
#[test]
fn remote_refusing_a_closed_port() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_mail();
    connect_refused(&pair.local, &gateway::addr(BACKUP_MX, 25), N);
    expect_cause(&w, &pair.local, "remote_refusing", Some((BACKUP_MX, Some(N as u64))));
    mail_ok(flow);
}

/// The backup MX's firewall drops SYNs to port 25: 25 attempts at once, each given up after
/// one retransmission. `remote_unreachable` names it with its 25 (decided by the handshake
/// timeout, the default 5 s).
#[test]
fn remote_unreachable_behind_a_firewall() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_mail();
    let dropped = backup_mx_unanswered(&pair, N, GIVE_UP);
    assert!(dropped >= 2 * N as u64, "{dropped} SYNs dropped for {N} attempts");
    expect_cause(&w, &pair.local, "remote_unreachable", Some((BACKUP_MX, Some(N as u64))));
    mail_ok(flow);
}

/// The gateway's SMTP listener (backlog 1) stops accepting; 30 connections at once: the queue
/// holds two, the kernel drops the others' SYNs (`ListenOverflows` rises, checked in the
/// namespace's own statistics). `listen_overflow` turns on; the listener's queue is exported
/// (sock_diag). Outbound mail goes on meanwhile.
#[test]
fn listen_overflow_an_smtp_listener_that_stops_accepting() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_outbound_mail();
    let listener = smtp::listen(&pair.local, &gateway::addr(GATEWAY, 25), 1);
    let k0 = netstat(&pair.local, "TcpExt", "ListenOverflows");
    let target: SocketAddr = gateway::addr(GATEWAY, 25).parse().unwrap();
    let results = in_netns(&pair.peer, move || burst(target, 30, GIVE_UP));
    let failed = results.iter().filter(|r| r.is_err()).count();
    let overflows = netstat(&pair.local, "TcpExt", "ListenOverflows") - k0;
    assert!(
        failed >= 20 && overflows >= 20,
        "{failed} attempts failed, ListenOverflows +{overflows}"
    );
    if w.stderr().contains("SYNs refused on full accept queues are not counted") {
        report::weakened(
            &report::current_test(),
            "fexit refused on this kernel: listen_overflow decided from sock_diag and \
             ListenOverflows, without TCP_LISTEN_OVERFLOW SYN drops",
        );
    }
    let m = expect_cause(&w, &pair.local, "listen_overflow", None);
    assert!(
        m.matching(LISTEN_QUEUE_LENGTH, &[("port", "25")]).count() > 0,
        "no {LISTEN_QUEUE_LENGTH}{{port=\"25\"}}"
    );
    assert!(m.sum(TCP_STAT, &[("stat", "ListenOverflows")]) >= overflows);
    drop(results);
    drop(listener);
    mail_ok(flow);
}

/// A full conntrack table: conntrack in use on the gateway (its firewall), an SMTP server there,
/// and the kernel-wide `nf_conntrack_max` lowered (restored on every path: see
/// [`ConntrackMax`]) to the gateway's entries + 20. 40 connections at once from the peer: 20
/// get the last entries and are held open, the SYNs of the other 20 find the table full
/// (conntrack's own `drop` rises). `conntrack_exhaustion` turns on, alone. No background mail
/// here: it would need conntrack entries too.
#[test]
fn conntrack_exhaustion_a_full_table() {
    require_root!();
    let _serial = serial();
    const HELD: u64 = 20;
    const FAILING: usize = 20;
    let pair = Pair::new();
    gateway_firewall(&pair.local);
    let _mx = Mx::start(&pair.local, &gateway::addr(GATEWAY, 25), Policy::Accept);
    let w = watch_with_default_rules(&pair.local);
    let base = w.scrape(&pair.local);
    let count0 = ns_sysctl(&pair.local, CONNTRACK_COUNT);
    let host =
        std::fs::read_to_string(CONNTRACK_COUNT).map_or(0, |s| s.trim().parse().unwrap_or(0));
    let limit = count0.max(host) + HELD;
    let held_expected = (limit - count0) as usize;
    let target: SocketAddr = gateway::addr(GATEWAY, 25).parse().unwrap();

    let mut ct = ConntrackMax::lower(limit, Duration::from_secs(60));
    let results = in_netns(&pair.peer, move || burst(target, held_expected + FAILING, GIVE_UP));
    let (held, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    assert_eq!(held.len(), held_expected, "connections that got an entry: {failed:?}");
    assert_eq!(failed.len(), FAILING);

    let started = Instant::now();
    let m = expect_cause(&w, &pair.local, "conntrack_exhaustion", None);
    let drops = m.sum(CT_STAT, &[("stat", "drop")]) - base.sum(CT_STAT, &[("stat", "drop")]);
    assert!(drops >= FAILING as u64, "conntrack drop rose {drops} for {FAILING} failed attempts");
    eprintln!("conntrack_exhaustion on {:?} after the burst; limit {limit}", started.elapsed());
    ct.restore();
    drop(held);
}

/// The gateway's MTA stops reading: 3 inbound connections to port 25 whose server accepts and
/// never reads while the peer writes until its window closes. The gateway advertises zero
/// windows (its ACKs, then its answers to the peer's probes): `local_receive_stall` turns on
/// (at least `--min-zero-windows` 10 in the window), alone. Outbound mail goes on meanwhile.
#[test]
fn local_receive_stall_an_mta_that_stops_reading() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_outbound_mail();
    let stall = Stall::start(&pair.local, &pair.peer, &gateway::addr(GATEWAY, 25), 3);
    expect_cause(&w, &pair.local, "local_receive_stall", None);
    drop(stall);
    mail_ok(flow);
}

/// A remote MX stops reading what the gateway sends: 3 outbound connections to it whose server
/// never reads while the gateway writes until the window closes. That MX advertises zero
/// windows: `peer_receive_stall` names it, alone, beside mail both ways.
#[test]
fn peer_receive_stall_a_remote_that_stops_reading() {
    require_root!();
    let _serial = serial();
    let (pair, w, flow) = gateway_with_mail();
    let stall = Stall::start(&pair.peer, &pair.local, &gateway::addr(BUSY_MX, 25), 3);
    expect_cause(&w, &pair.local, "peer_receive_stall", Some((BUSY_MX, None)));
    drop(stall);
    mail_ok(flow);
}
