//! The diagnosis: every interval, over a sliding window, which of the usual causes of failing
//! SMTP handshakes is active, with the evidence and the usual remedy. Pure: it sees readings
//! ([`Reading`]) and decides; the drain loop feeds it and exports/logs what it says.
//!
//! Each cause has its own test over the window, a minimum count and (for failures) a minimum
//! share of attempts, so that everyday noise (a greylisting reply, one backup MX down, a
//! scanner dropped by the firewall, another service's full accept queue) raises nothing:
//! - the remote causes are decided per peer, on that peer's own counts and share
//!   ([`PeerCounts`]), and name the peers that pass;
//! - the local causes are decided for the host, from local evidence about SMTP only.
//!
//! The README's "How each cause is decided" says the same for operators.
use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant},
};
/// The causes, in the order they are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    ConntrackExhaustion,
    ListenOverflow,
    RemoteThrottling,
    RemoteUnreachable,
    RemoteRefusing,
    LocalReceiveStall,
    PeerReceiveStall,
}

impl Cause {
    pub const ALL: [Cause; 7] = [
        Cause::ConntrackExhaustion,
        Cause::ListenOverflow,
        Cause::RemoteThrottling,
        Cause::RemoteUnreachable,
        Cause::RemoteRefusing,
        Cause::LocalReceiveStall,
        Cause::PeerReceiveStall,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Cause::ConntrackExhaustion => "conntrack_exhaustion",
            Cause::ListenOverflow => "listen_overflow",
            Cause::RemoteThrottling => "remote_throttling",
            Cause::RemoteUnreachable => "remote_unreachable",
            Cause::RemoteRefusing => "remote_refusing",
            Cause::LocalReceiveStall => "local_receive_stall",
            Cause::PeerReceiveStall => "peer_receive_stall",
        }
    }

    /// The usual remedy, said when the cause turns on.
    pub const fn remedy(self) -> &'static str {
        match self {
            Cause::ConntrackExhaustion => {
                "raise net.netfilter.nf_conntrack_max or shorten nf_conntrack_tcp_timeout_established"
            }
            Cause::ListenOverflow => {
                "raise the MTA's listen backlog and net.core.somaxconn, or add smtpd processes"
            }
            Cause::RemoteThrottling => {
                "lower the concurrency and rate towards these destinations (e.g. postfix \
                 default_destination_concurrency_limit)"
            }
            Cause::RemoteUnreachable => {
                "check routing and firewalls towards these MXs; their SYNs get no answer or an \
                 ICMP unreachable"
            }
            Cause::RemoteRefusing => {
                "these MXs refuse port 25: check their MX records and policies"
            }
            Cause::LocalReceiveStall => {
                "our receiving side stops reading: check the MTA's CPU, disk and queue manager"
            }
            Cause::PeerReceiveStall => {
                "these peers stop reading what we send: usually slow or overloaded remote servers"
            }
        }
    }
}

/// Thresholds, from the command line (`--window`, `--min-failures`, `--min-share`,
/// `--min-zero-windows`, `--conntrack-fill`).
#[derive(Clone, Debug)]
pub struct Thresholds {
    pub window: Duration,
    /// Conntrack fill (entries / limit) counted as near the limit.
    pub conntrack_fill: f64,
    /// Failures in the window a cause needs: a peer's throttled sessions, refused or unanswered
    /// handshakes; the host's unanswered inbound SYNs; SMTP SYNs dropped on a full listen queue.
    pub min_failures: u64,
    /// The least share of attempts those failures must be (0 to 1): of the peer's established
    /// sessions (throttling) or handshakes (refusing, unreachable), of the inbound handshakes
    /// (conntrack).
    pub min_share: f64,
    /// Zero-window events in the window that make a stall cause active (per peer for
    /// peer_receive_stall).
    pub min_zero_windows: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            conntrack_fill: 0.9,
            min_failures: 10,
            min_share: 0.1,
            min_zero_windows: 10,
        }
    }
}

