//! Hostile packets: differential fuzzing of the kernel parser.
//!
//! Mutations of a seed corpus of SMTP frames (truncation at every offset, random bytes, VLAN
//! stacks, IPv4 options, IPv6 extension-header chains, fragments, bad lengths, spliced headers)
//! go through the real `smtpflow_tc_in`, `smtpflow_tc_out` and `smtpflow_xdp` programs, from the
//! very object the binary embeds, with `BPF_PROG_TEST_RUN`. For every frame the program must
//! return `TC_ACT_UNSPEC` / `XDP_PASS`, and the counters must change exactly as the reference
//! classifier (`smtpflow_common::reference`, the README's contract in plain Rust) says: every
//! `COUNTERS` event key, the malformed-frames stat, and the per-peer event counts in `PEERS`
//! (or, with `--peer-counts log`, in the records of `PEER_LOG`, added up as smtpflow adds them).
//!
//! How counts are attributed: each program runs in its own copy of the object (its own maps), on
//! its own thread. Frames go in batches; the reference's effects of a batch are summed, and after
//! the batch the kernel's totals must equal the sums exactly: the event counters and the
//! malformed stat cumulatively, the per-peer counts for the batch (the `PEERS` map is read and
//! emptied after every batch). When a batch disagrees, its frames are replayed one at a time in a
//! fresh copy of the object to name the frames, which are shrunk and printed in hex. A test run
//! puts the skb or XDP buffer on the loopback device, so every key carries its ifindex; it
//! builds the skb from the bytes as given (no VLAN tag moves into metadata), and a TC test run
//! refuses IPv4/IPv6 frames too short for the network header (those go through XDP only).
//!
//! Every frame is held to the contract: the first run found one class where the kernel differed
//! (an IPv6 extension header running past the end of the frame was not malformed); the kernel
//! was fixed, and `truncated_ipv6_extension_headers_are_malformed` pins it.
//!
//! Seeded and reproducible: frame `i` of seed `s` is always the same bytes. `SMTPFLOW_FUZZ_SEED`
//! (default fixed) and `SMTPFLOW_FUZZ_FRAMES` (default 500,000: each through TC ingress and XDP,
//! and again with the per-peer counts going through the per-peer log, two million test runs,
//! and the first quarter of them through TC egress) choose the run;
//! `cargo xtask fuzz [--frames N] [--seed S]` is the long run. Needs root; skips without it.
use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::Context as _;
use smtpflow_common::reference::Effect;
use smtpflow_tests::{frames::hex, require_root};

mod corpus;
mod crafted;
mod mutate;
mod peers_read;
mod programs;
mod replies;
mod reports;
mod sessions;
mod table;
mod unreachable;

use corpus::*;
use mutate::*;
use programs::*;

/// The loader's defaults: `--ports 25,465,587`, replies read on 25 and 587.
const PORTS: &[u16] = &[25, 465, 587];
const PLAINTEXT: &[u16] = &[25, 587];

const DEFAULT_SEED: u64 = 0x5eed_5a1f_f10e;
const DEFAULT_FRAMES: u64 = 500_000;
/// Frames per batch: the kernel's totals are compared after each.
const BATCH: usize = 4096;
/// `BPF_PROG_TEST_RUN` refuses frames shorter than an Ethernet header; and longer than about a
/// page minus the skb's head- and tailroom. Mutations stay within these.
const MIN_FRAME: usize = 14;
const MAX_FRAME: usize = 2048;

// ---------------------------------------------------------------------------------------------
// The differential run.

/// A frame on which the kernel and the reference disagree.
struct Disagreement {
    hook: Hook,
    /// Where it came from: `seed/index`, or the truncation sweep.
    origin: String,
    frame: Vec<u8>,
    verdict: u32,
    kernel: Counts,
    reference: Effect,
    /// The smallest frame found that disagrees the same way.
    shrunk: Vec<u8>,
    shrunk_kernel: Counts,
    shrunk_reference: Effect,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:?} disagrees on frame {} ({} bytes):",
            self.hook,
            self.origin,
            self.frame.len()
        )?;
        writeln!(f, "{}", hex(&self.frame))?;
        writeln!(f, "  verdict   {:#x} (want {:#x})", self.verdict, self.hook.verdict())?;
        writeln!(f, "  kernel    {}", self.kernel.describe())?;
        writeln!(f, "  reference {:?}", self.reference)?;
        if self.shrunk == self.frame {
            return write!(f, "(no smaller frame disagrees the same way)");
        }
        writeln!(f, "shrunk to {} bytes:\n{}", self.shrunk.len(), hex(&self.shrunk))?;
        writeln!(f, "  kernel    {}", self.shrunk_kernel.describe())?;
        write!(f, "  reference {:?}", self.shrunk_reference)
    }
}

