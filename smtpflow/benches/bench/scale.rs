//! Benchmark 4: userspace at scale. The real `smtpflow watch` with its per-peer map filled
//! through its own attached program (BPF_PROG_TEST_RUN on the program found on the interface,
//! one SYN from a spoofed source per run, as if received there), then its drain time, scrape
//! time, CPU and peak RSS; at the default series cap and at 10,000 exported peer series. Last,
//! a prototype of the proposed drain (batched lookups, keeping only the top peers) timed on the
//! same full map.
use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::IpAddr,
    os::fd::AsFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{HashMap, Map, MapData, MapInfo},
    programs::{SchedClassifier, tc::TcAttachType},
};
use smtpflow_common::{PeerCounters, PeerKey};
use smtpflow_tests::{Netns, Pair, in_netns};

use crate::{
    Check, Params, Report, Section, alloc_count, batch,
    frames::Tcp,
    sys::{self, Smtpflow, median},
};

/// A SYN from the `i`-th spoofed peer (100.64.0.0/10) to the gateway's port 25.
fn spoofed_syn(i: u32) -> Vec<u8> {
    let [_, b, c, d] = i.to_be_bytes();
    let src = IpAddr::from([100, 64 | (b & 0x3f), c, d]);
    Tcp::syn(src, 40000, Pair::LOCAL_V4.parse().expect("v4"), 25).frame()
}

/// The running smtpflow's TC ingress program on the gateway's interface, its PEERS map id, and
/// the interface index.
fn find_program(gw: &Netns) -> anyhow::Result<(aya::programs::ProgramFd, u32, u32)> {
    in_netns(gw, || -> anyhow::Result<_> {
        let (_, progs) = SchedClassifier::query_tcx(Pair::LOCAL_IF, TcAttachType::Ingress)
            .context("querying the TCX programs")?;
        let info = progs
            .into_iter()
            .find(|p| p.name_as_str() == Some("smtpflow_tc_in"))
            .context("smtpflow_tc_in is not attached")?;
        let peers = info
            .map_ids()?
            .unwrap_or_default()
            .into_iter()
            .find(|id| MapInfo::from_id(*id).is_ok_and(|m| m.name_as_str() == Some("PEERS")))
            .context("the program has no PEERS map")?;
        let name = std::ffi::CString::new(Pair::LOCAL_IF)?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        Ok((info.fd()?, peers, ifindex))
    })
}

/// Test-runs `n` spoofed SYNs through the program as if received on `ifindex`.
fn fill(gw: &Netns, prog: aya::programs::ProgramFd, ifindex: u32, n: u32) -> anyhow::Result<()> {
    in_netns(gw, move || -> anyhow::Result<()> {
        for i in 0..n {
            sys::test_run_skb(prog.as_fd(), &spoofed_syn(i), ifindex)
                .with_context(|| format!("test run {i}"))?;
        }
        Ok(())
    })
}

