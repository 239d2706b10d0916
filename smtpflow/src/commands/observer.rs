//! What `watch` and `diagnose` share: the programs loaded, attached and their maps seeded
//! ([`Observer::start`]), each drain with the pressure signals beside it, the watched interfaces
//! checked, and the diagnosis's reading of a snapshot.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use smtpflow_common::Config;

use super::reading;
use crate::{
    cli::ObserveArgs,
    diagnose::{Diagnoser, Finding, Reading, Thresholds},
    drain::{Maps, PeerRead, Snapshot},
    host::{pressure, privileges},
    kernel::{
        self,
        attach::{self, Attached, Iface},
        drop_reasons::{self, DropReasons},
    },
    output::peer_label::PeerLabel,
    sites::{SiteMap, Sites},
};

/// The kernel programs attached and their maps: what `watch` and `diagnose` share.
pub struct Observer {
    pub attached: Attached,
    maps: Maps,
    ifaces: Vec<Iface>,
    pub config: Config,
    pub drop_reasons: Option<DropReasons>,
    pub labeler: PeerLabel,
    /// Whether each watched interface still exists (same order as `ifaces`).
    present: Vec<bool>,
    pressure: pressure::Reader,
    /// The kernel programs' reports (aya-log records), logged at each drain.
    kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Observer {
    /// Checks privileges and flags, loads, attaches and seeds the maps. `max_peer_series`: how
    /// many peers the per-peer readings keep for export (`diagnose` exports none);
    /// `max_site_series`: how many sites get their own series.
    pub fn start(
        args: &ObserveArgs,
        max_peer_series: usize,
        max_site_series: usize,
    ) -> anyhow::Result<Self> {
        args.validate().map_err(anyhow::Error::msg)?;
        let labeler = args.peer_labeler()?;
        let site_map = match &args.site_map {
            Some(path) => SiteMap::load(path)?,
            None => SiteMap::default(),
        };
        privileges::require()?;
        let pressure = pressure::Reader::from_env(&args.ports.0)?;
        let ifaces =
            args.ifaces.iter().map(|n| Iface::lookup(n)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut config =
            Config::from_ports(&args.ports.0, &args.plaintext_ports()).context("too many ports")?;
        // The kernel decides from this whether an answer came in time; the sweep uses the same.
        config.handshake_timeout_ns =
            u64::try_from(args.handshake_timeout.as_nanos()).unwrap_or(u64::MAX);
        config.peer_log = args.peer_counts.config();
        let (drop_config, drop_reasons) = match drop_reasons::prepare() {
            Ok((c, r)) => (c, Some(r)),
            Err(e) => {
                log::warn!(
                    "SYN drop reasons are not available on this kernel: {e:#}; carrying on \
                     without smtpflow_syn_drops_total"
                );
                (smtpflow_common::DropConfig::DISABLED, None)
            }
        };
        let ifindexes: Vec<u32> = ifaces.iter().map(|i| i.index).collect();
        config.set_ifaces(&ifindexes).with_context(|| {
            format!(
                "interface indexes {ifindexes:?}: smtpflow tells watched interfaces apart by \
                 the low 16 bits of their index; watch these interfaces from two smtpflow \
                 processes"
            )
        })?;
        let sizes = kernel::Sizes { max_peers: args.max_peers, max_flows: args.max_flows };
        let log_level = kernel::kernel_log_level();
        let mut ebpf = kernel::load(&config, &drop_config, &sizes, log_level)?;
        if log_level >= aya_log::Level::Debug as u8 {
            log::debug!(
                "the kernel programs report their failures here (\"kernel: …\"), each on its \
                 1st, 2nd, 4th, 8th… time on a CPU; smtpflow_lost_events_total, \
                 smtpflow_peer_insert_failures_total, smtpflow_flow_insert_failures_total and \
                 smtpflow_payload_events_lost_total count every one"
            );
        }
        // Read even when the level is 0 (no record is then written): one ring buffer, no task.
        let kernel_log = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| {
                log::warn!("the kernel programs' reports cannot be read ({e}); carrying on")
            })
            .ok();
        let mut attached = attach::attach(ebpf, &ifaces, args.mode, args.tc_link, args.xdp_mode)?;
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
            &config,
            &sizes,
            args.handshake_timeout,
            max_peer_series,
            labeler.clone(),
            Sites::new(site_map, max_site_series, config.ports()),
        )?;
        maps.seed(&config);
        let present = vec![true; ifaces.len()];
        Ok(Self {
            attached,
            maps,
            ifaces,
            config,
            drop_reasons,
            labeler,
            pressure,
            present,
            kernel_log,
        })
    }

