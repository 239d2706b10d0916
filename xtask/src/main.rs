//! Set-up, build, run and test orchestration for smtpflow: what cargo alone cannot do.
//!
//! `cargo xtask run -- watch --iface eth0` and `cargo xtask test` are the README's two
//! commands; both start with an idempotent `setup`.
mod bench;
mod deb;
mod fuzz;
mod kernel;
mod setup;
mod skips;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "smtpflow's set-up, build, run and test commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages, nightly rust-src, bpf-linker. Idempotent.
    Setup,
    /// Set up and build target/release/smtpflow (kernel programs embedded).
    Build,
    /// Set up, build, and run smtpflow as root with the given arguments.
    Run {
        /// Arguments for smtpflow, e.g. `watch --iface eth0`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, lint, and run every test (unit and root integration tests).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Skip the lints (fmt, clippy on userspace and on the kernel crate).
        #[arg(long)]
        no_lint: bool,
        /// Instead: boot this Debian kernel (6.1, 6.12) in a QEMU VM and run the kernel suite
        /// there (or the tests matching the filter). No lints, no unit tests.
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
    },
    /// The kernel suite on the host kernel and on each Debian kernel of the matrix (6.1, 6.12),
    /// each in a QEMU VM, then one table.
    Matrix {
        /// Only the Debian kernels, not the host's.
        #[arg(long)]
        no_host: bool,
    },
    /// Format check and clippy for userspace and the kernel crate.
    Lint,
    /// Set up, build, and make the Debian package in target/debian/.
    Deb,
    /// Set up, build, and run the benchmarks as root (see docs/benchmarks.md).
    Bench {
        /// Tiny counts, seconds in all: checks that every benchmark still works.
        #[arg(long)]
        smoke: bool,
        /// Only these benchmarks (comma separated): kernel, live, churn, scale.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The long run of the kernel parser's differential fuzz test (root).
    Fuzz {
        /// Mutated frames, each through TC ingress and XDP [default: 20000000].
        #[arg(long)]
        frames: Option<u64>,
        /// Seed (decimal or 0x hex) [default: a fresh one, printed].
        #[arg(long, value_parser = fuzz::parse_seed)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with its description when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot start {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build() -> anyhow::Result<PathBuf> {
    setup::setup()?;
    run_cmd(cargo().args(["build", "--release", "--package", "smtpflow"]))?;
    Ok(workspace_root().join("target/release/smtpflow"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn lint() -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "smtpflow-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate only builds for the BPF target, with nightly and build-std.
    run_cmd(
        Command::new("rustup")
            .args(["run", "nightly", "cargo", "clippy", "--package", "smtpflow-ebpf", "--release"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env("CARGO_TARGET_DIR", workspace_root().join("target/ebpf-lint")),
    )
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => build().map(|p| println!("built {}", p.display())),
        Cmd::Run { args } => {
            let bin = build()?;
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                let mut c = Command::new("sudo");
                c.arg(&bin);
                c
            };
            run_cmd(cmd.args(&args))
        }
        Cmd::Bench { smoke, only } => {
            bench::check_tools()?;
            bench::bench(&build()?, smoke, &only, None)
        }
        Cmd::Fuzz { frames, seed } => fuzz::fuzz(frames, seed),
        Cmd::Lint => {
            setup::setup()?;
            lint()
        }
        Cmd::Deb => deb::build(&build()?).map(|p| println!("built {}", p.display())),
        Cmd::Test { filter, kernel: Some(version), .. } => {
            if !is_root() {
                bail!("the kernel suite needs root (apt, network namespaces, BPF in the VM)");
            }
            let run = kernel::test_kernel(&version, filter.as_deref())?;
            if !run.passed() {
                bail!("the kernel suite failed on {version}: see target/kernels/{version}/");
            }
            Ok(())
        }
        Cmd::Matrix { no_host } => {
            if !is_root() {
                bail!("the kernel matrix needs root (apt, network namespaces, BPF)");
            }
            if !kernel::matrix(!no_host)? {
                bail!("the kernel matrix has failures (table above; logs in target/kernels/)");
            }
            Ok(())
        }
        Cmd::Test { filter, no_lint, kernel: None } => {
            let bin = build()?;
            if !no_lint {
                lint()?;
            }
            if !is_root() {
                bail!(
                    "the integration tests need root (network namespaces, BPF): run `sudo -E cargo xtask test`"
                );
            }
            let filter: Vec<String> = filter.into_iter().collect();
            let skips = skips::SkipLog::fresh(workspace_root().join("target/xtask/skipped.txt"))?;
            let result = test_all(&bin, &filter, &skips);
            println!("\n{}", skips.section(&kernel::host_uname()));
            result
        }
    }
}

/// Unit tests, the benchmarks once (smoke), then the integration tests; the benchmarks and the
/// integration tests note what they skip or weaken in `skips`.
fn test_all(bin: &Path, filter: &[String], skips: &skips::SkipLog) -> anyhow::Result<()> {
    // Unit tests of every userspace crate, and the kernel programs' fuzz test (root).
    run_cmd(
        cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "smtpflow-ebpf",
                "--exclude",
                "smtpflow-tests",
            ])
            .args(filter)
            .env(skips::VAR, skips.path()),
    )?;
    // Every benchmark once with tiny counts, so they keep working (no timing asserted).
    if filter.is_empty() {
        bench::bench(bin, true, &[], Some(skips.path()))?;
    }
    // Integration tests against the release binary, one at a time: some assert on
    // system-wide state (programs loaded, links attached).
    run_cmd(
        cargo()
            .args(["test", "--package", "smtpflow-tests"])
            .args(filter)
            .args(["--", "--test-threads=1"])
            .env("SMTPFLOW_BIN", bin)
            .env(skips::VAR, skips.path()),
    )
}
