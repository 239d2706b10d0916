//! smtpflow on the host the way operators run it: the systemd unit (verified, and its
//! capability set proven enough and needed with the real binary), and the Debian package
//! (built, installed with dpkg, checked, removed cleanly).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use smtpflow_tests::{
    Pair, http, in_netns,
    names::EVENTS,
    process::Process,
    report, require_root,
    smtpflow::{STARTUP, binary},
    tempdir::TempDir,
    wait_for,
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_text() -> String {
    std::fs::read_to_string(workspace().join("deploy/systemd/smtpflow.service")).expect("the unit")
}

/// The capabilities the unit grants, as `setpriv` names them (`bpf`, `net_admin`, ...).
fn unit_caps() -> Vec<String> {
    let text = unit_text();
    let line =
        text.lines().find(|l| l.starts_with("AmbientCapabilities=")).expect("AmbientCapabilities");
    line["AmbientCapabilities=".len()..]
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

#[test]
fn systemd_unit_verifies() {
    require_root!();
    let dir = TempDir::new("unit");
    let unit = dir.join("smtpflow.service");
    // systemd-analyze checks that ExecStart's binary exists: point it at the one under test.
    let text = unit_text().replace("/usr/bin/smtpflow", binary().to_str().unwrap());
    std::fs::write(&unit, text).unwrap();
    let out =
        // --man=no: the man page the unit names comes with the package (checked there).
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about other units on this machine are not ours.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("smtpflow")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {stderr}");
    assert_eq!(unit_caps(), ["bpf", "net_admin", "perfmon"]);
}

/// Runs `smtpflow watch` in `ns` as user nobody with only `caps`, the privilege preflight
/// skipped so that the kernel decides.
fn watch_as_nobody(pair: &Pair, caps: &[String]) -> Process {
    let list = caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",");
    let bounding = if caps.is_empty() { "-all".to_owned() } else { format!("-all,{list}") };
    let mut spawn = Process::build(&pair.local, "setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    spawn = if caps.is_empty() {
        spawn.arg("--inh-caps=-all")
    } else {
        spawn.arg(format!("--inh-caps=-all,{list}")).arg(format!("--ambient-caps=-all,{list}"))
    };
    spawn
        .arg(format!("--bounding-set={bounding}"))
        .arg(binary())
        .args([
            "watch",
            "--iface",
            Pair::LOCAL_IF,
            "--metrics-addr",
            "127.0.0.1:9925",
            "--interval",
            "100ms",
        ])
        .env("SMTPFLOW_SKIP_PRIVILEGE_CHECK", "1")
        .spawn()
}

#[test]
fn unit_capabilities_are_enough_and_needed() {
    require_root!();
    let caps = unit_caps();

    // Enough: with exactly the unit's capabilities, as nobody, smtpflow attaches, counts a real
    // connection exactly, and counts drop reasons (nothing degraded).
    {
        let pair = Pair::new();
        let mut child = watch_as_nobody(&pair, &caps);
        child.wait_ready(STARTUP, || http::healthy(&pair.local, "127.0.0.1:9925"));
        let addr: std::net::SocketAddr = format!("{}:587", Pair::LOCAL_V4).parse().unwrap();
        in_netns(&pair.peer, move || {
            assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err())
        });
        let counted = wait_for(Duration::from_secs(10), || {
            let r = http::get(&pair.local, "127.0.0.1:9925", "/metrics").ok()?;
            let m = smtpflow_tests::Metrics::parse(&r.body);
            (m.sum(EVENTS, &[("event", "syn"), ("port", "587")]) == 1
                && m.sum(EVENTS, &[("event", "rst"), ("port", "587")]) == 1)
                .then_some(m)
        });
        let stderr = child.stderr();
        assert!(counted.is_some(), "the refused connection was not counted exactly: {stderr}");
        assert!(
            stderr.contains("attached kfree_skb"),
            "drop reasons degraded with the unit's capabilities: {stderr}"
        );
        // No other warning than the skipped preflight, and fexit being refused by this kernel
        // (refused to root too on this VM, where ftrace is restricted; smtpflow says so).
        let unexpected: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("WARN"))
            .filter(|l| {
                !l.contains("SMTPFLOW_SKIP") && !l.contains("SYNs refused on full accept queues")
            })
            .collect();
        assert!(unexpected.is_empty(), "unexpected warnings {unexpected:?}:\n{stderr}");
    }

    // Needed: without any one of them the kernel refuses the programs (CAP_BPF to load at all,
    // CAP_NET_ADMIN for TC/XDP program types, CAP_PERFMON for what the verifier allows our
    // packet programs and for the tracepoint).
    for missing in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let pair = Pair::new();
        let mut child = watch_as_nobody(&pair, &rest);
        let outcome = wait_for(Duration::from_secs(20), || {
            if let Some(code) = child.try_wait() {
                return Some(Err(code));
            }
            http::healthy(&pair.local, "127.0.0.1:9925").then_some(Ok(()))
        })
        .expect("smtpflow neither failed nor served within 20s");
        let stderr = child.stderr();
        let code = outcome
            .expect_err(&format!("smtpflow ran without CAP_{}: {stderr}", missing.to_uppercase()));
        assert!(code != Some(0));
        assert!(
            stderr.contains("Operation not permitted") || stderr.contains("Permission denied"),
            "{stderr}"
        );
    }
}

