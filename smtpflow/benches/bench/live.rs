//! Benchmark 2: the live path. iperf3 (server on port 25, so every segment is SMTP traffic to
//! smtpflow) over the test harness's veth pair, with no observer, smtpflow in tc and xdp mode,
//! and `tcpdump -w` of `tcp port 25`; then the kernel's own per-program accounting under the
//! same load, smtpflow's programs against empty programs of the same types.
use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use smtpflow_tests::{Netns, Pair, Watch, json::Json, process::Process};

use crate::{
    Check, Floor, Params, Report, Section,
    accounting::{self, Cost},
    empty,
    sys::{self, median, median_ratio},
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Observer {
    None,
    EmptyTc,
    Tc,
    /// The empty XDP program in driver mode: what `--xdp-mode driver` costs veth.
    EmptyXdpDriver,
    /// The empty XDP program in generic mode, as smtpflow attaches on veth: where tc runs,
    /// after the socket buffer is built.
    EmptyXdp,
    Xdp,
    /// smtpflow in driver-mode XDP (`--xdp-mode driver`), where `--mode xdp` attached on veth
    /// before generic mode became its default there: no target, shown beside it.
    XdpDriver,
    Tcpdump,
}

impl Observer {
    const ALL: [Observer; 8] = [
        Observer::None,
        Observer::EmptyTc,
        Observer::Tc,
        Observer::EmptyXdpDriver,
        Observer::EmptyXdp,
        Observer::Xdp,
        Observer::XdpDriver,
        Observer::Tcpdump,
    ];

    fn label(self) -> &'static str {
        match self {
            Observer::None => "no observer",
            Observer::EmptyTc => "empty TC programs (TCX ingress + egress)",
            Observer::Tc => "smtpflow --mode tc",
            Observer::EmptyXdpDriver => "empty XDP program (driver mode)",
            Observer::EmptyXdp => "empty XDP program (generic mode, as smtpflow on veth)",
            Observer::Xdp => "smtpflow --mode xdp",
            Observer::XdpDriver => "smtpflow --mode xdp --xdp-mode driver",
            Observer::Tcpdump => "tcpdump -w /dev/null 'tcp port 25'",
        }
    }
}

/// A running observer; stopped (detached) on drop.
enum Running {
    None,
    #[allow(dead_code, reason = "held only to keep smtpflow running")]
    Smtpflow(Watch),
    Tcpdump(Process),
    #[allow(dead_code, reason = "held only to keep the empty programs attached")]
    Empty(empty::Attached),
}

