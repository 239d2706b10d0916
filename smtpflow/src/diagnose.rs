//! The diagnosis: every interval, over a sliding window, which of the usual causes of failing
//! SMTP handshakes is active, with the evidence and the usual remedy. Pure: it sees readings
//! ([`Reading`]) and decides; the drain loop feeds it and exports/logs what it says.
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

/// Thresholds, from the command line.
#[derive(Clone, Debug)]
pub struct Thresholds {
    pub window: Duration,
    /// Conntrack fill (entries / limit) counted as near the limit.
    pub conntrack_fill: f64,
    /// Failures (unanswered or refused handshakes, 4xx replies, overflow drops) in the window
    /// that make a cause active.
    pub min_failures: u64,
    /// Zero-window events in the window that make a stall cause active.
    pub min_zero_windows: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            conntrack_fill: 0.9,
            min_failures: 1,
            min_zero_windows: 10,
        }
    }
}

/// The cumulative values the causes are decided from, at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub inbound_timeouts: u64,
    pub inbound_netfilter_drops: u64,
    pub listen_overflow_drops: u64,
    pub outbound_4xx_replies: u64,
    pub outbound_timeouts: u64,
    pub outbound_refused: u64,
    pub zero_windows_local: u64,
    pub zero_windows_peer: u64,
    /// Conntrack entries and limit (gauges), and drop + early_drop + insert_failed.
    pub conntrack: Option<(u64, u64)>,
    pub conntrack_drops: u64,
    pub listen_overflows: u64,
    /// Per-peer cumulative values for the per-peer causes, by (cause, peer).
    pub peers: BTreeMap<(Cause, PeerName), u64>,
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
    /// The peers most involved, with their count in the window (per-peer causes only).
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

