//! Benchmark 2: the live path. iperf3 (server on port 25, so every segment is SMTP traffic to
//! smtpflow) over the test harness's veth pair, with no observer, smtpflow in tc and xdp mode,
//! and `tcpdump -w` of `tcp port 25`; then the kernel's own per-program accounting under the
//! same load, read from smtpflow's `smtpflow_ebpf_program_*` metrics.
use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use smtpflow_tests::{
    Metrics, Netns, Pair, Watch,
    json::Json,
    names::{PROGRAM_RUN_SECONDS, PROGRAM_RUNS},
    process::Process,
};

use crate::{
    Check, Params, Report, Section,
    sys::{self, median},
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Observer {
    None,
    EmptyTc,
    Tc,
    EmptyXdp,
    Xdp,
    Tcpdump,
}

impl Observer {
    const ALL: [Observer; 6] = [
        Observer::None,
        Observer::EmptyTc,
        Observer::Tc,
        Observer::EmptyXdp,
        Observer::Xdp,
        Observer::Tcpdump,
    ];

    fn label(self) -> &'static str {
        match self {
            Observer::None => "no observer",
            Observer::EmptyTc => "empty TC programs (TCX ingress + egress)",
            Observer::Tc => "smtpflow --mode tc",
            Observer::EmptyXdp => "empty XDP program (driver mode)",
            Observer::Xdp => "smtpflow --mode xdp",
            Observer::Tcpdump => "tcpdump -w /dev/null 'tcp port 25'",
        }
    }
}

/// A running observer; stopped (detached) on drop.
enum Running {
    None,
    Smtpflow(Watch),
    Tcpdump(Process),
    #[allow(dead_code, reason = "held only to keep the empty programs attached")]
    Empty(aya::Ebpf),
}

/// Attaches the empty programs where smtpflow's would be (in the gateway namespace).
fn attach_empty(gw: &Netns, xdp: bool) -> anyhow::Result<Running> {
    let ebpf = crate::empty::load()?;
    let ebpf = smtpflow_tests::in_netns(gw, move || -> anyhow::Result<aya::Ebpf> {
        let mut ebpf = ebpf;
        if xdp {
            let p: &mut aya::programs::Xdp =
                ebpf.program_mut(crate::empty::EMPTY_XDP).context("empty_xdp")?.try_into()?;
            p.attach(Pair::LOCAL_IF, aya::programs::XdpMode::Driver)?;
        } else {
            let p: &mut aya::programs::SchedClassifier =
                ebpf.program_mut(crate::empty::EMPTY_TC).context("empty_tc")?.try_into()?;
            for t in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
                p.attach(Pair::LOCAL_IF, t)?;
            }
        }
        Ok(ebpf)
    })?;
    Ok(Running::Empty(ebpf))
}

fn start(gw: &Netns, o: Observer, extra: &[&str]) -> anyhow::Result<Running> {
    let smtpflow = |mode| -> anyhow::Result<Running> {
        let mut args = vec!["--iface", Pair::LOCAL_IF, "--mode", mode, "--status-every", "0s"];
        args.extend_from_slice(extra);
        Ok(Running::Smtpflow(sys::watch(gw, &args)?))
    };
    match o {
        Observer::None => Ok(Running::None),
        Observer::EmptyTc => attach_empty(gw, false),
        Observer::EmptyXdp => attach_empty(gw, true),
        Observer::Tc => smtpflow("tc"),
        Observer::Xdp => smtpflow("xdp"),
        Observer::Tcpdump => {
            let mut t = Process::build(gw, "tcpdump")
                .args(["-i", Pair::LOCAL_IF, "-n", "-w", "/dev/null", "tcp port 25"])
                .try_spawn()?;
            t.try_wait_ready(Duration::from_secs(10), |t| t.stderr().contains("listening on"))
                .context("tcpdump did not start")?;
            Ok(Running::Tcpdump(t))
        }
    }
}

/// One iperf3 run from the peer to the gateway's port 25: received bits per second.
fn iperf(peer: &Netns, secs: u32, omit: u32) -> anyhow::Result<f64> {
    let t = secs.to_string();
    let o = omit.to_string();
    let mut c = Process::build(peer, "iperf3")
        .args(["-c", Pair::LOCAL_V4, "-p", "25", "-t", &t, "-O", &o, "-J"])
        .args(["--connect-timeout", "3000"])
        .capture_stdout()
        .try_spawn()?;
    let timeout = Duration::from_secs(u64::from(secs + omit) + 20);
    let code = c
        .wait_exit(timeout)
        .with_context(|| format!("iperf3 did not finish within {timeout:?}"))?;
    let out = c.stdout();
    if code != Some(0) {
        bail!("iperf3 failed (exit code {code:?}): {}{}", out, c.stderr());
    }
    let json: Json =
        out.parse().map_err(|e| anyhow::anyhow!("iperf3 output is not JSON ({e}): {out}"))?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no sum_received in iperf3 output: {out}"))
}

/// Whether the iperf3 server on the gateway accepts connections from the peer.
fn accepts(peer: &Netns) -> bool {
    smtpflow_tests::in_netns(peer, || {
        std::net::TcpStream::connect_timeout(
            &format!("{}:25", Pair::LOCAL_V4).parse().expect("addr"),
            Duration::from_millis(200),
        )
        .is_ok()
    })
}

