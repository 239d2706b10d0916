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
pub mod flow_table;
pub mod icmp;
pub mod payload;
pub mod peer;
pub mod reference;
pub mod reply;
pub mod rules;
pub mod tls;
#[cfg(feature = "user")]
pub mod user;

pub use counter::{Counter, CounterKey, SCOPE_SLOTS, Scope, Stat};
pub use flow::{
    FlowKey, FlowState, HIST_BOUNDS_NS, HIST_BUCKETS, HistKey, HistKind, Histogram, Outcome, Phase,
};
pub use icmp::UnreachableReason;
pub use payload::{PayloadEvent, PayloadKind};
pub use peer::{FAMILY_V4, FAMILY_V6, PeerCounters, PeerGreetingKey, PeerKey, PeerRecord};
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
    pub const MAP_FLOW_TAGS: &str = "FLOW_TAGS";
    pub const MAP_HISTS: &str = "HISTS";
    pub const MAP_SCOPE_COUNTS: &str = "SCOPE_COUNTS";
    pub const MAP_SCOPES: &str = "SCOPES";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_PAYLOADS: &str = "PAYLOADS";
    pub const MAP_PEER_LOG: &str = "PEER_LOG";
    /// The log target of the programs' aya-log reports: `--log-level debug`, or
    /// `RUST_LOG=smtpflow::kernel=debug`, shows them.
    pub const KERNEL_LOG_TARGET: &str = "smtpflow::kernel";
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
/// Capacity of the counters hash map: the sparse counters (reply codes, statuses, drop
/// reasons) as they appear. The seeded counters of every watched scope live in the
/// `SCOPE_COUNTS` array ([`Config::scope_index`]), sized by the loader.
pub const COUNTERS_CAPACITY: u32 = 65_536;
/// `SCOPE_COUNTS` entries in the object as built (one interface, every port); the loader sizes
/// it for the interfaces it watches ([`Config::scope_count`]).
pub const SCOPE_COUNTS_DEFAULT: u32 = (MAX_PORTS * Direction::COUNT * SCOPE_SLOTS) as u32;
/// Most entries of the `SCOPES` map: interfaces told apart by their ifindex's low 16 bits
/// ([`Config::iface_mask`]), each with every port and direction. The loader sizes it to the
/// mask it needs, a few KiB for the usual small ifindexes.
pub const MAX_IFACE_MASK: u32 = 0xffff;
/// `SCOPES` entries in the object as built (an interface mask of 0).
pub const SCOPES_DEFAULT: u32 = (MAX_PORTS * Direction::COUNT) as u32;
/// `HISTS` entries in the object as built, sized the same way.
pub const HISTS_DEFAULT: u32 = (MAX_PORTS * Direction::COUNT * HistKind::COUNT) as u32;

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
    /// The watched interfaces, by slot: slot `i` is `ifindexes[i]`, for the first `iface_count`
    /// (userspace's list; the kernel finds a packet's scope by [`Config::scope_key`]).
    pub ifindexes: [u32; MAX_IFACES],
    pub iface_count: u32,
    /// The smallest mask `2^k - 1` that keeps the watched ifindexes apart: a packet's
    /// `ifindex & iface_mask` picks its interface's entries in `SCOPES`. The programs run only
    /// on watched interfaces, so no other ifindex needs telling apart.
    pub iface_mask: u32,
    /// How the programs count per peer: [`peer::peer_counts::MAP`] or
    /// [`peer::peer_counts::LOG`] (`--peer-counts`). Read-only data, so the verifier drops the
    /// other way as dead code.
    pub peer_log: u32,
    /// Sets of the flow table ([`flow_table::sets_for`] `--max-flows`): the `FLOWS` array's
    /// entries, which the loader sizes to match.
    pub flow_sets: u32,
    /// The flow table's hash seed ([`flow_table::flow_hash`]), random per load.
    pub flow_seed: u64,
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
        ifindexes: [0; MAX_IFACES],
        iface_count: 0,
        iface_mask: 0,
        peer_log: peer::peer_counts::MAP,
        flow_sets: 1,
        flow_seed: 0,
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

    /// A scope's key in the `SCOPES` map, which gives its [`Config::scope_index`]: the
    /// interface's masked ifindex ([`Config::iface_mask`]), the port's index and the direction,
    /// at fixed strides; below [`Config::scope_keys_len`]. The kernel reads the index from the
    /// map, not computed, so that the verifier sees one unknown value on every path: computed
    /// from the port index (a constant on each path of the port match) it would walk the rest
    /// of the program once for each port and direction. No compare either: a branch on the
    /// interface made Linux 6.1's verifier walk TC past its limit.
    #[inline(always)]
    pub const fn scope_key(&self, ifindex: u32, port_index: usize, direction: Direction) -> u32 {
        ((ifindex & self.iface_mask) * MAX_PORTS as u32 + port_index as u32)
            * Direction::COUNT as u32
            + direction as u32
    }

    /// Entries of the `SCOPES` map: every key [`Config::scope_key`] can make.
    pub const fn scope_keys_len(&self) -> u32 {
        (self.iface_mask + 1) * (MAX_PORTS * Direction::COUNT) as u32
    }

    /// Where a scope's counters start in the per-scope arrays, in runs of their size: the
    /// interface's slot, the port's index in `ports` and the direction, numbered densely in that
    /// order ([`Config::scope_count`] of them).
    pub const fn scope_index(
        &self,
        iface_slot: u32,
        port_index: usize,
        direction: Direction,
    ) -> u32 {
        (iface_slot * self.port_count + port_index as u32) * Direction::COUNT as u32
            + direction as u32
    }

    /// How many scopes [`Config::scope_index`] numbers.
    pub const fn scope_count(&self) -> u32 {
        self.iface_count * self.port_count * Direction::COUNT as u32
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
    assert!(size_of::<Config>() == 72 + 4 * MAX_IFACES + 8 * PORT_SET_WORDS);
    assert!(size_of::<DropConfig>() == 52);
};
