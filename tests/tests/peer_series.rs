//! Per-peer series only go up. Forty client addresses in the peer namespace, a few active at a
//! time and the active set moving on, against `smtpflow watch --max-peer-series 8
//! --peer-series-idle 2s`: more active peers than series, so the exported set churns; with a
//! small `--max-peers` the kernel's LRU map evicts peers too. Thirty scrapes, one per round of
//! traffic: no per-peer series ever decreases (even one that left the export set and came back),
//! the exported set stays within its bound, and the values never exceed the traffic; where
//! nothing was evicted they equal it, at every scrape.
//!
//! Once with `--peer-label ip`, once with `--peer-label prefix --peer-prefix-v4 30` (eleven
//! networks of up to four addresses: several peers per series).
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use smtpflow_tests::{
    Metrics, Netns, Pair, Watch, in_netns,
    names::{MAP_EVICTIONS, PEER_EVENTS, PEER_GREETINGS, PEER_HANDSHAKES, PEERS_EXPORTED},
    report, require_root,
    traffic::{close_after_server, connect_from},
    wait_for,
};

const IF: &str = Pair::LOCAL_IF;
const PEERS: usize = 40;
const SERIES: usize = 8;
const ROUNDS: usize = 30;
/// Peers active in a round, and how far the active window moves each round: each peer is active
/// for three rounds, then idle for seven (longer than `--peer-series-idle`).
const ACTIVE: usize = 12;
const STEP: usize = 4;
const PEER_FAMILIES: [&str; 3] = [PEER_EVENTS, PEER_HANDSHAKES, PEER_GREETINGS];

/// The client addresses: 10.77.1.1 to 10.77.1.40, on the peer's interface.
fn client(i: usize) -> String {
    format!("10.77.1.{}", i + 1)
}

/// How `--peer-label` writes the peers of a test.
#[derive(Clone, Copy, Debug)]
enum Labels {
    Ip,
    /// `--peer-label prefix --peer-prefix-v4 30`.
    Prefix30,
}

impl Labels {
    fn args(self) -> &'static [&'static str] {
        match self {
            Labels::Ip => &["--peer-label", "ip"],
            Labels::Prefix30 => &["--peer-label", "prefix", "--peer-prefix-v4", "30"],
        }
    }

    fn of(self, i: usize) -> String {
        match self {
            Labels::Ip => client(i),
            Labels::Prefix30 => format!("10.77.1.{}/30", (i + 1) & !3),
        }
    }
}

/// An SMTP-port server on the gateway that accepts and closes every connection until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("a socket address");
        let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind the server"));
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("the test server's thread panicked");
        }
    }
}

/// The gateway and the peer, with the forty client addresses on the peer's side.
fn topology() -> Pair {
    let pair = Pair::new();
    for i in 0..PEERS {
        pair.peer.ip(&["addr", "add", &format!("{}/32", client(i)), "dev", Pair::PEER_IF]);
    }
    pair.local.ip(&["route", "add", "10.77.1.0/24", "dev", IF]);
    pair
}

/// One connection from each client in `from`, one after the other, each closed after the
/// server's FIN.
fn connect_from_each(pair: &Pair, from: Vec<usize>) {
    let dst: SocketAddr = format!("{}:25", Pair::LOCAL_V4).parse().unwrap();
    in_netns(&pair.peer, move || {
        for i in from {
            let src: SocketAddr = format!("{}:0", client(i)).parse().unwrap();
            let s = connect_from(src, dst).unwrap_or_else(|e| panic!("connect from {src}: {e}"));
            close_after_server(s);
        }
    });
}

/// A sample's family and labels.
type Series = (String, Vec<(String, String)>);

/// The per-peer samples of a scrape, and the exported peer labels.
fn peer_samples(m: &Metrics) -> (BTreeMap<Series, f64>, BTreeSet<String>) {
    let mut samples = BTreeMap::new();
    let mut labels = BTreeSet::new();
    for name in PEER_FAMILIES {
        for (l, v) in m.matching(name, &[]) {
            samples.insert((name.to_owned(), l.to_vec()), v);
            if let Some((_, p)) = l.iter().find(|(k, _)| k == "peer") {
                labels.insert(p.clone());
            }
        }
    }
    (samples, labels)
}

/// The SYNs each label's peers sent, as the exported series has them (0 when not exported).
fn exported_syns(m: &Metrics, label: &str) -> u64 {
    m.sum(
        PEER_EVENTS,
        &[("peer", label), ("direction", "inbound"), ("event", "syn"), ("side", "peer")],
    )
}

