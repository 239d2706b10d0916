//! Per-peer series that only go up, and the sticky choice of the ones exported.
//!
//! The kernel's per-peer entries can go down: an entry evicted from the LRU map and created
//! again starts from zero, and with `--peer-label prefix|hash` a label sums several entries.
//! Prometheus reads any decrease as a counter reset, so the exported values are not the kernel's
//! but totals kept here, per label ([`LabelId`]: an interface and what `--peer-label` keeps of
//! an address). Each read hands every entry (and the sweep's timed-out handshakes, and the
//! greetings map) to [`Accumulator`], which follows the *members* of the labels it tracks:
//! - a member seen before adds what its kernel value rose by since (slot by slot);
//! - a member whose value went down was evicted and created again: its new value is added;
//! - a member seen for the first time adds its whole value;
//! - a member no longer in the kernel adds nothing more (its share stays in the total).
//!
//! So a label's value is the sum over every member it was seen with, and never decreases while
//! the label is tracked.
//!
//! Which labels are exported (at most `--max-peer-series`) is sticky: an exported label keeps its
//! place while it is active, and leaves only after `--peer-series-idle` without any increase.
//! Free places go to the tracked labels with the most *recent* activity (what their members rose
//! by, halved at each read), never to lifetime totals.
//!
//! Memory is bounded by `--max-peer-series` alone: at most [`SeriesLimits::tracked`] labels are
//! tracked (the exported ones, and as many candidates: recently active or recently exported), at
//! most [`SeriesLimits::members`] members over all of them, and the totals of as many labels
//! again that were dropped (least recently dropped first forgotten). A label tracked again after
//! it was dropped counts its members from their kernel values again, and exports the larger of
//! that and its remembered total (a floor), so it does not go down either; only a label
//! forgotten altogether (after some 2 × [`SeriesLimits::tracked`] others were dropped since)
//! starts again from its members' kernel values. A member beyond the bound is counted once
//! there is room, with its whole value.
use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;

use smtpflow_common::{
    Direction, Event, Outcome, PeerCounters, PeerGreetingKey, PeerKey, Side,
    counter::KERNEL_OUTCOMES,
};

use super::{ENTRY_SLACK, FoldState};
use crate::output::peer_label::PeerLabel;

/// A map keyed by what every entry of a read is looked up by.
type Fast<K, V> = HashMap<K, V, FoldState>;

/// How many per-peer series are exported, and for how long an idle one stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesLimits {
    /// `--max-peer-series`: most labels exported (0: none, and nothing is tracked).
    pub max: usize,
    /// `--peer-series-idle`: an exported label without any increase for this long leaves.
    pub idle: Duration,
}

impl SeriesLimits {
    /// The default of `--peer-series-idle`.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
    /// Fewest candidate labels tracked beside the exported ones.
    pub const MIN_CANDIDATES: usize = 16;

    pub fn new(max: usize) -> Self {
        Self { max, idle: Self::DEFAULT_IDLE }
    }

    /// Most labels tracked: the exported ones and as many candidates (at least
    /// [`Self::MIN_CANDIDATES`]).
    pub fn tracked(&self) -> usize {
        if self.max == 0 {
            return 0;
        }
        self.max.saturating_add(self.max.max(Self::MIN_CANDIDATES))
    }

    /// Most members (per-peer entries, timed-out handshake counts, greeting codes) followed
    /// over all tracked labels.
    pub fn members(&self) -> usize {
        self.tracked().saturating_mul(ENTRY_SLACK)
    }
}

/// A label's identity: the interface, and what `--peer-label` keeps of the address
/// ([`PeerLabel::group`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelId {
    pub ifindex: u32,
    pub family: u8,
    pub addr: [u8; 16],
}

