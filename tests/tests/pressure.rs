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
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use smtpflow_tests::{
    Metrics, Netns, Pair,
    conn::connect_refused,
    in_netns, require_root, wait_for,
    watch::{INTERVAL, METRICS_ADDR, binary, http_get},
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

/// A child process killed (SIGTERM, then SIGKILL) and reaped on drop.
struct ChildGuard {
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Runs `program args` inside `ns` with extra environment, stderr to a file.
    fn spawn(ns: &Netns, what: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let stderr_path = std::env::temp_dir().join(format!("{}-{what}.stderr", ns.name));
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Self { child: Some(child), stderr_path }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (bounded) until `ready` holds, panicking if the process exits first.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{what} exited early ({status}):\n{}", self.stderr());
            }
            ready().then_some(())
        });
        assert!(ok.is_some(), "{what} was not ready within 20s:\n{}", self.stderr());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        smtpflow_tests::stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// HTTP/1.0 GET (so the body is never chunked) inside a namespace; the body on status 200.
fn get_body(ns: &Netns, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        // "HTTP/1.0 200 OK" (Go answers in the request's version).
        (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
    })
}

/// The real node_exporter in `ns`, with only the conntrack and netstat collectors, the netstat
/// one reporting exactly the counters smtpflow exports.
struct NodeExporter {
    guard: ChildGuard,
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
        let mut guard = ChildGuard::spawn(
            ns,
            "node-exporter",
            Path::new(NODE_EXPORTER),
            &[
                "--collector.disable-defaults",
                "--collector.conntrack",
                "--collector.netstat",
                &fields,
                &listen,
            ],
            &[],
        );
        guard.wait_ready("node_exporter", || get_body(ns, NODE_ADDR, "/metrics").is_some());
        Self { guard }
    }

    fn scrape(&self, ns: &Netns) -> Metrics {
        let body = get_body(ns, NODE_ADDR, "/metrics")
            .unwrap_or_else(|| panic!("scraping node_exporter failed:\n{}", self.guard.stderr()));
        Metrics::parse(&body)
    }
}

/// The real `smtpflow watch` on the gateway's interface, with the conntrack source chosen
/// through the environment (`None`: the default).
struct Smtpflow {
    guard: ChildGuard,
}

impl Smtpflow {
    fn start(ns: &Netns, source: Option<&str>) -> Self {
        let interval = format!("{}ms", INTERVAL.as_millis());
        let env: Vec<(&str, &str)> = source.map(|s| (SOURCE_ENV, s)).into_iter().collect();
        let mut guard = ChildGuard::spawn(
            ns,
            "smtpflow",
            &binary(),
            &[
                "watch",
                "--metrics-addr",
                METRICS_ADDR,
                "--interval",
                &interval,
                "--iface",
                Pair::LOCAL_IF,
            ],
            &env,
        );
        guard.wait_ready("smtpflow", || {
            http_get(ns, METRICS_ADDR, "/healthz").is_ok_and(|(s, _)| s == 200)
        });
        Self { guard }
    }

    fn scrape(&self, ns: &Netns) -> Metrics {
        let (status, body) = http_get(ns, METRICS_ADDR, "/metrics").expect("scrape smtpflow");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }
}

