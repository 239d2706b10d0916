//! The per-peer maps' keys and values: bounded LRU maps of what each remote host did.
use crate::{Event, Outcome, Phase, Side, counter::KERNEL_OUTCOMES};

/// Address family tag stored in keys (values of `AF_INET`/`AF_INET6` are not used on purpose:
/// these are stable across platforms).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of the per-peer LRU map. IPv4 addresses use the first four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub ifindex: u32,
    pub addr: [u8; 16],
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`crate::Direction`] as u8.
    pub direction: u8,
}

/// Slots for the per-peer event counts: one per (event, side), rounded up to a power of two so
/// that the kernel can mask an index into range (a mask gives the verifier its bound with no
/// branch).
pub const PEER_EVENT_SLOTS: usize = (Event::COUNT * Side::COUNT).next_power_of_two();

/// Slots for the per-peer handshake outcomes, indexed by [`Outcome`] value: one per outcome,
/// rounded up to a power of two as [`PEER_EVENT_SLOTS`] is. The kernel writes only the
/// [`KERNEL_OUTCOMES`]; the slot of `timeout` (decided in userspace) stays 0.
pub const PEER_OUTCOME_SLOTS: usize = Outcome::COUNT.next_power_of_two();

/// Slots for the per-peer resets, indexed by [`Phase`] value (either side's RST), rounded up to
/// a power of two as [`PEER_EVENT_SLOTS`] is.
pub const PEER_RESET_SLOTS: usize = Phase::COUNT.next_power_of_two();

/// Value of the per-peer map: one counter per (event, side), see [`PeerCounters::index`], one
/// per handshake outcome the kernel decides ([`KERNEL_OUTCOMES`], indexed by value), one per
/// reset phase (indexed by value), and the sessions with a throttling reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCounters {
    pub counts: [u64; PEER_EVENT_SLOTS],
    pub outcomes: [u64; PEER_OUTCOME_SLOTS],
    /// Resets (by either side) by the [`Phase`] of the connection they ended.
    pub resets: [u64; PEER_RESET_SLOTS],
    /// Sessions with at least one throttling reply ([`crate::reply::is_throttling`]).
    pub throttled: u64,
}

impl Default for PeerCounters {
    fn default() -> Self {
        Self::ZERO
    }
}

impl PeerCounters {
    pub const ZERO: Self = Self {
        counts: [0; PEER_EVENT_SLOTS],
        outcomes: [0; PEER_OUTCOME_SLOTS],
        resets: [0; PEER_RESET_SLOTS],
        throttled: 0,
    };

    /// The slot of `counts` that counts `event` sent by `side`.
    #[inline(always)]
    pub const fn index(event: Event, side: Side) -> usize {
        event as usize * Side::COUNT + side as usize
    }

    /// How many `event`s `side` sent.
    pub const fn event(&self, event: Event, side: Side) -> u64 {
        self.counts[Self::index(event, side)]
    }

    /// How many handshakes ended in `outcome` (0 for one the kernel does not decide).
    pub const fn outcome(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Timeout => 0,
            o => self.outcomes[o as usize],
        }
    }

    /// How many resets ended a connection in `phase`.
    pub const fn resets(&self, phase: Phase) -> u64 {
        self.resets[phase as usize]
    }

    /// All events, outcomes and throttled sessions: how active the peer is. (Resets are
    /// events already.)
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.outcomes.iter().sum::<u64>() + self.throttled
    }
}

/// How the kernel counts per peer (`--peer-counts`, [`crate::Config::peer_log`]).
pub mod peer_counts {
    /// Into the per-peer LRU map: a lookup a packet, an insert (with an eviction once the map
    /// is full) a new peer.
    pub const MAP: u32 = 0;
    /// As [`super::PeerRecord`]s appended to the `PEER_LOG` ring buffer, which userspace adds up
    /// into its own bounded per-peer table: no per-peer map work in the kernel.
    pub const LOG: u32 = 1;
}

/// A per-peer slot not counted in a [`PeerRecord`] (never a valid index: the slots are masked
/// below it).
pub const BUMP_NONE: u8 = 0x80;

