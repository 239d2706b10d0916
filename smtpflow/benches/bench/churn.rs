//! Benchmark 3: connection churn. A SYN generator (AF_PACKET in the peer namespace, real
//! checksums) against a listener on the gateway's port 25: the gateway answers every SYN with a
//! SYN-ACK and the peer's kernel resets it, so each SYN is a whole short-lived attempt (SYN in,
//! SYN-ACK out, RST in) for smtpflow. First the rate the gateway keeps (SYN-ACKs it sends per
//! second) under a flood from 65,536 and from 1,000,000 spoofed sources, without smtpflow and
//! with it in tc and in xdp mode, and the kernel's per-program accounting during the same flood,
//! smtpflow's programs against empty programs of the same types; then smtpflow's own CPU and
//! peak RSS at a paced 10,000 SYN/s.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use smtpflow_tests::{Netns, Pair, Watch, frames::RawSocket, in_netns, procfs::iface_stat};

use crate::{
    Check, Floor, Params, Report, Section, accounting, empty,
    frames::{self, Tcp},
    sys::{self, median, median_ratio},
};

/// Peers the generator sends from: 10.128.0.0/12 (1,048,576 addresses), routed to the peer
/// namespace, which owns the whole range (a `local` route), so it resets the gateway's SYN-ACKs.
/// Not 10.64.0.0/12: that holds the pair's own 10.77.0.0/24, which the peer would then take for
/// its own.
const PEER_NET: &str = "10.128.0.0/12";
/// The first address of [`PEER_NET`]; peer `i` is this plus `i`.
const PEER_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Distinct sources of the floods: as many as smtpflow's default per-peer map holds, and a
/// million (every SYN of a flood then comes from a peer smtpflow has not seen).
const FLOOD_SOURCES: [u32; 2] = [65_536, 1_000_000];

/// Sends SYNs from `peers` distinct addresses (at most 2^20, the size of [`PEER_NET`]; and
/// ever-changing source ports) for `duration`, at `rate` per second or as fast as possible.
/// Returns how many were sent.
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
            let src = (PEER_BASE + peer).to_be_bytes();
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
        Tcp::syn("10.128.0.1".parse().expect("v4"), 1024, Pair::LOCAL_V4.parse().expect("v4"), 25);
    t.src_mac = Pair::mac(&pair.peer, Pair::PEER_IF);
    t.dst_mac = Pair::mac(&pair.local, Pair::LOCAL_IF);
    let template = t.frame();
    Ok(Setup { pair, _listener: listener, template })
}

/// Floods from `sources` peers for `secs`; returns the SYN-ACKs per second the gateway sent.
fn flood(s: &Setup, sources: u32, secs: f64) -> anyhow::Result<f64> {
    let sock = RawSocket::try_open(&s.pair.peer, Pair::PEER_IF)?;
    let tx0 = iface_stat(&s.pair.local, Pair::LOCAL_IF, "tx_packets");
    let started = Instant::now();
    generate(
        &sock,
        &s.template,
        sources,
        None,
        Duration::from_secs_f64(secs),
        &AtomicBool::new(false),
    );
    // Let the last SYNs be answered.
    thread::sleep(Duration::from_millis(100));
    let tx1 = iface_stat(&s.pair.local, Pair::LOCAL_IF, "tx_packets");
    Ok((tx1 - tx0) as f64 / started.elapsed().as_secs_f64())
}

