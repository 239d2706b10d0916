//! Rendering a [`Snapshot`] as Prometheus text. The drain loop renders once per interval; every
//! scrape in between is served the same bytes.
use std::collections::HashMap;

use bytes::Bytes;
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};
use smtpflow_common::{Direction, Event, PeerCounters, PeerKey, Side, Stat};

use crate::{attach::Attachment, drain::Snapshot};

/// What the exporter knows besides the snapshot.
pub struct Exporter {
    ifnames: HashMap<u32, String>,
    max_peer_series: usize,
    attachments: Vec<Attachment>,
}

/// A metric family under construction.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            metrics: Vec::new(),
        }
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels = labels
            .iter()
            .map(|(n, v)| {
                let mut l = LabelPair::default();
                l.set_name((*n).to_owned());
                l.set_value((*v).to_owned());
                l
            })
            .collect();
        let mut m = Metric::from_label(labels);
        match self.kind {
            MetricType::GAUGE => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
            _ => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
        }
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

/// A peer as the series cap counts them: one address on one interface.
type PeerId = (u32, u8, [u8; 16]);

fn peer_id(k: &PeerKey) -> PeerId {
    (k.ifindex, k.family, k.addr)
}

/// The `limit` most active peers (by all their events), ties broken by address for stability.
pub fn top_peers(peers: &[(PeerKey, PeerCounters)], limit: usize) -> HashMap<PeerId, u64> {
    let mut activity: HashMap<PeerId, u64> = HashMap::new();
    for (k, v) in peers {
        *activity.entry(peer_id(k)).or_default() += v.total();
    }
    if activity.len() <= limit {
        return activity;
    }
    let mut ranked: Vec<(PeerId, u64)> = activity.into_iter().collect();
    ranked.select_nth_unstable_by(limit, |a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(limit);
    ranked.into_iter().collect()
}

impl Exporter {
    pub fn new(
        ifnames: HashMap<u32, String>,
        max_peer_series: usize,
        attachments: Vec<Attachment>,
    ) -> Self {
        Self {
            ifnames,
            max_peer_series,
            attachments,
        }
    }

    fn ifname(&self, ifindex: u32) -> String {
        self.ifnames
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("ifindex{ifindex}"))
    }

    pub fn render(&self, snap: &Snapshot) -> Bytes {
        let mut families = Vec::new();

        let mut info = Family::new(
            "smtpflow_build_info",
            MetricType::GAUGE,
            "smtpflow build information; always 1.",
        );
        info.add(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        info.finish(&mut families);

        let mut att = Family::new(
            "smtpflow_attachment_info",
            MetricType::GAUGE,
            "Kernel programs attached, by interface, hook and attach method; always 1.",
        );
        for a in &self.attachments {
            att.add(
                &[("iface", &a.iface), ("hook", a.hook), ("method", a.how)],
                1.0,
            );
        }
        att.finish(&mut families);

        let mut events = Family::new(
            "smtpflow_tcp_events_total",
            MetricType::COUNTER,
            "SMTP-port TCP events seen, exact over all peers.",
        );
        for (k, v) in &snap.totals {
            let (Some(e), Some(d), Some(s)) = (
                Event::from_u8(k.event),
                Direction::from_u8(k.direction),
                Side::from_u8(k.side),
            ) else {
                continue;
            };
            let iface = self.ifname(k.ifindex);
            let port = k.port.to_string();
            events.add(
                &[
                    ("iface", &iface),
                    ("direction", d.label()),
                    ("port", &port),
                    ("event", e.label()),
                    ("side", s.label()),
                ],
                *v as f64,
            );
        }
        events.finish(&mut families);

        let selected = top_peers(&snap.peers, self.max_peer_series);
        let mut per_peer = Family::new(
            "smtpflow_peer_tcp_events_total",
            MetricType::COUNTER,
            "SMTP-port TCP events per peer, for the most active peers (--max-peer-series) still in \
             the kernel's per-peer LRU map.",
        );
        let mut peers_sorted: Vec<&(PeerKey, PeerCounters)> = snap
            .peers
            .iter()
            .filter(|(k, _)| selected.contains_key(&peer_id(k)))
            .collect();
        peers_sorted.sort_by_key(|(k, _)| *k);
        for (k, v) in peers_sorted {
            let (Some(ip), Some(d)) = (k.ip(), Direction::from_u8(k.direction)) else {
                continue;
            };
            let iface = self.ifname(k.ifindex);
            let peer = ip.to_string();
            let port = k.port.to_string();
            for e in Event::ALL {
                for s in Side::ALL {
                    let n = v.counts[PeerCounters::index(e, s)];
                    if n != 0 {
                        per_peer.add(
                            &[
                                ("iface", &iface),
                                ("peer", &peer),
                                ("direction", d.label()),
                                ("port", &port),
                                ("event", e.label()),
                                ("side", s.label()),
                            ],
                            n as f64,
                        );
                    }
                }
            }
        }
        per_peer.finish(&mut families);

        let peers_tracked = snap
            .peers
            .iter()
            .map(|(k, _)| peer_id(k))
            .collect::<std::collections::HashSet<_>>()
            .len();
        let mut g = Family::new(
            "smtpflow_peers_tracked",
            MetricType::GAUGE,
            "Distinct peers (address and interface) in the kernel's per-peer map.",
        );
        g.add(&[], peers_tracked as f64);
        g.finish(&mut families);
        let mut g = Family::new(
            "smtpflow_peers_exported",
            MetricType::GAUGE,
            "Peers exported as per-peer series (at most --max-peer-series).",
        );
        g.add(&[], selected.len() as f64);
        g.finish(&mut families);

        let mut entries = Family::new(
            "smtpflow_map_entries",
            MetricType::GAUGE,
            "Entries in a kernel map.",
        );
        entries.add(&[("map", "peers")], snap.peers.len() as f64);
        entries.add(&[("map", "totals")], snap.totals.len() as f64);
        entries.finish(&mut families);
        let mut cap = Family::new(
            "smtpflow_map_capacity",
            MetricType::GAUGE,
            "Capacity (max entries) of a kernel map.",
        );
        cap.add(&[("map", "peers")], f64::from(snap.peers_capacity));
        cap.add(
            &[("map", "totals")],
            f64::from(smtpflow_common::TOTALS_CAPACITY),
        );
        cap.finish(&mut families);
        let mut ev = Family::new(
            "smtpflow_map_evictions_total",
            MetricType::COUNTER,
            "Entries evicted from a kernel LRU map (their events stay in the totals).",
        );
        ev.add(&[("map", "peers")], snap.peer_evictions as f64);
        ev.finish(&mut families);

        for (stat, name, help) in [
            (
                Stat::Malformed,
                "smtpflow_malformed_packets_total",
                "Frames with malformed IPv4, IPv6 or TCP headers; never counted as events.",
            ),
            (
                Stat::PeerInsertFailed,
                "smtpflow_peer_insert_failures_total",
                "Events whose peer entry could not be created (counted in the totals only).",
            ),
            (
                Stat::TotalsInsertFailed,
                "smtpflow_lost_events_total",
                "Events the kernel could not count at all; non-zero is a bug, please report it.",
            ),
        ] {
            let mut f = Family::new(name, MetricType::COUNTER, help);
            f.add(&[], snap.stats[stat as usize] as f64);
            f.finish(&mut families);
        }

        let mut d = Family::new(
            "smtpflow_drain_duration_seconds",
            MetricType::GAUGE,
            "Time the last drain of the kernel maps took.",
        );
        d.add(&[], snap.drain_seconds);
        d.finish(&mut families);

        let mut buf = Vec::with_capacity(64 * 1024);
        // Encoding only fails for empty families, which `finish` never emits.
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            log::error!("encoding metrics failed: {e}");
        }
        Bytes::from(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtpflow_common::{FAMILY_V4, FAMILY_V6, TotalKey};

    fn peer(last: u8, family: u8, direction: Direction) -> PeerKey {
        let mut addr = [0u8; 16];
        if family == FAMILY_V4 {
            addr[..4].copy_from_slice(&[198, 51, 100, last]);
        } else {
            addr[0] = 0x20;
            addr[1] = 0x01;
            addr[15] = last;
        }
        PeerKey {
            ifindex: 2,
            addr,
            port: 25,
            family,
            direction: direction as u8,
        }
    }

    fn counters(syn: u64) -> PeerCounters {
        let mut c = PeerCounters::default();
        c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = syn;
        c
    }

    #[test]
    fn renders_exact_totals_and_capped_peers() {
        let mut snap = Snapshot::default();
        snap.totals.insert(
            TotalKey::new(2, 25, Event::Syn, Direction::Inbound, Side::Peer),
            7,
        );
        snap.totals.insert(
            TotalKey::new(2, 25, Event::SynAck, Direction::Inbound, Side::Local),
            5,
        );
        snap.peers = (1..=5)
            .map(|i| {
                (
                    peer(i, FAMILY_V4, Direction::Inbound),
                    counters(u64::from(i)),
                )
            })
            .collect();
        snap.peers
            .push((peer(9, FAMILY_V6, Direction::Outbound), counters(100)));
        snap.peers_capacity = 65536;
        let ex = Exporter::new(HashMap::from([(2, "eth0".to_owned())]), 3, Vec::new());
        let text = String::from_utf8(ex.render(&snap).to_vec()).unwrap();
        assert!(text.contains(r#"smtpflow_tcp_events_total{iface="eth0",direction="inbound",port="25",event="syn",side="peer"} 7"#), "{text}");
        assert!(text.contains(r#"event="syn_ack",side="local"} 5"#));
        // The three most active peers: 2001::9 (100), .5 and .4.
        assert!(text.contains(r#"smtpflow_peer_tcp_events_total{iface="eth0",peer="2001::9",direction="outbound",port="25",event="syn",side="peer"} 100"#), "{text}");
        assert!(text.contains(r#"peer="198.51.100.5""#));
        assert!(text.contains(r#"peer="198.51.100.4""#));
        assert!(!text.contains(r#"peer="198.51.100.3""#));
        assert!(text.contains("smtpflow_peers_tracked 6"));
        assert!(text.contains("smtpflow_peers_exported 3"));
        assert!(text.contains(r#"smtpflow_build_info{version="#));
    }

    #[test]
    fn top_peers_is_deterministic_under_ties() {
        let peers: Vec<_> = (1..=10)
            .map(|i| (peer(i, FAMILY_V4, Direction::Inbound), counters(1)))
            .collect();
        let a = top_peers(&peers, 4);
        let b = top_peers(&peers, 4);
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        assert!(top_peers(&peers, 0).is_empty());
    }
}
