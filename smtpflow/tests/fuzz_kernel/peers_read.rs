//! The per-peer map read as smtpflow reads it: in batches, the kernel's walk on a second thread
//! once the map holds more than one call's worth. Every entry is handed over once, none is
//! lost or repeated between the two threads' chunks, and the reader counts them all.
//!
//! Distinct peers' SYNs go through the real TC ingress program with `BPF_PROG_TEST_RUN`, so
//! each is one new entry of `PEERS`, with one SYN.
use std::{collections::BTreeSet, net::Ipv4Addr, os::fd::AsFd as _};

use aya::maps::{HashMap, IterableMap as _, MapData};
use smtpflow::drain::{batch, peers::PeerReader};
use smtpflow_common::{Event, PeerCounters, PeerKey, Side, names};
use smtpflow_tests::require_root;

use super::{
    programs::kernel_available,
    table::{syn_through, tc_ingress},
};

/// Peers: ten and a bit of the two threads' chunks (half of [`batch::DEFAULT_CHUNK`] each).
const PEERS: u32 = 21_000;

#[test]
fn a_big_per_peer_map_is_read_whole_once() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let (mut ebpf, _) = tc_ingress(65_536);
    let peers: HashMap<MapData, PeerKey, PeerCounters> =
        ebpf.take_map(names::MAP_PEERS).expect("no PEERS").try_into().unwrap();
    for i in 0..PEERS {
        syn_through(&ebpf, Ipv4Addr::from(0x0a90_0000 + i), 40_000);
    }

    let syn = PeerCounters::index(Event::Syn, Side::Peer);
    let fd = peers.map().fd().as_fd();
    // In chunks on two threads, and in one call on this one: the same entries.
    for chunk in [batch::DEFAULT_CHUNK, 2 * PEERS as usize] {
        let mut seen = BTreeSet::new();
        let mut syns = 0;
        let stats = batch::for_each::<PeerKey, PeerCounters>(fd, chunk, |k, v| {
            assert!(seen.insert(*k), "{k:?} handed over twice");
            syns += v.counts[syn];
        })
        .expect("reading PEERS");
        eprintln!("  chunk {chunk}: {} entries in {} calls", stats.entries, stats.syscalls);
        assert_eq!(
            (stats.entries, seen.len(), syns),
            (PEERS as usize, PEERS as usize, PEERS.into())
        );
        // At least one call a half chunk (a call ends at a hash bucket that does not fit).
        let calls = (PEERS as usize).div_ceil(chunk.div_ceil(2));
        assert!(stats.syscalls >= calls, "{} calls for chunks of {chunk}", stats.syscalls);
    }
    // The reader smtpflow runs: every entry, every peer, twice in a row.
    let mut reader = PeerReader::new(1000);
    for _ in 0..2 {
        reader.read_entries(&peers).expect("reading PEERS");
        let view = reader.finish();
        assert_eq!((view.entries, view.tracked), (PEERS as usize, PEERS as usize));
    }
}
