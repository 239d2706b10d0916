//! The per-peer maps' keys and values: bounded LRU maps of what each remote host did.
use crate::{Event, Outcome, Side, counter::KERNEL_OUTCOMES};

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

/// Value of the per-peer map: one counter per (event, side), see [`PeerCounters::index`], one
/// per handshake outcome the kernel decides ([`KERNEL_OUTCOMES`], indexed by value), and the
/// sessions with a throttling reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCounters {
    pub counts: [u64; PEER_EVENT_SLOTS],
    pub outcomes: [u64; PEER_OUTCOME_SLOTS],
    /// Sessions with at least one throttling reply ([`crate::reply::is_throttling`]).
    pub throttled: u64,
}

impl Default for PeerCounters {
    fn default() -> Self {
        Self { counts: [0; PEER_EVENT_SLOTS], outcomes: [0; PEER_OUTCOME_SLOTS], throttled: 0 }
    }
}

impl PeerCounters {
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

    /// All events, outcomes and throttled sessions: how active the peer is.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.outcomes.iter().sum::<u64>() + self.throttled
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

const _: () = {
    assert!(size_of::<PeerKey>() == 24);
    assert!(size_of::<PeerCounters>() == 8 * (PEER_EVENT_SLOTS + PEER_OUTCOME_SLOTS + 1));
    assert!(size_of::<PeerGreetingKey>() == 28);
    // The kernel masks outcome indices too, and stores outcome `o` at `outcomes[o as usize]`.
    assert!(PEER_OUTCOME_SLOTS.is_power_of_two());
    let mut i = 0;
    while i < KERNEL_OUTCOMES.len() {
        assert!((KERNEL_OUTCOMES[i] as usize) < PEER_OUTCOME_SLOTS);
        assert!(!matches!(KERNEL_OUTCOMES[i], Outcome::Timeout));
        i += 1;
    }
};
