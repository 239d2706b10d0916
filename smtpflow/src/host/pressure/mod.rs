//! The kernel's pressure signals, read in the network namespace smtpflow runs in (that of the
//! watched interfaces): conntrack fill and statistics, and the TCP counters that tell listen
//! queues overflowing. Absent conntrack is a valid state, not an error.
//!
//! Conntrack's per-CPU statistics come from ctnetlink (`IPCTNL_MSG_CT_GET_STATS_CPU`, see
//! [`ctnetlink`]), because many distribution kernels are built without
//! `/proc/net/stat/nf_conntrack`; that file is the fallback. Entries and limit come from
//! ctnetlink's `IPCTNL_MSG_CT_GET_STATS` with the statistics, else from the sysctls
//! `nf_conntrack_count` and `nf_conntrack_max`. The TCP counters come from `/proc/net/netstat`
//! (`TcpExt`) and `/proc/net/snmp` (`Tcp`). The SMTP listeners' accept queues come from
//! sock_diag ([`sock_diag`]). All of these are per network namespace. The two netlink clients
//! share their socket and message walk ([`netlink`]).
pub mod ctnetlink;
pub mod netlink;
pub mod procfs;
pub mod sock_diag;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
};

/// Conntrack statistics smtpflow reads, summed over CPUs (`stat` label values).
pub const CONNTRACK_STATS: [&str; 5] =
    ["drop", "early_drop", "insert_failed", "invalid", "search_restart"];

/// TCP counters smtpflow reads (`stat` label values): TcpExt's then Tcp's.
pub const TCP_STATS: [&str; 6] = [
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "TCPReqQFullDrop",
    "AttemptFails",
    "EstabResets",
];

/// Where the conntrack statistics came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsSource {
    /// ctnetlink's per-CPU statistics request (works where procfs stats are disabled).
    Netlink,
    /// `/proc/net/stat/nf_conntrack`.
    Procfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conntrack {
    /// `nf_conntrack_count`.
    pub entries: u64,
    /// `nf_conntrack_max`.
    pub limit: u64,
    /// [`CONNTRACK_STATS`] by name, summed over CPUs; empty when neither source could be read.
    pub stats: BTreeMap<&'static str, u64>,
    pub source: Option<StatsSource>,
}

/// One reading of the pressure signals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pressure {
    /// `None`: conntrack is not loaded or not used in this namespace.
    pub conntrack: Option<Conntrack>,
    /// [`TCP_STATS`] by name.
    pub tcp: BTreeMap<&'static str, u64>,
    /// The TCP listeners on the SMTP ports (`--ports`) and their accept queues, sorted; empty
    /// when there are none or sock_diag could not be read.
    pub listeners: Vec<sock_diag::Listener>,
}

/// Environment variable choosing where the conntrack statistics come from: `auto` (the default:
/// ctnetlink, else procfs), `netlink` or `procfs` (only that source; for tests and for kernels
/// where one of them misbehaves).
pub const SOURCE_ENV: &str = "SMTPFLOW_CONNTRACK_SOURCE";

/// Which conntrack statistics sources [`Reader`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceMode {
    Auto,
    Netlink,
    Procfs,
}

impl std::str::FromStr for SourceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "netlink" => Ok(Self::Netlink),
            "procfs" => Ok(Self::Procfs),
            other => Err(format!("{SOURCE_ENV}={other:?}: expected auto, netlink or procfs")),
        }
    }
}

/// Reads [`Pressure`] in the calling thread's network namespace, keeping the ctnetlink socket
/// open between readings. Problems are logged when they start or change, not at every reading.
pub struct Reader {
    mode: SourceMode,
    proc_root: PathBuf,
    netlink: Option<ctnetlink::Socket>,
    /// The SMTP ports whose listeners are read, and the sock_diag socket.
    listen_ports: Vec<u16>,
    sock_diag: Option<sock_diag::Socket>,
    /// The last message logged per topic (`None` once the topic is fine again).
    logged: HashMap<&'static str, String>,
}

fn read_text(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
}

impl Reader {
    /// The mode from [`SOURCE_ENV`] (unset: auto); an unknown value is an error. The
    /// listeners on `listen_ports` (the SMTP ports) are read too.
    pub fn from_env(listen_ports: &[u16]) -> anyhow::Result<Self> {
        let mode = match std::env::var(SOURCE_ENV) {
            Ok(v) if !v.is_empty() => v.parse().map_err(anyhow::Error::msg)?,
            _ => SourceMode::Auto,
        };
        let mut reader = Self::new(mode, "/proc");
        reader.listen_ports = listen_ports.to_vec();
        Ok(reader)
    }