/// Who watches the gateway's interface during a flood. The empty programs are the floor of
/// the hooks themselves: what any observer attached there costs the gateway before it does any
/// work, so that smtpflow's ratio can be read against what is reachable at all.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Observer {
    None,
    Smtpflow(&'static str),
    /// smtpflow with its per-peer counts through the per-peer log (`--peer-counts log`): no
    /// target, shown beside the default.
    SmtpflowLog(&'static str),
    /// smtpflow in driver-mode XDP (`--xdp-mode driver`), where `--mode xdp` attached on veth
    /// before generic mode became its default there: no target, shown beside it.
    SmtpflowXdpDriver,
    EmptyTc,
    /// The empty XDP program in generic mode, as smtpflow attaches on veth: where tc runs,
    /// after the socket buffer is built.
    EmptyXdp,
    /// The empty XDP program in driver mode: what `--xdp-mode driver` costs veth.
    EmptyXdpDriver,
    /// A floor program of [`empty`] attached to TCX ingress and egress: the direct-mapped
    /// tables' ([`empty::TABLES_TC`]) or the per-CPU log's ([`empty::LOG_TC`]).
    FloorTc(&'static str),
    /// A floor program of [`empty`] in generic-mode XDP ([`empty::TABLES_XDP`],
    /// [`empty::LOG_XDP`]).
    FloorXdp(&'static str),
}

/// The floors flooded and accounted, TC and XDP program of each: the direct-mapped tables', then
/// the per-CPU log's.
const FLOORS: [(&str, &str); 2] =
    [(empty::TABLES_TC, empty::TABLES_XDP), (empty::LOG_TC, empty::LOG_XDP)];

impl Observer {
    const ALL: [Observer; 13] = [
        Observer::None,
        Observer::Smtpflow("tc"),
        Observer::Smtpflow("xdp"),
        Observer::SmtpflowLog("tc"),
        Observer::SmtpflowLog("xdp"),
        Observer::SmtpflowXdpDriver,
        Observer::EmptyTc,
        Observer::EmptyXdp,
        Observer::EmptyXdpDriver,
        Observer::FloorTc(FLOORS[0].0),
        Observer::FloorXdp(FLOORS[0].1),
        Observer::FloorTc(FLOORS[1].0),
        Observer::FloorXdp(FLOORS[1].1),
    ];

    fn label(self) -> String {
        match self {
            Observer::None => "no observer".to_owned(),
            Observer::Smtpflow(mode) => format!("smtpflow --mode {mode}"),
            Observer::SmtpflowLog(mode) => format!("smtpflow --mode {mode} --peer-counts log"),
            Observer::SmtpflowXdpDriver => "smtpflow --mode xdp --xdp-mode driver".to_owned(),
            Observer::EmptyTc => format!("{} (TCX ingress and egress)", empty::EMPTY_TC),
            Observer::EmptyXdp => {
                format!("{} (generic mode, as smtpflow on veth)", empty::EMPTY_XDP)
            }
            Observer::EmptyXdpDriver => format!("{} (driver mode)", empty::EMPTY_XDP),
            Observer::FloorTc(name) => format!("{name} (TCX ingress and egress)"),
            Observer::FloorXdp(name) => format!("{name} (generic mode)"),
        }
    }
}

/// What an observer holds while it watches (smtpflow's process, or the empty programs);
/// stopped when dropped.
#[derive(Default)]
struct Watching {
    _smtpflow: Option<Watch>,
    _empty: Option<empty::Attached>,
}

/// Starts `o` on the gateway's interface.
fn start(gw: &Netns, o: Observer) -> anyhow::Result<Watching> {
    let floor = |attached| Ok(Watching { _smtpflow: None, _empty: Some(attached) });
    match o {
        Observer::None => Ok(Watching::default()),
        Observer::Smtpflow(mode) => {
            Ok(Watching { _smtpflow: Some(sys::watch(gw, &["--mode", mode])?), _empty: None })
        }
        Observer::SmtpflowLog(mode) => {
            let flags = ["--mode", mode, "--peer-counts", "log"];
            Ok(Watching { _smtpflow: Some(sys::watch(gw, &flags)?), _empty: None })
        }
        Observer::SmtpflowXdpDriver => {
            let flags = ["--mode", "xdp", "--xdp-mode", "driver"];
            Ok(Watching { _smtpflow: Some(sys::watch(gw, &flags)?), _empty: None })
        }
        Observer::EmptyTc => floor(empty::attach_tc(gw, Pair::LOCAL_IF)?),
        Observer::EmptyXdp => {
            floor(empty::attach_xdp(gw, Pair::LOCAL_IF, empty::SMTPFLOW_XDP_MODE)?)
        }
        Observer::EmptyXdpDriver => floor(empty::attach_xdp(gw, Pair::LOCAL_IF, XdpMode::Driver)?),
        Observer::FloorTc(name) => floor(empty::attach_tc_program(gw, Pair::LOCAL_IF, name)?),
        Observer::FloorXdp(name) => {
            floor(empty::attach_xdp_program(gw, Pair::LOCAL_IF, name, empty::SMTPFLOW_XDP_MODE)?)
        }
    }
}

/// How long each flood lasts and how often each observer's is repeated.
struct Floods {
    secs: f64,
    rounds: usize,
    /// The length of the floods counted by the kernel's accounting (one each).
    accounted_secs: f64,
}

/// The SYN-ACK rate under a flood from `sources` peers, each observer in turn, `rounds` times:
/// per observer (in [`Observer::ALL`]'s order), the rate of every round.
fn rates(s: &Setup, sources: u32, f: &Floods) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut runs = vec![Vec::new(); Observer::ALL.len()];
    for _ in 0..f.rounds {
        for (i, o) in Observer::ALL.into_iter().enumerate() {
            let watching = start(&s.pair.local, o)?;
            runs[i].push(flood(s, sources, f.secs)?);
            drop(watching);
        }
    }
    Ok(runs)
}

/// Section 3's rows of one source count, with a check per smtpflow mode: the median over
/// rounds of each run's rate / the same round's rate without an observer (drifts of a shared
/// machine cancel better so than between medians).
fn rate_rows(sources: u32, runs: &[Vec<f64>], report: &mut Report, sec: &mut Section) {
    let target = 0.95;
    let ratios: Vec<f64> = runs.iter().map(|rates| median_ratio(rates, &runs[0])).collect();
    // The floors of a mode beside a smtpflow check: the better of the two designs' floors,
    // with what the hook alone keeps.
    let floor_of = |mode: &str| {
        let of_mode = |o: Observer| match o {
            Observer::FloorTc(name) if mode == "tc" => Some(name),
            Observer::FloorXdp(name) if mode == "xdp" => Some(name),
            _ => None,
        };
        let (name, best) = Observer::ALL
            .into_iter()
            .zip(&ratios)
            .filter_map(|(o, &r)| of_mode(o).map(|name| (name, r)))
            .fold(("", 0.0), |best, (name, r)| if r > best.1 { (name, r) } else { best });
        let hook = if mode == "tc" { Observer::EmptyTc } else { Observer::EmptyXdp };
        let mut floor = Floor::rate(name, best, target);
        if let Some((_, bare)) = Observer::ALL.into_iter().zip(&ratios).find(|&(o, _)| o == hook) {
            floor.what += &format!(" (empty {:.1}%)", bare * 100.0);
        }
        floor
    };
    for ((o, rates), &ratio) in Observer::ALL.into_iter().zip(runs).zip(&ratios) {
        let (target, verdict) = match o {
            Observer::None
            | Observer::SmtpflowLog(_)
            | Observer::SmtpflowXdpDriver
            | Observer::EmptyTc
            | Observer::EmptyXdp
            | Observer::EmptyXdpDriver
            | Observer::FloorTc(_)
            | Observer::FloorXdp(_) => ("", ""),
            Observer::Smtpflow(mode) => {
                let pass = ratio >= target;
                report.checks.push(Check {
                    what: format!(
                        "SYN flood from {sources} sources: SYN-ACK rate with smtpflow --mode \
                         {mode} ≥ 95% of no observer"
                    ),
                    value: format!("{:.1}%", ratio * 100.0),
                    pass,
                    floor: Some(floor_of(mode)),
                });
                ("≥ 95%", if pass { "pass" } else { "MISS" })
            }
        };
        let list = rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
        sec.rows.push(vec![
            sources.to_string(),
            o.label(),
            format!("{:.0}", median(&mut rates.clone())),
            list,
            format!("{:.1}%", ratio * 100.0),
            target.to_owned(),
            verdict.to_owned(),
        ]);
    }
}

/// One flood with accounting on: what each program hooked to the gateway's interface did, and
/// the wall time between the two readings.
fn accounted_flood(
    s: &Setup,
    sources: u32,
    secs: f64,
) -> anyhow::Result<(accounting::Reading, f64)> {
    let gw = &s.pair.local;
    // Let the attachment settle (smtpflow's first drain), then count one flood.
    thread::sleep(Duration::from_millis(300));
    let before = accounting::read(gw, Pair::LOCAL_IF)?;
    let started = Instant::now();
    flood(s, sources, secs)?;
    let after = accounting::read(gw, Pair::LOCAL_IF)?;
    Ok((after.since(&before), started.elapsed().as_secs_f64()))
}

/// The cells of one of smtpflow's programs against the empty one, `(ours, empty)`: as it runs
/// by default (`suffix` empty) with its target and a check in `report`; with the flags `suffix`
/// names (`--peer-counts log`), without a target.
fn cost_cells(
    report: &mut Report,
    what: String,
    suffix: &str,
    (ours, empty): (accounting::Cost, accounting::Cost),
    wall: f64,
    target: f64,
) -> anyhow::Result<Vec<String>> {
    if suffix.is_empty() {
        accounting::versus(report, what, ours, empty, wall, target)
    } else {
        accounting::floor(&format!("{what}{suffix}"), ours, empty, wall)
    }
}

/// Section 3a's rows of one source count: smtpflow's programs' ns/run during the flood against
/// empty programs of the same types. TC: the empty program beside smtpflow's on each TCX hook,
/// in the same flood. XDP: one program per interface, so the empty one floods right before.
fn accounting_rows(
    s: &Setup,
    sources: u32,
    f: &Floods,
    report: &mut Report,
    sec: &mut Section,
) -> anyhow::Result<()> {
    let gw = &s.pair.local;
    let target = 4.0;
    // The default (a check each), then the per-peer log (`--peer-counts log`, no target).
    let log = ["--peer-counts", "log"];
    let runs: [(&[&str], &str); 2] = [(&[], ""), (&log, " --peer-counts log")];
    for (flags, suffix) in runs {
        let sf = sys::watch(gw, &[&["--mode", "tc"], flags].concat())?;
        let beside = empty::attach_tc(gw, Pair::LOCAL_IF)?;
        let (tc, wall) = accounted_flood(s, sources, f.accounted_secs)?;
        drop((beside, sf));
        for (hook, prog) in [("ingress", "smtpflow_tc_in"), ("egress", "smtpflow_tc_out")] {
            let what = format!("SYN flood from {sources} sources: {prog} ns/run (TC {hook})");
            let (ours, theirs) = (tc.get(hook, prog)?, tc.get(hook, empty::EMPTY_TC)?);
            let cells = cost_cells(report, what, suffix, (ours, theirs), wall, target)?;
            let label = format!("{} (TCX {hook}, same flood)", empty::EMPTY_TC);
            let row = vec![sources.to_string(), format!("{prog}{suffix}"), label];
            sec.rows.push([row, cells].concat());
        }
    }
    let empty_xdp = {
        let _attached = empty::attach_xdp(gw, Pair::LOCAL_IF, empty::SMTPFLOW_XDP_MODE)?;
        accounted_flood(s, sources, f.accounted_secs)?.0.get("xdp", empty::EMPTY_XDP)?
    };
    for (flags, suffix) in runs {
        let sf = sys::watch(gw, &[&["--mode", "xdp"], flags].concat())?;
        let (xdp, wall) = accounted_flood(s, sources, f.accounted_secs)?;
        drop(sf);
        let what = format!("SYN flood from {sources} sources: smtpflow_xdp ns/run");
        let costs = (xdp.get("xdp", "smtpflow_xdp")?, empty_xdp);
        let cells = cost_cells(report, what, suffix, costs, wall, target)?;
        let label = format!("{} (the flood before)", empty::EMPTY_XDP);
        let row = vec![sources.to_string(), format!("smtpflow_xdp{suffix}"), label];
        sec.rows.push([row, cells].concat());
    }

    // The floors, each in a flood of its own (beside smtpflow it would find its own slots
    // competing for the caches with smtpflow's maps): TC beside the empty program, XDP against
    // the empty program's flood above. Each program's floors go beside its check.
    let mut floors: [Vec<(&str, f64)>; 3] = Default::default(); // ingress, egress, XDP
    for (floor_tc, floor_xdp) in FLOORS {
        let floor = empty::attach_tc_program(gw, Pair::LOCAL_IF, floor_tc)?;
        let beside = empty::attach_tc(gw, Pair::LOCAL_IF)?;
        let (tc, wall) = accounted_flood(s, sources, f.accounted_secs)?;
        drop((beside, floor));
        for (i, hook) in ["ingress", "egress"].into_iter().enumerate() {
            let (floor, bare) = (tc.get(hook, floor_tc)?, tc.get(hook, empty::EMPTY_TC)?);
            let cells = accounting::floor(
                &format!("SYN flood from {sources} sources: {floor_tc} (TC {hook})"),
                floor,
                bare,
                wall,
            )?;
            floors[i].push((floor_tc, floor.per_run() / bare.per_run()));
            let label = format!("{} (TCX {hook}, same flood)", empty::EMPTY_TC);
            let row = vec![sources.to_string(), format!("{floor_tc} (no smtpflow)"), label];
            sec.rows.push([row, cells].concat());
        }
        let floor =
            empty::attach_xdp_program(gw, Pair::LOCAL_IF, floor_xdp, empty::SMTPFLOW_XDP_MODE)?;
        let (xdp, wall) = accounted_flood(s, sources, f.accounted_secs)?;
        drop(floor);
        let floor = xdp.get("xdp", floor_xdp)?;
        let cells = accounting::floor(
            &format!("SYN flood from {sources} sources: {floor_xdp}"),
            floor,
            empty_xdp,
            wall,
        )?;
        floors[2].push((floor_xdp, floor.per_run() / empty_xdp.per_run()));
        let label = format!("{} (the flood before smtpflow's)", empty::EMPTY_XDP);
        let row = vec![sources.to_string(), format!("{floor_xdp} (no smtpflow)"), label];
        sec.rows.push([row, cells].concat());
    }
    let programs = [
        "smtpflow_tc_in ns/run (TC ingress)",
        "smtpflow_tc_out ns/run (TC egress)",
        "smtpflow_xdp ns/run",
    ];
    for (prog, of_program) in programs.into_iter().zip(floors) {
        if let [a, b] = of_program[..] {
            let what = format!("SYN flood from {sources} sources: {prog}");
            report.set_floor(&what, Floor::least_ratio([a, b], target));
        }
    }
    Ok(())
}

/// Sections 3 and 3a: the floods.
fn floods(s: &Setup, f: &Floods, report: &mut Report) -> anyhow::Result<()> {
    let mut rate_sec = Section::new(
        "3. Connection churn: SYN-ACK rate the gateway keeps under a SYN flood",
        &["sources", "observer", "SYN-ACKs/s (median)", "runs", "ratio to none", "target", ""],
    );
    let mut cost_sec = accounting::section(
        "3a. Kernel per-program accounting during the SYN flood (run_time_ns / run_cnt)",
        "sources",
    );
    for sources in FLOOD_SOURCES {
        let runs = rates(s, sources, f)?;
        rate_rows(sources, &runs, report, &mut rate_sec);
        // Accounting only for these floods: the rates above are without it (its two clock
        // reads a program run would slow the path they measure).
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        accounting_rows(s, sources, f, report, &mut cost_sec)?;
    }
    rate_sec.note = format!(
        "AF_PACKET SYN flood from 65,536 and from 1,000,000 spoofed sources ({PEER_NET}) for \
         {}s per run, {} round(s) of no observer, smtpflow --mode tc, smtpflow --mode xdp \
         (generic mode on veth), each again with --peer-counts log (no target: the per-peer \
         counts through a log smtpflow adds up), --xdp-mode driver (no target: the mode it \
         attached in on veth before), the empty programs of each mode (the floor: what the \
         hooks cost with nothing in them; XDP in generic mode, as smtpflow attaches on veth, \
         and in driver mode), the tables' floor of each mode (`tables_tc`, `tables_xdp` in \
         generic mode: the header reads, then for a segment with SYN set one read-and-write of \
         its source's slot in a 65,536-slot peer table and one write of its 4-tuple's slot in a \
         262,144-slot flow table, the least a design with per-peer counters in kernel tables \
         does) and the log's floor of each mode (`log_tc`, `log_xdp`: the same header reads, \
         then for a segment with SYN set a 16-byte record appended to its CPU's log and the \
         same write of the flow table's slot, the least a design with per-peer counts added up \
         in userspace does), interleaved; the rate is the SYN-ACKs the gateway sent, the \
         ratio the median over rounds of each run / that round's no-observer run. Every SYN is \
         a new connection (SYN in, SYN-ACK out, RST in); with a million sources every SYN of a \
         run comes from a peer smtpflow has not seen. Sender and gateway share the machine's \
         cores, so this is the whole path's rate. Per-program accounting is off during these \
         runs.",
        f.secs, f.rounds
    );
    cost_sec.note = format!(
        "The kernel's own accounting (`run_cnt`, `run_time_ns` of `bpf_prog_info`, read before \
         and after one {}s flood for every program hooked to the gateway's interface), through \
         a BPF_ENABLE_STATS descriptor held by the benchmark. TC: the empty program is attached \
         through TCX beside smtpflow's on the same hook (ingress: SYN and RST; egress: SYN-ACK), \
         in the same flood, so both are counted over the same packets. XDP: an interface holds \
         one XDP program, so the empty one is measured in its own flood right before smtpflow's \
         (same sources, same length, generic mode as smtpflow on veth). smtpflow is measured \
         twice: as it runs by default (the targets), then with --peer-counts log (no target). \
         The tables' floor (`tables_tc`, `tables_xdp`) and the log's (`log_tc`, `log_xdp`) are \
         measured the same way, each in a flood of its own, without smtpflow; they have no \
         target. The accounting's own two clock reads per run are in both figures.",
        f.accounted_secs
    );
    report.add(rate_sec);
    report.add(cost_sec);
    Ok(())
}

pub fn run(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let (f, paced_secs) = if p.smoke {
        (Floods { secs: 0.5, rounds: 1, accounted_secs: 0.5 }, 1.5)
    } else {
        (Floods { secs: 4.0, rounds: 3, accounted_secs: 3.0 }, 10.0)
    };
    let s = setup()?;
    let gw = &s.pair.local;
    floods(&s, &f, report)?;

    // smtpflow's own cost at 10,000 SYN/s.
    let mut sec = Section::new(
        "3b. smtpflow's own cost at 10,000 SYN/s",
        &["peers", "SYNs answered/s", "smtpflow CPU (% of one core)", "peak RSS", "target", ""],
    );
    let log: &[&str] = &["--peer-counts", "log"];
    for (peers, flags) in [(1u32, &[][..]), (65536, &[]), (1, log), (65536, log)] {
        let sf = sys::watch(gw, flags)?;
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
        // The default has the target; the per-peer log is shown beside it.
        let (peers, target, verdict) = if flags.is_empty() {
            report.checks.push(Check {
                what: format!("smtpflow CPU ≤ 2% of one core at 10,000 SYN/s ({peers} peers)"),
                value: format!("{cpu:.2}%"),
                pass,
                floor: None,
            });
            (peers.to_string(), "≤ 2%", if pass { "pass" } else { "MISS" })
        } else {
            (format!("{peers} (--peer-counts log)"), "", "")
        };
        sec.rows.push(vec![
            peers,
            format!("{syn_rate:.0}"),
            format!("{cpu:.2}%"),
            format!("{rss_mib:.1} MiB"),
            target.into(),
            verdict.into(),
        ]);
        drop(sf);
    }
    sec.note = format!(
        "Paced generator (10,000 SYN/s) for {paced_secs}s after a 1s warm-up; default flags \
         (drain every 1s, 65,536 peer entries, 1,000 peer series), then the same with \
         --peer-counts log (no target: userspace adds up the per-peer log, so its CPU and memory \
         hold what the kernel's per-peer map did). CPU is every smtpflow thread's on-CPU time \
         (schedstat); peak RSS is VmHWM."
    );
    report.add(sec);
    Ok(())
}
