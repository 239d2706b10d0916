//! Rendering a [`Snapshot`] as Prometheus text. The drain loop renders once per interval; every
//! scrape in between is served the same bytes. The per-peer series change only when the per-peer
//! maps are read again ([`crate::peers::ReadSchedule`]), so their text is kept and reused until
//! then.
use std::{collections::HashMap, io::Write as _, sync::Arc, time::UNIX_EPOCH};

use bytes::Bytes;
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{
        Bucket, Counter, Gauge, Histogram as PromHistogram, LabelPair, Metric, MetricFamily,
        MetricType,
    },
};
use smtpflow_common::{
    Direction, Event, HIST_BOUNDS_NS, HistKind, Histogram, Metric as Kind, Outcome, PeerCounters,
    PeerKey, Phase, Side, Stat,
};

use crate::{
    attach::Attachment, diagnose::Finding, drain::Snapshot, drops::DropReasons,
    peer_label::PeerLabel, peers::PeerView,
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

/// A metric family under construction.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    metrics: Vec<Metric>,
}

fn label_pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

impl Family {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Self {
        Self { name, help, kind, metrics: Vec::new() }
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut m = Metric::from_label(label_pairs(labels));
        if self.kind == MetricType::GAUGE {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        } else {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        self.metrics.push(m);
    }

    fn add_histogram(&mut self, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(HIST_BOUNDS_NS.len());
        for (bound, n) in HIST_BOUNDS_NS.iter().zip(h.buckets) {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound as f64 / 1e9);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        let mut p = PromHistogram::default();
        p.set_bucket(buckets);
        p.set_sample_count(h.buckets.iter().sum());
        p.set_sample_sum(h.sum_ns as f64 / 1e9);
        let mut m = Metric::from_label(label_pairs(labels));
        m.set_histogram(p);
        self.metrics.push(m);
    }