/// Size of the per-peer log (`--peer-counts log`): 40 bytes a record with the ring's header,
/// about 200,000 records. Userspace reads it every [`PEER_LOG_POLL_MS`], so it holds a flood of
/// a million packets a second for a fifth of a second; a record that does not fit is lost and
/// counted ([`crate::Stat::PeerInsertFailed`]).
pub const PEER_LOG_BYTES: u32 = 8 << 20;

/// How often userspace reads the per-peer log, in milliseconds.
pub const PEER_LOG_POLL_MS: u64 = 10;

/// One record of the per-peer log: what one packet adds to its peer's [`PeerCounters`], as the
/// per-peer map's update would add it ([`PeerCounters::add_record`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    pub peer: PeerKey,
    /// A slot of [`PeerCounters::counts`] ([`PeerCounters::index`]), or [`BUMP_NONE`].
    pub event: u8,
    /// An [`Outcome`] value, or [`BUMP_NONE`].
    pub outcome: u8,
    /// A [`Phase`] value, or [`BUMP_NONE`].
    pub reset: u8,
    /// 1: a session with a throttling reply.
    pub throttled: u8,
    pub _pad: u32,
}

impl PeerCounters {
    /// Adds a log record, exactly as the kernel adds the same bumps to a per-peer map entry:
    /// each slot not [`BUMP_NONE`], masked into range.
    pub fn add_record(&mut self, r: &PeerRecord) {
        if r.event & BUMP_NONE == 0 {
            self.counts[usize::from(r.event) & (PEER_EVENT_SLOTS - 1)] += 1;
        }
        if r.outcome & BUMP_NONE == 0 {
            self.outcomes[usize::from(r.outcome) & (PEER_OUTCOME_SLOTS - 1)] += 1;
        }
        if r.reset & BUMP_NONE == 0 {
            self.resets[usize::from(r.reset) & (PEER_RESET_SLOTS - 1)] += 1;
        }
        if r.throttled != 0 {
            self.throttled += 1;
        }
    }
}

/// Key of the per-peer reply map: a peer, a reply code, and which replies it counts
/// ([`reply_kind`]): the connections' first replies (greetings), or every reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerGreetingKey {
    pub peer: PeerKey,
    pub code: u16,
    /// One of [`reply_kind`].
    pub kind: u8,
    pub _pad: u8,
}

impl PeerGreetingKey {
    /// The entry counting `peer`'s greetings with `code`.
    #[inline(always)]
    pub const fn greeting(peer: PeerKey, code: u16) -> Self {
        Self { peer, code, kind: reply_kind::GREETING, _pad: 0 }
    }

    /// The entry counting every reply of `peer` with `code`.
    #[inline(always)]
    pub const fn any(peer: PeerKey, code: u16) -> Self {
        Self { peer, code, kind: reply_kind::ANY, _pad: 0 }
    }
}

/// [`PeerGreetingKey::kind`]: what an entry of the per-peer reply map counts.
pub mod reply_kind {
    /// Greetings (each connection's first reply) with this code.
    pub const GREETING: u8 = 0;
    /// Every reply with this code, greetings included.
    pub const ANY: u8 = 1;
}

const _: () = {
    assert!(size_of::<PeerKey>() == 24);
    assert!(
        size_of::<PeerCounters>()
            == 8 * (PEER_EVENT_SLOTS + PEER_OUTCOME_SLOTS + PEER_RESET_SLOTS + 1)
    );
    assert!(PEER_RESET_SLOTS.is_power_of_two());
    assert!(size_of::<PeerGreetingKey>() == 28);
    assert!(size_of::<PeerRecord>() == 32);
    // The ring buffer's size must be a power of two and a multiple of the page size.
    assert!(PEER_LOG_BYTES.is_power_of_two() && PEER_LOG_BYTES >= 4096);
    // The slots are masked below BUMP_NONE.
    assert!(PEER_EVENT_SLOTS <= BUMP_NONE as usize);
    // The kernel masks outcome indices too, and stores outcome `o` at `outcomes[o as usize]`.
    assert!(PEER_OUTCOME_SLOTS.is_power_of_two());
    let mut i = 0;
    while i < KERNEL_OUTCOMES.len() {
        assert!((KERNEL_OUTCOMES[i] as usize) < PEER_OUTCOME_SLOTS);
        assert!(!matches!(KERNEL_OUTCOMES[i], Outcome::Timeout));
        i += 1;
    }
};
