//! smtpflow in a Prometheus world: the shipped rules pass `promtool check rules` and their unit
//! tests; a real `/metrics` passes `promtool check metrics`; three gateways scraped by a real
//! Prometheus, then the same fleet two-tier (a Prometheus per site remote-writing to a central
//! receiver), give the fleet-wide numbers the traffic implies through PromQL; and every query of
//! the Grafana dashboard is valid PromQL over metrics that exist.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

mod alerts;
mod dashboard;
mod expectations;
mod promql;

use dashboard::{check_dashboard_queries, concrete, dashboard, panel_queries};
use expectations::{check_rules, expect, expect_settled, raw_expectations, wait_scraped};

use smtpflow_tests::{
    Netns, Pair, Watch,
    fleet::{Fleet, PROMETHEUS_PORT, PromConfig, rules_file},
    in_netns,
    json::JsonExt,
    names::{
        BUILD_INFO, DIAGNOSIS, DROPS, EVENTS, EVIDENCE, GREET_BUCKET, GREETINGS, HANDSHAKES,
        HS_BUCKET, PEER_EVENTS, PEER_GREETINGS, PEER_HANDSHAKES, REPLIES, TCP_STAT, TOP_PEER,
    },
    prometheus::{Prometheus, deploy_dir, promtool},
    require_root,
    traffic::connect_refused,
    wait_for,
};

/// The gateways and how many SMTP sessions each receives: distinct counts, so the fleet sum
/// (15) and every per-instance value are recognisable.
const GATEWAYS: [(&str, u64); 3] = [("mx1", 3), ("mx2", 5), ("mx3", 7)];
/// The gateway that also makes one outbound connection a remote server refuses.
const REFUSED_BY_REMOTE: &str = "mx1";

// ------------------------------------------------------------------------------------------
// Traffic: real TCP (and a little SMTP) between a gateway and its peer namespace.

/// Accepts `n` connections on `addr` in `ns`, greets each with a 220 banner and waits for the
/// client to close. Every wait is bounded.
fn serve_smtp(ns: &Netns, addr: &str, n: u64) -> thread::JoinHandle<()> {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind SMTP server"));
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < n {
            assert!(Instant::now() < deadline, "only {served} of {n} SMTP clients came");
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(b"220 mx.test ESMTP smtpflow fleet test\r\n").unwrap();
                    // Until the client closes (EOF), so the server never resets.
                    let _ = s.read_to_end(&mut Vec::new());
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    })
}

/// `n` SMTP clients from `ns`: connect, read the 220 banner, close.
fn smtp_clients(ns: &Netns, addr: &str, n: u64) {
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(ns, move || {
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut banner = Vec::new();
            let mut byte = [0u8; 1];
            while !banner.ends_with(b"\r\n") {
                assert_eq!(s.read(&mut byte).expect("read banner"), 1, "banner cut short");
                banner.push(byte[0]);
            }
            assert!(banner.starts_with(b"220 "), "{}", String::from_utf8_lossy(&banner));
        }
    });
}

fn smtp_addr(port: u16) -> String {
    format!("{}:{port}", Pair::LOCAL_V4)
}

/// Each gateway: `n` inbound SMTP sessions on port 25 and one inbound connection refused on
/// 587; `REFUSED_BY_REMOTE` also connects out to its peer's closed port 25.
fn make_traffic(fleet: &Fleet) {
    for g in fleet.gateways() {
        let n = count_of(&g.name);
        let server = serve_smtp(&g.pair.local, &smtp_addr(25), n);
        smtp_clients(&g.pair.peer, &smtp_addr(25), n);
        server.join().expect("SMTP server");
        connect_refused(&g.pair.peer, &smtp_addr(587), 1);
        if g.name == REFUSED_BY_REMOTE {
            connect_refused(&g.pair.local, &format!("{}:25", Pair::PEER_V4), 1);
        }
    }
}

fn count_of(gateway: &str) -> u64 {
    GATEWAYS.iter().find(|(n, _)| *n == gateway).map(|(_, c)| *c).expect("known gateway")
}

