//! What the kernel says through `/proc` and `/sys`: a process's threads, capabilities, user and
//! memory, the sockets it holds, a namespace's TCP statistics, sysctls and interface counters,
//! and the kernel-wide `nf_conntrack_max` lowered for a while.
use std::{
    collections::BTreeSet,
    io,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Netns, process::Process};

/// `CAP_NET_ADMIN` in a capability set.
pub const CAP_NET_ADMIN: u64 = 1 << 12;

/// `/proc/<pid>/task/<tid>/status` of every thread of `pid`, by tid.
pub fn thread_statuses(pid: u32) -> Vec<(u32, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out: Vec<(u32, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("{dir}/{tid}/status")).ok()?;
            Some((tid, status))
        })
        .collect();
    out.sort();
    out
}

/// The value of field `name` in a `/proc/.../status` text.
pub fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
}

/// A hex capability set (`CapEff`, `CapPrm`, `CapBnd`, `CapAmb`, `CapInh`) of a status text.
pub fn caps(status: &str, name: &str) -> u64 {
    let v = status_field(status, name).unwrap_or_else(|| panic!("no {name} in:\n{status}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("bad {name} {v:?}"))
}

/// `/proc/<pid>/status` (of the main thread).
pub fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&s, name)?.trim_end_matches("kB").trim().parse().ok()
}

/// `CapEff` of this (test) process: the full set the environment allows.
pub fn own_effective_caps() -> u64 {
    caps(&std::fs::read_to_string("/proc/self/status").expect("/proc/self/status"), "CapEff")
}

/// Raises this process's open-file soft limit to its hard limit (many sockets at once).
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// A statistics counter of an interface (`rx_packets`, `rx_dropped`, ...) as its namespace sees it.
pub fn iface_stat(ns: &Netns, ifname: &str, stat: &str) -> u64 {
    ns.exec_ok("cat", &[&format!("/sys/class/net/{ifname}/statistics/{stat}")])
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad {stat} of {ifname}"))
}

/// A counter of `/proc/net/netstat` (e.g. `TcpExt`, `ListenOverflows`) as the namespace sees it.
pub fn netstat(ns: &Netns, group: &str, name: &str) -> u64 {
    let text = ns.exec_ok("cat", &["/proc/net/netstat"]);
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 2, "no {group} header and values in /proc/net/netstat:\n{text}");
    let names = lines[0].split_whitespace().skip(1);
    let values = lines[1].split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/netstat:\n{text}"))
}

/// Established TCP connections to `port` that process `pid` holds open (its socket fds matched
/// with its namespace's `/proc/<pid>/net/tcp{,6}`).
pub fn connections_held(pid: u32, port: u16) -> usize {
    let mut inodes = BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next());
            if local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && f.get(3) == Some(&"01")
                && let Some(inode) = f.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| inodes.contains(l.to_string_lossy().as_ref()))
        .count()
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
    watchdog: Option<Process>,
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
        let mut guard = Self {
            original,
            lowered: to,
            since: Instant::now(),
            watchdog: Some(Process::adopt(watchdog, "the nf_conntrack_max watchdog")),
        };
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
        // Dropped: SIGTERM, and its trap finds the value restored and leaves it.
        self.watchdog = None;
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

/// The possible CPUs (`/sys/devices/system/cpu/possible`, as `0-N`), as the kernel's per-CPU
/// lists count them.
pub fn possible_cpus() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    let last = text.trim().rsplit(['-', ',']).next().expect("a CPU range");
    last.parse::<u64>().expect("a CPU number") + 1
}

/// The room smtpflow creates each kernel LRU map with beyond what `--max-peers` or
/// `--max-flows` asks: 128 × (possible CPUs + 1), the free entries Linux's LRU may keep aside
/// (see the README's "Map sizes"). A map holds up to its capacity plus this before it evicts.
pub fn lru_room() -> u64 {
    128 * (possible_cpus() + 1)
}
