//! Benchmark 1: kernel cost per packet. `BPF_PROG_TEST_RUN` (aya's test-run API) of the real
//! `smtpflow_tc_in` and `smtpflow_xdp`, from the very object the binary embeds, and of empty
//! programs of the same types loaded beside them, on the same frames.
use std::{net::IpAddr, time::Instant};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use smtpflow::kernel::{self, Sizes};
use smtpflow_common::{Config, DEFAULT_MAX_FLOWS, DEFAULT_MAX_PEERS, DropConfig, names};

use crate::{
    Check, Floor, Report, Section, empty,
    frames::{self, ACK, DATA_OPTIONS, ETH_P_8021AD, ETH_P_8021Q, PSH, RST, SYN, Tcp},
    sys::median,
};

const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
const XDP_PASS: u32 = 2;

/// Loads the real object as `smtpflow watch` does (default ports and map sizes) with its TC
/// ingress and XDP programs, not attached.
pub fn load_real() -> anyhow::Result<Ebpf> {
    let mut config = Config::from_ports(&[25, 465, 587], &[25, 587]).context("ports")?;
    // The test run's device (loopback) watched, as `--iface` would make it.
    // SAFETY: a valid NUL-terminated name.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    config.set_ifaces(&[lo]).context("interfaces")?;
    let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows: DEFAULT_MAX_FLOWS };
    let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, 0)?;
    let tc: &mut SchedClassifier =
        ebpf.program_mut(names::PROG_TC_INGRESS).context("no tc program")?.try_into()?;
    tc.load().context("loading smtpflow_tc_in")?;
    let xdp: &mut Xdp = ebpf.program_mut(names::PROG_XDP).context("no xdp program")?.try_into()?;
    xdp.load().context("loading smtpflow_xdp")?;
    Ok(ebpf)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Tc,
    Xdp,
}

impl Hook {
    fn label(self) -> &'static str {
        match self {
            Hook::Tc => "TC",
            Hook::Xdp => "XDP",
        }
    }
}

/// One timed test run: the kernel's own measure, in ns per run (whole ns: the kernel divides
/// its timer by the repeat count). Wall-clock time is no use here: an XDP test run with
/// repeat > 1 swaps the XDP dispatcher twice (tens of ms, varying), which would add tens of ns
/// per run even at a million runs.
struct Timed {
    kernel_ns: f64,
}

fn test_run(
    ebpf: &Ebpf,
    prog: &str,
    hook: Hook,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<Timed> {
    let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() };
    let p = ebpf.program(prog).with_context(|| format!("no program {prog}"))?;
    let (result, want) = match hook {
        Hook::Tc => {
            let p: &SchedClassifier = p.try_into()?;
            (p.test_run(opts)?, TC_ACT_UNSPEC)
        }
        Hook::Xdp => {
            let p: &Xdp = p.try_into()?;
            (p.test_run(opts)?, XDP_PASS)
        }
    };
    if result.return_value != want {
        bail!("{prog} returned {} (want {want})", result.return_value as i32);
    }
    Ok(Timed { kernel_ns: result.duration.as_nanos() as f64 })
}

/// How a case is measured.
enum Method {
    /// One frame, `repeat` runs per call: the usual per-packet cost.
    Repeat(Vec<u8>),
    /// A different frame every call (one run each), because the case is the first packet of
    /// something (a new peer, a new connection).
    Distinct(Box<dyn Fn(u32) -> Vec<u8>>),
    /// As [`Method::Distinct`], for the last packet of something: `setup(i)`'s frames go
    /// through smtpflow's program first (unmeasured) for every `i`, then `last(i)` is measured
    /// as a distinct frame. At most [`ENDINGS`] of them, so that every flow set up is still in
    /// the flow map when its last packet comes.
    Ending { setup: Box<dyn Fn(u32) -> Vec<Vec<u8>>>, last: Box<dyn Fn(u32) -> Vec<u8>> },
}

/// The flows an [`Method::Ending`] case sets up: fewer than the flow map holds by default
/// (262,144), whatever the other cases left in it.
const ENDINGS: u32 = 200_000;

struct Case {
    name: &'static str,
    method: Method,
    /// Target ratio to the empty program, if any.
    target: Option<f64>,
    /// Frames to run once (unmeasured) before this case, through the real programs.
    setup: Vec<Vec<u8>>,
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::from([a, b, c, d])
}

