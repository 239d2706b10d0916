//! A real Prometheus server (Debian's `prometheus`) run as a child process inside a network
//! namespace, with its own temporary configuration and data directory, and a client for its
//! HTTP API; and `promtool`. The server is stopped and its directory deleted on drop.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use crate::{
    Netns, http,
    json::{Json, JsonExt},
    process::Process,
    tempdir::TempDir,
    wait_for,
};

/// The `prometheus` binary: `$PROMETHEUS_BIN`, else the one on `PATH` (Debian's package).
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map_or_else(|| "prometheus".into(), PathBuf::from)
}

/// The `promtool` binary: `$PROMTOOL_BIN`, else the one on `PATH`.
pub fn promtool_bin() -> PathBuf {
    std::env::var_os("PROMTOOL_BIN").map_or_else(|| "promtool".into(), PathBuf::from)
}

/// The workspace's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs `promtool <args>` in `dir`, with `stdin` fed to it; returns its output (not checked).
pub fn promtool(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(promtool_bin())
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install Debian's prometheus package: `cargo xtask setup`)",
                promtool_bin().display()
            )
        });
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let text = text.to_owned();
        // A thread, so a promtool that answers before reading everything cannot deadlock us.
        std::thread::spawn(move || {
            if let Err(e) = pipe.write_all(text.as_bytes())
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                eprintln!("feeding promtool: {e}");
            }
        });
    }
    child.wait_with_output().expect("wait for promtool")
}

/// `%`-encoding for a URL query value (everything but the unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One sample of an instant vector: its labels (with `__name__` when it has one) and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// A running Prometheus server in a namespace.
pub struct Prometheus {
    process: Process,
    /// Keeps the namespace alive while the server runs.
    ns: Arc<Netns>,
    /// Where the API answers, inside the namespace.
    pub api_addr: String,
    pub name: String,
    /// Its configuration and data; removed after the server stopped (fields drop in order).
    _dir: TempDir,
}

