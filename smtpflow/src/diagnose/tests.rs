//! The causes decided from crafted readings: each fires on its fault and names its peers, and
//! a noisy but healthy gateway raises nothing.
use super::*;

fn at(start: Instant, secs: u64) -> Instant {
    start + Duration::from_secs(secs)
}

fn active(findings: &[Finding]) -> Vec<&'static str> {
    findings.iter().filter(|f| f.active).map(|f| f.cause.label()).collect()
}

fn finding(findings: &[Finding], cause: Cause) -> &Finding {
    findings.iter().find(|f| f.cause == cause).unwrap()
}

fn name(p: &str) -> PeerName {
    PeerName { iface: "eth0".into(), peer: p.into() }
}

/// A gateway's cumulative counters, grown by what happens to it (peers' counts and the
/// host's totals together, as the drain reads them).
#[derive(Clone, Default)]
struct Gateway(Reading);

impl Gateway {
    fn new() -> Self {
        Self(Reading { conntrack: Some((1_000, 262_144)), ..Default::default() })
    }

    /// Outbound handshakes and sessions to `peer`.
    fn outbound(&mut self, peer: &str, add: PeerCounts) -> &mut Self {
        let r = &mut self.0;
        r.outbound_established += add.established;
        r.outbound_refused += add.refused;
        r.outbound_timeouts += add.timeouts;
        r.outbound_unreachable += add.unreachable;
        r.outbound_throttled += add.throttled;
        r.zero_windows_local += add.zero_windows_sent;
        r.zero_windows_peer += add.zero_windows_received;
        let p = r.peers.entry(name(peer)).or_default();
        p.established += add.established;
        p.refused += add.refused;
        p.timeouts += add.timeouts;
        p.unreachable += add.unreachable;
        p.throttled += add.throttled;
        p.zero_windows_sent += add.zero_windows_sent;
        p.zero_windows_received += add.zero_windows_received;
        self
    }

    fn inbound(&mut self, established: u64, refused: u64, timeouts: u64) -> &mut Self {
        self.0.inbound_established += established;
        self.0.inbound_refused += refused;
        self.0.inbound_timeouts += timeouts;
        self
    }

    fn reading(&self) -> Reading {
        self.0.clone()
    }
}

fn sessions(established: u64) -> PeerCounts {
    PeerCounts { established, ..Default::default() }
}

#[test]
fn healthy_traffic_shows_no_cause() {
    let mut d = Diagnoser::new(Thresholds::default());
    let t0 = Instant::now();
    let mut g = Gateway::new();
    for s in 0..120 {
        g.outbound("192.0.2.1", sessions(5)).inbound(5, 0, 0);
        g.0.zero_windows_peer = s / 30;
        let (f, _) = d.update(at(t0, s), g.reading());
        assert!(active(&f).is_empty(), "at {s}s: {:?}", active(&f));
    }
}

