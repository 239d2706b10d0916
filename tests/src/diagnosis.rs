//! Support for the diagnosis tests: reading the `smtpflow_diagnosis*` families of a scrape, the
//! global conntrack limit lowered for a few seconds (and restored on every exit path), steady
//! background SMTP traffic, and the one-shot `smtpflow diagnose` command.
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{Metrics, Netns, smtp, stop_child, wait_for, watch::binary};

/// Every cause smtpflow decides, in its report order.
pub const CAUSES: [&str; 7] = [
    "conntrack_exhaustion",
    "listen_overflow",
    "remote_throttling",
    "remote_unreachable",
    "remote_refusing",
    "local_receive_stall",
    "peer_receive_stall",
];

pub const DIAGNOSIS: &str = "smtpflow_diagnosis";
pub const EVIDENCE: &str = "smtpflow_diagnosis_evidence";
pub const TOP_PEER: &str = "smtpflow_diagnosis_top_peer";

/// `smtpflow_diagnosis{cause}` of a scrape, by cause.
pub fn causes(m: &Metrics) -> BTreeMap<String, f64> {
    m.matching(DIAGNOSIS, &[])
        .map(|(labels, v)| {
            let cause = labels.iter().find(|(k, _)| k == "cause").map(|(_, c)| c.clone());
            (cause.unwrap_or_default(), v)
        })
        .collect()
}

/// The causes whose gauge is 1, in report order. Panics unless exactly the seven causes are
/// exported, each as 0 or 1.
pub fn active(m: &Metrics) -> Vec<&'static str> {
    let all = causes(m);
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    let mut want = CAUSES.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "smtpflow_diagnosis must carry every cause:\n{}", m.text);
    for (cause, v) in &all {
        assert!(*v == 0.0 || *v == 1.0, "smtpflow_diagnosis{{cause={cause:?}}} = {v}");
    }
    CAUSES.into_iter().filter(|c| all[*c] == 1.0).collect()
}

/// One evidence number: `smtpflow_diagnosis_evidence{cause,evidence}` (panics when absent).
pub fn evidence(m: &Metrics, cause: &str, name: &str) -> f64 {
    m.get(EVIDENCE, &[("cause", cause), ("evidence", name)])
        .unwrap_or_else(|| panic!("{EVIDENCE}{{cause={cause:?},evidence={name:?}}} missing"))
}

/// Every evidence number of a cause, by name.
pub fn evidence_of(m: &Metrics, cause: &str) -> BTreeMap<String, f64> {
    m.matching(EVIDENCE, &[("cause", cause)])
        .map(|(labels, v)| {
            let name = labels.iter().find(|(k, _)| k == "evidence").map(|(_, n)| n.clone());
            (name.unwrap_or_default(), v)
        })
        .collect()
}

/// `smtpflow_diagnosis_top_peer` of a cause, as `(iface, peer, count)`.
pub fn top_peers(m: &Metrics, cause: &str) -> Vec<(String, String, f64)> {
    m.matching(TOP_PEER, &[("cause", cause)])
        .map(|(labels, v)| {
            let get = |key: &str| {
                labels.iter().find(|(k, _)| k == key).map(|(_, x)| x.clone()).unwrap_or_default()
            };
            (get("iface"), get("peer"), v)
        })
        .collect()
}

/// The lines of smtpflow's log that say a cause turned on or off (`diagnosis: ...`).
pub fn diagnosis_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("diagnosis: ")).collect()
}

/// A sysctl of the namespace `ns`, as a number (`ip netns exec` shows the namespace's own
/// `/proc/sys/net`).
pub fn ns_sysctl(ns: &Netns, path: &str) -> u64 {
    let out = ns.exec_ok("cat", &[path]);
    out.trim().parse().unwrap_or_else(|_| panic!("{path} in {}: {out:?}", ns.name))
}

pub const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
pub const CONNTRACK_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";

fn read_number(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.trim().parse().unwrap_or_else(|_| panic!("{path}: {text:?}"))
}

/// The kernel-wide `nf_conntrack_max` (read in the initial namespace, where the tests run).
pub fn conntrack_max() -> u64 {
    read_number(CONNTRACK_MAX)
}

/// The global `nf_conntrack_max` lowered for a short time. It is a single kernel-wide value
/// (writable only from the initial network namespace, where the test process runs) that limits
/// every namespace's table, so it is restored:
/// - on drop (a passing test, and a panicking one while it unwinds);
/// - by a watchdog shell started before the value is lowered, in its own process group (so a
///   signal to the test's group does not take it along): its `trap` restores the value when it
///   exits for any reason (the test process gone, e.g. killed or aborted; a signal to the
///   watchdog itself; or the `backstop` deadline passed). It restores only while the value is
///   still the lowered one, so it never overwrites a later change.
pub struct ConntrackMax {
    pub original: u64,
    pub lowered: u64,
    pub since: Instant,
    watchdog: Option<Child>,
}

