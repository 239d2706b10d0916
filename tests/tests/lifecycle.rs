//! Attaching and detaching, crashes and restarts, and the errors an operator sees, against the
//! real `smtpflow watch` binary in test-owned network namespaces.
//!
//! What is hooked to an interface is read from the kernel (`bpftool net show` for XDP and
//! netlink TC filters, `BPF_PROG_QUERY` for TCX links, which the installed bpftool cannot list).
//! Programs are identified by the ids seen attached, not by name: other tests running at the
//! same time load programs with the same names.
use std::{thread, time::Duration};

use smtpflow_tests::{
    Netns, Pair, Watch,
    expect::{Expected, ev},
    hooks::{
        Hook, assert_unhooked, assert_unhooked_within, expected, hooks, kinds, progs_named, show,
        wait_freed,
    },
    http,
    names::{
        ATTACHMENT_INFO, BUILD_INFO, EVENTS, LOST, MALFORMED, PEER_EVENTS, PREFIX, TC_IN, TC_OUT,
        XDP,
    },
    require_root,
    smtpflow::{self, run_check, run_watch},
    traffic::{connect_n, one_each_way, serve},
    wait_for,
};

/// How long a program may take to be freed after its last holder went away.
const FREE_TIMEOUT: Duration = Duration::from_secs(10);

/// The exact counts after [`one_each_way`]: TC sees both directions, XDP only what the peer
/// sends.
fn one_each_way_expected(tc: bool) -> Vec<Expected<'static>> {
    let i = Pair::LOCAL_IF;
    let local = u64::from(tc);
    vec![
        (EVENTS, ev(i, "inbound", "syn", "peer"), 1),
        (EVENTS, ev(i, "inbound", "syn_ack", "local"), local),
        (EVENTS, ev(i, "outbound", "syn", "local"), local),
        (EVENTS, ev(i, "outbound", "syn_ack", "peer"), 1),
        (EVENTS, vec![], 2 + 2 * local),
        (MALFORMED, vec![], 0),
        (LOST, vec![], 0),
    ]
}

fn ids(hooks: &[Hook]) -> Vec<u32> {
    hooks.iter().map(|h| h.prog_id).collect()
}

/// Asserts that exactly `expected` (kind, program name) is hooked to `ifname`; returns the hooks.
fn assert_hooked(ns: &Netns, ifname: &str, want: &[(&str, &str)], w: &Watch) -> Vec<Hook> {
    let got = hooks(ns, ifname);
    assert_eq!(
        kinds(&got),
        expected(want),
        "programs hooked to {ifname}: {}\nsmtpflow stderr:\n{}",
        show(&got),
        w.stderr()
    );
    got
}

/// Asserts (bounded wait) that nothing is hooked to `ifname` and that the programs `ids` are
/// freed (a freed program is attached nowhere).
fn assert_nothing_left(ns: &Netns, ifname: &str, ids: &[u32], after: &str) {
    assert_unhooked_within(ns, ifname, FREE_TIMEOUT, after);
    let alive = wait_freed(ids, FREE_TIMEOUT);
    assert!(
        alive.is_empty(),
        "{after}: programs {alive:?} were still loaded after {FREE_TIMEOUT:?} (smtpflow \
         programs on this machine now: {:?})",
        progs_named(PREFIX)
    );
}

// ---------------------------------------------------------------------------------------------
// 1, 2: SIGKILL leaves nothing attached (TCX and XDP are bpf links owned by the process).

fn sigkill_then_restart(extra: &[&str], expected: &[(&str, &str)], tc: bool) {
    let pair = Pair::new();
    let i = Pair::LOCAL_IF;
    let mut w = Watch::start(&pair.local, i, extra);
    let first = assert_hooked(&pair.local, i, expected, &w);

    assert_eq!(w.stop_with(libc::SIGKILL), None, "smtpflow must be ended by SIGKILL, not exit");
    drop(w);
    assert_nothing_left(&pair.local, i, &ids(&first), "after SIGKILL");

    let w = Watch::start(&pair.local, i, extra);
    let second = assert_hooked(&pair.local, i, expected, &w);
    for h in &second {
        assert!(
            !ids(&first).contains(&h.prog_id),
            "the restarted smtpflow reuses program {h} of the killed one"
        );
    }
    let _open = one_each_way(&pair);
    w.expect_settled(&pair.local, &one_each_way_expected(tc));
}

