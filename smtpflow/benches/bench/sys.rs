//! Processes, namespaces and cleanup for the benchmarks, and the few raw BPF syscalls aya does
//! not offer on a program found by id.
//!
//! Everything the benchmarks start (namespaces, smtpflow, iperf3, tcpdump) is registered here
//! and removed on drop, after a panic, and on SIGINT/SIGTERM/SIGHUP (a signal thread cleans up
//! and exits). Per-program accounting is turned on with a `BPF_ENABLE_STATS` file descriptor,
//! never with the `kernel.bpf_stats_enabled` sysctl, so there is no system setting to restore:
//! the kernel drops the accounting when the descriptor closes, even if this process is killed.
use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicI32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use smtpflow_tests::Netns;

/// What to remove if the run is interrupted.
struct Registry {
    netns: Vec<String>,
    pids: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { netns: Vec::new(), pids: Vec::new() });
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn register_netns(ns: &Netns) {
    registry().netns.push(ns.name.clone());
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `b` outlives the call.
    unsafe { libc::write(fd, (&raw const b).cast(), 1) };
}

/// Removes everything registered: kills the processes, deletes the namespaces.
fn cleanup_all() {
    let mut r = registry();
    for pid in r.pids.drain(..) {
        // SAFETY: plain syscall on a process we started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    for ns in r.netns.drain(..) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}

/// Installs the SIGINT/SIGTERM/SIGHUP cleanup. Child processes keep the default handlers (exec
/// resets caught signals).
pub fn install_signal_cleanup() -> anyhow::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls with valid pointers; the handler only writes to the pipe.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            bail!("pipe2: {}", std::io::Error::last_os_error());
        }
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                bail!("sigaction: {}", std::io::Error::last_os_error());
            }
        }
    }
    let read_fd = fds[0];
    thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(read_fd, (&raw mut b).cast(), 1) };
        if n == 1 {
            eprintln!("\nbench: signal {b}: cleaning up (processes, namespaces) and exiting");
            cleanup_all();
            std::process::exit(128 + i32::from(b));
        }
    });
    Ok(())
}

/// The gateway/peer namespace pair of the integration tests, registered for cleanup.
pub fn pair() -> smtpflow_tests::Pair {
    let p = smtpflow_tests::Pair::new();
    register_netns(&p.local);
    register_netns(&p.peer);
    p
}

/// A process started in a namespace (through `ip netns exec`, which execs it, so the pid is the
/// program's own), stopped on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl Proc {
    pub fn spawn(ns: &Netns, cmd: &str, args: &[&str]) -> anyhow::Result<Self> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "smtpflow-bench-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr_path = base.with_extension("stderr");
        let stdout_path = base.with_extension("stdout");
        let stderr = std::fs::File::create(&stderr_path)?;
        let stdout = std::fs::File::create(&stdout_path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, cmd])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {cmd}"))?;
        registry().pids.push(child.id());
        Ok(Self { child: Some(child), name: cmd.to_owned(), stderr_path, stdout_path })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Fails with its stderr if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("{} exited ({status}):\n{}", self.name, self.stderr());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        registry().pids.retain(|p| *p != child.id());
    }

    /// Waits for the process to exit by itself, at most `timeout`; then stops it.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else { bail!("{} already stopped", self.name) };
            if let Some(status) = child.try_wait()? {
                let id = child.id();
                self.child = None;
                registry().pids.retain(|p| *p != id);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.stop(Duration::from_secs(1));
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.stderr_path);
        let _ = std::fs::remove_file(&self.stdout_path);
    }
}

/// Where smtpflow serves metrics inside the gateway namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9925";

/// A running `smtpflow watch` in a namespace.
pub struct Smtpflow {
    pub proc: Proc,
}

impl Smtpflow {
    /// Starts `smtpflow watch --metrics-addr METRICS_ADDR <args>` and waits until it serves.
    pub fn start(bin: &str, ns: &Netns, args: &[&str]) -> anyhow::Result<Self> {
        let mut full = vec!["watch", "--metrics-addr", METRICS_ADDR];
        full.extend_from_slice(args);
        let mut proc = Proc::spawn(ns, bin, &full)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.check_running()?;
            if matches!(http_get(ns, "/healthz"), Ok((200, _, _))) {
                return Ok(Self { proc });
            }
            if Instant::now() >= deadline {
                bail!("smtpflow did not serve /healthz within 30s:\n{}", proc.stderr());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `GET /metrics`: the body and how long the request took (connect to last byte).
    pub fn scrape(&self, ns: &Netns) -> anyhow::Result<(String, Duration)> {
        let (status, body, took) = http_get(ns, "/metrics")?;
        if status != 200 {
            bail!("GET /metrics: status {status}");
        }
        Ok((body, took))
    }
}

/// HTTP GET of `path` on [`METRICS_ADDR`] inside `ns` (the tests' HTTP client): status, body,
/// time taken.
pub fn http_get(ns: &Netns, path: &str) -> anyhow::Result<(u16, String, Duration)> {
    let started = Instant::now();
    let reply = smtpflow_tests::http::get(ns, METRICS_ADDR, path)
        .with_context(|| format!("GET {path} on {METRICS_ADDR}"))?;
    Ok((reply.status, reply.body, started.elapsed()))
}

/// The value of an unlabelled (or first matching) sample in Prometheus text.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let matches = match series.split_once('{') {
            Some((n, rest)) => n == name && rest.contains(labels),
            None => series == name && labels.is_empty(),
        };
        if matches { value.parse().ok() } else { None }
    })
}

/// CPU time of every thread of a process (from schedstat, in ns).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `VmHWM` (peak) and `VmRSS` of a process, in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A network interface's packet counters inside a namespace: (rx, tx).
pub fn link_packets(ns: &Netns, ifname: &str) -> anyhow::Result<(u64, u64)> {
    let out = ns.exec_ok(
        "cat",
        &[
            &format!("/sys/class/net/{ifname}/statistics/rx_packets"),
            &format!("/sys/class/net/{ifname}/statistics/tx_packets"),
        ],
    );
    let mut it = out.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(rx)), Some(Ok(tx))) => Ok((rx, tx)),
        _ => bail!("cannot read the packet counters of {ifname}: {out:?}"),
    }
}

/// `struct __sk_buff` up to and including `ifindex` (the only field we set).
const SKB_CTX_LEN: usize = 44;
const SKB_IFINDEX_OFFSET: usize = 40;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `BPF_PROG_TEST_RUN` of a TC program on one frame, as if received on `ifindex` (looked up in
/// the calling thread's network namespace). Used on the running smtpflow's own program, found
/// by id, which aya cannot test-run. Returns the program's return value.
pub fn test_run_skb(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32) -> std::io::Result<u32> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4].copy_from_slice(&ifindex.to_ne_bytes());
    // Zeroed whole, padding included: the kernel rejects non-zero bytes past the last field.
    // SAFETY: all-zero bytes are a valid TestRunAttr.
    let mut attr: TestRunAttr = unsafe { std::mem::zeroed() };
    attr.prog_fd = prog.as_raw_fd() as u32;
    attr.data_size_in = frame.len() as u32;
    attr.data_in = frame.as_ptr() as u64;
    attr.repeat = 1;
    attr.ctx_size_in = ctx.len() as u32;
    attr.ctx_in = ctx.as_ptr() as u64;
    // SAFETY: `attr` is a valid bpf_attr for this command; its buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.retval)
}

/// Median of a non-empty list.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}
