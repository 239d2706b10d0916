//! The pressure signals (conntrack fill and statistics, TCP listen-queue and reset counters)
//! against the reference users already trust: the real node_exporter (Debian's
//! `prometheus-node-exporter`, its `conntrack` and `netstat` collectors), run in the same network
//! namespace as the real `smtpflow watch`, after real traffic. Every value must be equal.
//!
//! Counters move, so the two are compared when the namespace is quiet: node_exporter is scraped,
//! then smtpflow (after it has drained again), then node_exporter again; the comparison counts
//! only when node_exporter's two scrapes agree (nothing moved meanwhile), with a bounded retry.
//! Loopback traffic (the scrapes themselves) is exempt from conntrack (`notrack`), so scraping
//! does not change the conntrack table it reads.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    thread,
    time::Duration,
};

use smtpflow_tests::{
    Metrics, Netns, Pair,
    frames::Tcp,
    http, in_netns,
    names::{CT_ENTRIES, CT_LIMIT, CT_STAT, TCP_STAT},
    netfilter::nft_script,
    process::Process,
    require_root,
    smtp::linger_zero,
    smtpflow::{INTERVAL, METRICS_ADDR, STARTUP, binary},
    traffic::{connect_refused, serve},
    wait_for,
};

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const NODE_ADDR: &str = "127.0.0.1:9100";
/// The environment variable choosing smtpflow's conntrack statistics source.
const SOURCE_ENV: &str = "SMTPFLOW_CONNTRACK_SOURCE";

const CONNTRACK_STATS: [&str; 5] =
    ["drop", "early_drop", "insert_failed", "invalid", "search_restart"];
const TCP_EXT_STATS: [&str; 4] =
    ["ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop"];
const TCP_STATS: [&str; 2] = ["AttemptFails", "EstabResets"];

/// The real node_exporter in `ns`, with only the conntrack and netstat collectors, the netstat
/// one reporting exactly the counters smtpflow exports.
struct NodeExporter {
    process: Process,
}

impl NodeExporter {
    fn start(ns: &Netns) -> Self {
        assert!(
            Path::new(NODE_EXPORTER).exists(),
            "{NODE_EXPORTER} is missing: install the Debian package prometheus-node-exporter \
             (`cargo xtask setup` does)"
        );
        let fields = format!(
            "--collector.netstat.fields=^(TcpExt_({})|Tcp_({}))$",
            TCP_EXT_STATS.join("|"),
            TCP_STATS.join("|")
        );
        let listen = format!("--web.listen-address={NODE_ADDR}");
        let mut process = Process::spawn(
            ns,
            NODE_EXPORTER,
            [
                "--collector.disable-defaults",
                "--collector.conntrack",
                "--collector.netstat",
                &fields,
                &listen,
            ],
        );
        process.wait_ready(STARTUP, || {
            http::get(ns, NODE_ADDR, "/metrics").is_ok_and(|r| r.status == 200)
        });
        Self { process }
    }

    fn scrape(&self, ns: &Netns) -> Metrics {
        match http::get(ns, NODE_ADDR, "/metrics") {
            Ok(r) if r.status == 200 => Metrics::parse(&r.body),
            other => {
                panic!("scraping node_exporter failed ({other:?}):\n{}", self.process.stderr())
            }
        }
    }
}

/// The real `smtpflow watch` on the gateway's interface, with the conntrack source chosen
/// through the environment (`None`: the default).
fn start_smtpflow(ns: &Netns, source: Option<&str>) -> Process {
    let interval = format!("{}ms", INTERVAL.as_millis());
    let mut spawn = Process::build(ns, binary()).args([
        "watch",
        "--metrics-addr",
        METRICS_ADDR,
        "--interval",
        &interval,
        "--iface",
        Pair::LOCAL_IF,
    ]);
    if let Some(source) = source {
        spawn = spawn.env(SOURCE_ENV, source);
    }
    let mut process = spawn.spawn();
    process.wait_ready(STARTUP, || http::healthy(ns, METRICS_ADDR));
    process
}