#[test]
fn sigkill_leaves_nothing_attached_tcx() {
    require_root!();
    sigkill_then_restart(
        &["--mode", "tc", "--tc-link", "tcx"],
        &[("tcx/ingress", TC_IN), ("tcx/egress", TC_OUT)],
        true,
    );
}

#[test]
fn sigkill_leaves_nothing_attached_xdp() {
    require_root!();
    sigkill_then_restart(&["--mode", "xdp"], &[("xdp", XDP)], false);
}

// ---------------------------------------------------------------------------------------------
// 3: netlink TC filters survive a crash; the next start removes them, and a clean stop leaves
// foreign filters and the shared clsact qdisc alone.

fn tc_show(ns: &Netns, what: &[&str]) -> String {
    ns.exec_ok("tc", what)
}

#[test]
fn netlink_filters_survive_sigkill_and_are_cleaned_at_next_start() {
    require_root!();
    let pair = Pair::new();
    let i = Pair::LOCAL_IF;
    let ns = &pair.local;
    // A foreign filter that never matches our traffic (this kernel has no matchall or gact, so
    // `u32` without an action stands in; it must not match, or it would end classification
    // before smtpflow's filter runs).
    ns.exec_ok("tc", &["qdisc", "add", "dev", i, "clsact"]);
    ns.exec_ok(
        "tc",
        &[
            "filter",
            "add",
            "dev",
            i,
            "ingress",
            "prio",
            "1",
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "dst",
            "192.0.2.1/32",
            "flowid",
            "1:1",
        ],
    );
    let qdiscs_before = tc_show(ns, &["qdisc", "show", "dev", i]);
    let ingress_before = tc_show(ns, &["filter", "show", "dev", i, "ingress"]);
    let egress_before = tc_show(ns, &["filter", "show", "dev", i, "egress"]);
    assert!(
        ingress_before.contains("u32") && qdiscs_before.contains("clsact"),
        "setup: {qdiscs_before}\n{ingress_before}"
    );

    let netlink = ["--mode", "tc", "--tc-link", "netlink"];
    let expected = [("tc/ingress", TC_IN), ("tc/egress", TC_OUT)];
    let mut w = Watch::start(ns, i, &netlink);
    let first = assert_hooked(ns, i, &expected, &w);
    assert_eq!(w.stop_with(libc::SIGKILL), None);
    drop(w);

    // The point: netlink filters are not owned by the process and stay after a crash.
    thread::sleep(Duration::from_millis(500));
    let stale = hooks(ns, i);
    assert_eq!(
        stale,
        first,
        "after SIGKILL the netlink filters should have stayed, unchanged: {}",
        show(&stale)
    );

    let w = Watch::start(ns, i, &netlink);
    let log = w.stderr();
    for prog in [TC_IN, TC_OUT] {
        assert!(
            log.contains(&format!("removed stale {prog} filters on {i}")),
            "the restart did not say it removed the stale {prog} filters:\n{log}"
        );
    }
    let second = assert_hooked(ns, i, &expected, &w);
    let alive = wait_freed(&ids(&first), FREE_TIMEOUT);
    assert!(
        alive.is_empty(),
        "the stale filters' programs {alive:?} are still loaded; hooked now: {}",
        show(&second)
    );
    let _open = one_each_way(&pair);
    w.expect_settled(ns, &one_each_way_expected(true));

    let mut w = w;
    assert_eq!(w.stop_with(libc::SIGTERM), Some(0), "SIGTERM must exit 0; stderr:\n{}", w.stderr());
    assert_unhooked(ns, i, "after SIGTERM smtpflow left filters behind");
    assert_nothing_left(ns, i, &ids(&second), "after SIGTERM");
    assert_eq!(
        tc_show(ns, &["filter", "show", "dev", i, "ingress"]),
        ingress_before,
        "the foreign ingress filter changed"
    );
    assert_eq!(
        tc_show(ns, &["filter", "show", "dev", i, "egress"]),
        egress_before,
        "egress filters changed"
    );
    assert_eq!(
        tc_show(ns, &["qdisc", "show", "dev", i]),
        qdiscs_before,
        "the shared clsact qdisc must stay"
    );
}

