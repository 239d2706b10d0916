//! The kernel's per-program accounting (`run_cnt` and `run_time_ns` of `bpf_prog_info`) of every
//! program hooked to the gateway's interface: smtpflow's and the empty programs attached beside
//! them. Read straight from the kernel at one instant for all of them (not from smtpflow's
//! metrics, which are as old as its last drain), so that programs compared in the same run are
//! compared over the same packets.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};
use smtpflow_tests::{Netns, in_netns};

use crate::{Check, Report, Section};

/// A section of per-program accounting rows: `first` names what each row is measured under
/// (a mode, a source count), then the program against the empty one beside it.
pub fn section(title: &str, first: &str) -> Section {
    Section::new(
        title,
        &[
            first,
            "program",
            "empty program",
            "runs/s",
            "ns/run",
            "empty ns/run",
            "ratio",
            "target",
            "",
        ],
    )
}

/// Runs and time of one program.
#[derive(Clone, Copy, Default)]
pub struct Cost {
    pub runs: u64,
    pub ns: u64,
}

impl Cost {
    /// ns per run (0 when it never ran).
    pub fn per_run(self) -> f64 {
        if self.runs == 0 { 0.0 } else { self.ns as f64 / self.runs as f64 }
    }
}

/// The hook a program is attached to, and its name: `("ingress", "smtpflow_tc_in")`.
pub type Key = (&'static str, String);

/// The accounting of everything hooked to one interface at one instant.
pub struct Reading(BTreeMap<Key, Cost>);

impl Reading {
    /// What each program did since `before` (programs attached meanwhile count from zero).
    pub fn since(&self, before: &Reading) -> Reading {
        let delta = self.0.iter().map(|(k, now)| {
            let was = before.0.get(k).copied().unwrap_or_default();
            let d = Cost { runs: now.runs - was.runs, ns: now.ns - was.ns };
            (k.clone(), d)
        });
        Reading(delta.collect())
    }

    /// The cost of the program `name` on `hook`, or an error that says what is hooked.
    pub fn get(&self, hook: &'static str, name: &str) -> anyhow::Result<Cost> {
        self.0.get(&(hook, name.to_owned())).copied().with_context(|| {
            let seen: Vec<String> = self.0.keys().map(|(h, n)| format!("{h} {n}")).collect();
            format!("no program {name} on {hook} (hooked: {})", seen.join(", "))
        })
    }
}

/// Reads the programs hooked to `iface` in `ns`: TCX ingress and egress (Linux 6.6+, as both
/// smtpflow and the empty programs attach there) and XDP. Accounting must be on (a
/// `BPF_ENABLE_STATS` descriptor held) for the figures to move.
pub fn read(ns: &Netns, iface: &str) -> anyhow::Result<Reading> {
    let xdp_id = xdp_prog_id(ns, iface)?;
    let iface = iface.to_owned();
    in_netns(ns, move || -> anyhow::Result<Reading> {
        let mut costs = BTreeMap::new();
        for (hook, t) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
            let (_, progs) = SchedClassifier::query_tcx(&iface, t).with_context(|| {
                format!("querying the TCX {hook} programs of {iface} (needs Linux 6.6 or later)")
            })?;
            for p in progs {
                let name = p.name_as_str().unwrap_or("?").to_owned();
                costs.insert((hook, name), Cost { runs: p.run_count(), ns: run_ns(&p) });
            }
        }
        if let Some(id) = xdp_id {
            let p = loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .with_context(|| format!("the XDP program {id} of {iface} is gone"))?;
            let name = p.name_as_str().unwrap_or("?").to_owned();
            costs.insert(("xdp", name), Cost { runs: p.run_count(), ns: run_ns(&p) });
        }
        Ok(Reading(costs))
    })
}

fn run_ns(p: &aya::programs::ProgramInfo) -> u64 {
    u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX)
}

/// The id of the XDP program attached to `iface` (any mode), from `ip link show`
/// (`prog/xdp id N`): aya has no query for it.
fn xdp_prog_id(ns: &Netns, iface: &str) -> anyhow::Result<Option<u32>> {
    let out = ns.exec("ip", &["link", "show", "dev", iface]);
    if !out.status.success() {
        bail!("ip link show dev {iface} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "prog/xdp" && words.next() == Some("id") {
            let id = words.next().context("ip link show: no id after prog/xdp id")?;
            return Ok(Some(id.parse().with_context(|| format!("XDP program id {id:?}"))?));
        }
    }
    Ok(None)
}

/// The cells of [`versus`] for a program that is a floor to compare against, not a target: no
/// target, no verdict, no check. Fails when either did not run: then the comparison would say
/// nothing (accounting off, or a program not where the packets pass).
pub fn floor(what: &str, program: Cost, empty: Cost, wall: f64) -> anyhow::Result<Vec<String>> {
    if program.runs == 0 || empty.runs == 0 {
        bail!(
            "{what}: the kernel counted {} and {} empty program runs; both must have seen the \
             traffic (is accounting on, are both attached to the interface?)",
            program.runs,
            empty.runs
        );
    }
    Ok(vec![
        format!("{:.0}", program.runs as f64 / wall),
        format!("{:.1}", program.per_run()),
        format!("{:.1}", empty.per_run()),
        format!("{:.2}×", program.per_run() / empty.per_run()),
        String::new(),
        String::new(),
    ])
}

/// The cells `runs/s | ns/run | empty ns/run | ratio | target | verdict` of a smtpflow program
/// against an empty program of the same type over `wall` seconds ([`floor`]'s, with the target
/// and its verdict), and their check in `report` (`what` names the comparison there).
pub fn versus(
    report: &mut Report,
    what: String,
    smtpflow: Cost,
    empty: Cost,
    wall: f64,
    target: f64,
) -> anyhow::Result<Vec<String>> {
    let mut cells = floor(&what, smtpflow, empty, wall)?;
    let ratio = smtpflow.per_run() / empty.per_run();
    let pass = ratio <= target;
    report.checks.push(Check {
        what: format!("{what} ≤ {target}× empty"),
        value: format!("{ratio:.2}×"),
        pass,
        floor: None,
    });
    cells[4] = format!("≤ {target}×");
    cells[5] = if pass { "pass" } else { "MISS" }.to_owned();
    Ok(cells)
}