/// The noisy but healthy gateway of issue #13, over several windows: hundreds of good
/// sessions both ways, greylisting (not throttling; a rare 421), a backup MX that refuses
/// 3 and drops 3 handshakes a window, a scanner whose SYNs the firewall drops, a web
/// server's accept queue overflowing on port 80. Nothing is raised.
#[test]
fn a_noisy_but_healthy_gateway_raises_nothing() {
    let mut d = Diagnoser::new(Thresholds::default());
    let t0 = Instant::now();
    let mut g = Gateway::new();
    let mxs = ["192.0.2.10", "192.0.2.11", "192.0.2.12", "198.51.100.5", "203.0.113.7"];
    for s in 0..240u64 {
        // About 10 outbound and 10 inbound sessions a second (600 a window each way).
        for (i, mx) in mxs.iter().enumerate() {
            let established = if (s + i as u64).is_multiple_of(2) { 3 } else { 1 };
            // One 421 to a big MX now and then (~1 % of its sessions).
            let throttled = u64::from(i == 0 && s % 30 == 0);
            g.outbound(mx, PeerCounts { established, throttled, ..Default::default() });
        }
        g.inbound(10, 0, 0);
        // The backup MX: 3 refused and 3 unanswered per minute, no session.
        if s % 20 == 0 {
            g.outbound("192.0.2.99", PeerCounts { refused: 1, timeouts: 1, ..Default::default() });
        }
        // The scanner: 4 SYNs a second dropped by nft; each attempt also times out.
        g.0.inbound_netfilter_drops += 4;
        if s % 2 == 0 {
            g.inbound(0, 0, 1);
        }
        // The web server on port 80: ListenOverflows rises, no SMTP listener is full.
        g.0.listen_overflows += 3;
        // A few zero windows here and there.
        if s % 15 == 0 {
            g.outbound(
                "198.51.100.5",
                PeerCounts { zero_windows_received: 1, ..Default::default() },
            );
        }
        let (f, changed) = d.update(at(t0, s), g.reading());
        assert!(active(&f).is_empty(), "at {s}s: {:?}\n{f:#?}", active(&f));
        assert!(changed.is_empty());
        for f in &f {
            assert!(f.top_peers.is_empty() || f.cause == Cause::LocalReceiveStall, "{f:?}");
        }
    }
}

/// 12 failures out of 500 sessions (2.4 %): above the count, below the share. Silent, for
/// each of the per-peer failure causes.
#[test]
fn a_peer_failing_a_small_share_stays_silent() {
    for failing in [
        PeerCounts { established: 500, throttled: 12, ..Default::default() },
        PeerCounts { established: 488, refused: 12, ..Default::default() },
        PeerCounts { established: 488, timeouts: 12, ..Default::default() },
    ] {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.outbound("192.0.2.9", failing);
        let (f, _) = d.update(at(t0, 30), g.reading());
        assert!(active(&f).is_empty(), "{failing:?}: {:?}", active(&f));
        // The closest peer is in the evidence and the sentence.
        for cause in [Cause::RemoteThrottling, Cause::RemoteRefusing, Cause::RemoteUnreachable] {
            let f = finding(&f, cause);
            assert!(f.top_peers.is_empty());
            assert_eq!(f.evidence["peers"], 0.0);
        }
    }
    // The same 12 out of 60: fires.
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.outbound("192.0.2.9", PeerCounts { established: 48, refused: 12, ..Default::default() });
    let (f, _) = d.update(at(t0, 30), g.reading());
    assert_eq!(active(&f), ["remote_refusing"]);
}

#[test]
fn remote_throttling_names_its_peers_and_shares() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    g.outbound("192.0.2.9", sessions(100)).outbound("192.0.2.8", sessions(1000));
    g.0.sites.insert(name("192.0.2.9"), "outlook.com".into());
    d.update(t0, g.reading());
    // 19 of 50 sessions throttled at one peer; 12 of 500 at another (2.4 %): only the first.
    g.outbound("192.0.2.9", PeerCounts { established: 50, throttled: 19, ..Default::default() });
    g.outbound("192.0.2.8", PeerCounts { established: 500, throttled: 12, ..Default::default() });
    let (f, changed) = d.update(at(t0, 10), g.reading());
    assert_eq!(active(&f), ["remote_throttling"]);
    let th = finding(&f, Cause::RemoteThrottling);
    assert_eq!(th.top_peers, [(name("192.0.2.9"), 19)]);
    assert_eq!(th.top_sites, ["outlook.com"]);
    assert!(
        th.summary.starts_with("outlook.com, 421 or rate-limit replies on 38 % of 50 sessions, peers 192.0.2.9 on eth0 (19) in 60 s: lower the concurrency"),
        "{}",
        th.summary
    );
    assert_eq!(th.evidence["throttled_sessions"], 31.0, "host total");
    assert_eq!(th.evidence["established_sessions"], 550.0);
    assert_eq!(th.evidence["throttled_share"], 0.38);
    assert_eq!(th.evidence["peers"], 1.0);
    assert_eq!(changed.len(), 1);
}