/// The churn against one `watch`; `max_peers`: `--max-peers` (small: the kernel evicts).
fn churn(labels: Labels, max_peers: u32) {
    let evicting = (max_peers as usize) < PEERS;
    let pair = topology();
    let _server = Server::start(&pair.local, &format!("{}:25", Pair::LOCAL_V4));
    let max_peers = max_peers.to_string();
    let series = SERIES.to_string();
    let mut args =
        vec!["--max-peers", &max_peers, "--max-peer-series", &series, "--peer-series-idle", "2s"];
    args.extend_from_slice(labels.args());
    let w = Watch::start(&pair.local, IF, &args);

    let mut syns: BTreeMap<String, u64> = BTreeMap::new();
    let mut highest: BTreeMap<Series, f64> = BTreeMap::new();
    let mut ever: BTreeSet<String> = BTreeSet::new();
    for round in 0..ROUNDS {
        let active: Vec<usize> = (0..ACTIVE).map(|k| (round * STEP + k) % PEERS).collect();
        for &i in &active {
            *syns.entry(labels.of(i)).or_default() += 1;
        }
        let pace = std::time::Instant::now();
        connect_from_each(&pair, active);
        // Several drains, each reading the (small) per-peer maps; where nothing was evicted,
        // wait until the exported values are the traffic.
        let settled = |m: &Metrics| {
            peer_samples(m)
                .1
                .iter()
                .all(|l| exported_syns(m, l) == syns.get(l).copied().unwrap_or(0))
        };
        let m = if evicting {
            thread::sleep(Duration::from_millis(300));
            w.scrape(&pair.local)
        } else {
            wait_for(Duration::from_secs(5), || Some(w.scrape(&pair.local)).filter(settled))
                .unwrap_or_else(|| w.scrape(&pair.local))
        };
        let (samples, exported) = peer_samples(&m);
        let context = || format!("{labels:?}, --max-peers {max_peers}, round {round}");
        assert!(
            exported.len() <= SERIES,
            "{} peers exported ({}): {exported:?}",
            exported.len(),
            context()
        );
        assert_eq!(
            m.get(PEERS_EXPORTED, &[]),
            Some(exported.len() as f64),
            "{PEERS_EXPORTED} against the series ({})",
            context()
        );
        for (series, v) in &samples {
            if let Some(before) = highest.get(series) {
                assert!(v >= before, "{series:?} went down from {before} to {v} ({})", context());
            }
            highest.insert(series.clone(), *v);
        }
        for l in &exported {
            let (got, sent) = (exported_syns(&m, l), syns.get(l).copied().unwrap_or(0));
            assert!(got <= sent, "{l}: {got} SYNs exported, {sent} sent ({})", context());
            if !evicting {
                assert_eq!(
                    got,
                    sent,
                    "{l}: nothing was evicted, the value is exact ({})",
                    context()
                );
            }
        }
        ever.extend(exported);
        // Rounds at least 0.5 s apart: a peer idle for seven rounds is idle for longer than
        // --peer-series-idle.
        thread::sleep(Duration::from_millis(500).saturating_sub(pace.elapsed()));
    }
    if ever.len() <= SERIES {
        let m = w.scrape(&pair.local);
        let lines: Vec<&str> = m.text.lines().filter(|l| l.contains("peer")).collect();
        eprintln!("{}\n{}", lines.join("\n"), w.stderr());
    }
    assert!(
        ever.len() > SERIES,
        "the export set never changed ({ever:?}): the test did not churn it"
    );
    let m = w.scrape(&pair.local);
    let evicted = m.get(MAP_EVICTIONS, &[("map", "peers")]).unwrap_or(0.0);
    if evicting {
        if evicted == 0.0 {
            report::weakened(
                &report::current_test(),
                &format!("--max-peers {max_peers} evicted no per-peer entry"),
            );
        }
    } else {
        assert_eq!(evicted, 0.0, "the exactness run must evict nothing");
    }
    eprintln!(
        "{labels:?}, --max-peers {max_peers}: {} labels exported over {ROUNDS} scrapes, {evicted} \
         per-peer entries evicted",
        ever.len()
    );
}

#[test]
fn peer_series_only_go_up_with_ip_labels() {
    require_root!();
    churn(Labels::Ip, 65_536);
    churn(Labels::Ip, 8);
}

#[test]
fn peer_series_only_go_up_with_prefix_labels() {
    require_root!();
    churn(Labels::Prefix30, 65_536);
    churn(Labels::Prefix30, 8);
}
