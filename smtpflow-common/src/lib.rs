//! Types and rules shared by the smtpflow kernel programs and the userspace loader.
//!
//! Everything the kernel writes into a map and userspace reads back is defined here once, as
//! `#[repr(C)]` structs with no implicit padding, so the two sides cannot disagree. The event
//! classification rules (which TCP packet is which event, which port is the SMTP port, which side
//! is the client) live here too: the kernel calls them per packet and the unit tests pin them.
#![no_std]

#[macro_use]
mod labels;

pub mod counter;
pub mod flow;
pub mod icmp;
pub mod payload;
pub mod peer;
pub mod reference;
pub mod reply;
pub mod rules;
pub mod tls;
#[cfg(feature = "user")]
pub mod user;

pub use counter::{Counter, CounterKey, Scope, Stat};
pub use flow::{
    FlowKey, FlowState, HIST_BOUNDS_NS, HIST_BUCKETS, HistKey, HistKind, Histogram, Outcome, Phase,
};
pub use icmp::UnreachableReason;
pub use payload::{PayloadEvent, PayloadKind};
pub use peer::{FAMILY_V4, FAMILY_V6, PeerCounters, PeerGreetingKey, PeerKey};
pub use reply::{ReplyClass, ReplyStatus, StarttlsStage};
pub use rules::{Direction, Event, PortMatch, Side, classify, direction_of, smtp_port};

/// Most SMTP ports the kernel program matches (`--ports`).
pub const MAX_PORTS: usize = 16;

/// Names of the kernel objects, used by the loader and the tests.
pub mod names {
    pub const PROG_TC_INGRESS: &str = "smtpflow_tc_in";
    pub const PROG_TC_EGRESS: &str = "smtpflow_tc_out";
    pub const PROG_XDP: &str = "smtpflow_xdp";
    pub const PROG_SKB_DROP: &str = "smtpflow_drop";
    pub const PROG_LISTEN_OVERFLOW: &str = "smtpflow_lovf";
    pub const GLOBAL_CONFIG: &str = "CONFIG";
    pub const GLOBAL_DROP_CONFIG: &str = "DROP_CONFIG";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_PEERS: &str = "PEERS";
    pub const MAP_PEER_GREETINGS: &str = "PEER_GREETINGS";
    pub const MAP_FLOWS: &str = "FLOWS";
    pub const MAP_HISTS: &str = "HISTS";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_PAYLOADS: &str = "PAYLOADS";
}

/// Default capacity of the per-peer LRU map (`--max-peers`).
pub const DEFAULT_MAX_PEERS: u32 = 65_536;
/// Default `--handshake-timeout`: between Linux's SYN retransmissions at 3 s and 7 s, so that
/// an attempt answered after one retransmission is not a timeout.
pub const DEFAULT_HANDSHAKE_TIMEOUT_NS: u64 = 5_000_000_000;
/// Default capacity of the per-connection LRU map (`--max-flows`).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Most interfaces one smtpflow watches.
pub const MAX_IFACES: usize = 32;
/// Capacity of the exact counters map. The seeded keys of every watched interface, port and
/// direction are created up front ([`Counter::seeded`]); the rest holds reply codes and drop
/// reasons as they appear.
pub const COUNTERS_CAPACITY: u32 = 65_536;
const _: () = assert!(
    MAX_IFACES * MAX_PORTS * 2 * Counter::SEEDED_PER_SCOPE < COUNTERS_CAPACITY as usize / 2,
    "at least half of the counters map stays free for reply codes and drop reasons"
);
/// Capacity of the duration histograms map: interfaces x ports x directions x kinds.
pub const HISTS_CAPACITY: u32 =
    (MAX_IFACES * MAX_PORTS * Direction::COUNT * HistKind::COUNT) as u32;

/// Runtime configuration, a read-only global of the kernel object set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// SMTP ports in host byte order; only the first `port_count` are used.
    pub ports: [u16; MAX_PORTS],
    pub port_count: u32,
    /// Bit `i` set: `ports[i]` carries plaintext SMTP, whose server replies are read.
    pub plaintext_mask: u32,
    /// `--handshake-timeout` in nanoseconds: an answer (SYN-ACK, RST, or the client's ACK in
    /// XDP mode) later than this after the first SYN is late and decides no outcome (userspace
    /// counts the attempt as a timeout). 0: no answer is late.
    pub handshake_timeout_ns: u64,
    /// The same ports as a set: bit `p % 64` of word `p / 64` is set when port `p` is one of
    /// `ports`. The per-packet filter, so that a segment of any other port costs two loads.
    pub port_set: [u64; PORT_SET_WORDS],
}

/// Words of [`Config::port_set`]: one bit per TCP port.
pub const PORT_SET_WORDS: usize = (u16::MAX as usize + 1) / 64;

impl Config {
    pub const EMPTY: Self = Self {
        ports: [0; MAX_PORTS],
        port_count: 0,
        plaintext_mask: 0,
        handshake_timeout_ns: 0,
        port_set: [0; PORT_SET_WORDS],
    };

    /// Whether `port` is one of the SMTP ports.
    #[inline(always)]
    pub fn is_smtp_port(&self, port: u16) -> bool {
        let word = self.port_set[usize::from(port >> 6)];
        word >> (port & 63) & 1 != 0
    }

    /// The configured ports, as a slice.
    pub fn ports(&self) -> &[u16] {
        let n = (self.port_count as usize).min(MAX_PORTS);
        &self.ports[..n]
    }

    /// Whether replies on the port at `index` of `ports` are read.
    #[inline(always)]
    pub const fn is_plaintext(&self, index: usize) -> bool {
        index < MAX_PORTS && self.plaintext_mask & (1 << index) != 0
    }
}

/// Offsets into kernel structures, read from the running kernel's BTF by the loader (Rust eBPF
/// has no CO-RE), for the `kfree_skb` program. `enabled` 0 turns the program into a no-op.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropConfig {
    pub enabled: u32,
    /// Network namespace (inode number) to count drops in; 0: every namespace.
    pub netns_inum: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_iif: u32,
    pub dev_nd_net: u32,
    pub sk_net: u32,
    pub net_ns_inum: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    /// The code counted for SYNs and handshake ACKs dropped on a full accept queue: the
    /// kernel's `TCP_LISTEN_OVERFLOW` reason where it has one, else [`LISTEN_OVERFLOW_CODE`].
    pub listen_overflow_reason: u32,
}

/// The drop-reason code used for listen-queue overflow on kernels whose `enum skb_drop_reason`
/// has no `TCP_LISTEN_OVERFLOW`; userspace names it so.
pub const LISTEN_OVERFLOW_CODE: u16 = 0xffff;

impl DropConfig {
    pub const DISABLED: Self = Self {
        enabled: 0,
        netns_inum: 0,
        skb_head: 0,
        skb_network_header: 0,
        skb_dev: 0,
        skb_sk: 0,
        skb_iif: 0,
        dev_nd_net: 0,
        sk_net: 0,
        net_ns_inum: 0,
        sk_ack_backlog: 0,
        sk_max_ack_backlog: 0,
        listen_overflow_reason: 0,
    };
}

const _: () = {
    assert!(size_of::<Config>() == 48 + 8 * PORT_SET_WORDS);
    assert!(size_of::<DropConfig>() == 52);
};
