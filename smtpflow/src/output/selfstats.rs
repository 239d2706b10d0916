//! smtpflow's own figures: its maps' fill, evictions and the kernel programs' bookkeeping
//! ([`render_health`]), and the kernel programs' cost, from the kernel's per-program accounting
//! (`run_cnt` and `run_time_ns` of `bpf_prog_info`): `smtpflow_ebpf_program_runs_total{program}`
//! and `smtpflow_ebpf_program_run_seconds_total{program}`.
//!
//! The kernel keeps these only while accounting is on: `sysctl kernel.bpf_stats_enabled=1`, or
//! while some process holds a `BPF_ENABLE_STATS` file descriptor (which the sysctl does not show).
//! Accounting costs two clock reads per program run, so it is off by default and smtpflow never
//! turns it on. The families are exported while the sysctl is 1, or once any of our programs has
//! been counted (the counters then keep their last value while accounting is off).
use aya::Ebpf;
use bytes::{BufMut as _, Bytes, BytesMut};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{MetricFamily, MetricType},
};
use smtpflow_common::Stat;

use super::families::Family;
use crate::drain::Snapshot;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One loaded program's accumulated cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
}

/// Whether `kernel.bpf_stats_enabled` is 1.
pub fn sysctl_enabled() -> bool {
    std::fs::read_to_string(STATS_SYSCTL).is_ok_and(|s| s.trim() == "1")
}

/// The cost of every loaded program of `ebpf`, by name. One `BPF_OBJ_GET_INFO_BY_FD` each.
pub fn read(ebpf: &Ebpf) -> Vec<ProgramCost> {
    let mut costs: Vec<ProgramCost> = ebpf
        .programs()
        .filter_map(|(name, prog)| {
            // Programs that were never loaded (e.g. XDP in tc mode) have no info.
            let info = prog.info().ok()?;
            Some(ProgramCost {
                program: name.to_owned(),
                runs: info.run_count(),
                run_ns: info.run_time().as_nanos() as u64,
            })
        })
        .collect();
    costs.sort_by(|a, b| a.program.cmp(&b.program));
    costs
}

fn counter_family(
    name: &'static str,
    help: &'static str,
    costs: &[ProgramCost],
    value: impl Fn(&ProgramCost) -> f64,
) -> Option<MetricFamily> {
    let mut family = Family::new(name, MetricType::COUNTER, help);
    for c in costs {
        family.add(&[("program", &c.program)], value(c));
    }
    let mut out = Vec::new();
    family.finish(&mut out);
    out.pop()
}