/// One peer's cumulative counts, as the per-peer causes read them. Handshakes and sessions are
/// outbound (ours to the peer); zero windows are both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// Handshakes answered by a SYN-ACK (sessions).
    pub established: u64,
    /// Handshakes answered by a RST.
    pub refused: u64,
    /// Handshakes never answered within `--handshake-timeout`.
    pub timeouts: u64,
    /// Handshakes answered by an ICMP or ICMPv6 destination unreachable.
    pub unreachable: u64,
    /// Sessions with at least one throttling reply (421, or a 4xx rate or policy limit).
    pub throttled: u64,
    /// Zero windows we advertised to the peer.
    pub zero_windows_sent: u64,
    /// Zero windows the peer advertised.
    pub zero_windows_received: u64,
}

/// A counter's rise from `base` to `last`; a smaller `last` is a restart of the count (the
/// peer's entry left the kernel's LRU map and came back), so all of it is new.
fn rise(base: u64, last: u64) -> u64 {
    if last >= base { last - base } else { last }
}

impl PeerCounts {
    /// The counts added since `base`, field by field.
    fn since(&self, base: &PeerCounts) -> PeerCounts {
        PeerCounts {
            established: rise(base.established, self.established),
            refused: rise(base.refused, self.refused),
            timeouts: rise(base.timeouts, self.timeouts),
            unreachable: rise(base.unreachable, self.unreachable),
            throttled: rise(base.throttled, self.throttled),
            zero_windows_sent: rise(base.zero_windows_sent, self.zero_windows_sent),
            zero_windows_received: rise(base.zero_windows_received, self.zero_windows_received),
        }
    }

    /// Outbound handshakes: established, refused, unanswered or unreachable.
    pub fn attempts(&self) -> u64 {
        self.established + self.refused + self.timeouts + self.unreachable
    }

    /// Outbound handshakes that reached no server: unanswered, or answered by an ICMP
    /// unreachable (direct evidence: a router or the remote host said so).
    pub fn unreached(&self) -> u64 {
        self.timeouts + self.unreachable
    }
}

/// The cumulative values the causes are decided from, at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub inbound_established: u64,
    pub inbound_refused: u64,
    pub inbound_timeouts: u64,
    /// Inbound SMTP SYNs netfilter dropped (a firewall rule or a full conntrack table).
    pub inbound_netfilter_drops: u64,
    /// SMTP SYNs dropped on a full listen queue (drop reason or the `tcp_conn_request` fexit).
    pub listen_overflow_drops: u64,
    pub outbound_established: u64,
    pub outbound_timeouts: u64,
    pub outbound_refused: u64,
    /// Outbound handshakes answered by an ICMP destination unreachable.
    pub outbound_unreachable: u64,
    /// Outbound sessions with a throttling reply.
    pub outbound_throttled: u64,
    pub zero_windows_local: u64,
    pub zero_windows_peer: u64,
    /// Conntrack entries and limit (gauges).
    pub conntrack: Option<(u64, u64)>,
    /// Conntrack's own `drop` statistic: new connections dropped on a full table.
    pub conntrack_drops: u64,
    /// The namespace's `ListenOverflows` (every listener, SMTP or not).
    pub listen_overflows: u64,
    /// The SMTP listeners (`addr:port`) whose accept queue was full at this reading.
    pub full_listeners: Vec<String>,
    /// Per-peer cumulative counts.
    pub peers: BTreeMap<PeerName, PeerCounts>,
    /// The site of each peer of [`Self::peers`] that has one (its name's registrable domain,
    /// or a `--site-map` site); the others are `unknown`.
    pub sites: BTreeMap<PeerName, String>,
}

/// A peer as the diagnosis names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PeerName {
    pub iface: String,
    pub peer: String,
}

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.peer, self.iface)
    }
}

/// What the diagnosis says about one cause.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub cause: Cause,
    pub active: bool,
    /// Numbers behind the decision, by name (e.g. `unanswered_inbound_syns`).
    pub evidence: BTreeMap<&'static str, f64>,
    /// The peers that pass the cause's test, with their count in the window, largest first
    /// (per-peer causes; local_receive_stall names where its zero windows went).
    pub top_peers: Vec<(PeerName, u64)>,
    /// The site of each of [`Self::top_peers`], in the same order.
    pub top_sites: Vec<String>,
    /// One sentence with the numbers and the usual remedy.
    pub summary: String,
}

