//! What a person sees on stderr: a status line every few seconds (when stderr is not a terminal,
//! or logs are JSON), or a live table refreshed in place on a terminal.
use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use smtpflow_common::{Counter, Direction, Outcome, Stat};

use super::peer_label::PeerLabel;
use crate::{
    diagnose::Finding,
    drain::{Snapshot, peers::Figure},
};

/// Events summed by (direction, port).
type ByDirectionPort = BTreeMap<(Direction, u16), u64>;

pub struct Reporter {
    last: Option<(Instant, ByDirectionPort)>,
    /// `--peer-label`: peers are shown as the exported series and the logs name them.
    labeler: PeerLabel,
}

fn by_direction_port(snap: &Snapshot) -> ByDirectionPort {
    let mut out = BTreeMap::new();
    for (scope, _, _, v) in snap.events() {
        *out.entry((scope.direction, scope.port)).or_default() += v;
    }
    out
}

/// How many peers the live view lists.
const TOP_PEERS: usize = 5;

impl Reporter {
    pub fn new(labeler: PeerLabel) -> Self {
        Self { last: None, labeler }
    }

    /// Events per second by direction and port since the previous call (`None` the first time).
    fn rates(&mut self, snap: &Snapshot, now: Instant) -> Option<Vec<((Direction, u16), f64)>> {
        let current = by_direction_port(snap);
        let rates = self.last.as_ref().map(|(then, before)| {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            current
                .iter()
                .map(|(k, v)| {
                    (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0)) as f64 / secs)
                })
                .collect()
        });
        self.last = Some((now, current));
        rates
    }

    /// One line: events per second by direction and port, peers tracked.
    pub fn line(&mut self, snap: &Snapshot, now: Instant) -> Option<String> {
        let rates = self.rates(snap, now)?;
        let sum: f64 = rates.iter().map(|(_, r)| r).sum();
        let parts: Vec<String> = rates
            .iter()
            .filter(|(_, r)| *r > 0.0)
            .map(|((d, port), r)| format!("{} {port}: {r:.1}/s", d.label()))
            .collect();
        let detail =
            if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) };
        Some(format!(
            "smtpflow: {sum:.1} events/s{detail}; {} peer entries of {}, {} evicted, {} malformed",
            snap.peers.entries,
            snap.peers_capacity,
            snap.peer_evictions,
            snap.stats[Stat::Malformed as usize],
        ))
    }

    /// The live view: rates, handshake outcomes, top peers by failures and by open
    /// connections, the diagnosis.
    pub fn table(
        &mut self,
        snap: &Snapshot,
        findings: &[Finding],
        ifaces: &str,
        now: Instant,
    ) -> String {
        let mut out = format!("smtpflow on {ifaces}  (Ctrl-C to stop)\n\nEVENTS/S\n");
        for ((d, port), r) in self.rates(snap, now).unwrap_or_default() {
            let _ = writeln!(out, "  {:<9} {port:<6} {r:>10.1}", d.label());
        }
        out.push_str(
            "\nHANDSHAKES SINCE START   established     refused     timeout unreachable\n",
        );
        let mut outcomes: BTreeMap<(Direction, u16), [u64; Outcome::COUNT]> = BTreeMap::new();
        for ((scope, counter), v) in &snap.counters {
            if let Counter::Handshake(o) = counter {
                outcomes.entry((scope.direction, scope.port)).or_default()[*o as usize] += v;
            }
        }
        for (scope, n) in &snap.timeouts {
            outcomes.entry((scope.direction, scope.port)).or_default()
                [Outcome::Timeout as usize] += n;
        }
        for ((d, port), [e, r, t, u]) in &outcomes {
            let label = d.label();
            let _ = writeln!(out, "  {label:<9} {port:<6} {e:>17} {r:>11} {t:>11} {u:>11}");
        }
        out.push_str("\nTOP PEERS BY FAILED HANDSHAKES\n");
        // From the largest refused, timed-out and unreachable counts of the last per-peer
        // reading, summed by label (with --peer-label prefix, the peers of one network are one
        // line).
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for figure in [Figure::Refused, Figure::Timeouts, Figure::OutboundUnreachable] {
            for (k, n) in snap.peers.figure(figure) {
                *failures.entry(self.peer_name(k)).or_default() += n;
            }
        }
        let mut ranked: Vec<(String, u64)> = failures.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if ranked.is_empty() {
            out.push_str("  none\n");
        }
        for (peer, n) in ranked.into_iter().take(TOP_PEERS) {
            let _ = writeln!(out, "  {peer:<40} {n:>8}");
        }
        out.push_str("\nTOP PEERS BY OPEN CONNECTIONS\n");
        // From this drain's listing of the flow map, summed by label.
        let mut open: BTreeMap<String, u64> = BTreeMap::new();
        for (k, n) in &snap.open_by_peer {
            *open.entry(self.peer_name(k)).or_default() += n;
        }
        let mut ranked: Vec<(String, u64)> = open.into_iter().filter(|(_, n)| *n > 0).collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if ranked.is_empty() {
            out.push_str("  none\n");
        }
        for (peer, n) in ranked.into_iter().take(TOP_PEERS) {
            let _ = writeln!(out, "  {peer:<40} {n:>8}");
        }
        out.push_str("\nDIAGNOSIS\n");
        let active: Vec<&Finding> = findings.iter().filter(|f| f.active).collect();
        if active.is_empty() {
            out.push_str("  healthy: no cause active\n");
        }
        for f in active {
            let _ = writeln!(out, "  ACTIVE {}: {}", f.cause.label(), f.summary);
        }
        out
    }
}