fn start(gw: &Netns, o: Observer) -> anyhow::Result<Running> {
    let smtpflow = |flags: &[&str]| Ok(Running::Smtpflow(sys::watch(gw, flags)?));
    match o {
        Observer::None => Ok(Running::None),
        Observer::EmptyTc => Ok(Running::Empty(empty::attach_tc(gw, Pair::LOCAL_IF)?)),
        Observer::EmptyXdpDriver => {
            Ok(Running::Empty(empty::attach_xdp(gw, Pair::LOCAL_IF, XdpMode::Driver)?))
        }
        Observer::EmptyXdp => {
            Ok(Running::Empty(empty::attach_xdp(gw, Pair::LOCAL_IF, empty::SMTPFLOW_XDP_MODE)?))
        }
        Observer::Tc => smtpflow(&["--mode", "tc"]),
        Observer::Xdp => smtpflow(&["--mode", "xdp"]),
        Observer::XdpDriver => smtpflow(&["--mode", "xdp", "--xdp-mode", "driver"]),
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
            let running = start(gw, o)?;
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
    // Each run against the no-observer run of the same round.
    let ratio_of = |i: usize| median_ratio(&results[i], &results[0]);
    let target = 0.97;
    let index = |o: Observer| Observer::ALL.iter().position(|&x| x == o).expect("listed");
    for (i, o) in Observer::ALL.into_iter().enumerate() {
        let m = median(&mut results[i].clone());
        let ratio = ratio_of(i);
        let runs = results[i].iter().map(|b| format!("{:.1}", b / 1e9)).collect::<Vec<_>>();
        let (target, verdict) = if matches!(o, Observer::Tc | Observer::Xdp) {
            let pass = ratio >= target;
            // What the hook alone keeps, in the same mode: more than any observer there can.
            let empty = if o == Observer::Xdp { Observer::EmptyXdp } else { Observer::EmptyTc };
            report.checks.push(Check {
                what: format!("iperf3 with {} ≥ 97% of no observer", o.label()),
                value: format!("{:.1}%", ratio * 100.0),
                pass,
                floor: Some(Floor::rate("empty program", ratio_of(index(empty)), target)),
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

    accounting_under_load(gw, peer, secs, omit, report)?;
    drop(server);
    Ok(())
}

/// One iperf3 run with accounting on and `running` attached: what each program hooked to the
/// gateway's interface did, and the run's wall time.
fn accounted_iperf(
    gw: &Netns,
    peer: &Netns,
    secs: u32,
    omit: u32,
) -> anyhow::Result<(accounting::Reading, f64)> {
    // Let the attachment settle (smtpflow's first drain), then count one run.
    thread::sleep(Duration::from_millis(300));
    let before = accounting::read(gw, Pair::LOCAL_IF)?;
    let started = Instant::now();
    iperf(peer, secs, omit)?;
    let wall = started.elapsed().as_secs_f64();
    let after = accounting::read(gw, Pair::LOCAL_IF)?;
    Ok((after.since(&before), wall))
}

/// Section 2b: the kernel's own accounting (`run_time_ns / run_cnt`) of smtpflow's programs
/// under iperf3 load, against empty programs of the same types. TC: the empty program is
/// attached beside smtpflow's (TCX runs both on every packet), so both are counted over the very
/// same packets. XDP: an interface has one XDP program, so the empty one has its own run just
/// before smtpflow's.
fn accounting_under_load(
    gw: &Netns,
    peer: &Netns,
    secs: u32,
    omit: u32,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut s = accounting::section(
        "2b. Kernel per-program accounting under iperf3 load (run_time_ns / run_cnt)",
        "mode",
    );
    // Accounting only for this section: BPF_ENABLE_STATS held until the end of the function.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let target = 1.5;

    let sf = start(gw, Observer::Tc)?;
    let beside = empty::attach_tc(gw, Pair::LOCAL_IF)?;
    let (tc, wall) = accounted_iperf(gw, peer, secs, omit)?;
    drop((beside, sf));
    for (hook, prog) in [("ingress", "smtpflow_tc_in"), ("egress", "smtpflow_tc_out")] {
        let what = format!("iperf3 load: {prog} ns/run (TC {hook})");
        let cells = accounting::versus(
            report,
            what,
            tc.get(hook, prog)?,
            tc.get(hook, empty::EMPTY_TC)?,
            wall,
            target,
        )?;
        let label = format!("{} (TCX {hook}, same run)", empty::EMPTY_TC);
        s.rows.push([vec!["tc".to_owned(), prog.to_owned(), label], cells].concat());
    }

    // The floor of any observer that reads the headers, in a run of its own: beside smtpflow it
    // would find the header lines smtpflow's program had just brought into the cache.
    let headers = empty::attach_tc_program(gw, Pair::LOCAL_IF, empty::HEADERS_TC)?;
    let beside = empty::attach_tc(gw, Pair::LOCAL_IF)?;
    let (reads, wall) = accounted_iperf(gw, peer, secs, omit)?;
    drop((beside, headers));
    for (hook, prog) in [("ingress", "smtpflow_tc_in"), ("egress", "smtpflow_tc_out")] {
        let (headers, bare) =
            (reads.get(hook, empty::HEADERS_TC)?, reads.get(hook, empty::EMPTY_TC)?);
        let cells = accounting::floor(&format!("header reads, TC {hook}"), headers, bare, wall)?;
        // Beside smtpflow's check on the same hook.
        report.set_floor(
            &format!("iperf3 load: {prog} ns/run (TC {hook})"),
            Floor::ratio("header reads", headers.per_run() / bare.per_run(), target),
        );
        let label = format!("{} (TCX {hook}, same run)", empty::EMPTY_TC);
        let row = vec!["tc, no smtpflow".to_owned(), empty::HEADERS_TC.to_owned(), label];
        s.rows.push([row, cells].concat());
    }

    let empty_xdp: Cost = {
        let _attached = empty::attach_xdp(gw, Pair::LOCAL_IF, empty::SMTPFLOW_XDP_MODE)?;
        accounted_iperf(gw, peer, secs, omit)?.0.get("xdp", empty::EMPTY_XDP)?
    };
    let sf = start(gw, Observer::Xdp)?;
    let (xdp, wall) = accounted_iperf(gw, peer, secs, omit)?;
    drop(sf);
    let cells = accounting::versus(
        report,
        "iperf3 load: smtpflow_xdp ns/run".to_owned(),
        xdp.get("xdp", "smtpflow_xdp")?,
        empty_xdp,
        wall,
        target,
    )?;
    let label = format!("{} (the run before)", empty::EMPTY_XDP);
    s.rows.push([vec!["xdp".to_owned(), "smtpflow_xdp".to_owned(), label], cells].concat());

    s.note = "The kernel's own accounting (`run_cnt`, `run_time_ns` of `bpf_prog_info`, read \
              before and after one iperf3 run for every program hooked to the gateway's \
              interface), enabled through a BPF_ENABLE_STATS descriptor held by the benchmark \
              (the same kernel accounting as `kernel.bpf_stats_enabled=1`, dropped when the \
              descriptor closes; the sysctl itself is never changed). TC: the empty program is \
              attached through TCX beside smtpflow's on the same hook, in the same run, so both \
              are counted over the same packets. XDP: an interface holds one XDP program, so the \
              empty one is measured in its own iperf3 run right before smtpflow's, in generic \
              mode as smtpflow on veth. The \
              accounting's own two clock reads per run are in both figures. `headers_tc`, in a \
              run of its own with the empty program beside it: a program that reads the \
              Ethernet type, IPv4's version and protocol and the TCP ports, and returns, the \
              floor of any observer that filters on ports (beside smtpflow it would find the \
              header lines already in the cache)."
        .to_owned();
    report.add(s);
    Ok(())
}