    /// Sets `--peer-series-idle` (`watch` only).
    pub fn set_peer_series_idle(&mut self, idle: Duration) {
        self.maps.set_peer_series_idle(idle);
    }

    pub fn ifnames(&self) -> HashMap<u32, String> {
        self.ifaces.iter().map(|i| (i.index, i.name.clone())).collect()
    }

    pub fn iface_list(&self) -> String {
        self.ifaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Drains the maps and the payload events, and reads the pressure signals (blocking
    /// syscalls, off the async workers).
    pub fn drain(&mut self, peers: PeerRead) -> anyhow::Result<Snapshot> {
        tokio::task::block_in_place(|| {
            if let Some(l) = &mut self.kernel_log {
                l.flush();
            }
            // Payload events first: the names they say are learnt before this drain's read of
            // the per-peer maps, whose rises then go to the sites just named.
            let mut payloads = Vec::new();
            self.maps.read_payloads(|e| payloads.push(*e));
            self.maps.learn_names(&payloads);
            let mut snap = self.maps.drain(peers)?;
            snap.payloads = payloads;
            snap.tls = self.maps.count_payloads(&snap.payloads).clone();
            snap.pressure = self.pressure.read();
            Ok(snap)
        })
    }

    /// Notices watched interfaces that disappear (their programs go with them: smtpflow keeps
    /// serving, says so once, and exports `smtpflow_interface_up 0`) and come back: then it
    /// stops with an error, so that the service manager restarts it and it attaches again (it
    /// has dropped the privileges to attach by itself). No crash loop while an interface is gone.
    pub fn check_ifaces(&mut self, snap: &mut Snapshot) -> anyhow::Result<()> {
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

    /// Adds `snap` to the diagnosis. When a cause turns on and the snapshot's per-peer view is
    /// an earlier reading (the per-peer maps are read on a CPU budget), the maps are drained
    /// again at once and `snap` becomes that fresher snapshot, so that the finding, its log line
    /// and the exported top peers name the peers behind the failures that turned it on.
    pub fn diagnose(
        &mut self,
        diagnoser: &mut Diagnoser,
        now: Instant,
        snap: &mut Snapshot,
    ) -> anyhow::Result<(Vec<Finding>, Vec<Finding>)> {
        let reading = self.reading(snap);
        let peers_fresh = snap.peers_fresh;
        let mut refreshed = None;
        let decided = diagnoser.update_then(now, reading, || {
            if peers_fresh {
                return Ok(None);
            }
            let fresh = self.drain(PeerRead::Now)?;
            let reading = self.reading(&fresh);
            refreshed = Some(fresh);
            anyhow::Ok(Some(reading))
        })?;
        if let Some(mut fresh) = refreshed {
            fresh.ifaces_up = std::mem::take(&mut snap.ifaces_up);
            // Each payload event is read once: the earlier snapshot's come first.
            let mut payloads = std::mem::take(&mut snap.payloads);
            payloads.append(&mut fresh.payloads);
            fresh.payloads = payloads;
            *snap = fresh;
        }
        Ok(decided)
    }

    /// What the diagnosis needs from a snapshot.
    pub fn reading(&self, snap: &Snapshot) -> Reading {
        let names = self.ifnames();
        reading::of_snapshot(snap, self.drop_reasons.as_ref(), &self.labeler, |i| {
            names.get(&i).cloned().unwrap_or_else(|| format!("ifindex{i}"))
        })
    }
}

pub fn thresholds(args: &ObserveArgs, window: Duration) -> Thresholds {
    Thresholds {
        window,
        conntrack_fill: args.conntrack_fill,
        min_failures: args.min_failures,
        min_share: args.min_share,
        min_zero_windows: args.min_zero_windows,
    }
}

/// Logs the causes that turned on or off.
pub fn log_changes(changed: &[Finding]) {
    for f in changed {
        if f.active {
            log::warn!("diagnosis: {} is active: {}", f.cause.label(), f.summary);
        } else {
            log::info!("diagnosis: {} is over", f.cause.label());
        }
    }
}
