//! Types and rules shared by the smtpflow kernel programs and the userspace loader.
//!
//! Everything the kernel writes into a map and userspace reads back is defined here once, as
//! `#[repr(C)]` structs with no implicit padding, so the two sides cannot disagree. The event
//! classification rules (which TCP packet is which event, which port is the SMTP port, which side
//! is the client) live here too: the kernel calls them per packet and the unit tests pin them.
#![no_std]

pub mod rules;
#[cfg(feature = "user")]
pub mod user;

pub use rules::{Direction, Event, PortMatch, Side, classify, direction_of, smtp_port};

/// Most SMTP ports the kernel program matches (`--ports`).
pub const MAX_PORTS: usize = 16;

/// Names of the kernel objects, used by the loader and the tests.
pub mod names {
    pub const PROG_TC_INGRESS: &str = "smtpflow_tc_in";
    pub const PROG_TC_EGRESS: &str = "smtpflow_tc_out";
    pub const PROG_XDP: &str = "smtpflow_xdp";
    pub const GLOBAL_CONFIG: &str = "CONFIG";
    pub const MAP_TOTALS: &str = "TOTALS";
    pub const MAP_PEERS: &str = "PEERS";
    pub const MAP_STATS: &str = "STATS";
}

/// Default capacity of the per-peer LRU map (`--max-peers`).
pub const DEFAULT_MAX_PEERS: u32 = 65_536;
/// Capacity of the exact totals map: `MAX_IFACES * MAX_PORTS * events * directions * sides`.
pub const MAX_IFACES: usize = 32;
pub const TOTALS_CAPACITY: u32 =
    (MAX_IFACES * MAX_PORTS * Event::COUNT * Direction::COUNT * Side::COUNT) as u32;

/// Runtime configuration, a read-only global of the kernel object set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// SMTP ports in host byte order; only the first `port_count` are used.
    pub ports: [u16; MAX_PORTS],
    pub port_count: u32,
}

impl Config {
    pub const EMPTY: Self = Self {
        ports: [0; MAX_PORTS],
        port_count: 0,
    };

    /// The configured ports, as a slice.
    pub fn ports(&self) -> &[u16] {
        let n = (self.port_count as usize).min(MAX_PORTS);
        &self.ports[..n]
    }
}

/// Address family tag stored in keys (values of `AF_INET`/`AF_INET6` are not used on purpose:
/// these are stable across platforms).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of the exact per-CPU totals map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TotalKey {
    pub ifindex: u32,
    pub port: u16,
    /// [`Event`] as u8.
    pub event: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// [`Side`] as u8.
    pub side: u8,
    pub _pad: [u8; 3],
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

/// Value of the per-peer map: one counter per (event, side), see [`PeerCounters::index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerCounters {
    pub counts: [u64; Event::COUNT * Side::COUNT],
}

impl PeerCounters {
    pub const fn index(event: Event, side: Side) -> usize {
        event as usize * Side::COUNT + side as usize
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
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
    /// A totals entry could not be created: an event was lost. Must stay 0.
    TotalsInsertFailed = 3,
}

impl Stat {
    pub const COUNT: usize = 4;
    pub const ALL: [Stat; Self::COUNT] = [
        Stat::Malformed,
        Stat::PeerInserts,
        Stat::PeerInsertFailed,
        Stat::TotalsInsertFailed,
    ];
}

const _: () = {
    assert!(size_of::<Config>() == 36);
    assert!(size_of::<TotalKey>() == 12);
    assert!(size_of::<PeerKey>() == 24);
    assert!(size_of::<PeerCounters>() == 64);
    assert!(TOTALS_CAPACITY == 8192);
};