// ------------------------------------------------------------------------------------------
// Tests.

/// `promtool check rules`, the rules' unit tests and `promtool check config` on the example,
/// all in `cargo xtask test`.
#[test]
fn prometheus_rules_pass_promtool() {
    let dir = deploy_dir().join("prometheus");
    for args in [
        ["check", "rules", "smtpflow-rules.yml"],
        ["test", "rules", "smtpflow-rules.test.yml"],
        ["check", "config", "prometheus.example.yml"],
    ] {
        let out = promtool(&dir, &args, None);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
        assert!(
            !text.contains("WARNING") && !text.contains("FAILED"),
            "promtool {}:\n{text}",
            args.join(" ")
        );
    }
}

/// Every cause the diagnosis decides (smtpflow/src/diagnose.rs) has an alert, tested firing.
#[test]
fn every_diagnosis_cause_has_an_alert() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = std::fs::read_to_string(root.join("smtpflow/src/diagnose.rs")).unwrap();
    let label_fn = src
        .split("pub const fn label(self)")
        .nth(1)
        .and_then(|s| s.split("\n    }").next())
        .expect("Cause::label in diagnose.rs");
    let causes: Vec<&str> =
        label_fn.lines().filter_map(|l| l.split("=> \"").nth(1)?.split('"').next()).collect();
    assert_eq!(causes.len(), 7, "causes found in diagnose.rs: {causes:?}");
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let tests =
        std::fs::read_to_string(deploy_dir().join("prometheus/smtpflow-rules.test.yml")).unwrap();
    for c in causes {
        assert!(
            rules.contains(&format!("expr: smtpflow_diagnosis{{cause=\"{c}\"}} == 1")),
            "no alert on smtpflow_diagnosis{{cause=\"{c}\"}} in smtpflow-rules.yml"
        );
        assert!(
            tests.contains(&format!("cause: {c}}}")),
            "no firing test for the {c} alert in smtpflow-rules.test.yml"
        );
    }
}

/// The dashboard's shape: variables, rows in order (diagnosis first), every panel on the
/// datasource variable and following the gateway picker, top-peer panels on per-peer series.
#[test]
fn grafana_dashboard_is_well_formed() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_f64().unwrap_or(0.0);
    assert!((36.0..=41.0).contains(&schema), "schemaVersion {schema}");
    let vars = d["templating"]["list"].items();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"].as_str(), Some("datasource"));
    assert_eq!(ds["query"].as_str(), Some("prometheus"));
    let inst = var("instance");
    assert_eq!(inst["definition"].as_str(), Some("label_values(smtpflow_build_info, instance)"));
    assert_eq!(inst["multi"].as_bool(), Some(true));
    assert_eq!(inst["includeAll"].as_bool(), Some(true));

    let panels = d["panels"].items();
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"].as_str() == Some("row"))
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Diagnosis", "Fleet overview", "Gateway", "Top peers", "Remote sites"]);
    assert_eq!(panels[0]["title"].as_str(), Some("Diagnosis"));
    let mut ids = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        let id = p["id"].as_f64().expect("panel id") as i64;
        assert!(ids.insert(id), "panel id {id} twice");
        let pos = |k: &str| p["gridPos"][k].as_f64().unwrap_or(-1.0);
        assert!(
            pos("w") > 0.0 && pos("x") >= 0.0 && pos("x") + pos("w") <= 24.0,
            "{title}: gridPos"
        );
        let kind = p["type"].as_str().unwrap_or_default();
        kinds.insert(kind.to_owned());
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"].as_str(), Some("${datasource}"), "{title}");
        let targets = p["targets"].items();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"].as_str(), Some("${datasource}"), "{title}");
        }
    }
    assert!(kinds.contains("heatmap") && kinds.contains("state-timeline"), "{kinds:?}");
    let queries = panel_queries(&d);
    for (title, row, expr) in &queries {
        assert!(!expr.trim().is_empty(), "{title}: empty expr");
        assert!(
            expr.contains(r#"instance=~"$instance""#),
            "{title}: ignores the gateway picker: {expr}"
        );
        let metrics = promql::refs(&concrete(expr, &["mx1"])).metrics;
        let on = |prefix: &str| metrics.iter().any(|m| m.starts_with(prefix));
        match row.as_str() {
            "Diagnosis" => {
                assert!(on(DIAGNOSIS) || metrics.contains("up"), "{title}: {expr}")
            }
            "Top peers" => assert!(on("smtpflow_peer_"), "{title}: {expr}"),
            "Remote sites" => assert!(on("smtpflow_site_"), "{title}: {expr}"),
            _ => {}
        }
    }
    assert!(queries.iter().any(|(_, _, e)| e.contains("histogram_quantile(")));
}

