//! What the diagnosis reads of a drained snapshot: the cumulative totals its causes are decided
//! from ([`Reading`]), the per-peer figures that name the peers, and the pressure signals. The
//! diagnosis itself sees only readings.
use smtpflow_common::{Counter, Direction, Event, Outcome, PeerKey, Side};

use crate::{
    diagnose::{Cause, PeerName, Reading},
    drain::{Snapshot, peers::Figure},
    host::pressure::Pressure,
    kernel::drop_reasons::DropReasons,
    output::peer_label::PeerLabel,
};

/// The per-peer causes, and the per-peer figure each names its peers by.
const PER_PEER_FIGURES: [(Cause, Figure); 5] = [
    (Cause::LocalReceiveStall, Figure::ZeroWindowsSent),
    (Cause::PeerReceiveStall, Figure::ZeroWindowsReceived),
    (Cause::RemoteRefusing, Figure::OutboundRefused),
    (Cause::RemoteUnreachable, Figure::OutboundTimeouts),
    (Cause::RemoteThrottling, Figure::Outbound4xxGreetings),
];

fn is_4xx(code: u16) -> bool {
    (400..500).contains(&code)
}

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
            Counter::Handshake(Outcome::Refused) if !inbound => r.outbound_refused += v,
            Counter::Reply(code) if !inbound && is_4xx(code) => r.outbound_4xx_replies += v,
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
    // The per-peer figures of the last reading of the per-peer maps: the largest nonzero
    // ones only (`peers::FIGURE_KEEP` per cause). Past that many peers with a nonzero
    // figure, a peer whose count starts rising late in the window may go unnamed.
    for (cause, figure) in PER_PEER_FIGURES {
        for (k, n) in snap.peers.figure(figure) {
            *r.peers.entry((cause, peer_name(k))).or_default() += n;
        }
    }
    add_pressure(&mut r, &snap.pressure);
    r
}

fn add_pressure(r: &mut Reading, p: &Pressure) {
    if let Some(ct) = &p.conntrack {
        r.conntrack = Some((ct.entries, ct.limit));
        r.conntrack_drops = ["drop", "early_drop", "insert_failed"]
            .iter()
            .map(|s| ct.stats.get(s).copied().unwrap_or(0))
            .sum();
    }
    r.listen_overflows = p.tcp.get("ListenOverflows").copied().unwrap_or(0);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use smtpflow_common::{PeerCounters, PeerGreetingKey};

    use super::*;

    #[test]
    fn readings_name_peers_from_the_per_peer_figures() {
        let key = |last: u8, direction: Direction| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&[192, 0, 2, last]);
            PeerKey { ifindex: 2, addr, port: 25, family: 4, direction: direction as u8 }
        };
        let (out, inb) = (key(7, Direction::Outbound), key(8, Direction::Inbound));
        let mut refused = PeerCounters::default();
        refused.outcomes[Outcome::Refused as usize] = 2;
        refused.counts[PeerCounters::index(Event::ZeroWindow, Side::Peer)] = 11;
        let greeting = PeerGreetingKey { peer: out, code: 421, _pad: [0; 2] };
        let view = crate::drain::peers::PeerReader::new(0).view_of(
            &[(out, refused), (inb, refused)],
            &[(out, 3), (inb, 5)],
            &[(greeting, 4)],
        );
        let snap = Snapshot { peers: std::sync::Arc::new(view), ..Default::default() };
        let r = of_snapshot(&snap, None, &PeerLabel::Ip, |_| "eth0".to_owned());
        let name = |p: &str| PeerName { iface: "eth0".into(), peer: p.into() };
        let want = BTreeMap::from([
            ((Cause::RemoteThrottling, name("192.0.2.7")), 4),
            ((Cause::RemoteUnreachable, name("192.0.2.7")), 3),
            ((Cause::RemoteRefusing, name("192.0.2.7")), 2),
            ((Cause::PeerReceiveStall, name("192.0.2.7")), 11),
            ((Cause::PeerReceiveStall, name("192.0.2.8")), 11),
        ]);
        assert_eq!(r.peers, want, "outbound causes name outbound peers only");
    }
}
