//! The exact counters the kernel keeps: what each one counts, as a typed [`Counter`], where it
//! belongs, as a [`Scope`], and the map key that carries both.
//!
//! The key's bytes are written only by [`CounterKey::new`] (a `const fn` the kernel calls) and
//! read only by [`CounterKey::decode`], so the kernel, the loader and the tests cannot disagree
//! on what a key means. A new TCP event is one variant of [`Event`] and the rule that classifies
//! it: the seeded keys, the per-peer slots, the labels and the decoding follow from the enums.
use crate::{
    Direction, Event, Outcome, Phase, Side, UnreachableReason,
    reply::{KERNEL_STARTTLS_STAGES, ReplyStatus, StarttlsStage},
};

/// Where a count belongs: the interface, the SMTP port and the direction of the connection.
/// Also the key of the handshake timeouts userspace decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub ifindex: u32,
    pub port: u16,
    pub direction: Direction,
}

/// One exact counter of a [`Scope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// A TCP [`Event`], and the side that sent the packet.
    Event(Event, Side),
    /// A handshake's [`Outcome`] (the kernel decides established and refused; timeouts are
    /// decided by userspace's sweep and kept apart, by [`Scope`]).
    Handshake(Outcome),
    /// The same SYN seen again while its handshake is pending.
    SynRetransmit,
    /// A RST: the [`Phase`] of its connection, and the side that sent it.
    Reset(Phase, Side),
    /// An SMTP reply, by code.
    Reply(u16),
    /// The first SMTP reply of a connection, by code.
    Greeting(u16),
    /// An SMTP-port SYN the kernel dropped, by its `enum skb_drop_reason` value. A drop has no
    /// watched interface: its scope's `ifindex` is 0.
    SynDrop(u16),
    /// A 4xx or 5xx SMTP reply, by code and enhanced status code.
    ReplyStatus(u16, ReplyStatus),
    /// Sessions with at least one throttling reply ([`crate::reply::is_throttling`]), counted
    /// once per session.
    Throttled,
    /// Sessions that reached a STARTTLS stage.
    Starttls(StarttlsStage),
    /// Handshakes answered by a destination unreachable, by the class of its code (counted
    /// with [`Outcome::Unreachable`], once per handshake).
    Unreachable(UnreachableReason),
}

labelled_enum! {
    /// The family of a [`Counter`]: the tag byte of its key.
    pub enum CounterKind: u8 {
        Event = 0 => "event",
        Handshake = 1 => "handshake",
        SynRetransmit = 2 => "syn_retransmit",
        Reset = 3 => "reset",
        Reply = 4 => "reply",
        Greeting = 5 => "greeting",
        SynDrop = 6 => "syn_drop",
        ReplyStatus = 7 => "reply_status",
        Throttled = 8 => "throttled",
        Starttls = 9 => "starttls",
        Unreachable = 10 => "unreachable",
    }
}

/// Handshake outcomes the kernel decides, created up front and given a per-peer slot each.
pub const KERNEL_OUTCOMES: [Outcome; 3] =
    [Outcome::Established, Outcome::Refused, Outcome::Unreachable];

impl Counter {
    /// The counters created for every watched [`Scope`] when smtpflow starts, so that the
    /// kernel's hot path finds them (and every series is exported from the start, at 0): the
    /// events, the kernel's outcomes, retransmissions, resets, throttled sessions, the
    /// STARTTLS stages the kernel counts and the unreachable reasons. Reply codes, statuses and
    /// drop reasons are created as they appear.
    pub fn seeded() -> impl Iterator<Item = Counter> {
        let events = Event::ALL
            .into_iter()
            .flat_map(|e| Side::ALL.into_iter().map(move |s| Counter::Event(e, s)));
        let outcomes = KERNEL_OUTCOMES.into_iter().map(Counter::Handshake);
        let resets = Phase::ALL
            .into_iter()
            .flat_map(|p| Side::ALL.into_iter().map(move |s| Counter::Reset(p, s)));
        let starttls = KERNEL_STARTTLS_STAGES.into_iter().map(Counter::Starttls);
        let unreachable = UnreachableReason::ALL.into_iter().map(Counter::Unreachable);
        events
            .chain(outcomes)
            .chain([Counter::SynRetransmit])
            .chain(resets)
            .chain([Counter::Throttled])
            .chain(starttls)
            .chain(unreachable)
    }