#[test]
fn remote_refusing_and_unreachable_name_their_peers() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.outbound("192.0.2.7", PeerCounts { refused: 12, ..Default::default() });
    g.outbound("192.0.2.6", PeerCounts { established: 20, timeouts: 30, ..Default::default() });
    g.outbound("192.0.2.5", PeerCounts { established: 100, timeouts: 3, ..Default::default() });
    let (f, _) = d.update(at(t0, 10), g.reading());
    assert_eq!(active(&f), ["remote_unreachable", "remote_refusing"]);
    let refusing = finding(&f, Cause::RemoteRefusing);
    assert_eq!(refusing.top_peers, [(name("192.0.2.7"), 12)]);
    assert!(
        refusing.summary.starts_with(
            "unknown, RST to 100 % of 12 handshakes, peers 192.0.2.7 on eth0 (12) in 60 s"
        ),
        "{}",
        refusing.summary
    );
    assert_eq!(refusing.evidence["outbound_refused"], 12.0);
    assert_eq!(refusing.evidence["outbound_attempts"], 12.0 + 50.0 + 103.0);
    assert_eq!(refusing.evidence["refused_share"], 1.0);
    let unreachable = finding(&f, Cause::RemoteUnreachable);
    assert_eq!(unreachable.top_peers, [(name("192.0.2.6"), 30)]);
    assert!(
        unreachable.summary.starts_with(
            "unknown, no answer or ICMP unreachable to 60 % of 50 handshakes (0 ICMP \
             unreachable), peers 192.0.2.6 on eth0 (30) in 60 s with normal local pressure"
        ),
        "{}",
        unreachable.summary
    );
    assert_eq!(unreachable.evidence["outbound_timeouts"], 33.0);
    assert_eq!(unreachable.evidence["outbound_unreachable"], 0.0);
    assert_eq!(unreachable.evidence["unanswered_share"], 0.6);
}

/// ICMP unreachables are direct evidence for remote_unreachable: they add to the peer's
/// failures with its timeouts, count among its attempts, and the evidence names them.
#[test]
fn icmp_unreachable_is_evidence_for_remote_unreachable() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    // 6 ICMP and 4 timeouts: 10 failures together, of 10 + 90 attempts.
    g.outbound(
        "192.0.2.6",
        PeerCounts { established: 90, timeouts: 4, unreachable: 6, ..Default::default() },
    );
    // 9 ICMP alone stay under --min-failures.
    g.outbound("192.0.2.7", PeerCounts { unreachable: 9, ..Default::default() });
    let (f, _) = d.update(at(t0, 10), g.reading());
    assert_eq!(active(&f), ["remote_unreachable"]);
    let u = finding(&f, Cause::RemoteUnreachable);
    assert_eq!(u.top_peers, [(name("192.0.2.6"), 10)]);
    assert!(
        u.summary.starts_with(
            "unknown, no answer or ICMP unreachable to 10 % of 100 handshakes (6 ICMP \
             unreachable), peers 192.0.2.6 on eth0 (10) in 60 s"
        ),
        "{}",
        u.summary
    );
    assert_eq!(u.evidence["outbound_unreachable"], 15.0);
    assert_eq!(u.evidence["outbound_timeouts"], 4.0);
    assert_eq!(u.evidence["outbound_attempts"], 109.0);
    assert_eq!(u.evidence["unanswered_share"], 0.1);
    // The share counts the unreachable among the attempts: 10 of 101 is under 10 %.
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.outbound(
        "192.0.2.6",
        PeerCounts { established: 91, timeouts: 4, unreachable: 6, ..Default::default() },
    );
    let (f, _) = d.update(at(t0, 10), g.reading());
    assert!(active(&f).is_empty(), "{:?}", finding(&f, Cause::RemoteUnreachable).summary);
}

