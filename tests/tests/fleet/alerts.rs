//! Alerts delivered end to end: smtpflow on a gateway, a real Prometheus scraping it with the
//! shipped rules, a real Alertmanager (Debian's `prometheus-alertmanager`) and a webhook
//! receiver, all in the site's namespace. The rules are the shipped file with every `for:`
//! shortened (a temporary copy: the shipped durations are never changed): 5 s for the
//! diagnosis alerts, 30 s for the others (Prometheus's target discovery alone may take 5 s,
//! which `SmtpflowAbsent` must not see as a lost fleet); Alertmanager's group timers are 1 s, so
//! an alert is delivered seconds after the diagnosis turns on.
use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use smtpflow_tests::{
    alertmanager::{self, Alertmanager, Delivered, Webhook},
    fleet::{Fleet, PROMETHEUS_PORT, PromConfig, rules_file},
    gateway::{self, BACKUP_MX, NoisyGateway},
    json::JsonExt,
    prometheus::Prometheus,
    report, require_root,
    tempdir::TempDir,
    traffic::connect_refused,
    wait_for,
};

const ALERTMANAGER_PORT: u16 = 9093;
const WEBHOOK_PORT: u16 = 9096;
/// The diagnosis alerts' `for:` in the test's copy of the rules.
const FOR: &str = "5s";
/// The other alerts' `for:` there.
const FOR_OTHERS: &str = "30s";
/// The diagnosis window smtpflow runs with (as in the diagnosis tests of the noisy gateway).
const WINDOW: Duration = Duration::from_secs(20);

/// The shipped rules with every `for:` replaced by [`FOR`] (alerts on `smtpflow_diagnosis`) or
/// [`FOR_OTHERS`], written in `dir`.
fn rules_with_short_for(dir: &TempDir) -> PathBuf {
    let text = std::fs::read_to_string(rules_file()).expect("the shipped rules");
    let mut shortened = 0;
    let mut diagnosis = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let trimmed = l.trim_start();
            if trimmed.starts_with("expr:") {
                diagnosis = trimmed.starts_with("expr: smtpflow_diagnosis{");
            }
            match trimmed.strip_prefix("for: ") {
                Some(_) => {
                    shortened += 1;
                    let d = if diagnosis { FOR } else { FOR_OTHERS };
                    format!("{}for: {d}", &l[..l.len() - trimmed.len()])
                }
                None => l.to_owned(),
            }
        })
        .collect();
    assert!(shortened >= 10, "only {shortened} `for:` in {}", rules_file().display());
    PathBuf::from(dir.write("smtpflow-rules.yml", lines.join("\n") + "\n"))
}

/// The diagnosis alerts among `alerts` (those with a `cause` label), as `alertname status
/// cause peers` lines.
fn diagnosis_alerts(alerts: &[Delivered]) -> Vec<String> {
    alerts
        .iter()
        .filter(|a| a.labels.contains_key("cause"))
        .map(|a| {
            format!(
                "{} {} cause={} peers={:?}",
                a.labels.get("alertname").map_or("?", String::as_str),
                a.status,
                a.labels["cause"],
                a.annotations.get("peers")
            )
        })
        .collect()
}