    /// How many counters [`Counter::seeded`] yields.
    pub const SEEDED_PER_SCOPE: usize = Event::COUNT * Side::COUNT
        + KERNEL_OUTCOMES.len()
        + 1
        + Phase::COUNT * Side::COUNT
        + 1
        + KERNEL_STARTTLS_STAGES.len()
        + UnreachableReason::COUNT;

    /// The counter's slot in its scope's run of the `SCOPE_COUNTS` array ([`slot`]): `Some`
    /// for every [`Counter::seeded`] counter, `None` for reply codes, statuses and drop reasons
    /// (sparse: they stay in the counters hash map).
    #[inline(always)]
    pub const fn scope_slot(self) -> Option<usize> {
        Some(match self {
            Counter::Event(e, s) => slot::EVENT + e as usize * Side::COUNT + s as usize,
            Counter::Handshake(o) => slot::HANDSHAKE + o as usize,
            Counter::SynRetransmit => slot::SYN_RETRANSMIT,
            Counter::Reset(p, s) => slot::RESET + p as usize * Side::COUNT + s as usize,
            Counter::Throttled => slot::THROTTLED,
            Counter::Starttls(stage) => slot::STARTTLS + stage as usize,
            Counter::Unreachable(r) => slot::UNREACHABLE + r as usize,
            Counter::Reply(_)
            | Counter::Greeting(_)
            | Counter::SynDrop(_)
            | Counter::ReplyStatus(..) => return None,
        })
    }

    pub const fn kind(self) -> CounterKind {
        match self {
            Counter::Event(..) => CounterKind::Event,
            Counter::Handshake(_) => CounterKind::Handshake,
            Counter::SynRetransmit => CounterKind::SynRetransmit,
            Counter::Reset(..) => CounterKind::Reset,
            Counter::Reply(_) => CounterKind::Reply,
            Counter::Greeting(_) => CounterKind::Greeting,
            Counter::SynDrop(_) => CounterKind::SynDrop,
            Counter::ReplyStatus(..) => CounterKind::ReplyStatus,
            Counter::Throttled => CounterKind::Throttled,
            Counter::Starttls(_) => CounterKind::Starttls,
            Counter::Unreachable(_) => CounterKind::Unreachable,
        }
    }
}

/// Where a seeded counter lives in its scope's run of the `SCOPE_COUNTS` per-CPU array: one
/// run of [`SCOPE_SLOTS`] counters per watched scope ([`crate::Config::scope_index`]). Each
/// family's slots are indexed by its enum values, so the kernel computes a slot with a few
/// arithmetic instructions and no search; the few slots no kernel path counts (the `timeout`
/// outcome, the `offered` STARTTLS stage) stay at 0 and are never read.
pub mod slot {
    use crate::{Event, Outcome, Phase, Side, UnreachableReason, reply::StarttlsStage};

    pub const EVENT: usize = 0;
    pub const HANDSHAKE: usize = EVENT + Event::COUNT * Side::COUNT;
    pub const SYN_RETRANSMIT: usize = HANDSHAKE + Outcome::COUNT;
    pub const RESET: usize = SYN_RETRANSMIT + 1;
    pub const THROTTLED: usize = RESET + Phase::COUNT * Side::COUNT;
    pub const STARTTLS: usize = THROTTLED + 1;
    pub const UNREACHABLE: usize = STARTTLS + StarttlsStage::COUNT;
    pub const END: usize = UNREACHABLE + UnreachableReason::COUNT;
}

/// Counters per scope in the `SCOPE_COUNTS` array ([`slot`]).
pub const SCOPE_SLOTS: usize = slot::END;