impl Reporter {
    /// A peer entry as the live view lists it: its `--peer-label`, direction and port.
    fn peer_name(&self, k: &smtpflow_common::PeerKey) -> String {
        let peer = k.ip().map(|ip| self.labeler.label(ip)).unwrap_or_default();
        let d = Direction::from_repr(k.direction).map_or("?", Direction::label);
        format!("{peer} {d} {}", k.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtpflow_common::{Event, PeerCounters, PeerKey, Scope, Side};

    #[test]
    fn line_and_table_show_rates_outcomes_and_peers() {
        let mut snap = Snapshot::default();
        let inbound = Scope { ifindex: 2, port: 25, direction: Direction::Inbound };
        let outbound = Scope { direction: Direction::Outbound, ..inbound };
        snap.counters.insert((inbound, Counter::Event(Event::Syn, Side::Peer)), 0);
        let mut r = Reporter::new(PeerLabel::Ip);
        let t0 = Instant::now();
        assert!(r.line(&snap, t0).is_none(), "no rate before a second reading");
        snap.counters.insert((inbound, Counter::Event(Event::Syn, Side::Peer)), 10);
        snap.counters.insert((outbound, Counter::Handshake(Outcome::Refused)), 4);
        snap.counters.insert((outbound, Counter::Handshake(Outcome::Unreachable)), 3);
        let peer = PeerKey {
            ifindex: 2,
            addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 25,
            family: 4,
            direction: 1,
        };
        let mut c = PeerCounters::default();
        c.outcomes[Outcome::Refused as usize] = 3;
        c.outcomes[Outcome::Unreachable as usize] = 1;
        snap.peers = std::sync::Arc::new(crate::drain::peers::PeerReader::new(10).view_of(
            &[(peer, c)],
            &[],
            &[],
        ));
        let line = r.line(&snap, t0 + std::time::Duration::from_secs(2)).unwrap();
        assert!(line.starts_with("smtpflow: 5.0 events/s (inbound 25: 5.0/s)"), "{line}");
        let table = r.table(&snap, &[], "eth0", t0 + std::time::Duration::from_secs(4));
        assert!(table.contains("192.0.2.1 outbound 25"), "{table}");
        // With --peer-label, the live view shows no address, and sums a network's peers.
        let mut other = peer;
        other.addr[3] = 9;
        snap.peers = std::sync::Arc::new(crate::drain::peers::PeerReader::new(10).view_of(
            &[(peer, c), (other, c)],
            &[],
            &[],
        ));
        let mut r = Reporter::new(PeerLabel::Prefix { v4: 24, v6: 64 });
        let table = r.table(&snap, &[], "eth0", t0);
        assert!(table.contains("192.0.2.0/24 outbound 25"), "{table}");
        assert!(table.contains("       8\n"), "summed: {table}");
        assert!(!table.contains("192.0.2.1"), "{table}");
        let mut r = Reporter::new(PeerLabel::Hash { key: b"k".to_vec() });
        let table = r.table(&snap, &[], "eth0", t0);
        assert!(!table.contains("192.0.2."), "{table}");
        assert!(table.contains("h:"), "{table}");
        assert!(table.contains("healthy: no cause active"));
        assert!(table.contains("TOP PEERS BY OPEN CONNECTIONS\n  none\n"), "{table}");
        // Open connections, summed by label, the most first.
        snap.open_by_peer.insert(peer, 2);
        snap.open_by_peer.insert(other, 1);
        let mut third = peer;
        third.addr[2] = 7;
        snap.open_by_peer.insert(third, 1);
        let mut r = Reporter::new(PeerLabel::Prefix { v4: 24, v6: 64 });
        let table = r.table(&snap, &[], "eth0", t0);
        let open = table.split("TOP PEERS BY OPEN CONNECTIONS\n").nth(1).unwrap();
        assert!(
            open.starts_with(&format!(
                "  {:<40} {:>8}\n  {:<40} {:>8}\n",
                "192.0.2.0/24 outbound 25", 3, "192.0.7.0/24 outbound 25", 1
            )),
            "{table}"
        );
        assert!(
            table
                .contains("outbound  25                     0           4           0           3"),
            "{table}"
        );
    }
}
