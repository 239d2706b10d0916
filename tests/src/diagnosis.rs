//! Reading the `smtpflow_diagnosis*` families of a scrape and the diagnosis lines of smtpflow's
//! log.
use std::collections::BTreeMap;

use crate::{
    Metrics,
    names::{DIAGNOSIS, EVIDENCE, TOP_PEER},
};

/// Every cause smtpflow decides, in its report order.
pub const CAUSES: [&str; 7] = [
    "conntrack_exhaustion",
    "listen_overflow",
    "remote_throttling",
    "remote_unreachable",
    "remote_refusing",
    "local_receive_stall",
    "peer_receive_stall",
];

/// `smtpflow_diagnosis{cause}` of a scrape, by cause.
pub fn causes(m: &Metrics) -> BTreeMap<String, f64> {
    m.matching(DIAGNOSIS, &[])
        .map(|(labels, v)| {
            let cause = labels.iter().find(|(k, _)| k == "cause").map(|(_, c)| c.clone());
            (cause.unwrap_or_default(), v)
        })
        .collect()
}

/// The causes whose gauge is 1, in report order. Panics unless exactly the seven causes are
/// exported, each as 0 or 1.
pub fn active(m: &Metrics) -> Vec<&'static str> {
    let all = causes(m);
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    let mut want = CAUSES.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "smtpflow_diagnosis must carry every cause:\n{}", m.text);
    for (cause, v) in &all {
        assert!(*v == 0.0 || *v == 1.0, "smtpflow_diagnosis{{cause={cause:?}}} = {v}");
    }
    CAUSES.into_iter().filter(|c| all[*c] == 1.0).collect()
}

/// One evidence number: `smtpflow_diagnosis_evidence{cause,evidence}` (panics when absent).
pub fn evidence(m: &Metrics, cause: &str, name: &str) -> f64 {
    m.get(EVIDENCE, &[("cause", cause), ("evidence", name)])
        .unwrap_or_else(|| panic!("{EVIDENCE}{{cause={cause:?},evidence={name:?}}} missing"))
}

/// Every evidence number of a cause, by name.
pub fn evidence_of(m: &Metrics, cause: &str) -> BTreeMap<String, f64> {
    m.matching(EVIDENCE, &[("cause", cause)])
        .map(|(labels, v)| {
            let name = labels.iter().find(|(k, _)| k == "evidence").map(|(_, n)| n.clone());
            (name.unwrap_or_default(), v)
        })
        .collect()
}

/// `smtpflow_diagnosis_top_peer` of a cause, as `(iface, peer, count)`.
pub fn top_peers(m: &Metrics, cause: &str) -> Vec<(String, String, f64)> {
    m.matching(TOP_PEER, &[("cause", cause)])
        .map(|(labels, v)| {
            let get = |key: &str| {
                labels.iter().find(|(k, _)| k == key).map(|(_, x)| x.clone()).unwrap_or_default()
            };
            (get("iface"), get("peer"), v)
        })
        .collect()
}

/// The lines of smtpflow's log that say a cause turned on or off (`diagnosis: ...`).
pub fn diagnosis_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("diagnosis: ")).collect()
}

/// The lines of smtpflow's log that say a cause turned on (`diagnosis: <cause> is active: ...`).
pub fn active_lines(stderr: &str) -> Vec<&str> {
    diagnosis_lines(stderr).into_iter().filter(|l| l.contains(" is active")).collect()
}
