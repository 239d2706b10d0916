//! The errors an operator sees, against the real `smtpflow watch` binary in test-owned network
//! namespaces: a non-zero exit, quickly, with a message naming the problem, and nothing left
//! attached.
use std::{
    net::{SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use smtpflow_tests::{
    Pair,
    hooks::{assert_unhooked, hooks, kinds},
    http, in_netns,
    process::{Process, installed, run_bounded},
    report, require_root,
    smtpflow::{METRICS_ADDR, STARTUP, binary, run_watch},
};

/// How long an operator error may take to be reported.
const ERROR_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn error_unknown_interface() {
    require_root!();
    let pair = Pair::new();
    let r = run_watch(&pair.local, &[], &["--iface", "nosuch0"]);
    r.assert_failed("--iface nosuch0", &["nosuch0", "does not exist"]);
    // A known interface next to an unknown one: nothing is attached to the known one.
    for netlink in [false, true] {
        let mut args = vec!["--iface", Pair::LOCAL_IF, "--iface", "nosuch0"];
        if netlink {
            args.extend(["--tc-link", "netlink"]);
        }
        let r = run_watch(&pair.local, &[], &args);
        r.assert_failed(&args.join(" "), &["nosuch0", "does not exist"]);
        assert_unhooked(&pair.local, Pair::LOCAL_IF, &args.join(" "));
    }
}

#[test]
fn error_bad_arguments() {
    require_root!();
    let pair = Pair::new();
    let seventeen: Vec<String> = (25..42).map(|p: u16| p.to_string()).collect();
    let seventeen = seventeen.join(",");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--ports", "25,25"], &["--ports", "25", "twice"]),
        (&["--ports", "0"], &["--ports", "0", "not a TCP port", "1-65535"]),
        (&["--ports", "70000"], &["--ports", "70000", "not a TCP port", "1-65535"]),
        (&["--ports", ""], &["--ports", "empty"]),
        (&["--ports", "25,,587"], &["--ports", "empty"]),
        (&["--ports", &seventeen], &["--ports", "17 ports", "at most 16"]),
        (&["--mode", "xdp", "--tc-link", "netlink"], &["--tc-link", "--mode tc"]),
        (&["--xdp-mode", "generic"], &["--xdp-mode", "--mode xdp"]),
        (&["--mode", "xdp", "--xdp-mode", "native"], &["--xdp-mode", "native", "driver"]),
        (&["--iface", Pair::LOCAL_IF], &["sf0", "twice"]),
        (&["--interval", "1ms"], &["--interval", "at least 10ms"]),
    ];
    for (extra, words) in cases {
        let mut args = vec!["--iface", Pair::LOCAL_IF];
        args.extend_from_slice(extra);
        let r = run_watch(&pair.local, &[], &args);
        r.assert_failed(&format!("watch {}", args.join(" ")), words);
        assert_unhooked(&pair.local, Pair::LOCAL_IF, &args.join(" "));
    }
}

/// A bad `--site-map` file stops smtpflow before it attaches, naming the file and the line.
#[test]
fn error_bad_site_map() {
    require_root!();
    let pair = Pair::new();
    let dir = smtpflow_tests::tempdir::TempDir::new("bad-site-map");
    let map = dir.write("sites", "suffix outlook.com microsoft\n\ncidr 40.92.0.0/33 microsoft\n");
    let missing = dir.join("missing").display().to_string();
    let cases: [(&str, &[&str]); 2] = [
        (&map, &[map.as_str(), "line 3", "40.92.0.0/33", "prefix length"]),
        (&missing, &[missing.as_str(), "--site-map"]),
    ];
    for (file, words) in cases {
        let args = ["--iface", Pair::LOCAL_IF, "--site-map", file];
        let r = run_watch(&pair.local, &[], &args);
        r.assert_failed(&format!("watch {}", args.join(" ")), words);
        assert_unhooked(&pair.local, Pair::LOCAL_IF, &args.join(" "));
    }
}

#[test]
fn error_metrics_addr_in_use() {
    require_root!();
    let pair = Pair::new();
    let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
    let _busy = in_netns(&pair.local, move || TcpListener::bind(addr).expect("bind"));
    // With netlink filters too: those would survive the failed start, so this shows the address
    // is checked before anything is attached.
    for link in ["tcx", "netlink"] {
        let args = ["--iface", Pair::LOCAL_IF, "--metrics-addr", METRICS_ADDR, "--tc-link", link];
        let r = run_watch(&pair.local, &[], &args);
        r.assert_failed(
            &format!("--metrics-addr {METRICS_ADDR} in use ({link})"),
            &[METRICS_ADDR, "in use", "--metrics-addr"],
        );
        assert_unhooked(&pair.local, Pair::LOCAL_IF, &format!("failed start ({link})"));
        assert!(!r.stderr.contains("attached"), "attached before failing: {}", r.stderr);
    }
}

/// The capability names listed after `missing:` in an error message.
fn missing_caps(stderr: &str) -> Vec<String> {
    let after = stderr
        .split_once("missing:")
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("no 'missing:' list in:\n{stderr}"));
    after
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("CAP_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn error_not_root_or_missing_capabilities() {
    require_root!();
    let pair = Pair::new();
    assert!(installed("setpriv"), "setpriv (util-linux) is needed for this test");
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
    let r = run_watch(&pair.local, &nobody, &["--iface", Pair::LOCAL_IF]);
    let err = r.assert_failed("as nobody", &["root", "CAP_BPF"]).to_owned();
    assert_eq!(missing_caps(&err), ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"], "{err}");
    assert_unhooked(&pair.local, Pair::LOCAL_IF, "as nobody");

    if !installed("capsh") {
        report::skipped(
            "lifecycle::error_not_root_or_missing_capabilities",
            "capsh is not installed: the partial-capability cases did not run",
        );
        return;
    }
    // Root with some capabilities dropped from the bounding set.
    let cases: &[(&str, &[&str])] = &[
        ("cap_bpf,cap_perfmon,cap_sys_admin", &["CAP_BPF", "CAP_PERFMON"]),
        ("cap_net_admin", &["CAP_NET_ADMIN"]),
    ];
    let shell = format!("--shell={}", binary().display());
    for (drop, missing) in cases {
        let drop_arg = format!("--drop={drop}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pair.local.name, "capsh", &drop_arg, &shell]).args([
            "--",
            "watch",
            "--iface",
            Pair::LOCAL_IF,
        ]);
        let r = run_bounded(cmd, ERROR_TIMEOUT);
        let err = r.assert_failed(&format!("without {drop}"), missing).to_owned();
        assert_eq!(&missing_caps(&err), missing, "without {drop}: {err}");
        assert_unhooked(&pair.local, Pair::LOCAL_IF, &format!("without {drop}"));
    }

    // The documented minimum (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON without CAP_SYS_ADMIN) is
    // enough to run.
    // capsh execs smtpflow (--shell), so the child's pid is smtpflow's.
    let mut minimal = Process::build(&pair.local, "capsh")
        .args(["--drop=cap_sys_admin", &shell, "--", "watch", "--iface", Pair::LOCAL_IF])
        .args(["--metrics-addr", METRICS_ADDR])
        .spawn();
    minimal.wait_ready(STARTUP, || http::healthy(&pair.local, METRICS_ADDR));
    assert_eq!(
        kinds(&hooks(&pair.local, Pair::LOCAL_IF)).len(),
        2,
        "without CAP_SYS_ADMIN: not attached on ingress and egress"
    );
    let code = minimal.stop_with(libc::SIGTERM);
    assert_eq!(code, Some(0), "SIGTERM without CAP_SYS_ADMIN:\n{}", minimal.stderr());
}
