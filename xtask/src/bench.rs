//! `cargo xtask bench`: smtpflow against the floor (empty eBPF programs) and the alternative
//! (tcpdump), side by side. The benchmarks live in `smtpflow/benches/bench/` (a `harness = false`
//! bench of the smtpflow package, so that they embed the very kernel object the binary embeds,
//! from the package's OUT_DIR); this builds the release binary they drive and runs them as root.
//! Results: a Markdown table on stdout, also written to `target/bench/results.md` (full runs are
//! copied by hand into `docs/benchmarks.md` with the analysis).
use std::process::Command;

use anyhow::bail;

use crate::{cargo, is_root, run_cmd, workspace_root};

/// The benchmarks, for `--only`.
pub const ALL: &[&str] = &["kernel", "live", "churn", "scale"];

/// Runs the benchmarks against `bin` (the release smtpflow). `smoke`: tiny counts (seconds),
/// for CI; the numbers mean nothing then, and no target is asserted either way. `skip_log`: the
/// file where a benchmark notes a check it skipped or weakened (see `skips`).
pub fn bench(
    bin: &std::path::Path,
    smoke: bool,
    only: &[String],
    skip_log: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks need root (BPF, network namespaces): run `sudo -E cargo xtask bench`"
        );
    }
    for o in only {
        if !ALL.contains(&o.as_str()) {
            bail!("unknown benchmark {o:?}; choose from {}", ALL.join(", "));
        }
    }
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let results = out_dir.join(if smoke { "smoke.md" } else { "results.md" });
    let mut cmd = cargo();
    cmd.args(["bench", "--package", "smtpflow", "--bench", "bench", "--"])
        .arg("--bin")
        .arg(bin)
        .arg("--markdown")
        .arg(&results);
    if smoke {
        cmd.arg("--smoke");
    }
    if !only.is_empty() {
        cmd.args(["--only", &only.join(",")]);
    }
    if let Some(log) = skip_log {
        cmd.env(crate::skips::VAR, log);
    }
    run_cmd(&mut cmd)?;
    eprintln!("bench: results in {}", results.display());
    Ok(())
}

/// The tools the network benchmarks run, for a clear message before anything starts.
pub fn check_tools() -> anyhow::Result<()> {
    for tool in ["iperf3", "tcpdump", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    Ok(())
}
