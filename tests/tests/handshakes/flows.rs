//! The flow map under pressure: evictions counted exactly, and never a phantom one.
use std::{net::SocketAddr, thread, time::Duration};

use smtpflow_tests::{
    Pair, Watch, expect, http,
    names::{
        EVENTS, FLOW_INSERT_FAILURES, HANDSHAKES, MAP_CAPACITY, MAP_ENTRIES, MAP_EVICTIONS, RESETS,
        RETRANSMITS,
    },
    netfilter::{nft_counter, nft_drop_syns, nft_table},
    require_root, smtp,
    smtpflow::METRICS_ADDR,
};

use crate::{IF, series::*};

/// A flow table for 8 flows (`--max-flows 8`: 2 sets of 8 ways, twice the flows it is sized
/// for) and a burst of attempts whose SYNs nftables drops, more than all of it, so that no flow
/// is ever deleted: every flow beyond what the table holds overwrites one. Exactly: evictions
/// = SYNs seen (the nft counter; one per attempt, the clients give up before the first
/// retransmission) minus the flows left, and only the flows still in the table can time out.
/// The flows left are read from the kernel's table itself with bpftool.
#[test]
fn tc_flow_map_evictions() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, IF, &["--max-flows", "8", "--handshake-timeout", "1s"]);
    nft_table(&pair.local);
    nft_drop_syns(&pair.local, "input", 25, "in25");

    // The table's ways: 2 sets of 8.
    let room = 8;
    let k = 8 + room as usize + 64;
    let results =
        smtp::attempts(&pair.peer, &addr(Pair::LOCAL_V4, 25), k, Duration::from_millis(400));
    assert!(results.iter().all(|r| *r == Err(std::io::ErrorKind::TimedOut)), "{results:?}");
    // One SYN per attempt: the clients gave up before any retransmission (checked, not assumed:
    // a retransmission of a flow still in the map would be no new entry).
    let syns = nft_counter(&pair.local, "in25");
    assert_eq!(syns, k as u64, "a SYN was retransmitted within 400 ms");
    // Settle first on what does not depend on the entries left, then read them.
    w.expect_settled(&pair.local, &[total(MAP_CAPACITY, &[("map", "flows")], 8)]);
    let left = smtpflow_tests::wait_for(Duration::from_secs(10), || {
        let m = w.scrape(&pair.local);
        let timeouts = m.sum(HANDSHAKES, &[("outcome", "timeout")]);
        let entries = m.sum(MAP_ENTRIES, &[("map", "flows")]);
        (timeouts > 0 && timeouts == entries).then_some(entries)
    })
    .expect("the flows left in the map time out");
    let kernel_entries = flow_map_entries(w.pid());
    eprintln!("SYNs {syns}, flows left {left} (bpftool: {kernel_entries})");
    assert_eq!(left, kernel_entries, "smtpflow's entry count is the kernel map's");
    assert!(left <= 8 + room && left < syns, "{left} flows left of {syns}");

    let i = "inbound";
    let mut expected = vec![
        total(MAP_EVICTIONS, &[("map", "flows")], syns - left),
        total(MAP_ENTRIES, &[("map", "flows")], left),
        outcome(i, "25", "timeout", left),
        total(HANDSHAKES, &[], left),
        // Every SYN was a new attempt: none is a retransmission.
        total(RETRANSMITS, &[], 0),
        drops(i, "25", "NETFILTER_DROP", syns),
    ];
    expected.extend(healthy());
    w.expect_settled(&pair.local, &expected);
}

