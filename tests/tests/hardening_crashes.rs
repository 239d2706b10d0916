//! The hardening contract, part 5: crashes and lifecycle. SIGKILL at random moments (seeded),
//! SIGTERM under load, two TCX instances side by side, the watched interface disappearing and
//! coming back; against the real `smtpflow watch` binary in test-owned namespaces.
use std::{thread, time::Duration};

use smtpflow_tests::{
    Pair, Watch, expect,
    expect::{counters, ev, inbound_only},
    hooks::{assert_unhooked, assert_unhooked_within, expected, hooks, kinds, show},
    http,
    names::{EVENTS, INTERFACE_UP, TC_IN, TC_OUT},
    netfilter::RstOracle,
    require_root,
    rng::Rng,
    smtpflow::{self, METRICS_ADDR},
    traffic::{Load, inbound, one_each_way},
    wait_for,
};

const SF0: &str = Pair::LOCAL_IF;

#[test]
fn sigkill_at_random_moments_leaves_nothing_attached() {
    require_root!();
    let mut rng = Rng::from_env("sigkill_at_random_moments");
    let pair = Pair::new();
    let ns = &pair.local;
    let rsts = RstOracle::install(ns, SF0);
    for round in 0..10 {
        let mode: &[&str] =
            if rng.range(0, 2) == 0 { &["--mode", "xdp"] } else { &["--mode", "tc"] };
        let args: Vec<&str> =
            [&["watch", "--iface", SF0, "--metrics-addr", METRICS_ADDR][..], mode].concat();
        let what;
        match round % 3 {
            // While connections run.
            1 => {
                let mut inst = Watch::launch(ns, &args[1..], METRICS_ADDR);
                let load = Load::start(&pair);
                let delay = rng.range(50, 1000);
                thread::sleep(Duration::from_millis(delay));
                assert_eq!(inst.stop_with(libc::SIGKILL), None, "round {round}: not killed");
                let n = load.stop();
                what = format!(
                    "round {round}: {mode:?} killed {delay} ms into a load ({n} connections)"
                );
            }
            // As soon as a program shows up on the interface (mid-start: the other hook, the
            // privilege drop, the map seeding and the first drain may still be to come).
            2 => {
                let mut inst = smtpflow::spawn(ns, &args);
                let seen = wait_for(Duration::from_secs(20), || {
                    (!hooks(ns, SF0).is_empty()).then_some(inst.started.elapsed())
                });
                let code = inst.stop_with(libc::SIGKILL);
                what = format!(
                    "round {round}: {mode:?} killed as soon as hooked ({seen:?} after spawn; \
                     started: {})",
                    inst.stderr().contains("watching")
                );
                assert!(seen.is_some(), "{what}: never hooked:\n{}", inst.stderr());
                assert_eq!(code, None, "{what}: it had exited by itself:\n{}", inst.stderr());
            }
            // At a random moment of the start: loading, verifying and attaching take about
            // 0.9-1.4 s on the test VM, so kills in 0-1.5 s land before, during and after.
            _ => {
                let delay = rng.range(0, 1500);
                let mut inst = smtpflow::spawn(ns, &args);
                thread::sleep(Duration::from_millis(delay));
                let code = inst.stop_with(libc::SIGKILL);
                let log = inst.stderr();
                let moment = if log.contains("watching") {
                    "after the start"
                } else if log.contains("attached") {
                    "while attaching"
                } else {
                    "before attaching"
                };
                what = format!(
                    "round {round}: {mode:?} killed {delay} ms after spawn, {moment} (exit {code:?})"
                );
                assert_eq!(code, None, "{what}: it had exited by itself:\n{log}");
            }
        }
        eprintln!("{what}");
        assert_unhooked_within(ns, SF0, Duration::from_secs(10), &what);
        // The next start works at once and counts exactly.
        let n = rng.range(1, 3);
        let mut w = Watch::start(ns, SF0, &[]);
        let ids = kinds(&hooks(ns, SF0));
        assert_eq!(
            ids,
            expected(&[("tcx/egress", TC_OUT), ("tcx/ingress", TC_IN)]),
            "{what}: after the restart"
        );
        let base = rsts.read();
        let _open = inbound(&pair, n as usize);
        counters(|| w.scrape(ns), || inbound_only(n, &rsts.read().since(&base)), || w.stderr());
        assert_eq!(
            w.stop_with(libc::SIGTERM),
            Some(0),
            "{what}: SIGTERM after restart:\n{}",
            w.stderr()
        );
        assert_unhooked(ns, SF0, &format!("{what}: after SIGTERM"));
    }
}

#[test]
fn sigterm_under_load_exits_zero_and_detaches() {
    require_root!();
    let pair = Pair::new();
    for link in ["tcx", "netlink"] {
        let mut w = Watch::start(&pair.local, SF0, &["--tc-link", link]);
        let load = Load::start(&pair);
        thread::sleep(Duration::from_millis(700));
        let code = w.stop_with(libc::SIGTERM);
        let n = load.stop();
        assert!(n > 0, "no load");
        assert_eq!(code, Some(0), "{link}: SIGTERM under load ({n} connections):\n{}", w.stderr());
        assert_unhooked(&pair.local, SF0, &format!("{link}: after SIGTERM"));
    }
}

