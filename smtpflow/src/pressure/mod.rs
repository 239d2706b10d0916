//! The kernel's pressure signals, read in the network namespace smtpflow runs in (that of the
//! watched interfaces): conntrack fill and statistics, and the TCP counters that tell listen
//! queues overflowing. Absent conntrack is a valid state, not an error.
use std::collections::BTreeMap;

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
}
