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
                "check routing and firewalls towards these MXs; their SYNs get no answer"
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
            throttled: rise(base.throttled, self.throttled),
            zero_windows_sent: rise(base.zero_windows_sent, self.zero_windows_sent),
            zero_windows_received: rise(base.zero_windows_received, self.zero_windows_received),
        }
    }

    /// Outbound handshakes: established, refused or unanswered.
    pub fn attempts(&self) -> u64 {
        self.established + self.refused + self.timeouts
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
}

fn outbound_attempts(r: &Reading) -> u64 {
    r.outbound_established + r.outbound_refused + r.outbound_timeouts
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
};

const UNREACHABLE: PeerTest = PeerTest {
    count: |p| p.timeouts,
    of: PeerCounts::attempts,
    count_name: "outbound_timeouts",
    of_name: "outbound_attempts",
    share_name: "unanswered_share",
    host_count: |r| r.outbound_timeouts,
    host_of: outbound_attempts,
    noun: "unanswered handshakes",
    says: "no answer to",
    attempts: "handshakes",
};

/// One peer's result in a per-peer test.
struct PeerResult {
    peer: PeerName,
    count: u64,
    of: u64,
    share: f64,
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
                (n > 0).then(|| PeerResult { peer, count: n, of: of_n, share: share(n, of_n) })
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
        Finding { cause, active, evidence, top_peers, summary }
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
            let said: Vec<String> = pass
                .iter()
                .take(TOP_PEERS)
                .map(|r| {
                    format!(
                        "{}: {} {} of {} {}",
                        r.peer,
                        test.says,
                        percent(r.share),
                        thousands(r.of.max(r.count)),
                        test.attempts
                    )
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
                "top_peers": f.top_peers.iter().map(|(p, count)| serde_json::json!({"iface": p.iface, "peer": p.peer, "count": count})).collect::<Vec<_>>(),
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
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn active(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().filter(|f| f.active).map(|f| f.cause.label()).collect()
    }

    fn finding(findings: &[Finding], cause: Cause) -> &Finding {
        findings.iter().find(|f| f.cause == cause).unwrap()
    }

    fn name(p: &str) -> PeerName {
        PeerName { iface: "eth0".into(), peer: p.into() }
    }

    /// A gateway's cumulative counters, grown by what happens to it (peers' counts and the
    /// host's totals together, as the drain reads them).
    #[derive(Clone, Default)]
    struct Gateway(Reading);

    impl Gateway {
        fn new() -> Self {
            Self(Reading { conntrack: Some((1_000, 262_144)), ..Default::default() })
        }

        /// Outbound handshakes and sessions to `peer`.
        fn outbound(&mut self, peer: &str, add: PeerCounts) -> &mut Self {
            let r = &mut self.0;
            r.outbound_established += add.established;
            r.outbound_refused += add.refused;
            r.outbound_timeouts += add.timeouts;
            r.outbound_throttled += add.throttled;
            r.zero_windows_local += add.zero_windows_sent;
            r.zero_windows_peer += add.zero_windows_received;
            let p = r.peers.entry(name(peer)).or_default();
            p.established += add.established;
            p.refused += add.refused;
            p.timeouts += add.timeouts;
            p.throttled += add.throttled;
            p.zero_windows_sent += add.zero_windows_sent;
            p.zero_windows_received += add.zero_windows_received;
            self
        }

        fn inbound(&mut self, established: u64, refused: u64, timeouts: u64) -> &mut Self {
            self.0.inbound_established += established;
            self.0.inbound_refused += refused;
            self.0.inbound_timeouts += timeouts;
            self
        }

        fn reading(&self) -> Reading {
            self.0.clone()
        }
    }

    fn sessions(established: u64) -> PeerCounts {
        PeerCounts { established, ..Default::default() }
    }

    #[test]
    fn healthy_traffic_shows_no_cause() {
        let mut d = Diagnoser::new(Thresholds::default());
        let t0 = Instant::now();
        let mut g = Gateway::new();
        for s in 0..120 {
            g.outbound("192.0.2.1", sessions(5)).inbound(5, 0, 0);
            g.0.zero_windows_peer = s / 30;
            let (f, _) = d.update(at(t0, s), g.reading());
            assert!(active(&f).is_empty(), "at {s}s: {:?}", active(&f));
        }
    }

    /// The noisy but healthy gateway of issue #13, over several windows: hundreds of good
    /// sessions both ways, greylisting (not throttling; a rare 421), a backup MX that refuses
    /// 3 and drops 3 handshakes a window, a scanner whose SYNs the firewall drops, a web
    /// server's accept queue overflowing on port 80. Nothing is raised.
    #[test]
    fn a_noisy_but_healthy_gateway_raises_nothing() {
        let mut d = Diagnoser::new(Thresholds::default());
        let t0 = Instant::now();
        let mut g = Gateway::new();
        let mxs = ["192.0.2.10", "192.0.2.11", "192.0.2.12", "198.51.100.5", "203.0.113.7"];
        for s in 0..240u64 {
            // About 10 outbound and 10 inbound sessions a second (600 a window each way).
            for (i, mx) in mxs.iter().enumerate() {
                let established = if (s + i as u64).is_multiple_of(2) { 3 } else { 1 };
                // One 421 to a big MX now and then (~1 % of its sessions).
                let throttled = u64::from(i == 0 && s % 30 == 0);
                g.outbound(mx, PeerCounts { established, throttled, ..Default::default() });
            }
            g.inbound(10, 0, 0);
            // The backup MX: 3 refused and 3 unanswered per minute, no session.
            if s % 20 == 0 {
                g.outbound(
                    "192.0.2.99",
                    PeerCounts { refused: 1, timeouts: 1, ..Default::default() },
                );
            }
            // The scanner: 4 SYNs a second dropped by nft; each attempt also times out.
            g.0.inbound_netfilter_drops += 4;
            if s % 2 == 0 {
                g.inbound(0, 0, 1);
            }
            // The web server on port 80: ListenOverflows rises, no SMTP listener is full.
            g.0.listen_overflows += 3;
            // A few zero windows here and there.
            if s % 15 == 0 {
                g.outbound(
                    "198.51.100.5",
                    PeerCounts { zero_windows_received: 1, ..Default::default() },
                );
            }
            let (f, changed) = d.update(at(t0, s), g.reading());
            assert!(active(&f).is_empty(), "at {s}s: {:?}\n{f:#?}", active(&f));
            assert!(changed.is_empty());
            for f in &f {
                assert!(f.top_peers.is_empty() || f.cause == Cause::LocalReceiveStall, "{f:?}");
            }
        }
    }

    /// 12 failures out of 500 sessions (2.4 %): above the count, below the share. Silent, for
    /// each of the per-peer failure causes.
    #[test]
    fn a_peer_failing_a_small_share_stays_silent() {
        for failing in [
            PeerCounts { established: 500, throttled: 12, ..Default::default() },
            PeerCounts { established: 488, refused: 12, ..Default::default() },
            PeerCounts { established: 488, timeouts: 12, ..Default::default() },
        ] {
            let t0 = Instant::now();
            let mut d = Diagnoser::new(Thresholds::default());
            let mut g = Gateway::new();
            d.update(t0, g.reading());
            g.outbound("192.0.2.9", failing);
            let (f, _) = d.update(at(t0, 30), g.reading());
            assert!(active(&f).is_empty(), "{failing:?}: {:?}", active(&f));
            // The closest peer is in the evidence and the sentence.
            for cause in [Cause::RemoteThrottling, Cause::RemoteRefusing, Cause::RemoteUnreachable]
            {
                let f = finding(&f, cause);
                assert!(f.top_peers.is_empty());
                assert_eq!(f.evidence["peers"], 0.0);
            }
        }
        // The same 12 out of 60: fires.
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.outbound("192.0.2.9", PeerCounts { established: 48, refused: 12, ..Default::default() });
        let (f, _) = d.update(at(t0, 30), g.reading());
        assert_eq!(active(&f), ["remote_refusing"]);
    }

    #[test]
    fn remote_throttling_names_its_peers_and_shares() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        g.outbound("192.0.2.9", sessions(100)).outbound("192.0.2.8", sessions(1000));
        d.update(t0, g.reading());
        // 19 of 50 sessions throttled at one peer; 12 of 500 at another (2.4 %): only the first.
        g.outbound(
            "192.0.2.9",
            PeerCounts { established: 50, throttled: 19, ..Default::default() },
        );
        g.outbound(
            "192.0.2.8",
            PeerCounts { established: 500, throttled: 12, ..Default::default() },
        );
        let (f, changed) = d.update(at(t0, 10), g.reading());
        assert_eq!(active(&f), ["remote_throttling"]);
        let th = finding(&f, Cause::RemoteThrottling);
        assert_eq!(th.top_peers, [(name("192.0.2.9"), 19)]);
        assert!(
            th.summary.starts_with("192.0.2.9 on eth0: 421 or rate-limit replies on 38 % of 50 sessions in 60 s: lower the concurrency"),
            "{}",
            th.summary
        );
        assert_eq!(th.evidence["throttled_sessions"], 31.0, "host total");
        assert_eq!(th.evidence["established_sessions"], 550.0);
        assert_eq!(th.evidence["throttled_share"], 0.38);
        assert_eq!(th.evidence["peers"], 1.0);
        assert_eq!(changed.len(), 1);
    }

    #[test]
    fn remote_refusing_and_unreachable_name_their_peers() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.outbound("192.0.2.7", PeerCounts { refused: 12, ..Default::default() });
        g.outbound("192.0.2.6", PeerCounts { established: 20, timeouts: 30, ..Default::default() });
        g.outbound("192.0.2.5", PeerCounts { established: 100, timeouts: 3, ..Default::default() });
        let (f, _) = d.update(at(t0, 10), g.reading());
        assert_eq!(active(&f), ["remote_unreachable", "remote_refusing"]);
        let refusing = finding(&f, Cause::RemoteRefusing);
        assert_eq!(refusing.top_peers, [(name("192.0.2.7"), 12)]);
        assert!(
            refusing
                .summary
                .starts_with("192.0.2.7 on eth0: RST to 100 % of 12 handshakes in 60 s")
        );
        assert_eq!(refusing.evidence["outbound_refused"], 12.0);
        assert_eq!(refusing.evidence["outbound_attempts"], 12.0 + 50.0 + 103.0);
        assert_eq!(refusing.evidence["refused_share"], 1.0);
        let unreachable = finding(&f, Cause::RemoteUnreachable);
        assert_eq!(unreachable.top_peers, [(name("192.0.2.6"), 30)]);
        assert!(
            unreachable.summary.starts_with(
                "192.0.2.6 on eth0: no answer to 60 % of 50 handshakes in 60 s with normal local pressure"
            ),
            "{}",
            unreachable.summary
        );
        assert_eq!(unreachable.evidence["outbound_timeouts"], 33.0);
        assert_eq!(unreachable.evidence["unanswered_share"], 0.6);
    }

