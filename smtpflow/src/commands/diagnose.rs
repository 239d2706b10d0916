//! `smtpflow diagnose`: observe for `--for`, then print one verdict (text or JSON).
use std::time::Instant;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{
    observer::{Observer, thresholds},
    runtime,
};
use crate::{
    cli::DiagnoseArgs,
    diagnose::{Diagnoser, to_json, to_text},
    drain::PeerRead,
};

/// Runs `diagnose`. `Ok(true)`: healthy.
pub fn run(args: DiagnoseArgs) -> anyhow::Result<bool> {
    runtime().block_on(observe(args))
}

/// Observes for `--for`, then prints the verdict. `Ok(true)`: healthy.
async fn observe(args: DiagnoseArgs) -> anyhow::Result<bool> {
    let mut obs =
        Observer::start(&args.observe, 0, crate::sites::attribute::DEFAULT_MAX_SITE_SERIES)?;
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
        println!("{}", to_json(&findings, &obs.iface_list(), observed));
    } else {
        print!("{}", to_text(&findings, &obs.iface_list(), observed));
    }
    Ok(healthy)
}
