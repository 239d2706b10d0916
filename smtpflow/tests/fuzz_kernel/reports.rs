//! The kernel programs' reports (aya-log, `--log-level debug`): a failure of their own
//! bookkeeping is counted in `STATS` and reported on its 1st, 2nd, 4th, 8th… time on a CPU; below
//! debug the count is the same and nothing is reported.
//!
//! The failure is a real one: `COUNTERS` is filled to capacity from userspace, and the test runs
//! come from the loopback device, which the configuration does not list (a state the loader
//! never makes: it lists every interface the programs run on), so each SYN's counter
//! has no place in the per-scope array and needs a new `COUNTERS` entry, which the full map
//! refuses with `E2BIG`. The thread is pinned to one CPU, so that every failure lands in one
//! per-CPU count and the reports are exactly those of the powers of two.
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use aya::{
    maps::{PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    util::nr_cpus,
};
use smtpflow::{
    drain::{peer_log::PeerLog, ring::RecordRing},
    kernel::{self, Sizes},
};
use smtpflow_common::{
    COUNTERS_CAPACITY, Config, Counter, CounterKey, DEFAULT_MAX_PEERS, Direction, DropConfig,
    Event, Scope, Side, Stat, names,
    peer::{PEER_LOG_BYTES, peer_counts},
    rules::tcp_flags::SYN,
};
use smtpflow_tests::{
    frames::{ETH_P_IP, Eth, IPPROTO_TCP, Ipv4, Tcp},
    require_root,
};

use super::{
    PLAINTEXT, PORTS,
    corpus::{MAC_GW, MAC_PEER, gw_v4, peer_v4},
    programs::kernel_available,
};

/// The watched interfaces: two that the test runs send nothing on, told apart by the low two
/// bits of their ifindex, which leave loopback's (1) with no scope.
const WATCHED: [u32; 2] = [2, 4];
/// aya-log's levels (as `log`'s): info 3, debug 4.
const INFO: u8 = 3;
const DEBUG: u8 = 4;

/// A log line: level, target, message.
type Line = (log::Level, String, String);

/// The log lines the programs' reports became.
#[derive(Default)]
struct Capture(Mutex<Vec<Line>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = (r.level(), r.target().to_owned(), r.args().to_string());
        self.0.lock().expect("not poisoned").push(line);
    }
    fn flush(&self) {}
}

/// Keeps the calling thread on the CPU it runs on; a test run runs on the caller's CPU.
fn pin_to_this_cpu() -> anyhow::Result<()> {
    // SAFETY: plain syscalls; the set is a local, zeroed value.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        anyhow::ensure!(rc == 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `syns` SYNs through TC ingress, with `COUNTERS` full and the kernel reporting at `level`:
/// the `counter_insert_failed` stat (over every CPU) and the reports logged.
fn failures(level: u8, syns: u16) -> anyhow::Result<(u64, Vec<Line>)> {
    let mut config = Config::from_ports(PORTS, PLAINTEXT).context("ports")?;
    config.set_ifaces(&WATCHED).context("interfaces")?;
    let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows: 1024 };
    let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, level)?;
    let capture = Arc::new(Capture::default());
    let mut reports = aya_log::EbpfLogger::init_with_logger(&mut ebpf, Arc::clone(&capture))?;
    let name = names::PROG_TC_INGRESS;
    let prog: &mut SchedClassifier =
        ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;

    // Fill COUNTERS with keys no test run uses (scopes of interfaces that do not exist).
    let mut counters: PerCpuHashMap<_, CounterKey, u64> =
        ebpf.take_map(names::MAP_COUNTERS).context("no COUNTERS")?.try_into()?;
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    for i in 0..COUNTERS_CAPACITY {
        let scope = Scope { ifindex: 1_000_000 + i, port: 25, direction: Direction::Inbound };
        let key = CounterKey::new(scope, Counter::Event(Event::Syn, Side::Peer));
        counters
            .insert(key, PerCpuValues::try_from(vec![0u64; cpus])?, 0)
            .with_context(|| format!("filling COUNTERS: entry {i}"))?;
    }

    let prog: &SchedClassifier = ebpf.program(name).context("program")?.try_into()?;
    let eth = Eth::new(MAC_GW, MAC_PEER);
    let ip = Ipv4::new(peer_v4(), gw_v4(), IPPROTO_TCP);
    for i in 0..syns {
        let frame = eth.frame(ETH_P_IP, &ip.packet(&Tcp::new(40_000 + i, 25, SYN).bytes()));
        let opts = TestRunOptions { data_in: Some(&frame), repeat: 1, ..TestRunOptions::default() };
        let verdict = prog.test_run(opts)?.return_value;
        anyhow::ensure!(verdict == u32::MAX, "verdict {verdict:#x}: the packet's fate changed");
    }
    reports.flush();

    let stats: PerCpuArray<_, u64> =
        ebpf.take_map(names::MAP_STATS).context("no STATS")?.try_into()?;
    let failed = stats.get(&(Stat::CounterInsertFailed as u32), 0)?.iter().sum();
    let lines = std::mem::take(&mut *capture.0.lock().expect("not poisoned"));
    Ok((failed, lines))
}