    #[test]
    fn unreachable_only_with_normal_local_pressure() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        g.0.conntrack = Some((10, 100));
        d.update(t0, g.reading());
        g.outbound("192.0.2.6", PeerCounts { timeouts: 10, ..Default::default() });
        let (f, _) = d.update(at(t0, 1), g.reading());
        assert_eq!(active(&f), ["remote_unreachable"]);
        // Nearly full conntrack.
        g.0.conntrack = Some((95, 100));
        let (f, _) = d.update(at(t0, 2), g.reading());
        assert!(!active(&f).contains(&"remote_unreachable"), "local conntrack is nearly full");
        assert!(finding(&f, Cause::RemoteUnreachable).top_peers.is_empty());
        // conntrack's own table-full drops rising.
        g.0.conntrack = Some((10, 100));
        g.0.conntrack_drops += 1;
        let (f, _) = d.update(at(t0, 3), g.reading());
        assert!(!active(&f).contains(&"remote_unreachable"), "conntrack drops new entries");
    }

    #[test]
    fn conntrack_exhaustion_needs_failures_share_and_pressure() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        g.0.conntrack = Some((100, 1000));
        d.update(t0, g.reading());
        // Failures without conntrack pressure: not conntrack's fault (a firewall, say).
        g.inbound(0, 0, 50);
        g.0.inbound_netfilter_drops += 120;
        let (f, _) = d.update(at(t0, 1), g.reading());
        assert!(active(&f).is_empty());
        // Full, and SYNs dropped by netfilter.
        g.0.conntrack = Some((255_872, 262_144));
        g.inbound(100, 0, 5);
        g.0.inbound_netfilter_drops += 4_097 - 120;
        g.0.conntrack_drops += 812;
        let (f, changed) = d.update(at(t0, 2), g.reading());
        assert_eq!(active(&f), ["conntrack_exhaustion"]);
        assert_eq!(changed.len(), 1);
        let s = &changed[0].summary;
        assert!(
            s.starts_with("conntrack 98% full (255,872/262,144), +812 table-full drops; 4,097 inbound SYNs unanswered (98 % of 4,197 attempts) in 60 s: raise net.netfilter.nf_conntrack_max"),
            "{s}"
        );
        assert_eq!(
            changed[0].evidence["unanswered_inbound_syns"], 4097.0,
            "counted once: the larger of timeouts and drops"
        );
        // Recovery: no new failures for a whole window turns it off.
        let mut last = Vec::new();
        g.0.conntrack = Some((900, 262_144));
        for s in 3..=63 {
            let (f, _) = d.update(at(t0, s), g.reading());
            last = f;
        }
        assert!(active(&last).is_empty());
    }

    /// Conntrack full, but its unanswered SYNs a small share of a busy inbound side; and the
    /// statistics that are not table-full drops (insert_failed, early_drop) are never read as
    /// pressure (the reading takes `drop` only).
    #[test]
    fn conntrack_exhaustion_needs_a_share_of_inbound_attempts() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        g.0.conntrack = Some((950, 1000));
        d.update(t0, g.reading());
        g.inbound(1_000, 0, 12);
        let (f, _) = d.update(at(t0, 5), g.reading());
        assert!(active(&f).is_empty(), "12 of 1012 inbound attempts");
        let ct = finding(&f, Cause::ConntrackExhaustion);
        assert_eq!(ct.evidence["unanswered_inbound_syns"], 12.0);
        assert_eq!(ct.evidence["inbound_attempts"], 1012.0);
        g.inbound(0, 0, 200);
        let (f, _) = d.update(at(t0, 6), g.reading());
        assert_eq!(active(&f), ["conntrack_exhaustion"]);
    }

    #[test]
    fn listen_overflow_needs_an_smtp_listener() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        g.0.listen_overflows = 100;
        d.update(t0, g.reading());
        // ListenOverflows from another service: a host signal only.
        g.0.listen_overflows += 50;
        let (f, _) = d.update(at(t0, 1), g.reading());
        assert!(active(&f).is_empty());
        let lo = finding(&f, Cause::ListenOverflow);
        assert_eq!(lo.evidence["listen_overflows"], 50.0, "since start, not since boot");
        assert!(lo.summary.contains("no SMTP listener seen full"), "{}", lo.summary);
        // An SMTP listener seen full at one sample, with ListenOverflows rising: it is.
        g.0.full_listeners = vec!["0.0.0.0:25".into()];
        let (f, _) = d.update(at(t0, 2), g.reading());
        assert_eq!(active(&f), ["listen_overflow"]);
        g.0.full_listeners.clear();
        let (f, _) = d.update(at(t0, 3), g.reading());
        assert_eq!(active(&f), ["listen_overflow"], "seen full in the window");
        let lo = finding(&f, Cause::ListenOverflow);
        assert_eq!(lo.evidence["listen_queue_full_samples"], 1.0);
        assert!(lo.summary.contains("full SMTP listeners: 0.0.0.0:25"), "{}", lo.summary);

        // A full SMTP listener but ListenOverflows below the count: not yet.
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.0.full_listeners = vec!["[::]:587".into()];
        g.0.listen_overflows += 3;
        let (f, _) = d.update(at(t0, 1), g.reading());
        assert!(active(&f).is_empty());
        // SMTP SYNs dropped with a LISTEN_OVERFLOW reason: enough on their own.
        g.0.full_listeners.clear();
        g.0.listen_overflow_drops += 10;
        let (f, _) = d.update(at(t0, 2), g.reading());
        assert_eq!(active(&f), ["listen_overflow"]);
    }

    #[test]
    fn stalls_need_the_threshold() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.outbound(
            "192.0.2.3",
            PeerCounts { zero_windows_sent: 9, zero_windows_received: 6, ..Default::default() },
        );
        g.outbound("192.0.2.4", PeerCounts { zero_windows_received: 6, ..Default::default() });
        let (f, _) = d.update(at(t0, 1), g.reading());
        assert!(active(&f).is_empty(), "12 zero windows, but 6 per peer");
        g.outbound(
            "192.0.2.3",
            PeerCounts { zero_windows_sent: 1, zero_windows_received: 6, ..Default::default() },
        );
        let (f, _) = d.update(at(t0, 2), g.reading());
        assert_eq!(active(&f), ["local_receive_stall", "peer_receive_stall"]);
        let stall = finding(&f, Cause::PeerReceiveStall);
        assert_eq!(stall.top_peers, [(name("192.0.2.3"), 12)]);
        assert!(
            stall.summary.starts_with("192.0.2.3 on eth0: 12 zero windows in 60 s"),
            "{}",
            stall.summary
        );
        assert_eq!(finding(&f, Cause::LocalReceiveStall).top_peers, [(name("192.0.2.3"), 10)]);
    }

    /// A cause turns on from the exact totals while the per-peer figures are an earlier reading:
    /// the fresher reading replaces it, and the finding (its log line too) names the peer.
    #[test]
    fn a_cause_turning_on_names_peers_from_a_fresher_reading() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let asked = std::cell::Cell::new(0);
        let fresher = |r: Reading| {
            asked.set(asked.get() + 1);
            Ok::<_, ()>(Some(r))
        };
        let quiet = Gateway::new().reading();
        d.update_then(t0, quiet.clone(), || fresher(quiet.clone())).unwrap();
        assert_eq!(asked.get(), 0, "nothing turned on: no second reading");
        // Stale per-peer figures: the peer is there with the failures that were, and the stall
        // (a host total) turns on; the fresh reading names the peer behind it.
        let mut g = Gateway::new();
        g.0.zero_windows_local = 15;
        let stale = g.reading();
        g.outbound("192.0.2.7", PeerCounts { zero_windows_sent: 15, ..Default::default() });
        g.0.zero_windows_local = 15;
        let fresh = g.reading();
        let (f, changed) = d.update_then(at(t0, 1), stale.clone(), || fresher(fresh)).unwrap();
        assert_eq!(asked.get(), 1);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].top_peers, [(name("192.0.2.7"), 15)]);
        assert!(changed[0].summary.contains("; to 192.0.2.7 on eth0 (15)"), "{changed:?}");
        assert_eq!(active(&f), ["local_receive_stall"]);
        // Already on: no second reading.
        d.update_then(at(t0, 2), stale, || fresher(quiet)).unwrap();
        assert_eq!(asked.get(), 1);
    }

    /// A peer's count that goes down (its entry evicted from the kernel's map and back) starts
    /// again: what it counts now is new.
    #[test]
    fn a_peer_count_restarting_counts_from_zero() {
        let base = PeerCounts { refused: 40, established: 100, ..Default::default() };
        let now = PeerCounts { refused: 12, established: 150, ..Default::default() };
        let w = now.since(&base);
        assert_eq!((w.refused, w.established), (12, 50));
    }

    #[test]
    fn verdict_text_and_json() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        let mut g = Gateway::new();
        d.update(t0, g.reading());
        g.outbound("192.0.2.7", PeerCounts { refused: 10, ..Default::default() });
        let (f, _) = d.update(at(t0, 1), g.reading());
        let text = to_text(&f, "eth0", Duration::from_secs(10));
        assert!(text.contains("ACTIVE  remote_refusing"), "{text}");
        assert!(text.contains("ok      listen_overflow"));
        assert!(text.ends_with("verdict: 1 active (remote_refusing)\n"));
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&f, "eth0", Duration::from_secs(10))).unwrap();
        assert_eq!(json["healthy"], false);
        assert_eq!(json["causes"].as_array().unwrap().len(), 7);
        let refusing = json["causes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cause"] == "remote_refusing")
            .unwrap();
        assert_eq!(refusing["active"], true);
        assert_eq!(refusing["evidence"]["outbound_refused"], 10.0);
        assert_eq!(refusing["evidence"]["refused_share"], 1.0);
        assert_eq!(refusing["top_peers"][0]["peer"], "192.0.2.7");
        assert_eq!(refusing["top_peers"][0]["count"], 10);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(262_144), "262,144");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
