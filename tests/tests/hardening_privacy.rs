//! The hardening contract, part 3: privacy. `--peer-label prefix|hash` in every per-peer series,
//! the diagnosis and the log; against the real `smtpflow watch` binary in test-owned namespaces.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use smtpflow_tests::{
    Pair, Watch,
    expect::{Expected, counters, ev, inbound_only, peer_ev, rst_expected},
    hooks::assert_unhooked,
    in_netns,
    names::{EVENTS, PEER_EVENTS, PEER_HANDSHAKES, PEERS_TRACKED, TOP_PEER},
    netfilter::RstOracle,
    require_root,
    smtpflow::{METRICS_ADDR, run_watch},
    tempdir::TempDir,
    traffic::{close_after_server, connect_from, connect_refused, serve},
    wait_for,
};

const SF0: &str = Pair::LOCAL_IF;

const PEER_V4_B: &str = "10.77.0.3";
const PEER_V6_B: &str = "fd00:77::3";

/// Adds a second IPv4 and IPv6 address to the peer's veth.
fn second_peer_addresses(pair: &Pair) {
    pair.peer.ip(&["addr", "add", &format!("{PEER_V4_B}/24"), "dev", Pair::PEER_IF]);
    pair.peer.ip(&["addr", "add", &format!("{PEER_V6_B}/64"), "dev", Pair::PEER_IF, "nodad"]);
}

/// Inbound connections from chosen peer addresses to `dst` (a gateway address, port 25):
/// `(source address, count)`.
fn inbound_from(pair: &Pair, dst: &str, sources: &[(&str, usize)]) {
    let total: usize = sources.iter().map(|(_, n)| n).sum();
    let dst_addr: SocketAddr = dst.parse().unwrap();
    let server = serve(&pair.local, dst, total);
    let sources: Vec<(SocketAddr, usize)> =
        sources.iter().map(|(ip, n)| (SocketAddr::new(ip.parse().unwrap(), 0), *n)).collect();
    in_netns(&pair.peer, move || {
        for (src, n) in sources {
            for _ in 0..n {
                close_after_server(
                    connect_from(src, dst_addr)
                        .unwrap_or_else(|e| panic!("{src} -> {dst_addr}: {e}")),
                );
            }
        }
    });
    server.join().unwrap();
}

/// Outbound connections from the gateway to peers' port 25, where nothing listens: each is
/// refused by a RST (`remote_refusing`).
fn refused_outbound(pair: &Pair, targets: &[(&str, usize)]) {
    for (ip, n) in targets {
        let dst = SocketAddr::new(ip.parse().unwrap(), 25).to_string();
        connect_refused(&pair.local, &dst, *n);
    }
}

fn assert_no_addresses(text: &str, addresses: &[&str], what: &str) {
    for a in addresses {
        // An address followed by a digit would be another one (10.77.0.2 vs 10.77.0.23).
        let leaked = text.match_indices(a).any(|(i, _)| {
            !text[i + a.len()..].starts_with(|c: char| c.is_ascii_hexdigit() || c == ':')
        });
        assert!(!leaked, "{what} contains the full address {a}:\n{text}");
    }
}

