//! The hardening contract, part 6: a spoofed-source SYN flood (hping3) against the real
//! `smtpflow watch` binary: bounded memory and series, exact totals.
//!
//! Numbers worth reading (RSS, flood rate, scrape latencies) are printed on stderr: run with
//! `--nocapture` to see them.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use smtpflow_common::{PayloadEvent, payload::PAYLOAD_RING_BYTES};
use smtpflow_tests::{
    Pair, Watch,
    expect::ev,
    hooks::assert_unhooked,
    http::{scrape, timed_scrape},
    names::{
        EVENTS, LOST, MALFORMED, MAP_CAPACITY, MAP_ENTRIES, MAP_EVICTIONS, PAYLOADS_LOST,
        PEER_INSERT_FAILURES, PEERS_EXPORTED, PEERS_TRACKED,
    },
    netfilter::{nft_ingress_counter, nft_ingress_packets},
    process::{Process, installed},
    procfs::{iface_stat, lru_room, status_kib},
    report, require_root,
    smtpflow::METRICS_ADDR,
    wait_for,
};

const SF0: &str = Pair::LOCAL_IF;

/// Peak RSS smtpflow may reach under the flood (its maps live in the kernel; userspace holds one
/// snapshot of the 65,536 peers and 262,144 flows at a time).
const RSS_BOUND_MIB: u64 = 128;
/// The flood stops once this many SYNs crossed sf0 (a million distinct sources), or after
/// FLOOD_MAX_SECS.
const FLOOD_TARGET: u64 = 1_010_000;
const FLOOD_MAX_SECS: u64 = 45;