impl Prometheus {
    /// Starts `prometheus` in `ns` with `config` (the YAML of prometheus.yml), listening on
    /// `listen` (e.g. `0.0.0.0:9090`), with `extra` flags; waits (bounded) until it is ready.
    pub fn start(ns: Arc<Netns>, name: &str, listen: &str, config: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(&format!("prometheus-{name}"));
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = listen.rsplit_once(':').map_or("9090", |(_, p)| p);
        let process = Process::build(&ns, prometheus_bin())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .args(extra)
            .current_dir(&dir.path)
            .grace(Duration::from_secs(10))
            .spawn();
        let mut p = Self {
            process,
            ns,
            api_addr: format!("127.0.0.1:{port}"),
            name: name.to_owned(),
            _dir: dir,
        };
        let (ns, addr) = (p.ns.clone(), p.api_addr.clone());
        p.process.wait_ready(Duration::from_secs(30), || {
            http::get(&ns, &addr, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        p
    }

    /// The server's log (stderr).
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// GET of `path_and_query` on the API address: (status, body).
    pub fn get(&self, path_and_query: &str) -> std::io::Result<(u16, String)> {
        http::get(&self.ns, &self.api_addr, path_and_query).map(|r| (r.status, r.body))
    }

    /// GET an API path and parse the JSON answer; `Err` with Prometheus's error text when its
    /// status is not `success`.
    pub fn api(&self, path_and_query: &str) -> Result<Json, String> {
        let (code, body) = self
            .get(path_and_query)
            .map_err(|e| format!("GET {path_and_query} on {}: {e}", self.name))?;
        let v: Json =
            body.parse().map_err(|e| format!("JSON: {e} in the answer ({code}): {body}"))?;
        if v["status"].as_str() != Some("success") {
            return Err(format!(
                "{} ({code}): {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(v["data"].clone())
    }

    /// An instant query; `Err` with Prometheus's error when it is not valid PromQL or fails.
    /// Returns the `data` object (`resultType`, `result`).
    pub fn query(&self, expr: &str) -> Result<Json, String> {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
    }

    /// An instant query evaluated at `time` (Unix seconds).
    pub fn query_at(&self, expr: &str, time: f64) -> Result<Json, String> {
        self.api(&format!("/api/v1/query?query={}&time={time:.3}", url_encode(expr)))
    }

    /// The samples of an instant-vector query (a scalar becomes one sample without labels).
    pub fn samples(data: &Json) -> Vec<Sample> {
        let value =
            |v: &Json| -> f64 { v[1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN) };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .items()
                .iter()
                .map(|s| (s["metric"].string_map(), value(&s["value"])))
                .collect(),
            Some("scalar") => vec![(BTreeMap::new(), value(&data["result"]))],
            _ => Vec::new(),
        }
    }

    /// An instant query that must succeed, as samples.
    pub fn vector(&self, expr: &str) -> Vec<Sample> {
        let data = self.query(expr).unwrap_or_else(|e| panic!("{}: {expr}: {e}", self.name));
        Self::samples(&data)
    }

    /// The values of `expr` by the value of `label` (e.g. per `instance`).
    pub fn by_label(&self, expr: &str, label: &str) -> BTreeMap<String, f64> {
        self.vector(expr)
            .into_iter()
            .map(|(l, v)| (l.get(label).cloned().unwrap_or_default(), v))
            .collect()
    }

    /// The single value of `expr`, `None` when the result is empty.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let s = self.vector(expr);
        assert!(s.len() <= 1, "{}: {expr} has {} samples: {s:?}", self.name, s.len());
        s.first().map(|(_, v)| *v)
    }

    /// Polls `expr` until `check` accepts its samples, for at most `timeout`; returns the last
    /// samples and whether they were accepted.
    pub fn wait_until(
        &self,
        expr: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Sample]) -> bool,
    ) -> (Vec<Sample>, bool) {
        let mut last = Vec::new();
        let ok = wait_for(timeout, || {
            last = self.query(expr).map(|d| Self::samples(&d)).unwrap_or_default();
            check(&last).then_some(())
        });
        (last, ok.is_some())
    }

    /// Every metric name Prometheus has (raw and recorded).
    pub fn metric_names(&self) -> BTreeSet<String> {
        let data = self
            .api("/api/v1/label/__name__/values")
            .unwrap_or_else(|e| panic!("{}: metric names: {e}", self.name));
        data.items().iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
    }

    /// The label names the series of `metric` carry.
    pub fn label_names(&self, metric: &str) -> BTreeSet<String> {
        let m = url_encode(&format!("{{__name__=\"{metric}\"}}"));
        let data = self
            .api(&format!("/api/v1/labels?match[]={m}"))
            .unwrap_or_else(|e| panic!("{}: labels of {metric}: {e}", self.name));
        data.items().iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
    }

    /// The values of `label` on the series of `metric`.
    pub fn label_values(&self, label: &str, metric: &str) -> BTreeSet<String> {
        let m = url_encode(&format!("{{__name__=\"{metric}\"}}"));
        let data = self
            .api(&format!("/api/v1/label/{label}/values?match[]={m}"))
            .unwrap_or_else(|e| panic!("{}: values of {label}: {e}", self.name));
        data.items().iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
    }

    /// Every loaded rule as (group, name, health, last error).
    pub fn rules(&self) -> Vec<(String, String, String, String)> {
        let data =
            self.api("/api/v1/rules").unwrap_or_else(|e| panic!("{}: rules: {e}", self.name));
        let mut out = Vec::new();
        for g in data["groups"].items() {
            let group = g["name"].as_str().unwrap_or_default();
            for r in g["rules"].items() {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                out.push((group.to_owned(), s("name"), s("health"), s("lastError")));
            }
        }
        out
    }

    /// Scrape targets as (labels, health, last error), for failure messages.
    pub fn targets(&self) -> Vec<String> {
        let Ok(data) = self.api("/api/v1/targets") else { return Vec::new() };
        data["activeTargets"]
            .items()
            .iter()
            .map(|t| {
                format!(
                    "{:?} {} {}",
                    t["labels"].string_map(),
                    t["health"].as_str().unwrap_or_default(),
                    t["lastError"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// The server's clock, in Unix seconds (the time its instant queries default to).
    pub fn now(&self) -> f64 {
        let data = self.query("time()").unwrap_or_else(|e| panic!("{}: time(): {e}", self.name));
        Self::samples(&data).first().map_or(f64::NAN, |(_, v)| *v)
    }
}
