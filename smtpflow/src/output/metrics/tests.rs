//! The exporter against snapshots made by hand, and the golden whole exposition.
use super::*;
use crate::{
    drain::peers::{PeerReader, series::SeriesLimits},
    output::peer_label::PeerLabel,
};
use smtpflow_common::{Direction, Event, PeerCounters, PeerKey, Side};
use smtpflow_common::{FAMILY_V4, FAMILY_V6, Histogram, PeerGreetingKey, Scope, UnreachableReason};

fn event_key(ifindex: u32, port: u16, e: Event, d: Direction, s: Side) -> (Scope, Counter) {
    (Scope { ifindex, port, direction: d }, Counter::Event(e, s))
}

fn scope(ifindex: u32, port: u16, direction: Direction) -> Scope {
    Scope { ifindex, port, direction }
}

fn peer(last: u8, family: u8, direction: Direction) -> PeerKey {
    let mut addr = [0u8; 16];
    if family == FAMILY_V4 {
        addr[..4].copy_from_slice(&[198, 51, 100, last]);
    } else {
        addr[0] = 0x20;
        addr[1] = 0x01;
        addr[15] = last;
    }
    PeerKey { ifindex: 2, addr, port: 25, family, direction: direction as u8 }
}

fn counters(syn: u64) -> PeerCounters {
    let mut c = PeerCounters::default();
    c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = syn;
    c
}

fn render(snap: &Snapshot) -> String {
    let mut ex = Exporter::new(HashMap::from([(2, "eth0".to_owned())]), Vec::new(), None);
    String::from_utf8(ex.render(snap, &[]).to_vec()).unwrap()
}

/// The reading of per-peer maps holding these entries, with `cap` peer series.
fn view(
    cap: usize,
    entries: &[(PeerKey, PeerCounters)],
    timeouts: &[(PeerKey, u64)],
    greetings: &[(PeerGreetingKey, u64)],
) -> Arc<PeerView> {
    Arc::new(PeerReader::new(cap).view_of(entries, timeouts, greetings))
}

/// The same, with peers labelled by `labeler`.
fn view_labelled(
    cap: usize,
    labeler: PeerLabel,
    entries: &[(PeerKey, PeerCounters)],
) -> Arc<PeerView> {
    let mut r = PeerReader::with_series(SeriesLimits::new(cap), labeler, 1024);
    Arc::new(r.view_of(entries, &[], &[]))
}