#[test]
fn unreachable_only_with_normal_local_pressure() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    g.0.conntrack = Some((10, 100));
    d.update(t0, g.reading());
    g.outbound("192.0.2.6", PeerCounts { timeouts: 10, ..Default::default() });
    let (f, _) = d.update(at(t0, 1), g.reading());
    assert_eq!(active(&f), ["remote_unreachable"]);
    // Nearly full conntrack.
    g.0.conntrack = Some((95, 100));
    let (f, _) = d.update(at(t0, 2), g.reading());
    assert!(!active(&f).contains(&"remote_unreachable"), "local conntrack is nearly full");
    assert!(finding(&f, Cause::RemoteUnreachable).top_peers.is_empty());
    // conntrack's own table-full drops rising.
    g.0.conntrack = Some((10, 100));
    g.0.conntrack_drops += 1;
    let (f, _) = d.update(at(t0, 3), g.reading());
    assert!(!active(&f).contains(&"remote_unreachable"), "conntrack drops new entries");
}

#[test]
fn conntrack_exhaustion_needs_failures_share_and_pressure() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    g.0.conntrack = Some((100, 1000));
    d.update(t0, g.reading());
    // Failures without conntrack pressure: not conntrack's fault (a firewall, say).
    g.inbound(0, 0, 50);
    g.0.inbound_netfilter_drops += 120;
    let (f, _) = d.update(at(t0, 1), g.reading());
    assert!(active(&f).is_empty());
    // Full, and SYNs dropped by netfilter.
    g.0.conntrack = Some((255_872, 262_144));
    g.inbound(100, 0, 5);
    g.0.inbound_netfilter_drops += 4_097 - 120;
    g.0.conntrack_drops += 812;
    let (f, changed) = d.update(at(t0, 2), g.reading());
    assert_eq!(active(&f), ["conntrack_exhaustion"]);
    assert_eq!(changed.len(), 1);
    let s = &changed[0].summary;
    assert!(
        s.starts_with("conntrack 98% full (255,872/262,144), +812 table-full drops; 4,097 inbound SYNs unanswered (98 % of 4,197 attempts) in 60 s: raise net.netfilter.nf_conntrack_max"),
        "{s}"
    );
    assert_eq!(
        changed[0].evidence["unanswered_inbound_syns"], 4097.0,
        "counted once: the larger of timeouts and drops"
    );
    // Recovery: no new failures for a whole window turns it off.
    let mut last = Vec::new();
    g.0.conntrack = Some((900, 262_144));
    for s in 3..=63 {
        let (f, _) = d.update(at(t0, s), g.reading());
        last = f;
    }
    assert!(active(&last).is_empty());
}

/// Conntrack full, but its unanswered SYNs a small share of a busy inbound side; and the
/// statistics that are not table-full drops (insert_failed, early_drop) are never read as
/// pressure (the reading takes `drop` only).
#[test]
fn conntrack_exhaustion_needs_a_share_of_inbound_attempts() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    g.0.conntrack = Some((950, 1000));
    d.update(t0, g.reading());
    g.inbound(1_000, 0, 12);
    let (f, _) = d.update(at(t0, 5), g.reading());
    assert!(active(&f).is_empty(), "12 of 1012 inbound attempts");
    let ct = finding(&f, Cause::ConntrackExhaustion);
    assert_eq!(ct.evidence["unanswered_inbound_syns"], 12.0);
    assert_eq!(ct.evidence["inbound_attempts"], 1012.0);
    g.inbound(0, 0, 200);
    let (f, _) = d.update(at(t0, 6), g.reading());
    assert_eq!(active(&f), ["conntrack_exhaustion"]);
}

