//! A running `smtpflow watch` in a namespace: started, scraped, and stopped on drop.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{Metrics, Netns, in_netns, wait_for};

/// Where the metrics endpoint listens inside the namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9925";
/// The drain interval the tests run with.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The smtpflow binary under test: `$SMTPFLOW_BIN`, else the workspace's release build.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SMTPFLOW_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join("target/release/smtpflow");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release` or run `cargo xtask test`",
        p.display()
    );
    p
}

/// An expected counter: metric name, labels it must carry, exact sum over the matching series.
pub type Expected<'a> = (&'a str, Vec<(&'a str, &'a str)>, u64);

pub struct Watch {
    child: Option<Child>,
    pub addr: String,
    stderr_path: PathBuf,
}

/// HTTP GET inside a namespace; returns (status, body).
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = addr.to_owned();
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, body.to_owned()))
    })
}

impl Watch {
    /// Starts `smtpflow watch --iface <iface> <extra...>` in `ns` and waits until it serves.
    pub fn start(ns: &Netns, iface: &str, extra: &[&str]) -> Self {
        Self::start_args(ns, &[&["--iface", iface], extra].concat())
    }

    /// Starts `smtpflow watch <args>` (with test defaults for address and interval).
    pub fn start_args(ns: &Netns, args: &[&str]) -> Self {
        let interval = format!("{}ms", INTERVAL.as_millis());
        let mut full: Vec<&str> =
            vec!["watch", "--metrics-addr", METRICS_ADDR, "--interval", &interval];
        full.extend_from_slice(args);
        let stderr_path = std::env::temp_dir().join(format!("{}-smtpflow.stderr", ns.name));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary())
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn smtpflow");
        let mut w = Self { child: Some(child), addr: METRICS_ADDR.into(), stderr_path };
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = w.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("smtpflow exited early ({status}):\n{}", w.stderr());
            }
            http_get(ns, METRICS_ADDR, "/healthz").ok().filter(|(s, _)| *s == 200)
        });
        assert!(ready.is_some(), "smtpflow did not serve /healthz within 20s:\n{}", w.stderr());
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn scrape(&self, ns: &Netns) -> Metrics {
        let (status, body) = http_get(ns, &self.addr, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }

    /// Waits until every `(name, labels, value)` holds exactly, then waits several drain
    /// intervals more and checks that they still hold (nothing extra was counted).
    pub fn expect_settled(&self, ns: &Netns, expected: &[Expected<'_>]) -> Metrics {
        let check = |m: &Metrics| -> Vec<String> {
            expected
                .iter()
                .filter_map(|(name, labels, want)| {
                    let got = m.sum(name, labels);
                    (got != *want).then(|| format!("{name}{labels:?}: got {got}, want {want}"))
                })
                .collect()
        };
        // Generous: an emulated VM on a busy host can stall for seconds (a passing test waits
        // only until the values hold).
        let ok = wait_for(Duration::from_secs(30), || {
            let m = self.scrape(ns);
            check(&m).is_empty().then_some(())
        });
        std::thread::sleep(INTERVAL * 5);
        let m = self.scrape(ns);
        let wrong = check(&m);
        assert!(
            ok.is_some() && wrong.is_empty(),
            "counters did not settle at the expected values:\n  {}\nnon-zero events: {:#?}\nper peer: {:#?}\nsmtpflow stderr:\n{}",
            wrong.join("\n  "),
            m.nonzero("smtpflow_tcp_events_total"),
            m.nonzero("smtpflow_peer_tcp_events_total"),
            self.stderr()
        );
        m
    }

    /// Sends a signal and waits (bounded) for the exit status code.
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        let mut child = self.child.take()?;
        // `ip netns exec` execs smtpflow, so the child pid is smtpflow's.
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        match status {
            Some(s) => s.code(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("smtpflow did not exit within 10s of signal {signal}");
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}
