//! `cargo xtask fuzz`: the long run of the kernel parser's differential fuzz test
//! (`smtpflow/tests/fuzz_kernel/`, whose short run is part of `cargo xtask test`).
//!
//! The same test, built with optimisations, with many more frames and, unless `--seed` is given,
//! a fresh seed: it is printed first, and a failure names the seed and frame index that
//! reproduce it (`cargo xtask fuzz --seed S --frames N`).
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;

use crate::{cargo, is_root, run_cmd, setup};

/// Mutated frames when `--frames` is not given (each through TC ingress and XDP, a quarter of
/// them through TC egress): about five minutes on an idle 2-core machine.
pub const DEFAULT_FRAMES: u64 = 20_000_000;

/// Parses a seed written in decimal or as `0x` hex (as the test prints it).
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a seed (decimal, or hex with 0x): {e}"))
}

fn fresh_seed() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    // Mix in the pid so that two runs started in the same nanosecond still differ.
    (t.as_nanos() as u64).rotate_left(17) ^ u64::from(std::process::id())
}

pub fn fuzz(frames: Option<u64>, seed: Option<u64>) -> anyhow::Result<()> {
    setup::setup()?;
    if !is_root() {
        bail!(
            "the fuzz test runs the kernel programs with BPF_PROG_TEST_RUN, which needs root: \
             run `sudo -E cargo xtask fuzz`"
        );
    }
    let frames = frames.unwrap_or(DEFAULT_FRAMES);
    let seed = seed.unwrap_or_else(fresh_seed);
    println!("xtask fuzz: seed {seed:#x}, {frames} frames");
    run_cmd(
        cargo()
            .args(["test", "--release", "--package", "smtpflow", "--test", "fuzz_kernel"])
            .args(["--", "--exact", "differential_fuzz", "--nocapture"])
            .env("SMTPFLOW_FUZZ_SEED", format!("{seed:#x}"))
            .env("SMTPFLOW_FUZZ_FRAMES", frames.to_string()),
    )
    .map_err(|e| {
        e.context(format!(
            "the fuzz run failed; reproduce it with `cargo xtask fuzz --seed {seed:#x} --frames \
             {frames}`"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_printed() {
        assert_eq!(parse_seed("0x5eed"), Ok(0x5eed));
        assert_eq!(parse_seed("12345"), Ok(12345));
        assert_eq!(parse_seed("1_000"), Ok(1000));
        assert!(parse_seed("seed").is_err());
        let s = fresh_seed();
        assert_eq!(parse_seed(&format!("{s:#x}")), Ok(s));
    }
}
