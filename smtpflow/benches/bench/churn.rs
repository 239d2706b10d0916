//! Benchmark 3: connection churn. A SYN generator (AF_PACKET in the peer namespace, real
//! checksums) against a listener on the gateway's port 25: the gateway answers every SYN with a
//! SYN-ACK and the peer's kernel resets it, so each SYN is a whole short-lived attempt (SYN in,
//! SYN-ACK out, RST in) for smtpflow. First the highest rate the gateway sustains (SYN-ACKs it
//! sends per second under a flood) with and without smtpflow; then smtpflow's own CPU and peak RSS
//! at a paced 10,000 SYN/s.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use smtpflow_tests::{Pair, frames::RawSocket, in_netns, procfs::iface_stat};

use crate::{
    Check, Params, Report, Section,
    frames::{self, Tcp},
    sys::{self, median},
};

/// Peers the generator sends from: 10.78.0.0/16, routed to the peer namespace, which owns the
/// whole range (a `local` route), so it resets the gateway's SYN-ACKs.
const PEER_NET: &str = "10.78.0.0/16";

/// Sends SYNs from `peers` distinct addresses (and ever-changing source ports) for `duration`,
/// at `rate` per second or as fast as possible. Returns how many were sent.
fn generate(
    sock: &RawSocket,
    template: &[u8],
    peers: u32,
    rate: Option<f64>,
    duration: Duration,
    stop: &AtomicBool,
) -> u64 {
    let mut frame = template.to_vec();
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration || stop.load(Ordering::Relaxed) {
            return sent;
        }
        let due = match rate {
            Some(r) => (elapsed.as_secs_f64() * r) as u64,
            None => sent + 256,
        };
        while sent < due {
            let i = sent as u32;
            let peer = i % peers;
            let sport = 1024 + ((i / peers) % 64000) as u16;
            let src = [10, 78, (peer >> 8) as u8, peer as u8];
            frames::set_v4_source(&mut frame, src, sport);
            if sock.send(&frame).is_err() {
                // ENOBUFS under a flood: try again.
                thread::yield_now();
                continue;
            }
            sent += 1;
        }
        if rate.is_some() {
            thread::sleep(Duration::from_micros(200));
        }
    }
}

struct Setup {
    pair: Pair,
    _listener: std::net::TcpListener,
    template: Vec<u8>,
}

fn setup() -> anyhow::Result<Setup> {
    let pair = sys::pair();
    pair.local.ip(&["route", "add", PEER_NET, "via", Pair::PEER_V4]);
    pair.peer.ip(&["route", "add", "local", PEER_NET, "dev", "lo"]);
    let listener = in_netns(&pair.local, || std::net::TcpListener::bind(("0.0.0.0", 25)))
        .context("listening on the gateway's port 25")?;
    let mut t =
        Tcp::syn("10.78.0.1".parse().expect("v4"), 1024, Pair::LOCAL_V4.parse().expect("v4"), 25);
    t.src_mac = Pair::mac(&pair.peer, Pair::PEER_IF);
    t.dst_mac = Pair::mac(&pair.local, Pair::LOCAL_IF);
    let template = t.frame();
    Ok(Setup { pair, _listener: listener, template })
}

/// Floods for `secs`; returns the SYN-ACKs per second the gateway sent.
fn flood(s: &Setup, secs: f64) -> anyhow::Result<f64> {
    let sock = RawSocket::try_open(&s.pair.peer, Pair::PEER_IF)?;
    let tx0 = iface_stat(&s.pair.local, Pair::LOCAL_IF, "tx_packets");
    let started = Instant::now();
    generate(
        &sock,
        &s.template,
        65536,
        None,
        Duration::from_secs_f64(secs),
        &AtomicBool::new(false),
    );
    // Let the last SYNs be answered.
    thread::sleep(Duration::from_millis(100));
    let tx1 = iface_stat(&s.pair.local, Pair::LOCAL_IF, "tx_packets");
    Ok((tx1 - tx0) as f64 / started.elapsed().as_secs_f64())
}

