//! smtpflow's benchmarks, side by side with the floor (empty eBPF programs) and the alternative
//! (tcpdump). Run with `cargo xtask bench` (full, a few minutes) or `cargo xtask bench --smoke`
//! (tiny counts, seconds; part of `cargo xtask test`). Needs root.
//!
//! 1. kernel: cost per packet of the real programs vs empty programs (BPF_PROG_TEST_RUN).
//! 2. live: iperf3 throughput over veth with no observer, smtpflow tc/xdp, tcpdump; the
//!    kernel's per-program accounting under that load, against empty programs.
//! 3. churn: SYN-ACK rate the gateway keeps under a SYN flood from 65,536 and 1,000,000
//!    sources, without smtpflow and with it in tc and xdp mode, and the kernel's per-program
//!    accounting during the flood against empty programs; smtpflow's CPU and RSS at 10,000 SYN/s.
//! 4. scale: drain, scrape and RSS of the real binary with 10k, 100k and 1M peers tracked.
//!
//! Results are printed as Markdown tables with a pass/miss line per target; no target failure
//! makes the run fail (only errors do), so the smoke run in CI asserts no timing.
mod accounting;
mod churn;
mod empty;
mod frames;
mod kernel;
mod live;
mod scale;
mod sys;

use std::{fmt::Write as _, process::ExitCode, time::Instant};

use anyhow::{Context as _, bail};

/// Heap accounting, to compare drain strategies' peak memory.
pub mod alloc_count {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        sync::atomic::{AtomicUsize, Ordering},
    };

    static CURRENT: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub struct Counting;

    fn grew(by: usize) {
        let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    // SAFETY: forwards to the system allocator; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            grew(layout.size());
            // SAFETY: same contract as ours.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            grew(new_size);
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            // SAFETY: same contract as ours.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Starts a new peak measurement; returns the current heap size.
    pub fn reset_peak() -> usize {
        let now = CURRENT.load(Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
        now
    }

    pub fn peak() -> usize {
        PEAK.load(Ordering::Relaxed)
    }
}

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

/// A table of results.
pub struct Section {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub note: String,
}

impl Section {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
            note: String::new(),
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title);
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        if !self.note.is_empty() {
            let _ = write!(s, "\n{}\n", self.note);
        }
        s
    }
}

/// A target and whether it was met.
pub struct Check {
    pub what: String,
    pub value: String,
    pub pass: bool,
    /// The least a design costs by the same measure in the same run, where the run measures
    /// one ([`Report::set_floor`]): whether a design of that kind could meet the target on
    /// this host at all.
    pub floor: Option<Floor>,
}

/// A floor beside a target: which floor, its figure, and whether it meets the target itself.
pub struct Floor {
    pub what: String,
    pub meets: bool,
}

impl Floor {
    /// A floor of `ratio` × the empty program, against a target of at most `target`×.
    pub fn ratio(name: &str, ratio: f64, target: f64) -> Self {
        Self { what: format!("{name} {ratio:.2}×"), meets: ratio <= target }
    }

    /// A floor that keeps `ratio` of a rate, against a target of at least `target`.
    pub fn rate(name: &str, ratio: f64, target: f64) -> Self {
        Self { what: format!("{name} {:.1}%", ratio * 100.0), meets: ratio >= target }
    }

    /// The lower of two floors by ratio: the one a design could still meet the target under.
    pub fn least_ratio(floors: [(&str, f64); 2], target: f64) -> Self {
        let [(a, ra), (b, rb)] = floors;
        if ra <= rb { Self::ratio(a, ra, target) } else { Self::ratio(b, rb, target) }
    }
}

#[derive(Default)]
pub struct Report {
    pub sections: Vec<Section>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn add(&mut self, section: Section) {
        println!("{}", section.markdown());
        self.sections.push(section);
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        for sec in &self.sections {
            s.push_str(&sec.markdown());
            s.push('\n');
        }
        s.push_str(
            "### Targets\n\n| target | measured | | least floor, same run | the floor meets \
             it |\n|---|---|---|---|---|\n",
        );
        for c in &self.checks {
            let (floor, meets) = match &c.floor {
                Some(f) => (f.what.as_str(), if f.meets { "yes" } else { "**no**" }),
                None => ("—", ""),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {floor} | {meets} |",
                c.what,
                c.value,
                if c.pass { "pass" } else { "MISS" }
            );
        }
        s.push_str(
            "\nThe least floor is the least that a design costs by the same measure in the same \
             run: in `BPF_PROG_TEST_RUN` and under the flood, the cheaper of the tables' and the \
             log's floors (both read the headers, and do their tables' work for a SYN only); \
             under iperf3's load, the header reads (TC); for a rate kept, the empty programs of \
             the mode (the iperf3 rows) or the better of the tables' and the log's floors (the \
             flood rows, the empty programs beside them); for the full drain, the batched read \
             alone (4b). A floor that does not meet its target is a target no design of that \
             kind meets on this host.\n",
        );
        s
    }

