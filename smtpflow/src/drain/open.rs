//! Open connections: the flows the sweep's listing shows established and not ended, by scope
//! and by peer. A gauge, read again at every drain from the flow map the sweep lists anyway
//! (no other listing, no kernel counter to keep in step with closes and evictions).
//!
//! What the flow map can show is what the observation point sees: in XDP mode only ingress, so
//! an inbound connection is open from the client's ACK to the client's FIN or RST, and an
//! outbound one from the server's SYN-ACK to its FIN or RST (the local host's own FIN is not
//! seen). A flow overwritten in the flow table, or idle, is no longer counted.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use smtpflow_common::{Direction, FlowKey, FlowState, PeerKey, Scope, flow::state};

use super::{
    flow_peer,
    peers::{PeerView, series::LabelId},
};
use crate::output::peer_label::PeerLabel;

/// Whether a flow is an open connection ([`state::is_open`]: its handshake completed and it
/// has not ended; a flow kept after its end for the sweep is [`state::CLOSED`]).
pub fn is_open(st: &FlowState) -> bool {
    state::is_open(st.state)
}

/// The open connections of one listing of the flow map.
#[derive(Debug, Default, Clone)]
pub struct OpenConnections {
    /// By scope; every watched scope is present (0 when none is open).
    pub by_scope: BTreeMap<Scope, u64>,
    /// By per-peer entry, only entries with an open connection.
    pub by_peer: HashMap<PeerKey, u64>,
}

/// One `smtpflow_peer_open_connections` series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenPeer {
    pub ifindex: u32,
    /// The `peer` label, as `--peer-label` writes it.
    pub peer: Arc<str>,
    pub direction: Direction,
    pub port: u16,
    pub open: u64,
}

impl OpenConnections {
    /// A watched scope: reported from now on, 0 when nothing is open.
    pub fn watch(&mut self, scope: Scope) {
        self.by_scope.entry(scope).or_default();
    }

    /// Starts a listing: every count back to 0 (the watched scopes stay).
    pub fn start(&mut self) {
        self.by_scope.values_mut().for_each(|n| *n = 0);
        self.by_peer.clear();
    }

    /// One flow of the listing.
    pub fn entry(&mut self, key: &FlowKey, st: &FlowState) {
        if !is_open(st) {
            return;
        }
        let Some(direction) = Direction::from_repr(key.direction) else { return };
        let scope = Scope { ifindex: key.ifindex, port: key.server_port, direction };
        *self.by_scope.entry(scope).or_default() += 1;
        *self.by_peer.entry(flow_peer(key)).or_default() += 1;
    }