pub fn run(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let (flood_secs, rounds, paced_secs) = if p.smoke { (0.5, 1, 1.5) } else { (4.0, 2, 10.0) };
    let s = setup()?;
    let gw = &s.pair.local;
    let args = ["--iface", Pair::LOCAL_IF, "--status-every", "0s"];

    // Highest sustained rate, with and without smtpflow, interleaved.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        without.push(flood(&s, flood_secs)?);
        let sf = sys::watch(gw, &args)?;
        with.push(flood(&s, flood_secs)?);
        drop(sf);
    }
    let (without, with) = (median(&mut without), median(&mut with));
    let mut sec = Section::new(
        "3. Connection churn: SYN rate the gateway sustains",
        &["observer", "SYN-ACKs/s (median)", "ratio"],
    );
    sec.rows.push(vec!["no observer".into(), format!("{without:.0}"), "100%".into()]);
    sec.rows.push(vec![
        "smtpflow --mode tc".into(),
        format!("{with:.0}"),
        format!("{:.1}%", with / without * 100.0),
    ]);
    sec.note = format!(
        "AF_PACKET SYN flood from 65,536 peers ({PEER_NET}) for {flood_secs}s per run, {rounds} \
         run(s) each, interleaved; the rate is the SYN-ACKs the gateway sent. Sender and gateway \
         share the 2 cores, so this is the whole path's rate."
    );
    report.add(sec);

    // smtpflow's own cost at 10,000 SYN/s.
    let mut sec = Section::new(
        "3b. smtpflow's own cost at 10,000 SYN/s",
        &["peers", "SYNs answered/s", "smtpflow CPU (% of one core)", "peak RSS", "target", ""],
    );
    for peers in [1u32, 65536] {
        let sf = sys::watch(gw, &args)?;
        let sock = Arc::new(RawSocket::try_open(&s.pair.peer, Pair::PEER_IF)?);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let total = Duration::from_secs_f64(paced_secs + 1.5);
        let gen_thread = {
            let (sock, stop, sent, template) =
                (sock.clone(), stop.clone(), sent.clone(), s.template.clone());
            thread::spawn(move || {
                let n = generate(&sock, &template, peers, Some(10_000.0), total, &stop);
                sent.store(n, Ordering::Relaxed);
            })
        };
        // Skip the first second (map warm-up), then measure.
        thread::sleep(Duration::from_secs(1));
        let tx0 = iface_stat(gw, Pair::LOCAL_IF, "tx_packets");
        let cpu0 = sys::cpu_ns(sf.pid());
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(paced_secs));
        let cpu1 = sys::cpu_ns(sf.pid());
        let tx1 = iface_stat(gw, Pair::LOCAL_IF, "tx_packets");
        let wall = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        gen_thread.join().map_err(|_| anyhow::anyhow!("generator panicked"))?;
        let hwm = sys::peak_rss(sf.pid());
        // Every SYN is answered by one SYN-ACK.
        let syn_rate = (tx1 - tx0) as f64 / wall;
        let cpu = (cpu1 - cpu0) as f64 / 1e9 / wall * 100.0;
        let pass = cpu <= 2.0;
        let rss_mib = hwm as f64 / 1048576.0;
        report.checks.push(Check {
            what: format!("smtpflow CPU ≤ 2% of one core at 10,000 SYN/s ({peers} peers)"),
            value: format!("{cpu:.2}%"),
            pass,
        });
        sec.rows.push(vec![
            peers.to_string(),
            format!("{syn_rate:.0}"),
            format!("{cpu:.2}%"),
            format!("{rss_mib:.1} MiB"),
            "≤ 2%".into(),
            if pass { "pass" } else { "MISS" }.into(),
        ]);
        drop(sf);
    }
    sec.note = format!(
        "Paced generator (10,000 SYN/s) for {paced_secs}s after a 1s warm-up; default flags \
         (drain every 1s, 65,536 peer entries, 1,000 peer series). CPU is every smtpflow thread's \
         on-CPU time (schedstat); peak RSS is VmHWM."
    );
    report.add(sec);
    Ok(())
}