/// Key of the exact per-CPU counters map: a [`Scope`] and a [`Counter`], in 12 bytes. Its
/// fields are private: make one with [`CounterKey::new`], read one with [`CounterKey::decode`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    ifindex: u32,
    port: u16,
    /// [`CounterKind`].
    kind: u8,
    /// [`Direction`].
    direction: u8,
    /// The first field of the counter: [`Event`], [`Outcome`], [`Phase`], [`StarttlsStage`] or
    /// [`UnreachableReason`]; the high byte of a [`ReplyStatus`].
    a: u8,
    /// The second field of the counter: [`Side`]; the low byte of a [`ReplyStatus`].
    b: u8,
    /// A reply code or a drop reason.
    code: u16,
}

impl CounterKey {
    #[inline(always)]
    pub const fn new(scope: Scope, counter: Counter) -> Self {
        let (a, b, code) = match counter {
            Counter::Event(e, s) => (e as u8, s as u8, 0),
            Counter::Handshake(o) => (o as u8, 0, 0),
            Counter::SynRetransmit => (0, 0, 0),
            Counter::Reset(p, s) => (p as u8, s as u8, 0),
            Counter::Reply(c) | Counter::Greeting(c) | Counter::SynDrop(c) => (0, 0, c),
            Counter::ReplyStatus(c, status) => {
                let [hi, lo] = status.to_bits().to_be_bytes();
                (hi, lo, c)
            }
            Counter::Throttled => (0, 0, 0),
            Counter::Starttls(stage) => (stage as u8, 0, 0),
            Counter::Unreachable(reason) => (reason as u8, 0, 0),
        };
        Self {
            ifindex: scope.ifindex,
            port: scope.port,
            kind: counter.kind() as u8,
            direction: scope.direction as u8,
            a,
            b,
            code,
        }
    }

    /// What the key counts, and where; `None` for bytes no [`CounterKey::new`] writes.
    pub const fn decode(&self) -> Option<(Scope, Counter)> {
        let Some(direction) = Direction::from_repr(self.direction) else { return None };
        let Some(kind) = CounterKind::from_repr(self.kind) else { return None };
        let (a, b, code) = (self.a, self.b, self.code);
        let counter = match kind {
            CounterKind::Event => match (Event::from_repr(a), Side::from_repr(b)) {
                (Some(e), Some(s)) => Counter::Event(e, s),
                _ => return None,
            },
            CounterKind::Handshake => match Outcome::from_repr(a) {
                Some(o) => Counter::Handshake(o),
                None => return None,
            },
            CounterKind::SynRetransmit => Counter::SynRetransmit,
            CounterKind::Reset => match (Phase::from_repr(a), Side::from_repr(b)) {
                (Some(p), Some(s)) => Counter::Reset(p, s),
                _ => return None,
            },
            CounterKind::Reply => Counter::Reply(code),
            CounterKind::Greeting => Counter::Greeting(code),
            CounterKind::SynDrop => Counter::SynDrop(code),
            CounterKind::ReplyStatus => match ReplyStatus::from_bits(u16::from_be_bytes([a, b])) {
                Some(status) => Counter::ReplyStatus(code, status),
                None => return None,
            },
            CounterKind::Throttled => Counter::Throttled,
            CounterKind::Starttls => match StarttlsStage::from_repr(a) {
                Some(stage) => Counter::Starttls(stage),
                None => return None,
            },
            CounterKind::Unreachable => match UnreachableReason::from_repr(a) {
                Some(reason) => Counter::Unreachable(reason),
                None => return None,
            },
        };
        Some((Scope { ifindex: self.ifindex, port: self.port, direction }, counter))
    }
}

