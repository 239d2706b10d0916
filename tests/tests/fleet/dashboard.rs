//! The Grafana dashboard: its panels' queries, made concrete, and checked against a real
//! Prometheus (valid PromQL over metrics and labels that exist).
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use smtpflow_tests::{
    json::{Json, JsonExt},
    prometheus::{Prometheus, deploy_dir},
    wait_for,
};

use crate::{GATEWAYS, REFUSED_BY_REMOTE, expectations::per_gateway, promql};

pub fn dashboard() -> Json {
    let path = deploy_dir().join("grafana/smtpflow.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every (panel title, row title, expression) of the dashboard, rows included in order.
pub fn panel_queries(d: &Json) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut row = String::new();
    let mut visit = |p: &Json, row: &mut String| {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        if p["type"].as_str() == Some("row") {
            *row = title;
            return;
        }
        for t in p["targets"].items() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((title.clone(), row.clone(), expr.to_owned()));
        }
    };
    for p in d["panels"].items() {
        visit(p, &mut row);
        // Panels of a collapsed row are nested in it.
        for inner in p["panels"].items() {
            visit(inner, &mut row);
        }
    }
    out
}

/// Grafana's variables replaced by concrete values, as Grafana would for `instances` selected.
pub fn concrete(expr: &str, instances: &[&str]) -> String {
    let selected = format!("({})", instances.join("|"));
    let e = expr
        .replace("${instance}", &selected)
        .replace("$instance", &selected)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    assert!(!e.contains('$'), "a Grafana variable is left in {e}");
    e
}

/// Runs every dashboard query against `prom`: each must be valid PromQL that evaluates, and
/// refer only to metrics Prometheus has (raw or recorded) and to labels those metrics carry.
pub fn check_dashboard_queries(prom: &Prometheus, instances: &[&str]) {
    let d = dashboard();
    let queries = panel_queries(&d);
    assert!(queries.len() >= 20, "only {} queries in the dashboard", queries.len());
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, _, e)| promql::refs(&concrete(e, instances)).metrics)
        .collect();
    // Recorded series appear with the rules' first evaluations: wait (bounded) for them all.
    let mut missing = BTreeSet::new();
    let names_ok = wait_for(Duration::from_secs(30), || {
        let names = prom.metric_names();
        missing = wanted.difference(&names).cloned().collect();
        missing.is_empty().then_some(names)
    });
    let names = names_ok.unwrap_or_else(|| {
        panic!("{}: the dashboard uses metrics that do not exist: {missing:?}", prom.name)
    });

    let mut failures = Vec::new();
    let mut empty = Vec::new();
    for (title, _, expr) in &queries {
        let q = concrete(expr, instances);
        match prom.query(&q) {
            Err(e) => failures.push(format!("{title:?}: {q}: {e}")),
            Ok(data) => {
                if data["result"].items().is_empty() {
                    empty.push(title.clone());
                }
            }
        }
        let refs = promql::refs(&q);
        if refs.metrics.is_empty() {
            failures.push(format!("{title:?}: {q}: refers to no metric"));
        }
        let mut known_labels: BTreeSet<String> = BTreeSet::new();
        for m in &refs.metrics {
            if names.contains(m) {
                known_labels.extend(prom.label_names(m));
            } else {
                failures.push(format!("{title:?}: {q}: no metric named {m}"));
            }
        }
        for l in refs.labels.difference(&known_labels) {
            failures.push(format!("{title:?}: {q}: label {l:?} is on none of {:?}", refs.metrics));
        }
    }
    // The gateway picker: label_values(smtpflow_build_info, instance).
    for v in d["templating"]["list"].items() {
        if v["type"].as_str() != Some("query") {
            continue;
        }
        let def = v["definition"].as_str().unwrap_or_default();
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {def:?} is not label_values(metric, label)"));
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        let values = prom.label_values(label.trim(), metric.trim());
        let want: BTreeSet<String> = instances.iter().map(|s| (*s).to_owned()).collect();
        if values != want {
            failures.push(format!("variable {def}: values {values:?}, want {want:?}"));
        }
    }
    eprintln!(
        "{}: {} dashboard queries ran; empty results (no such events in this traffic): {empty:?}",
        prom.name,
        queries.len()
    );
    assert!(failures.is_empty(), "{}: dashboard queries:\n  {}", prom.name, failures.join("\n  "));
    // The panels this traffic must fill, and two of them to the exact numbers.
    for must in [
        "Diagnosis per gateway",
        "Peers most involved in the active causes",
        "Handshake failure ratio per gateway",
        "Top peers by inbound connection attempts",
        "Top peers by failed handshakes",
    ] {
        assert!(!empty.contains(&must.to_owned()), "{}: panel {must:?} has no data", prom.name);
    }
    let panel = |title: &str| {
        let (_, _, e) = queries.iter().find(|(t, _, _)| t == title).expect("panel");
        concrete(e, instances)
    };
    // Each gateway's one peer: its sessions and the refused SYN on 587.
    let top = prom.by_label(&panel("Top peers by inbound connection attempts"), "instance");
    let want: BTreeMap<String, f64> =
        per_gateway(|_, c| c as f64 + 1.0).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    assert_eq!(top, want, "{}: top inbound peers", prom.name);
    // One refused inbound handshake per gateway, and mx1's refused outbound one.
    let mut failed: Vec<(String, String, f64)> = prom
        .vector(&panel("Top peers by failed handshakes"))
        .into_iter()
        .map(|(l, v)| (l["instance"].clone(), l["direction"].clone(), v))
        .collect();
    failed.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut want_failed: Vec<(String, String, f64)> =
        GATEWAYS.iter().map(|(n, _)| ((*n).to_owned(), "inbound".to_owned(), 1.0)).collect();
    want_failed.push((REFUSED_BY_REMOTE.to_owned(), "outbound".to_owned(), 1.0));
    want_failed.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(failed, want_failed, "{}: top peers by failed handshakes", prom.name);
}