/// One compared value: smtpflow's name, its labels, node_exporter's name.
type Pairing = (&'static str, Vec<(&'static str, &'static str)>, String);

/// Every value compared.
fn pairs(conntrack: bool) -> Vec<Pairing> {
    let mut v = Vec::new();
    if conntrack {
        v.push((CT_ENTRIES, vec![], "node_nf_conntrack_entries".to_owned()));
        v.push((CT_LIMIT, vec![], "node_nf_conntrack_entries_limit".to_owned()));
        for s in CONNTRACK_STATS {
            v.push((CT_STAT, vec![("stat", s)], format!("node_nf_conntrack_stat_{s}")));
        }
    }
    for s in TCP_EXT_STATS {
        v.push((TCP_STAT, vec![("stat", s)], format!("node_netstat_TcpExt_{s}")));
    }
    for s in TCP_STATS {
        v.push((TCP_STAT, vec![("stat", s)], format!("node_netstat_Tcp_{s}")));
    }
    v
}

/// node_exporter's values of every compared series (`None` where it has none).
fn node_values(n: &Metrics, conntrack: bool) -> Vec<Option<f64>> {
    pairs(conntrack).iter().map(|(_, _, name)| n.get(name, &[])).collect()
}

/// The differences between smtpflow's and node_exporter's scrapes, as readable lines.
fn differences(s: &Metrics, n: &Metrics, conntrack: bool) -> Vec<String> {
    pairs(conntrack)
        .iter()
        .filter_map(|(name, labels, node_name)| {
            let ours = s.get(name, labels);
            let theirs = n.get(node_name, &[]);
            (ours.is_none() || ours != theirs)
                .then(|| format!("{name}{labels:?} = {ours:?}, {node_name} = {theirs:?}"))
        })
        .collect()
}

/// Scrapes both when the namespace is quiet and asserts every value equal (bounded retry).
/// Returns smtpflow's scrape.
fn assert_equal_when_quiet(
    ns: &Netns,
    smtpflow: &Process,
    node: &NodeExporter,
    conntrack: bool,
) -> Metrics {
    let mut last = Vec::new();
    for _ in 0..40 {
        let before = node.scrape(ns);
        // Long enough for smtpflow to drain (and read the kernel) at least twice.
        thread::sleep(INTERVAL * 3);
        let ours = http::scrape(ns, METRICS_ADDR);
        let after = node.scrape(ns);
        if node_values(&before, conntrack) != node_values(&after, conntrack) {
            last = vec!["the counters moved during the comparison".to_owned()];
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        last = differences(&ours, &after, conntrack);
        if last.is_empty() {
            let shown: Vec<String> = pairs(conntrack)
                .iter()
                .map(|(name, labels, _)| {
                    let l: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
                    format!("{name}{l:?}={}", ours.get(name, labels).unwrap_or(f64::NAN))
                })
                .collect();
            eprintln!("equal to node_exporter: {}", shown.join(" "));
            return ours;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "smtpflow and node_exporter disagree:\n  {}\nsmtpflow stderr:\n{}\nnode_exporter stderr:\n{}",
        last.join("\n  "),
        smtpflow.stderr(),
        node.process.stderr()
    );
}

/// Conntrack active in the gateway namespace: an nftables `ct state` rule (which makes the
/// kernel track every connection of the namespace), loopback exempt (`notrack`).
fn enable_conntrack(ns: &Netns) {
    let rules = "\
table inet smtpflow_pressure {
    chain raw_prerouting {
        type filter hook prerouting priority raw; policy accept;
        iif \"lo\" notrack
    }
    chain raw_output {
        type filter hook output priority raw; policy accept;
        oif \"lo\" notrack
    }
    chain input {
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        ct state invalid drop
    }
}
";
    nft_script(ns, rules);
}

/// `n` connections from `ns` to `addr`, each closed normally (`abort`: reset, `SO_LINGER` 0).
fn connect_n(ns: &Netns, addr: &str, n: usize, abort: bool) {
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        for _ in 0..n {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            if abort {
                linger_zero(&s);
            }
            drop(s);
        }
    });
}