#[test]
fn listen_overflow_needs_an_smtp_listener() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    g.0.listen_overflows = 100;
    d.update(t0, g.reading());
    // ListenOverflows from another service: a host signal only.
    g.0.listen_overflows += 50;
    let (f, _) = d.update(at(t0, 1), g.reading());
    assert!(active(&f).is_empty());
    let lo = finding(&f, Cause::ListenOverflow);
    assert_eq!(lo.evidence["listen_overflows"], 50.0, "since start, not since boot");
    assert!(lo.summary.contains("no SMTP listener seen full"), "{}", lo.summary);
    // An SMTP listener seen full at one sample, with ListenOverflows rising: it is.
    g.0.full_listeners = vec!["0.0.0.0:25".into()];
    let (f, _) = d.update(at(t0, 2), g.reading());
    assert_eq!(active(&f), ["listen_overflow"]);
    g.0.full_listeners.clear();
    let (f, _) = d.update(at(t0, 3), g.reading());
    assert_eq!(active(&f), ["listen_overflow"], "seen full in the window");
    let lo = finding(&f, Cause::ListenOverflow);
    assert_eq!(lo.evidence["listen_queue_full_samples"], 1.0);
    assert!(lo.summary.contains("full SMTP listeners: 0.0.0.0:25"), "{}", lo.summary);

    // A full SMTP listener but ListenOverflows below the count: not yet.
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.0.full_listeners = vec!["[::]:587".into()];
    g.0.listen_overflows += 3;
    let (f, _) = d.update(at(t0, 1), g.reading());
    assert!(active(&f).is_empty());
    // SMTP SYNs dropped with a LISTEN_OVERFLOW reason: enough on their own.
    g.0.full_listeners.clear();
    g.0.listen_overflow_drops += 10;
    let (f, _) = d.update(at(t0, 2), g.reading());
    assert_eq!(active(&f), ["listen_overflow"]);
}

#[test]
fn stalls_need_the_threshold() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.outbound(
        "192.0.2.3",
        PeerCounts { zero_windows_sent: 9, zero_windows_received: 6, ..Default::default() },
    );
    g.outbound("192.0.2.4", PeerCounts { zero_windows_received: 6, ..Default::default() });
    let (f, _) = d.update(at(t0, 1), g.reading());
    assert!(active(&f).is_empty(), "12 zero windows, but 6 per peer");
    g.outbound(
        "192.0.2.3",
        PeerCounts { zero_windows_sent: 1, zero_windows_received: 6, ..Default::default() },
    );
    let (f, _) = d.update(at(t0, 2), g.reading());
    assert_eq!(active(&f), ["local_receive_stall", "peer_receive_stall"]);
    let stall = finding(&f, Cause::PeerReceiveStall);
    assert_eq!(stall.top_peers, [(name("192.0.2.3"), 12)]);
    assert!(
        stall.summary.starts_with("192.0.2.3 on eth0: 12 zero windows in 60 s"),
        "{}",
        stall.summary
    );
    assert_eq!(finding(&f, Cause::LocalReceiveStall).top_peers, [(name("192.0.2.3"), 10)]);
}

/// A cause turns on from the exact totals while the per-peer figures are an earlier reading:
/// the fresher reading replaces it, and the finding (its log line too) names the peer.
#[test]
fn a_cause_turning_on_names_peers_from_a_fresher_reading() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let asked = std::cell::Cell::new(0);
    let fresher = |r: Reading| {
        asked.set(asked.get() + 1);
        Ok::<_, ()>(Some(r))
    };
    let quiet = Gateway::new().reading();
    d.update_then(t0, quiet.clone(), || fresher(quiet.clone())).unwrap();
    assert_eq!(asked.get(), 0, "nothing turned on: no second reading");
    // Stale per-peer figures: the peer is there with the failures that were, and the stall
    // (a host total) turns on; the fresh reading names the peer behind it.
    let mut g = Gateway::new();
    g.0.zero_windows_local = 15;
    let stale = g.reading();
    g.outbound("192.0.2.7", PeerCounts { zero_windows_sent: 15, ..Default::default() });
    g.0.zero_windows_local = 15;
    let fresh = g.reading();
    let (f, changed) = d.update_then(at(t0, 1), stale.clone(), || fresher(fresh)).unwrap();
    assert_eq!(asked.get(), 1);
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].top_peers, [(name("192.0.2.7"), 15)]);
    assert!(changed[0].summary.contains("; to 192.0.2.7 on eth0 (15)"), "{changed:?}");
    assert_eq!(active(&f), ["local_receive_stall"]);
    // Already on: no second reading.
    d.update_then(at(t0, 2), stale, || fresher(quiet)).unwrap();
    assert_eq!(asked.get(), 1);
}

