//! smtpflow: SMTP handshake and TCP pressure observer for mail gateways.
mod attach;
mod btf;
mod cli;
mod drain;
mod drops;
mod export;
mod privileges;
mod report;
mod serve;

use std::{collections::HashMap, process::ExitCode, time::Instant};

use anyhow::Context as _;
use clap::Parser as _;
use smtpflow_common::Config;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    attach::Iface,
    cli::{Cli, Command, WatchArgs},
    drain::Maps,
    export::Exporter,
    report::Reporter,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch(args) => run_watch(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtpflow: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_watch(args: WatchArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    privileges::require()?;
    let ifaces =
        args.ifaces.iter().map(|n| Iface::lookup(n)).collect::<anyhow::Result<Vec<_>>>()?;
    let config =
        Config::from_ports(&args.ports.0, &args.plaintext_ports()).context("too many ports")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(watch(args, ifaces, config))
}

async fn watch(args: WatchArgs, ifaces: Vec<Iface>, config: Config) -> anyhow::Result<()> {
    // Bind first: a busy port fails before anything is attached.
    let listener = serve::bind(args.metrics_addr).await?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let (drop_config, drop_reasons) = match drops::prepare() {
        Ok((c, r)) => (c, Some(r)),
        Err(e) => {
            log::warn!(
                "SYN drop reasons are not available on this kernel: {e:#}; carrying on without smtpflow_syn_drops_total"
            );
            (smtpflow_common::DropConfig::DISABLED, None)
        }
    };
    let sizes = attach::Sizes { max_peers: args.max_peers, max_flows: args.max_flows };
    let ebpf = attach::load(&config, &drop_config, &sizes)?;
    let mut attached = attach::attach(ebpf, &ifaces, args.mode, args.tc_link)?;
    let drop_reasons = match drop_reasons {
        Some(r) => match attach::attach_drop_reasons(&mut attached) {
            Ok(()) => Some(r),
            Err(e) => {
                log::warn!(
                    "SYN drop reasons are not available: {e:#}; carrying on without smtpflow_syn_drops_total"
                );
                None
            }
        },
        None => None,
    };
    let mut maps =
        Maps::take(&mut attached.ebpf, args.max_peers, args.max_flows, args.handshake_timeout)?;
    let ifindexes: Vec<u32> = ifaces.iter().map(|i| i.index).collect();
    maps.seed(&ifindexes, config.ports())?;

    let exporter = Exporter::new(
        ifaces.iter().map(|i| (i.index, i.name.clone())).collect::<HashMap<_, _>>(),
        args.max_peer_series,
        attached.attachments.clone(),
        drop_reasons,
    );
    let first = maps.drain()?;
    let (tx, rx) = watch::channel(exporter.render(&first));
    let server = tokio::spawn(serve::serve(listener, rx));
    log::info!(
        "watching {} on ports {:?}; metrics on http://{}/metrics, drained every {:?}",
        args.ifaces.join(", "),
        config.ports(),
        args.metrics_addr,
        args.interval
    );

    let mut reporter = Reporter::new();
    reporter.line(&first, Instant::now());
    let mut last_status = Instant::now();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let snap = match tokio::task::block_in_place(|| maps.drain()) {
                    Ok(s) => s,
                    Err(e) => break Err(e),
                };
                tx.send_replace(exporter.render(&snap));
                let now = Instant::now();
                if !args.status_every.is_zero() && now.duration_since(last_status) >= args.status_every {
                    if let Some(line) = reporter.line(&snap, now) {
                        eprintln!("{line}");
                    }
                    last_status = now;
                }
            }
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = sigterm.recv() => break Ok("SIGTERM"),
        }
    };
    server.abort();
    drop(maps);
    drop(attached);
    match result {
        Ok(signal) => {
            log::info!("{signal}: detached from {}; exiting", args.ifaces.join(", "));
            Ok(())
        }
        Err(e) => Err(e.context("draining the kernel maps failed; detached")),
    }
}