#[test]
fn peer_label_prefix_sums_networks_and_hides_addresses() {
    require_root!();
    let pair = Pair::new();
    second_peer_addresses(&pair);
    let rsts = RstOracle::install(&pair.local, SF0);
    let w = Watch::start(
        &pair.local,
        SF0,
        // --min-failures 1: three refused connections name the network.
        &[
            "--peer-label",
            "prefix",
            "--peer-prefix-v4",
            "24",
            "--peer-prefix-v6",
            "64",
            "--min-failures",
            "1",
        ],
    );
    let v4_dst = format!("{}:25", Pair::LOCAL_V4);
    let v6_dst = format!("[{}]:25", Pair::LOCAL_V6);
    inbound_from(&pair, &v4_dst, &[(Pair::PEER_V4, 2), (PEER_V4_B, 3)]);
    inbound_from(&pair, &v6_dst, &[(Pair::PEER_V6, 1), (PEER_V6_B, 2)]);
    refused_outbound(&pair, &[(Pair::PEER_V4, 1), (PEER_V4_B, 2)]);

    const NET4: &str = "10.77.0.0/24";
    const NET6: &str = "fd00:77::/64";
    assert_eq!(rsts.read().outbound_peer, 3, "three refused connections, three RSTs");
    let expected = || -> Vec<Expected> {
        let r = rsts.read();
        let mut e = vec![
            (EVENTS, ev(SF0, "inbound", "syn", "peer"), 8),
            (EVENTS, ev(SF0, "inbound", "syn_ack", "local"), 8),
            (EVENTS, ev(SF0, "outbound", "syn", "local"), 3),
            // Two peers of one network are one series, summed.
            (PEER_EVENTS, peer_ev(NET4, "inbound", "syn", "peer"), 5),
            (PEER_EVENTS, peer_ev(NET4, "inbound", "syn_ack", "local"), 5),
            (PEER_EVENTS, peer_ev(NET6, "inbound", "syn", "peer"), 3),
            (PEER_EVENTS, peer_ev(NET6, "inbound", "syn_ack", "local"), 3),
            (PEER_EVENTS, peer_ev(NET4, "outbound", "syn", "local"), 3),
            (PEER_EVENTS, peer_ev(NET4, "outbound", "rst", "peer"), r.outbound_peer),
            (PEER_EVENTS, vec![], 19 + r.total()),
            (
                PEER_HANDSHAKES,
                vec![("peer", NET4), ("direction", "outbound"), ("outcome", "refused")],
                3,
            ),
            (
                PEER_HANDSHAKES,
                vec![("peer", NET4), ("direction", "inbound"), ("outcome", "established")],
                5,
            ),
            (PEERS_TRACKED, vec![], 4),
        ];
        e.extend(rst_expected(&r, 19));
        e
    };
    counters(|| w.scrape(&pair.local), expected, || w.stderr());
    // The diagnosis names the network too.
    // The refusing peers never said a name: site unknown.
    let top =
        vec![("cause", "remote_refusing"), ("iface", SF0), ("peer", NET4), ("site", "unknown")];
    let m = wait_for(Duration::from_secs(10), || {
        let m = w.scrape(&pair.local);
        (m.get(TOP_PEER, &top) == Some(3.0)).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "no {TOP_PEER}{top:?} 3:\n{:?}\n{}",
            w.scrape(&pair.local).nonzero(TOP_PEER),
            w.stderr()
        )
    });
    let labels = m.label_values("peer");
    assert_eq!(labels, BTreeSet::from([NET4.to_owned(), NET6.to_owned()]), "peer labels");
    let addresses = [Pair::PEER_V4, PEER_V4_B, Pair::PEER_V6, PEER_V6_B];
    assert_no_addresses(&m.text, &addresses, "/metrics");
    let log = wait_for(Duration::from_secs(5), || {
        let log = w.stderr();
        log.contains("remote_refusing is active").then_some(log)
    })
    .unwrap_or_else(|| panic!("no diagnosis line in the log:\n{}", w.stderr()));
    assert!(
        log.contains("is active: unknown, RST to 100 % of ")
            && log.contains(&format!(" handshakes, peers {NET4} on {SF0} (")),
        "diagnosis line:\n{log}"
    );
    assert_no_addresses(&log, &addresses, "the log");
}