// ---------------------------------------------------------------------------------------------
// 4: SIGTERM and SIGINT exit 0 and detach before exiting.

fn graceful_stop(extra: &[&str], expected: &[(&str, &str)], signal: i32, name: &str) {
    let pair = Pair::new();
    let i = Pair::LOCAL_IF;
    let mut w = Watch::start(&pair.local, i, extra);
    let before = assert_hooked(&pair.local, i, expected, &w);
    let code = w.stop_with(signal);
    let log = w.stderr();
    assert_eq!(code, Some(0), "{name} must exit 0; stderr:\n{log}");
    assert!(
        log.contains(&format!("{name}: detached from {i}")),
        "no '{name}: detached from {i}' in the log:\n{log}"
    );
    // Detaching happens before the exit: nothing may be hooked any more, right away.
    assert_unhooked(&pair.local, i, &format!("after {name} and exit"));
    assert_nothing_left(&pair.local, i, &ids(&before), &format!("after {name}"));
}

#[test]
fn sigterm_exits_zero_and_detaches_tcx() {
    require_root!();
    graceful_stop(
        &["--tc-link", "tcx"],
        &[("tcx/ingress", TC_IN), ("tcx/egress", TC_OUT)],
        libc::SIGTERM,
        "SIGTERM",
    );
}

#[test]
fn sigint_exits_zero_and_detaches_tcx() {
    require_root!();
    graceful_stop(
        &["--tc-link", "tcx"],
        &[("tcx/ingress", TC_IN), ("tcx/egress", TC_OUT)],
        libc::SIGINT,
        "SIGINT",
    );
}