#[test]
fn spoofed_syn_flood_stays_bounded_and_exact() {
    require_root!();
    assert!(installed("hping3"), "hping3 is needed (cargo xtask setup installs it)");
    let pair = Pair::new();
    let ns = &pair.local;
    // The gateway has no listener on 25 and no route back to the spoofed sources: its RSTs are
    // dropped by routing before any device, so only the flood's own SYNs cross sf0.
    nft_ingress_counter(ns, SF0, "tcp dport 25 tcp flags & (syn | ack | rst) == syn", "syn25");
    let addr = METRICS_ADDR;
    // The production defaults: --interval 1s, --max-peers 65536, --max-flows 262144,
    // --max-peer-series 1000.
    let mut inst = Watch::launch(ns, &["--iface", SF0, "--metrics-addr", addr], addr);
    let pid = inst.pid();
    let rss_start = status_kib(pid, "VmRSS").unwrap_or(0);
    let rx_before = iface_stat(ns, SF0, "rx_packets");
    let nft_before = nft_ingress_packets(ns, "syn25");

    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sampler = thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(status_kib(pid, "VmRSS").unwrap_or(0));
            thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    // hping3 until a million distinct sources have crossed sf0 (the counter counts SYNs; random
    // 32-bit sources hardly repeat), or FLOOD_MAX_SECS.
    let mut hping = Process::build(&pair.peer, "timeout")
        .args(["-s", "INT", &FLOOD_MAX_SECS.to_string()])
        .args(["hping3", "--flood", "--rand-source", "-S", "-p", "25", Pair::LOCAL_V4])
        .capture_stdout()
        .spawn();
    // Scrape every second during the flood.
    let flood_start = Instant::now();
    let mut latencies = Vec::new();
    let mut most_series = 0;
    let mut biggest = 0;
    let mut reached = None;
    let status = loop {
        if let Some(code) = hping.try_wait() {
            break Some(code);
        }
        if flood_start.elapsed() > Duration::from_secs(FLOOD_MAX_SECS + 15) {
            break None;
        }
        let (status, took, size) = timed_scrape(ns, addr, Duration::from_secs(10));
        assert_eq!(status, 200, "a scrape failed during the flood after {took:?}");
        most_series = most_series.max(scrape(ns, addr).label_values("peer").len());
        biggest = biggest.max(size);
        latencies.push(took);
        if reached.is_none() && nft_ingress_packets(ns, "syn25") - nft_before >= FLOOD_TARGET {
            reached = Some(flood_start.elapsed());
            // `ip netns exec` execs timeout, which passes SIGINT on to hping3.
            hping.signal(libc::SIGINT);
        }
        thread::sleep(Duration::from_secs(1));
    };
    let hping_output = format!("{}\n{}", hping.stdout(), hping.stderr());
    drop(hping);
    assert!(status.is_some(), "hping3 did not stop");
    let flood_time = flood_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sampled_peak = sampler.join().unwrap();
    let transmitted: Option<u64> = hping_output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());

    // Exact: smtpflow's inbound SYN total equals what crossed sf0's ingress.
    let syn = ev(SF0, "inbound", "syn", "peer");
    let mut last = (0, 0);
    let exact = wait_for(Duration::from_secs(30), || {
        let counted = scrape(ns, addr).sum(EVENTS, &syn);
        let crossed = nft_ingress_packets(ns, "syn25") - nft_before;
        last = (counted, crossed);
        (counted == crossed && crossed > 0).then_some(())
    });
    thread::sleep(Duration::from_secs(3));
    let m = scrape(ns, addr);
    let counted = m.sum(EVENTS, &syn);
    let crossed = nft_ingress_packets(ns, "syn25") - nft_before;
    let rx = iface_stat(ns, SF0, "rx_packets") - rx_before;
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    let evicted = m.get(MAP_EVICTIONS, &[("map", "peers")]).unwrap_or(0.0) as u64;
    let entries = m.get(MAP_ENTRIES, &[("map", "peers")]).unwrap_or(0.0) as u64;
    let capacity = m.get(MAP_CAPACITY, &[("map", "peers")]).unwrap_or(0.0) as u64;
    let inserts = evicted + entries;
    let exported = m.get(PEERS_EXPORTED, &[]).unwrap_or(-1.0);
    let tracked = m.get(PEERS_TRACKED, &[]).unwrap_or(-1.0);
    let insert_failures = m.sum(PEER_INSERT_FAILURES, &[]);
    let flow_evictions = m.sum(MAP_EVICTIONS, &[("map", "flows")]);
    // Our RSTs have no route back to spoofed sources: none should leave (egress, side local).
    let rst_local = m.sum(EVENTS, &[("side", "local"), ("event", "rst")]);
    latencies.sort();
    let secs = flood_time.as_secs_f64();
    // Expected repeats among n random 32-bit sources: n^2 / 2^33.
    let repeats = (counted as f64).powi(2) / 2f64.powi(33);
    eprintln!(
        "flood: hping3 sent {transmitted:?} SYNs in {secs:.1} s (target {FLOOD_TARGET} reached \
         after {reached:?}); {crossed} crossed sf0's ingress \
         ({:.0}/s; rx_packets +{rx}), smtpflow counted {counted}; distinct sources about {inserts} \
         (peer-map inserts = evictions {evicted} + entries {entries}/{capacity}; ~{repeats:.0} \
         repeats expected); peers tracked {tracked}, exported {exported}, at most {most_series} \
         peer labels in a scrape; insert failures {insert_failures}; flow evictions \
         {flow_evictions}; RSTs sent by the gateway {rst_local}",
        crossed as f64 / secs
    );
    eprintln!(
        "flood: RSS {} KiB at start, sampled peak {sampled_peak} KiB, VmHWM {hwm} KiB (bound {} \
         KiB); scrape latency min {:?}, median {:?}, max {:?}, biggest body {biggest} bytes",
        rss_start,
        RSS_BOUND_MIB * 1024,
        latencies.first().copied().unwrap_or_default(),
        latencies.get(latencies.len() / 2).copied().unwrap_or_default(),
        latencies.last().copied().unwrap_or_default(),
    );
    assert!(
        exact.is_some(),
        "smtpflow counted {} inbound SYNs, sf0's ingress saw {}",
        last.0,
        last.1
    );
    assert_eq!(counted, crossed, "inbound SYNs: smtpflow vs sf0's ingress counter");
    assert!(counted > 100_000, "the flood was too small to mean anything: {counted}");
    if reached.is_some() {
        assert!(inserts >= 1_000_000, "a million distinct sources expected: {inserts}");
    } else {
        report::weakened(
            "hardening_flood::spoofed_syn_flood_stays_bounded_and_exact",
            &format!(
                "this machine did not reach {FLOOD_TARGET} SYNs in {FLOOD_MAX_SECS} s: the million \
                 distinct sources were not checked"
            ),
        );
    }
    assert!(hwm < RSS_BOUND_MIB * 1024, "peak RSS {hwm} KiB over {RSS_BOUND_MIB} MiB");
    assert!(latencies.last().unwrap() < &Duration::from_secs(2), "slow scrapes: {latencies:?}");
    assert!(most_series <= 1000, "{most_series} peer labels exported (cap 1000)");
    // The kernel map holds --max-peers, and the LRU's room besides (README, "Map sizes").
    let room = lru_room();
    assert!(
        exported <= 1000.0 && tracked <= (capacity + room) as f64,
        "exported {exported}, tracked {tracked}"
    );
    assert_eq!(capacity, 65536);
    assert!(evicted > 0, "no per-peer evictions counted after {counted} distinct sources");
    assert!(entries <= capacity + room, "{entries} peer entries, capacity {capacity} + {room}");
    // Each insert is a source seen for the first time (or again after its eviction): at most one
    // per SYN, and all but the rare repeated random source.
    assert!(inserts <= counted, "more peer inserts ({inserts}) than SYNs ({counted})");
    assert!(
        inserts as f64 >= counted as f64 * 0.99 - repeats,
        "peer inserts {inserts} far below the {counted} random sources"
    );
    assert_eq!(m.sum(LOST, &[]), 0);
    assert_eq!(m.sum(MALFORMED, &[]), 0);
    assert!(inst.try_wait().is_none(), "smtpflow died under the flood:\n{}", inst.stderr());
    assert_eq!(inst.stop_with(libc::SIGTERM), Some(0), "{}", inst.stderr());
    assert_unhooked(ns, SF0, "after the flood");
}

