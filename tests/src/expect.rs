//! Expected values and the one loop that waits for them: poll until every expectation holds
//! (or a deadline), wait a little more, check again (nothing extra was counted), and panic
//! with what differs.
use std::time::Duration;

use crate::{
    Metrics, Pair,
    names::{EVENTS, LOST, MALFORMED, PEER_EVENTS, RETRANSMITS},
    netfilter::Rsts,
    wait_for,
};

/// Labels a series must carry.
pub type Labels<'a> = Vec<(&'a str, &'a str)>;
/// An expected counter: metric name, labels it must carry, exact sum over the matching series.
pub type Expected<'a> = (&'a str, Labels<'a>, u64);

/// Polls `check` (at most `timeout`) until it finds nothing wrong, then waits `settle` and
/// checks once more. Returns the last value checked and what was wrong with it (empty: all
/// held, and still held after `settle`).
pub fn settle<T>(
    timeout: Duration,
    settle: Duration,
    mut check: impl FnMut() -> (T, Vec<String>),
) -> (T, Vec<String>) {
    let mut last = None;
    let held = wait_for(timeout, || {
        let (v, wrong) = check();
        let ok = wrong.is_empty();
        last = Some((v, wrong));
        ok.then_some(())
    });
    if held.is_some() {
        std::thread::sleep(settle);
        return check();
    }
    last.expect("checked at least once")
}

/// What differs between `m` and `expected`, one line each.
pub fn mismatches(m: &Metrics, expected: &[Expected<'_>]) -> Vec<String> {
    expected
        .iter()
        .filter_map(|(name, labels, want)| {
            let got = m.sum(name, labels);
            (got != *want).then(|| format!("{name}{labels:?}: got {got}, want {want}"))
        })
        .collect()
}

/// Scrapes (30 s at most: generous, since an emulated VM on a busy host can stall for seconds,
/// and a passing test waits only until the values hold) until every expected value holds
/// exactly, waits five drain intervals, and checks again; panics with the differences, the
/// non-zero events and `log()` otherwise.
/// The expectations are computed afresh at each check (they may include an oracle's counts).
pub fn counters<'a>(
    scrape: impl Fn() -> Metrics,
    expected: impl Fn() -> Vec<Expected<'a>>,
    log: impl Fn() -> String,
) -> Metrics {
    let (m, wrong) = settle(Duration::from_secs(30), crate::smtpflow::INTERVAL * 5, || {
        let m = scrape();
        let wrong = mismatches(&m, &expected());
        (m, wrong)
    });
    assert!(
        wrong.is_empty(),
        "counters did not settle at the expected values:\n  {}\nnon-zero events: {:#?}\nper \
         peer: {:#?}\nSYN retransmissions: {:?}\nsmtpflow stderr:\n{}",
        wrong.join("\n  "),
        m.nonzero(EVENTS),
        m.nonzero(PEER_EVENTS),
        m.nonzero(RETRANSMITS),
        log(),
    );
    m
}

/// The labels of one `smtpflow_tcp_events_total` series on port 25.
pub fn ev<'a>(iface: &'a str, dir: &'a str, event: &'a str, side: &'a str) -> Labels<'a> {
    vec![("iface", iface), ("direction", dir), ("port", "25"), ("event", event), ("side", side)]
}

/// The labels of one `smtpflow_peer_tcp_events_total` series on `sf0`, port 25.
pub fn peer_ev<'a>(peer: &'a str, dir: &'a str, event: &'a str, side: &'a str) -> Labels<'a> {
    let mut l = ev(Pair::LOCAL_IF, dir, event, side);
    l.push(("peer", peer));
    l
}

/// The RSTs an oracle counted on `sf0`, as exact expectations, with the total of every event:
/// `others` (everything but RSTs) plus these; and no malformed packet or lost event.
pub fn rst_expected(r: &Rsts, others: u64) -> Vec<Expected<'static>> {
    let i = Pair::LOCAL_IF;
    vec![
        (EVENTS, ev(i, "inbound", "rst", "peer"), r.inbound_peer),
        (EVENTS, ev(i, "inbound", "rst", "local"), r.inbound_local),
        (EVENTS, ev(i, "outbound", "rst", "peer"), r.outbound_peer),
        (EVENTS, ev(i, "outbound", "rst", "local"), r.outbound_local),
        (EVENTS, vec![], others + r.total()),
        (MALFORMED, vec![], 0),
        (LOST, vec![], 0),
    ]
}

/// Exact counts of `n` inbound connections (peer to the gateway's port 25) and the RSTs `r`
/// (normally none), nothing else.
pub fn inbound_only(n: u64, r: &Rsts) -> Vec<Expected<'static>> {
    let i = Pair::LOCAL_IF;
    let mut e = vec![
        (EVENTS, ev(i, "inbound", "syn", "peer"), n),
        (EVENTS, ev(i, "inbound", "syn_ack", "local"), n),
    ];
    e.extend(rst_expected(r, 2 * n));
    e
}

/// The exact counts after `rounds` of [`crate::traffic::one_each_way`], with the RSTs `r`.
pub fn one_each_way(rounds: u64, r: &Rsts) -> Vec<Expected<'static>> {
    let i = Pair::LOCAL_IF;
    let mut e = vec![
        (EVENTS, ev(i, "inbound", "syn", "peer"), rounds),
        (EVENTS, ev(i, "inbound", "syn_ack", "local"), rounds),
        (EVENTS, ev(i, "outbound", "syn", "local"), rounds),
        (EVENTS, ev(i, "outbound", "syn_ack", "peer"), rounds),
    ];
    e.extend(rst_expected(r, 4 * rounds));
    e
}

/// `name{filter}` sums to `want` over at least one series: an expected zero needs the series
/// to exist (a renamed metric must not read as 0). `None` when it holds, else what is wrong.
pub fn present(m: &Metrics, name: &str, filter: &[(&str, &str)], want: u64) -> Option<String> {
    let series = m.matching(name, filter).count();
    let got = m.sum(name, filter);
    if series == 0 {
        return Some(format!("{name}{filter:?}: no such series (want {want})"));
    }
    (got != want).then(|| format!("{name}{filter:?}: got {got}, want {want}"))
}
