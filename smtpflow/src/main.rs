//! The `smtpflow` command: parses the command line (and `--config`), sets up logging, and
//! hands over to [`smtpflow::commands`]. Exit codes: 0 success (`diagnose`: healthy), 1 failure
//! (`diagnose`: a cause is active), 2 `diagnose` error or a bad `--config`.
use std::{io::Write as _, process::ExitCode};

use clap::{CommandFactory as _, Parser as _};
use smtpflow::{
    cli::{Cli, Command, LogFormat, LogLevel},
    commands, config,
};

/// `--log-level` sets smtpflow's own lines (the kernel's reports included) and keeps other
/// crates' at `info` at most, so a debug run is not buried in their start-up detail; without
/// it, RUST_LOG decides, else `info`.
fn init_logging(format: LogFormat, level: Option<LogLevel>) {
    let mut builder = match level {
        Some(level) => {
            let mut b = env_logger::Builder::new();
            let own = level.filter();
            b.filter_level(own.min(log::LevelFilter::Info)).filter_module("smtpflow", own);
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    builder.format_target(false);
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}

/// Says why smtpflow stops: on stderr whatever RUST_LOG says, as JSON when logs are JSON.
fn report_error(format: LogFormat, e: &anyhow::Error) {
    match format {
        LogFormat::Text => eprintln!("smtpflow: error: {e:#}"),
        LogFormat::Json => {
            let line = serde_json::json!({"level": "ERROR", "msg": format!("{e:#}")});
            eprintln!("{line}");
        }
    }
}

/// glibc's allocator, set for a long-running daemon before the first thread starts: a fixed
/// mmap threshold (128 KiB) so that a large buffer freed goes back to the kernel, where by
/// default it raises the threshold and later ones stay in the heap; the heap trimmed above
/// 1 MiB free; two arenas, not eight a core. With 1M peers tracked the peak RSS fell from
/// 72 to 68 MiB (docs/benchmarks.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, 128 << 10),
        (libc::M_TRIM_THRESHOLD, 1 << 20),
        (libc::M_ARENA_MAX, 2),
    ] {
        // SAFETY: plain setter; on failure (0) the default stays, which is only more memory.
        unsafe { libc::mallopt(param, value) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let args = match config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smtpflow: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format, cli.log_level);
    match cli.command {
        Command::Watch(args) => match commands::watch::run(args, cli.log_format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report_error(cli.log_format, &e);
                ExitCode::FAILURE
            }
        },
        Command::Diagnose(args) => match commands::diagnose::run(args) {
            Ok(healthy) => ExitCode::from(if healthy { 0 } else { 1 }),
            Err(e) => {
                report_error(cli.log_format, &e);
                ExitCode::from(2)
            }
        },
        Command::Check(args) => {
            let (table, passed) = commands::check::render(&commands::check::run(&args));
            print!("{table}");
            if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "smtpflow", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("smtpflow: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
