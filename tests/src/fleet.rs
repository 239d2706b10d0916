//! A fleet of mail gateways for the Prometheus tests: every gateway is the usual [`Pair`] (its
//! namespace with `smtpflow watch` on `sf0`, and a peer namespace on the other end), plus a
//! monitoring link to its site; a site is a "monitoring" namespace where a Prometheus runs; a
//! fleet may also have a central namespace linked to every site (the two-tier set-up).
//!
//! ```text
//!  peer ns ──sf1/sf0── gateway ns (smtpflow on sf0, metrics on 0.0.0.0:9925)
//!                         mon0 10.88.G.2 ──veth── gwG 10.88.G.1  site ns (Prometheus :9090)
//!                                                 up0 10.89.S.2 ──veth── siteS 10.89.S.1  central ns
//! ```
//!
//! G numbers gateways across the fleet, S sites. smtpflow watches only `sf0`, so scrapes and
//! remote writes (on the monitoring links) are never counted. Everything is removed on drop:
//! smtpflow processes first, then namespaces (with their interfaces).
use std::{fmt::Write as _, path::PathBuf, sync::Arc};

use crate::{
    Netns, Pair, Watch,
    smtpflow::{INTERVAL, METRICS_ADDR},
};

/// Where smtpflow listens in a gateway namespace (every address, so the site can scrape it).
pub const METRICS_LISTEN: &str = "0.0.0.0:9925";
/// The port Prometheus servers listen on in their namespaces.
pub const PROMETHEUS_PORT: u16 = 9090;

/// `smtpflow watch --iface sf0 <extra...>` in a gateway namespace, serving on
/// [`METRICS_LISTEN`].
fn gateway_watch(ns: &Netns, extra: &[&str]) -> Watch {
    let interval = format!("{}ms", INTERVAL.as_millis());
    let args = ["--iface", Pair::LOCAL_IF, "--metrics-addr", METRICS_LISTEN];
    let args = [&args[..], &["--interval", &interval, "--status-every", "0s"], extra].concat();
    Watch::launch(ns, &args, METRICS_ADDR)
}

/// One mail gateway: its [`Pair`] of namespaces, smtpflow watching `sf0`, and the address its
/// site scrapes.
pub struct Gateway {
    // Field order matters for drop: smtpflow stops before its namespaces go.
    pub watch: Watch,
    pub pair: Pair,
    /// The `instance` label Prometheus gives it (e.g. `mx1`).
    pub name: String,
    /// `10.88.G.2:9925`, reachable from the site's namespace.
    pub scrape_addr: String,
}

/// A site: a monitoring namespace with a veth link to each of its gateways.
pub struct Site {
    pub gateways: Vec<Gateway>,
    pub name: String,
    pub ns: Arc<Netns>,
}

/// Optionally, a central namespace linked to every site, with the address each site reaches it at.
pub struct Central {
    pub ns: Arc<Netns>,
    /// By site index: the central namespace's address on that site's link.
    pub addrs: Vec<String>,
}

pub struct Fleet {
    pub sites: Vec<Site>,
    pub central: Option<Central>,
}

impl Fleet {
    /// Builds the fleet: `sites` lists each site's name and its gateways' names; `central` adds
    /// a central namespace linked to every site. `--min-failures 1`: one refused connection
    /// names its peer (these tests check the diagnosis's plumbing, not its thresholds).
    pub fn new(sites: &[(&str, &[&str])], central: bool) -> Self {
        Self::with_watch_args(sites, central, &["--min-failures", "1"])
    }

