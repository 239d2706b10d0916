//! Namespaces and cleanup for the benchmarks, and the few raw BPF syscalls aya does not offer
//! on a program found by id. The processes they run are the test support's
//! ([`smtpflow_tests::process::Process`], [`Watch`]), stopped on drop.
//!
//! Every namespace the benchmarks create is registered here; on SIGINT/SIGTERM/SIGHUP a signal
//! thread kills every process inside them (all the benchmarks start: smtpflow, iperf3,
//! tcpdump) and deletes them, then exits. Per-program accounting is turned on with a
//! `BPF_ENABLE_STATS` file descriptor, never with the `kernel.bpf_stats_enabled` sysctl, so
//! there is no system setting to restore: the kernel drops the accounting when the descriptor
//! closes, even if this process is killed.
use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicI32, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::bail;
use smtpflow_tests::{Netns, Pair, Watch, smtpflow::METRICS_ADDR};

/// The namespaces to remove if the run is interrupted.
static NETNS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

pub fn register_netns(ns: &Netns) {
    NETNS.lock().unwrap_or_else(|e| e.into_inner()).push(ns.name.clone());
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `b` outlives the call.
    unsafe { libc::write(fd, (&raw const b).cast(), 1) };
}

/// Removes everything registered: kills the processes in the namespaces, deletes them.
fn cleanup_all() {
    let mut netns = NETNS.lock().unwrap_or_else(|e| e.into_inner());
    for ns in netns.drain(..) {
        let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
        let pids =
            pids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() {
                // SAFETY: plain syscall on a process we started (all in our namespaces are).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
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

/// `smtpflow watch` (the binary given to the benchmarks) on the gateway's interface
/// ([`Pair::LOCAL_IF`]) in `gw`, with metrics on [`METRICS_ADDR`], no status lines, and `flags`;
/// once it serves (30 s at most).
pub fn watch(gw: &Netns, flags: &[&str]) -> anyhow::Result<Watch> {
    let common =
        ["--metrics-addr", METRICS_ADDR, "--iface", Pair::LOCAL_IF, "--status-every", "0s"];
    let args = [&common[..], flags].concat();
    Ok(Watch::try_launch(gw, &args, METRICS_ADDR, Duration::from_secs(30))?)
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

/// Peak RSS (`VmHWM`) of a process, in bytes (0 if unknown).
pub fn peak_rss(pid: u32) -> u64 {
    smtpflow_tests::procfs::status_kib(pid, "VmHWM").map_or(0, |kib| kib * 1024)
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
/// The median over rounds of each round's `runs` / that round's `reference` (the run with no
/// observer): slow drifts of a shared machine cancel better so than between medians.
pub fn median_ratio(runs: &[f64], reference: &[f64]) -> f64 {
    median(&mut runs.iter().zip(reference).map(|(x, r)| x / r).collect::<Vec<_>>())
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}