    fn finish(self, out: &mut Vec<MetricFamily>) {
        if self.metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(self.name.to_owned());
        f.set_help(self.help.to_owned());
        f.set_field_type(self.kind);
        f.set_metric(self.metrics);
        out.push(f);
    }
}

/// Families as Prometheus text, appended to `buf`.
fn encode(families: &[MetricFamily], buf: &mut Vec<u8>) {
    // Encoding only fails for empty families, which `finish` never emits.
    if let Err(e) = TextEncoder::new().encode(families, buf) {
        log::error!("encoding metrics failed: {e}");
    }
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

/// Per-peer series summed by their full label set; zeros are not exported.
#[derive(Default)]
struct Summed(std::collections::BTreeMap<Vec<(&'static str, String)>, u64>);

impl Summed {
    /// Adds `n` to the series `labels` makes; the labels are only made for a nonzero `n`
    /// (most combinations of a peer are zero).
    fn add(&mut self, n: u64, labels: impl FnOnce() -> Vec<(&'static str, String)>) {
        if n != 0 {
            *self.0.entry(labels()).or_default() += n;
        }
    }

    /// Appends the series as a counter family in the Prometheus text format, byte for byte
    /// what `TextEncoder` writes (header, label escaping, value), without building protobuf
    /// messages first: the per-peer families are most of the series (4 or more a peer).
    fn write_counters(self, name: &str, help: &str, out: &mut Vec<u8>) {
        if self.0.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(out, "# TYPE {name} counter");
        for (labels, n) in self.0 {
            out.extend_from_slice(name.as_bytes());
            for (i, (label, value)) in labels.iter().enumerate() {
                let _ = write!(
                    out,
                    "{}{label}=\"{}\"",
                    if i == 0 { '{' } else { ',' },
                    escape(value, true)
                );
            }
            if !labels.is_empty() {
                out.push(b'}');
            }
            let _ = writeln!(out, " {}", n as f64);
        }
    }
}

/// The text format's escaping: `\` and newlines, and `"` in label values.
fn escape(v: &str, quotes: bool) -> std::borrow::Cow<'_, str> {
    let special = v.contains(['\\', '\n']) || (quotes && v.contains('"'));
    if !special {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
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
            direction: Direction::from_u8(k.direction)?.label(),
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
        render_self(snap, &mut families);
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
        for (k, v) in &snap.counters {
            let v = *v as f64;
            let (Some(kind), Some(d)) = (Kind::from_u8(k.metric), Direction::from_u8(k.direction))
            else {
                continue;
            };
            let iface = self.ifname(k.ifindex);
            let port = k.port.to_string();
            let base =
                [("iface", iface.as_str()), ("direction", d.label()), ("port", port.as_str())];
            let code = k.code.to_string();
            match kind {
                Kind::Event => {
                    if let (Some(e), Some(s)) = (Event::from_u8(k.a), Side::from_u8(k.b)) {
                        events.add(
                            &[&base[..], &[("event", e.label()), ("side", s.label())]].concat(),
                            v,
                        );
                    }
                }
                Kind::Handshake => {
                    if let Some(o) = Outcome::from_u8(k.a) {
                        handshakes.add(&[&base[..], &[("outcome", o.label())]].concat(), v);
                    }
                }
                Kind::SynRetransmit => retransmits.add(&base, v),
                Kind::Reset => {
                    if let (Some(p), Some(s)) = (Phase::from_u8(k.a), Side::from_u8(k.b)) {
                        resets.add(
                            &[&base[..], &[("phase", p.label()), ("side", s.label())]].concat(),
                            v,
                        );
                    }
                }
                Kind::Reply => replies.add(&[&base[..], &[("code", code.as_str())]].concat(), v),
                Kind::Greeting => {
                    greetings.add(&[&base[..], &[("code", code.as_str())]].concat(), v)
                }
                Kind::SynDrop => {
                    let reason = match &self.drop_reasons {
                        Some(r) => r.name(k.code),
                        None => format!("reason_{}", k.code),
                    };
                    drops.add(
                        &[
                            ("direction", d.label()),
                            ("port", port.as_str()),
                            ("reason", reason.as_str()),
                        ],
                        v,
                    );
                }
            }
        }
        for ((ifindex, port, direction), n) in &snap.timeouts {
            let Some(d) = Direction::from_u8(*direction) else { continue };
            let iface = self.ifname(*ifindex);
            let port = port.to_string();
            handshakes.add(
                &[
                    ("iface", &iface),
                    ("direction", d.label()),
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
        for (k, h) in &snap.hists {
            let Some(d) = Direction::from_u8(k.direction) else { continue };
            let iface = self.ifname(k.ifindex);
            let port = k.port.to_string();
            let labels =
                [("iface", iface.as_str()), ("direction", d.label()), ("port", port.as_str())];
            if k.kind == HistKind::Handshake as u8 {
                handshake.add_histogram(&labels, h);
            } else {
                greeting.add_histogram(&labels, h);
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
    use crate::pressure::{CONNTRACK_STATS, TCP_STATS};
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

/// smtpflow's own health: map fill, evictions, and the kernel programs' bookkeeping.
fn render_self(snap: &Snapshot, out: &mut Vec<MetricFamily>) {
    let mut entries =
        Family::new("smtpflow_map_entries", MetricType::GAUGE, "Entries in a kernel map.");
    entries.add(&[("map", "peers")], snap.peers.entries as f64);
    entries.add(&[("map", "flows")], snap.flows as f64);
    entries.add(&[("map", "counters")], snap.counters.len() as f64);
    entries.finish(out);
    let mut cap = Family::new(
        "smtpflow_map_capacity",
        MetricType::GAUGE,
        "Capacity (max entries) of a kernel map.",
    );
    cap.add(&[("map", "peers")], f64::from(snap.peers_capacity));
    cap.add(&[("map", "flows")], f64::from(snap.flows_capacity));
    cap.add(&[("map", "counters")], f64::from(smtpflow_common::COUNTERS_CAPACITY));
    cap.finish(out);
    let mut ev = Family::new(
        "smtpflow_map_evictions_total",
        MetricType::COUNTER,
        "Entries evicted from a kernel LRU map (peers: their events stay in the totals; flows: their handshake, greeting and replies are no longer followed).",
    );
    ev.add(&[("map", "peers")], snap.peer_evictions as f64);
    ev.add(&[("map", "flows")], snap.flow_evictions as f64);
    ev.finish(out);
    let lost = snap.stats[Stat::CounterInsertFailed as usize]
        + snap.stats[Stat::HistInsertFailed as usize];
    for (value, name, help) in [
        (
            snap.stats[Stat::Malformed as usize],
            "smtpflow_malformed_packets_total",
            "Frames with malformed IPv4, IPv6 or TCP headers; never counted as events.",
        ),
        (
            snap.stats[Stat::PeerInsertFailed as usize],
            "smtpflow_peer_insert_failures_total",
            "Per-peer entries that could not be created (the events are still in the totals).",
        ),
        (
            snap.stats[Stat::FlowInsertFailed as usize],
            "smtpflow_flow_insert_failures_total",
            "Connections whose flow entry could not be created (not followed).",
        ),
        (
            lost,
            "smtpflow_lost_events_total",
            "Counts or durations the kernel could not record at all; non-zero is a bug, please report it.",
        ),
    ] {
        let mut f = Family::new(name, MetricType::COUNTER, help);
        f.add(&[], value as f64);
        f.finish(out);
    }
    let mut d = Family::new(
        "smtpflow_drain_duration_seconds",
        MetricType::GAUGE,
        "Time the last drain of the kernel maps took.",
    );
    d.add(&[], snap.drain_seconds);
    d.finish(out);
    let mut d = Family::new(
        "smtpflow_full_drain_duration_seconds",
        MetricType::GAUGE,
        "Time the last drain that also read the per-peer maps took.",
    );
    d.add(&[], snap.full_drain_seconds);
    d.finish(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::PeerReader;
    use smtpflow_common::{CounterKey, FAMILY_V4, FAMILY_V6, HistKey, PeerGreetingKey};

    fn event_key(ifindex: u32, port: u16, e: Event, d: Direction, s: Side) -> CounterKey {
        CounterKey::event(ifindex, port, e, d, s)
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
        let mut k = CounterKey::new(2, 25, Kind::Handshake, Direction::Inbound);
        k.a = Outcome::Refused as u8;
        snap.counters.insert(k, 3);
        let mut k = CounterKey::new(2, 587, Kind::Greeting, Direction::Outbound);
        k.code = 421;
        snap.counters.insert(k, 2);
        let mut k = CounterKey::new(0, 25, Kind::SynDrop, Direction::Inbound);
        k.code = 77;
        snap.counters.insert(k, 4);
        snap.timeouts.insert((2, 25, Direction::Inbound as u8), 6);
        let mut h = Histogram::ZERO;
        h.buckets[0] = 1; // <= 50us
        h.buckets[13] = 2; // <= 1s
        h.sum_ns = 2_000_040_000;
        snap.hists.insert(
            HistKey { ifindex: 2, port: 25, direction: 0, kind: HistKind::Handshake as u8 },
            h,
        );
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
    fn per_peer_text_is_what_the_encoder_writes() {
        let series = |iface: &str, n: u64| {
            (vec![("iface", iface.to_owned()), ("peer", "192.0.2.1".to_owned())], n)
        };
        let all = [series("eth0", 3), series(r#"we"ird\if"#, 12_345_678_901), series("n\nl", 1)];
        let mut summed = Summed::default();
        let mut family = Family::new("x_total", MetricType::COUNTER, "Help with \\ and\nlines.");
        for (labels, n) in all.clone() {
            summed.add(n, || labels);
        }
        for (labels, n) in Summed(all.into_iter().collect()).0 {
            let refs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            family.add(&refs, n as f64);
        }
        let mut families = Vec::new();
        family.finish(&mut families);
        let mut want = Vec::new();
        encode(&families, &mut want);
        let mut got = Vec::new();
        summed.write_counters("x_total", "Help with \\ and\nlines.", &mut got);
        assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(want).unwrap());
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
}