labelled_enum! {
    /// Indices of the per-CPU `STATS` array: the kernel programs' own bookkeeping.
    pub enum Stat: u32 {
        /// Frames whose headers were malformed (IPv4 IHL < 5, TCP data offset < 5, truncated).
        Malformed = 0 => "malformed",
        /// New per-peer entries created (LRU evictions = inserts - live entries).
        PeerInserts = 1 => "peer_inserts",
        /// A per-peer entry could not be created, or a per-peer log record found the ring full (the
        /// event still counted in the totals).
        PeerInsertFailed = 2 => "peer_insert_failed",
        /// A counters entry could not be created: a count was lost. Must stay 0.
        CounterInsertFailed = 3 => "counter_insert_failed",
        /// New flow entries created.
        FlowInserts = 4 => "flow_inserts",
        /// Flow entries the kernel deleted (connection reset or closed by the server).
        FlowDeletes = 5 => "flow_deletes",
        /// A flow entry could not be created: another CPU took the way it chose at the same
        /// moment (or, which cannot happen, one of its candidate sets was not in the table).
        FlowInsertFailed = 6 => "flow_insert_failed",
        /// A histogram entry could not be created: a duration was lost. Must stay 0.
        HistInsertFailed = 7 => "hist_insert_failed",
        /// A payload event did not fit in the ring buffer (userspace did not drain it in
        /// time): a name, an EHLO reply or a ServerHello was not read.
        PayloadsLost = 8 => "payloads_lost",
        /// New per-peer reply-code entries created (`PEER_GREETINGS`; LRU evictions = inserts -
        /// live entries).
        PeerReplyInserts = 9 => "peer_reply_inserts",
        /// Flows a new flow overwrote in the flow table, both its candidate sets full
        /// ([`crate::flow_table`]): no longer followed. Flows idle for
        /// [`crate::flow::IDLE_NS`] are not counted (the sweep no longer showed them).
        FlowEvictions = 10 => "flow_evictions",
    }
}