    /// A reader of the files under `proc_root`, and of no listener.
    pub fn new(mode: SourceMode, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            mode,
            proc_root: proc_root.into(),
            netlink: None,
            listen_ports: Vec::new(),
            sock_diag: None,
            logged: HashMap::new(),
        }
    }

    /// Logs `msg` under `topic` unless it is what was logged last for that topic.
    fn note(&mut self, topic: &'static str, warn: bool, msg: String) {
        if self.logged.get(topic) != Some(&msg) {
            if warn {
                log::warn!("{msg}");
            } else {
                log::info!("{msg}");
            }
            self.logged.insert(topic, msg);
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.proc_root.join(rel)
    }

    pub fn read(&mut self) -> Pressure {
        let tcp = match self.read_tcp() {
            Ok(tcp) => {
                self.logged.remove("tcp");
                tcp
            }
            Err(e) => {
                self.note("tcp", true, format!("TCP statistics unavailable: {e:#}"));
                BTreeMap::new()
            }
        };
        let conntrack = self.read_conntrack();
        let state = match &conntrack {
            None => "conntrack is not available in this network namespace".to_owned(),
            Some(Conntrack { source: Some(StatsSource::Netlink), .. }) => {
                "conntrack statistics from ctnetlink".to_owned()
            }
            Some(Conntrack { source: Some(StatsSource::Procfs), .. }) => {
                "conntrack statistics from /proc/net/stat/nf_conntrack".to_owned()
            }
            Some(Conntrack { source: None, .. }) => {
                "conntrack statistics unavailable (entries and limit only)".to_owned()
            }
        };
        self.note("source", false, state);
        let listeners = self.read_listeners();
        Pressure { conntrack, tcp, listeners }
    }

    /// The SMTP listeners' accept queues (none when no port is given).
    fn read_listeners(&mut self) -> Vec<sock_diag::Listener> {
        if self.listen_ports.is_empty() {
            return Vec::new();
        }
        let read = match &mut self.sock_diag {
            Some(s) => s.smtp_listeners(&self.listen_ports),
            None => sock_diag::Socket::open()
                .map_err(netlink::NlError::from)
                .and_then(|s| self.sock_diag.insert(s).smtp_listeners(&self.listen_ports)),
        };
        match read {
            Ok(listeners) => {
                self.logged.remove("sock_diag");
                listeners
            }
            Err(e) => {
                // Reopened at the next reading.
                self.sock_diag = None;
                self.note(
                    "sock_diag",
                    true,
                    format!(
                        "the SMTP listeners' accept queues are unavailable (sock_diag: {e:#}); \
                         listen_overflow then needs SYN drop reasons"
                    ),
                );
                Vec::new()
            }
        }
    }

    fn read_tcp(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let netstat = read_text(&self.path("net/netstat"))?;
        let snmp = read_text(&self.path("net/snmp"))?;
        Ok(procfs::parse_tcp_stats(&netstat, &snmp)?)
    }

    fn read_sysctl(&self, name: &str) -> anyhow::Result<u64> {
        let path = self.path(&format!("sys/net/netfilter/{name}"));
        let text = read_text(&path)?;
        procfs::parse_sysctl_u64(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn read_conntrack(&mut self) -> Option<Conntrack> {
        // The sysctls exist where conntrack is loaded (in every namespace, used or not); where
        // they do not, conntrack is absent. Checking first also keeps a netlink request from
        // loading the modules on demand.
        if !self.path("sys/net/netfilter/nf_conntrack_count").exists() {
            self.netlink = None;
            return None;
        }
        if self.mode != SourceMode::Procfs {
            match self.read_netlink() {
                Ok(ct) => {
                    self.logged.remove("netlink");
                    return Some(ct);
                }
                Err(e) => {
                    // Reopened at the next reading: no stale replies, and a namespace or module
                    // that changed meanwhile is picked up.
                    self.netlink = None;
                    let fallback =
                        if self.mode == SourceMode::Auto { "; reading procfs instead" } else { "" };
                    self.note(
                        "netlink",
                        true,
                        format!("ctnetlink statistics failed: {e:#}{fallback}"),
                    );
                }
            }
        }
        let (entries, limit) =
            match (self.read_sysctl("nf_conntrack_count"), self.read_sysctl("nf_conntrack_max")) {
                (Ok(e), Ok(l)) => {
                    self.logged.remove("sysctl");
                    (e, l)
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.note("sysctl", true, format!("conntrack sysctls unreadable: {e:#}"));
                    return None;
                }
            };
        let mut ct = Conntrack { entries, limit, stats: BTreeMap::new(), source: None };
        if self.mode == SourceMode::Netlink {
            return Some(ct);
        }
        let path = self.path("net/stat/nf_conntrack");
        match read_text(&path)
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(procfs::parse_conntrack_stat(&t)?))
        {
            Ok(stats) => {
                self.logged.remove("procfs");
                ct.stats = stats;
                ct.source = Some(StatsSource::Procfs);
            }
            Err(e) => {
                self.note("procfs", true, format!("{}: {e:#}", path.display()));
            }
        }
        Some(ct)
    }

    fn read_netlink(&mut self) -> anyhow::Result<Conntrack> {
        let socket = match &mut self.netlink {
            Some(s) => s,
            None => self.netlink.insert(ctnetlink::Socket::open()?),
        };
        let global = socket.global()?;
        let stats = socket.cpu_stats()?;
        let limit = match global.max_entries {
            Some(max) => max,
            None => self.read_sysctl("nf_conntrack_max")?,
        };
        Ok(Conntrack { entries: global.entries, limit, stats, source: Some(StatsSource::Netlink) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc tree from the captures in testdata/.
    fn fake_proc(with_stat: bool, with_conntrack: bool) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "smtpflow-pressure-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/host/pressure/testdata");
        let put = |rel: &str, file: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::copy(data.join(file), p).unwrap();
        };
        put("net/netstat", "netstat");
        put("net/snmp", "snmp");
        std::fs::create_dir_all(root.join("sys/net/netfilter")).unwrap();
        if with_conntrack {
            put("sys/net/netfilter/nf_conntrack_count", "nf_conntrack_count");
            put("sys/net/netfilter/nf_conntrack_max", "nf_conntrack_max");
            if with_stat {
                put("net/stat/nf_conntrack", "nf_conntrack.stat");
            }
        }
        root
    }

    #[test]
    fn procfs_source() {
        let root = fake_proc(true, true);
        let p = Reader::new(SourceMode::Procfs, &root).read();
        let ct = p.conntrack.unwrap();
        assert_eq!((ct.entries, ct.limit, ct.source), (5, 262_144, Some(StatsSource::Procfs)));
        assert_eq!(ct.stats["invalid"], 9);
        assert_eq!(ct.stats.len(), CONNTRACK_STATS.len());
        assert_eq!(p.tcp["ListenOverflows"], 18);
        assert_eq!(p.tcp.len(), TCP_STATS.len());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn absent_conntrack_is_none_and_stats_file_optional() {
        let root = fake_proc(false, false);
        let p = Reader::new(SourceMode::Auto, &root).read();
        assert_eq!(p.conntrack, None);
        assert_eq!(p.tcp.len(), TCP_STATS.len());
        std::fs::remove_dir_all(root).unwrap();

        // Sysctls but no /proc/net/stat/nf_conntrack (a kernel built without it): entries and
        // limit, no statistics.
        let root = fake_proc(false, true);
        let ct = Reader::new(SourceMode::Procfs, &root).read().conntrack.unwrap();
        assert_eq!((ct.entries, ct.limit, ct.source), (5, 262_144, None));
        assert!(ct.stats.is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The real socket against this kernel, in the test's own namespace: the same numbers as
    /// procfs (root only; compared when procfs reads the same before and after).
    #[test]
    fn live_netlink_agrees_with_procfs() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/proc/net/stat/nf_conntrack").exists() {
            eprintln!("SKIPPED: needs root and conntrack");
            return;
        }
        let procfs = || {
            let stats = procfs::parse_conntrack_stat(
                &std::fs::read_to_string("/proc/net/stat/nf_conntrack").unwrap(),
            )
            .unwrap();
            let count = procfs::parse_sysctl_u64(
                &std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").unwrap(),
            )
            .unwrap();
            (stats, count)
        };
        let mut socket = ctnetlink::Socket::open().unwrap();
        for _ in 0..50 {
            let before = procfs();
            let global = socket.global().unwrap();
            let stats = socket.cpu_stats().unwrap();
            if procfs() != before {
                continue;
            }
            assert_eq!(stats, before.0);
            assert_eq!(global.entries, before.1);
            let max = procfs::parse_sysctl_u64(
                &std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap(),
            )
            .unwrap();
            assert_eq!(global.max_entries, Some(max));
            return;
        }
        panic!("conntrack never stood still for a comparison");
    }

    #[test]
    fn source_mode_parsing() {
        assert_eq!("auto".parse::<SourceMode>(), Ok(SourceMode::Auto));
        assert_eq!("netlink".parse::<SourceMode>(), Ok(SourceMode::Netlink));
        assert_eq!("procfs".parse::<SourceMode>(), Ok(SourceMode::Procfs));
        assert!("proc".parse::<SourceMode>().is_err());
    }
}
