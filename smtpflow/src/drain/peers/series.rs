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
//! tracked (the exported ones, and as many candidates: recently active or recently exported), and
//! at most [`SeriesLimits::members`] members over all of them. A label tracked again after it was
//! dropped starts from its members' kernel values again (after at least `--peer-series-idle`
//! without a sample, so Prometheus sees a new series); a member beyond the bound is counted once
//! there is room, with its whole value.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use smtpflow_common::{
    Direction, Event, Outcome, PeerCounters, PeerGreetingKey, PeerKey, Side,
    counter::KERNEL_OUTCOMES,
};

use super::ENTRY_SLACK;
use crate::output::peer_label::PeerLabel;

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

/// Series of a label, by direction, port and what they count.
type Totals = BTreeMap<(Direction, u16, Counted), u64>;

/// A tracked label: its totals, its members and how active it is.
#[derive(Debug)]
struct Tracked {
    peer: Arc<str>,
    totals: Totals,
    entries: HashMap<PeerKey, Seen<PeerCounters>>,
    timeouts: HashMap<PeerKey, Seen<u64>>,
    greetings: HashMap<PeerGreetingKey, Seen<u64>>,
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
    labels: HashMap<LabelId, Tracked>,
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
            labels: HashMap::new(),
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
        LabelId { ifindex: k.ifindex, family: k.family, addr: self.labeler.group(k.family, &k.addr) }
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
                    || v.outcomes.iter().zip(&last.outcomes).any(|(n, l)| n < l);
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
        for (i, o) in KERNEL_OUTCOMES.into_iter().enumerate() {
            t.add(direction, k.port, Counted::Outcome(o), v.outcomes[i] - last.outcomes[i]);
        }
        t.activity += activity;
        true
    }

    /// Starts tracking the labels of the most recently active candidates (entries whose label
    /// is not tracked, with how much of each is recent), as many as there is room for; the
    /// least active untracked labels go at the end of the read.
    pub fn admit(&mut self, candidates: impl IntoIterator<Item = (PeerKey, PeerCounters, u64)>) {
        let room = self.limits.tracked().saturating_sub(self.exported());
        if room == 0 {
            return;
        }
        let mut by_label: BTreeMap<LabelId, (u64, Vec<(PeerKey, PeerCounters, u64)>)> =
            BTreeMap::new();
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
            self.labels.insert(
                id,
                Tracked {
                    peer,
                    totals: Totals::new(),
                    entries: HashMap::new(),
                    timeouts: HashMap::new(),
                    greetings: HashMap::new(),
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
            if t.exported && now.saturating_duration_since(t.last_active) >= idle {
                t.exported = false;
            }
        }
        self.members = members;
        let free = self.limits.max.saturating_sub(self.exported());
        if free > 0 {
            let mut waiting: Vec<(u64, LabelId)> = self
                .labels
                .iter()
                .filter(|(_, t)| !t.exported && t.recent > 0)
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
            series.extend(t.totals.iter().map(|(&(direction, port, counted), &value)| PeerSeries {
                ifindex: id.ifindex,
                peer: t.peer.clone(),
                direction,
                port,
                counted,
                value,
            }));
        }
        series.sort_by(|a, b| {
            (a.ifindex, &a.peer, a.direction, a.port, a.counted)
                .cmp(&(b.ifindex, &b.peer, b.direction, b.port, b.counted))
        });
        (series, exported)
    }
}