#[test]
fn two_tcx_instances_count_the_same_connections() {
    require_root!();
    let pair = Pair::new();
    let ns = &pair.local;
    let rsts = RstOracle::install(ns, SF0);
    let w1 = Watch::start(ns, SF0, &["--tc-link", "tcx"]);
    let second = "127.0.0.1:9926";
    let mut w2 = Watch::launch(
        ns,
        &["--iface", SF0, "--metrics-addr", second, "--interval", "100ms", "--tc-link", "tcx"],
        second,
    );
    let both = hooks(ns, SF0);
    let want = expected(&[
        ("tcx/egress", TC_OUT),
        ("tcx/egress", TC_OUT),
        ("tcx/ingress", TC_IN),
        ("tcx/ingress", TC_IN),
    ]);
    assert_eq!(kinds(&both), want, "two instances: {}", show(&hooks(ns, SF0)));
    let _open = one_each_way(&pair);
    counters(|| w1.scrape(ns), || expect::one_each_way(1, &rsts.read()), || w1.stderr());
    counters(|| w2.scrape(ns), || expect::one_each_way(1, &rsts.read()), || w2.stderr());
    // The second one stops cleanly; the first keeps its programs and keeps counting.
    assert_eq!(w2.stop_with(libc::SIGTERM), Some(0), "{}", w2.stderr());
    let after = hooks(ns, SF0);
    assert_eq!(after.len(), 2, "after stopping one: {}", show(&hooks(ns, SF0)));
    assert!(after.iter().all(|h| both.contains(h)), "the first instance's programs changed");
    let _open = one_each_way(&pair);
    counters(|| w1.scrape(ns), || expect::one_each_way(2, &rsts.read()), || w1.stderr());
}

fn interface_disappears_then_returns(link: &str) {
    let pair = Pair::new();
    let ns = &pair.local;
    let rsts = RstOracle::install(ns, SF0);
    let mut inst = Watch::launch(
        ns,
        &["--iface", SF0, "--metrics-addr", METRICS_ADDR, "--interval", "100ms", "--tc-link", link],
        METRICS_ADDR,
    );
    let _open = inbound(&pair, 2);
    let scrape = || http::scrape(ns, METRICS_ADDR);
    let expected = || {
        let mut e = inbound_only(2, &rsts.read());
        e.push((INTERFACE_UP, vec![("iface", SF0)], 1));
        e
    };
    counters(scrape, expected, || inst.stderr());

    ns.ip(&["link", "del", SF0]);
    let down = wait_for(Duration::from_secs(5), || {
        (scrape().get(INTERFACE_UP, &[("iface", SF0)]) == Some(0.0)).then_some(())
    });
    assert!(
        down.is_some(),
        "{link}: {INTERFACE_UP}{{iface=sf0}} did not become 0:\n{}",
        inst.stderr()
    );
    // Gone for 3 s (30 drain intervals): still running and serving, one warning, no loop.
    thread::sleep(Duration::from_secs(3));
    assert!(
        inst.try_wait().is_none(),
        "{link}: smtpflow exited while sf0 was gone:\n{}",
        inst.stderr()
    );
    let m = scrape();
    assert_eq!(m.get(INTERFACE_UP, &[("iface", SF0)]), Some(0.0));
    assert_eq!(
        m.sum(EVENTS, &ev(SF0, "inbound", "syn", "peer")),
        2,
        "{link}: the counts were lost"
    );
    let log = inst.stderr();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("disappeared")).collect();
    assert_eq!(warnings.len(), 1, "{link}: expected one warning, got:\n{log}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains(SF0), "{link}: {}", warnings[0]);
    assert!(http::healthy(ns, METRICS_ADDR));

    // It comes back: smtpflow exits non-zero, saying so, so that the service manager restarts it.
    pair.link();
    let code = inst.wait_exit(Duration::from_secs(10));
    let log = inst.stderr();
    eprintln!("{link}: after sf0 came back: exit {code:?}; log:\n{log}");
    assert_eq!(code, Some(Some(1)), "{link}: expected exit 1 once sf0 is back:\n{log}");
    assert!(
        log.contains("interface sf0 is back")
            && log.contains("restarts smtpflow and it attaches again"),
        "{link}: the exit message does not say why:\n{log}"
    );
    assert!(!log.contains("panicked"), "{link}: {log}");
    assert_unhooked(ns, SF0, &format!("{link}: the new sf0"));
    // The restart attaches to the new interface and counts.
    let rsts = RstOracle::install(ns, SF0);
    let w = Watch::start(ns, SF0, &["--tc-link", link]);
    let _open = inbound(&pair, 1);
    counters(|| w.scrape(ns), || inbound_only(1, &rsts.read()), || w.stderr());
}

#[test]
fn interface_disappears_then_returns_tcx() {
    require_root!();
    interface_disappears_then_returns("tcx");
}

#[test]
fn interface_disappears_then_returns_netlink() {
    require_root!();
    interface_disappears_then_returns("netlink");
}