const _: () = assert!(size_of::<CounterKey>() == 12);

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeSet, vec::Vec};

    use super::*;

    /// Every counter there is: each enum's every variant, and codes at their edges.
    fn every_counter() -> Vec<Counter> {
        let mut all: Vec<Counter> = Counter::seeded().collect();
        all.extend(Outcome::ALL.map(Counter::Handshake));
        all.extend(StarttlsStage::ALL.map(Counter::Starttls));
        for code in [0, 1, 220, 421, 554, 0xfffe, u16::MAX] {
            all.extend([Counter::Reply(code), Counter::Greeting(code), Counter::SynDrop(code)]);
        }
        for (code, status) in [
            (421, ReplyStatus::NONE),
            (421, ReplyStatus::new(4, 3, 2)),
            (451, ReplyStatus::new(4, 7, 1)),
            (450, ReplyStatus::new(4, 7, 650)),
            (450, ReplyStatus::new(4, 7, 150)),
            (554, ReplyStatus::new(5, 9, 999)),
            (u16::MAX, ReplyStatus::new(2, 0, 0)),
        ] {
            all.push(Counter::ReplyStatus(code, status));
        }
        all
    }

    #[test]
    fn every_counter_survives_encode_and_decode() {
        let kinds: BTreeSet<&str> = every_counter().iter().map(|c| c.kind().label()).collect();
        assert_eq!(kinds.len(), CounterKind::COUNT, "every kind is walked");
        for counter in every_counter() {
            for direction in Direction::ALL {
                for (ifindex, port) in [(0, 25), (7, 465), (u32::MAX, u16::MAX)] {
                    let scope = Scope { ifindex, port, direction };
                    let key = CounterKey::new(scope, counter);
                    assert_eq!(key.decode(), Some((scope, counter)), "{counter:?} in {scope:?}");
                }
            }
        }
    }

    #[test]
    fn distinct_counters_have_distinct_keys() {
        let scope = Scope { ifindex: 1, port: 25, direction: Direction::Inbound };
        let all: BTreeSet<Counter> = every_counter().into_iter().collect();
        let keys: BTreeSet<CounterKey> = all.iter().map(|&c| CounterKey::new(scope, c)).collect();
        assert_eq!(keys.len(), all.len());
    }

    #[test]
    fn seeded_counters_are_the_kernel_decided_ones() {
        let seeded: Vec<Counter> = Counter::seeded().collect();
        assert_eq!(seeded.len(), Counter::SEEDED_PER_SCOPE);
        assert_eq!(seeded.iter().collect::<BTreeSet<_>>().len(), seeded.len(), "no repeats");
        assert!(!seeded.contains(&Counter::Handshake(Outcome::Timeout)));
        assert!(seeded.iter().all(|c| !matches!(
            c,
            Counter::Reply(_)
                | Counter::Greeting(_)
                | Counter::SynDrop(_)
                | Counter::ReplyStatus(..)
        )));
        assert!(seeded.contains(&Counter::Throttled));
        for stage in KERNEL_STARTTLS_STAGES {
            assert!(seeded.contains(&Counter::Starttls(stage)), "{stage:?}");
        }
        assert!(seeded.contains(&Counter::Handshake(Outcome::Unreachable)));
        for reason in UnreachableReason::ALL {
            assert!(seeded.contains(&Counter::Unreachable(reason)), "{reason:?}");
        }
    }

    #[test]
    fn seeded_counters_have_distinct_slots_in_range() {
        let slots: BTreeSet<usize> = Counter::seeded()
            .map(|c| {
                let s = c.scope_slot().unwrap_or_else(|| panic!("{c:?} has no slot"));
                assert!(s < SCOPE_SLOTS, "{c:?} at {s}");
                s
            })
            .collect();
        assert_eq!(slots.len(), Counter::SEEDED_PER_SCOPE, "one slot each");
        for c in every_counter() {
            let seeded = Counter::seeded().any(|s| s == c);
            let sparse = matches!(
                c,
                Counter::Reply(_)
                    | Counter::Greeting(_)
                    | Counter::SynDrop(_)
                    | Counter::ReplyStatus(..)
            );
            assert_eq!(c.scope_slot().is_none(), sparse, "{c:?}");
            // A counter outside the seeded set with a slot (timeout, offered) never shares one
            // with a seeded counter.
            if !seeded && let Some(s) = c.scope_slot() {
                assert!(!slots.contains(&s), "{c:?} shares slot {s}");
            }
        }
    }

    #[test]
    fn unknown_bytes_decode_to_none() {
        let scope = Scope { ifindex: 1, port: 25, direction: Direction::Outbound };
        let good = CounterKey::new(scope, Counter::Reset(Phase::Session, Side::Peer));
        assert_eq!(CounterKey { kind: CounterKind::COUNT as u8, ..good }.decode(), None);
        assert_eq!(CounterKey { direction: Direction::COUNT as u8, ..good }.decode(), None);
        assert_eq!(CounterKey { a: Phase::COUNT as u8, ..good }.decode(), None);
        assert_eq!(CounterKey { b: Side::COUNT as u8, ..good }.decode(), None);
        let tls = CounterKey::new(scope, Counter::Starttls(StarttlsStage::Accepted));
        assert_eq!(CounterKey { a: StarttlsStage::COUNT as u8, ..tls }.decode(), None);
        let icmp = CounterKey::new(scope, Counter::Unreachable(UnreachableReason::Host));
        assert_eq!(CounterKey { a: UnreachableReason::COUNT as u8, ..icmp }.decode(), None);
        let outcome = CounterKey::new(scope, Counter::Handshake(Outcome::Unreachable));
        assert_eq!(CounterKey { a: Outcome::COUNT as u8, ..outcome }.decode(), None);
        let status = CounterKey::new(scope, Counter::ReplyStatus(451, ReplyStatus::new(4, 7, 1)));
        assert_eq!(CounterKey { a: 0x20, ..status }.decode(), None, "class 8");
    }

    #[test]
    fn stats_are_numbered_and_named() {
        assert_eq!(Stat::from_repr(Stat::COUNT as u32 - 1), Some(Stat::FlowEvictions));
        assert_eq!(Stat::Malformed.label(), "malformed");
    }
}
