//! What the diagnosis reads of a drained snapshot: the cumulative totals its causes are decided
//! from ([`Reading`]), each peer's own counts (from the per-peer figures), and the pressure
//! signals (conntrack, ListenOverflows, the SMTP listeners' accept queues). The diagnosis itself
//! sees only readings.
use smtpflow_common::{Counter, Direction, Event, Outcome, PeerKey, Side};

use crate::{
    diagnose::{PeerCounts, PeerName, Reading},
    drain::{Snapshot, peers::Figure},
    host::pressure::Pressure,
    kernel::drop_reasons::DropReasons,
    output::peer_label::PeerLabel,
};

/// The count of [`PeerCounts`] a per-peer figure fills.
type Field = fn(&mut PeerCounts) -> &mut u64;

/// The per-peer figures the causes read, and the count of [`PeerCounts`] each fills.
const PER_PEER_FIGURES: [(Figure, Field); 7] = [
    (Figure::OutboundEstablished, |p| &mut p.established),
    (Figure::OutboundRefused, |p| &mut p.refused),
    (Figure::OutboundTimeouts, |p| &mut p.timeouts),
    (Figure::OutboundUnreachable, |p| &mut p.unreachable),
    (Figure::OutboundThrottled, |p| &mut p.throttled),
    (Figure::ZeroWindowsSent, |p| &mut p.zero_windows_sent),
    (Figure::ZeroWindowsReceived, |p| &mut p.zero_windows_received),
];

/// Takes what the causes need from a drained snapshot and the pressure signals.
pub fn of_snapshot(
    snap: &Snapshot,
    reasons: Option<&DropReasons>,
    labeler: &PeerLabel,
    ifname: impl Fn(u32) -> String,
) -> Reading {
    let mut r = Reading::default();
    let reason = |code: u16| reasons.map(|n| n.name(code)).unwrap_or_default();
    for (&(scope, counter), &v) in &snap.counters {
        let inbound = scope.direction == Direction::Inbound;
        match counter {
            Counter::Event(Event::ZeroWindow, Side::Local) => r.zero_windows_local += v,
            Counter::Event(Event::ZeroWindow, Side::Peer) => r.zero_windows_peer += v,
            Counter::Handshake(Outcome::Established) if inbound => r.inbound_established += v,
            Counter::Handshake(Outcome::Established) => r.outbound_established += v,
            Counter::Handshake(Outcome::Refused) if inbound => r.inbound_refused += v,
            Counter::Handshake(Outcome::Refused) => r.outbound_refused += v,
            Counter::Handshake(Outcome::Unreachable) if !inbound => r.outbound_unreachable += v,
            Counter::Throttled if !inbound => r.outbound_throttled += v,
            Counter::SynDrop(code) => {
                let name = reason(code);
                if inbound && name == "NETFILTER_DROP" {
                    r.inbound_netfilter_drops += v;
                }
                if name.contains("LISTEN_OVERFLOW") {
                    r.listen_overflow_drops += v;
                }
            }
            _ => {}
        }
    }
    for (scope, n) in &snap.timeouts {
        match scope.direction {
            Direction::Inbound => r.inbound_timeouts += n,
            Direction::Outbound => r.outbound_timeouts += n,
        }
    }
    let peer_name = |k: &PeerKey| PeerName {
        iface: ifname(k.ifindex),
        peer: k.ip().map(|ip| labeler.label(ip)).unwrap_or_default(),
    };
    // The per-peer figures of the last reading of the per-peer maps: the largest nonzero ones
    // only (`peers::FIGURE_KEEP` per figure), summed over a peer's entries (ports; a label's
    // members with --peer-label prefix or hash). Past that many peers with a nonzero figure,
    // a peer outside them reads 0 there: a failing peer is still seen while it is among the
    // FIGURE_KEEP largest of that failure, and its established sessions are 0 if it is not
    // among the FIGURE_KEEP busiest by lifetime sessions (its share then reads higher than it
    // is). Reading them as the least kept value instead would hide an MX that refuses
    // everything on a relay with more busy peers; a peer outside the busiest with 90 sessions
    // in the window, which that error needs, is rare.
    for (figure, field) in PER_PEER_FIGURES {
        for (k, n) in snap.peers.figure(figure) {
            let name = peer_name(k);
            // A peer's site as a server (outbound) first: the per-peer causes are outbound.
            let site = snap.peers.sites.site_of(k);
            if site != crate::sites::map::UNKNOWN
                && (k.direction == Direction::Outbound as u8 || !r.sites.contains_key(&name))
            {
                r.sites.insert(name.clone(), site.to_owned());
            }
            *field(r.peers.entry(name).or_default()) += n;
        }
    }
    add_pressure(&mut r, &snap.pressure);
    r
}

