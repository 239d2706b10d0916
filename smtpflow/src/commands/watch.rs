//! `smtpflow watch`: attach, then every `--interval` drain the maps, diagnose, and publish the
//! metrics text; a live view on a terminal, log lines elsewhere. Ctrl-C or SIGTERM detaches.
use std::{io::IsTerminal as _, sync::Arc, time::Instant};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use super::{
    observer::{Observer, log_changes, thresholds},
    runtime,
};
use crate::{
    cli::{LogFormat, WatchArgs},
    diagnose::Diagnoser,
    drain::PeerRead,
    host::privileges,
    output::{console::Reporter, http, metrics::Exporter, selfstats, web_config::WebConfig},
};

/// Runs `watch` until a signal (`Ok`) or a failure.
pub fn run(args: WatchArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let prepared = prepare(&args)?;
    runtime().block_on(serve_and_drain(args, prepared, log_format))
}

/// What `watch` sets up before its async runtime exists.
struct Prepared {
    web: Arc<WebConfig>,
    listener: std::net::TcpListener,
    obs: Observer,
}

/// Reads the web config and binds first (a bad file or a busy port fails before anything is
/// attached), attaches, then drops privileges: all while the process has one thread, since
/// capabilities belong to threads and the runtime's workers inherit what is left.
fn prepare(args: &WatchArgs) -> anyhow::Result<Prepared> {
    let web = Arc::new(match &args.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::none(),
    });
    let listener = http::bind(args.metrics_addr)?;
    let mut obs = Observer::start(&args.observe, args.max_peer_series, args.max_site_series)?;
    obs.set_peer_series_idle(args.peer_series_idle);
    if !args.keep_privileges {
        privileges::drop_after_attach(args.user.as_deref())?;
        log::info!(
            "attached; now running with CAP_NET_ADMIN only{}",
            args.user.as_deref().map(|u| format!(" as {u}")).unwrap_or_default()
        );
    }
    Ok(Prepared { web, listener, obs })
}

async fn serve_and_drain(
    args: WatchArgs,
    prepared: Prepared,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let Prepared { web, listener, mut obs } = prepared;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the metrics socket")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut exporter =
        Exporter::new(obs.ifnames(), obs.attached.attachments.clone(), obs.drop_reasons.clone());
    let mut diagnoser = Diagnoser::new(thresholds(&args.observe, args.window));
    let mut first = obs.drain(PeerRead::Now)?;
    obs.check_ifaces(&mut first)?;
    let (findings, _) = diagnoser.update(Instant::now(), obs.reading(&first));
    let rendered = selfstats::append(exporter.render(&first, &findings), &obs.attached.ebpf);
    let (tx, rx) = watch::channel(rendered);
    let server = tokio::spawn(http::serve(listener, rx, web));
    log::info!(
        "watching {} on ports {:?}; metrics on http://{}/metrics, drained every {:?}",
        obs.iface_list(),
        obs.config.ports(),
        args.metrics_addr,
        args.observe.interval
    );

    // A person at a terminal gets a live table; log shippers and journald get log lines.
    let live_view = std::io::stderr().is_terminal() && log_format == LogFormat::Text;
    let mut reporter = Reporter::new(obs.labeler.clone());
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
                let (findings, changed) = match obs.diagnose(&mut diagnoser, now, &mut snap) {
                    Ok(decided) => decided,
                    Err(e) => break Err(e.context("draining the kernel maps failed")),
                };
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
