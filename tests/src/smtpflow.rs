//! The smtpflow binary under test: `smtpflow watch` running in a namespace ([`Watch`]: started,
//! scraped, stopped on drop), a `watch` run to its end, and the one-shot `smtpflow diagnose`.
use std::{
    io,
    ops::{Deref, DerefMut},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::{
    Metrics, Netns, expect,
    expect::Expected,
    http,
    process::{Finished, Process, run_bounded},
    wait_for,
};

/// Where the metrics endpoint listens inside the namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9925";
/// The drain interval the tests run with.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// How long a `watch` that must refuse to start may take to exit.
pub const ERROR_TIMEOUT: Duration = Duration::from_secs(15);

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

/// `smtpflow <args>` inside `ns`, not yet ready.
pub fn spawn(ns: &Netns, args: &[&str]) -> Process {
    Process::spawn(ns, binary(), args)
}

/// How long smtpflow may take to load, attach and serve. Well under 2 s on this host; the bound
/// is for the kernel matrix's software-emulated VMs, where Linux 6.1's verifier alone takes 10
/// to 20 s for the two TC programs (`smtpflow check` prints the instructions it verifies).
pub const STARTUP: Duration = Duration::from_secs(60);

/// `smtpflow <args>` inside `ns`, once `ready()` holds ([`STARTUP`] at most; a panic if it
/// exits first).
pub fn start(ns: &Netns, args: &[&str], ready: impl FnMut() -> bool) -> Process {
    let mut process = spawn(ns, args);
    process.wait_ready(STARTUP, ready);
    process
}

/// A running `smtpflow watch`, serving its metrics on [`Watch::addr`] inside the namespace.
/// Everything [`Process`] does, it does (through `Deref`).
pub struct Watch {
    process: Process,
    pub addr: String,
}

impl Watch {
    /// Starts `smtpflow watch --iface <iface> <extra...>` in `ns` and waits until it serves.
    pub fn start(ns: &Netns, iface: &str, extra: &[&str]) -> Self {
        Self::start_args(ns, &[&["--iface", iface], extra].concat())
    }

    /// Starts `smtpflow watch <args>` (with test defaults for address and interval).
    pub fn start_args(ns: &Netns, args: &[&str]) -> Self {
        let interval = format!("{}ms", INTERVAL.as_millis());
        let defaults = ["--metrics-addr", METRICS_ADDR, "--interval", &interval];
        Self::launch(ns, &[&defaults[..], args].concat(), METRICS_ADDR)
    }

    /// Starts `smtpflow watch <args>` exactly as given and waits ([`STARTUP`] at most) until
    /// `/healthz` on `addr` answers.
    pub fn launch(ns: &Netns, args: &[&str], addr: &str) -> Self {
        Self::try_launch(ns, args, addr, STARTUP).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Watch::launch`], waiting at most `timeout`, with the failure (it could not start,
    /// exited, or did not answer in time) returned.
    pub fn try_launch(
        ns: &Netns,
        args: &[&str],
        addr: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let mut process = Process::build(ns, binary()).arg("watch").args(args).try_spawn()?;
        process.try_wait_ready(timeout, |_| http::healthy(ns, addr))?;
        Ok(Self { process, addr: addr.to_owned() })
    }

    pub fn scrape(&self, ns: &Netns) -> Metrics {
        http::scrape(ns, &self.addr)
    }

    /// [`Watch::scrape`] with the failure returned.
    pub fn try_scrape(&self, ns: &Netns) -> io::Result<Metrics> {
        http::try_scrape(ns, &self.addr)
    }

    /// Waits until every `(name, labels, value)` holds exactly, then waits several drain
    /// intervals more and checks that they still hold (nothing extra was counted).
    pub fn expect_settled(&self, ns: &Netns, expected: &[Expected<'_>]) -> Metrics {
        expect::counters(|| self.scrape(ns), || expected.to_vec(), || self.stderr())
    }
}

impl Deref for Watch {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Watch {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Runs `ip netns exec <ns> [wrapper...] smtpflow watch <args>` to its exit, at most
/// [`ERROR_TIMEOUT`].
pub fn run_watch(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Finished {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).args(wrapper).arg(binary()).arg("watch").args(args);
    run_bounded(cmd, ERROR_TIMEOUT)
}

/// How long `smtpflow check` may take: it loads every program through the verifier, which takes
/// seconds on the kernel matrix's emulated VMs (see [`STARTUP`]).
pub const CHECK_TIMEOUT: Duration = STARTUP;

/// Runs `ip netns exec <ns> smtpflow check <args>` to its exit, at most [`CHECK_TIMEOUT`].
pub fn run_check(ns: &Netns, args: &[&str]) -> Finished {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(binary()).arg("check").args(args);
    run_bounded(cmd, CHECK_TIMEOUT)
}

/// Starts `smtpflow diagnose <args>` inside `ns`, its stdout kept ([`Process::finish`] returns it).
pub fn diagnose(ns: &Netns, args: &[&str]) -> Process {
    Process::build(ns, binary()).arg("diagnose").args(args).capture_stdout().spawn()
}

/// Waits (at most [`STARTUP`]) until a `diagnose`'s log says the pressure signals were read for
/// the first time: the first drain, the baseline the verdict is measured from, is then taken, so
/// anything that happens afterwards is inside the observed period.
pub fn wait_observing(diagnose: &mut Process) {
    let ok = wait_for(STARTUP, || {
        diagnose.assert_running();
        diagnose.stderr().contains("conntrack statistics from").then_some(())
    });
    assert!(
        ok.is_some(),
        "smtpflow diagnose did not start observing within 20s:\n{}",
        diagnose.stderr()
    );
}
