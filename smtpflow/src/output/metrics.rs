//! Rendering a [`Snapshot`] as Prometheus text. The drain loop renders once per interval; every
//! scrape in between is served the same bytes. The per-peer series change only when the per-peer
//! maps are read again ([`crate::drain::peers::ReadSchedule`]), so their text is kept and reused until
//! then.
use std::{collections::HashMap, sync::Arc, time::UNIX_EPOCH};

use bytes::Bytes;
use prometheus::proto::{MetricFamily, MetricType};
use smtpflow_common::{Counter, Direction, Event, HistKind, Outcome, PeerCounters, PeerKey, Side};

use super::{
    families::{Family, Summed, encode, joined},
    peer_label::PeerLabel,
    selfstats,
};
use crate::{
    diagnose::Finding,
    drain::{Snapshot, peers::PeerView},
    kernel::{attach::Attachment, drop_reasons::DropReasons},
};

/// What the exporter knows besides the snapshot.
pub struct Exporter {
    ifnames: HashMap<u32, String>,
    attachments: Vec<Attachment>,
    drop_reasons: Option<DropReasons>,
    labeler: PeerLabel,
    /// The per-peer families as text, and the reading they were rendered from.
    peer_text: Option<(Arc<PeerView>, Vec<u8>)>,
}

/// Labels of a per-peer series, as owned strings.
struct PeerLabels {
    iface: String,
    peer: String,
    direction: &'static str,
    port: String,
}

impl PeerLabels {
    /// The full label set of a series: the peer's labels, then `extra`.
    fn with(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("iface", self.iface.clone()),
            ("peer", self.peer.clone()),
            ("direction", self.direction.to_owned()),
            ("port", self.port.clone()),
        ];
        v.extend(extra.iter().map(|(k, val)| (*k, (*val).to_owned())));
        v
    }
}

impl Exporter {
    pub fn new(
        ifnames: HashMap<u32, String>,
        attachments: Vec<Attachment>,
        drop_reasons: Option<DropReasons>,
        labeler: PeerLabel,
    ) -> Self {
        Self { ifnames, attachments, drop_reasons, labeler, peer_text: None }
    }

    fn ifname(&self, ifindex: u32) -> String {
        self.ifnames.get(&ifindex).cloned().unwrap_or_else(|| format!("ifindex{ifindex}"))
    }

    fn peer_labels(&self, k: &PeerKey) -> Option<PeerLabels> {
        Some(PeerLabels {
            iface: self.ifname(k.ifindex),
            peer: self.labeler.label(k.ip()?),
            direction: Direction::from_repr(k.direction)?.label(),
            port: k.port.to_string(),
        })
    }

    pub fn render(&mut self, snap: &Snapshot, findings: &[Finding]) -> Bytes {
        let mut families = Vec::new();
        self.render_info(&mut families);
        render_diagnosis(findings, &mut families);
        self.render_counters(snap, &mut families);
        self.render_histograms(snap, &mut families);
        let mut buf = Vec::with_capacity(64 * 1024);
        encode(&families, &mut buf);
        buf.extend_from_slice(self.peer_text(&snap.peers));
        families.clear();
        render_pressure(snap, &mut families);
        let mut up = Family::new(
            "smtpflow_interface_up",
            MetricType::GAUGE,
            "Whether a watched interface exists (0: it disappeared and its programs with it).",
        );
        for (iface, present) in &snap.ifaces_up {
            up.add(&[("iface", iface)], if *present { 1.0 } else { 0.0 });
        }
        up.finish(&mut families);
        selfstats::render_health(snap, &mut families);
        encode(&families, &mut buf);
        Bytes::from(buf)
    }

    /// The per-peer families of this reading of the per-peer maps, rendered once per reading.
    fn peer_text(&mut self, view: &Arc<PeerView>) -> &[u8] {
        let fresh = self.peer_text.as_ref().is_some_and(|(seen, _)| Arc::ptr_eq(seen, view));
        if !fresh {
            self.peer_text = Some((view.clone(), self.render_peers(view)));
        }
        self.peer_text.as_ref().map_or(&[], |(_, text)| text)
    }

