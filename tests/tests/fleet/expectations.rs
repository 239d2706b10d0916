//! Assertions through PromQL: the fleet-wide values the traffic implies, waited for until they
//! settle, and the shipped alert rules evaluated over them.
use std::{collections::BTreeMap, time::Duration};

use smtpflow_tests::{expect, fleet::Fleet, prometheus::Prometheus, wait_for};

use super::{GATEWAYS, REFUSED_BY_REMOTE};

/// `expr` must give these values by `label` (missing keys count as absent series).
pub(crate) struct Expect {
    pub(crate) expr: String,
    pub(crate) label: &'static str,
    pub(crate) want: BTreeMap<String, f64>,
}

pub(crate) fn expect(expr: &str, label: &'static str, want: &[(&str, f64)]) -> Expect {
    Expect {
        expr: expr.to_owned(),
        label,
        want: want.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

/// Per gateway, from `GATEWAYS`, with `f` applied to each count.
pub(crate) fn per_gateway(f: impl Fn(&str, u64) -> f64) -> Vec<(&'static str, f64)> {
    GATEWAYS.iter().map(|(n, c)| (*n, f(n, *c))).collect()
}

pub(crate) fn mismatches(prom: &Prometheus, expects: &[Expect]) -> Vec<String> {
    expects
        .iter()
        .filter_map(|e| {
            let got = match prom.query(&e.expr) {
                Ok(data) => Prometheus::samples(&data)
                    .into_iter()
                    .map(|(l, v)| (l.get(e.label).cloned().unwrap_or_default(), v))
                    .collect::<BTreeMap<_, _>>(),
                Err(err) => return Some(format!("{}: {err}", e.expr)),
            };
            (got != e.want)
                .then(|| format!("{}\n      got  {got:?}\n      want {:?}", e.expr, e.want))
        })
        .collect()
}

/// Waits (bounded) until every expectation holds, then a few scrape intervals more, and checks
/// they still hold (nothing extra was counted).
pub(crate) fn expect_settled(prom: &Prometheus, fleet: &Fleet, expects: &[Expect]) {
    let ((), wrong) = expect::settle(Duration::from_secs(45), Duration::from_secs(3), || {
        ((), mismatches(prom, expects))
    });
    assert!(
        wrong.is_empty(),
        "{}: PromQL did not give the numbers the traffic implies:\n  {}\ntargets:\n  {}\n{}",
        prom.name,
        wrong.join("\n  "),
        prom.targets().join("\n  "),
        fleet.stderr()
    );
}

/// The fleet-wide and per-gateway numbers the traffic implies, as raw PromQL over smtpflow's
/// metrics.
pub(crate) fn raw_expectations() -> Vec<Expect> {
    let total: u64 = GATEWAYS.iter().map(|(_, c)| c).sum();
    let refused_out = |n: &str, _| if n == REFUSED_BY_REMOTE { 1.0 } else { 0.0 };
    vec![
        // The headline: inbound SYNs to port 25 over the whole fleet.
        expect(
            r#"sum(smtpflow_tcp_events_total{event="syn",direction="inbound",side="peer",port="25"})"#,
            "",
            &[("", total as f64)],
        ),
        expect(
            r#"sum by (instance) (smtpflow_tcp_events_total{event="syn",direction="inbound",side="peer",port="25"})"#,
            "instance",
            &per_gateway(|_, c| c as f64),
        ),
        // Our SYN-ACKs: one per session; the refused SYN on 587 got a RST instead.
        expect(
            r#"sum by (instance) (smtpflow_tcp_events_total{event="syn_ack",direction="inbound",side="local"})"#,
            "instance",
            &per_gateway(|_, c| c as f64),
        ),
        expect(
            r#"sum by (instance) (smtpflow_tcp_events_total{event="rst",direction="inbound",side="local",port="587"})"#,
            "instance",
            &per_gateway(|_, _| 1.0),
        ),
        expect(
            r#"sum by (instance) (smtpflow_handshakes_total{direction="inbound",outcome="established"})"#,
            "instance",
            &per_gateway(|_, c| c as f64),
        ),
        expect(
            r#"sum by (instance) (smtpflow_handshakes_total{direction="inbound",outcome="refused"})"#,
            "instance",
            &per_gateway(|_, _| 1.0),
        ),
        expect(
            r#"sum by (instance) (smtpflow_handshakes_total{direction="outbound",outcome="refused"})"#,
            "instance",
            &per_gateway(refused_out),
        ),
        expect(
            r#"sum by (instance) (smtpflow_handshakes_total{outcome="timeout"})"#,
            "instance",
            &per_gateway(|_, _| 0.0),
        ),
        expect(
            r#"sum(smtpflow_smtp_greetings_total{direction="inbound",code="220"})"#,
            "",
            &[("", total as f64)],
        ),
        expect(
            r#"sum by (instance) (smtpflow_handshake_duration_seconds_count{direction="inbound",port="25"})"#,
            "instance",
            &per_gateway(|_, c| c as f64),
        ),
        expect(
            r#"sum by (instance) (smtpflow_greeting_duration_seconds_count{direction="inbound",port="25"})"#,
            "instance",
            &per_gateway(|_, c| c as f64),
        ),
        // Per peer: every gateway's only peer is 10.77.0.2.
        expect(
            r#"sum by (instance) (smtpflow_peer_tcp_events_total{peer="10.77.0.2",event="syn",direction="inbound",side="peer"})"#,
            "instance",
            &per_gateway(|_, c| c as f64 + 1.0),
        ),
        // The diagnosis names the remote refusal on mx1 only.
        expect(
            r#"smtpflow_diagnosis{cause="remote_refusing"}"#,
            "instance",
            &per_gateway(refused_out),
        ),
        expect(
            r#"sum by (instance) (smtpflow_diagnosis_top_peer{cause="remote_refusing",peer="10.77.0.2"})"#,
            "instance",
            &[(REFUSED_BY_REMOTE, 1.0)],
        ),
        expect(r#"sum(smtpflow_diagnosis)"#, "", &[("", 1.0)]),
        expect(r#"count(up{job="smtpflow"} == 1)"#, "", &[("", 3.0)]),
    ]
}

/// The rules, evaluated on real data: every rule healthy, the recorded ratios equal to what the
/// counts imply, and the alerts pending or silent as they should be.
pub(crate) fn check_rules(prom: &Prometheus, fleet: &Fleet) {
    let mut bad = Vec::new();
    let ok = wait_for(Duration::from_secs(20), || {
        let rules = prom.rules();
        bad = rules
            .iter()
            .filter(|(_, _, health, err)| health != "ok" || !err.is_empty())
            .map(|r| format!("{r:?}"))
            .collect();
        (rules.len() >= 20 && bad.is_empty()).then_some(())
    });
    assert!(ok.is_some(), "{}: rules not all healthy: {bad:#?}\n{}", prom.name, prom.log());

    // Failed share of inbound handshakes: 1 refused of n + 1. Every counter started at 0 in the
    // window (scraped before the traffic), so the ratio of the two 5m rates is exact.
    let want: BTreeMap<String, f64> =
        GATEWAYS.iter().map(|(n, c)| ((*n).to_owned(), 1.0 / (*c as f64 + 1.0))).collect();
    let expr = r#"instance:smtpflow_handshake_failures:ratio_rate5m{direction="inbound"}"#;
    let mut got = BTreeMap::new();
    let close = |got: &BTreeMap<String, f64>| {
        got.len() == want.len()
            && want.iter().all(|(k, w)| got.get(k).is_some_and(|g| (g - w).abs() < 1e-9))
    };
    let ok = wait_for(Duration::from_secs(30), || {
        got = prom.by_label(expr, "instance");
        close(&got).then_some(())
    });
    assert!(ok.is_some(), "{}: {expr}: got {got:?}, want {want:?}", prom.name);

    // Fleet-wide: a weighted mean of the gateways' ratios, near 3 of 18.
    let fleet_ratio = prom
        .value(r#"job:smtpflow_handshake_failures:ratio_rate5m{direction="inbound"}"#)
        .expect("the fleet's failure ratio");
    assert!(
        (0.125..=0.25).contains(&fleet_ratio) && (fleet_ratio - 3.0 / 18.0).abs() < 0.02,
        "fleet failure ratio {fleet_ratio}"
    );
    let rates = prom.by_label(
        r#"instance:smtpflow_tcp_events:rate5m{direction="inbound",event="syn",side="peer"}"#,
        "instance",
    );
    assert!(rates.len() == 3 && rates.values().all(|r| *r > 0.0), "instance SYN rates {rates:?}");
    assert_eq!(prom.value("job:smtpflow_up:sum"), Some(3.0));
    assert_eq!(
        prom.by_label(r#"job:smtpflow_diagnosis:sum{cause="remote_refusing"}"#, "cause"),
        BTreeMap::from([("remote_refusing".to_owned(), 1.0)])
    );

    // The remote refusal on mx1 makes its alert pending (for: 15m) there and nowhere else.
    let (alerts, ok) = prom.wait_until(
        r#"ALERTS{alertname="SmtpflowRemoteRefusing"}"#,
        Duration::from_secs(20),
        |s| s.len() == 1,
    );
    assert!(ok, "{}: SmtpflowRemoteRefusing alerts: {alerts:?}\n{}", prom.name, fleet.stderr());
    let labels = &alerts[0].0;
    assert_eq!(labels.get("instance").map(String::as_str), Some(REFUSED_BY_REMOTE));
    assert_eq!(labels.get("alertstate").map(String::as_str), Some("pending"));
    // 25 % of mx1's inbound handshakes failed, but 4 handshakes in 5 minutes are under the
    // volume guard: no failure-ratio alert anywhere.
    assert_eq!(prom.vector(r#"ALERTS{alertname="SmtpflowHandshakeFailureRatioHigh"}"#), Vec::new());
}

/// Waits until Prometheus has scraped every gateway at least once (the counters' zero baseline,
/// before any traffic).
pub(crate) fn wait_scraped(prom: &Prometheus, fleet: &Fleet) {
    let (got, ok) = prom.wait_until(r#"up{job="smtpflow"} == 1"#, Duration::from_secs(30), |s| {
        s.len() == GATEWAYS.len()
    });
    assert!(
        ok,
        "{}: not every gateway was scraped: {got:?}\ntargets:\n  {}\n{}",
        prom.name,
        prom.targets().join("\n  "),
        fleet.stderr()
    );
}