/// The noisy but healthy gateway for two windows (its one-shot noise once mail has flowed for
/// 15 s, as on a gateway that has been running: the shipped ratio alert looks at 5 minutes),
/// then a backup MX refusing 25 handshakes. During the noise no alert arrives at the webhook
/// and no diagnosis alert is even pending in Prometheus;
/// under the fault, `SmtpflowRemoteRefusing` arrives firing, for `mx1`, with
/// `cause="remote_refusing"` and the backup MX in its `peers` annotation, and no alert of
/// another cause arrives.
#[test]
fn alerts_reach_a_webhook_through_alertmanager() {
    require_root!();
    if !alertmanager::available() {
        report::skipped(
            &report::current_test(),
            "prometheus-alertmanager is not installed (`cargo xtask setup` installs it)",
        );
        return;
    }
    let window = format!("{}s", WINDOW.as_secs());
    let fleet = Fleet::with_watch_args(&[("dc", &["mx1"])], false, &["--window", &window]);
    let site = &fleet.sites[0];
    let gw = &site.gateways[0];
    let webhook = Webhook::start(&site.ns, WEBHOOK_PORT);
    let am = Alertmanager::start(
        &site.ns,
        ALERTMANAGER_PORT,
        &Alertmanager::webhook_config(&webhook.url),
    );
    let dir = TempDir::new("alert-rules");
    let config = PromConfig {
        rule_files: vec![rules_with_short_for(&dir)],
        alertmanagers: vec![format!("127.0.0.1:{ALERTMANAGER_PORT}")],
        ..PromConfig::scraping(site)
    };
    let prom = Prometheus::start(
        site.ns.clone(),
        "prometheus",
        &format!("0.0.0.0:{PROMETHEUS_PORT}"),
        &config.yaml(),
        &[],
    );
    // Prometheus scrapes the gateway, evaluates every rule, and knows the Alertmanager.
    let ready = wait_for(Duration::from_secs(30), || {
        let up = prom.value(r#"up{job="smtpflow"}"#) == Some(1.0);
        let rules = prom.rules();
        let healthy =
            rules.len() >= 20 && rules.iter().all(|(_, _, h, e)| h == "ok" && e.is_empty());
        let ams = prom.api("/api/v1/alertmanagers").unwrap_or_default();
        let known = !ams["activeAlertmanagers"].items().is_empty();
        (up && healthy && known).then_some(())
    });
    assert!(
        ready.is_some(),
        "Prometheus not ready: targets {:?}, rules {:?}\n{}",
        prom.targets(),
        prom.rules(),
        prom.log()
    );

    let mut problems = Vec::new();
    // The noisy but healthy gateway, two windows, then long enough for a cause that turned on
    // to pass `for:` and be delivered.
    let mut noisy = NoisyGateway::start(&gw.pair);
    let started = Instant::now();
    let mut pending = Vec::new();
    let watch_alerts = |until: Instant, pending: &mut Vec<String>| {
        while Instant::now() < until {
            for (labels, _) in prom.vector("ALERTS{cause!=\"\"}") {
                let line = format!("{labels:?}");
                if !pending.contains(&line) {
                    pending.push(line);
                }
            }
            thread::sleep(Duration::from_millis(500));
        }
    };
    watch_alerts(started + Duration::from_secs(10), &mut pending);
    for i in 1..=2 {
        watch_alerts(Instant::now() + Duration::from_secs(5), &mut pending);
        noisy.round(&gw.pair);
        watch_alerts(started + Duration::from_secs(10) + WINDOW * i, &mut pending);
    }
    watch_alerts(Instant::now() + Duration::from_secs(10), &mut pending);
    let during_noise = webhook.alerts();
    if !during_noise.is_empty() {
        problems.push(format!(
            "alerts delivered during the noisy but healthy gateway: {:?}",
            during_noise
                .iter()
                .map(|a| format!("{} {:?} {:?}", a.status, a.labels, a.annotations))
                .collect::<Vec<_>>()
        ));
    }
    if !pending.is_empty() {
        problems.push(format!(
            "diagnosis alerts pending or firing in Prometheus during the noise: {pending:?}"
        ));
    }

    // The fault: the backup MX refuses 25 handshakes. Only what is delivered from now on counts.
    let fault = Instant::now();
    let before = webhook.received();
    connect_refused(&gw.pair.local, &gateway::addr(BACKUP_MX, 25), 25);
    let refusing = |a: &Delivered| {
        a.status == "firing"
            && a.labels.get("alertname").map(String::as_str) == Some("SmtpflowRemoteRefusing")
    };
    let arrived = wait_for(Duration::from_secs(60), || {
        webhook.alerts_since(before).into_iter().find(|a| refusing(a))
    });
    match &arrived {
        None => problems.push(format!(
            "no SmtpflowRemoteRefusing within 60 s of the fault; delivered: {:?}; ALERTS: {:?}",
            diagnosis_alerts(&webhook.alerts()),
            prom.vector("ALERTS")
        )),
        Some(a) => {
            eprintln!("delivered {:?} after {:?}: {a:?}", a.labels["alertname"], fault.elapsed());
            let label = |k: &str| a.labels.get(k).map(String::as_str);
            if label("cause") != Some("remote_refusing") || label("instance") != Some("mx1") {
                problems.push(format!("SmtpflowRemoteRefusing's labels: {:?}", a.labels));
            }
            let peers = a.annotations.get("peers").map_or("", String::as_str);
            if !peers.contains(&format!("{BACKUP_MX} on sf0 (")) {
                problems.push(format!("the alert does not name {BACKUP_MX}: peers {peers:?}"));
            }
        }
    }
    let others: Vec<String> = diagnosis_alerts(&webhook.alerts_since(before))
        .into_iter()
        .filter(|a| !a.contains(" cause=remote_refusing "))
        .collect();
    if !others.is_empty() {
        problems.push(format!("alerts of other causes delivered: {others:?}"));
    }

    let mail = noisy.flow.stop();
    if !mail.failures.is_empty() {
        problems.push(format!("background mail failed: {:?}", mail.failures));
    }
    eprintln!("mail {mail:?}; noise {:?}", noisy.noise);
    assert!(
        problems.is_empty(),
        "alerts end to end:\n  {}\nsmtpflow:\n{}\nalertmanager:\n{}",
        problems.join("\n  "),
        fleet.stderr(),
        am.log()
    );
}