/// The two families, or none while accounting is off and has never counted our programs.
pub fn families(costs: &[ProgramCost], sysctl_on: bool) -> Vec<MetricFamily> {
    if costs.is_empty() || !(sysctl_on || costs.iter().any(|c| c.runs > 0)) {
        return Vec::new();
    }
    [
        counter_family(
            "smtpflow_ebpf_program_runs_total",
            "Runs of each smtpflow kernel program, counted by the kernel while kernel.bpf_stats_enabled=1.",
            costs,
            |c| c.runs as f64,
        ),
        counter_family(
            "smtpflow_ebpf_program_run_seconds_total",
            "CPU time spent in each smtpflow kernel program, counted by the kernel while kernel.bpf_stats_enabled=1.",
            costs,
            |c| c.run_ns as f64 / 1e9,
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Appends the kernel programs' cost to a rendering of the other metrics (Prometheus text
/// families may follow one another).
pub fn append(rendered: Bytes, ebpf: &Ebpf) -> Bytes {
    let fams = families(&read(ebpf), sysctl_enabled());
    if fams.is_empty() {
        return rendered;
    }
    let mut text = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&fams, &mut text) {
        log::warn!("rendering the kernel programs' cost failed: {e}");
        return rendered;
    }
    let mut out = BytesMut::with_capacity(rendered.len() + text.len());
    out.put(rendered);
    out.put_slice(&text);
    out.freeze()
}

/// smtpflow's own health: map fill, evictions, and the kernel programs' bookkeeping.
pub fn render_health(snap: &Snapshot, out: &mut Vec<MetricFamily>) {
    let mut entries = Family::new(
        "smtpflow_map_entries",
        MetricType::GAUGE,
        "Entries in a kernel map (an LRU map's may pass its capacity by the room it is created with).",
    );
    entries.add(&[("map", "peers")], snap.peers.entries as f64);
    entries.add(&[("map", "peer_replies")], snap.peers.reply_entries as f64);
    entries.add(&[("map", "flows")], snap.flows as f64);
    entries.add(&[("map", "counters")], snap.counters.len() as f64);
    entries.finish(out);
    let mut cap = Family::new(
        "smtpflow_map_capacity",
        MetricType::GAUGE,
        "Entries a kernel map holds with none evicted: --max-peers, 4 a peer for peer_replies, --max-flows (each LRU map is created 128 x (CPUs + 1) entries larger, the free entries Linux may keep aside; the flow table has twice the ways).",
    );
    cap.add(&[("map", "peers")], f64::from(snap.peers_capacity));
    cap.add(&[("map", "peer_replies")], f64::from(snap.peer_replies_capacity));
    cap.add(&[("map", "flows")], f64::from(snap.flows_capacity));
    cap.add(&[("map", "counters")], f64::from(smtpflow_common::COUNTERS_CAPACITY));
    cap.finish(out);
    let mut ev = Family::new(
        "smtpflow_map_evictions_total",
        MetricType::COUNTER,
        "Entries evicted from a kernel map (peers and peer_replies, by the LRU: their events and replies stay in the totals; flows, overwritten in the flow table by a new flow: their handshake, greeting and replies are no longer followed).",
    );
    ev.add(&[("map", "peers")], snap.peer_evictions as f64);
    ev.add(&[("map", "peer_replies")], snap.peer_reply_evictions as f64);
    ev.add(&[("map", "flows")], snap.flow_evictions as f64);
    ev.finish(out);
    let lost = snap.stats[Stat::CounterInsertFailed as usize]
        + snap.stats[Stat::HistInsertFailed as usize];
    for (value, name, help) in [
        (
            snap.stats[Stat::Malformed as usize],
            "smtpflow_malformed_packets_total",
            "Frames with malformed IPv4, IPv6 or TCP headers; never counted as events.",
        ),
        (
            snap.stats[Stat::PeerInsertFailed as usize],
            "smtpflow_peer_insert_failures_total",
            "Per-peer entries that could not be created, or per-peer log records the ring had no room for (the events are still in the totals).",
        ),
        (
            snap.stats[Stat::FlowInsertFailed as usize],
            "smtpflow_flow_insert_failures_total",
            "Connections whose flow entry could not be created (not followed).",
        ),
        (
            snap.stats[Stat::PayloadsLost as usize],
            "smtpflow_payload_events_lost_total",
            "Payload events (greetings, EHLO, their replies, ServerHellos) lost because the ring buffer was full.",
        ),
        (
            lost,
            "smtpflow_lost_events_total",
            "Counts or durations the kernel could not record at all; non-zero is a bug, please report it.",
        ),
    ] {
        let mut f = Family::new(name, MetricType::COUNTER, help);
        f.add(&[], value as f64);
        f.finish(out);
    }
    let mut d = Family::new(
        "smtpflow_drain_duration_seconds",
        MetricType::GAUGE,
        "Time the last drain of the kernel maps took.",
    );
    d.add(&[], snap.drain_seconds);
    d.finish(out);
    let mut d = Family::new(
        "smtpflow_full_drain_duration_seconds",
        MetricType::GAUGE,
        "Time the last drain that also read the per-peer maps took.",
    );
    d.add(&[], snap.full_drain_seconds);
    d.finish(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(costs: &[ProgramCost], on: bool) -> String {
        let mut text = Vec::new();
        TextEncoder::new().encode(&families(costs, on), &mut text).unwrap();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn exported_while_enabled_or_once_counted() {
        let idle = [ProgramCost { program: "smtpflow_tc_in".into(), runs: 0, run_ns: 0 }];
        assert_eq!(render(&idle, false), "");
        assert!(render(&[], true).is_empty());
        let on = render(&idle, true);
        assert!(on.contains(r#"smtpflow_ebpf_program_runs_total{program="smtpflow_tc_in"} 0"#));
        let counted = [
            ProgramCost { program: "smtpflow_tc_in".into(), runs: 1000, run_ns: 2_500_000_000 },
            ProgramCost { program: "smtpflow_tc_out".into(), runs: 7, run_ns: 350 },
        ];
        let text = render(&counted, false);
        for want in [
            "# TYPE smtpflow_ebpf_program_runs_total counter",
            r#"smtpflow_ebpf_program_runs_total{program="smtpflow_tc_in"} 1000"#,
            r#"smtpflow_ebpf_program_runs_total{program="smtpflow_tc_out"} 7"#,
            r#"smtpflow_ebpf_program_run_seconds_total{program="smtpflow_tc_in"} 2.5"#,
            r#"smtpflow_ebpf_program_run_seconds_total{program="smtpflow_tc_out"} 0.00000035"#,
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }
}