/// Sends `per_cpu` TCP segments with no flag set (which conntrack counts as `invalid`) from
/// `ns` to `dst`, from each of the first two CPUs in turn, so that the per-CPU counters of
/// more than one CPU move.
fn send_invalid_segments(ns: &Netns, src: &str, dst: &str, per_cpu: usize) -> usize {
    let src: std::net::Ipv4Addr = src.parse().unwrap();
    let dst: std::net::Ipv4Addr = dst.parse().unwrap();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    in_netns(ns, move || {
        // SAFETY: plain syscall; checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sent = 0;
        for cpu in 0..cpus {
            // SAFETY: a zeroed cpu_set_t is valid; CPU_SET within its size.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(cpu, &mut set) };
            // SAFETY: valid set for this thread.
            let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
            assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
            for i in 0..per_cpu {
                let sport = 40000 + (cpu * 100 + i) as u16;
                // No flag set; to discard (9): not an SMTP port.
                let tcp = Tcp { seq: 1, window: 1024, ..Tcp::new(sport, 9, 0) }
                    .bytes_checksummed(IpAddr::V4(src), IpAddr::V4(dst));
                let to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: valid buffer and address.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        tcp.as_ptr().cast(),
                        tcp.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                assert_eq!(n, 20, "sendto: {}", std::io::Error::last_os_error());
                sent += 1;
            }
        }
        sent
    })
}

fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{}", m.text))
}

/// Real traffic through a namespace where conntrack is active, then every value equal to
/// node_exporter's; the log names the source used.
fn conntrack_matches_node_exporter(source: Option<&str>, log_says: &str) {
    let pair = Pair::new();
    enable_conntrack(&pair.local);
    let smtpflow = start_smtpflow(&pair.local, source);
    let node = NodeExporter::start(&pair.local);

    const INBOUND: usize = 5;
    let server = serve(&pair.local, &format!("{}:25", Pair::LOCAL_V4), INBOUND);
    connect_n(&pair.peer, &format!("{}:25", Pair::LOCAL_V4), INBOUND, false);
    server.join().unwrap();
    const RESETS: usize = 2;
    let remote = serve(&pair.peer, &format!("{}:2525", Pair::PEER_V4), RESETS);
    connect_n(&pair.local, &format!("{}:2525", Pair::PEER_V4), RESETS, true);
    remote.join().unwrap();
    const REFUSED: usize = 3;
    connect_refused(&pair.local, &format!("{}:465", Pair::PEER_V4), REFUSED);
    let invalid = send_invalid_segments(&pair.peer, Pair::PEER_V4, Pair::LOCAL_V4, 3);

    let m = assert_equal_when_quiet(&pair.local, &smtpflow, &node, true);
    // Not a comparison of zeros: what the traffic must have moved did move.
    let stat = |s| value(&m, CT_STAT, &[("stat", s)]);
    let tcp = |s| value(&m, TCP_STAT, &[("stat", s)]);
    assert!(value(&m, CT_ENTRIES, &[]) >= INBOUND as f64, "{}", m.text);
    assert!(value(&m, CT_LIMIT, &[]) > 0.0);
    assert!(stat("invalid") >= invalid as f64, "{invalid} invalid segments sent:\n{}", m.text);
    assert!(tcp("AttemptFails") >= REFUSED as f64, "{}", m.text);
    assert!(tcp("EstabResets") >= RESETS as f64, "{}", m.text);
    let stderr = smtpflow.stderr();
    assert!(stderr.contains(log_says), "expected {log_says:?} in smtpflow's log:\n{stderr}");
}

#[test]
fn conntrack_default_source_is_ctnetlink_and_matches_node_exporter() {
    require_root!();
    conntrack_matches_node_exporter(None, "conntrack statistics from ctnetlink");
}

#[test]
fn conntrack_forced_netlink_matches_node_exporter() {
    require_root!();
    conntrack_matches_node_exporter(Some("netlink"), "conntrack statistics from ctnetlink");
}

#[test]
fn conntrack_procfs_source_matches_node_exporter() {
    require_root!();
    conntrack_matches_node_exporter(
        Some("procfs"),
        "conntrack statistics from /proc/net/stat/nf_conntrack",
    );
}