    /// [`Fleet::new`], every gateway's smtpflow started with the flags `watch_args` too.
    pub fn with_watch_args(sites: &[(&str, &[&str])], central: bool, watch_args: &[&str]) -> Self {
        let mut g = 0u32;
        let mut built = Vec::new();
        for (name, gateways) in sites {
            let ns = Arc::new(Netns::new(&format!("mon-{name}")));
            let mut gws = Vec::new();
            for gw_name in *gateways {
                assert!(g < 250, "too many gateways");
                let pair = Pair::new();
                // The monitoring link, created in the gateway namespace so nothing touches the
                // host's interfaces.
                pair.local.ip(&[
                    "link",
                    "add",
                    "mon0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("gw{g}"),
                    "netns",
                    &ns.name,
                ]);
                pair.local.ip(&["addr", "add", &format!("10.88.{g}.2/24"), "dev", "mon0"]);
                pair.local.ip(&["link", "set", "mon0", "up"]);
                ns.ip(&["addr", "add", &format!("10.88.{g}.1/24"), "dev", &format!("gw{g}")]);
                ns.ip(&["link", "set", &format!("gw{g}"), "up"]);
                let watch = gateway_watch(&pair.local, watch_args);
                gws.push(Gateway {
                    watch,
                    pair,
                    name: (*gw_name).to_owned(),
                    scrape_addr: format!("10.88.{g}.2:9925"),
                });
                g += 1;
            }
            built.push(Site { gateways: gws, name: (*name).to_owned(), ns });
        }
        let central = central.then(|| {
            let ns = Arc::new(Netns::new("central"));
            let mut addrs = Vec::new();
            for (s, site) in built.iter().enumerate() {
                site.ns.ip(&[
                    "link",
                    "add",
                    "up0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("site{s}"),
                    "netns",
                    &ns.name,
                ]);
                site.ns.ip(&["addr", "add", &format!("10.89.{s}.2/24"), "dev", "up0"]);
                site.ns.ip(&["link", "set", "up0", "up"]);
                ns.ip(&["addr", "add", &format!("10.89.{s}.1/24"), "dev", &format!("site{s}")]);
                ns.ip(&["link", "set", &format!("site{s}"), "up"]);
                addrs.push(format!("10.89.{s}.1"));
            }
            Central { ns, addrs }
        });
        Self { sites: built, central }
    }

    pub fn gateways(&self) -> impl Iterator<Item = &Gateway> {
        self.sites.iter().flat_map(|s| &s.gateways)
    }

    /// Every gateway's smtpflow stderr, for failure messages.
    pub fn stderr(&self) -> String {
        self.gateways().map(|g| format!("--- {}:\n{}", g.name, g.watch.stderr())).collect()
    }
}

/// The smtpflow rules shipped in deploy/prometheus/.
pub fn rules_file() -> PathBuf {
    crate::prometheus::deploy_dir().join("prometheus/smtpflow-rules.yml")
}

/// A Prometheus configuration for the tests: 1 s scrapes and evaluations.
#[derive(Default)]
pub struct PromConfig {
    pub external_labels: Vec<(String, String)>,
    pub rule_files: Vec<PathBuf>,
    /// `job="smtpflow"` targets as (instance, address).
    pub targets: Vec<(String, String)>,
    /// A remote-write URL.
    pub remote_write: Option<String>,
    /// Alertmanagers (`host:port`) the alerts are sent to.
    pub alertmanagers: Vec<String>,
}

impl PromConfig {
    /// Scrapes `site`'s gateways, one target each, with `instance` set to the gateway's name.
    pub fn scraping(site: &Site) -> Self {
        Self {
            targets: site
                .gateways
                .iter()
                .map(|g| (g.name.clone(), g.scrape_addr.clone()))
                .collect(),
            ..Self::default()
        }
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !self.external_labels.is_empty() {
            y.push_str("  external_labels:\n");
            for (k, v) in &self.external_labels {
                let _ = writeln!(y, "    {k}: {v:?}");
            }
        }
        if !self.rule_files.is_empty() {
            y.push_str("rule_files:\n");
            for f in &self.rule_files {
                let _ = writeln!(y, "  - {:?}", f.display().to_string());
            }
        }
        if !self.targets.is_empty() {
            y.push_str("scrape_configs:\n  - job_name: smtpflow\n    static_configs:\n");
            for (instance, addr) in &self.targets {
                let _ = writeln!(
                    y,
                    "      - targets: [{addr:?}]\n        labels: {{instance: {instance:?}}}"
                );
            }
        }
        if !self.alertmanagers.is_empty() {
            y.push_str("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets:\n");
            for a in &self.alertmanagers {
                let _ = writeln!(y, "            - {a:?}");
            }
        }
        if let Some(url) = &self.remote_write {
            // Short deadlines and back-off, so samples reach the receiver within seconds.
            let _ = writeln!(
                y,
                "remote_write:\n  - url: {url:?}\n    queue_config:\n      batch_send_deadline: 1s\n      min_backoff: 100ms\n      max_backoff: 1s"
            );
        }
        y
    }
}