/// Payload records the ring holds: each is an event and the ring's 8-byte record header.
const PAYLOAD_RING_RECORDS: u64 =
    PAYLOAD_RING_BYTES as u64 / (size_of::<PayloadEvent>() as u64 + 8);
/// Sessions sent while smtpflow is stopped: each carries at least three payload events (the
/// greeting, the client's HELO and its reply), so together more than twice what the ring holds.
const SESSIONS_WHILE_STOPPED: u64 = 2 * PAYLOAD_RING_RECORDS / 3 + 2_000;

/// The reports of `--log-level debug` in a real run: smtpflow stops reading (SIGSTOP) while
/// real SMTP sessions (smtp-source against smtp-sink) overflow the payload ring buffer; the lost
/// events are counted, and once it runs again the kernel's reports of the loss reach its log,
/// the 1st, 2nd, 4th, 8th… on each CPU, never one per lost event. The sessions' counts stay
/// exact meanwhile (the ring carries only payload events).
#[test]
fn a_full_payload_ring_is_counted_and_reported_at_debug() {
    require_root!();
    assert!(installed("smtp-source"), "smtp-source is needed (cargo xtask setup installs postfix)");
    let pair = Pair::new();
    let sink = smtpflow_tests::smtp::SmtpSink::start(&pair.local, "10.77.0.1:25", &[]);
    let w = Watch::start(&pair.local, SF0, &["--log-level", "debug"]);
    let syns = |w: &Watch| {
        w.scrape(&pair.local).sum(EVENTS, &[("event", "syn"), ("direction", "inbound")])
    };
    let before = syns(&w);

    w.signal(libc::SIGSTOP);
    let mut cmd = std::process::Command::new("ip");
    let messages = SESSIONS_WHILE_STOPPED.to_string();
    cmd.args(["netns", "exec", &pair.peer.name, "smtp-source", "-s", "20", "-m", &messages]);
    cmd.arg(format!("{}:25", Pair::LOCAL_V4));
    let sent = smtpflow_tests::process::run_bounded(cmd, Duration::from_secs(240));
    w.signal(libc::SIGCONT);
    assert_eq!(
        sent.code,
        Some(0),
        "smtp-source: {}{}\n{}",
        sent.stdout,
        sent.stderr,
        sink.stderr()
    );

    // Every session's SYN counted, the payload events beyond the ring's room counted as lost.
    let m = wait_for(Duration::from_secs(60), || {
        let m = w.scrape(&pair.local);
        let syn = m.sum(EVENTS, &[("event", "syn"), ("direction", "inbound")]);
        (syn - before >= SESSIONS_WHILE_STOPPED && m.sum(PAYLOADS_LOST, &[]) > 0).then_some(m)
    })
    .unwrap_or_else(|| panic!("no loss counted:\n{}", w.stderr()));
    let lost = m.sum(PAYLOADS_LOST, &[]);
    assert!(m.get(PAYLOADS_LOST, &[]).is_some(), "the series exists");
    assert!(lost >= SESSIONS_WHILE_STOPPED * 3 - 2 * PAYLOAD_RING_RECORDS, "lost {lost}");
    assert_eq!(m.sum(LOST, &[]), 0, "no count lost, only payload events");

    // The reports: "#n" for n a power of two, at most one run of them a CPU.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let reported = || -> Vec<u64> {
        let log = w.stderr();
        log.lines()
            .filter(|l| l.contains("] kernel: PAYLOADS ring full: a payload event lost, #"))
            .map(|l| l.rsplit('#').next().and_then(|n| n.trim().parse().ok()).expect("#n"))
            .collect()
    };
    let counts = wait_for(Duration::from_secs(30), || {
        let r = reported();
        (!r.is_empty()).then_some(r)
    })
    .unwrap_or_else(|| panic!("no report of the loss in the log:\n{}", w.stderr()));
    let firsts = counts.iter().filter(|&&n| n == 1).count() as u64;
    assert!((1..=cpus).contains(&firsts), "one first report a CPU: {counts:?}");
    assert!(counts.iter().all(|n| n.is_power_of_two() && *n <= lost), "{counts:?} of {lost}");
    let per_cpu_most = u64::from(lost.ilog2()) + 1;
    assert!(counts.len() as u64 <= cpus * per_cpu_most, "{} reports of {lost}", counts.len());
    eprintln!(
        "payload ring: {SESSIONS_WHILE_STOPPED} sessions while stopped, {lost} events lost, {} \
         kernel reports: {counts:?}",
        counts.len()
    );
}