/// A namespace with no conntrack rule: the kernel keeps conntrack's sysctls and statistics
/// there (conntrack is built in or loaded), but tracks nothing: 0 entries, the global limit,
/// statistics at 0 whatever the traffic. smtpflow reports exactly that, like node_exporter.
#[test]
fn conntrack_unused_namespace_reports_an_empty_table() {
    require_root!();
    for source in ["netlink", "procfs"] {
        let pair = Pair::new();
        let smtpflow = start_smtpflow(&pair.local, Some(source));
        let node = NodeExporter::start(&pair.local);
        let server = serve(&pair.local, &format!("{}:25", Pair::LOCAL_V4), 4);
        connect_n(&pair.peer, &format!("{}:25", Pair::LOCAL_V4), 4, false);
        server.join().unwrap();
        send_invalid_segments(&pair.peer, Pair::PEER_V4, Pair::LOCAL_V4, 1);

        let m = assert_equal_when_quiet(&pair.local, &smtpflow, &node, true);
        assert_eq!(value(&m, CT_ENTRIES, &[]), 0.0, "{source}: {}", m.text);
        assert!(value(&m, CT_LIMIT, &[]) > 0.0);
        for s in CONNTRACK_STATS {
            assert_eq!(value(&m, CT_STAT, &[("stat", s)]), 0.0, "{s}");
        }
    }
}

/// A listener with backlog 1 that never accepts, and many connection attempts: the kernel counts
/// listen-queue overflows; smtpflow's count rose from 0 and equals node_exporter's.
#[test]
fn listen_overflows_match_node_exporter() {
    require_root!();
    let pair = Pair::new();
    let smtpflow = start_smtpflow(&pair.local, None);
    let node = NodeExporter::start(&pair.local);
    let overflows = |m: &Metrics| value(m, TCP_STAT, &[("stat", "ListenOverflows")]);
    let before = overflows(&http::scrape(&pair.local, METRICS_ADDR));
    assert_eq!(before, 0.0, "a fresh namespace starts with no overflow");

    // backlog 1 (std's TcpListener listens with 128, so through libc).
    let addr = format!("{}:2525", Pair::LOCAL_V4);
    let listener = in_netns(&pair.local, || {
        // SAFETY: plain syscalls; checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 2525u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(
                    Pair::LOCAL_V4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
                ),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid address.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // SAFETY: plain syscall.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
        fd
    });

    // Attempts one after the other (each bounded: a SYN the full queue drops is not retried),
    // held open until the kernel has counted overflows.
    const ATTEMPTS: usize = 12;
    let target: SocketAddr = addr.parse().unwrap();
    let clients = in_netns(&pair.peer, move || {
        (0..ATTEMPTS)
            .map(|_| {
                let s = TcpStream::connect_timeout(&target, Duration::from_millis(300));
                s.ok()
            })
            .collect::<Vec<_>>()
    });
    let rose = wait_for(Duration::from_secs(10), || {
        let n = overflows(&http::scrape(&pair.local, METRICS_ADDR));
        (n > before).then_some(n)
    });
    assert!(rose.is_some(), "no listen overflow counted:\n{}", smtpflow.stderr());
    drop(clients);
    drop(listener);

    let m = assert_equal_when_quiet(&pair.local, &smtpflow, &node, true);
    assert!(overflows(&m) > before);
    assert!(
        value(&m, TCP_STAT, &[("stat", "ListenDrops")]) >= overflows(&m),
        "every overflow is also a listen drop:\n{}",
        m.text
    );
}

/// An unknown source in the environment is refused at start, before anything is attached.
#[test]
fn unknown_source_is_refused() {
    require_root!();
    let pair = Pair::new();
    let mut bad = Process::build(&pair.local, binary())
        .args(["watch", "--metrics-addr", METRICS_ADDR, "--iface", Pair::LOCAL_IF])
        .env(SOURCE_ENV, "proc")
        .spawn();
    let code = bad.wait_exit(Duration::from_secs(20)).expect("smtpflow did not exit within 20s");
    assert!(code != Some(0), "started with {SOURCE_ENV}=proc");
    let stderr = bad.stderr();
    assert!(stderr.contains("SMTPFLOW_CONNTRACK_SOURCE=\"proc\""), "{stderr}");
}