/// Flows in the flow table of the smtpflow process `pid`, read with bpftool (the map ids a
/// process holds are in its /proc fdinfo): the ways whose tag holds a flow (odd; 0 is free), a
/// set's eight tags being its `FLOW_TAGS` value's 64 bytes, little-endian.
fn flow_map_entries(pid: u32) -> u64 {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo");
    let ids: Vec<String> = fds
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines().find_map(|l| l.strip_prefix("map_id:").map(|v| v.trim().to_owned()))
        })
        .collect();
    for id in ids {
        let show = std::process::Command::new("bpftool")
            .args(["map", "show", "id", &id])
            .output()
            .expect("bpftool");
        if !String::from_utf8_lossy(&show.stdout).contains("name FLOW_TAGS ") {
            continue;
        }
        let dump = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "id", &id])
            .output()
            .expect("bpftool");
        let sets: serde_json::Value = serde_json::from_slice(&dump.stdout)
            .unwrap_or_else(|e| panic!("bpftool's dump is not JSON ({e})"));
        let byte = |b: &serde_json::Value| {
            let hex = b.as_str().and_then(|h| h.strip_prefix("0x")).expect("a hex byte");
            u8::from_str_radix(hex, 16).expect("a hex byte")
        };
        return sets
            .as_array()
            .expect("a list of sets")
            .iter()
            .map(|set| {
                let value: Vec<u8> =
                    set["value"].as_array().expect("a value").iter().map(byte).collect();
                value[..64]
                    .chunks(8)
                    .filter(|tag| u64::from_le_bytes((*tag).try_into().unwrap()) & 1 == 1)
                    .count() as u64
            })
            .sum();
    }
    panic!("smtpflow (pid {pid}) holds no FLOW_TAGS map");
}

/// Many short connections, each reset by its client right after the handshake, while smtpflow
/// drains every 10 ms: every flow is deleted by its RST, none is ever evicted (the map holds
/// 262144), so `smtpflow_map_evictions_total{map="flows"}` must stay 0.
///
/// It does not, now and then: the drain counts the live flow entries, then reads the kernel's
/// insert and delete counters, and estimates evictions = inserts - deletes - live. A flow
/// inserted between the two reads is in the inserts but not in the live count, so the estimate
/// is one too high; and as the estimate only ever grows (`max` with the previous one), the
/// phantom eviction stays forever. (Peer evictions are estimated the same way.)
#[test]
fn tc_flow_evictions_not_overcounted() {
    require_root!();
    let pair = Pair::new();
    // The harness drains every 100 ms; this needs 10 ms, so it starts smtpflow itself.
    let metrics = METRICS_ADDR;
    let args = ["--iface", IF, "--metrics-addr", metrics, "--interval", "10ms"];
    let _smtpflow = Watch::launch(&pair.local, &args, metrics);
    let scrape = || {
        let r = http::get(&pair.local, metrics, "/metrics").map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        Ok(smtpflow_tests::Metrics::parse(&r.body))
    };

    const N: usize = 2500;
    const CLIENTS: usize = 2;
    let listener = smtp::listen(&pair.local, &addr(Pair::LOCAL_V4, 25), 512);
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let target: SocketAddr = addr(Pair::LOCAL_V4, 25).parse().unwrap();
    thread::scope(|s| {
        // Accepts (and closes) whatever arrives until the clients are done.
        let server = s.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                if listener.accept().is_err() {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    smtpflow_tests::in_netns(&pair.peer, move || {
                        for _ in 0..N {
                            let c = std::net::TcpStream::connect_timeout(
                                &target,
                                Duration::from_secs(5),
                            )
                            .expect("connect");
                            smtp::linger_zero(&c);
                        }
                    })
                })
            })
            .collect();
        let done: Vec<_> = clients.into_iter().map(|c| c.join()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().expect("server");
        assert!(done.iter().all(|r| r.is_ok()), "a client failed");
    });
    let n = (N * CLIENTS) as u64;
    let expected = [
        outcome("inbound", "25", "established", n),
        total(MAP_ENTRIES, &[("map", "flows")], 0),
        total(FLOW_INSERT_FAILURES, &[], 0),
        total(MAP_EVICTIONS, &[("map", "flows")], 0),
    ];
    // Wait until the traffic is all counted, then check (a phantom eviction never goes away).
    let counted = smtpflow_tests::wait_for(Duration::from_secs(10), || {
        scrape().ok().filter(|m| m.sum(HANDSHAKES, &[]) == n)
    });
    if counted.is_none() {
        eprintln!("the {n} handshakes were not all counted within 10s; checking anyway");
    }
    thread::sleep(Duration::from_millis(200));
    let m = scrape().expect("scrape");
    let mut wrong = expect::mismatches(&m, &expected);
    // Every RST seen is a reset of some phase (their number depends on close races).
    let (rsts, resets) = (m.sum(EVENTS, &[("event", "rst")]), m.sum(RESETS, &[]));
    if rsts < n || rsts != resets {
        wrong.push(format!("{rsts} RST events, {resets} resets, {n} connections"));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
