//! What every diagnosis scenario checks: exactly one cause on with the expected evidence, its
//! recovery within one window, and the log sentences; one scenario at a time.
use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use smtpflow_tests::{
    Metrics, Netns, Watch,
    diagnosis::{active, diagnosis_lines, evidence, evidence_of, top_peers},
    names::TOP_PEER,
    smtpflow::INTERVAL,
    traffic::Outcome,
    wait_for,
};

use crate::{HANDSHAKE_TIMEOUT, IF};

/// One test at a time in this process (the test command also runs `--test-threads=1`).
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().unwrap(), port).to_string()
}

pub fn dur(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// `smtpflow watch` on the gateway's interface with the diagnosis window `window`, and
/// `--min-failures 1`: these scenarios check each cause's evidence, peers and sentences with a
/// handful of failures (every one of the faulty peer's attempts fails, so the share test at
/// its default passes); the default thresholds against a noisy gateway are tested elsewhere.
pub fn start_watch(ns: &Netns, window: Duration) -> Watch {
    Watch::start(
        ns,
        IF,
        &[
            "--window",
            &dur(window),
            "--handshake-timeout",
            &dur(HANDSHAKE_TIMEOUT),
            "--min-failures",
            "1",
        ],
    )
}

/// A scrape before any fault: every cause exported, none active, no top peer.
pub fn quiet_baseline(w: &Watch, ns: &Netns) -> Metrics {
    let m = w.scrape(ns);
    assert_eq!(active(&m), Vec::<&str>::new(), "active before any fault:\n{}", m.text);
    assert!(m.nonzero(TOP_PEER).is_empty(), "{}", m.text);
    m
}

/// A counter's rise between two scrapes, summed over the series matching `filter`.
pub fn rise(before: &Metrics, after: &Metrics, name: &str, filter: &[(&str, &str)]) -> u64 {
    after.sum(name, filter) - before.sum(name, filter)
}

/// Scrapes (every ~50 ms, at most `timeout`) until exactly `cause` is active and `problems`
/// finds nothing wrong; at no scrape may another cause be active. Returns that scrape.
pub fn expect_only(
    w: &Watch,
    ns: &Netns,
    cause: &str,
    timeout: Duration,
    mut problems: impl FnMut(&Metrics) -> Vec<String>,
) -> Metrics {
    let mut last = vec!["no scrape".to_owned()];
    let found = wait_for(timeout, || {
        let m = w.scrape(ns);
        let on = active(&m);
        let others: Vec<&&str> = on.iter().filter(|c| **c != cause).collect();
        assert!(others.is_empty(), "{others:?} active during a {cause} fault:\n{}", m.text);
        last = if on == [cause] { problems(&m) } else { vec![format!("{cause} not active")] };
        last.is_empty().then_some(m)
    });
    found.unwrap_or_else(|| {
        let m = w.scrape(ns);
        panic!(
            "after {timeout:?}, not exactly {cause} with the expected evidence:\n  {}\nevidence: \
             {:?}\ntop peers: {:?}\nsmtpflow stderr:\n{}",
            last.join("\n  "),
            evidence_of(&m, cause),
            top_peers(&m, cause),
            w.stderr()
        )
    })
}

/// A difference as a readable problem, when there is one.
pub fn differs(what: &str, got: f64, want: f64) -> Option<String> {
    (got != want).then(|| format!("{what}: got {got}, want {want}"))
}

/// The fault was removed at `removed`: `cause` turns off within one window (plus the drain
/// interval it is decided at and the scrape), and not before a whole window has passed since
/// `last_event` (the last evidence cannot have happened earlier than that); no other cause
/// turns on meanwhile; then its failure evidence is 0, it names no peer, and the log says it is
/// over. Returns how long after the removal it turned off.
pub fn expect_recovery(
    w: &Watch,
    ns: &Netns,
    cause: &str,
    window: Duration,
    removed: Instant,
    last_event: Instant,
    zero_evidence: &[&str],
) -> Duration {
    let bound = window + INTERVAL * 2 + Duration::from_millis(300);
    let deadline = removed + bound + Duration::from_secs(3);
    let (off_before, off_after, m) = loop {
        let before = Instant::now();
        let m = w.scrape(ns);
        let after = Instant::now();
        let on = active(&m);
        let others: Vec<&&str> = on.iter().filter(|c| **c != cause).collect();
        assert!(others.is_empty(), "{others:?} turned on while {cause} recovered:\n{}", m.text);
        if !on.contains(&cause) {
            break (before, after, m);
        }
        assert!(
            Instant::now() < deadline,
            "{cause} still active {:?} after the fault was removed (window {window:?}):\n{}\n{}",
            removed.elapsed(),
            m.text,
            w.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let took = off_before.saturating_duration_since(removed);
    assert!(
        took <= bound,
        "{cause} turned off {took:?} after the fault was removed; the window is {window:?}"
    );
    // The last evidence is at or after `last_event` (the kernel saw it before the client did,
    // by well under 100 ms): the cause must have stayed on for a whole window after it.
    assert!(
        off_after + Duration::from_millis(100) >= last_event + window,
        "{cause} turned off {:?} after its last evidence, before a whole window ({window:?})",
        off_after.saturating_duration_since(last_event)
    );
    for name in zero_evidence {
        assert_eq!(evidence(&m, cause, name), 0.0, "{cause} {name} once off:\n{}", m.text);
    }
    assert!(top_peers(&m, cause).is_empty(), "{cause} still names peers:\n{}", m.text);
    let over = format!("diagnosis: {cause} is over");
    let logged = wait_for(Duration::from_secs(2), || w.stderr().contains(&over).then_some(()));
    assert!(logged.is_some(), "no {over:?} in smtpflow's log:\n{}", w.stderr());
    eprintln!("{cause} turned off {took:?} after the fault was removed (window {window:?})");
    took
}

/// The log said `cause` turned on (with `details` in the sentence) and off, and no other cause
/// changed state.
pub fn expect_log(w: &Watch, cause: &str, details: &[&str]) {
    let stderr = w.stderr();
    let lines = diagnosis_lines(&stderr);
    let on = format!("diagnosis: {cause} is active: ");
    let line = lines
        .iter()
        .find(|l| l.contains(&on))
        .unwrap_or_else(|| panic!("no {on:?} in smtpflow's log:\n{stderr}"));
    for d in details {
        assert!(line.contains(d), "{d:?} not in {line:?}");
    }
    let over = format!("diagnosis: {cause} is over");
    for l in &lines {
        assert!(l.contains(&on) || l.contains(&over), "another cause changed state: {l}");
    }
    assert_eq!(lines.len(), 2, "{cause} turned on and off once:\n{}", lines.join("\n"));
    eprintln!("{}", lines.join("\n"));
}

/// Every outcome of background traffic succeeded; returns how many there were.
pub fn all_ok(what: &str, outcomes: &[(Instant, Outcome)]) -> usize {
    let failed: Vec<&String> = outcomes.iter().filter_map(|(_, o)| o.as_ref().err()).collect();
    assert!(failed.is_empty(), "{what}: {} of {} failed: {failed:?}", failed.len(), outcomes.len());
    outcomes.len()
}