/// The kind of a disagreement, so that shrinking keeps the same one.
fn kind(kernel: &Counts, reference: &Effect) -> (bool, bool, bool, bool) {
    let k_counted = !kernel.events.is_empty();
    let r_counted = matches!(reference, Effect::Counted(_));
    let r_malformed = matches!(reference, Effect::Malformed(_));
    (kernel.malformed != 0, k_counted, r_malformed, r_counted)
}

/// Runs `frames` one at a time through a fresh copy of `hook`'s program and returns those the
/// kernel and the reference disagree on (at most `limit`), each shrunk.
fn pinpoint(
    hook: Hook,
    log: bool,
    frames: &[(u64, Vec<u8>)],
    origin: impl Fn(u64) -> String,
    ifindex: u32,
    limit: usize,
) -> anyhow::Result<Vec<Disagreement>> {
    let mut k = Kernel::load_as(hook, log)?;
    let mut found = Vec::new();
    let mut seen_kinds = Vec::new();
    for (n, frame) in frames {
        let Some((verdict, kernel)) = k.observe(frame)? else { continue };
        let reference = expected(hook, frame, ifindex);
        if verdict == hook.verdict() && kernel == counts_of(&reference) {
            continue;
        }
        // Shrink: the shortest prefix, then as many bytes zeroed as keep the same disagreement.
        let want = kind(&kernel, &reference);
        let disagrees = |k: &mut Kernel, f: &[u8]| -> anyhow::Result<bool> {
            let Some((v, c)) = k.observe(f)? else { return Ok(false) };
            let e = expected(hook, f, ifindex);
            Ok(v != hook.verdict() || (c != counts_of(&e) && kind(&c, &e) == want))
        };
        let mut shrunk = frame.clone();
        if !seen_kinds.contains(&want) {
            for len in MIN_FRAME..shrunk.len() {
                if disagrees(&mut k, &shrunk[..len])? {
                    shrunk.truncate(len);
                    break;
                }
            }
            for i in 0..shrunk.len() {
                if shrunk[i] != 0 {
                    let mut t = shrunk.clone();
                    t[i] = 0;
                    if disagrees(&mut k, &t)? {
                        shrunk = t;
                    }
                }
            }
            seen_kinds.push(want);
        }
        let (_, shrunk_kernel) = k.observe(&shrunk)?.context("the shrunk frame was refused")?;
        let shrunk_reference = expected(hook, &shrunk, ifindex);
        found.push(Disagreement {
            hook,
            origin: origin(*n),
            frame: frame.clone(),
            verdict,
            kernel,
            reference,
            shrunk,
            shrunk_kernel,
            shrunk_reference,
        });
        if found.len() >= limit {
            break;
        }
    }
    Ok(found)
}

struct RunStats {
    hook: Hook,
    /// Per-peer counts through the per-peer log (`--peer-counts log`).
    log: bool,
    frames: u64,
    malformed: u64,
    counted: u64,
    /// Frames a TC test run refuses ([`tc_refuses`]).
    refused: u64,
    secs: f64,
}