/// One compared value: smtpflow's name, its labels, node_exporter's name.
type Pairing = (&'static str, Vec<(&'static str, &'static str)>, String);

/// Every value compared.
fn pairs(conntrack: bool) -> Vec<Pairing> {
    let mut v = Vec::new();
    if conntrack {
        v.push(("smtpflow_conntrack_entries", vec![], "node_nf_conntrack_entries".to_owned()));
        v.push((
            "smtpflow_conntrack_entries_limit",
            vec![],
            "node_nf_conntrack_entries_limit".to_owned(),
        ));
        for s in CONNTRACK_STATS {
            v.push((
                "smtpflow_conntrack_stat_total",
                vec![("stat", s)],
                format!("node_nf_conntrack_stat_{s}"),
            ));
        }
    }
    for s in TCP_EXT_STATS {
        v.push(("smtpflow_tcp_stat_total", vec![("stat", s)], format!("node_netstat_TcpExt_{s}")));
    }
    for s in TCP_STATS {
        v.push(("smtpflow_tcp_stat_total", vec![("stat", s)], format!("node_netstat_Tcp_{s}")));
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
    smtpflow: &Smtpflow,
    node: &NodeExporter,
    conntrack: bool,
) -> Metrics {
    let mut last = Vec::new();
    for _ in 0..40 {
        let before = node.scrape(ns);
        // Long enough for smtpflow to drain (and read the kernel) at least twice.
        thread::sleep(INTERVAL * 3);
        let ours = smtpflow.scrape(ns);
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
        smtpflow.guard.stderr(),
        node.guard.stderr()
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
    let path = std::env::temp_dir().join(format!("{}-pressure.nft", ns.name));
    std::fs::write(&path, rules).expect("write the ruleset");
    let out = ns.exec("nft", &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "nft -f failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Accepts (then closes) `n` connections on `addr` in `ns`, on a thread.
fn serve(ns: &Netns, addr: &str, n: usize) -> thread::JoinHandle<()> {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind test server"));
    thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        }
    })
}

/// `n` connections from `ns` to `addr`, each closed normally (`abort`: reset, `SO_LINGER` 0).
fn connect_n(ns: &Netns, addr: &str, n: usize, abort: bool) {
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        for _ in 0..n {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            if abort {
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: valid socket and option value.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
            }
            drop(s);
        }
    });
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
                let mut tcp = [0u8; 20];
                tcp[0..2].copy_from_slice(&sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&9u16.to_be_bytes()); // discard: not an SMTP port
                tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
                tcp[12] = 5 << 4; // data offset 5, flags 0
                tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
                let mut pseudo = Vec::new();
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
                pseudo.extend_from_slice(&tcp);
                let c = checksum(&pseudo);
                tcp[16..18].copy_from_slice(&c.to_be_bytes());
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
    let smtpflow = Smtpflow::start(&pair.local, source);
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
    let stat = |s| value(&m, "smtpflow_conntrack_stat_total", &[("stat", s)]);
    let tcp = |s| value(&m, "smtpflow_tcp_stat_total", &[("stat", s)]);
    assert!(value(&m, "smtpflow_conntrack_entries", &[]) >= INBOUND as f64, "{}", m.text);
    assert!(value(&m, "smtpflow_conntrack_entries_limit", &[]) > 0.0);
    assert!(stat("invalid") >= invalid as f64, "{invalid} invalid segments sent:\n{}", m.text);
    assert!(tcp("AttemptFails") >= REFUSED as f64, "{}", m.text);
    assert!(tcp("EstabResets") >= RESETS as f64, "{}", m.text);
    let stderr = smtpflow.guard.stderr();
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
        let smtpflow = Smtpflow::start(&pair.local, Some(source));
        let node = NodeExporter::start(&pair.local);
        let server = serve(&pair.local, &format!("{}:25", Pair::LOCAL_V4), 4);
        connect_n(&pair.peer, &format!("{}:25", Pair::LOCAL_V4), 4, false);
        server.join().unwrap();
        send_invalid_segments(&pair.peer, Pair::PEER_V4, Pair::LOCAL_V4, 1);

        let m = assert_equal_when_quiet(&pair.local, &smtpflow, &node, true);
        assert_eq!(value(&m, "smtpflow_conntrack_entries", &[]), 0.0, "{source}: {}", m.text);
        assert!(value(&m, "smtpflow_conntrack_entries_limit", &[]) > 0.0);
        for s in CONNTRACK_STATS {
            assert_eq!(value(&m, "smtpflow_conntrack_stat_total", &[("stat", s)]), 0.0, "{s}");
        }
    }
}

/// A listener with backlog 1 that never accepts, and many connection attempts: the kernel counts
/// listen-queue overflows; smtpflow's count rose from 0 and equals node_exporter's.
#[test]
fn listen_overflows_match_node_exporter() {
    require_root!();
    let pair = Pair::new();
    let smtpflow = Smtpflow::start(&pair.local, None);
    let node = NodeExporter::start(&pair.local);
    let overflows =
        |m: &Metrics| value(m, "smtpflow_tcp_stat_total", &[("stat", "ListenOverflows")]);
    let before = overflows(&smtpflow.scrape(&pair.local));
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
        let n = overflows(&smtpflow.scrape(&pair.local));
        (n > before).then_some(n)
    });
    assert!(rose.is_some(), "no listen overflow counted:\n{}", smtpflow.guard.stderr());
    drop(clients);
    drop(listener);

    let m = assert_equal_when_quiet(&pair.local, &smtpflow, &node, true);
    assert!(overflows(&m) > before);
    assert!(
        value(&m, "smtpflow_tcp_stat_total", &[("stat", "ListenDrops")]) >= overflows(&m),
        "every overflow is also a listen drop:\n{}",
        m.text
    );
}

/// An unknown source in the environment is refused at start, before anything is attached.
#[test]
fn unknown_source_is_refused() {
    require_root!();
    let pair = Pair::new();
    let mut guard = ChildGuard::spawn(
        &pair.local,
        "smtpflow-bad-source",
        &binary(),
        &["watch", "--metrics-addr", METRICS_ADDR, "--iface", Pair::LOCAL_IF],
        &[(SOURCE_ENV, "proc")],
    );
    let child = guard.child.as_mut().unwrap();
    let status = wait_for(Duration::from_secs(20), || child.try_wait().ok().flatten())
        .expect("smtpflow did not exit within 20s");
    assert!(!status.success(), "started with {SOURCE_ENV}=proc");
    let stderr = guard.stderr();
    assert!(stderr.contains("SMTPFLOW_CONNTRACK_SOURCE=\"proc\""), "{stderr}");
    guard.child = None;
}
