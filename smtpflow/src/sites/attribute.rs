//! Per-site counters: what each full read of the per-peer maps says the peers did, given to the
//! site of each peer.
//!
//! Names are learnt from payload events ([`Sites::learn`]) and remembered per remote address
//! and direction, the latest name winning, in an LRU cache of [`NAMES_KEPT`] entries (about
//! 25 MiB when full with long names). A peer's site is its remembered name's site, else a
//! `--site-map` CIDR rule's, else `unknown`.
//!
//! Attribution: the kernel's per-peer counters are cumulative per entry (peer, port,
//! direction). Each full read hands every entry over ([`Sites::entry`], [`Sites::timeouts`],
//! [`Sites::reply`]); what an entry rose by since the last read (all of it when the entry is
//! new, or went down because the LRU map evicted and created it again) goes to the peer's
//! current site. The last values are remembered per entry, so this memory follows the per-peer
//! maps' size (`--max-peers`: about 150 bytes per per-peer entry and 70 per reply-code entry,
//! some 15 MiB at the default 65,536). What an entry counted between the last read and its
//! eviction from the kernel's map is lost (the exact totals, `smtpflow_handshakes_total` and
//! the others, still have it).
//!
//! A peer with no name and no CIDR rule may be about to say it (a greeting and the handshake
//! are read in the same drain, but a per-peer read can fall between them): its rises are held
//! for [`NAME_GRACE`] waiting for a name, for at most [`PENDING_KEPT`] peers (the least
//! recently held then go to `unknown` at once), then go to `unknown`.
//!
//! Series: at most `--max-site-series` sites are exported, in the order they first counted
//! something; the rise of any other site is added to `other`. `unknown` and `other` are always
//! exported and do not take a place. A site that has counted nothing for `--peer-series-idle`
//! leaves (its series disappear and its place is free; if it comes back it starts from 0 again).
//! Exported values only go up while exported.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;
use smtpflow_common::{
    Direction, Outcome, PayloadEvent, PayloadKind, PeerCounters, PeerGreetingKey, PeerKey, Phase,
    counter::KERNEL_OUTCOMES, peer::reply_kind,
};

use super::{
    map::{OTHER, SiteMap, UNKNOWN},
    names,
};
use crate::drain::peers::{FoldState, PeerTimeouts};

/// Most remote names remembered (address and direction → site).
pub const NAMES_KEPT: usize = 65_536;
/// Most unnamed peers whose counts wait for a name.
pub const PENDING_KEPT: usize = 4_096;
/// How long an unnamed peer's counts wait for its name before they go to `unknown`.
pub const NAME_GRACE: Duration = Duration::from_secs(30);
/// The default of `--peer-series-idle`, which site series follow too.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// The default of `--max-site-series`.
pub const DEFAULT_MAX_SITE_SERIES: usize = 200;

/// What a per-site series counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SiteCounted {
    /// `smtpflow_site_handshakes_total{outcome}`.
    Handshake(Outcome),
    /// `smtpflow_site_smtp_replies_total{code}`.
    Reply(u16),
    /// `smtpflow_site_resets_total{phase}`.
    Reset(Phase),
}

/// Counts by direction, port and what they count.
type Counts = BTreeMap<(Direction, u16, SiteCounted), u64>;

/// One exported per-site series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteSeries {
    pub site: Arc<str>,
    pub direction: Direction,
    pub port: u16,
    pub counted: SiteCounted,
    pub value: u64,
}

/// `smtpflow_site_open_connections`: a site's open connections in a direction and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteOpen {
    pub site: Arc<str>,
    pub direction: Direction,
    pub port: u16,
    pub open: u64,
}

/// What one read of the sites exports, and the sites of the peers the diagnosis names.
#[derive(Clone, Debug, Default)]
pub struct SiteView {
    /// Sorted by site, direction, port and what they count.
    pub series: Vec<SiteSeries>,
    /// Sites with their own series (at most `--max-site-series`).
    pub exported: usize,
    /// Remote names remembered.
    pub names: usize,
    /// Sites of the peers the per-peer figures name, by address and direction.
    pub peer_sites: BTreeMap<(u8, [u8; 16], u8), Arc<str>>,
}