#[test]
fn sigterm_exits_zero_and_detaches_xdp() {
    require_root!();
    graceful_stop(&["--mode", "xdp"], &[("xdp", XDP)], libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_exits_zero_and_detaches_netlink() {
    require_root!();
    graceful_stop(
        &["--tc-link", "netlink"],
        &[("tc/ingress", TC_IN), ("tc/egress", TC_OUT)],
        libc::SIGINT,
        "SIGINT",
    );
}

// ---------------------------------------------------------------------------------------------
// 5: two interfaces, each counted under its own label.

#[test]
fn two_interfaces_counted_separately() {
    require_root!();
    let pair = Pair::new();
    const IF2: &str = "sf2";
    const PEER_IF2: &str = "sf3";
    const LOCAL2: &str = "10.78.0.1";
    const PEER2: &str = "10.78.0.2";
    pair.local.ip(&[
        "link",
        "add",
        IF2,
        "type",
        "veth",
        "peer",
        "name",
        PEER_IF2,
        "netns",
        &pair.peer.name,
    ]);
    for (ns, ifname, addr) in [(&pair.local, IF2, LOCAL2), (&pair.peer, PEER_IF2, PEER2)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }

    let w = Watch::start_args(
        &pair.local,
        &["--iface", Pair::LOCAL_IF, "--iface", IF2, "--tc-link", "tcx"],
    );
    for ifname in [Pair::LOCAL_IF, IF2] {
        assert_hooked(&pair.local, ifname, &[("tcx/ingress", TC_IN), ("tcx/egress", TC_OUT)], &w);
    }

    // Different counts per interface, so a mixed-up label cannot pass.
    const N1: usize = 2;
    const N2: usize = 3;
    let a1 = format!("{}:25", Pair::LOCAL_V4);
    let a2 = format!("{LOCAL2}:25");
    let s1 = serve(&pair.local, &a1, N1);
    let s2 = serve(&pair.local, &a2, N2);
    let _open = [connect_n(&pair.peer, &a1, N1), connect_n(&pair.peer, &a2, N2)];
    s1.join().unwrap();
    s2.join().unwrap();

    let (n1, n2) = (N1 as u64, N2 as u64);
    let peer_syn = |ifname, peer| {
        vec![
            ("iface", ifname),
            ("peer", peer),
            ("direction", "inbound"),
            ("port", "25"),
            ("event", "syn"),
            ("side", "peer"),
        ]
    };
    let expected = vec![
        (EVENTS, ev(Pair::LOCAL_IF, "inbound", "syn", "peer"), n1),
        (EVENTS, ev(Pair::LOCAL_IF, "inbound", "syn_ack", "local"), n1),
        (EVENTS, vec![("iface", Pair::LOCAL_IF)], 2 * n1),
        (EVENTS, ev(IF2, "inbound", "syn", "peer"), n2),
        (EVENTS, ev(IF2, "inbound", "syn_ack", "local"), n2),
        (EVENTS, vec![("iface", IF2)], 2 * n2),
        (EVENTS, vec![], 2 * n1 + 2 * n2),
        (PEER_EVENTS, peer_syn(Pair::LOCAL_IF, Pair::PEER_V4), n1),
        (PEER_EVENTS, peer_syn(IF2, PEER2), n2),
        (PEER_EVENTS, vec![("iface", Pair::LOCAL_IF), ("peer", PEER2)], 0),
        (PEER_EVENTS, vec![("iface", IF2), ("peer", Pair::PEER_V4)], 0),
    ];
    let m = w.expect_settled(&pair.local, &expected);
    // Every combination is exported per interface: 3 ports x 2 directions x 4 events x 2 sides.
    for ifname in [Pair::LOCAL_IF, IF2] {
        assert_eq!(
            m.matching(EVENTS, &[("iface", ifname)]).count(),
            48,
            "series for {ifname}:\n{}",
            m.text
        );
    }
}

/// XDP already taken on the second interface: the start fails naming it, and what was attached
/// to the first interface meanwhile is rolled back.
#[test]
fn error_xdp_busy_on_second_interface_rolls_back() {
    require_root!();
    let pair = Pair::new();
    pair.local.ip(&[
        "link",
        "add",
        "sf2",
        "type",
        "veth",
        "peer",
        "name",
        "sf3",
        "netns",
        &pair.peer.name,
    ]);
    pair.local.ip(&["link", "set", "sf2", "up"]);
    pair.peer.ip(&["link", "set", "sf3", "up"]);
    let w = Watch::start(&pair.local, "sf2", &["--mode", "xdp"]);
    let owner = assert_hooked(&pair.local, "sf2", &[("xdp", XDP)], &w);

    let r = run_watch(
        &pair.local,
        &[],
        &[
            "--iface",
            Pair::LOCAL_IF,
            "--iface",
            "sf2",
            "--mode",
            "xdp",
            "--metrics-addr",
            "127.0.0.1:9926",
        ],
    );
    r.assert_failed("XDP busy on sf2", &["sf2", "--mode tc"]);
    assert_unhooked(&pair.local, Pair::LOCAL_IF, "failed XDP start");
    let still = hooks(&pair.local, "sf2");
    assert_eq!(still, owner, "the running smtpflow's XDP program on sf2 changed");
}

/// A second smtpflow on the same interface with netlink filters must not take the first one's
/// filters away while it runs: it refuses, saying why.
#[test]
fn netlink_second_instance_keeps_first_attached() {
    require_root!();
    let pair = Pair::new();
    let i = Pair::LOCAL_IF;
    let netlink = ["--tc-link", "netlink"];
    let w1 = Watch::start(&pair.local, i, &netlink);
    let first = assert_hooked(&pair.local, i, &[("tc/ingress", TC_IN), ("tc/egress", TC_OUT)], &w1);
    // The second instance, on another metrics address, until it serves (or gives up).
    let second_addr = "127.0.0.1:9926";
    let mut second = smtpflow::spawn(
        &pair.local,
        &["watch", "--iface", i, "--tc-link", "netlink", "--metrics-addr", second_addr],
    );
    let code = wait_for(Duration::from_secs(20), || {
        let exited = second.try_wait();
        let serving = http::healthy(&pair.local, second_addr);
        assert!(!serving, "the second netlink instance started beside the first");
        exited
    })
    .expect("the second smtpflow neither refused nor started within 20s");
    let stderr = second.stderr();
    assert!(code != Some(0), "the second instance must refuse: {stderr}");
    assert!(
        stderr.contains("another smtpflow") && stderr.contains(i) && stderr.contains("TCX"),
        "the refusal must say why and what to do: {stderr}"
    );
    let now = hooks(&pair.local, i);
    for h in &first {
        assert!(
            now.contains(h),
            "the first smtpflow's {h} was removed by the second; hooked now: {}\nfirst's stderr:\n{}",
            show(&now),
            w1.stderr()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6: veth is steered to tc: `smtpflow check` says which mode fits each interface, and `watch
// --mode xdp` on a veth (generic mode by default, driver mode with `--xdp-mode driver`) or on a
// device without native XDP (generic mode) warns once; none of them refuses.

/// The advice `smtpflow check` and `watch` give for a veth in XDP generic mode, where `--mode
/// xdp` attaches there by default.
const VETH_ADVICE: &str = "sf0 (driver veth): XDP runs in generic mode here (in driver mode an \
                           empty XDP program keeps veth 16-24 % of none, in generic mode 83-89 % \
                           of none, docs/benchmarks.md): where tc runs, after the socket buffer \
                           is built, and copying non-linear packets first, so it costs more than \
                           tc and sees ingress only; use --mode tc here";

/// The advice `watch --mode xdp --xdp-mode driver` gives for a veth.
const VETH_DRIVER_ADVICE: &str = "sf0 (driver veth): XDP in driver mode costs veth most of its \
                                  throughput (an empty XDP program: 16-24 % of none, \
                                  docs/benchmarks.md); use --mode tc here";

#[test]
fn check_says_which_mode_fits_each_interface() {
    require_root!();
    let pair = Pair::new();
    let r = run_check(&pair.local, &["--iface", Pair::LOCAL_IF, "--iface", "lo"]);
    assert_eq!(r.code, Some(0), "smtpflow check:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let line = |name: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{}", r.stdout))
            .to_owned()
    };
    let veth = line("mode sf0 ");
    assert!(
        veth.contains(" ok ") && veth.trim_end().ends_with(VETH_ADVICE),
        "the veth's line:\n{veth}\nin:\n{}",
        r.stdout
    );
    // Loopback: no driver the kernel names, and no advice against either mode.
    let lo = line("mode lo ");
    assert!(
        lo.contains(" ok ") && lo.contains("lo (driver unknown): either mode"),
        "loopback's line:\n{lo}\nin:\n{}",
        r.stdout
    );
}

/// The warning lines of a `watch` log that steer to tc.
fn steering(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("use --mode tc here")).collect()
}

/// `watch` with `args` attached XDP to `iface` as `method` says (its log and
/// `smtpflow_attachment_info`), and warned once with a line ending in `advice`.
fn assert_xdp_attached(w: &Watch, ns: &Netns, iface: &str, method: &str, advice: &str) {
    let log = w.stderr();
    assert!(log.contains(&format!("attached xdp on {iface} ({method})")), "{log}");
    let attached = [("iface", iface), ("hook", "xdp"), ("method", method)];
    let m = w.scrape(ns);
    assert_eq!(m.get(ATTACHMENT_INFO, &attached), Some(1.0), "not attached in {method}:\n{log}");
    let warned = steering(&log);
    assert_eq!(warned.len(), 1, "expected one warning steering to tc:\n{log}");
    assert!(warned[0].contains("WARN") && warned[0].trim_end().ends_with(advice), "{}", warned[0]);
}

#[test]
fn xdp_on_veth_warns_once_and_runs() {
    require_root!();
    let pair = Pair::new();
    let i = Pair::LOCAL_IF;
    // Generic mode, the default on a veth: no driver mode tried first.
    let w = Watch::start(&pair.local, i, &["--mode", "xdp"]);
    assert_hooked(&pair.local, i, &[("xdp", XDP)], &w);
    assert_xdp_attached(&w, &pair.local, i, "xdp generic mode", VETH_ADVICE);
    assert!(!w.stderr().contains("trying generic mode"), "{}", w.stderr());
    drop(w);

    // Driver mode when asked for (a veth supports it at the default MTU): the measured cost.
    assert_unhooked_within(&pair.local, i, FREE_TIMEOUT, "after the generic-mode watch");
    let w = Watch::start(&pair.local, i, &["--mode", "xdp", "--xdp-mode", "driver"]);
    assert_hooked(&pair.local, i, &[("xdp", XDP)], &w);
    assert_xdp_attached(&w, &pair.local, i, "xdp driver mode", VETH_DRIVER_ADVICE);
    drop(w);

    // At an MTU of 9000 a veth refuses driver mode: `--xdp-mode driver` fails and says what to
    // use; the default still attaches, in generic mode.
    assert_unhooked_within(&pair.local, i, FREE_TIMEOUT, "after the driver-mode watch");
    pair.local.ip(&["link", "set", i, "mtu", "9000"]);
    pair.peer.ip(&["link", "set", Pair::PEER_IF, "mtu", "9000"]);
    let args = ["--iface", i, "--mode", "xdp", "--xdp-mode", "driver"];
    let r = run_watch(&pair.local, &[], &args);
    r.assert_failed(
        &args.join(" "),
        &["sf0 refused XDP in driver mode", "--xdp-mode auto", "generic mode", "--mode tc"],
    );
    assert_unhooked(&pair.local, i, "after --xdp-mode driver was refused");
    let w = Watch::start(&pair.local, i, &["--mode", "xdp"]);
    assert_xdp_attached(&w, &pair.local, i, "xdp generic mode", VETH_ADVICE);
    drop(w);

    // tc mode: no such warning.
    let w = Watch::start(&pair.local, i, &[]);
    let log = w.stderr();
    assert!(steering(&log).is_empty(), "tc mode steered to tc:\n{log}");
}

/// A device with no native XDP (a bridge): `--mode xdp` tries driver mode, falls back to generic
/// and says so, and warns once; `--xdp-mode generic` goes there directly.
#[test]
fn xdp_falls_back_to_generic_without_native_xdp() {
    require_root!();
    let pair = Pair::new();
    let d = "sfd0";
    pair.local.ip(&["link", "add", d, "type", "bridge"]);
    pair.local.ip(&["link", "set", d, "up"]);
    let advice = |why: &str| {
        format!(
            "{d} (driver bridge): XDP runs in generic mode here ({why}): where tc runs, after the \
             socket buffer is built, and copying non-linear packets first, so it saves nothing \
             over tc and sees ingress only; use --mode tc here"
        )
    };
    let w = Watch::start(&pair.local, d, &["--mode", "xdp"]);
    assert_hooked(&pair.local, d, &[("xdp", XDP)], &w);
    assert!(
        w.stderr().contains(&format!("XDP driver mode is not available on {d}")),
        "{}",
        w.stderr()
    );
    assert_xdp_attached(&w, &pair.local, d, "xdp generic mode", &advice("no native XDP"));
    drop(w);

    assert_unhooked_within(&pair.local, d, FREE_TIMEOUT, "after the fallback watch");
    let w = Watch::start(&pair.local, d, &["--mode", "xdp", "--xdp-mode", "generic"]);
    assert!(!w.stderr().contains("XDP driver mode is not available"), "{}", w.stderr());
    assert_xdp_attached(&w, &pair.local, d, "xdp generic mode", &advice("--xdp-mode generic"));
}

// ---------------------------------------------------------------------------------------------
// 7: the HTTP endpoint.

#[test]
fn http_endpoints() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, Pair::LOCAL_IF, &[]);
    let req = |method: &str, path: &str| {
        http::request(&pair.local, &w.addr, method, path)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };

    let r = req("GET", "/healthz");
    assert_eq!((r.status, r.body.trim()), (200, "ok"), "GET /healthz: {r:?}");

    let r = req("GET", "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.head());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain") && t.contains("version=0.0.4")),
        "GET /metrics content type: {}",
        r.head()
    );
    assert!(r.body.contains(BUILD_INFO), "no smtpflow_build_info in /metrics:\n{}", r.body);

    for path in ["/", "/nope", "/metrics/x", "/healthzz"] {
        let r = req("GET", path);
        assert_eq!(r.status, 404, "GET {path}: {}\n{}", r.head(), r.body);
    }

    for (method, path) in [("POST", "/metrics"), ("PUT", "/metrics"), ("POST", "/healthz")] {
        let r = req(method, path);
        assert_eq!(r.status, 405, "{method} {path}: {}\n{}", r.head(), r.body);
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}: {}", r.head());
    }

    let r = req("HEAD", "/metrics");
    assert_eq!(r.status, 200, "HEAD /metrics: {}", r.head());
    assert!(r.body.is_empty(), "HEAD /metrics has a body: {:?}", r.body);
}