#[test]
fn a_failed_map_update_is_counted_and_reported_on_powers_of_two() {
    require_root!();
    if !kernel_available() {
        return;
    }
    pin_to_this_cpu().expect("pinning the test to one CPU");

    let (failed, lines) = failures(DEBUG, 9).expect("nine SYNs with COUNTERS full");
    assert_eq!(failed, 9, "every refused insert is counted");
    let want: Vec<Line> = [1, 2, 4, 8]
        .map(|n| {
            let msg = format!("kernel: COUNTERS insert failed (-7): a count lost, #{n}");
            (log::Level::Debug, names::KERNEL_LOG_TARGET.to_owned(), msg)
        })
        .into();
    assert_eq!(lines, want, "reported on the 1st, 2nd, 4th and 8th failure, with E2BIG");

    let (failed, lines) = failures(INFO, 9).expect("nine SYNs with COUNTERS full, at info");
    assert_eq!(failed, 9, "counted the same below debug");
    assert_eq!(lines, [], "nothing reported below debug");
}

/// With `--peer-counts log`, a record the per-peer log has no room for is lost and counted,
/// never silently: one SYN run 300,000 times through TC ingress with nothing reading the log
/// between (more records than its 8 MiB hold) leaves the log full, and every run's record is
/// either in it, read and added up by smtpflow's own reader, or counted in
/// `peer_insert_failed`. Then the same again: the reader gave the kernel the ring's room back
/// (it does so in batches, not a record at a time), so the ring holds as many records the
/// second time, and those now wrap around its end.
#[test]
fn a_full_peer_log_counts_every_record_it_loses() {
    require_root!();
    if !kernel_available() {
        return;
    }
    const RUNS: u32 = 300_000;
    let mut config = Config::from_ports(PORTS, PLAINTEXT).expect("ports");
    config.set_ifaces(&[super::programs::lo_ifindex()]).expect("interfaces");
    config.peer_log = peer_counts::LOG;
    let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows: 1024 };
    let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, 0).expect("load");
    let name = names::PROG_TC_INGRESS;
    let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().unwrap();
    prog.load().expect("loading TC ingress");
    let ring = RecordRing::take(&mut ebpf, names::MAP_PEER_LOG).expect("PEER_LOG");
    let mut log = PeerLog::new(ring, 16);
    let stats: PerCpuArray<_, u64> =
        ebpf.take_map(names::MAP_STATS).expect("no STATS").try_into().unwrap();
    let prog: &SchedClassifier = ebpf.program(name).expect("program").try_into().unwrap();
    let frame = Eth::new(MAC_GW, MAC_PEER).frame(
        ETH_P_IP,
        &Ipv4::new(peer_v4(), gw_v4(), IPPROTO_TCP).packet(&Tcp::new(40_000, 25, SYN).bytes()),
    );
    let run = || {
        let opts =
            TestRunOptions { data_in: Some(&frame), repeat: RUNS, ..TestRunOptions::default() };
        let verdict = prog.test_run(opts).expect("test run").return_value;
        assert_eq!(verdict, u32::MAX, "the packet's fate changed");
    };
    run();

    let lost = || -> u64 { stats.get(&(Stat::PeerInsertFailed as u32), 0).unwrap().iter().sum() };
    let syns = |log: &PeerLog| -> Vec<u64> {
        log.table().iter().map(|(_, c)| c.event(Event::Syn, Side::Peer)).collect()
    };
    // A record takes 40 bytes of the ring (its 8-byte header and 32 bytes).
    let room = u64::from(PEER_LOG_BYTES) / 40;
    let lost_once = u64::from(RUNS) - room;
    let read = log.pump() as u64;
    assert_eq!((read, lost()), (room, lost_once), "records read and counted lost");
    assert_eq!(syns(&log), [room], "one peer, every record read added up");
    assert_eq!(log.pump(), 0, "the log was read to its end");

    run();
    let read = log.pump() as u64;
    assert_eq!((read, lost()), (room, 2 * lost_once), "the second time: read and lost");
    assert_eq!(syns(&log), [2 * room], "every record of both times added up");
    assert_eq!(log.pump(), 0, "the log was read to its end again");
}