/// A peer's count that goes down (its entry evicted from the kernel's map and back) starts
/// again: what it counts now is new.
#[test]
fn a_peer_count_restarting_counts_from_zero() {
    let base = PeerCounts { refused: 40, established: 100, ..Default::default() };
    let now = PeerCounts { refused: 12, established: 150, ..Default::default() };
    let w = now.since(&base);
    assert_eq!((w.refused, w.established), (12, 50));
}

#[test]
fn verdict_text_and_json() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    d.update(t0, g.reading());
    g.outbound("192.0.2.7", PeerCounts { refused: 10, ..Default::default() });
    let (f, _) = d.update(at(t0, 1), g.reading());
    let text = to_text(&f, "eth0", Duration::from_secs(10));
    assert!(text.contains("ACTIVE  remote_refusing"), "{text}");
    assert!(text.contains("ok      listen_overflow"));
    assert!(text.ends_with("verdict: 1 active (remote_refusing)\n"));
    let json: serde_json::Value =
        serde_json::from_str(&to_json(&f, "eth0", Duration::from_secs(10))).unwrap();
    assert_eq!(json["healthy"], false);
    assert_eq!(json["causes"].as_array().unwrap().len(), 7);
    let refusing = json["causes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cause"] == "remote_refusing")
        .unwrap();
    assert_eq!(refusing["active"], true);
    assert_eq!(refusing["evidence"]["outbound_refused"], 10.0);
    assert_eq!(refusing["evidence"]["refused_share"], 1.0);
    assert_eq!(refusing["top_peers"][0]["peer"], "192.0.2.7");
    assert_eq!(refusing["top_peers"][0]["count"], 10);
}

#[test]
fn thousands_separators() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(262_144), "262,144");
    assert_eq!(thousands(1_000_000), "1,000,000");
}

/// Peers of one site are said together: the site's share over its peers named, then the
/// peers.
#[test]
fn per_peer_causes_group_peers_by_site() {
    let t0 = Instant::now();
    let mut d = Diagnoser::new(Thresholds::default());
    let mut g = Gateway::new();
    for (p, site) in
        [("192.0.2.1", "outlook.com"), ("192.0.2.2", "outlook.com"), ("192.0.2.3", "example.net")]
    {
        g.0.sites.insert(name(p), site.into());
    }
    d.update(t0, g.reading());
    g.outbound("192.0.2.1", PeerCounts { established: 40, throttled: 20, ..Default::default() });
    g.outbound("192.0.2.2", PeerCounts { established: 60, throttled: 18, ..Default::default() });
    g.outbound("192.0.2.3", PeerCounts { established: 20, throttled: 19, ..Default::default() });
    let (f, _) = d.update(at(t0, 10), g.reading());
    let th = finding(&f, Cause::RemoteThrottling);
    assert_eq!(th.top_sites, ["outlook.com", "example.net", "outlook.com"]);
    assert!(
        th.summary.starts_with(
            "outlook.com, 421 or rate-limit replies on 38 % of 100 sessions, peers 192.0.2.1 on \
             eth0 (20), 192.0.2.2 on eth0 (18); example.net, 421 or rate-limit replies on 95 % of \
             20 sessions, peers 192.0.2.3 on eth0 (19) in 60 s"
        ),
        "{}",
        th.summary
    );
}
