//! Rendering a [`Snapshot`] as Prometheus text. The drain loop renders once per interval; every
//! scrape in between is served the same bytes. The per-peer series change only when the per-peer
//! maps are read again ([`crate::drain::peers::ReadSchedule`]), so their text is kept and reused until
//! then.
use std::{collections::HashMap, sync::Arc, time::UNIX_EPOCH};

use bytes::Bytes;
use prometheus::proto::{MetricFamily, MetricType};
use smtpflow_common::{Counter, HistKind, Outcome, ReplyClass, StarttlsStage};

use super::{
    families::{Family, Summed, encode, joined},
    selfstats,
};
use crate::{
    diagnose::Finding,
    drain::{
        Snapshot,
        peers::{PeerView, series::Counted},
    },
    kernel::{attach::Attachment, drop_reasons::DropReasons},
    sites::{SiteCounted, SiteView},
};

/// What the exporter knows besides the snapshot.
pub struct Exporter {
    ifnames: HashMap<u32, String>,
    attachments: Vec<Attachment>,
    drop_reasons: Option<DropReasons>,
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
    ) -> Self {
        Self { ifnames, attachments, drop_reasons, peer_text: None }
    }

    fn ifname(&self, ifindex: u32) -> String {
        self.ifnames.get(&ifindex).cloned().unwrap_or_else(|| format!("ifindex{ifindex}"))
    }

    pub fn render(&mut self, snap: &Snapshot, findings: &[Finding]) -> Bytes {
        let mut families = Vec::new();
        self.render_info(&mut families);
        render_diagnosis(findings, &mut families);
        self.render_counters(snap, &mut families);
        self.render_histograms(snap, &mut families);
        self.render_open(snap, &mut families);
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
            "SMTP connection attempts by outcome: established (answered by a SYN-ACK), refused (answered by a RST), timeout (no answer within --handshake-timeout), unreachable (answered by an ICMP or ICMPv6 destination unreachable).",
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
        let mut statuses = Family::new(
            "smtpflow_smtp_reply_statuses_total",
            MetricType::COUNTER,
            "4xx and 5xx SMTP replies by code and enhanced status code (X.Y.Z, X.Y.other for a detail of 99 or more, none), and class: throttling (421, or a 4xx rate or policy limit), transient (other 4xx), permanent (5xx).",
        );
        let mut throttled = Family::new(
            "smtpflow_throttled_sessions_total",
            MetricType::COUNTER,
            "SMTP sessions with at least one throttling reply (421, or a 4xx whose enhanced status is a rate or policy limit).",
        );
        let mut starttls = Family::new(
            "smtpflow_starttls_total",
            MetricType::COUNTER,
            "SMTP sessions by STARTTLS stage: offered (the server listed STARTTLS in its EHLO reply), requested (the client sent STARTTLS), accepted (the server answered 220), refused (any other answer), and how the TLS handshake ended (after STARTTLS, or on an implicit-TLS port such as 465): completed (the client's first application-data record), failed (a RST or FIN before it). Replies after STARTTLS are encrypted and not counted.",
        );
        let mut versions = Family::new(
            "smtpflow_tls_versions_total",
            MetricType::COUNTER,
            "TLS sessions by the version their clear-text ServerHello chose (supported_versions, else legacy_version): TLSv1.0 to TLSv1.3, unknown (cut, malformed, or another version).",
        );
        let mut unreachable = Family::new(
            "smtpflow_unreachable_total",
            MetricType::COUNTER,
            "SMTP connection attempts answered by an ICMP or ICMPv6 destination unreachable (the outcome unreachable), by the class of its code: net, host, port, protocol, admin (administratively prohibited), other.",
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
                Counter::ReplyStatus(c, status) => {
                    let Some(class) = ReplyClass::of(c, status) else { continue };
                    let label = status.label();
                    let extra = [
                        ("code", c.to_string()),
                        ("status", label.as_str().to_owned()),
                        ("class", class.label().to_owned()),
                    ];
                    let extra: Vec<(&str, &str)> =
                        extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    statuses.add(&joined(&base, &extra), v);
                }
                Counter::Throttled => throttled.add(&joined(&base, &[]), v),
                Counter::Starttls(stage) => {
                    starttls.add(&joined(&base, &[("stage", stage.label())]), v)
                }
                Counter::Unreachable(reason) => {
                    unreachable.add(&joined(&base, &[("reason", reason.label())]), v)
                }
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
        for (scope, n) in &snap.tls.offered {
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            starttls.add(
                &[
                    ("iface", &iface),
                    ("direction", scope.direction.label()),
                    ("port", &port),
                    ("stage", StarttlsStage::Offered.label()),
                ],
                *n as f64,
            );
        }
        for ((scope, version), n) in &snap.tls.versions {
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            versions.add(
                &[
                    ("iface", &iface),
                    ("direction", scope.direction.label()),
                    ("port", &port),
                    ("version", version.label()),
                ],
                *n as f64,
            );
        }
        for f in [
            events,
            handshakes,
            retransmits,
            resets,
            replies,
            greetings,
            statuses,
            throttled,
            starttls,
            versions,
            unreachable,
            drops,
        ] {
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

    /// The open-connection gauges, by scope and for the exported peers: read from the flow map
    /// at every drain (not with the per-peer maps).
    fn render_open(&self, snap: &Snapshot, out: &mut Vec<MetricFamily>) {
        let mut open = Family::new(
            "smtpflow_open_connections",
            MetricType::GAUGE,
            "SMTP connections established and not ended, as the flow map shows them at the last drain (what the observation point sees: in xdp mode, ingress only).",
        );
        for (scope, n) in &snap.open_by_scope {
            let iface = self.ifname(scope.ifindex);
            let port = scope.port.to_string();
            open.add(
                &[("iface", &iface), ("direction", scope.direction.label()), ("port", &port)],
                *n as f64,
            );
        }
        open.finish(out);
        let mut peers = Family::new(
            "smtpflow_peer_open_connections",
            MetricType::GAUGE,
            "Open SMTP connections per peer (--peer-label), for the exported peers (0 when none is open).",
        );
        for p in &snap.open_peers {
            let iface = self.ifname(p.ifindex);
            let port = p.port.to_string();
            peers.add(
                &[
                    ("iface", &iface),
                    ("peer", &p.peer),
                    ("direction", p.direction.label()),
                    ("port", &port),
                ],
                p.open as f64,
            );
        }
        peers.finish(out);
        let mut sites = Family::new(
            "smtpflow_site_open_connections",
            MetricType::GAUGE,
            "Open SMTP connections per remote site, summed over interfaces (other: sites without their own series; unknown: peers with no name yet).",
        );
        for s in &snap.site_open {
            let port = s.port.to_string();
            sites.add(
                &[("direction", s.direction.label()), ("port", &port), ("site", &s.site)],
                s.open as f64,
            );
        }
        sites.finish(out);
    }

    /// The exported per-peer series (monotonic totals, chosen when the per-peer maps were
    /// read), and the counts, as text.
    fn render_peers(&self, view: &PeerView) -> Vec<u8> {
        let mut events = Summed::default();
        let mut handshakes = Summed::default();
        let mut greetings = Summed::default();
        let mut throttled = Summed::default();
        for s in &view.series {
            let l = PeerLabels {
                iface: self.ifname(s.ifindex),
                peer: s.peer.to_string(),
                direction: s.direction.label(),
                port: s.port.to_string(),
            };
            match s.counted {
                Counted::Event(e, side) => {
                    events.add(s.value, || l.with(&[("event", e.label()), ("side", side.label())]))
                }
                Counted::Outcome(o) => {
                    handshakes.add(s.value, || l.with(&[("outcome", o.label())]))
                }
                Counted::Greeting(code) => {
                    greetings.add(s.value, || l.with(&[("code", &code.to_string())]))
                }
                Counted::Throttled => throttled.add(s.value, || l.with(&[])),
            }
        }
        let mut text = Vec::new();
        events.write_counters(
            "smtpflow_peer_tcp_events_total",
            "SMTP-port TCP events per peer (--peer-label), for at most --max-peer-series peers: the recently active ones, each kept until idle for --peer-series-idle. Only ever increases while exported.",
            &mut text,
        );
        handshakes.write_counters(
            "smtpflow_peer_handshakes_total",
            "Handshake outcomes per peer, for the exported peers. Only ever increases while exported.",
            &mut text,
        );
        greetings.write_counters(
            "smtpflow_peer_smtp_greetings_total",
            "Greeting codes per peer, for the exported peers. Only ever increases while exported.",
            &mut text,
        );
        throttled.write_counters(
            "smtpflow_peer_throttled_sessions_total",
            "Sessions per peer with at least one throttling reply (421, or a 4xx rate or policy limit), for the exported peers. Only ever increases while exported.",
            &mut text,
        );

        let mut out = Vec::new();
        render_sites(&view.sites, &mut out);
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
            "Peers (labels, with --peer-label prefix) exported as per-peer series (at most --max-peer-series).",
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

/// The per-site series of a reading of the per-peer maps (zeros included: `unknown`, `other`
/// and each exported site have every handshake outcome and reset phase of the directions and
/// ports they were seen with).
fn render_sites(view: &SiteView, out: &mut Vec<MetricFamily>) {
    let mut handshakes = Family::new(
        "smtpflow_site_handshakes_total",
        MetricType::COUNTER,
        "Handshake outcomes per remote site (the registrable domain of the name the remote gave, or a --site-map site; unknown: no name yet), summed over interfaces, for at most --max-site-series sites; the rest in site=\"other\".",
    );
    let mut replies = Family::new(
        "smtpflow_site_smtp_replies_total",
        MetricType::COUNTER,
        "SMTP replies by code per remote site (greetings included, as smtpflow_smtp_replies_total).",
    );
    let mut resets = Family::new(
        "smtpflow_site_resets_total",
        MetricType::COUNTER,
        "RSTs (either side) per remote site, by the phase of their connection.",
    );
    for s in &view.series {
        let port = s.port.to_string();
        let base =
            [("direction", s.direction.label()), ("port", port.as_str()), ("site", &*s.site)];
        let v = s.value as f64;
        match s.counted {
            SiteCounted::Handshake(o) => {
                handshakes.add(&joined(&base, &[("outcome", o.label())]), v)
            }
            SiteCounted::Reply(code) => {
                replies.add(&joined(&base, &[("code", &code.to_string())]), v)
            }
            SiteCounted::Reset(p) => resets.add(&joined(&base, &[("phase", p.label())]), v),
        }
    }
    handshakes.finish(out);
    replies.finish(out);
    resets.finish(out);
    let mut g = Family::new(
        "smtpflow_sites_exported",
        MetricType::GAUGE,
        "Sites with their own smtpflow_site_* series (at most --max-site-series; unknown and other not counted).",
    );
    g.add(&[], view.exported as f64);
    g.finish(out);
    let mut g = Family::new(
        "smtpflow_site_names_remembered",
        MetricType::GAUGE,
        "Remote names (by address and direction) remembered for their site.",
    );
    g.add(&[], view.names as f64);
    g.finish(out);
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
        "The peers most involved in an active per-peer cause, with their site and their count in the window.",
    );
    for f in findings {
        active.add(&[("cause", f.cause.label())], if f.active { 1.0 } else { 0.0 });
        for (name, v) in &f.evidence {
            evidence.add(&[("cause", f.cause.label()), ("evidence", name)], *v);
        }
        if f.active {
            for ((p, n), site) in f.top_peers.iter().zip(&f.top_sites) {
                peers.add(
                    &[
                        ("cause", f.cause.label()),
                        ("iface", &p.iface),
                        ("peer", &p.peer),
                        ("site", site),
                    ],
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
    // The SMTP listeners only (--ports), so the series stay few.
    let mut length = Family::new(
        "smtpflow_listen_queue_length",
        MetricType::GAUGE,
        "Connections waiting to be accepted by each TCP listener on an SMTP port (sock_diag).",
    );
    let mut limit = Family::new(
        "smtpflow_listen_queue_limit",
        MetricType::GAUGE,
        "Accept queue limit (listen backlog) of each TCP listener on an SMTP port (sock_diag).",
    );
    for l in &snap.pressure.listeners {
        let (port, addr) = (l.port.to_string(), l.addr.to_string());
        let labels = [("port", port.as_str()), ("addr", addr.as_str())];
        length.add(&labels, f64::from(l.queue));
        limit.add(&labels, f64::from(l.limit));
    }
    length.finish(out);
    limit.finish(out);
}

#[cfg(test)]
mod tests;