    fn render_info(&self, out: &mut Vec<MetricFamily>) {
        let mut info = Family::new(
            "smtpflow_build_info",
            MetricType::GAUGE,
            "smtpflow build information; always 1.",
        );
        info.add(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        info.finish(out);
        let mut att = Family::new(
            "smtpflow_attachment_info",
            MetricType::GAUGE,
            "Kernel programs attached, by interface (empty for kernel-wide hooks), hook and method; always 1.",
        );
        for a in &self.attachments {
            att.add(&[("iface", &a.iface), ("hook", a.hook), ("method", a.how)], 1.0);
        }
        att.finish(out);
    }

    fn render_counters(&self, snap: &Snapshot, out: &mut Vec<MetricFamily>) {
        let mut events = Family::new(
            "smtpflow_tcp_events_total",
            MetricType::COUNTER,
            "SMTP-port TCP events seen, exact over all peers.",
        );
        let mut handshakes = Family::new(
            "smtpflow_handshakes_total",
            MetricType::COUNTER,
            "SMTP connection attempts by outcome: established (answered by a SYN-ACK), refused (answered by a RST), timeout (no answer within --handshake-timeout).",
        );
        let mut retransmits = Family::new(
            "smtpflow_syn_retransmits_total",
            MetricType::COUNTER,
            "SYNs seen again while their handshake was pending.",
        );
        let mut resets = Family::new(
            "smtpflow_resets_total",
            MetricType::COUNTER,
            "RSTs by the phase of their connection (handshake, pre_greeting, session) and the side that sent them.",
        );
        let mut replies = Family::new(
            "smtpflow_smtp_replies_total",
            MetricType::COUNTER,
            "SMTP replies by code, from server segments that start with a reply line (plaintext ports, until STARTTLS).",
        );
        let mut greetings = Family::new(
            "smtpflow_smtp_greetings_total",
            MetricType::COUNTER,
            "First SMTP reply of each connection, by code.",
        );
        let mut drops = Family::new(
            "smtpflow_syn_drops_total",
            MetricType::COUNTER,
            "SMTP-port SYNs the kernel dropped, by drop reason (kfree_skb).",
        );
        for (&(scope, counter), &v) in &snap.counters {
            let v = v as f64;
            let d = scope.direction.label();
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            let base = [("iface", iface.as_str()), ("direction", d), ("port", port.as_str())];
            let code = match counter {
                Counter::Reply(c) | Counter::Greeting(c) => c.to_string(),
                _ => String::new(),
            };
            match counter {
                Counter::Event(e, s) => {
                    events.add(&joined(&base, &[("event", e.label()), ("side", s.label())]), v)
                }
                Counter::Handshake(o) => {
                    handshakes.add(&joined(&base, &[("outcome", o.label())]), v)
                }
                Counter::SynRetransmit => retransmits.add(&joined(&base, &[]), v),
                Counter::Reset(p, s) => {
                    resets.add(&joined(&base, &[("phase", p.label()), ("side", s.label())]), v)
                }
                Counter::Reply(_) => replies.add(&joined(&base, &[("code", &code)]), v),
                Counter::Greeting(_) => greetings.add(&joined(&base, &[("code", &code)]), v),
                Counter::SynDrop(reason) => {
                    let reason = match &self.drop_reasons {
                        Some(r) => r.name(reason),
                        None => format!("reason_{reason}"),
                    };
                    drops.add(&[("direction", d), ("port", port.as_str()), ("reason", &reason)], v);
                }
            }
        }
        for (scope, n) in &snap.timeouts {
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            handshakes.add(
                &[
                    ("iface", &iface),
                    ("direction", scope.direction.label()),
                    ("port", &port),
                    ("outcome", Outcome::Timeout.label()),
                ],
                *n as f64,
            );
        }
        for f in [events, handshakes, retransmits, resets, replies, greetings, drops] {
            f.finish(out);
        }
    }

    fn render_histograms(&self, snap: &Snapshot, out: &mut Vec<MetricFamily>) {
        let mut handshake = Family::new(
            "smtpflow_handshake_duration_seconds",
            MetricType::HISTOGRAM,
            "First SYN to SYN-ACK, at the observation point.",
        );
        let mut greeting = Family::new(
            "smtpflow_greeting_duration_seconds",
            MetricType::HISTOGRAM,
            "Handshake completion to the server's first payload (the 220 banner; the TLS ServerHello on 465).",
        );
        for ((scope, kind), h) in &snap.hists {
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            let labels = [
                ("iface", iface.as_str()),
                ("direction", scope.direction.label()),
                ("port", port.as_str()),
            ];
            match kind {
                HistKind::Handshake => handshake.add_histogram(&labels, h),
                HistKind::Greeting => greeting.add_histogram(&labels, h),
            }
        }
        handshake.finish(out);
        greeting.finish(out);
    }

    /// The exported peers' series (chosen when the per-peer maps were read), and the counts, as
    /// text.
    fn render_peers(&self, view: &PeerView) -> Vec<u8> {
        // Series by their labels, summed: with --peer-label prefix several peers share one.
        let mut events = Summed::default();
        let mut handshakes = Summed::default();
        let mut greetings = Summed::default();
        for (k, v) in &view.exported {
            let Some(l) = self.peer_labels(k) else { continue };
            for e in Event::ALL {
                for s in Side::ALL {
                    let n = v.counts[PeerCounters::index(e, s)];
                    events.add(n, || l.with(&[("event", e.label()), ("side", s.label())]));
                }
            }
            for (o, n) in [Outcome::Established, Outcome::Refused].into_iter().zip(v.outcomes) {
                handshakes.add(n, || l.with(&[("outcome", o.label())]));
            }
        }
        for (k, n) in &view.exported_timeouts {
            let Some(l) = self.peer_labels(k) else { continue };
            handshakes.add(*n, || l.with(&[("outcome", Outcome::Timeout.label())]));
        }
        for (k, n) in &view.exported_greetings {
            let Some(l) = self.peer_labels(&k.peer) else { continue };
            greetings.add(*n, || l.with(&[("code", &k.code.to_string())]));
        }
        let mut text = Vec::new();
        events.write_counters(
            "smtpflow_peer_tcp_events_total",
            "SMTP-port TCP events per peer, for the most active peers (--max-peer-series) still in the kernel's per-peer LRU map.",
            &mut text,
        );
        handshakes.write_counters(
            "smtpflow_peer_handshakes_total",
            "Handshake outcomes per peer, for the exported peers.",
            &mut text,
        );
        greetings.write_counters(
            "smtpflow_peer_smtp_greetings_total",
            "Greeting codes per peer, for the exported peers.",
            &mut text,
        );

        let mut out = Vec::new();
        let mut g = Family::new(
            "smtpflow_peers_tracked",
            MetricType::GAUGE,
            "Distinct peers (address and interface) in the kernel's per-peer map.",
        );
        g.add(&[], view.tracked as f64);
        g.finish(&mut out);
        let mut g = Family::new(
            "smtpflow_peers_exported",
            MetricType::GAUGE,
            "Peers exported as per-peer series (at most --max-peer-series).",
        );
        g.add(&[], view.exported_peers as f64);
        g.finish(&mut out);
        if let Some(at) = view.read_at {
            let mut g = Family::new(
                "smtpflow_peers_read_timestamp_seconds",
                MetricType::GAUGE,
                "When the per-peer maps were last read (Unix time): the per-peer series, smtpflow_peers_tracked and smtpflow_map_entries{map=\"peers\"} are as of then. Read every drain while that costs under 1% of a core, else less often, at least every 60 s.",
            );
            g.add(&[], at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
            g.finish(&mut out);
        }
        encode(&out, &mut text);
        text
    }
}

/// The diagnosis: a gauge per cause, its evidence, and the peers most involved.
fn render_diagnosis(findings: &[Finding], out: &mut Vec<MetricFamily>) {
    let mut active = Family::new(
        "smtpflow_diagnosis",
        MetricType::GAUGE,
        "Whether a cause of failing SMTP handshakes is active over the diagnosis window (1) or not (0).",
    );
    let mut evidence = Family::new(
        "smtpflow_diagnosis_evidence",
        MetricType::GAUGE,
        "The numbers behind each cause's verdict, over the diagnosis window.",
    );
    let mut peers = Family::new(
        "smtpflow_diagnosis_top_peer",
        MetricType::GAUGE,
        "The peers most involved in an active per-peer cause, with their count in the window.",
    );
    for f in findings {
        active.add(&[("cause", f.cause.label())], if f.active { 1.0 } else { 0.0 });
        for (name, v) in &f.evidence {
            evidence.add(&[("cause", f.cause.label()), ("evidence", name)], *v);
        }
        if f.active {
            for (p, n) in &f.top_peers {
                peers.add(
                    &[("cause", f.cause.label()), ("iface", &p.iface), ("peer", &p.peer)],
                    *n as f64,
                );
            }
        }
    }
    active.finish(out);
    evidence.finish(out);
    peers.finish(out);
}

/// The kernel's pressure signals: conntrack (absent when conntrack is) and TCP counters.
pub(crate) fn render_pressure(snap: &Snapshot, out: &mut Vec<MetricFamily>) {
    use crate::host::pressure::{CONNTRACK_STATS, TCP_STATS};
    if let Some(ct) = &snap.pressure.conntrack {
        let mut f = Family::new(
            "smtpflow_conntrack_entries",
            MetricType::GAUGE,
            "Conntrack entries in this network namespace (nf_conntrack_count).",
        );
        f.add(&[], ct.entries as f64);
        f.finish(out);
        let mut f = Family::new(
            "smtpflow_conntrack_entries_limit",
            MetricType::GAUGE,
            "Size limit of the conntrack table (nf_conntrack_max).",
        );
        f.add(&[], ct.limit as f64);
        f.finish(out);
        let mut f = Family::new(
            "smtpflow_conntrack_stat_total",
            MetricType::COUNTER,
            "Conntrack statistics summed over CPUs (ctnetlink, else /proc/net/stat/nf_conntrack).",
        );
        for stat in CONNTRACK_STATS {
            if let Some(v) = ct.stats.get(stat) {
                f.add(&[("stat", stat)], *v as f64);
            }
        }
        f.finish(out);
    }
    let mut f = Family::new(
        "smtpflow_tcp_stat_total",
        MetricType::COUNTER,
        "TCP counters of this network namespace (TcpExt from /proc/net/netstat, Tcp from /proc/net/snmp).",
    );
    for stat in TCP_STATS {
        if let Some(v) = snap.pressure.tcp.get(stat) {
            f.add(&[("stat", stat)], *v as f64);
        }
    }
    f.finish(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::peers::PeerReader;
    use smtpflow_common::{FAMILY_V4, FAMILY_V6, Histogram, PeerGreetingKey, Scope};

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
        render_with(snap, PeerLabel::Ip)
    }

    fn render_with(snap: &Snapshot, labeler: PeerLabel) -> String {
        let mut ex =
            Exporter::new(HashMap::from([(2, "eth0".to_owned())]), Vec::new(), None, labeler);
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

    #[test]
    fn renders_exact_totals_and_capped_peers() {
        let mut snap = Snapshot::default();
        snap.counters.insert(event_key(2, 25, Event::Syn, Direction::Inbound, Side::Peer), 7);
        snap.counters.insert(event_key(2, 25, Event::SynAck, Direction::Inbound, Side::Local), 5);
        let mut entries: Vec<_> = (1..=5)
            .map(|i| (peer(i, FAMILY_V4, Direction::Inbound), counters(u64::from(i))))
            .collect();
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
        let greeting = PeerGreetingKey { peer: p, code: 421, _pad: [0; 2] };
        snap.peers = view(10, &[(p, c)], &[(p, 2)], &[(greeting, 5)]);
        let text = render(&snap);
        for want in [
            r#"smtpflow_handshakes_total{iface="eth0",direction="inbound",port="25",outcome="refused"} 3"#,
            r#"smtpflow_handshakes_total{iface="eth0",direction="inbound",port="25",outcome="timeout"} 6"#,
            r#"smtpflow_smtp_greetings_total{iface="eth0",direction="outbound",port="587",code="421"} 2"#,
            r#"smtpflow_syn_drops_total{direction="inbound",port="25",reason="reason_77"} 4"#,
            r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="0.00005"} 1"#,
            r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="0.5"} 1"#,
            r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="1"} 3"#,
            r#"smtpflow_handshake_duration_seconds_bucket{iface="eth0",direction="inbound",port="25",le="+Inf"} 3"#,
            r#"smtpflow_handshake_duration_seconds_count{iface="eth0",direction="inbound",port="25"} 3"#,
            r#"smtpflow_peer_handshakes_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",outcome="refused"} 1"#,
            r#"smtpflow_peer_handshakes_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",outcome="timeout"} 2"#,
            r#"smtpflow_peer_smtp_greetings_total{iface="eth0",peer="198.51.100.1",direction="outbound",port="25",code="421"} 5"#,
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }

    #[test]
    fn prefix_labels_sum_the_peers_of_a_network() {
        let entries: Vec<_> = (1..=3)
            .map(|i| (peer(i, FAMILY_V4, Direction::Inbound), counters(u64::from(i))))
            .collect();
        let snap = Snapshot { peers: view(10, &entries, &[], &[]), ..Default::default() };
        let text = render_with(&snap, PeerLabel::Prefix { v4: 24, v6: 64 });
        assert!(
            text.contains(r#"smtpflow_peer_tcp_events_total{iface="eth0",peer="198.51.100.0/24",direction="inbound",port="25",event="syn",side="peer"} 6"#),
            "{text}"
        );
        assert!(!text.contains("198.51.100.1\""), "no full address: {text}");
        let hashed = render_with(&snap, PeerLabel::Hash { key: b"k".to_vec() });
        assert!(!hashed.contains("198.51.100"), "{hashed}");
        assert_eq!(hashed.matches("smtpflow_peer_tcp_events_total{").count(), 3);
    }

    #[test]
    fn peer_series_are_rendered_once_per_reading() {
        let mut ex =
            Exporter::new(HashMap::from([(2, "eth0".to_owned())]), Vec::new(), None, PeerLabel::Ip);
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
        use smtpflow_common::{Phase, Stat};
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
            snap.counters.insert((at, Counter::SynRetransmit), 3);
            snap.counters.insert((at, Counter::Reset(Phase::Session, Side::Peer)), 1);
            snap.counters.insert((at, Counter::Reply(250)), 40);
            snap.counters.insert((at, Counter::Greeting(220)), 8);
            snap.counters.insert((at, Counter::Greeting(421)), 1);
            snap.timeouts.insert(at, 4);
            let mut h = Histogram::ZERO;
            h.buckets[3] = 5;
            h.buckets[17] = 1;
            h.sum_ns = 12_500_000_000;
            snap.hists.insert((at, HistKind::Handshake), h);
            snap.hists.insert((at, HistKind::Greeting), Histogram::ZERO);
        }
        snap.counters.insert((scope(0, 25, Direction::Inbound), Counter::SynDrop(77)), 6);
        let out = peer(7, FAMILY_V4, Direction::Outbound);
        let mut c = counters(5);
        c.outcomes[Outcome::Refused as usize] = 2;
        let greeting = PeerGreetingKey { peer: out, code: 421, _pad: [0; 2] };
        snap.peers = view(10, &[(out, c)], &[(out, 3)], &[(greeting, 1)]);
        snap.stats[Stat::Malformed as usize] = 2;
        snap.stats[Stat::PeerInserts as usize] = 1;
        (snap.peers_capacity, snap.flows, snap.flows_capacity) = (65_536, 12, 262_144);
        (snap.drain_seconds, snap.full_drain_seconds) = (0.25, 0.5);
        snap.pressure = Pressure {
            conntrack: Some(Conntrack {
                entries: 100,
                limit: 262_144,
                stats: CONNTRACK_STATS.iter().map(|s| (*s, 1)).collect(),
                source: Some(StatsSource::Netlink),
            }),
            tcp: TCP_STATS.iter().map(|s| (*s, 2)).collect(),
        };
        snap.ifaces_up = vec![("eth0".to_owned(), true)];
        let findings = [Finding {
            cause: Cause::RemoteRefusing,
            active: true,
            evidence: BTreeMap::from([("outbound_refused", 2.0)]),
            top_peers: vec![(PeerName { iface: "eth0".into(), peer: "198.51.100.7".into() }, 2)],
            summary: "outbound handshakes refused".into(),
        }];
        let attachments = vec![Attachment { iface: "eth0".into(), hook: "tc_ingress", how: "tcx" }];
        let mut ex = Exporter::new(
            HashMap::from([(2, "eth0".to_owned())]),
            attachments,
            None,
            PeerLabel::Ip,
        );
        let text = String::from_utf8(ex.render(&snap, &findings).to_vec()).unwrap();
        // The one value that is a clock reading.
        let stamp = "smtpflow_peers_read_timestamp_seconds ";
        let text: String = text
            .lines()
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
}