    /// Gives the check whose target begins with `what` the least a design costs by the same
    /// measure in the same run (measured after the check, as the floors run after smtpflow).
    pub fn set_floor(&mut self, what: &str, floor: Floor) {
        match self.checks.iter_mut().find(|c| c.what.starts_with(what)) {
            Some(c) => c.floor = Some(floor),
            None => eprintln!("bench: no target {what:?} to put the floor {:?} beside", floor.what),
        }
    }
}

/// Counts and durations of one run.
pub struct Params {
    pub smoke: bool,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

const ALL: &[&str] = &["kernel", "live", "churn", "scale"];

fn usage() -> String {
    format!(
        "usage: bench [--smoke] [--only {}] [--bin PATH] [--markdown FILE]\n\
         (SMTPFLOW_BIN or target/release/smtpflow by default; needs root)",
        ALL.join(",")
    )
}

fn run() -> anyhow::Result<()> {
    let mut smoke = false;
    let mut only: Vec<String> = ALL.iter().map(|s| (*s).to_owned()).collect();
    let mut bin = std::env::var("SMTPFLOW_BIN").ok();
    let mut markdown = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--only" => {
                let list = args.next().context("--only needs a list")?;
                only = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = only.iter().find(|o| !ALL.contains(&o.as_str())) {
                    bail!("unknown benchmark {bad:?}\n{}", usage());
                }
            }
            "--bin" => bin = Some(args.next().context("--bin needs a path")?),
            "--markdown" => markdown = Some(args.next().context("--markdown needs a file")?),
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmarks need root (BPF, network namespaces): run `sudo -E cargo xtask bench`"
        );
    }
    let bin = bin.unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/smtpflow").to_owned()
    });
    if only.iter().any(|o| o != "kernel") && !std::path::Path::new(&bin).exists() {
        bail!("{bin} is missing: build it with `cargo build --release -p smtpflow`");
    }
    // The test support runs the binary named by SMTPFLOW_BIN.
    // SAFETY: no other thread runs yet (the signal thread starts below).
    unsafe { std::env::set_var("SMTPFLOW_BIN", &bin) };
    sys::install_signal_cleanup()?;
    let p = Params { smoke };
    let machine = machine();
    println!(
        "# smtpflow benchmarks{}\n\nMachine: {machine}\n",
        if smoke { " (smoke run: tiny counts, numbers are not meaningful)" } else { "" }
    );
    let started = Instant::now();
    let mut report = Report::default();
    for name in &only {
        let t = Instant::now();
        let result = match name.as_str() {
            "kernel" => kernel::run(
                &if smoke {
                    kernel::Params { repeat: 1000, rounds: 1, distinct: 1000 }
                } else {
                    kernel::Params { repeat: 1_000_000, rounds: 5, distinct: 300_000 }
                },
                &mut report,
            ),
            "live" => live::run(&p, &mut report),
            "churn" => churn::run(&p, &mut report),
            "scale" => scale::run(&p, &mut report),
            _ => unreachable!(),
        };
        result.with_context(|| format!("benchmark {name}"))?;
        eprintln!("bench: {name} done in {:.1}s", t.elapsed().as_secs_f64());
    }
    let text = format!(
        "Machine: {machine}. {} run, {:.0}s.\n\n{}",
        if smoke { "Smoke" } else { "Full" },
        started.elapsed().as_secs_f64(),
        report.markdown()
    );
    let targets = text.split_once("### Targets").map_or("", |(_, t)| t);
    println!("### Targets{targets}");
    if let Some(path) = markdown {
        std::fs::write(&path, &text).with_context(|| format!("writing {path}"))?;
        eprintln!("bench: results written to {path}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
