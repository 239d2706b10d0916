//! Types and rules shared by the smtpflow kernel programs and the userspace loader.
//!
//! Everything the kernel writes into a map and userspace reads back is defined here once, as
//! `#[repr(C)]` structs with no implicit padding, so the two sides cannot disagree. The event
//! classification rules (which TCP packet is which event, which port is the SMTP port, which side
//! is the client) live here too: the kernel calls them per packet and the unit tests pin them.
#![no_std]

pub mod reference;
pub mod rules;
#[cfg(feature = "user")]
pub mod user;

pub mod flow;

pub use flow::{
    FlowKey, FlowState, HIST_BOUNDS_NS, HIST_BUCKETS, HistKey, HistKind, Histogram, Outcome, Phase,
};
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
}

/// Default capacity of the per-peer LRU map (`--max-peers`).
pub const DEFAULT_MAX_PEERS: u32 = 65_536;
/// Default capacity of the per-connection LRU map (`--max-flows`).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Most interfaces one smtpflow watches.
pub const MAX_IFACES: usize = 32;
/// Capacity of the exact counters map. The event, outcome and reset keys of every watched
/// interface and port are created up front (at most `MAX_IFACES * MAX_PORTS * 62`, about 32k);
/// the rest holds reply codes and drop reasons as they appear.
pub const COUNTERS_CAPACITY: u32 = 65_536;
/// Capacity of the duration histograms map: interfaces x ports x directions x kinds.
pub const HISTS_CAPACITY: u32 = (MAX_IFACES * MAX_PORTS * 2 * 2) as u32;

/// Runtime configuration, a read-only global of the kernel object set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// SMTP ports in host byte order; only the first `port_count` are used.
    pub ports: [u16; MAX_PORTS],
    pub port_count: u32,
    /// Bit `i` set: `ports[i]` carries plaintext SMTP, whose server replies are read.
    pub plaintext_mask: u32,
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

/// Address family tag stored in keys (values of `AF_INET`/`AF_INET6` are not used on purpose:
/// these are stable across platforms).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// What a [`CounterKey`] counts, and what its `a`, `b` and `code` fields mean.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// `a`: [`Event`], `b`: [`Side`].
    Event = 0,
    /// `a`: [`Outcome`] (established, refused; timeouts are decided in userspace).
    Handshake = 1,
    /// The same SYN seen again while its handshake is pending.
    SynRetransmit = 2,
    /// `a`: [`Phase`], `b`: [`Side`] that sent the RST.
    Reset = 3,
    /// `code`: SMTP reply code.
    Reply = 4,
    /// `code`: SMTP reply code of the first reply of a connection.
    Greeting = 5,
    /// `ifindex` 0, `code`: the kernel's `enum skb_drop_reason` value.
    SynDrop = 6,
}

impl Metric {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Metric::Event),
            1 => Some(Metric::Handshake),
            2 => Some(Metric::SynRetransmit),
            3 => Some(Metric::Reset),
            4 => Some(Metric::Reply),
            5 => Some(Metric::Greeting),
            6 => Some(Metric::SynDrop),
            _ => None,
        }
    }
}

/// Key of the exact per-CPU counters map: every lossless counter the kernel keeps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
    pub port: u16,
    /// [`Metric`] as u8.
    pub metric: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
    pub a: u8,
    pub b: u8,
    pub code: u16,
}

impl CounterKey {
    #[inline(always)]
    pub const fn new(ifindex: u32, port: u16, metric: Metric, direction: Direction) -> Self {
        Self {
            ifindex,
            port,
            metric: metric as u8,
            direction: direction as u8,
            a: 0,
            b: 0,
            code: 0,
        }
    }

    #[inline(always)]
    pub const fn event(
        ifindex: u32,
        port: u16,
        event: Event,
        direction: Direction,
        side: Side,
    ) -> Self {
        let mut k = Self::new(ifindex, port, Metric::Event, direction);
        k.a = event as u8;
        k.b = side as u8;
        k
    }
}

/// Key of the per-peer LRU map. IPv4 addresses use the first four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub ifindex: u32,
    pub addr: [u8; 16],
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
}

/// Value of the per-peer map: one counter per (event, side), see [`PeerCounters::index`], and
/// the handshake outcomes the kernel decides (established, refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerCounters {
    pub counts: [u64; Event::COUNT * Side::COUNT],
    pub outcomes: [u64; 2],
}

impl PeerCounters {
    pub const fn index(event: Event, side: Side) -> usize {
        event as usize * Side::COUNT + side as usize
    }

    /// All events and outcomes: how active the peer is.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.outcomes.iter().sum::<u64>()
    }
}

/// Key of the per-peer greeting map: a peer and the code of its connections' first reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerGreetingKey {
    pub peer: PeerKey,
    pub code: u16,
    pub _pad: [u8; 2],
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

/// Indices of the per-CPU `STATS` array: the kernel program's own bookkeeping.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Frames whose headers were malformed (IPv4 IHL < 5, TCP data offset < 5, truncated).
    Malformed = 0,
    /// New per-peer entries created (LRU evictions = inserts - live entries).
    PeerInserts = 1,
    /// A per-peer entry could not be created (the event still counted in the totals).
    PeerInsertFailed = 2,
    /// A counters entry could not be created: a count was lost. Must stay 0.
    CounterInsertFailed = 3,
    /// New flow entries created (LRU evictions = inserts - live entries - deletions).
    FlowInserts = 4,
    /// Flow entries the kernel deleted (connection reset or closed by the server).
    FlowDeletes = 5,
    /// A flow entry could not be created.
    FlowInsertFailed = 6,
    /// A histogram entry could not be created: a duration was lost. Must stay 0.
    HistInsertFailed = 7,
}

impl Stat {
    pub const COUNT: usize = 8;
}

const _: () = {
    assert!(size_of::<Config>() == 40 + 8 * PORT_SET_WORDS);
    assert!(size_of::<CounterKey>() == 12);
    assert!(size_of::<PeerKey>() == 24);
    assert!(size_of::<PeerCounters>() == 80);
    assert!(size_of::<PeerGreetingKey>() == 28);
    assert!(size_of::<DropConfig>() == 52);
};