impl SiteView {
    /// The site of a peer as of this read (`unknown` if it had none).
    pub fn site_of(&self, k: &PeerKey) -> &str {
        self.peer_sites.get(&name_key(k)).map_or(UNKNOWN, |s| s)
    }
}

/// Who a name belongs to: the remote address and the direction (any interface, any port).
type NameKey = (u8, [u8; 16], u8);

fn name_key(k: &PeerKey) -> NameKey {
    (k.family, k.addr, k.direction)
}

/// The last values of a per-peer entry, and the read that saw them.
#[derive(Clone, Copy, Debug)]
struct Last<T> {
    value: T,
    read: u64,
}

/// The counts a per-peer entry's site gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct EntryCounts {
    outcomes: [u64; KERNEL_OUTCOMES.len()],
    resets: [u64; Phase::COUNT],
}

impl EntryCounts {
    fn of(v: &PeerCounters) -> Self {
        Self {
            outcomes: KERNEL_OUTCOMES.map(|o| v.outcome(o)),
            resets: Phase::ALL.map(|p| v.resets(p)),
        }
    }
}

fn rise(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

/// Counts waiting for a peer's name.
#[derive(Debug)]
struct Pending {
    since: Instant,
    counts: Counts,
}

/// An exported site's totals.
#[derive(Debug)]
struct Site {
    counts: Counts,
    last_active: Instant,
}

/// Names, the attribution of per-peer rises to sites, and the bounded per-site totals.
#[derive(Debug)]
pub struct Sites {
    map: SiteMap,
    max: usize,
    idle: Duration,
    grace: Duration,
    /// Watched ports (seeded zeros of `unknown` and `other`).
    ports: Vec<u16>,
    names: LruCache<NameKey, Arc<str>>,
    /// Looked up for every entry of every read (a million at most): keyed with the per-peer
    /// reader's fast hash, not SipHash.
    entries: HashMap<PeerKey, Last<EntryCounts>, FoldState>,
    replies: HashMap<(PeerKey, u16), Last<u64>, FoldState>,
    pending: LruCache<NameKey, Pending>,
    sites: HashMap<Arc<str>, Site>,
    unknown: Counts,
    other: Counts,
    read: u64,
    now: Instant,
}

impl Sites {
    /// `max`: `--max-site-series`; `ports`: the watched SMTP ports.
    pub fn new(map: SiteMap, max: usize, ports: &[u16]) -> Self {
        let mut s = Self {
            map,
            max,
            idle: DEFAULT_IDLE,
            grace: NAME_GRACE,
            ports: ports.to_vec(),
            names: LruCache::new(NonZeroUsize::new(NAMES_KEPT).unwrap_or(NonZeroUsize::MIN)),
            entries: HashMap::default(),
            replies: HashMap::default(),
            pending: LruCache::new(NonZeroUsize::new(PENDING_KEPT).unwrap_or(NonZeroUsize::MIN)),
            sites: HashMap::new(),
            unknown: Counts::new(),
            other: Counts::new(),
            read: 0,
            now: Instant::now(),
        };
        for &port in &s.ports.clone() {
            for direction in Direction::ALL {
                seed(&mut s.unknown, direction, port);
                seed(&mut s.other, direction, port);
            }
        }
        s
    }

    /// Sets `--peer-series-idle` (a site idle this long leaves the export set).
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// Sets how long unnamed peers' counts wait for a name (tests).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Learns the names payload events say, at `now`: a peer's held counts go to its site.
    pub fn learn(&mut self, events: &[PayloadEvent], now: Instant) {
        self.now = now;
        for ev in events {
            let Some(kind) = PayloadKind::from_repr(ev.kind) else { continue };
            let Some(direction) = Direction::from_repr(ev.peer.direction) else { continue };
            if !names::names_the_remote(kind, direction) {
                continue;
            }
            if let Some(name) = names::name_of(kind, ev.payload()) {
                self.name(&ev.peer, &name);
            }
        }
    }

    /// Remembers `name` (a checked host name) for the peer of `k`.
    pub fn name(&mut self, k: &PeerKey, name: &str) {
        let site = self.map.site_of_name(name);
        let key = name_key(k);
        if let Some(p) = self.pending.pop(&key) {
            self.add_counts(&site, p.counts);
        }
        self.names.put(key, site);
    }

    /// Starts a full read at `now`: sites idle for `--peer-series-idle` leave first, so their
    /// places are free for this read's rises.
    pub fn start(&mut self, now: Instant) {
        self.read += 1;
        self.now = now;
        let idle = self.idle;
        self.sites.retain(|_, s| now.saturating_duration_since(s.last_active) < idle);
    }

    /// One entry of the per-peer map.
    pub fn entry(&mut self, k: &PeerKey, v: &PeerCounters) {
        let now = EntryCounts::of(v);
        let read = self.read;
        // An entry with nothing a site counts needs no last value (zero is its default): the
        // peers of a SYN flood that were never answered cost nothing here.
        let last = if now == EntryCounts::default() {
            self.entries.remove(k)
        } else {
            self.entries.insert(*k, Last { value: now, read })
        };
        let last = last.map(|l| l.value).unwrap_or_default();
        let Some(direction) = Direction::from_repr(k.direction) else { return };
        let mut counts = Counts::new();
        for (i, o) in KERNEL_OUTCOMES.iter().enumerate() {
            add(
                &mut counts,
                direction,
                k.port,
                SiteCounted::Handshake(*o),
                rise(last.outcomes[i], now.outcomes[i]),
            );
        }
        for (i, p) in Phase::ALL.iter().enumerate() {
            add(
                &mut counts,
                direction,
                k.port,
                SiteCounted::Reset(*p),
                rise(last.resets[i], now.resets[i]),
            );
        }
        self.attribute(k, counts);
    }

    /// The timed-out handshakes of one per-peer entry (the sweep's count): its site gets those
    /// not [`PeerTimeouts::attributed`] yet.
    pub fn timeouts(&mut self, k: &PeerKey, t: &mut PeerTimeouts) {
        let (last, n) = (t.attributed, t.total);
        t.attributed = n;
        let Some(direction) = Direction::from_repr(k.direction) else { return };
        let mut counts = Counts::new();
        add(
            &mut counts,
            direction,
            k.port,
            SiteCounted::Handshake(Outcome::Timeout),
            rise(last, n),
        );
        self.attribute(k, counts);
    }

    /// One entry of the per-peer reply map (only those counting every reply are read).
    pub fn reply(&mut self, k: &PeerGreetingKey, n: u64) {
        if k.kind != reply_kind::ANY {
            return;
        }
        let read = self.read;
        let last =
            self.replies.insert((k.peer, k.code), Last { value: n, read }).map_or(0, |l| l.value);
        let Some(direction) = Direction::from_repr(k.peer.direction) else { return };
        let mut counts = Counts::new();
        add(&mut counts, direction, k.peer.port, SiteCounted::Reply(k.code), rise(last, n));
        self.attribute(&k.peer, counts);
    }

    /// The site of a peer now, if it has one (a name, or a CIDR rule).
    fn site_of(&mut self, k: &PeerKey) -> Option<Arc<str>> {
        if let Some(s) = self.names.get(&name_key(k)) {
            return Some(s.clone());
        }
        k.ip().and_then(|ip: IpAddr| self.map.site_of_addr(ip))
    }

    fn attribute(&mut self, k: &PeerKey, counts: Counts) {
        if counts.is_empty() {
            return;
        }
        if let Some(site) = self.site_of(k) {
            self.add_counts(&site, counts);
            return;
        }
        let now = self.now;
        let key = name_key(k);
        if let Some(p) = self.pending.get_mut(&key) {
            merge(&mut p.counts, counts);
        } else if let Some((_, gone)) = self.pending.push(key, Pending { since: now, counts }) {
            // The least recently held peer, beyond PENDING_KEPT.
            merge(&mut self.unknown, gone.counts);
        }
    }

    /// Adds to a site's totals, or `other`'s when it has no place.
    fn add_counts(&mut self, site: &Arc<str>, counts: Counts) {
        let now = self.now;
        if let Some(s) = self.sites.get_mut(site) {
            s.last_active = now;
            merge(&mut s.counts, counts);
        } else if self.sites.len() < self.max {
            let mut c = Counts::new();
            for &(direction, port, _) in counts.keys() {
                seed(&mut c, direction, port);
            }
            merge(&mut c, counts);
            self.sites.insert(site.clone(), Site { counts: c, last_active: now });
        } else {
            merge(&mut self.other, counts);
        }
    }

    /// Ends a read: forgets the entries it did not show, gives held counts past the grace to
    /// `unknown`, and returns the series and the sites of `named` peers.
    pub fn finish<'a>(&mut self, named: impl IntoIterator<Item = &'a PeerKey>) -> SiteView {
        let read = self.read;
        self.entries.retain(|_, l| l.read == read);
        self.replies.retain(|_, l| l.read == read);
        self.expire();
        let mut series = Vec::new();
        let mut push = |site: &Arc<str>, counts: &Counts| {
            for (&(direction, port, counted), &value) in counts {
                series.push(SiteSeries { site: site.clone(), direction, port, counted, value });
            }
        };
        push(&Arc::from(UNKNOWN), &self.unknown);
        push(&Arc::from(OTHER), &self.other);
        for (site, s) in &self.sites {
            push(site, &s.counts);
        }
        series.sort_by(|a, b| {
            (&a.site, a.direction, a.port, a.counted).cmp(&(
                &b.site,
                b.direction,
                b.port,
                b.counted,
            ))
        });
        let mut peer_sites = BTreeMap::new();
        for k in named {
            if let Some(site) = self.site_of(k) {
                peer_sites.insert(name_key(k), site);
            }
        }
        SiteView { series, exported: self.sites.len(), names: self.names.len(), peer_sites }
    }

    /// Open connections by site, from the open connections per per-peer entry (the flow map's,
    /// at every drain): a peer's current site if it has its own series, `other` if it has a
    /// site without (beyond `--max-site-series`, or not counted yet), `unknown` if it has none.
    /// Zeros for `unknown` and `other` on every watched port and direction, and for each
    /// exported site where its other series are.
    pub fn open_connections<'a>(
        &mut self,
        by_peer: impl IntoIterator<Item = (&'a PeerKey, &'a u64)>,
    ) -> Vec<SiteOpen> {
        let (unknown, other): (Arc<str>, Arc<str>) = (UNKNOWN.into(), OTHER.into());
        let mut out: BTreeMap<(Arc<str>, Direction, u16), u64> = BTreeMap::new();
        for &port in &self.ports {
            for direction in Direction::ALL {
                out.insert((unknown.clone(), direction, port), 0);
                out.insert((other.clone(), direction, port), 0);
            }
        }
        for (site, s) in &self.sites {
            for &(direction, port, _) in s.counts.keys() {
                out.insert((site.clone(), direction, port), 0);
            }
        }
        for (k, n) in by_peer {
            let Some(direction) = Direction::from_repr(k.direction) else { continue };
            let site = match self.site_of(k) {
                Some(site) if self.sites.contains_key(&site) => site,
                Some(_) => other.clone(),
                None => unknown.clone(),
            };
            *out.entry((site, direction, k.port)).or_default() += n;
        }
        out.into_iter()
            .map(|((site, direction, port), open)| SiteOpen { site, direction, port, open })
            .collect()
    }

    /// Gives the counts held longer than the grace to `unknown` (a pass over at most
    /// [`PENDING_KEPT`] peers, once per read).
    fn expire(&mut self) {
        let (now, grace) = (self.now, self.grace);
        let old: Vec<NameKey> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= grace)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if let Some(p) = self.pending.pop(&k) {
                merge(&mut self.unknown, p.counts);
            }
        }
    }
}

fn add(c: &mut Counts, direction: Direction, port: u16, counted: SiteCounted, n: u64) {
    if n > 0 {
        *c.entry((direction, port, counted)).or_default() += n;
    }
}

fn merge(into: &mut Counts, from: Counts) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Zeros of every handshake outcome and reset phase, so that expected zeros exist.
fn seed(c: &mut Counts, direction: Direction, port: u16) {
    for o in Outcome::ALL {
        c.entry((direction, port, SiteCounted::Handshake(o))).or_default();
    }
    for p in Phase::ALL {
        c.entry((direction, port, SiteCounted::Reset(p))).or_default();
    }
}

#[cfg(test)]
mod tests;