/// What a per-peer series counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counted {
    /// `smtpflow_peer_tcp_events_total{event,side}`.
    Event(Event, Side),
    /// `smtpflow_peer_handshakes_total{outcome}` (timeouts from the sweep).
    Outcome(Outcome),
    /// `smtpflow_peer_smtp_greetings_total{code}`.
    Greeting(u16),
    /// `smtpflow_peer_throttled_sessions_total`.
    Throttled,
}

/// One exported per-peer series and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSeries {
    pub ifindex: u32,
    /// The `peer` label, as `--peer-label` writes it.
    pub peer: Arc<str>,
    pub direction: Direction,
    pub port: u16,
    pub counted: Counted,
    pub value: u64,
}

/// A member's last value and the read that saw it.
#[derive(Clone, Copy, Debug)]
struct Seen<T> {
    last: T,
    read: u64,
}

/// An entry offered to [`Accumulator::admit`]: its key, its value and how much of it is recent.
pub type Offered = (PeerKey, PeerCounters, u64);

/// Series of a label, by direction, port and what they count.
type Totals = BTreeMap<(Direction, u16, Counted), u64>;

/// A tracked label: its totals, its members and how active it is.
#[derive(Debug)]
struct Tracked {
    peer: Arc<str>,
    totals: Totals,
    /// What the label had when it was last dropped: exported values are never below it (the
    /// series whose totals have caught up are removed).
    floor: Totals,
    entries: Fast<PeerKey, Seen<PeerCounters>>,
    timeouts: Fast<PeerKey, Seen<u64>>,
    greetings: Fast<PeerGreetingKey, Seen<u64>>,
    /// What the members rose by in this read.
    activity: u64,
    /// Recent activity: what they rose by, halved at each read.
    recent: u64,
    last_active: Instant,
    exported: bool,
}

impl Tracked {
    fn members(&self) -> usize {
        self.entries.len() + self.timeouts.len() + self.greetings.len()
    }

    fn add(&mut self, direction: Direction, port: u16, counted: Counted, n: u64) {
        if n > 0 {
            *self.totals.entry((direction, port, counted)).or_default() += n;
        }
    }

    /// The values to export: the totals, never below the floor.
    fn values(&self) -> Totals {
        let mut out = self.totals.clone();
        for (k, v) in &self.floor {
            let n = out.entry(*k).or_default();
            *n = (*n).max(*v);
        }
        out
    }
}