fn add_pressure(r: &mut Reading, p: &Pressure) {
    if let Some(ct) = &p.conntrack {
        r.conntrack = Some((ct.entries, ct.limit));
        // Only `drop` is conntrack refusing new entries on a full table; `early_drop` (an old
        // entry evicted to make room) and `insert_failed` (a race, e.g. parallel UDP DNS
        // queries) happen on healthy hosts.
        r.conntrack_drops = ct.stats.get("drop").copied().unwrap_or(0);
    }
    r.listen_overflows = p.tcp.get("ListenOverflows").copied().unwrap_or(0);
    r.full_listeners = p.listeners.iter().filter(|l| l.is_full()).map(|l| l.endpoint()).collect();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use smtpflow_common::{PeerCounters, PeerGreetingKey};

    use super::*;
    use crate::host::pressure::{Conntrack, sock_diag::Listener};

    fn key(last: u8, direction: Direction) -> PeerKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, last]);
        PeerKey { ifindex: 2, addr, port: 25, family: 4, direction: direction as u8 }
    }

    fn name(p: &str) -> PeerName {
        PeerName { iface: "eth0".into(), peer: p.into() }
    }

    #[test]
    fn each_peer_gets_its_own_counts() {
        let (out, inb) = (key(7, Direction::Outbound), key(8, Direction::Inbound));
        let mut c = PeerCounters::default();
        c.outcomes[Outcome::Established as usize] = 40;
        c.outcomes[Outcome::Refused as usize] = 2;
        c.outcomes[Outcome::Unreachable as usize] = 5;
        c.counts[PeerCounters::index(Event::ZeroWindow, Side::Peer)] = 11;
        c.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] = 1;
        c.throttled = 4;
        let greeting = |code| PeerGreetingKey::greeting(out, code);
        let view = crate::drain::peers::PeerReader::new(0).view_of(
            &[(out, c), (inb, c)],
            &[(out, 3), (inb, 5)],
            // Throttled sessions come from the kernel's count, not from greeting codes.
            &[(greeting(421), 6), (greeting(450), 9)],
        );
        let snap = Snapshot { peers: std::sync::Arc::new(view), ..Default::default() };
        let r = of_snapshot(&snap, None, &PeerLabel::Ip, |_| "eth0".to_owned());
        let want = BTreeMap::from([
            (
                name("192.0.2.7"),
                PeerCounts {
                    established: 40,
                    refused: 2,
                    timeouts: 3,
                    unreachable: 5,
                    throttled: 4,
                    zero_windows_sent: 1,
                    zero_windows_received: 11,
                },
            ),
            // Inbound: zero windows only (the failure causes are about our handshakes).
            (
                name("192.0.2.8"),
                PeerCounts {
                    zero_windows_sent: 1,
                    zero_windows_received: 11,
                    ..Default::default()
                },
            ),
        ]);
        assert_eq!(r.peers, want);
    }

    /// Conntrack's `drop` is its table-full drop; `early_drop` and `insert_failed` are not
    /// pressure. A full SMTP listener is named; a listener with room is not.
    #[test]
    fn pressure_signals() {
        let pressure = Pressure {
            conntrack: Some(Conntrack {
                entries: 10,
                limit: 100,
                stats: BTreeMap::from([("drop", 2), ("early_drop", 50), ("insert_failed", 70)]),
                source: None,
            }),
            tcp: BTreeMap::from([("ListenOverflows", 33)]),
            listeners: vec![
                Listener { addr: "0.0.0.0".parse().unwrap(), port: 25, queue: 5, limit: 128 },
                Listener { addr: "::".parse().unwrap(), port: 587, queue: 129, limit: 128 },
            ],
        };
        let snap = Snapshot { pressure, ..Default::default() };
        let r = of_snapshot(&snap, None, &PeerLabel::Ip, |_| "eth0".to_owned());
        assert_eq!((r.conntrack, r.conntrack_drops, r.listen_overflows), (Some((10, 100)), 2, 33));
        assert_eq!(r.full_listeners, ["[::]:587"]);
    }
}