#[test]
fn renders_exact_totals_and_capped_peers() {
    let mut snap = Snapshot::default();
    snap.counters.insert(event_key(2, 25, Event::Syn, Direction::Inbound, Side::Peer), 7);
    snap.counters.insert(event_key(2, 25, Event::SynAck, Direction::Inbound, Side::Local), 5);
    let mut entries: Vec<_> =
        (1..=5).map(|i| (peer(i, FAMILY_V4, Direction::Inbound), counters(u64::from(i)))).collect();
    entries.push((peer(9, FAMILY_V6, Direction::Outbound), counters(100)));
    snap.peers = view(3, &entries, &[], &[]);
    snap.peers_capacity = 65536;
    let text = render(&snap);
    assert!(text.contains(r#"smtpflow_tcp_events_total{iface="eth0",direction="inbound",port="25",event="syn",side="peer"} 7"#), "{text}");
    assert!(text.contains(r#"event="syn_ack",side="local"} 5"#));
    // The three most active peers: 2001::9 (100), .5 and .4.
    assert!(text.contains(r#"smtpflow_peer_tcp_events_total{iface="eth0",peer="2001::9",direction="outbound",port="25",event="syn",side="peer"} 100"#), "{text}");
    assert!(text.contains(r#"peer="198.51.100.5""#));
    assert!(text.contains(r#"peer="198.51.100.4""#));
    assert!(!text.contains(r#"peer="198.51.100.3""#));
    assert!(text.contains("smtpflow_peers_tracked 6"));
    assert!(text.contains("smtpflow_peers_exported 3"));
    assert!(text.contains(r#"smtpflow_map_entries{map="peers"} 6"#), "{text}");
    assert!(text.contains("smtpflow_peers_read_timestamp_seconds 1"), "{text}");
    assert!(text.contains(r#"smtpflow_build_info{version="#));
}

#[test]
fn renders_handshakes_histograms_replies_and_drops() {
    let mut snap = Snapshot::default();
    snap.counters
        .insert((scope(2, 25, Direction::Inbound), Counter::Handshake(Outcome::Refused)), 3);
    let out587 = scope(2, 587, Direction::Outbound);
    snap.counters.insert((out587, Counter::Handshake(Outcome::Unreachable)), 2);
    snap.counters.insert((out587, Counter::Unreachable(UnreachableReason::Admin)), 2);
    snap.counters.insert((scope(2, 587, Direction::Outbound), Counter::Greeting(421)), 2);
    snap.counters.insert((scope(0, 25, Direction::Inbound), Counter::SynDrop(77)), 4);
    snap.timeouts.insert(scope(2, 25, Direction::Inbound), 6);
    let mut h = Histogram::ZERO;
    h.buckets[0] = 1; // <= 50us
    h.buckets[13] = 2; // <= 1s
    h.sum_ns = 2_000_040_000;
    snap.hists.insert((scope(2, 25, Direction::Inbound), HistKind::Handshake), h);
    let p = peer(1, FAMILY_V4, Direction::Outbound);
    let mut c = PeerCounters::default();
    c.outcomes[Outcome::Refused as usize] = 1;
    c.throttled = 4;
    c.outcomes[Outcome::Unreachable as usize] = 7;
    let greeting = PeerGreetingKey::greeting(p, 421);
    snap.peers = view(10, &[(p, c)], &[(p, 2)], &[(greeting, 5)]);
    let text = render(&snap);
    for want in [
        r#"smtpflow_handshakes_total{iface="eth0",direction="inbound",port="25",outcome="refused"} 3"#,
        r#"smtpflow_handshakes_total{iface="eth0",direction="inbound",port="25",outcome="timeout"} 6"#,
        r#"smtpflow_handshakes_total{iface="eth0",direction="outbound",port="587",outcome="unreachable"} 2"#,
        r#"smtpflow_unreachable_total{iface="eth0",direction="outbound",port="587",reason="admin"} 2"#,
        r#"smtpflow_smtp_greetings_total{iface="eth0",direction="outbound",port="587",code="421"} 2"#,
        r#"smtpflow_syn_drops_total{direction="inbound",port="25",reason="reason_77"} 4"#,
        r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="0.00005"} 1"#,
        r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="0.5"} 1"#,
        r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="1"} 3"#,
        r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="+Inf"} 3"#,
        r#"smtpflow_handshake_duration_seconds_count{iface="eth0",direction="inbound",port="25"} 3"#,
        r#"smtpflow_peer_handshakes_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",outcome="refused"} 1"#,
        r#"smtpflow_peer_handshakes_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",outcome="timeout"} 2"#,
        r#"smtpflow_peer_handshakes_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",outcome="unreachable"} 7"#,
        r#"smtpflow_peer_smtp_greetings_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",code="421"} 5"#,
        r#"smtpflow_peer_throttled_sessions_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25"} 4"#,
    ] {
        assert!(text.contains(want), "missing {want}\n{text}");
    }
}

#[test]
fn renders_reply_statuses_throttling_and_starttls() {
    use smtpflow_common::{ReplyStatus, StarttlsStage};
    let mut snap = Snapshot::default();
    let at = scope(2, 25, Direction::Outbound);
    for (code, status, n) in [
        (451, ReplyStatus::new(4, 7, 1), 5),
        (450, ReplyStatus::new(4, 7, 650), 2),
        (421, ReplyStatus::NONE, 1),
        (554, ReplyStatus::new(5, 7, 1), 3),
        (250, ReplyStatus::new(2, 0, 0), 9),
    ] {
        snap.counters.insert((at, Counter::ReplyStatus(code, status)), n);
    }
    snap.counters.insert((at, Counter::Throttled), 0);
    snap.counters.insert((at, Counter::Starttls(StarttlsStage::Accepted)), 4);
    let text = render(&snap);
    let base = r#"iface="eth0",direction="outbound",port="25""#;
    for want in [
        format!(
            r#"smtpflow_smtp_reply_statuses_total{{{base},code="451",status="4.7.1",class="transient"}} 5"#
        ),
        format!(
            r#"smtpflow_smtp_reply_statuses_total{{{base},code="450",status="4.7.other",class="throttling"}} 2"#
        ),
        format!(
            r#"smtpflow_smtp_reply_statuses_total{{{base},code="421",status="none",class="throttling"}} 1"#
        ),
        format!(
            r#"smtpflow_smtp_reply_statuses_total{{{base},code="554",status="5.7.1",class="permanent"}} 3"#
        ),
        format!("smtpflow_throttled_sessions_total{{{base}}} 0"),
        format!(r#"smtpflow_starttls_total{{{base},stage="accepted"}} 4"#),
    ] {
        assert!(text.contains(&want), "missing {want}\n{text}");
    }
    assert!(!text.contains(r#"code="250",status"#), "no 2xx statuses");
}

#[test]
fn prefix_labels_sum_the_peers_of_a_network() {
    let entries: Vec<_> =
        (1..=3).map(|i| (peer(i, FAMILY_V4, Direction::Inbound), counters(u64::from(i)))).collect();
    let prefix = PeerLabel::Prefix { v4: 24, v6: 64 };
    let snap = Snapshot { peers: view_labelled(10, prefix, &entries), ..Default::default() };
    let text = render(&snap);
    assert!(
        text.contains(r#"smtpflow_peer_tcp_events_total{iface="eth0",peer="198.51.100.0/24",direction="inbound",port="25",event="syn",side="peer"} 6"#),
        "{text}"
    );
    assert!(!text.contains("198.51.100.1\""), "no full address: {text}");
    assert!(text.contains("smtpflow_peers_exported 1"), "one label: {text}");
    let hashed = PeerLabel::Hash { key: b"k".to_vec() };
    let snap = Snapshot { peers: view_labelled(10, hashed, &entries), ..Default::default() };
    let hashed = render(&snap);
    assert!(!hashed.contains("198.51.100"), "{hashed}");
    assert_eq!(hashed.matches("smtpflow_peer_tcp_events_total{").count(), 3);
}

#[test]
fn peer_series_are_rendered_once_per_reading() {
    let mut ex = Exporter::new(HashMap::from([(2, "eth0".to_owned())]), Vec::new(), None);
    let p = peer(1, FAMILY_V4, Direction::Inbound);
    let mut snap =
        Snapshot { peers: view(10, &[(p, counters(1))], &[], &[]), ..Default::default() };
    let first = String::from_utf8(ex.render(&snap, &[]).to_vec()).unwrap();
    // A later drain without a new reading: the same per-peer text, new totals.
    snap.counters.insert(event_key(2, 25, Event::Syn, Direction::Inbound, Side::Peer), 9);
    let second = String::from_utf8(ex.render(&snap, &[]).to_vec()).unwrap();
    let peer_lines = |t: &str| -> Vec<String> {
        t.lines().filter(|l| l.starts_with("smtpflow_peer")).map(str::to_owned).collect()
    };
    assert_eq!(peer_lines(&first), peer_lines(&second));
    assert!(second.contains(r#"event="syn",side="peer"} 9"#), "{second}");
    // A new reading is rendered anew.
    snap.peers = view(10, &[(p, counters(5))], &[], &[]);
    let third = String::from_utf8(ex.render(&snap, &[]).to_vec()).unwrap();
    assert!(
        third.contains(
            r#"peer="198.51.100.1",direction="inbound",port="25",event="syn",side="peer"} 5"#
        ),
        "{third}"
    );
}

/// The whole exposition of a snapshot holding every kind of series, against the golden file
/// `testdata/exposition.prom`: any change to a name, label, help text, order or value shows
/// here. After an intended change, `SMTPFLOW_BLESS=1 cargo test -p smtpflow --lib golden`
/// rewrites the file; review its diff.
#[test]
fn golden_exposition() {
    use crate::{
        diagnose::{Cause, PeerName},
        host::pressure::{CONNTRACK_STATS, Conntrack, Pressure, StatsSource, TCP_STATS},
    };
    use smtpflow_common::{Phase, ReplyStatus, Stat, reply::KERNEL_STARTTLS_STAGES};
    use std::collections::BTreeMap;

    let mut snap = Snapshot::default();
    for (d, s) in [(Direction::Inbound, 25), (Direction::Outbound, 587)] {
        let at = scope(2, s, d);
        for (i, e) in Event::ALL.into_iter().enumerate() {
            snap.counters.insert((at, Counter::Event(e, Side::Peer)), 10 + i as u64);
            snap.counters.insert((at, Counter::Event(e, Side::Local)), 20 + i as u64);
        }
        snap.counters.insert((at, Counter::Handshake(Outcome::Established)), 9);
        snap.counters.insert((at, Counter::Handshake(Outcome::Refused)), 2);
        // Seeded for both directions; only our (outbound) attempts can be unreachable.
        let unreachable = if d == Direction::Outbound { 6 } else { 0 };
        snap.counters.insert((at, Counter::Handshake(Outcome::Unreachable)), unreachable);
        for reason in UnreachableReason::ALL {
            let n = if reason == UnreachableReason::Host { unreachable } else { 0 };
            snap.counters.insert((at, Counter::Unreachable(reason)), n);
        }
        snap.counters.insert((at, Counter::SynRetransmit), 3);
        snap.counters.insert((at, Counter::Reset(Phase::Session, Side::Peer)), 1);
        snap.counters.insert((at, Counter::Reply(250)), 40);
        snap.counters.insert((at, Counter::Greeting(220)), 8);
        snap.counters.insert((at, Counter::Greeting(421)), 1);
        snap.counters.insert((at, Counter::ReplyStatus(421, ReplyStatus::NONE)), 1);
        snap.counters.insert((at, Counter::ReplyStatus(451, ReplyStatus::new(4, 7, 1))), 5);
        snap.counters.insert((at, Counter::ReplyStatus(450, ReplyStatus::new(4, 7, 650))), 2);
        snap.counters.insert((at, Counter::ReplyStatus(450, ReplyStatus::new(4, 7, 150))), 1);
        snap.counters.insert((at, Counter::ReplyStatus(550, ReplyStatus::new(5, 1, 1))), 3);
        snap.counters.insert((at, Counter::Throttled), 3);
        for (i, stage) in KERNEL_STARTTLS_STAGES.into_iter().enumerate() {
            snap.counters.insert((at, Counter::Starttls(stage)), 7 - i as u64);
        }
        snap.timeouts.insert(at, 4);
        let mut h = Histogram::ZERO;
        h.buckets[3] = 5;
        h.buckets[17] = 1;
        h.sum_ns = 12_500_000_000;
        snap.hists.insert((at, HistKind::Handshake), h);
        snap.hists.insert((at, HistKind::Greeting), Histogram::ZERO);
        snap.tls.watch(at);
        *snap.tls.offered.get_mut(&at).unwrap() = 8;
        *snap.tls.versions.get_mut(&(at, smtpflow_common::payload::TlsVersion::Tls13)).unwrap() = 3;
        snap.open_by_scope.insert(at, if d == Direction::Inbound { 2 } else { 0 });
    }
    snap.counters.insert((scope(0, 25, Direction::Inbound), Counter::SynDrop(77)), 6);
    let out = peer(7, FAMILY_V4, Direction::Outbound);
    let mut c = counters(5);
    c.outcomes[Outcome::Refused as usize] = 2;
    c.outcomes[Outcome::Unreachable as usize] = 4;
    let greeting = PeerGreetingKey::greeting(out, 421);
    snap.peers = view(10, &[(out, c)], &[(out, 3)], &[(greeting, 1)]);
    snap.open_peers = vec![crate::drain::open::OpenPeer {
        ifindex: 2,
        peer: "198.51.100.7".into(),
        direction: Direction::Outbound,
        port: 25,
        open: 1,
    }];
    snap.stats[Stat::Malformed as usize] = 2;
    snap.stats[Stat::PeerInserts as usize] = 1;
    (snap.peers_capacity, snap.flows, snap.flows_capacity) = (65_536, 12, 262_144);
    (snap.peer_replies_capacity, snap.peer_reply_evictions) = (262_144, 3);
    (snap.drain_seconds, snap.full_drain_seconds) = (0.25, 0.5);
    snap.pressure = Pressure {
        conntrack: Some(Conntrack {
            entries: 100,
            limit: 262_144,
            stats: CONNTRACK_STATS.iter().map(|s| (*s, 1)).collect(),
            source: Some(StatsSource::Netlink),
        }),
        tcp: TCP_STATS.iter().map(|s| (*s, 2)).collect(),
        listeners: vec![crate::host::pressure::sock_diag::Listener {
            addr: "::".parse().unwrap(),
            port: 25,
            queue: 3,
            limit: 128,
        }],
    };
    snap.ifaces_up = vec![("eth0".to_owned(), true)];
    let findings = [Finding {
        cause: Cause::RemoteRefusing,
        active: true,
        evidence: BTreeMap::from([("outbound_refused", 2.0)]),
        top_peers: vec![(PeerName { iface: "eth0".into(), peer: "198.51.100.7".into() }, 2)],
        top_sites: vec!["outlook.com".into()],
        summary: "outbound handshakes refused".into(),
    }];
    let attachments = vec![Attachment { iface: "eth0".into(), hook: "tc_ingress", how: "tcx" }];
    let mut ex = Exporter::new(HashMap::from([(2, "eth0".to_owned())]), attachments, None);
    let text = String::from_utf8(ex.render(&snap, &findings).to_vec()).unwrap();
    // The one value that is a clock reading.
    let stamp = "smtpflow_peers_read_timestamp_seconds ";
    let text: String =
        text.lines()
            .map(|l| {
                if l.starts_with(stamp) {
                    format!("{stamp}<when read>\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/output/testdata/exposition.prom");
    if std::env::var_os("SMTPFLOW_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    let changed: Vec<String> = text
        .lines()
        .zip(golden.lines().chain(std::iter::repeat("<missing>")))
        .filter(|(got, want)| got != want)
        .take(10)
        .map(|(got, want)| format!("  want {want}\n   got {got}"))
        .collect();
    assert!(
        changed.is_empty() && text.lines().count() == golden.lines().count(),
        "the exposition differs from {} ({} lines, golden {}); first differences:\n{}\n\
         (after an intended change: SMTPFLOW_BLESS=1 cargo test -p smtpflow --lib golden)",
        path.display(),
        text.lines().count(),
        golden.lines().count(),
        changed.join("\n")
    );
}

#[test]
fn renders_the_four_families() {
    use crate::host::pressure::{CONNTRACK_STATS, Conntrack, Pressure, StatsSource};
    use std::collections::BTreeMap;

    let pressure = Pressure {
        conntrack: Some(Conntrack {
            entries: 5,
            limit: 262_144,
            stats: CONNTRACK_STATS.iter().map(|&s| (s, 1)).collect(),
            source: Some(StatsSource::Netlink),
        }),
        tcp: BTreeMap::from([("ListenOverflows", 18), ("EstabResets", 6)]),
        listeners: Vec::new(),
    };
    let mut snap = Snapshot { pressure, ..Default::default() };
    let render = |snap: &Snapshot| {
        use prometheus::Encoder as _;
        let mut families = Vec::new();
        render_pressure(snap, &mut families);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&families, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    };
    let text = render(&snap);
    for want in [
        "# TYPE smtpflow_conntrack_entries gauge",
        "smtpflow_conntrack_entries 5",
        "# TYPE smtpflow_conntrack_entries_limit gauge",
        "smtpflow_conntrack_entries_limit 262144",
        "# TYPE smtpflow_conntrack_stat_total counter",
        r#"smtpflow_conntrack_stat_total{stat="insert_failed"} 1"#,
        r#"smtpflow_conntrack_stat_total{stat="search_restart"} 1"#,
        "# TYPE smtpflow_tcp_stat_total counter",
        r#"smtpflow_tcp_stat_total{stat="ListenOverflows"} 18"#,
        r#"smtpflow_tcp_stat_total{stat="EstabResets"} 6"#,
    ] {
        assert!(text.contains(want), "missing {want}\n{text}");
    }
    // No conntrack: no conntrack families at all; TCP stays.
    snap.pressure.conntrack = None;
    let text = render(&snap);
    assert!(!text.contains("smtpflow_conntrack_"), "{text}");
    assert!(text.contains(r#"smtpflow_tcp_stat_total{stat="ListenOverflows"} 18"#));
}

/// The per-site families: labels exactly direction, port, site and what they count; zeros of
/// unknown, other and each exported site; the sites beyond --max-site-series in other.
#[test]
fn renders_site_series() {
    use crate::sites::{SiteMap, Sites};
    use smtpflow_common::{Outcome, PayloadEvent, PayloadKind, payload::PAYLOAD_BYTES};
    let name = |k: PeerKey, text: &str| {
        let mut bytes = [0u8; PAYLOAD_BYTES];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        PayloadEvent {
            peer: k,
            kind: PayloadKind::Greeting as u8,
            _pad: 0,
            len: text.len() as u16,
            payload_len: text.len() as u32,
            bytes,
        }
    };
    let (a, b) = (peer(1, FAMILY_V4, Direction::Outbound), peer(2, FAMILY_V4, Direction::Outbound));
    let mut r = PeerReader::new(0);
    r.set_sites(Sites::new(SiteMap::default(), 1, &[25]));
    r.sites_mut().learn(
        &[
            name(a, "220 mx3.mail.protection.outlook.com ESMTP\r\n"),
            name(b, "220 mx.example.net ESMTP\r\n"),
        ],
        std::time::Instant::now(),
    );
    let mut est = PeerCounters::default();
    est.outcomes[Outcome::Established as usize] = 3;
    let v = r.view_of(
        &[(a, est), (b, est)],
        &[],
        &[(PeerGreetingKey::any(a, 421), 2), (PeerGreetingKey::any(b, 220), 3)],
    );
    let snap = Snapshot { peers: Arc::new(v), ..Default::default() };
    let text = render(&snap);
    for line in [
        "smtpflow_site_handshakes_total{direction=\"outbound\",port=\"25\",site=\"outlook.com\",outcome=\"established\"} 3",
        "smtpflow_site_handshakes_total{direction=\"outbound\",port=\"25\",site=\"outlook.com\",outcome=\"timeout\"} 0",
        "smtpflow_site_handshakes_total{direction=\"outbound\",port=\"25\",site=\"other\",outcome=\"established\"} 3",
        "smtpflow_site_handshakes_total{direction=\"inbound\",port=\"25\",site=\"unknown\",outcome=\"refused\"} 0",
        "smtpflow_site_smtp_replies_total{direction=\"outbound\",port=\"25\",site=\"outlook.com\",code=\"421\"} 2",
        "smtpflow_site_smtp_replies_total{direction=\"outbound\",port=\"25\",site=\"other\",code=\"220\"} 3",
        "smtpflow_site_resets_total{direction=\"outbound\",port=\"25\",site=\"outlook.com\",phase=\"pre_greeting\"} 0",
        "smtpflow_sites_exported 1",
        "smtpflow_site_names_remembered 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
    assert!(!text.contains("example.net"), "beyond --max-site-series 1");
}