    /// The per-peer gauge for the labels `view` exports: one series per exported label,
    /// direction and port that has per-peer series (0 when nothing is open), plus any other
    /// direction and port where an exported label has open connections. Peers whose label is
    /// not exported are left out, so there are never more series than `--max-peer-series`
    /// labels have (bounded like the other per-peer series).
    pub fn peer_series(&self, view: &PeerView, labeler: &PeerLabel) -> Vec<OpenPeer> {
        let mut out: BTreeMap<(u32, Arc<str>, Direction, u16), u64> = BTreeMap::new();
        for s in &view.series {
            out.entry((s.ifindex, s.peer.clone(), s.direction, s.port)).or_default();
        }
        if !view.exported_labels.is_empty() {
            for (k, n) in &self.by_peer {
                let id = LabelId {
                    ifindex: k.ifindex,
                    family: k.family,
                    addr: labeler.group(k.family, &k.addr),
                };
                let (Some(peer), Some(direction)) =
                    (view.exported_labels.get(&id), Direction::from_repr(k.direction))
                else {
                    continue;
                };
                *out.entry((k.ifindex, peer.clone(), direction, k.port)).or_default() += n;
            }
        }
        out.into_iter()
            .map(|((ifindex, peer, direction, port), open)| OpenPeer {
                ifindex,
                peer,
                direction,
                port,
                open,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use smtpflow_common::{FAMILY_V4, PeerCounters, flow::state};

    use super::*;
    use crate::drain::peers::PeerReader;

    fn key(client: u8, server: u8, client_port: u16, direction: Direction) -> FlowKey {
        FlowKey {
            ifindex: 2,
            client: [10, 0, 0, client, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server: [10, 0, 1, server, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port,
            server_port: 25,
            family: FAMILY_V4,
            direction: direction as u8,
            _pad: [0; 2],
        }
    }

    fn in_state(s: u8) -> FlowState {
        FlowState { state: s, ..FlowState::default() }
    }

    #[test]
    fn established_and_greeted_flows_are_open_by_scope_and_peer() {
        let mut open = OpenConnections::default();
        let inbound = Scope { ifindex: 2, port: 25, direction: Direction::Inbound };
        let outbound = Scope { direction: Direction::Outbound, ..inbound };
        let idle_scope = Scope { port: 587, ..inbound };
        for s in [inbound, outbound, idle_scope] {
            open.watch(s);
        }
        open.start();
        open.entry(&key(1, 9, 40000, Direction::Inbound), &in_state(state::ESTABLISHED));
        open.entry(&key(1, 9, 40001, Direction::Inbound), &in_state(state::GREETED));
        open.entry(&key(2, 9, 40002, Direction::Inbound), &in_state(state::SYN_SENT));
        // Ended, kept for the sweep (a state after GREETED): not open.
        open.entry(&key(2, 9, 40003, Direction::Inbound), &in_state(state::CLOSED));
        open.entry(&key(2, 9, 40004, Direction::Inbound), &in_state(0));
        open.entry(&key(3, 7, 40005, Direction::Outbound), &in_state(state::GREETED));
        assert_eq!(open.by_scope[&inbound], 2);
        assert_eq!(open.by_scope[&outbound], 1);
        assert_eq!(open.by_scope[&idle_scope], 0, "a watched scope reads 0");
        let client = flow_peer(&key(1, 9, 0, Direction::Inbound));
        assert_eq!(client.addr[3], 1, "inbound: the client");
        assert_eq!(open.by_peer[&client], 2);
        let server = flow_peer(&key(3, 7, 0, Direction::Outbound));
        assert_eq!((server.addr[2], server.addr[3]), (1, 7), "outbound: the server");
        assert_eq!(open.by_peer[&server], 1);
        assert_eq!(open.by_peer.len(), 2);
        // The next listing starts again: a gauge.
        open.start();
        open.entry(&key(1, 9, 40000, Direction::Inbound), &in_state(state::GREETED));
        assert_eq!((open.by_scope[&inbound], open.by_scope[&outbound]), (1, 0));
        assert_eq!(open.by_peer.len(), 1);
    }

    #[test]
    fn the_peer_gauge_follows_the_exported_labels() {
        let mut open = OpenConnections::default();
        open.start();
        open.entry(&key(1, 9, 40000, Direction::Inbound), &in_state(state::GREETED));
        open.entry(&key(1, 9, 40001, Direction::Inbound), &in_state(state::GREETED));
        open.entry(&key(5, 9, 40002, Direction::Inbound), &in_state(state::GREETED));
        let peer = |n: u8| flow_peer(&key(n, 9, 0, Direction::Inbound));
        let mut busy = PeerCounters::default();
        busy.counts[0] = 100;
        let mut quiet = PeerCounters::default();
        quiet.counts[0] = 1;
        // One exported label: the busier of 10.0.0.1 and 10.0.0.4 (not open); 10.0.0.5 is open
        // but not exported.
        let mut reader = PeerReader::new(1);
        let view = reader.view_of(&[(peer(1), busy), (peer(4), quiet)], &[], &[]);
        let got = open.peer_series(&view, &PeerLabel::Ip);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((&*got[0].peer, got[0].open), ("10.0.0.1", 2));
        // 10.0.0.4 exported with nothing open: 0.
        let mut reader = PeerReader::new(1);
        let view = reader.view_of(&[(peer(4), busy), (peer(1), quiet)], &[], &[]);
        let got = open.peer_series(&view, &PeerLabel::Ip);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((&*got[0].peer, got[0].open), ("10.0.0.4", 0));
        // With --peer-label prefix, a network's peers are one series.
        let prefix = PeerLabel::Prefix { v4: 24, v6: 64 };
        let mut reader = PeerReader::with_series(
            crate::drain::peers::series::SeriesLimits::new(4),
            prefix.clone(),
            1024,
        );
        let view = reader.view_of(&[(peer(1), busy)], &[], &[]);
        let got = open.peer_series(&view, &prefix);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((&*got[0].peer, got[0].open), ("10.0.0.0/24", 3));
    }
}