/// The scanner behind the dashboard check.
#[test]
fn promql_refs_finds_metrics_and_labels() {
    let r = promql::refs(
        r#"topk(10, sum by (instance, peer) (increase(smtpflow_peer_tcp_events_total{instance=~"(a|b)", event="syn"}[5m])) > 0) / on (instance) group_left smtpflow_build_info and {__name__="up", job!="x"} offset 1m"#,
    );
    assert_eq!(r.metrics, BTreeSet::from([PEER_EVENTS, BUILD_INFO, "up"].map(String::from)));
    assert_eq!(r.labels, BTreeSet::from(["instance", "peer", "event", "job"].map(String::from)));
    let r = promql::refs("histogram_quantile(0.99, sum by (le) (rate(instance:x:rate5m[1m])))");
    assert_eq!(r.metrics, BTreeSet::from(["instance:x:rate5m".to_owned()]));
}

/// `promtool check metrics` on the real `/metrics` of a running smtpflow, after traffic that
/// makes every family appear (per peer, histograms, greetings, replies, drops, diagnosis peers).
#[test]
fn promtool_check_metrics_accepts_real_output() {
    require_root!();
    let pair = Pair::new();
    // One refused connection is enough to name a peer (TOP_PEER), as the families need.
    let w = Watch::start(&pair.local, Pair::LOCAL_IF, &["--min-failures", "1"]);
    let server = serve_smtp(&pair.local, &smtp_addr(25), 3);
    smtp_clients(&pair.peer, &smtp_addr(25), 3);
    server.join().unwrap();
    connect_refused(&pair.peer, &smtp_addr(587), 1);
    connect_refused(&pair.local, &format!("{}:25", Pair::PEER_V4), 1);

    let families = [
        EVENTS,
        HANDSHAKES,
        GREETINGS,
        REPLIES,
        DROPS,
        HS_BUCKET,
        GREET_BUCKET,
        PEER_EVENTS,
        PEER_HANDSHAKES,
        PEER_GREETINGS,
        TOP_PEER,
        EVIDENCE,
        TCP_STAT,
    ];
    let mut body = String::new();
    let ok = wait_for(Duration::from_secs(10), || {
        body = w.scrape(&pair.local).text;
        families.iter().all(|f| body.contains(&format!("\n{f}{{"))).then_some(())
    });
    let absent: Vec<_> = families.iter().filter(|f| !body.contains(&format!("\n{f}{{"))).collect();
    assert!(ok.is_some(), "families missing from /metrics: {absent:?}\n{body}");

    let out = promtool(&std::env::temp_dir(), &["check", "metrics"], Some(&body));
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics complained about smtpflow's /metrics ({}):\n{said}",
        out.status
    );
}