fn cases() -> Vec<Case> {
    let client = v4(198, 51, 100, 7);
    let gw = v4(192, 0, 2, 1);
    let data_payload: Vec<u8> =
        b"Subject: benchmark\r\n".iter().copied().cycle().take(1448).collect();
    let segment = |sport, flags, seq, payload: &[u8]| {
        let mut t = Tcp::syn(client, sport, gw, 25);
        t.flags = flags;
        t.seq = seq;
        t.ack = 5000;
        t.window = 502;
        t.options = &DATA_OPTIONS;
        t.payload = payload;
        t.frame()
    };
    let established = |flags, seq, payload: &[u8]| segment(40000, flags, seq, payload);
    // The client's ACK that completes the handshake of a flow from `sport`.
    let established_from = |sport| segment(sport, ACK, 1001, &[]);
    // The server's acknowledgement of 1448 bytes from the client, on its own flow.
    let mut server_ack = Tcp::syn(gw, 25, client, 40005);
    server_ack.flags = ACK;
    server_ack.seq = 5000;
    server_ack.ack = 1001 + 1448;
    server_ack.window = 509;
    server_ack.options = &DATA_OPTIONS;
    let mut non_smtp = Tcp::syn(client, 40001, gw, 443);
    non_smtp.flags = ACK | PSH;
    non_smtp.options = &DATA_OPTIONS;
    non_smtp.payload = &data_payload;
    let non_smtp = non_smtp.frame();
    let mut qinq = Tcp::syn(client, 40002, gw, 25);
    qinq.vlans = &[ETH_P_8021AD, ETH_P_8021Q];
    // Flow `i` of the RST case: from `client`, to 60,000 source ports of four servers (none the
    // new-connection case uses).
    let ending = move |i: u32, flags, seq| {
        let mut t = Tcp::syn(
            client,
            1024 + (i % 60_000) as u16,
            v4(192, 0, 2, 128 + (i / 60_000) as u8),
            25,
        );
        t.flags = flags;
        t.seq = seq;
        if flags & ACK != 0 {
            t.ack = 5001;
            t.window = 502;
            t.options = &DATA_OPTIONS;
        }
        t.frame()
    };
    let v6 =
        Tcp::syn("2001:db8::7".parse().expect("v6"), 40003, "2001:db8::1".parse().expect("v6"), 25);
    vec![
        Case {
            name: "ARP",
            method: Method::Repeat(frames::arp()),
            target: Some(1.25),
            setup: vec![],
        },
        Case {
            name: "UDP (DNS-sized)",
            method: Method::Repeat(frames::udp(client, gw, 5353, 53)),
            target: Some(1.25),
            setup: vec![],
        },
        Case {
            name: "TCP to port 443 (1448-byte segment)",
            method: Method::Repeat(non_smtp),
            target: Some(1.25),
            setup: vec![],
        },
        Case {
            name: "SMTP data segment (1448 bytes, established flow)",
            method: Method::Repeat(established(ACK | PSH, 1001, &data_payload)),
            target: Some(1.5),
            // The client's SYN then ACK: the flow is established (what XDP sees too).
            setup: vec![Tcp::syn(client, 40000, gw, 25).frame(), established(ACK, 1001, &[])],
        },
        Case {
            name: "SMTP server ACK (no payload, established flow)",
            // What a server sends most while it receives a message: a bare ACK. Through the
            // ingress hooks like the other cases (in TC mode it would cross the egress one).
            method: Method::Repeat(server_ack.frame()),
            target: Some(1.5),
            setup: vec![
                Tcp::syn(client, server_ack.dport, gw, 25).frame(),
                established_from(server_ack.dport),
            ],
        },
        Case {
            name: "SMTP SYN, known peer (same SYN again)",
            method: Method::Repeat(Tcp::syn(client, 40004, gw, 25).frame()),
            target: Some(3.0),
            setup: vec![],
        },
        Case {
            name: "SMTP SYN, known peer, new connection",
            method: Method::Distinct(Box::new(move |i| {
                // One peer; a new (server address, source port) every time.
                let dst = v4(192, 0, 2, 64 + (i >> 16) as u8);
                Tcp::syn(client, 1024 + (i & 0xffff) as u16 % 64000, dst, 25).frame()
            })),
            target: Some(6.0),
            setup: vec![],
        },
        Case {
            name: "SMTP SYN, new peer",
            method: Method::Distinct(Box::new(move |i| {
                // 100.64.0.0/10: four million distinct peers.
                let [_, b, c, d] = i.to_be_bytes();
                Tcp::syn(v4(100, 64 | (b & 0x3f), c, d), 40000, gw, 25).frame()
            })),
            target: Some(8.0),
            setup: vec![],
        },
        Case {
            name: "SMTP RST ending an established flow",
            // The last packet of each attempt of a SYN flood: its source's RST (here after the
            // client's ACK, which establishes the flow in XDP too). One peer, a flow each.
            method: Method::Ending {
                setup: Box::new(move |i| vec![ending(i, SYN, 1000), ending(i, ACK, 1001)]),
                last: Box::new(move |i| ending(i, RST | ACK, 1001)),
            },
            target: None,
            setup: vec![],
        },
        Case {
            name: "SMTP RST, no flow (same RST again)",
            // A RST for a connection smtpflow does not follow (its flow ended or was evicted,
            // or backscatter): the flow lookup misses, and the reset and its peer are counted.
            method: Method::Repeat(ending(ENDINGS, RST | ACK, 1001)),
            target: None,
            setup: vec![],
        },
        Case {
            name: "IPv6 SMTP SYN, known peer",
            method: Method::Repeat(v6.frame()),
            target: None,
            setup: vec![],
        },
        Case {
            name: "QinQ-tagged SMTP SYN, known peer",
            method: Method::Repeat(qinq.frame()),
            target: None,
            setup: vec![],
        },
    ]
}