/// One run with `--peer-label hash`: 1 inbound connection from 10.77.0.2, 2 from 10.77.0.3, one
/// refused outbound connection to 10.77.0.3; returns (label of .2, label of .3).
fn hashed_labels(pair: &Pair, rsts: &RstOracle, key_file: &str) -> (String, String) {
    // --min-failures 1: one refused connection names the peer.
    let w = Watch::start(
        &pair.local,
        SF0,
        &["--peer-label", "hash", "--peer-hash-key-file", key_file, "--min-failures", "1"],
    );
    let base = rsts.read();
    inbound_from(pair, &format!("{}:25", Pair::LOCAL_V4), &[(Pair::PEER_V4, 1), (PEER_V4_B, 2)]);
    refused_outbound(pair, &[(PEER_V4_B, 1)]);
    let expected = || {
        let mut e = inbound_only(3, &rsts.read().since(&base));
        e.retain(|(name, l, _)| !(name == &EVENTS && l.is_empty()));
        e.push((EVENTS, ev(SF0, "outbound", "syn", "local"), 1));
        e.push((EVENTS, vec![], 7 + rsts.read().since(&base).total()));
        e.push((PEER_EVENTS, vec![("direction", "inbound"), ("event", "syn")], 3));
        e
    };
    let m = counters(|| w.scrape(&pair.local), expected, || w.stderr());
    let mut by_count: Vec<(u64, String)> = m
        .label_values("peer")
        .into_iter()
        .map(|p| {
            (m.sum(PEER_EVENTS, &[("peer", &p), ("event", "syn"), ("direction", "inbound")]), p)
        })
        .collect();
    by_count.sort();
    assert_eq!(by_count.len(), 2, "two peers, two labels: {by_count:?}\n{}", m.text);
    for (_, label) in &by_count {
        let hex = label.strip_prefix("h:").unwrap_or("");
        assert!(
            hex.len() == 16
                && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "label {label:?} is not h:<16 lower-case hex digits>"
        );
    }
    assert_eq!(by_count.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2], "{by_count:?}");
    let (a, b) = (by_count[0].1.clone(), by_count[1].1.clone());
    // The diagnosis and its log line use the label.
    let top = vec![
        ("cause", "remote_refusing"),
        ("iface", SF0),
        ("peer", b.as_str()),
        ("site", "unknown"),
    ];
    let m = wait_for(Duration::from_secs(10), || {
        let m = w.scrape(&pair.local);
        (m.get(TOP_PEER, &top) == Some(1.0)).then_some(m)
    })
    .unwrap_or_else(|| panic!("no diagnosis top peer {b}:\n{}", w.stderr()));
    let addresses = [Pair::PEER_V4, PEER_V4_B];
    assert_no_addresses(&m.text, &addresses, "/metrics");
    let log = wait_for(Duration::from_secs(5), || {
        let log = w.stderr();
        log.contains("remote_refusing is active").then_some(log)
    })
    .unwrap_or_else(|| panic!("no diagnosis line in the log:\n{}", w.stderr()));
    assert!(
        log.contains(&format!(
            "is active: unknown, RST to 100 % of 1 handshakes, peers {b} on {SF0} (1)"
        )),
        "diagnosis line:\n{log}"
    );
    assert_no_addresses(&log, &addresses, "the log");
    (a, b)
}

#[test]
fn peer_label_hash_is_keyed_stable_and_hides_addresses() {
    require_root!();
    let pair = Pair::new();
    second_peer_addresses(&pair);
    let dir = TempDir::new("hashkey");
    let key1 = dir.write("key1", "first secret key\n");
    let key2 = dir.write("key2", "second secret key\n");
    let rsts = RstOracle::install(&pair.local, SF0);
    let first = hashed_labels(&pair, &rsts, &key1);
    let again = hashed_labels(&pair, &rsts, &key1);
    let other = hashed_labels(&pair, &rsts, &key2);
    eprintln!("labels: key1 {first:?}, key1 after a restart {again:?}, key2 {other:?}");
    assert_ne!(first.0, first.1, "two addresses, one label");
    assert_eq!(first, again, "labels changed across a restart with the same key");
    assert!(other.0 != first.0 && other.1 != first.1, "another key gave the same labels");
    // A missing or empty key file is refused before anything is attached.
    let empty = dir.write("empty", "  \n");
    for (file, words) in [
        (
            dir.join("nonexistent").display().to_string(),
            vec!["nonexistent", "--peer-hash-key-file"],
        ),
        (empty.clone(), vec!["empty"]),
    ] {
        let r = run_watch(
            &pair.local,
            &[],
            &[
                "--iface",
                SF0,
                "--metrics-addr",
                METRICS_ADDR,
                "--peer-label",
                "hash",
                "--peer-hash-key-file",
                &file,
            ],
        );
        r.assert_failed(&file, &words);
        assert_unhooked(&pair.local, SF0, &format!("{file}: refused"));
    }
}