/// Runs the truncation sweep and `frames` mutants of `seed` through `hook`; returns the counts,
/// or the disagreements of the first batch that has any.
fn fuzz(
    hook: Hook,
    log: bool,
    seed: u64,
    frames: u64,
) -> anyhow::Result<Result<RunStats, Vec<Disagreement>>> {
    let ifindex = lo_ifindex();
    let corpus = corpus();
    let sweep = truncations(&corpus);
    let mut k = Kernel::load_as(hook, log)?;
    let mut want = Counts::default();
    let (mut malformed, mut counted, mut refused) = (0, 0, 0);
    let started = Instant::now();
    let total = sweep.len() as u64 + frames;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(BATCH);
    let origin = |n: u64| match n.checked_sub(sweep.len() as u64) {
        None => format!("#{n} of the truncation sweep"),
        Some(i) => format!("seed {seed:#x} index {i}"),
    };
    let mut next = 0u64;
    while next < total {
        batch.clear();
        let mut bad_verdict = false;
        let mut batch_want = Counts { peers: BTreeMap::new(), ..want.clone() };
        while batch.len() < BATCH && next < total {
            let frame = match sweep.get(next as usize) {
                Some(f) => f.clone(),
                None => mutant(&corpus, seed, next - sweep.len() as u64),
            };
            next += 1;
            let Some(verdict) = k.run(&frame)? else {
                refused += 1;
                continue;
            };
            let e = expected(hook, &frame, ifindex);
            match e {
                Effect::Malformed(_) => malformed += 1,
                Effect::Counted(_) => counted += 1,
                Effect::Nothing => {}
            }
            batch_want.add(&e);
            batch.push((next - 1, frame));
            if verdict != hook.verdict() {
                bad_verdict = true;
                break;
            }
        }
        let got = k.read()?;
        if bad_verdict || got != batch_want {
            let found = pinpoint(hook, log, &batch, origin, ifindex, 8)?;
            anyhow::ensure!(
                !found.is_empty(),
                "{hook:?}: a batch disagreed but no single frame does: kernel {} vs reference {}",
                got.describe(),
                batch_want.describe()
            );
            return Ok(Err(found));
        }
        want = Counts { peers: BTreeMap::new(), ..batch_want };
    }
    Ok(Ok(RunStats {
        hook,
        log,
        frames: total,
        malformed,
        counted,
        refused,
        secs: started.elapsed().as_secs_f64(),
    }))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim().replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
        }
        Err(_) => default,
    }
}

#[test]
fn differential_fuzz() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let seed = env_u64("SMTPFLOW_FUZZ_SEED", DEFAULT_SEED);
    let frames = env_u64("SMTPFLOW_FUZZ_FRAMES", DEFAULT_FRAMES);
    eprintln!(
        "differential fuzz: seed {seed:#x}, the truncation sweep and {frames} mutated frames \
         through TC ingress and XDP, again with the per-peer log, the first quarter of them \
         through TC egress (reproduce \
         with SMTPFLOW_FUZZ_SEED={seed:#x} SMTPFLOW_FUZZ_FRAMES={frames})"
    );
    let started = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        // Egress parses with the same code as ingress, only the side differs: a quarter of the
        // frames covers it. The per-peer log (`--peer-counts log`) changes only where the
        // per-peer counts go: TC ingress and XDP cover it.
        let runs = Hook::ALL
            .iter()
            .map(|&hook| (hook, false, if hook == Hook::TcOut { frames / 4 } else { frames }))
            .chain([Hook::TcIn, Hook::Xdp].map(|hook| (hook, true, frames)));
        let handles: Vec<_> =
            runs.map(|(hook, log, n)| s.spawn(move || fuzz(hook, log, seed, n))).collect();
        handles.into_iter().map(|h| h.join().expect("fuzz thread panicked")).collect()
    });
    let mut failures = String::new();
    let mut total = 0;
    for r in results {
        match r.expect("fuzz run") {
            Ok(st) => {
                total += st.frames;
                eprintln!(
                    "  {:?}{}: {} frames in {:.1}s ({:.0} frames/s): {} counted an event, {} \
                     malformed, the rest nothing, {} refused by the test run; kernel and \
                     reference agree",
                    st.hook,
                    if st.log { " (--peer-counts log)" } else { "" },
                    st.frames,
                    st.secs,
                    st.frames as f64 / st.secs,
                    st.counted,
                    st.malformed,
                    st.refused
                );
            }
            Err(found) => {
                for d in found {
                    writeln!(failures, "{d}\n").unwrap();
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("  {total} test runs in {secs:.1}s ({:.0}/s over all programs)", total as f64 / secs);
    assert!(failures.is_empty(), "kernel and reference disagree (seed {seed:#x}):\n{failures}");
}

/// A frame shorter than an Ethernet header never reaches the programs: test runs refuse it, as
/// the kernel refuses to send one (the parser's "< 14 bytes" path is unreachable).
#[test]
fn runts_are_refused() {
    require_root!();
    if !kernel_available() {
        return;
    }
    for hook in [Hook::TcIn, Hook::Xdp] {
        let k = Kernel::load(hook).expect("load");
        assert!(k.run_anyway(&[0u8; 13]).is_err(), "{hook:?} ran a 13-byte frame");
        assert_eq!(k.run(&[0u8; 14]).expect("14 bytes"), Some(hook.verdict()));
    }
}