#[derive(Clone, Copy)]
pub struct Params {
    pub repeat: u32,
    pub rounds: usize,
    pub distinct: u32,
}

/// The floors measured beside smtpflow on one hook, in the table's column order: the header
/// reads, the direct-mapped tables, and the per-CPU log with the flow table
/// ([`empty::TABLES_TC`], [`empty::LOG_TC`]).
const FLOORS: usize = 3;

/// The programs a case runs through on one hook: smtpflow's, the empty one, and the floors.
struct Progs {
    real: &'static str,
    empty: &'static str,
    floors: [&'static str; FLOORS],
}

impl Progs {
    fn of(hook: Hook) -> Self {
        match hook {
            Hook::Tc => Progs {
                real: names::PROG_TC_INGRESS,
                empty: empty::EMPTY_TC,
                floors: [empty::HEADERS_TC, empty::TABLES_TC, empty::LOG_TC],
            },
            Hook::Xdp => Progs {
                real: names::PROG_XDP,
                empty: empty::EMPTY_XDP,
                floors: [empty::HEADERS_XDP, empty::TABLES_XDP, empty::LOG_XDP],
            },
        }
    }
}

/// One case on one hook, ns a packet: smtpflow's (and its min–max over calls, for a repeat
/// case), the empty program's and each floor's.
struct Measured {
    real: f64,
    spread: String,
    empty: f64,
    floors: [f64; FLOORS],
}

/// A repeat case: `p.rounds` calls of `p.repeat` runs each, the programs alternating; medians.
fn repeat(
    p: &Params,
    (real, empty): (&Ebpf, &Ebpf),
    progs: &Progs,
    hook: Hook,
    frame: &[u8],
) -> anyhow::Result<Measured> {
    // Warm up: the first run creates map entries; later ones are the steady state.
    test_run(real, progs.real, hook, frame, 1000.min(p.repeat))?;
    for prog in [progs.empty].iter().chain(&progs.floors) {
        test_run(empty, prog, hook, frame, 1000.min(p.repeat))?;
    }
    let (mut r, mut e) = (Vec::new(), Vec::new());
    let mut f: [Vec<f64>; FLOORS] = Default::default();
    for _ in 0..p.rounds {
        r.push(test_run(real, progs.real, hook, frame, p.repeat)?.kernel_ns);
        e.push(test_run(empty, progs.empty, hook, frame, p.repeat)?.kernel_ns);
        for (prog, runs) in progs.floors.iter().zip(&mut f) {
            runs.push(test_run(empty, prog, hook, frame, p.repeat)?.kernel_ns);
        }
    }
    let (lo, hi) = r.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    Ok(Measured {
        real: median(&mut r),
        spread: format!("{lo:.0}–{hi:.0}"),
        empty: median(&mut e),
        floors: f.map(|mut runs| median(&mut runs)),
    })
}

/// A distinct case: the empty program's repeat floor on one such frame, plus each program's mean
/// kernel-timed difference from the empty program over `p.distinct` frames of one run each (the
/// timer's own overhead cancels).
fn distinct(
    p: &Params,
    (real, empty): (&Ebpf, &Ebpf),
    progs: &Progs,
    hook: Hook,
    make: &dyn Fn(u32) -> Vec<u8>,
) -> anyhow::Result<Measured> {
    let floor_frame = make(u32::MAX);
    let mut floor = Vec::new();
    for _ in 0..p.rounds {
        floor.push(test_run(empty, progs.empty, hook, &floor_frame, p.repeat)?.kernel_ns);
    }
    let floor = median(&mut floor);
    let (mut real_sum, mut empty_sum, mut floor_sums) = (0.0, 0.0, [0.0; FLOORS]);
    for i in 0..p.distinct {
        let frame = make(i);
        real_sum += test_run(real, progs.real, hook, &frame, 1)?.kernel_ns;
        empty_sum += test_run(empty, progs.empty, hook, &frame, 1)?.kernel_ns;
        for (prog, sum) in progs.floors.iter().zip(&mut floor_sums) {
            *sum += test_run(empty, prog, hook, &frame, 1)?.kernel_ns;
        }
    }
    let over_empty = |sum: f64| floor + (sum - empty_sum) / f64::from(p.distinct);
    Ok(Measured {
        real: over_empty(real_sum),
        spread: "—".to_owned(),
        empty: floor,
        floors: floor_sums.map(over_empty),
    })
}

pub fn run(p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let real = load_real()?;
    let empty = empty::load()?;
    let mut section = Section::new(
        "1. Kernel cost per packet (BPF_PROG_TEST_RUN)",
        &[
            "packet",
            "hook",
            "smtpflow ns/pkt",
            "smtpflow min–max",
            "empty ns/pkt",
            "header reads ns/pkt",
            "tables floor ns/pkt (× empty)",
            "log floor ns/pkt (× empty)",
            "ratio",
            "target",
            "",
        ],
    );
    section.note = format!(
        "ns/pkt is the kernel's own measure (BPF_PROG_TEST_RUN `duration`, whole ns). Repeat \
         cases: {} runs per call, median of {} calls alternating smtpflow, the empty program \
         and the floors (min–max: smtpflow's calls, the spread this machine gave). Distinct \
         cases: {} calls of one run each, a different frame every call; their ns is the empty \
         program's repeat floor plus the mean kernel-timed difference from the empty program on \
         the same frames (the timer's own overhead cancels), for smtpflow and for each floor; the \
         RST case measures {} such frames, each ending a flow set up before (its SYN and ACK, \
         not timed). \
         \"Header reads\" is a program that reads the Ethernet type, IPv4's version and \
         protocol and the TCP ports behind one bounds check, and returns: what any observer \
         that filters on ports pays (it stops at the first field that is not IPv4 or TCP, as \
         smtpflow does). \"Tables floor\" adds, for a segment with SYN set, a plain add to a \
         counter in its source's slot of a peer table and a write in its 4-tuple's slot of a \
         flow table ({} and {} slots, each as big as smtpflow's key and value, at a \
         multiplicative hash): the least any design with per-peer counters in kernel tables \
         does, with no key compare, collision handling, clock or other counter. \"Log floor\" \
         instead appends the SYN's addresses to its CPU's log (for userspace to add up per \
         peer) and writes the flow table's slot. The ratio is to the empty program, as the \
         targets are.",
        p.repeat,
        p.rounds,
        p.distinct,
        p.distinct.min(ENDINGS),
        DEFAULT_MAX_PEERS,
        DEFAULT_MAX_FLOWS
    );
    let started = Instant::now();
    for case in cases() {
        for hook in [Hook::Tc, Hook::Xdp] {
            let progs = Progs::of(hook);
            for f in &case.setup {
                test_run(&real, progs.real, hook, f, 1)?;
            }
            let m = match &case.method {
                Method::Repeat(frame) => repeat(p, (&real, &empty), &progs, hook, frame)?,
                Method::Distinct(make) => distinct(p, (&real, &empty), &progs, hook, make)?,
                Method::Ending { setup, last } => {
                    let p = Params { distinct: p.distinct.min(ENDINGS), ..*p };
                    for i in 0..p.distinct {
                        for f in setup(i) {
                            test_run(&real, progs.real, hook, &f, 1)?;
                        }
                    }
                    distinct(&p, (&real, &empty), &progs, hook, last)?
                }
            };
            let ratio = m.real / m.empty;
            let [headers, tables, log] = m.floors;
            let (target, verdict) = match case.target {
                Some(t) => {
                    let pass = ratio <= t;
                    // Both floors do the header reads, and their tables' work only for a SYN.
                    let floors = [("tables", tables / m.empty), ("log", log / m.empty)];
                    report.checks.push(Check {
                        what: format!("{} ({}) ≤ {t}× empty", case.name, hook.label()),
                        value: format!("{ratio:.2}×"),
                        pass,
                        floor: Some(Floor::least_ratio(floors, t)),
                    });
                    (format!("≤ {t}×"), if pass { "pass" } else { "MISS" })
                }
                None => (String::new(), ""),
            };
            section.rows.push(vec![
                case.name.to_owned(),
                hook.label().to_owned(),
                format!("{:.1}", m.real),
                m.spread,
                format!("{:.1}", m.empty),
                format!("{headers:.1}"),
                format!("{tables:.1} ({:.2}×)", tables / m.empty),
                format!("{log:.1} ({:.2}×)", log / m.empty),
                format!("{ratio:.2}×"),
                target,
                verdict.to_owned(),
            ]);
        }
    }
    section.note.push_str(&format!(" Took {:.1}s.", started.elapsed().as_secs_f64()));
    report.add(section);
    Ok(())
}