/// Purges the package on drop, so a failing test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        match Command::new("dpkg").args(["--purge", "smtpflow"]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("dpkg --purge smtpflow: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("dpkg --purge smtpflow: {e}"),
        }
    }
}

fn dpkg_query_files() -> Vec<String> {
    let out = Command::new("dpkg").args(["-L", "smtpflow"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn debian_package_installs_and_removes_cleanly() {
    require_root!();
    if Command::new("dpkg").arg("--version").output().is_err() {
        report::skipped(
            "host::debian_package_installs_and_removes_cleanly",
            "not a Debian system (no dpkg)",
        );
        return;
    }
    let status = Command::new("dpkg-query").args(["-W", "smtpflow"]).output().unwrap();
    assert!(
        !status.status.success(),
        "smtpflow is already installed on this machine; not touching it"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--", "deb"])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo xtask deb: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let deb =
        text.lines().find_map(|l| l.strip_prefix("built ")).expect("the package path").to_owned();

    let _installed = Installed;
    let install = Command::new("dpkg").arg("-i").arg(&deb).output().unwrap();
    assert!(install.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&install.stderr));
    let files = dpkg_query_files();
    for want in [
        "/usr/bin/smtpflow",
        "/lib/systemd/system/smtpflow.service",
        "/etc/smtpflow.toml",
        "/usr/share/man/man1/smtpflow.1.gz",
        "/usr/share/bash-completion/completions/smtpflow",
        "/usr/share/zsh/vendor-completions/_smtpflow",
        "/usr/share/fish/vendor_completions.d/smtpflow.fish",
        "/usr/share/smtpflow/prometheus/smtpflow-rules.yml",
        "/usr/share/smtpflow/grafana/smtpflow.json",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in the package: {files:#?}");
        assert!(Path::new(want).exists(), "{want} not installed");
    }
    // The installed binary runs its preflight on this host, and the installed unit verifies.
    let check = Command::new("/usr/bin/smtpflow").arg("check").output().unwrap();
    assert!(
        check.status.success(),
        "installed smtpflow check:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/smtpflow.service"])
        .output()
        .unwrap();
    let complaints: Vec<String> = String::from_utf8_lossy(&verify.stderr)
        .lines()
        .filter(|l| l.contains("smtpflow"))
        .map(str::to_owned)
        .collect();
    assert!(verify.status.success() && complaints.is_empty(), "{complaints:?}");
    let man = Command::new("zcat").arg("/usr/share/man/man1/smtpflow.1.gz").output().unwrap();
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH smtpflow 1"));

    // Removing keeps the edited configuration (a conffile); purging removes everything.
    let remove = Command::new("dpkg").args(["-r", "smtpflow"]).output().unwrap();
    assert!(remove.status.success(), "dpkg -r: {}", String::from_utf8_lossy(&remove.stderr));
    assert!(!Path::new("/usr/bin/smtpflow").exists());
    assert!(!Path::new("/lib/systemd/system/smtpflow.service").exists());
    assert!(Path::new("/etc/smtpflow.toml").exists(), "dpkg -r must keep the conffile");
    let purge = Command::new("dpkg").args(["--purge", "smtpflow"]).output().unwrap();
    assert!(purge.status.success());
    for gone in files.iter().filter(|f| f.contains("smtpflow") && !f.ends_with('/')) {
        assert!(!Path::new(gone).exists() || Path::new(gone).is_dir(), "{gone} left after purge");
    }
    assert!(!Path::new("/etc/smtpflow.toml").exists());
}