/// Polls /metrics until `smtpflow_peers_tracked` reaches `n`, or stops growing for longer than
/// a couple of drains (the LRU map may keep fewer than `n`).
fn wait_tracked(sf: &Smtpflow, gw: &Netns, n: u32) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = -1.0;
    let mut stable_since = Instant::now();
    loop {
        let (body, _) = sf.scrape(gw)?;
        let tracked = sys::metric(&body, "smtpflow_peers_tracked", "").unwrap_or(0.0);
        let drain = sys::metric(&body, "smtpflow_drain_duration_seconds", "").unwrap_or(0.0);
        if tracked >= f64::from(n) {
            return Ok(tracked);
        }
        if tracked != last {
            last = tracked;
            stable_since = Instant::now();
        }
        let settle = Duration::from_secs_f64((2.5 * (drain + 1.0)).max(3.0));
        if tracked > 0.0 && stable_since.elapsed() >= settle {
            return Ok(tracked);
        }
        if Instant::now() >= deadline {
            bail!("smtpflow tracked only {tracked} of {n} peers after 180s");
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// What the proposed drain would cost on a full map: (time, peak heap, entries).
struct Proto {
    secs: f64,
    heap: usize,
    entries: usize,
    syscalls: usize,
}

/// Today's drain of the per-peer map: aya's iterator (two syscalls per entry) into a Vec.
fn per_key(map: &HashMap<MapData, PeerKey, PeerCounters>) -> anyhow::Result<Proto> {
    let base = alloc_count::reset_peak();
    let t = Instant::now();
    let all: Vec<(PeerKey, PeerCounters)> = map.iter().filter_map(Result::ok).collect();
    let secs = t.elapsed().as_secs_f64();
    let heap = alloc_count::peak() - base;
    Ok(Proto { secs, heap, entries: all.len(), syscalls: all.len() * 2 + 1 })
}

/// The proposal: batched lookups, keeping only the `cap` most active entries.
fn batched_top(map: &HashMap<MapData, PeerKey, PeerCounters>, cap: usize) -> anyhow::Result<Proto> {
    use aya::maps::IterableMap as _;
    let base = alloc_count::reset_peak();
    let t = Instant::now();
    let mut top: BinaryHeap<Reverse<(u64, PeerKey)>> = BinaryHeap::with_capacity(cap + 1);
    let stats = batch::for_each::<PeerKey, PeerCounters>(
        map.map().fd().as_fd(),
        batch::DEFAULT_CHUNK,
        |k, v| {
            top.push(Reverse((v.total(), *k)));
            if top.len() > cap {
                top.pop();
            }
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    let heap = alloc_count::peak() - base;
    Ok(Proto { secs, heap, entries: stats.entries, syscalls: stats.syscalls })
}

pub fn run(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let (sizes, caps, window): (&[u32], &[usize], f64) = if p.smoke {
        (&[2_000], &[1_000], 1.0)
    } else {
        (&[10_000, 100_000, 1_000_000], &[1_000, 10_000], 4.0)
    };
    let largest = *sizes.last().expect("sizes");
    let pair = sys::pair();
    let gw = &pair.local;
    let mut sec = Section::new(
        "4. Userspace scale: the real binary with N peers tracked",
        &[
            "peers filled",
            "tracked",
            "--max-peer-series",
            "series exported",
            "drain (s)",
            "scrape (ms, median)",
            "body",
            "CPU (% of one core)",
            "peak RSS",
        ],
    );
    let mut proto_map = None;
    for &n in sizes {
        for &cap in caps {
            let max_peers = n.next_power_of_two().max(65_536).to_string();
            let cap_s = cap.to_string();
            let sf = Smtpflow::start(
                &p.bin,
                gw,
                &[
                    "--iface",
                    Pair::LOCAL_IF,
                    "--max-peers",
                    &max_peers,
                    "--max-peer-series",
                    &cap_s,
                    "--status-every",
                    "0s",
                ],
            )?;
            let (prog, peers_id, ifindex) = find_program(gw)?;
            let t = Instant::now();
            fill(gw, prog, ifindex, n)?;
            let fill_secs = t.elapsed().as_secs_f64();
            let tracked = wait_tracked(&sf, gw, n)?;
            // Steady state: drains of the full map, scrapes in between.
            let cpu0 = sys::cpu_ns(sf.pid());
            let t0 = Instant::now();
            thread::sleep(Duration::from_secs_f64(window));
            let cpu = (sys::cpu_ns(sf.pid()) - cpu0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
            let mut scrapes = Vec::new();
            let mut drains = Vec::new();
            let mut body = String::new();
            for _ in 0..5 {
                let (b, took) = sf.scrape(gw)?;
                scrapes.push(took.as_secs_f64() * 1000.0);
                drains.push(sys::metric(&b, "smtpflow_drain_duration_seconds", "").unwrap_or(0.0));
                body = b;
            }
            let exported =
                body.lines().filter(|l| l.starts_with("smtpflow_peer_tcp_events_total{")).count();
            let drain = drains.iter().copied().fold(0.0, f64::max);
            let scrape = median(&mut scrapes);
            let (hwm, _) = sys::rss(sf.pid());
            let hwm_mib = hwm as f64 / 1048576.0;
            sec.rows.push(vec![
                format!("{n}"),
                format!("{tracked:.0}"),
                cap_s.clone(),
                exported.to_string(),
                format!("{drain:.3}"),
                format!("{scrape:.1}"),
                format!("{:.0} KiB", body.len() as f64 / 1024.0),
                format!("{:.1}%", cpu * 100.0),
                format!("{hwm_mib:.1} MiB"),
            ]);
            eprintln!("bench: scale {n} peers, cap {cap}: filled in {fill_secs:.1}s");
            if cap == 1_000 {
                let pass = scrape <= 20.0;
                report.checks.push(Check {
                    what: format!("scrape with 1,000 peer series ≤ 20 ms ({n} peers tracked)"),
                    value: format!("{scrape:.1} ms"),
                    pass,
                });
            }
            if n == largest && cap == caps[0] {
                report.checks.push(Check {
                    what: format!("drain of a full {n}-entry map ≤ 1 s"),
                    value: format!("{drain:.2} s"),
                    pass: drain <= 1.0,
                });
                report.checks.push(Check {
                    what: format!("peak RSS ≤ 64 MiB with {n} peers tracked"),
                    value: format!("{hwm_mib:.0} MiB"),
                    pass: hwm_mib <= 64.0,
                });
                // Keep the map (our descriptor keeps it alive) for the prototype, measured
                // after smtpflow has exited so that the two do not compete for the CPUs.
                proto_map = Some((MapData::from_id(peers_id)?, cap));
            }
            drop(sf);
        }
    }
    sec.note = format!(
        "Each row is a fresh `smtpflow watch --max-peers <next power of two, at least 65536>` \
         (drain every 1s), its per-peer map filled by test-running one spoofed SYN per peer \
         through its attached program; then {window}s of steady state. Drain is the largest \
         `smtpflow_drain_duration_seconds` seen, scrape is GET /metrics (connect to last byte), \
         CPU is all threads' on-CPU time over the window, peak RSS is VmHWM."
    );
    report.add(sec);

    if let Some((data, cap)) = proto_map {
        let map: HashMap<MapData, PeerKey, PeerCounters> =
            HashMap::try_from(Map::LruHashMap(data)).context("the PEERS map")?;
        let today = per_key(&map)?;
        let proposed = batched_top(&map, cap)?;
        let mut sec = Section::new(
            "4b. Draining the same full per-peer map: today vs proposed",
            &["method", "entries", "syscalls", "time (s)", "heap peak"],
        );
        for (name, r) in [
            ("aya iterator into a Vec (today's drain.rs)", today),
            ("BPF_MAP_LOOKUP_BATCH, 4096 a call, top-N kept (batch.rs)", proposed),
        ] {
            sec.rows.push(vec![
                name.to_owned(),
                r.entries.to_string(),
                r.syscalls.to_string(),
                format!("{:.3}", r.secs),
                format!("{:.1} MiB", r.heap as f64 / 1048576.0),
            ]);
        }
        sec.note = format!(
            "Measured in the benchmark process on the map of the {largest}-peer run (kept open \
             after smtpflow exited), top {cap} by `PeerCounters::total`."
        );
        report.add(sec);
    }
    Ok(())
}
