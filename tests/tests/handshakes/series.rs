//! The expected samples of the handshake tests, by metric and labels, and what the clients and
//! captures saw.
use std::net::SocketAddr;

use smtpflow_common::rules::tcp_flags::{ACK, RST, SYN};
use smtpflow_tests::{
    capture,
    names::{
        DROPS, FLOW_INSERT_FAILURES, GREETINGS, HANDSHAKES, LOST, MALFORMED, PEER_GREETINGS,
        PEER_HANDSHAKES, REPLIES, RESETS, RETRANSMITS,
    },
    smtp::Session,
};

use crate::{IF, PEER};

/// One expected sample: metric, label filter (summed over the other labels), exact value.
pub type E = (&'static str, Vec<(&'static str, &'static str)>, u64);

pub fn series(
    name: &'static str,
    dir: &'static str,
    port: &'static str,
    extra: &[(&'static str, &'static str)],
    n: u64,
) -> E {
    let mut labels = vec![("iface", IF), ("direction", dir), ("port", port)];
    labels.extend_from_slice(extra);
    (name, labels, n)
}

pub fn outcome(dir: &'static str, port: &'static str, outcome: &'static str, n: u64) -> E {
    series(HANDSHAKES, dir, port, &[("outcome", outcome)], n)
}

pub fn peer_outcome(dir: &'static str, port: &'static str, outcome: &'static str, n: u64) -> E {
    series(PEER_HANDSHAKES, dir, port, &[("peer", PEER), ("outcome", outcome)], n)
}

pub fn retransmits(dir: &'static str, port: &'static str, n: u64) -> E {
    series(RETRANSMITS, dir, port, &[], n)
}

pub fn reset(
    dir: &'static str,
    port: &'static str,
    phase: &'static str,
    side: &'static str,
    n: u64,
) -> E {
    series(RESETS, dir, port, &[("phase", phase), ("side", side)], n)
}

pub fn reply(dir: &'static str, port: &'static str, code: &'static str, n: u64) -> E {
    series(REPLIES, dir, port, &[("code", code)], n)
}

pub fn greeting(dir: &'static str, port: &'static str, code: &'static str, n: u64) -> E {
    series(GREETINGS, dir, port, &[("code", code)], n)
}

pub fn peer_greeting(dir: &'static str, port: &'static str, code: &'static str, n: u64) -> E {
    series(PEER_GREETINGS, dir, port, &[("peer", PEER), ("code", code)], n)
}

pub fn bucket(
    name: &'static str,
    dir: &'static str,
    port: &'static str,
    le: &'static str,
    n: u64,
) -> E {
    series(name, dir, port, &[("le", le)], n)
}

pub fn count(name: &'static str, dir: &'static str, port: &'static str, n: u64) -> E {
    series(name, dir, port, &[], n)
}

/// Drop counters carry no `iface` (the kernel-wide hook sees the namespace, not an interface).
pub fn drops(dir: &'static str, port: &'static str, reason: &'static str, n: u64) -> E {
    (DROPS, vec![("direction", dir), ("port", port), ("reason", reason)], n)
}

pub fn total(name: &'static str, filter: &[(&'static str, &'static str)], n: u64) -> E {
    (name, filter.to_vec(), n)
}

/// smtpflow's own health: nothing lost, nothing malformed, every flow entry created. (Flow
/// evictions are not asserted here: their estimate can count one that never happened, see
/// `tc_flow_evictions_not_overcounted`.)
pub fn healthy() -> Vec<E> {
    vec![total(LOST, &[], 0), total(MALFORMED, &[], 0), total(FLOW_INSERT_FAILURES, &[], 0)]
}

/// How many sessions got each reply code (the client's own view).
pub fn replies_with(sessions: &[Session], code: u16) -> u64 {
    sessions.iter().flat_map(|s| &s.replies).filter(|&&c| c == code).count() as u64
}

/// Pure SYNs to `dport` among captured IPv4 frames.
pub fn syns_to(frames: &[Vec<u8>], dport: u16) -> u64 {
    frames
        .iter()
        .filter_map(|f| capture::ipv4_tcp(f))
        .filter(|s| s.dst_port == dport && s.flags & (SYN | ACK | RST) == SYN)
        .count() as u64
}

/// Pure SYNs of `family` (4 or 6) to `dport` among captured frames, and the connections they
/// open (distinct source ports).
pub fn syns_and_connections(frames: &[Vec<u8>], family: u8, dport: u16) -> (u64, u64) {
    let mut ports: Vec<u16> = frames
        .iter()
        .filter_map(|f| capture::tcp(f))
        .filter(|(fam, s)| *fam == family && s.dst_port == dport)
        .filter(|(_, s)| s.flags & (SYN | ACK | RST) == SYN)
        .map(|(_, s)| s.src_port)
        .collect();
    let syns = ports.len() as u64;
    ports.sort_unstable();
    ports.dedup();
    (syns, ports.len() as u64)
}

/// RSTs from source port `sport` among captured IPv4 frames.
pub fn rsts_from(frames: &[Vec<u8>], sport: u16) -> u64 {
    frames
        .iter()
        .filter_map(|f| capture::ipv4_tcp(f))
        .filter(|s| s.src_port == sport && s.flags & RST != 0)
        .count() as u64
}

pub fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().unwrap(), port).to_string()
}
