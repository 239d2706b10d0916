//! The status line printed to stderr every few seconds, so a person sees smtpflow working
//! without Prometheus.
use std::{collections::BTreeMap, time::Instant};

use smtpflow_common::Direction;

use crate::drain::Snapshot;

/// Events summed by (direction, port).
type ByDirectionPort = BTreeMap<(Direction, u16), u64>;

pub struct Reporter {
    last: Option<(Instant, ByDirectionPort)>,
}

fn by_direction_port(snap: &Snapshot) -> ByDirectionPort {
    let mut out = BTreeMap::new();
    for (k, v) in snap.events() {
        if let Some(d) = Direction::from_u8(k.direction) {
            *out.entry((d, k.port)).or_default() += v;
        }
    }
    out
}

impl Reporter {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// One line: events per second by direction and port since the last line, peers tracked.
    pub fn line(&mut self, snap: &Snapshot, now: Instant) -> Option<String> {
        let current = by_direction_port(snap);
        let line = self.last.as_ref().map(|(then, before)| {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            let mut parts = Vec::new();
            let mut sum = 0.0;
            for ((d, port), v) in &current {
                let rate = v.saturating_sub(before.get(&(*d, *port)).copied().unwrap_or(0)) as f64 / secs;
                sum += rate;
                if rate > 0.0 {
                    parts.push(format!("{} {port}: {rate:.1}/s", d.label()));
                }
            }
            let detail = if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) };
            format!(
                "smtpflow: {sum:.1} events/s{detail}; {} peer entries of {}, {} evicted, {} malformed",
                snap.peers.len(),
                snap.peers_capacity,
                snap.peer_evictions,
                snap.stats[smtpflow_common::Stat::Malformed as usize],
            )
        });
        self.last = Some((now, current));
        line
    }
}