/// The sliding window and the causes' current state.
pub struct Diagnoser {
    thresholds: Thresholds,
    samples: VecDeque<(Instant, Reading)>,
    active: BTreeMap<Cause, bool>,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A share as the summaries write it ("38 %").
fn percent(share: f64) -> String {
    format!("{:.0} %", share * 100.0)
}

/// `part / whole`, where the whole counts the part (a peer's established sessions the kernel
/// has not been read for yet cannot make a share above 1).
fn share(part: u64, whole: u64) -> f64 {
    let whole = whole.max(part);
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// How many peers a finding names.
const TOP_PEERS: usize = 5;

/// A per-peer failure test: which count, out of which attempts, and how the summary says it.
struct PeerTest {
    /// The failures of a peer in the window.
    count: fn(&PeerCounts) -> u64,
    /// What they are a share of.
    of: fn(&PeerCounts) -> u64,
    /// Evidence names: the host's failures and attempts in the window, the share.
    count_name: &'static str,
    of_name: &'static str,
    share_name: &'static str,
    /// The host's failures and attempts in the window (exact counters).
    host_count: fn(&Reading) -> u64,
    host_of: fn(&Reading) -> u64,
    /// What the failures are ("refused handshakes").
    noun: &'static str,
    /// "<peer>: <says> <share> of <n> <attempts>".
    says: &'static str,
    attempts: &'static str,
    /// A part of the failures each peer named says apart: "(<n> <what>)".
    detail: Option<Detail>,
}

/// A part of a peer's failures, and what it is.
struct Detail {
    part: fn(&PeerCounts) -> u64,
    what: &'static str,
}

fn outbound_attempts(r: &Reading) -> u64 {
    r.outbound_established + r.outbound_refused + r.outbound_timeouts + r.outbound_unreachable
}

const THROTTLING: PeerTest = PeerTest {
    count: |p| p.throttled,
    of: |p| p.established,
    count_name: "throttled_sessions",
    of_name: "established_sessions",
    share_name: "throttled_share",
    host_count: |r| r.outbound_throttled,
    host_of: |r| r.outbound_established,
    noun: "throttled sessions",
    says: "421 or rate-limit replies on",
    attempts: "sessions",
    detail: None,
};

const REFUSING: PeerTest = PeerTest {
    count: |p| p.refused,
    of: PeerCounts::attempts,
    count_name: "outbound_refused",
    of_name: "outbound_attempts",
    share_name: "refused_share",
    host_count: |r| r.outbound_refused,
    host_of: outbound_attempts,
    noun: "refused handshakes",
    says: "RST to",
    attempts: "handshakes",
    detail: None,
};

/// Unanswered handshakes and those answered by an ICMP unreachable together: the evidence
/// (`outbound_timeouts`, and `outbound_unreachable` beside it) and each peer named say how many
/// of them an ICMP unreachable answered.
const UNREACHABLE: PeerTest = PeerTest {
    count: PeerCounts::unreached,
    of: PeerCounts::attempts,
    count_name: "outbound_timeouts",
    of_name: "outbound_attempts",
    share_name: "unanswered_share",
    host_count: |r| r.outbound_timeouts,
    host_of: outbound_attempts,
    noun: "unanswered or ICMP-unreachable handshakes",
    says: "no answer or ICMP unreachable to",
    attempts: "handshakes",
    detail: Some(Detail { part: |p| p.unreachable, what: "ICMP unreachable" }),
};

/// One peer's result in a per-peer test.
struct PeerResult {
    peer: PeerName,
    count: u64,
    of: u64,
    share: f64,
    /// The peer's counts in the window.
    window: PeerCounts,
}

impl Diagnoser {
    pub fn new(thresholds: Thresholds) -> Self {
        Self { thresholds, samples: VecDeque::new(), active: BTreeMap::new() }
    }

    /// Adds a reading and decides every cause over the window ending now. Returns the findings
    /// and the causes that changed state (for the log).
    pub fn update(&mut self, now: Instant, reading: Reading) -> (Vec<Finding>, Vec<Finding>) {
        let none = || Ok::<_, std::convert::Infallible>(None);
        match self.update_then(now, reading, none) {
            Ok(decided) => decided,
        }
    }

    /// As [`Diagnoser::update`]; and when a cause turns on, `fresher()` may give the reading
    /// taken again at this moment (its per-peer figures read now rather than on their schedule),
    /// which replaces this one before the causes are decided for good: a cause that turns on
    /// names the peers behind the failures that turned it on.
    pub fn update_then<E>(
        &mut self,
        now: Instant,
        reading: Reading,
        fresher: impl FnOnce() -> Result<Option<Reading>, E>,
    ) -> Result<(Vec<Finding>, Vec<Finding>), E> {
        self.samples.push_back((now, reading));
        // Keep one sample at or before the window's start as the baseline.
        while self.samples.len() > 2
            && now.duration_since(self.samples[1].0) >= self.thresholds.window
        {
            self.samples.pop_front();
        }
        let mut findings = self.decide_all();
        let turns_on =
            |f: &Finding| f.active && !self.active.get(&f.cause).copied().unwrap_or(false);
        if findings.iter().any(turns_on)
            && let Some(reading) = fresher()?
        {
            if let Some(last) = self.samples.back_mut() {
                last.1 = reading;
            }
            findings = self.decide_all();
        }
        let mut changed = Vec::new();
        for f in &findings {
            let was = self.active.insert(f.cause, f.active).unwrap_or(false);
            if was != f.active {
                changed.push(f.clone());
            }
        }
        Ok((findings, changed))
    }

    /// Every cause, decided over the samples held.
    fn decide_all(&self) -> Vec<Finding> {
        Cause::ALL.iter().map(|&c| self.decide(c)).collect()
    }

    /// The oldest sample (the baseline) and the newest.
    fn ends(&self) -> (&Reading, &Reading) {
        (&self.samples[0].1, &self.samples[self.samples.len() - 1].1)
    }

    /// A host total's rise over the window.
    fn d(&self, f: fn(&Reading) -> u64) -> u64 {
        let (base, last) = self.ends();
        f(last).saturating_sub(f(base))
    }

    /// Local pressure: conntrack at its fill threshold, or its own table-full drops rising.
    /// Returns (pressure, fill, entries, limit, drops in the window).
    fn conntrack_pressure(&self) -> (bool, f64, u64, u64, u64) {
        let (_, last) = self.ends();
        let (entries, limit) = last.conntrack.unwrap_or((0, 0));
        let fill = if limit > 0 { entries as f64 / limit as f64 } else { 0.0 };
        let drops = self.d(|r| r.conntrack_drops);
        let pressure =
            last.conntrack.is_some() && (fill >= self.thresholds.conntrack_fill || drops > 0);
        (pressure, fill, entries, limit, drops)
    }

    /// Every peer's counts in the window.
    fn peer_windows(&self) -> Vec<(PeerName, PeerCounts)> {
        let (base, last) = self.ends();
        last.peers
            .iter()
            .map(|(p, now)| (p.clone(), now.since(&base.peers.get(p).copied().unwrap_or_default())))
            .collect()
    }

    /// A per-peer test over the window: the peers that pass (largest count first), and the
    /// peer the evidence describes when none does (the largest count, then the largest share).
    fn per_peer(
        &self,
        count: fn(&PeerCounts) -> u64,
        of: Option<fn(&PeerCounts) -> u64>,
        min: u64,
    ) -> (Vec<PeerResult>, Option<PeerResult>) {
        let mut results: Vec<PeerResult> = self
            .peer_windows()
            .into_iter()
            .filter_map(|(peer, w)| {
                let n = count(&w);
                let of_n = of.map_or(n, |of| of(&w));
                (n > 0).then(|| PeerResult {
                    peer,
                    count: n,
                    of: of_n,
                    share: share(n, of_n),
                    window: w,
                })
            })
            .collect();
        results.sort_by(|a, b| {
            b.count.cmp(&a.count).then(b.share.total_cmp(&a.share)).then(a.peer.cmp(&b.peer))
        });
        let min_share = if of.is_some() { self.thresholds.min_share } else { 0.0 };
        let (pass, rest): (Vec<_>, Vec<_>) =
            results.into_iter().partition(|r| r.count >= min && r.share >= min_share);
        let closest = if pass.is_empty() { rest.into_iter().next() } else { None };
        (pass, closest)
    }

    fn decide(&self, cause: Cause) -> Finding {
        let t = &self.thresholds;
        let secs = t.window.as_secs();
        let mut evidence = BTreeMap::new();
        let mut summary = String::new();
        let mut top_peers = Vec::new();
        let active;
        match cause {
            Cause::ConntrackExhaustion => {
                // TC sees every SYN before netfilter drops it, so a dropped attempt is both a
                // timeout (one per attempt) and NETFILTER drops (one per SYN, retransmissions
                // included): the larger is how many SYNs went unanswered, counted once. A
                // firewall's drops count too, but only with conntrack itself under pressure.
                let unanswered =
                    self.d(|r| r.inbound_timeouts).max(self.d(|r| r.inbound_netfilter_drops));
                let attempts =
                    self.d(|r| r.inbound_established) + self.d(|r| r.inbound_refused) + unanswered;
                let unanswered_share = share(unanswered, attempts);
                let (pressure, fill, entries, limit, drops) = self.conntrack_pressure();
                active =
                    pressure && unanswered >= t.min_failures && unanswered_share >= t.min_share;
                evidence.insert("conntrack_fill_ratio", fill);
                evidence.insert("conntrack_entries", entries as f64);
                evidence.insert("conntrack_limit", limit as f64);
                evidence.insert("conntrack_drops", drops as f64);
                evidence.insert("unanswered_inbound_syns", unanswered as f64);
                evidence.insert("inbound_attempts", attempts as f64);
                evidence.insert("unanswered_share", unanswered_share);
                let _ = write!(
                    summary,
                    "conntrack {:.0}% full ({}/{}), +{} table-full drops; {} inbound SYNs \
                     unanswered ({} of {} attempts) in {secs} s",
                    fill * 100.0,
                    thousands(entries),
                    thousands(limit),
                    thousands(drops),
                    thousands(unanswered),
                    percent(unanswered_share),
                    thousands(attempts),
                );
            }
            Cause::ListenOverflow => {
                let drops = self.d(|r| r.listen_overflow_drops);
                let overflows = self.d(|r| r.listen_overflows);
                // Samples after the baseline that saw an SMTP listener full, and which.
                let mut full_samples = 0u64;
                let mut full: Vec<&str> = Vec::new();
                for (_, r) in self.samples.iter().skip(1) {
                    if !r.full_listeners.is_empty() {
                        full_samples += 1;
                    }
                    for l in &r.full_listeners {
                        if !full.contains(&l.as_str()) {
                            full.push(l);
                        }
                    }
                }
                active =
                    drops >= t.min_failures || (full_samples > 0 && overflows >= t.min_failures);
                evidence.insert("listen_overflow_drops", drops as f64);
                evidence.insert("listen_overflows", overflows as f64);
                evidence.insert("listen_queue_full_samples", full_samples as f64);
                let _ = write!(
                    summary,
                    "{} SMTP SYNs dropped on full listen queues in {secs} s (ListenOverflows +{}",
                    thousands(drops),
                    thousands(overflows)
                );
                if full.is_empty() {
                    summary.push_str(", no SMTP listener seen full)");
                } else {
                    let _ = write!(summary, "; full SMTP listeners: {})", full.join(", "));
                }
            }
            Cause::RemoteThrottling => {
                active =
                    self.per_peer_cause(&THROTTLING, &mut evidence, &mut summary, &mut top_peers);
            }
            Cause::RemoteRefusing => {
                active =
                    self.per_peer_cause(&REFUSING, &mut evidence, &mut summary, &mut top_peers);
            }
            Cause::RemoteUnreachable => {
                let passes =
                    self.per_peer_cause(&UNREACHABLE, &mut evidence, &mut summary, &mut top_peers);
                evidence.insert("outbound_unreachable", self.d(|r| r.outbound_unreachable) as f64);
                let (pressure, fill, _, _, drops) = self.conntrack_pressure();
                evidence.insert("conntrack_fill_ratio", fill);
                evidence.insert("conntrack_drops", drops as f64);
                active = passes && !pressure;
                if pressure {
                    top_peers.clear();
                    let _ = write!(
                        summary,
                        "; not remote: local conntrack is under pressure ({:.0}% full, +{} \
                         table-full drops)",
                        fill * 100.0,
                        thousands(drops)
                    );
                } else {
                    summary.push_str(" with normal local pressure");
                }
            }
            Cause::LocalReceiveStall => {
                let n = self.d(|r| r.zero_windows_local);
                active = n >= t.min_zero_windows;
                evidence.insert("zero_windows_sent", n as f64);
                let _ = write!(
                    summary,
                    "we advertised a zero window {} times in {secs} s",
                    thousands(n)
                );
                // Where they went, to help find the slow queue (not a per-peer test).
                let (named, _) = self.per_peer(|p| p.zero_windows_sent, None, 1);
                top_peers = named.into_iter().take(TOP_PEERS).map(|r| (r.peer, r.count)).collect();
                if !top_peers.is_empty() {
                    let names: Vec<String> =
                        top_peers.iter().map(|(p, n)| format!("{p} ({n})")).collect();
                    let _ = write!(summary, "; to {}", names.join(", "));
                }
            }
            Cause::PeerReceiveStall => {
                let n = self.d(|r| r.zero_windows_peer);
                let (pass, closest) =
                    self.per_peer(|p| p.zero_windows_received, None, t.min_zero_windows);
                active = !pass.is_empty();
                evidence.insert("zero_windows_received", n as f64);
                evidence.insert("peers", pass.len() as f64);
                if pass.is_empty() {
                    let _ = write!(
                        summary,
                        "no peer advertised a zero window {} times in {secs} s ({} in all",
                        t.min_zero_windows,
                        thousands(n)
                    );
                    if let Some(c) = closest {
                        let _ = write!(summary, "; most: {} ({})", c.peer, c.count);
                    }
                    summary.push(')');
                } else {
                    let names: Vec<String> = pass
                        .iter()
                        .take(TOP_PEERS)
                        .map(|r| format!("{}: {} zero windows", r.peer, thousands(r.count)))
                        .collect();
                    let _ = write!(summary, "{} in {secs} s", names.join("; "));
                }
                top_peers = pass.into_iter().take(TOP_PEERS).map(|r| (r.peer, r.count)).collect();
            }
        }
        let _ = write!(summary, ": {}", cause.remedy());
        let last = self.samples.back().map(|(_, r)| r);
        let top_sites = top_peers.iter().map(|(p, _)| site_of(last, p).to_owned()).collect();
        Finding { cause, active, evidence, top_peers, top_sites, summary }
    }

    /// Decides a per-peer failure cause: its evidence (the host's failures and attempts in the
    /// window, the share of the first peer named or else of the closest peer, how many peers
    /// pass), the peers that pass, and the sentence naming them. Returns whether any passes.
    fn per_peer_cause(
        &self,
        test: &PeerTest,
        evidence: &mut BTreeMap<&'static str, f64>,
        summary: &mut String,
        top_peers: &mut Vec<(PeerName, u64)>,
    ) -> bool {
        let t = &self.thresholds;
        let secs = t.window.as_secs();
        evidence.insert(test.count_name, self.d(test.host_count) as f64);
        evidence.insert(test.of_name, self.d(test.host_of) as f64);
        let (pass, closest) = self.per_peer(test.count, Some(test.of), t.min_failures);
        let shown = pass.first().or(closest.as_ref());
        evidence.insert(test.share_name, shown.map_or(0.0, |r| r.share));
        evidence.insert("peers", pass.len() as f64);
        if pass.is_empty() {
            let _ = write!(
                summary,
                "no peer with {} {} making {} of its {} in {secs} s",
                t.min_failures,
                test.noun,
                percent(t.min_share),
                test.attempts
            );
            if let Some(c) = closest {
                let _ = write!(
                    summary,
                    " (most: {}, {} of {})",
                    c.peer,
                    thousands(c.count),
                    thousands(c.of.max(c.count))
                );
            }
        } else {
            // By site, in the order of their peers: "<site>, <says> <share> of <n> <attempts>,
            // peers <peer> (<count>), ...", the share and counts summed over the site's peers
            // named.
            let last = self.samples.back().map(|(_, r)| r);
            let mut by_site: Vec<(&str, Vec<&PeerResult>)> = Vec::new();
            for r in pass.iter().take(TOP_PEERS) {
                let site = site_of(last, &r.peer);
                match by_site.iter_mut().find(|(s, _)| *s == site) {
                    Some((_, peers)) => peers.push(r),
                    None => by_site.push((site, vec![r])),
                }
            }
            let said: Vec<String> = by_site
                .iter()
                .map(|(site, peers)| {
                    let count: u64 = peers.iter().map(|r| r.count).sum();
                    let of: u64 = peers.iter().map(|r| r.of.max(r.count)).sum();
                    let mut said = format!(
                        "{site}, {} {} of {} {}",
                        test.says,
                        percent(share(count, of)),
                        thousands(of),
                        test.attempts
                    );
                    if let Some(d) = &test.detail {
                        let part: u64 = peers.iter().map(|r| (d.part)(&r.window)).sum();
                        let _ = write!(said, " ({} {})", thousands(part), d.what);
                    }
                    let named: Vec<String> = peers
                        .iter()
                        .map(|r| format!("{} ({})", r.peer, thousands(r.count)))
                        .collect();
                    let _ = write!(said, ", peers {}", named.join(", "));
                    said
                })
                .collect();
            let _ = write!(summary, "{} in {secs} s", said.join("; "));
            if pass.len() > TOP_PEERS {
                let _ = write!(summary, " and {} more peers", pass.len() - TOP_PEERS);
            }
        }
        *top_peers = pass.into_iter().take(TOP_PEERS).map(|r| (r.peer, r.count)).collect();
        !top_peers.is_empty()
    }
}
/// The site of a peer in a reading (`unknown` when it has none).
fn site_of<'a>(reading: Option<&'a Reading>, peer: &PeerName) -> &'a str {
    reading.and_then(|r| r.sites.get(peer)).map_or(crate::sites::map::UNKNOWN, String::as_str)
}

