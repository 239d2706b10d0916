//! The hardening contract, part 4: least privilege after attaching (`/proc/<pid>/status`),
//! `--user`, `--keep-privileges`; against the real `smtpflow watch` binary in test-owned
//! namespaces.
use smtpflow_tests::{
    Pair, Watch, expect,
    expect::counters,
    hooks::assert_unhooked,
    netfilter::RstOracle,
    procfs::{CAP_NET_ADMIN, caps, own_effective_caps, status, status_field, thread_statuses},
    require_root,
    smtpflow::run_watch,
    traffic::one_each_way,
};

const SF0: &str = Pair::LOCAL_IF;

/// Asserts the capability sets of one thread's status: only CAP_NET_ADMIN effective and
/// permitted (and bounding), nothing inheritable or ambient, no_new_privs set.
fn assert_net_admin_only(status: &str, what: &str) {
    if let Err(e) = net_admin_only(status) {
        panic!("{what}: {e}");
    }
}

/// Whether a thread's status shows only CAP_NET_ADMIN (see [`assert_net_admin_only`]).
fn net_admin_only(status: &str) -> Result<(), String> {
    let sets = ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"];
    let got: Vec<u64> = sets.iter().map(|s| caps(status, s)).collect();
    let want = [CAP_NET_ADMIN, CAP_NET_ADMIN, CAP_NET_ADMIN, 0, 0];
    let nnp = status_field(status, "NoNewPrivs");
    if got == want && nnp == Some("1") {
        return Ok(());
    }
    let show = |v: &[u64]| {
        sets.iter().zip(v).map(|(k, c)| format!("{k} {c:016x}")).collect::<Vec<_>>().join(", ")
    };
    Err(format!("got {}, NoNewPrivs {nnp:?}; want {}, NoNewPrivs 1", show(&got), show(&want)))
}

/// Runs `watch` with `extra`, counts, and checks the process (main thread, as
/// `/proc/<pid>/status` shows it) with `check`; then SIGTERM: exit 0, nothing attached.
fn privileged_run(extra: &[&str], check: impl Fn(&str)) {
    let pair = Pair::new();
    let rsts = RstOracle::install(&pair.local, SF0);
    let mut w = Watch::start(&pair.local, SF0, extra);
    let ns = &pair.local;
    let _open = one_each_way(&pair);
    counters(|| w.scrape(ns), || expect::one_each_way(1, &rsts.read()), || w.stderr());
    check(&status(w.pid()));
    // Still counting and serving afterwards (drains keep working with the reduced set).
    let _open = one_each_way(&pair);
    counters(|| w.scrape(ns), || expect::one_each_way(2, &rsts.read()), || w.stderr());
    let code = w.stop_with(libc::SIGTERM);
    let log = w.stderr();
    assert_eq!(code, Some(0), "{extra:?}: SIGTERM must exit 0:\n{log}");
    assert!(log.contains("SIGTERM: detached from sf0"), "{extra:?}: {log}");
    assert_unhooked(&pair.local, SF0, &format!("{extra:?}: after exit"));
}

#[test]
fn privileges_dropped_after_attach_counts_and_detaches() {
    require_root!();
    for link in ["tcx", "netlink"] {
        privileged_run(&["--tc-link", link], |status| {
            assert_net_admin_only(status, &format!("smtpflow ({link}), main thread"));
            assert_eq!(
                status_field(status, "Uid").map(|u| u.split_whitespace().next()),
                Some(Some("0"))
            );
        });
    }
}

/// Every thread, not only the main one: the HTTP server (hyper, rustls) runs on the runtime's
/// worker threads.
#[test]
fn privileges_dropped_in_every_thread() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);
    // Make the server work first, so any lazily started thread exists.
    for _ in 0..5 {
        w.scrape(&pair.local);
    }
    let threads = thread_statuses(w.pid());
    assert!(threads.len() > 1, "expected several threads: {threads:?}");
    let mut bad = Vec::new();
    for (tid, status) in &threads {
        let name = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", w.pid()))
            .unwrap_or_default();
        let what = format!("thread {tid} ({})", name.trim());
        if let Err(e) = net_admin_only(status) {
            bad.push(format!("{what}: {e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} threads keep more than CAP_NET_ADMIN:\n{}",
        bad.len(),
        threads.len(),
        bad.join("\n")
    );
}

#[test]
fn user_nobody_counts_serves_and_detaches() {
    require_root!();
    for link in ["tcx", "netlink"] {
        privileged_run(&["--user", "nobody", "--tc-link", link], |status| {
            assert_net_admin_only(status, &format!("--user nobody ({link})"));
            for field in ["Uid", "Gid"] {
                let ids: Vec<&str> =
                    status_field(status, field).unwrap().split_whitespace().collect();
                assert_eq!(ids, ["65534"; 4], "{field} (real, effective, saved, fs)");
            }
            assert_eq!(status_field(status, "Groups"), Some(""), "supplementary groups");
        });
    }
    // Every thread runs as nobody (the uid switch applies to the whole process).
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &["--user", "nobody"]);
    for (tid, status) in thread_statuses(w.pid()) {
        let uids: Vec<&str> = status_field(&status, "Uid").unwrap().split_whitespace().collect();
        assert_eq!(uids, ["65534"; 4], "thread {tid}");
    }
}

#[test]
fn keep_privileges_keeps_the_full_set() {
    require_root!();
    let full = own_effective_caps();
    privileged_run(&["--keep-privileges"], |status| {
        assert_eq!(caps(status, "CapEff"), full, "CapEff with --keep-privileges");
        assert_eq!(caps(status, "CapPrm"), full, "CapPrm with --keep-privileges");
        assert_ne!(caps(status, "CapEff"), CAP_NET_ADMIN);
    });
    // --user needs the privilege drop: the two flags conflict.
    let pair = Pair::new();
    let r = run_watch(&pair.local, &[], &["--iface", SF0, "--keep-privileges", "--user", "nobody"]);
    r.assert_failed("--keep-privileges with --user", &["--keep-privileges", "--user"]);
}