/// Three gateways, one Prometheus scraping them all (with the shipped rules loaded): the
/// fleet-wide and per-gateway numbers, the rules on real data, and every dashboard query.
#[test]
fn fleet_of_three_gateways_in_one_prometheus() {
    require_root!();
    let names: Vec<&str> = GATEWAYS.iter().map(|(n, _)| *n).collect();
    let fleet = Fleet::new(&[("dc", &names)], false);
    let site = &fleet.sites[0];
    let config = PromConfig { rule_files: vec![rules_file()], ..PromConfig::scraping(site) };
    let prom = Prometheus::start(
        site.ns.clone(),
        "prometheus",
        &format!("0.0.0.0:{PROMETHEUS_PORT}"),
        &config.yaml(),
        &[],
    );
    wait_scraped(&prom, &fleet);
    make_traffic(&fleet);

    expect_settled(&prom, &fleet, &raw_expectations());
    check_rules(&prom, &fleet);
    check_dashboard_queries(&prom, &names);

    // What one gateway costs with the default caps and this traffic (one peer): smtpflow's
    // series, and Prometheus's own per-target ones (up, scrape_*).
    let exported = prom.by_label(r#"count by (instance) ({__name__=~"smtpflow_.+"})"#, "instance");
    let per_target = prom.by_label(
        r#"count by (instance) ({job="smtpflow", __name__=~"up|scrape_.+"})"#,
        "instance",
    );
    let recorded = prom.by_label(r#"count by (instance) ({__name__=~"instance:.+"})"#, "instance");
    let fleet_wide = prom.value(r#"count({__name__=~"job:.+"})"#);
    eprintln!(
        "series per gateway: smtpflow {exported:?}, scrape {per_target:?}, recorded {recorded:?}; fleet-wide recorded {fleet_wide:?}"
    );
}

/// The same fleet two-tier: site A (mx1, mx2) and site B (mx3) each have a Prometheus that
/// scrapes its gateways and remote-writes everything to a central Prometheus started with
/// --web.enable-remote-write-receiver (the protocol Thanos Receive and Mimir accept). The central
/// one, which evaluates the rules, answers the fleet-wide PromQL; each site sees only its own.
#[test]
fn two_tier_fleet_remote_writes_to_a_central_receiver() {
    require_root!();
    let sites: [(&str, &[&str]); 2] = [("a", &["mx1", "mx2"]), ("b", &["mx3"])];
    let fleet = Fleet::new(&sites, true);
    let central = fleet.central.as_ref().expect("central namespace");
    let central_prom = Prometheus::start(
        central.ns.clone(),
        "central",
        &format!("0.0.0.0:{PROMETHEUS_PORT}"),
        &PromConfig { rule_files: vec![rules_file()], ..PromConfig::default() }.yaml(),
        &["--web.enable-remote-write-receiver"],
    );
    let site_proms: Vec<Prometheus> = fleet
        .sites
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let config = PromConfig {
                external_labels: vec![("datacenter".into(), site.name.clone())],
                remote_write: Some(format!(
                    "http://{}:{PROMETHEUS_PORT}/api/v1/write",
                    central.addrs[i]
                )),
                ..PromConfig::scraping(site)
            };
            Prometheus::start(
                Arc::clone(&site.ns),
                &format!("site-{}", site.name),
                &format!("0.0.0.0:{PROMETHEUS_PORT}"),
                &config.yaml(),
                &[],
            )
        })
        .collect();
    // The central receiver has every gateway's zero baseline before any traffic.
    wait_scraped(&central_prom, &fleet);
    make_traffic(&fleet);

    let mut expects = raw_expectations();
    let syn = r#"smtpflow_tcp_events_total{event="syn",direction="inbound",side="peer",port="25"}"#;
    expects.push(expect(
        &format!("sum by (datacenter) ({syn})"),
        "datacenter",
        &[("a", (count_of("mx1") + count_of("mx2")) as f64), ("b", count_of("mx3") as f64)],
    ));
    expect_settled(&central_prom, &fleet, &expects);
    check_rules(&central_prom, &fleet);
    check_dashboard_queries(&central_prom, &["mx1", "mx2", "mx3"]);

    // Each site knows only its own gateways.
    for (prom, (site, gws)) in site_proms.iter().zip(sites) {
        let want: f64 = gws.iter().map(|g| count_of(g) as f64).sum();
        assert_eq!(prom.value(&format!("sum({syn})")), Some(want), "site {site}");
        let instances: BTreeSet<String> =
            prom.by_label(r#"up{job="smtpflow"}"#, "instance").into_keys().collect();
        assert_eq!(instances, gws.iter().map(|g| (*g).to_owned()).collect(), "site {site}");
    }
}