/// What a member adds: its rise since `last`, or all of `now` when it went down (evicted and
/// created again).
fn rise(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

/// The monotonic per-label totals and the sticky export set; see the module's documentation.
#[derive(Debug)]
pub struct Accumulator {
    limits: SeriesLimits,
    labeler: PeerLabel,
    labels: Fast<LabelId, Tracked>,
    /// The exported values of labels dropped from `labels`, for when they come back.
    dropped: LruCache<LabelId, Totals>,
    /// Members over all labels.
    members: usize,
    /// The current read's number (members not seen in it are gone).
    read: u64,
    now: Instant,
}

impl Accumulator {
    pub fn new(limits: SeriesLimits, labeler: PeerLabel) -> Self {
        Self {
            limits,
            labeler,
            labels: Fast::default(),
            dropped: LruCache::new(
                NonZeroUsize::new(limits.tracked()).unwrap_or(NonZeroUsize::MIN),
            ),
            members: 0,
            read: 0,
            now: Instant::now(),
        }
    }

    pub fn limits(&self) -> SeriesLimits {
        self.limits
    }

    pub fn set_idle(&mut self, idle: Duration) {
        self.limits.idle = idle;
    }

    /// Labels tracked, and members followed: never more than the limits.
    pub fn tracked(&self) -> (usize, usize) {
        (self.labels.len(), self.members)
    }

    /// The label of a per-peer key.
    pub fn label_of(&self, k: &PeerKey) -> LabelId {
        LabelId {
            ifindex: k.ifindex,
            family: k.family,
            addr: self.labeler.group(k.family, &k.addr),
        }
    }

    /// Starts a read at `now`.
    pub fn start(&mut self, now: Instant) {
        self.read += 1;
        self.now = now;
    }

    /// One entry of the per-peer map; `recent`: how much of it is recent, as far as the caller
    /// knows (used only for a member seen for the first time). `false`: its label is not
    /// tracked (the caller may offer it as a candidate).
    pub fn entry(&mut self, k: &PeerKey, v: &PeerCounters, recent: u64) -> bool {
        let id = self.label_of(k);
        let Some(t) = self.labels.get_mut(&id) else { return false };
        let Some(direction) = Direction::from_repr(k.direction) else { return true };
        let (last, activity) = match t.entries.get_mut(k) {
            Some(seen) => {
                let last = std::mem::replace(&mut seen.last, *v);
                seen.read = self.read;
                // Any slot going down means the entry was created again: count it all.
                let recreated = v.counts.iter().zip(&last.counts).any(|(n, l)| n < l)
                    || v.outcomes.iter().zip(&last.outcomes).any(|(n, l)| n < l)
                    || v.throttled < last.throttled;
                let last = if recreated { PeerCounters::default() } else { last };
                (last, v.total() - last.total())
            }
            None if self.members < self.limits.members() => {
                t.entries.insert(*k, Seen { last: *v, read: self.read });
                self.members += 1;
                (PeerCounters::default(), recent)
            }
            None => return true,
        };
        for e in Event::ALL {
            for s in Side::ALL {
                let i = PeerCounters::index(e, s);
                t.add(direction, k.port, Counted::Event(e, s), v.counts[i] - last.counts[i]);
            }
        }
        for o in KERNEL_OUTCOMES {
            let i = o as usize;
            t.add(direction, k.port, Counted::Outcome(o), v.outcomes[i] - last.outcomes[i]);
        }
        t.add(direction, k.port, Counted::Throttled, v.throttled - last.throttled);
        t.activity += activity;
        true
    }

    /// Starts tracking the labels of the most recently active candidates (entries whose label
    /// is not tracked, with how much of each is recent), as many as there is room for; the
    /// least active untracked labels go at the end of the read.
    pub fn admit(&mut self, candidates: impl IntoIterator<Item = Offered>) {
        let room = self.limits.tracked().saturating_sub(self.exported());
        if room == 0 {
            return;
        }
        let mut by_label: BTreeMap<LabelId, (u64, Vec<Offered>)> = BTreeMap::new();
        for c in candidates {
            let id = self.label_of(&c.0);
            if self.labels.contains_key(&id) {
                continue;
            }
            let (sum, members) = by_label.entry(id).or_default();
            *sum += c.2;
            members.push(c);
        }
        let mut ranked: Vec<_> = by_label.into_iter().collect();
        ranked.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(&b.0)));
        for (id, (_, members)) in ranked.into_iter().take(room) {
            let Some(ip) = members[0].0.ip() else { continue };
            let peer: Arc<str> = self.labeler.label(ip).into();
            let floor = self.dropped.pop(&id).unwrap_or_default();
            self.labels.insert(
                id,
                Tracked {
                    peer,
                    totals: Totals::new(),
                    floor,
                    entries: Fast::default(),
                    timeouts: Fast::default(),
                    greetings: Fast::default(),
                    activity: 0,
                    recent: 0,
                    last_active: self.now,
                    exported: false,
                },
            );
            for (k, v, recent) in members {
                self.entry(&k, &v, recent);
            }
        }
    }

    /// The handshakes of one entry that timed out (the sweep's count).
    pub fn timeouts(&mut self, k: &PeerKey, n: u64) {
        let id = self.label_of(k);
        let read = self.read;
        let Some(t) = self.labels.get_mut(&id) else { return };
        let Some(direction) = Direction::from_repr(k.direction) else { return };
        let added = match t.timeouts.get_mut(k) {
            Some(seen) => {
                let r = rise(seen.last, n);
                *seen = Seen { last: n, read };
                t.activity += r;
                r
            }
            None if self.members < self.limits.members() => {
                t.timeouts.insert(*k, Seen { last: n, read });
                self.members += 1;
                n
            }
            None => return,
        };
        t.add(direction, k.port, Counted::Outcome(Outcome::Timeout), added);
    }

    /// One entry of the per-peer greetings map.
    pub fn greeting(&mut self, k: &PeerGreetingKey, n: u64) {
        let id = self.label_of(&k.peer);
        let read = self.read;
        let Some(t) = self.labels.get_mut(&id) else { return };
        let Some(direction) = Direction::from_repr(k.peer.direction) else { return };
        let added = match t.greetings.get_mut(k) {
            Some(seen) => {
                let r = rise(seen.last, n);
                *seen = Seen { last: n, read };
                t.activity += r;
                r
            }
            None if self.members < self.limits.members() => {
                t.greetings.insert(*k, Seen { last: n, read });
                self.members += 1;
                n
            }
            None => return,
        };
        t.add(direction, k.peer.port, Counted::Greeting(k.code), added);
    }

    fn exported(&self) -> usize {
        self.labels.values().filter(|t| t.exported).count()
    }

    /// The exported labels and their `peer` label values.
    pub fn exported_labels(&self) -> impl Iterator<Item = (LabelId, Arc<str>)> + '_ {
        self.labels.iter().filter(|(_, t)| t.exported).map(|(id, t)| (*id, t.peer.clone()))
    }

    /// Ends the read: forgets the members that are gone, retires the exported labels idle for
    /// `--peer-series-idle`, gives free places to the most recently active labels, drops the
    /// least active candidates beyond the bound, and returns the exported series (sorted) and
    /// how many labels they belong to.
    pub fn finish(&mut self) -> (Vec<PeerSeries>, usize) {
        let (read, now, idle) = (self.read, self.now, self.limits.idle);
        let mut members = 0;
        for t in self.labels.values_mut() {
            t.entries.retain(|_, s| s.read == read);
            t.timeouts.retain(|_, s| s.read == read);
            t.greetings.retain(|_, s| s.read == read);
            members += t.members();
            t.recent = t.recent / 2 + t.activity;
            if t.activity > 0 {
                t.last_active = now;
            }
            t.activity = 0;
            let totals = &t.totals;
            t.floor.retain(|k, v| totals.get(k).is_none_or(|n| n < v));
            if t.exported && now.saturating_duration_since(t.last_active) >= idle {
                t.exported = false;
            }
        }
        self.members = members;
        let free = self.limits.max.saturating_sub(self.exported());
        if free > 0 {
            // Active lately, and within the idle time (a label that just left does not come
            // back on what it did before).
            let mut waiting: Vec<(u64, LabelId)> = self
                .labels
                .iter()
                .filter(|(_, t)| {
                    !t.exported
                        && t.recent > 0
                        && now.saturating_duration_since(t.last_active) < idle
                })
                .map(|(id, t)| (t.recent, *id))
                .collect();
            waiting.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, id) in waiting.into_iter().take(free) {
                if let Some(t) = self.labels.get_mut(&id) {
                    t.exported = true;
                }
            }
        }
        let excess = self.labels.len().saturating_sub(self.limits.tracked());
        if excess > 0 {
            // The least recently active candidates go first.
            let mut idle: Vec<(u64, Instant, LabelId)> = self
                .labels
                .iter()
                .filter(|(_, t)| !t.exported)
                .map(|(id, t)| (t.recent, t.last_active, *id))
                .collect();
            idle.sort();
            for (_, _, id) in idle.into_iter().take(excess) {
                if let Some(t) = self.labels.remove(&id) {
                    self.members -= t.members();
                    self.dropped.put(id, t.values());
                }
            }
        }
        let mut series = Vec::new();
        let mut exported = 0;
        for (id, t) in &self.labels {
            if !t.exported {
                continue;
            }
            exported += 1;
            series.extend(t.values().into_iter().map(|((direction, port, counted), value)| {
                PeerSeries {
                    ifindex: id.ifindex,
                    peer: t.peer.clone(),
                    direction,
                    port,
                    counted,
                    value,
                }
            }));
        }
        series.sort_by(|a, b| {
            (a.ifindex, &a.peer, a.direction, a.port, a.counted).cmp(&(
                b.ifindex,
                &b.peer,
                b.direction,
                b.port,
                b.counted,
            ))
        });
        (series, exported)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use smtpflow_common::FAMILY_V4;

    use super::*;
    use crate::drain::peers::PeerReader;

    fn key(net: u8, host: u8) -> PeerKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 51, net, host]);
        PeerKey { ifindex: 2, addr, port: 25, family: FAMILY_V4, direction: 0 }
    }

    fn syns(n: u64) -> PeerCounters {
        let mut c = PeerCounters::default();
        c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = n;
        c
    }

    const SYN: Counted = Counted::Event(Event::Syn, Side::Peer);

    /// Exported values by (peer label, what they count), summed over ports and directions.
    fn values(series: &[PeerSeries]) -> BTreeMap<(String, Counted), u64> {
        let mut out = BTreeMap::new();
        for s in series {
            *out.entry((s.peer.to_string(), s.counted)).or_default() += s.value;
        }
        out
    }

    /// A reader with `max` series labelled by /24, idle after `idle`, read at `t0 + secs`.
    struct Reads {
        reader: PeerReader,
        t0: Instant,
    }

    impl Reads {
        fn new(max: usize, labeler: PeerLabel, idle: Duration) -> Self {
            let limits = SeriesLimits { max, idle };
            Self { reader: PeerReader::with_series(limits, labeler, 1024), t0: Instant::now() }
        }

        fn at(
            &mut self,
            secs: u64,
            entries: &[(PeerKey, PeerCounters)],
            timeouts: &[(PeerKey, u64)],
            greetings: &[(PeerGreetingKey, u64)],
        ) -> BTreeMap<(String, Counted), u64> {
            let now = self.t0 + Duration::from_secs(secs);
            values(&self.reader.view_at(now, entries, timeouts, greetings).series)
        }
    }

    fn prefix() -> PeerLabel {
        PeerLabel::Prefix { v4: 24, v6: 64 }
    }

    #[test]
    fn a_label_never_goes_down_when_members_are_evicted_or_created_again() {
        let mut r = Reads::new(4, prefix(), SeriesLimits::DEFAULT_IDLE);
        let net = || ("198.51.7.0/24".to_owned(), SYN);
        let v = r.at(0, &[(key(7, 1), syns(5)), (key(7, 2), syns(3))], &[], &[]);
        assert_eq!(v[&net()], 8, "the sum of the members");
        // .1 evicted from the kernel: its 5 stay; .2 rose by 2.
        let v = r.at(1, &[(key(7, 2), syns(5))], &[], &[]);
        assert_eq!(v[&net()], 10);
        // .1 created again with 1: a new value, added whole.
        let v = r.at(2, &[(key(7, 1), syns(1)), (key(7, 2), syns(5))], &[], &[]);
        assert_eq!(v[&net()], 11);
        // .2 evicted and created again between two reads, with less than before: added whole.
        let v = r.at(3, &[(key(7, 1), syns(1)), (key(7, 2), syns(2))], &[], &[]);
        assert_eq!(v[&net()], 13);
        // A new member of a tracked label adds all of its value.
        let v =
            r.at(4, &[(key(7, 1), syns(1)), (key(7, 2), syns(2)), (key(7, 9), syns(4))], &[], &[]);
        assert_eq!(v[&net()], 17);
    }

    #[test]
    fn timeouts_and_greetings_only_go_up() {
        let mut r = Reads::new(4, PeerLabel::Ip, SeriesLimits::DEFAULT_IDLE);
        let p = key(7, 1);
        let g = |code| PeerGreetingKey::greeting(p, code);
        let timeout = || ("198.51.7.1".to_owned(), Counted::Outcome(Outcome::Timeout));
        let greeting = || ("198.51.7.1".to_owned(), Counted::Greeting(421));
        let v = r.at(0, &[(p, syns(9))], &[(p, 3)], &[(g(421), 2)]);
        assert_eq!((v[&timeout()], v[&greeting()]), (3, 2));
        // The sweep forgot the peer (its LRU), the greetings entry was evicted.
        let v = r.at(1, &[(p, syns(10))], &[], &[]);
        assert_eq!((v[&timeout()], v[&greeting()]), (3, 2));
        // Both counted again from 1.
        let v = r.at(2, &[(p, syns(11))], &[(p, 1)], &[(g(421), 1)]);
        assert_eq!((v[&timeout()], v[&greeting()]), (4, 3));
        let v = r.at(3, &[(p, syns(12))], &[(p, 4)], &[(g(421), 1), (g(220), 6)]);
        assert_eq!((v[&timeout()], v[&greeting()]), (7, 3));
        assert_eq!(v[&("198.51.7.1".to_owned(), Counted::Greeting(220))], 6);
    }

    #[test]
    fn throttled_sessions_only_go_up() {
        let mut r = Reads::new(4, prefix(), SeriesLimits::DEFAULT_IDLE);
        let throttled = |n| PeerCounters { throttled: n, ..syns(10) };
        let net = || ("198.51.7.0/24".to_owned(), Counted::Throttled);
        let v = r.at(0, &[(key(7, 1), throttled(2)), (key(7, 2), throttled(1))], &[], &[]);
        assert_eq!(v[&net()], 3, "the sum of the members");
        // .1 evicted and created again with fewer throttled sessions: added whole, never lower.
        let v = r.at(1, &[(key(7, 1), throttled(1)), (key(7, 2), throttled(1))], &[], &[]);
        assert_eq!(v[&net()], 4);
        let v = r.at(2, &[(key(7, 2), throttled(3))], &[], &[]);
        assert_eq!(v[&net()], 6);
    }

    #[test]
    fn exported_series_keep_their_place_while_active_and_leave_when_idle() {
        let idle = Duration::from_secs(30);
        let mut r = Reads::new(2, PeerLabel::Ip, idle);
        let peers = |v: &BTreeMap<(String, Counted), u64>| -> Vec<String> {
            let mut p: Vec<String> = v.keys().map(|(p, _)| p.clone()).collect();
            p.dedup();
            p
        };
        // .1 and .2 take the two places.
        let v = r.at(0, &[(key(7, 1), syns(10)), (key(7, 2), syns(10))], &[], &[]);
        assert_eq!(peers(&v), ["198.51.7.1", "198.51.7.2"]);
        // .3 is far more active from now on, .1 rises by one a read, .2 not at all: both keep
        // their places until .2 has been idle for 30 s.
        let mut last = BTreeMap::new();
        for s in 1..=40u64 {
            let entries =
                [(key(7, 1), syns(10 + s)), (key(7, 2), syns(10)), (key(7, 3), syns(100 * s))];
            let v = r.at(s, &entries, &[], &[]);
            let want: &[&str] =
                if s < 30 { &["198.51.7.1", "198.51.7.2"] } else { &["198.51.7.1", "198.51.7.3"] };
            assert_eq!(peers(&v), want, "at {s} s");
            for (k, n) in &v {
                assert!(last.get(k).is_none_or(|l| l <= n), "{k:?} went down at {s} s");
            }
            last = v;
        }
        assert_eq!(last[&("198.51.7.1".to_owned(), SYN)], 50);
        assert_eq!(
            last[&("198.51.7.3".to_owned(), SYN)],
            4000,
            "all of .3 since it was first seen"
        );
    }

    #[test]
    fn new_series_enter_by_recent_activity_not_lifetime_totals() {
        let idle = Duration::from_secs(5);
        let mut r = Reads::new(1, PeerLabel::Ip, idle);
        // .1 and the heavy .2 arrive together; .1 wins the one place by... nothing: .2 is larger.
        let v = r.at(0, &[(key(7, 1), syns(1)), (key(7, 2), syns(1000))], &[], &[]);
        assert!(v.contains_key(&("198.51.7.2".to_owned(), SYN)));
        // From then on .2 is idle, .1 rises slowly, .4 appears with a little: when .2 leaves, the
        // place goes to the one active lately (.1), not to lifetime totals.
        for s in 1..=60u64 {
            let entries = [(key(7, 1), syns(1 + s)), (key(7, 2), syns(1000)), (key(7, 4), syns(3))];
            let v = r.at(s, &entries, &[], &[]);
            let who: Vec<&String> = v.keys().map(|(p, _)| p).collect();
            if s < 5 {
                assert_eq!(who, ["198.51.7.2"], "at {s} s");
            } else {
                assert_eq!(who, ["198.51.7.1"], "at {s} s");
            }
        }
    }

    #[test]
    fn a_label_exported_again_goes_on_from_its_total() {
        let idle = Duration::from_secs(2);
        let mut r = Reads::new(1, PeerLabel::Ip, idle);
        let a = || ("198.51.7.1".to_owned(), SYN);
        let b = || ("198.51.7.2".to_owned(), SYN);
        assert_eq!(r.at(0, &[(key(7, 1), syns(10))], &[], &[])[&a()], 10);
        // .1 idle, .2 takes over; .1's entry is evicted from the kernel meanwhile.
        let v = r.at(5, &[(key(7, 2), syns(1))], &[], &[]);
        assert_eq!(v.keys().collect::<Vec<_>>(), [&b()]);
        let v = r.at(6, &[(key(7, 2), syns(1))], &[], &[]);
        assert_eq!(v[&b()], 1);
        // .1 back (created again in the kernel with 3) while .2 is idle: it goes on from 10.
        let v = r.at(9, &[(key(7, 1), syns(3)), (key(7, 2), syns(1))], &[], &[]);
        assert_eq!(v.keys().collect::<Vec<_>>(), [&a()]);
        assert_eq!(v[&a()], 13);
    }

    #[test]
    fn a_label_dropped_and_tracked_again_does_not_go_down() {
        let idle = Duration::from_secs(2);
        let mut r = Reads::new(1, PeerLabel::Ip, idle);
        let a = || ("198.51.7.1".to_owned(), SYN);
        assert_eq!(r.at(0, &[(key(7, 1), syns(100))], &[], &[])[&a()], 100);
        // .1 goes quiet and out of the kernel; 40 others keep the tracked labels busy, so .1
        // is dropped from them.
        for s in 1..=10u64 {
            let others: Vec<_> = (10..50u8).map(|h| (key(8, h), syns(s * 3))).collect();
            r.at(s, &others, &[], &[]);
        }
        assert!(r.reader.series_tracked().0 <= SeriesLimits::new(1).tracked());
        // .1 is back, created again in the kernel with 5, and the only active peer.
        let mut last = 0;
        for s in 11..=20u64 {
            let v = r.at(s, &[(key(7, 1), syns(5 * (s - 10)))], &[], &[]);
            if let Some(&n) = v.get(&a()) {
                assert!(n >= 100 && n >= last, "{n} at {s} s");
                last = n;
            }
        }
        assert_eq!(last, 100, "its floor, until the new count passes it");
        let v = r.at(40, &[(key(7, 1), syns(130))], &[], &[]);
        assert_eq!(v[&a()], 130);
    }

    #[test]
    fn tracked_labels_and_members_stay_bounded() {
        for labeler in [PeerLabel::Ip, prefix(), PeerLabel::Hash { key: b"k".to_vec() }] {
            let limits = SeriesLimits { max: 3, idle: Duration::from_secs(10) };
            let mut reader = PeerReader::with_series(limits, labeler.clone(), 1 << 14);
            let t0 = Instant::now();
            let mut last: BTreeMap<(String, Counted), u64> = BTreeMap::new();
            for s in 0..50u64 {
                // 40 networks of 25 hosts, on two ports, a third of them active in turn.
                let entries: Vec<(PeerKey, PeerCounters)> = (0..40u8)
                    .flat_map(|net| (1..=25u8).map(move |host| (net, host)))
                    .flat_map(|(net, host)| {
                        let active = u64::from(net) % 3 == s % 3;
                        let n = u64::from(host) + if active { s * 7 } else { 0 };
                        let mut k = key(net, host);
                        let a = (k, syns(n));
                        k.port = 587;
                        [a, (k, syns(n / 2 + 1))]
                    })
                    .collect();
                let timeouts: Vec<(PeerKey, u64)> =
                    entries.iter().step_by(3).map(|(k, _)| (*k, s)).collect();
                let view = reader.view_at(t0 + Duration::from_secs(s), &entries, &timeouts, &[]);
                let (labels, members) = reader.series_tracked();
                assert!(labels <= limits.tracked(), "{labels} labels tracked at {s}");
                assert!(members <= limits.members(), "{members} members at {s}");
                assert!(view.exported_peers <= 3);
                let v = values(&view.series);
                let peers: std::collections::BTreeSet<&String> = v.keys().map(|(p, _)| p).collect();
                assert_eq!(peers.len(), view.exported_peers, "{labeler:?}");
                for (k, n) in &v {
                    assert!(last.get(k).is_none_or(|l| l <= n), "{k:?} went down at {s}");
                }
                last.extend(v);
            }
        }
    }

    #[test]
    fn an_activity_sketch_tells_what_rose() {
        use crate::drain::peers::ActivitySketch;
        const A: u64 = 0x9e37_79b9_7f4a_7c15;
        const B: u64 = 0xbf58_476d_1ce4_e5b9;
        let mut s = ActivitySketch::new(1000);
        s.start();
        assert_eq!((s.observe(A, 5), s.observe(B, 2)), (5, 2), "new: all of it");
        s.start();
        assert_eq!((s.observe(A, 8), s.observe(B, 2)), (3, 0));
        s.start();
        assert_eq!((s.observe(A, 8), s.observe(B, 1)), (0, 1), "created again: all of it");
        s.start();
        assert_eq!(s.observe(B, 2), 1);
        s.start();
        assert_eq!(s.observe(B, 2), 0);
        s.start();
        // A was not seen in the last read: its slot was freed, it is new again.
        assert_eq!(s.observe(A, 8), 8);
        assert_eq!(s.observe(A, 8), 0, "seen twice in a read");
    }

    /// A full map's entries nearly all find a slot (each in the less full of its two buckets),
    /// and keep it from one read to the next.
    #[test]
    fn an_activity_sketch_holds_a_full_map() {
        use crate::drain::peers::ActivitySketch;
        const N: u64 = 65_536;
        // splitmix64: well-spread hashes, the same every run.
        let hash = |i: u64| {
            let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut s = ActivitySketch::new(N as usize);
        s.start();
        let placed = (0..N).filter(|&i| s.observe(hash(i), 5) == 5).count() as u64;
        // Simulated: about 4 in a million miss; taking the first bucket with room, 7 in 1,000.
        assert!(N - placed <= 4, "{} of {N} entries found no slot", N - placed);
        s.start();
        let rose = (0..N).filter(|&i| s.observe(hash(i), 7) == 2).count() as u64;
        assert_eq!(rose, placed, "every placed entry rose by 2");
    }
}
