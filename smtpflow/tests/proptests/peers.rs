//! The bounded reading of the per-peer maps (`peers::PeerReader`) against the exact one.
use std::collections::{BTreeMap, BTreeSet};

use std::net::Ipv4Addr;

use proptest::{collection::vec, prelude::*};

use smtpflow::drain::peers::{ENTRY_SLACK, FIGURE_KEEP, Figure, PeerId, PeerReader, peer_id};
use smtpflow_common::{Direction, Event, FAMILY_V4, Outcome, PeerCounters, PeerKey, Side};

/// Per-peer map entries: few addresses, so that peers have several entries (ports, directions,
/// interfaces), and small counts, so that ties are common. Keys are unique, as in the map.
fn peer_entries() -> impl Strategy<Value = Vec<(PeerKey, PeerCounters)>> {
    let key = (1u32..3, 0u8..24, prop::sample::select(vec![25u16, 465, 587]), 0u8..2);
    let entry =
        (key, 0u64..6, 0u64..3, 0u64..3).prop_map(|((ifindex, a, port, d), syn, zw, refused)| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&[192, 0, 2, a]);
            let k = PeerKey { ifindex, addr, port, family: FAMILY_V4, direction: d };
            let mut c = PeerCounters::default();
            c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = syn;
            c.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] = zw;
            c.outcomes[Outcome::Refused as usize] = refused;
            (k, c)
        });
    vec(entry, 0..120).prop_map(|v| {
        let mut seen = BTreeSet::new();
        v.into_iter().filter(|(k, _)| seen.insert(*k)).collect()
    })
}

/// The exact ranking the bounded reading replaces (what `export::top_peers` was): activity
/// summed per peer over every entry, the `limit` largest, ties broken by address. (On a
/// reader's first read every entry is new, so recent activity is all of it.)
fn exact_top_peers(entries: &[(PeerKey, PeerCounters)], limit: usize) -> BTreeSet<PeerId> {
    let mut activity: BTreeMap<PeerId, u64> = BTreeMap::new();
    for (k, v) in entries {
        *activity.entry(peer_id(k)).or_default() += v.total();
    }
    // A peer with nothing counted has no series.
    let mut ranked: Vec<(PeerId, u64)> = activity.into_iter().filter(|(_, n)| *n > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.into_iter().take(limit).map(|(id, _)| id).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// While every entry fits in the candidates (ENTRY_SLACK per exported peer), the reading
    /// chooses exactly the peers the exact ranking does, with all their entries; it always
    /// counts entries and distinct peers exactly, and keeps its figures bounded and sorted.
    #[test]
    fn peer_reading_matches_the_exact_one(entries in peer_entries(), cap in 0usize..12) {
        let v = PeerReader::new(cap).view_of(&entries, &[], &[]);
        let distinct: BTreeSet<PeerId> = entries.iter().map(|(k, _)| peer_id(k)).collect();
        prop_assert_eq!(v.entries, entries.len());
        prop_assert_eq!(v.tracked, distinct.len());
        prop_assert!(v.exported_peers <= cap);
        // The first read of a reader: every entry is new, all of it recent, so the exported
        // peers are the most active ones, with their kernel values.
        let chosen: BTreeSet<PeerId> = v
            .series
            .iter()
            .map(|s| match s.peer.parse::<Ipv4Addr>() {
                Ok(ip) => {
                    let mut addr = [0u8; 16];
                    addr[..4].copy_from_slice(&ip.octets());
                    (s.ifindex, FAMILY_V4, addr)
                }
                Err(e) => panic!("{}: {e}", s.peer),
            })
            .collect();
        prop_assert_eq!(chosen.len(), v.exported_peers);
        if entries.len() <= cap * ENTRY_SLACK {
            prop_assert_eq!(&chosen, &exact_top_peers(&entries, cap));
            let mut want: BTreeMap<(u32, String, u8, u16), u64> = BTreeMap::new();
            for (k, c) in entries.iter().filter(|(k, _)| chosen.contains(&peer_id(k))) {
                let ip = k.ip().unwrap().to_string();
                *want.entry((k.ifindex, ip, k.direction, k.port)).or_default() += c.total();
            }
            want.retain(|_, n| *n > 0);
            let mut got: BTreeMap<(u32, String, u8, u16), u64> = BTreeMap::new();
            for s in &v.series {
                let at = (s.ifindex, s.peer.to_string(), s.direction as u8, s.port);
                *got.entry(at).or_default() += s.value;
            }
            prop_assert_eq!(got, want);
        }
        let zw = v.figure(Figure::ZeroWindowsSent);
        prop_assert!(zw.len() <= FIGURE_KEEP && zw.windows(2).all(|w| w[0].1 >= w[1].1));
        let nonzero = entries
            .iter()
            .filter(|(_, c)| c.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] > 0)
            .count();
        prop_assert_eq!(zw.len(), nonzero.min(FIGURE_KEEP));
        let outbound = v.figure(Figure::OutboundRefused);
        prop_assert!(outbound.iter().all(|(k, n)| k.direction == Direction::Outbound as u8 && *n > 0));
    }
}