/// How many peers a finding names.
const TOP_PEERS: usize = 5;

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
        let (base, last) = (&self.samples[0].1, &self.samples[self.samples.len() - 1].1);
        Cause::ALL.iter().map(|&c| self.decide(c, base, last)).collect()
    }

    fn decide(&self, cause: Cause, base: &Reading, last: &Reading) -> Finding {
        let t = &self.thresholds;
        let d = |f: fn(&Reading) -> u64| f(last).saturating_sub(f(base));
        let secs = t.window.as_secs();
        let mut evidence = BTreeMap::new();
        let mut summary = String::new();
        let active;
        match cause {
            Cause::ConntrackExhaustion => {
                // TC sees every SYN before netfilter drops it, so a dropped attempt is both a
                // timeout (one per attempt) and NETFILTER drops (one per SYN, retransmissions
                // included): the larger is how many SYNs went unanswered, counted once.
                let unanswered = d(|r| r.inbound_timeouts).max(d(|r| r.inbound_netfilter_drops));
                let drops = d(|r| r.conntrack_drops);
                let (entries, limit) = last.conntrack.unwrap_or((0, 0));
                let fill = if limit > 0 { entries as f64 / limit as f64 } else { 0.0 };
                active = last.conntrack.is_some()
                    && unanswered >= t.min_failures
                    && (fill >= t.conntrack_fill || drops > 0);
                evidence.insert("conntrack_fill_ratio", fill);
                evidence.insert("conntrack_entries", entries as f64);
                evidence.insert("conntrack_limit", limit as f64);
                evidence.insert("unanswered_inbound_syns", unanswered as f64);
                evidence.insert("conntrack_drops", drops as f64);
                let _ = write!(
                    summary,
                    "conntrack {:.0}% full ({}/{}), {} inbound SYNs unanswered in {secs} s, +{} drops",
                    fill * 100.0,
                    thousands(entries),
                    thousands(limit),
                    thousands(unanswered),
                    thousands(drops)
                );
            }
            Cause::ListenOverflow => {
                let drops = d(|r| r.listen_overflow_drops);
                let overflows = d(|r| r.listen_overflows);
                active = drops.max(overflows) >= t.min_failures;
                evidence.insert("listen_overflow_drops", drops as f64);
                evidence.insert("listen_overflows", overflows as f64);
                let _ = write!(
                    summary,
                    "{} SYNs dropped on full listen queues in {secs} s (ListenOverflows +{})",
                    thousands(drops),
                    thousands(overflows)
                );
            }
            Cause::RemoteThrottling => {
                let n = d(|r| r.outbound_4xx_replies);
                active = n >= t.min_failures;
                evidence.insert("outbound_4xx_replies", n as f64);
                let _ =
                    write!(summary, "{} 4xx replies from remote servers in {secs} s", thousands(n));
            }
            Cause::RemoteUnreachable => {
                let n = d(|r| r.outbound_timeouts);
                let (entries, limit) = last.conntrack.unwrap_or((0, 0));
                let local_pressure = (limit > 0
                    && entries as f64 / limit as f64 >= t.conntrack_fill)
                    || d(|r| r.conntrack_drops) > 0;
                active = n >= t.min_failures && !local_pressure;
                evidence.insert("outbound_timeouts", n as f64);
                let _ = write!(
                    summary,
                    "{} outbound handshakes unanswered in {secs} s with normal local pressure",
                    thousands(n)
                );
            }
            Cause::RemoteRefusing => {
                let n = d(|r| r.outbound_refused);
                active = n >= t.min_failures;
                evidence.insert("outbound_refused", n as f64);
                let _ = write!(
                    summary,
                    "{} outbound connections refused (RST) in {secs} s",
                    thousands(n)
                );
            }
            Cause::LocalReceiveStall => {
                let n = d(|r| r.zero_windows_local);
                active = n >= t.min_zero_windows;
                evidence.insert("zero_windows_sent", n as f64);
                let _ = write!(
                    summary,
                    "we advertised a zero window {} times in {secs} s",
                    thousands(n)
                );
            }
            Cause::PeerReceiveStall => {
                let n = d(|r| r.zero_windows_peer);
                active = n >= t.min_zero_windows;
                evidence.insert("zero_windows_received", n as f64);
                let _ = write!(
                    summary,
                    "peers advertised a zero window {} times in {secs} s",
                    thousands(n)
                );
            }
        }
        let top_peers = top_peers(cause, base, last);
        if !top_peers.is_empty() {
            let names: Vec<String> = top_peers.iter().map(|(p, n)| format!("{p} ({n})")).collect();
            let _ = write!(summary, "; top peers: {}", names.join(", "));
        }
        let _ = write!(summary, ": {}", cause.remedy());
        Finding { cause, active, evidence, top_peers, summary }
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

/// The peers with the largest rise of this cause's per-peer count over the window.
fn top_peers(cause: Cause, base: &Reading, last: &Reading) -> Vec<(PeerName, u64)> {
    let mut rises: Vec<(PeerName, u64)> = last
        .peers
        .range((cause, PeerName::default())..)
        .take_while(|((c, _), _)| *c == cause)
        .filter_map(|((_, peer), n)| {
            let before = base.peers.get(&(cause, peer.clone())).copied().unwrap_or(0);
            let rise = n.saturating_sub(before);
            (rise > 0).then(|| (peer.clone(), rise))
        })
        .collect();
    rises.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    rises.truncate(TOP_PEERS);
    rises
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

    #[test]
    fn healthy_traffic_shows_no_cause() {
        let mut d = Diagnoser::new(Thresholds::default());
        let t0 = Instant::now();
        for s in 0..120 {
            let r = Reading {
                conntrack: Some((1000, 262_144)),
                zero_windows_peer: s / 30,
                ..Default::default()
            };
            let (f, _) = d.update(at(t0, s), r);
            assert!(active(&f).is_empty(), "at {s}s: {:?}", active(&f));
        }
    }

    #[test]
    fn conntrack_exhaustion_needs_failures_and_pressure() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        d.update(t0, Reading { conntrack: Some((100, 1000)), ..Default::default() });
        // Failures without conntrack pressure: not conntrack's fault.
        let r = Reading { conntrack: Some((100, 1000)), inbound_timeouts: 5, ..Default::default() };
        let (f, _) = d.update(at(t0, 1), r);
        assert!(!active(&f).contains(&"conntrack_exhaustion"));
        // Full, and SYNs dropped by netfilter.
        let r = Reading {
            conntrack: Some((255_872, 262_144)),
            inbound_timeouts: 5,
            inbound_netfilter_drops: 4_097,
            conntrack_drops: 812,
            ..Default::default()
        };
        let (f, changed) = d.update(at(t0, 2), r.clone());
        assert_eq!(active(&f), ["conntrack_exhaustion"]);
        assert_eq!(changed.len(), 1);
        let s = &changed[0].summary;
        assert!(
            s.starts_with("conntrack 98% full (255,872/262,144), 4,097 inbound SYNs unanswered in 60 s, +812 drops: raise net.netfilter.nf_conntrack_max"),
            "{s}"
        );
        assert_eq!(
            changed[0].evidence["unanswered_inbound_syns"], 4097.0,
            "counted once: the larger of timeouts and drops"
        );
        // Recovery: no new failures for a whole window turns it off.
        let mut last = Vec::new();
        for s in 3..=63 {
            let mut quiet = r.clone();
            quiet.conntrack = Some((900, 262_144));
            let (f, ch) = d.update(at(t0, s), quiet);
            last = f;
            if s < 62 {
                assert!(ch.is_empty() || s >= 62, "turned off too early at {s}s");
            }
        }
        assert!(active(&last).is_empty());
    }

    #[test]
    fn per_peer_causes_name_their_peers() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        d.update(t0, Reading::default());
        let mut r = Reading { outbound_4xx_replies: 3, outbound_refused: 2, ..Default::default() };
        let name = |p: &str| PeerName { iface: "eth0".into(), peer: p.into() };
        r.peers.insert((Cause::RemoteThrottling, name("192.0.2.9")), 3);
        r.peers.insert((Cause::RemoteRefusing, name("192.0.2.7")), 2);
        let (f, _) = d.update(at(t0, 1), r);
        assert_eq!(active(&f), ["remote_throttling", "remote_refusing"]);
        let throttling = f.iter().find(|f| f.cause == Cause::RemoteThrottling).unwrap();
        assert_eq!(throttling.top_peers, [(name("192.0.2.9"), 3)]);
        assert!(throttling.summary.contains("top peers: 192.0.2.9 on eth0 (3)"));
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
        d.update_then(t0, Reading::default(), || fresher(Reading::default())).unwrap();
        assert_eq!(asked.get(), 0, "nothing turned on: no second reading");
        let stale = Reading { outbound_refused: 2, ..Default::default() };
        let mut fresh = stale.clone();
        let name = PeerName { iface: "eth0".into(), peer: "192.0.2.7".into() };
        fresh.peers.insert((Cause::RemoteRefusing, name.clone()), 2);
        let (f, changed) = d.update_then(at(t0, 1), stale.clone(), || fresher(fresh)).unwrap();
        assert_eq!(asked.get(), 1);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].top_peers, [(name, 2)]);
        assert!(changed[0].summary.contains("top peers: 192.0.2.7 on eth0 (2)"), "{changed:?}");
        assert_eq!(active(&f), ["remote_refusing"]);
        // Already on: no second reading.
        d.update_then(at(t0, 2), stale, || fresher(Reading::default())).unwrap();
        assert_eq!(asked.get(), 1);
    }

    #[test]
    fn unreachable_only_with_normal_local_pressure() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        d.update(t0, Reading { conntrack: Some((10, 100)), ..Default::default() });
        let (f, _) = d.update(
            at(t0, 1),
            Reading { conntrack: Some((10, 100)), outbound_timeouts: 2, ..Default::default() },
        );
        assert_eq!(active(&f), ["remote_unreachable"]);
        let (f, _) = d.update(
            at(t0, 2),
            Reading { conntrack: Some((95, 100)), outbound_timeouts: 4, ..Default::default() },
        );
        assert!(!active(&f).contains(&"remote_unreachable"), "local conntrack is nearly full");
    }

    #[test]
    fn listen_overflow_counts_drops_or_overflows_once() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        d.update(t0, Reading { listen_overflows: 100, ..Default::default() });
        let (f, _) = d.update(
            at(t0, 1),
            Reading { listen_overflows: 106, listen_overflow_drops: 6, ..Default::default() },
        );
        assert_eq!(active(&f), ["listen_overflow"]);
        let lo = f.iter().find(|f| f.cause == Cause::ListenOverflow).unwrap();
        assert_eq!(lo.evidence["listen_overflows"], 6.0, "since start, not since boot");
    }

    #[test]
    fn stalls_need_the_threshold() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds { min_zero_windows: 10, ..Default::default() });
        d.update(t0, Reading::default());
        let (f, _) = d.update(at(t0, 1), Reading { zero_windows_local: 9, ..Default::default() });
        assert!(active(&f).is_empty());
        let (f, _) = d.update(
            at(t0, 2),
            Reading { zero_windows_local: 10, zero_windows_peer: 12, ..Default::default() },
        );
        assert_eq!(active(&f), ["local_receive_stall", "peer_receive_stall"]);
    }

    #[test]
    fn verdict_text_and_json() {
        let t0 = Instant::now();
        let mut d = Diagnoser::new(Thresholds::default());
        d.update(t0, Reading::default());
        let (f, _) = d.update(at(t0, 1), Reading { outbound_refused: 2, ..Default::default() });
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
        assert_eq!(refusing["evidence"]["outbound_refused"], 2.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(262_144), "262,144");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