impl ConntrackMax {
    pub fn lower(to: u64, backstop: Duration) -> Self {
        let original = read_number(CONNTRACK_MAX);
        assert!(0 < to && to < original, "lowering nf_conntrack_max from {original} to {to}?");
        let script = format!(
            r#"restore() {{
    if [ "$(cat {CONNTRACK_MAX})" = "{to}" ]; then echo {original} > {CONNTRACK_MAX}; fi
}}
trap restore EXIT
trap 'exit 0' INT TERM HUP
end=$(( $(date +%s) + {secs} ))
echo armed
while kill -0 {pid} 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.05; done
"#,
            secs = backstop.as_secs().max(1),
            pid = std::process::id(),
        );
        let mut watchdog = Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the nf_conntrack_max watchdog");
        // Lower only once the watchdog's traps are set.
        let mut line = [0u8; 6];
        let mut out = watchdog.stdout.take().expect("watchdog stdout");
        io::Read::read_exact(&mut out, &mut line).expect("the watchdog did not start");
        assert_eq!(&line, b"armed\n");
        let mut guard =
            Self { original, lowered: to, since: Instant::now(), watchdog: Some(watchdog) };
        std::fs::write(CONNTRACK_MAX, to.to_string())
            .unwrap_or_else(|e| panic!("write {to} to {CONNTRACK_MAX} (initial namespace?): {e}"));
        guard.since = Instant::now();
        assert_eq!(read_number(CONNTRACK_MAX), to);
        guard
    }

    /// Restores the original value now (also what drop does).
    pub fn restore(&mut self) {
        if let Err(e) = std::fs::write(CONNTRACK_MAX, self.original.to_string()) {
            eprintln!("restoring {CONNTRACK_MAX} to {} failed: {e}", self.original);
        }
        // SIGTERM: its trap finds the value restored and leaves it.
        stop_child(&mut self.watchdog, Duration::from_secs(5));
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        self.restore();
        let now = read_number(CONNTRACK_MAX);
        if now != self.original {
            eprintln!("{CONNTRACK_MAX} is {now} after restoring {}", self.original);
        }
    }
}

/// What one background action reported.
pub type Outcome = Result<(), String>;

/// An action repeated at a steady rate on a thread inside a namespace, until stopped (or
/// dropped). Each action must bound its own duration.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, Outcome)>>>,
}

impl Traffic {
    pub fn start(
        ns: &Netns,
        every: Duration,
        mut action: impl FnMut() -> Outcome + Send + 'static,
    ) -> Self {
        let path = format!("/run/netns/{}", ns.name);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            let mut done = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                done.push((Instant::now(), action()));
                next += every;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            done
        });
        Self { stop, thread: Some(thread) }
    }

    /// Polite SMTP sessions to `addr` (220 greeting, QUIT, 221), one every `every`.
    pub fn sessions(ns: &Netns, addr: &str, every: Duration) -> Self {
        let addr: SocketAddr = addr.parse().expect("socket address");
        Self::start(ns, every, move || match smtp::session(addr, Duration::from_secs(3)) {
            Ok(s) if s.replies == [220, 221] => Ok(()),
            Ok(s) => Err(format!("{addr}: replies {:?}", s.replies)),
            Err(e) => Err(format!("{addr}: {e}")),
        })
    }

    /// Stops and returns every action's start time and outcome.
    pub fn stop(mut self) -> Vec<(Instant, Outcome)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().expect("traffic thread")).unwrap_or_default()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connection attempts to `addr`, all at once (a thread each, on the calling thread's
/// namespace), each given up after `timeout`. Connections that succeed are returned open.
pub fn burst(addr: SocketAddr, n: usize, timeout: Duration) -> Vec<io::Result<TcpStream>> {
    let threads: Vec<_> =
        (0..n).map(|_| thread::spawn(move || TcpStream::connect_timeout(&addr, timeout))).collect();
    threads.into_iter().map(|t| t.join().expect("connect thread")).collect()
}

/// A running `smtpflow diagnose` (killed on drop), its output in files.
pub struct Diagnose {
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    pub started: Instant,
}

/// What a finished `smtpflow diagnose` printed.
#[derive(Debug)]
pub struct Verdict {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Diagnose {
    /// Starts `smtpflow diagnose <args>` inside `ns`.
    pub fn start(ns: &Netns, args: &[&str]) -> Self {
        let tag = format!("{}-diagnose-{}", ns.name, unique());
        let stdout_path = std::env::temp_dir().join(format!("{tag}.stdout"));
        let stderr_path = std::env::temp_dir().join(format!("{tag}.stderr"));
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary())
            .arg("diagnose")
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("stdout file"))
            .stderr(File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn smtpflow diagnose");
        Self { child: Some(child), stdout_path, stderr_path, started }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (at most 20 s) until its log says the pressure signals were read for the first
    /// time: the first drain, the baseline the verdict is measured from, is then taken, so
    /// anything that happens afterwards is inside the observed period.
    pub fn wait_observing(&mut self) {
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("smtpflow diagnose exited early ({status}):\n{}", self.stderr());
            }
            self.stderr().contains("conntrack statistics from").then_some(())
        });
        assert!(
            ok.is_some(),
            "smtpflow diagnose did not start observing within 20s:\n{}",
            self.stderr()
        );
    }

    /// Waits at most `timeout` for it to exit (killed and a panic after that).
    pub fn finish(mut self, timeout: Duration) -> Verdict {
        let mut child = self.child.take().expect("running");
        let status = wait_for(timeout, || child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smtpflow diagnose still ran after {timeout:?}; killed it:\n{}", self.stderr());
        };
        Verdict {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: self.stderr(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Diagnose {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.stdout_path);
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn unique() -> u32 {
    use std::sync::atomic::AtomicU32;
    static SEQ: AtomicU32 = AtomicU32::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}