pub fn run(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let (rounds, secs, omit) = if p.smoke { (1, 1, 0) } else { (5, 2, 1) };
    let pair = sys::pair();
    let (gw, peer) = (&pair.local, &pair.peer);
    let mut server = Process::build(gw, "iperf3").args(["-s", "-p", "25"]).try_spawn()?;
    server
        .try_wait_ready(Duration::from_secs(10), |_| accepts(peer))
        .context("the iperf3 server did not start")?;
    // Throughput with stats accounting off (the production default).
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); Observer::ALL.len()];
    let mut tcpdump_drops = String::new();
    for _ in 0..rounds {
        for (i, o) in Observer::ALL.into_iter().enumerate() {
            let running = start(gw, o, &[])?;
            let bps = iperf(peer, secs, omit)?;
            server.running()?;
            results[i].push(bps);
            if let Running::Tcpdump(mut t) = running {
                t.stop();
                let err = t.stderr();
                let pick = |what: &str| {
                    err.lines().find(|l| l.contains(what)).map(|l| l.trim().to_owned())
                };
                tcpdump_drops = [pick("captured"), pick("dropped by kernel")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ");
            }
        }
    }
    let mut s = Section::new(
        "2. Live path: iperf3 over veth, server on port 25",
        &["observer", "Gbit/s (median)", "runs (Gbit/s)", "ratio to none", "target", ""],
    );
    for (i, o) in Observer::ALL.into_iter().enumerate() {
        let m = median(&mut results[i].clone());
        // Each run against the no-observer run of the same round: slow drifts of the machine
        // (other work on it) cancel better than between medians.
        let mut ratios: Vec<f64> =
            results[i].iter().zip(&results[0]).map(|(x, none)| x / none).collect();
        let ratio = median(&mut ratios);
        let runs = results[i].iter().map(|b| format!("{:.1}", b / 1e9)).collect::<Vec<_>>();
        let (target, verdict) = if matches!(o, Observer::Tc | Observer::Xdp) {
            let pass = ratio >= 0.97;
            report.checks.push(Check {
                what: format!("iperf3 with {} ≥ 97% of no observer", o.label()),
                value: format!("{:.1}%", ratio * 100.0),
                pass,
            });
            ("≥ 97%", if pass { "pass" } else { "MISS" })
        } else {
            ("", "")
        };
        s.rows.push(vec![
            o.label().to_owned(),
            format!("{:.2}", m / 1e9),
            runs.join(", "),
            format!("{:.1}%", ratio * 100.0),
            target.to_owned(),
            verdict.to_owned(),
        ]);
    }
    s.note = format!(
        "{rounds} round(s) of {secs}s each (after {omit}s omitted), the cases interleaved; the \
         ratio is the median over rounds of each run / that round's no-observer run. \
         tcpdump writes to /dev/null (no disk cost; with a file it can only be slower); its last \
         run: {tcpdump_drops}."
    );
    report.add(s);

    // The kernel's own accounting under the same load: BPF_ENABLE_STATS held only for this.
    let mut s = Section::new(
        "2b. Kernel per-program accounting under iperf3 load (run_time_ns / run_cnt)",
        &["mode", "program", "runs/s", "ns/run", "CPU (% of one core)"],
    );
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    for (mode, o) in [("tc", Observer::Tc), ("xdp", Observer::Xdp)] {
        // A short drain interval so that the scrapes around the run are fresh.
        let Running::Smtpflow(sf) = start(gw, o, &["--interval", "100ms"])? else { unreachable!() };
        thread::sleep(Duration::from_millis(300));
        let before = sf.try_scrape(gw)?;
        let started = Instant::now();
        iperf(peer, secs, omit)?;
        let wall = started.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(300));
        let after = sf.try_scrape(gw)?;
        let progs: &[&str] =
            if mode == "tc" { &["smtpflow_tc_in", "smtpflow_tc_out"] } else { &["smtpflow_xdp"] };
        for prog in progs {
            let get = |m: &Metrics, name| m.get(name, &[("program", prog)]).unwrap_or(0.0);
            let runs = get(&after, PROGRAM_RUNS) - get(&before, PROGRAM_RUNS);
            let secs_in = get(&after, PROGRAM_RUN_SECONDS) - get(&before, PROGRAM_RUN_SECONDS);
            if after.get(PROGRAM_RUNS, &[("program", prog)]).is_none() {
                bail!("smtpflow exported no {PROGRAM_RUNS} for {prog}");
            }
            s.rows.push(vec![
                mode.to_owned(),
                (*prog).to_owned(),
                format!("{:.0}", runs / wall),
                format!("{:.1}", if runs > 0.0 { secs_in * 1e9 / runs } else { 0.0 }),
                format!("{:.2}%", secs_in / wall * 100.0),
            ]);
        }
    }
    drop(stats_fd);
    s.note = "From smtpflow's own `smtpflow_ebpf_program_runs_total` and \
              `smtpflow_ebpf_program_run_seconds_total` (scraped before and after one iperf3 run), \
              with accounting enabled through a BPF_ENABLE_STATS descriptor held by the benchmark \
              (the same kernel accounting as `kernel.bpf_stats_enabled=1`, dropped when the \
              descriptor closes; the sysctl itself is never changed). The accounting's own two \
              clock reads per run are included in ns/run."
        .to_owned();
    report.add(s);
    drop(server);
    Ok(())
}