/// The verdict as text, a line per cause.
pub fn to_text(findings: &[Finding], ifaces: &str, observed: Duration) -> String {
    let mut out =
        format!("smtpflow diagnose: observed {ifaces} for {:.1} s\n", observed.as_secs_f64());
    for f in findings {
        if f.active {
            let _ = writeln!(out, "  ACTIVE  {:<21} {}", f.cause.label(), f.summary);
        } else {
            let _ = writeln!(out, "  ok      {}", f.cause.label());
        }
    }
    let active: Vec<&str> = findings.iter().filter(|f| f.active).map(|f| f.cause.label()).collect();
    if active.is_empty() {
        out.push_str("verdict: healthy\n");
    } else {
        let _ = writeln!(out, "verdict: {} active ({})", active.len(), active.join(", "));
    }
    out
}

/// The verdict as one JSON object.
pub fn to_json(findings: &[Finding], ifaces: &str, observed: Duration) -> String {
    let causes: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "cause": f.cause.label(),
                "active": f.active,
                "evidence": f.evidence,
                "top_peers": f.top_peers.iter().zip(&f.top_sites).map(|((p, count), site)| serde_json::json!({"iface": p.iface, "peer": p.peer, "site": site, "count": count})).collect::<Vec<_>>(),
                "summary": f.summary,
                "remedy": f.cause.remedy(),
            })
        })
        .collect();
    serde_json::json!({
        "healthy": findings.iter().all(|f| !f.active),
        "interfaces": ifaces,
        "observed_seconds": observed.as_secs_f64(),
        "causes": causes,
    })
    .to_string()
}

#[cfg(test)]
mod tests;
