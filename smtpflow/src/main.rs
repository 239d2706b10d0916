//! smtpflow: SMTP handshake and TCP pressure observer for mail gateways.
mod attach;
mod batch;
mod btf;
mod check;
mod cli;
mod config;
mod diagnose;
mod drain;
mod drops;
mod export;
mod peer_label;
mod peers;
mod pressure;
mod privileges;
#[cfg(test)]
mod proptests;
mod report;
mod selfstats;
mod serve;
mod web;

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use smtpflow_common::Config;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    attach::{Attached, Iface},
    cli::{Cli, Command, DiagnoseArgs, LogFormat, ObserveArgs, WatchArgs},
    diagnose::{Diagnoser, Finding, Reading, Thresholds},
    drain::{Maps, PeerRead, Snapshot},
    drops::DropReasons,
    export::Exporter,
    report::Reporter,
};

fn init_logging(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
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

fn main() -> ExitCode {
    let args = match config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smtpflow: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("starting the async runtime")
    };
    match cli.command {
        Command::Watch(args) => match prepare_watch(&args)
            .and_then(|prepared| runtime().block_on(run_watch(args, prepared, cli.log_format)))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report_error(cli.log_format, &e);
                ExitCode::FAILURE
            }
        },
        Command::Diagnose(args) => match runtime().block_on(run_diagnose(args)) {
            Ok(healthy) => ExitCode::from(if healthy { 0 } else { 1 }),
            Err(e) => {
                report_error(cli.log_format, &e);
                ExitCode::from(2)
            }
        },
        Command::Check(args) => {
            let (table, passed) = check::render(&check::run(&args));
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

/// The kernel programs attached and their maps: what `watch` and `diagnose` share.
struct Observer {
    attached: Attached,
    maps: Maps,
    ifaces: Vec<Iface>,
    config: Config,
    drop_reasons: Option<DropReasons>,
    labeler: peer_label::PeerLabel,
    /// Whether each watched interface still exists (same order as `ifaces`).
    present: Vec<bool>,
    pressure: pressure::Reader,
}

impl Observer {
    /// Checks privileges and flags, loads, attaches and seeds the maps. `max_peer_series`: how
    /// many peers the per-peer readings keep for export (`diagnose` exports none).
    fn start(args: &ObserveArgs, max_peer_series: usize) -> anyhow::Result<Self> {
        args.validate().map_err(anyhow::Error::msg)?;
        let labeler = args.peer_labeler()?;
        privileges::require()?;
        let pressure = pressure::Reader::from_env()?;
        let ifaces =
            args.ifaces.iter().map(|n| Iface::lookup(n)).collect::<anyhow::Result<Vec<_>>>()?;
        let config =
            Config::from_ports(&args.ports.0, &args.plaintext_ports()).context("too many ports")?;
        let (drop_config, drop_reasons) = match drops::prepare() {
            Ok((c, r)) => (c, Some(r)),
            Err(e) => {
                log::warn!(
                    "SYN drop reasons are not available on this kernel: {e:#}; carrying on \
                     without smtpflow_syn_drops_total"
                );
                (smtpflow_common::DropConfig::DISABLED, None)
            }
        };
        let sizes = attach::Sizes { max_peers: args.max_peers, max_flows: args.max_flows };
        let ebpf = attach::load(&config, &drop_config, &sizes)?;
        let mut attached = attach::attach(ebpf, &ifaces, args.mode, args.tc_link)?;
        let drop_reasons =
            drop_reasons.and_then(|r| match attach::attach_drop_reasons(&mut attached) {
                Ok(()) => Some(r),
                Err(e) => {
                    log::warn!(
                        "SYN drop reasons are not available: {e:#}; carrying on without \
                     smtpflow_syn_drops_total"
                    );
                    None
                }
            });
        let mut maps = Maps::take(
            &mut attached.ebpf,
            args.max_peers,
            args.max_flows,
            args.handshake_timeout,
            max_peer_series,
        )?;
        let ifindexes: Vec<u32> = ifaces.iter().map(|i| i.index).collect();
        maps.seed(&ifindexes, config.ports())?;
        let present = vec![true; ifaces.len()];
        Ok(Self { attached, maps, ifaces, config, drop_reasons, labeler, pressure, present })
    }

    fn ifnames(&self) -> HashMap<u32, String> {
        self.ifaces.iter().map(|i| (i.index, i.name.clone())).collect()
    }

    fn iface_list(&self) -> String {
        self.ifaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Drains the maps and reads the pressure signals (blocking syscalls, off the async workers).
    fn drain(&mut self, peers: PeerRead) -> anyhow::Result<Snapshot> {
        tokio::task::block_in_place(|| {
            let mut snap = self.maps.drain(peers)?;
            snap.pressure = self.pressure.read();
            Ok(snap)
        })
    }

    /// Notices watched interfaces that disappear (their programs go with them: smtpflow keeps
    /// serving, says so once, and exports `smtpflow_interface_up 0`) and come back: then it
    /// stops with an error, so that the service manager restarts it and it attaches again (it
    /// has dropped the privileges to attach by itself). No crash loop while an interface is gone.
    fn check_ifaces(&mut self, snap: &mut Snapshot) -> anyhow::Result<()> {
        for (iface, present) in self.ifaces.iter().zip(self.present.iter_mut()) {
            let now = Iface::lookup(&iface.name).ok().map(|i| i.index);
            match (now, *present) {
                (None, true) => {
                    log::warn!(
                        "interface {} disappeared; smtpflow keeps serving and restarts when it comes back",
                        iface.name
                    );
                    *present = false;
                }
                (Some(index), false) => anyhow::bail!(
                    "interface {} is back (ifindex {index}); exiting so that the service manager \
                     restarts smtpflow and it attaches again",
                    iface.name
                ),
                (Some(index), true) if index != iface.index => anyhow::bail!(
                    "interface {} was replaced (ifindex {} is now {index}); exiting so that the \
                     service manager restarts smtpflow and it attaches again",
                    iface.name,
                    iface.index
                ),
                _ => {}
            }
            snap.ifaces_up.push((iface.name.clone(), *present));
        }
        Ok(())
    }

    /// What the diagnosis needs from a snapshot.
    fn reading(&self, snap: &Snapshot) -> Reading {
        let names = self.ifnames();
        Reading::from_snapshot(snap, self.drop_reasons.as_ref(), &self.labeler, |i| {
            names.get(&i).cloned().unwrap_or_else(|| format!("ifindex{i}"))
        })
    }
}

fn thresholds(args: &ObserveArgs, window: Duration) -> Thresholds {
    Thresholds {
        window,
        conntrack_fill: args.conntrack_fill,
        min_failures: args.min_failures,
        min_zero_windows: args.min_zero_windows,
    }
}

/// Logs the causes that turned on or off.
fn log_changes(changed: &[Finding]) {
    for f in changed {
        if f.active {
            log::warn!("diagnosis: {} is active: {}", f.cause.label(), f.summary);
        } else {
            log::info!("diagnosis: {} is over", f.cause.label());
        }
    }
}

/// What `watch` sets up before its async runtime exists.
struct Prepared {
    web: Arc<web::WebConfig>,
    listener: std::net::TcpListener,
    obs: Observer,
}

/// Reads the web config and binds first (a bad file or a busy port fails before anything is
/// attached), attaches, then drops privileges: all while the process has one thread, since
/// capabilities belong to threads and the runtime's workers inherit what is left.
fn prepare_watch(args: &WatchArgs) -> anyhow::Result<Prepared> {
    let web = Arc::new(match &args.web_config_file {
        Some(path) => web::WebConfig::load(path)?,
        None => web::WebConfig::none(),
    });
    let listener = serve::bind(args.metrics_addr)?;
    let obs = Observer::start(&args.observe, args.max_peer_series)?;
    if !args.keep_privileges {
        privileges::drop_after_attach(args.user.as_deref())?;
        log::info!(
            "attached; now running with CAP_NET_ADMIN only{}",
            args.user.as_deref().map(|u| format!(" as {u}")).unwrap_or_default()
        );
    }
    Ok(Prepared { web, listener, obs })
}

async fn run_watch(
    args: WatchArgs,
    prepared: Prepared,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let Prepared { web, listener, mut obs } = prepared;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the metrics socket")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut exporter = Exporter::new(
        obs.ifnames(),
        obs.attached.attachments.clone(),
        obs.drop_reasons.clone(),
        obs.labeler.clone(),
    );
    let mut diagnoser = Diagnoser::new(thresholds(&args.observe, args.window));
    let mut first = obs.drain(PeerRead::Now)?;
    obs.check_ifaces(&mut first)?;
    let (findings, _) = diagnoser.update(Instant::now(), obs.reading(&first));
    let rendered = selfstats::append(exporter.render(&first, &findings), &obs.attached.ebpf);
    let (tx, rx) = watch::channel(rendered);
    let server = tokio::spawn(serve::serve(listener, rx, web));
    log::info!(
        "watching {} on ports {:?}; metrics on http://{}/metrics, drained every {:?}",
        obs.iface_list(),
        obs.config.ports(),
        args.metrics_addr,
        args.observe.interval
    );

    // A person at a terminal gets a live table; log shippers and journald get log lines.
    let live_view = std::io::stderr().is_terminal() && log_format == LogFormat::Text;
    let mut reporter = Reporter::new();
    reporter.line(&first, Instant::now());
    let mut last_status = Instant::now();
    let mut tick = tokio::time::interval(args.observe.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let mut snap = match obs.drain(PeerRead::WhenDue) {
                    Ok(s) => s,
                    Err(e) => break Err(e.context("draining the kernel maps failed")),
                };
                if let Err(e) = obs.check_ifaces(&mut snap) {
                    break Err(e);
                }
                let now = Instant::now();
                let (findings, changed) = diagnoser.update(now, obs.reading(&snap));
                log_changes(&changed);
                let rendered = exporter.render(&snap, &findings);
                tx.send_replace(selfstats::append(rendered, &obs.attached.ebpf));
                if !args.status_every.is_zero() && now.duration_since(last_status) >= args.status_every {
                    if live_view {
                        // Clear the terminal and draw the table from its top-left corner.
                        eprint!("\x1b[2J\x1b[H{}", reporter.table(&snap, &findings, &obs.iface_list(), now));
                    } else if let Some(line) = reporter.line(&snap, now) {
                        log::info!("{line}");
                    }
                    last_status = now;
                }
            }
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = sigterm.recv() => break Ok("SIGTERM"),
        }
    };
    server.abort();
    let ifaces = obs.iface_list();
    drop(obs);
    match result {
        Ok(signal) => {
            log::info!("{signal}: detached from {ifaces}; exiting");
            Ok(())
        }
        Err(e) => Err(e.context("detached")),
    }
}

/// Observes for `--for`, then prints the verdict. `Ok(true)`: healthy.
async fn run_diagnose(args: DiagnoseArgs) -> anyhow::Result<bool> {
    let mut obs = Observer::start(&args.observe, 0)?;
    // The window spans the whole observation: a little longer than --for, so that the baseline
    // taken before the first tick stays the baseline to the end.
    let window = args.duration + 2 * args.observe.interval;
    let mut diagnoser = Diagnoser::new(thresholds(&args.observe, window));
    let started = Instant::now();
    let first = obs.drain(PeerRead::Now)?;
    diagnoser.update(started, obs.reading(&first));
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(args.observe.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let snap = obs.drain(PeerRead::WhenDue)?;
                diagnoser.update(Instant::now(), obs.reading(&snap));
            }
            _ = &mut deadline => break,
            _ = sigint.recv() => break,
        }
    }
    // The verdict names the peers of the last moment, however large the maps.
    let snap = obs.drain(PeerRead::Now)?;
    let (findings, _) = diagnoser.update(Instant::now(), obs.reading(&snap));
    let observed = started.elapsed();
    let healthy = findings.iter().all(|f| !f.active);
    if args.json {
        println!("{}", diagnose::to_json(&findings, &obs.iface_list(), observed));
    } else {
        print!("{}", diagnose::to_text(&findings, &obs.iface_list(), observed));
    }
    Ok(healthy)
}
