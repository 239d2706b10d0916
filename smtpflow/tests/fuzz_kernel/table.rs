//! The flow table in the kernel: the flows that fit in `--max-flows` all keep their way, and
//! past the table's ways every flow a new one overwrites is counted, exactly.
//!
//! New connections (SYNs of distinct 4-tuples) go through the real TC ingress program with
//! `BPF_PROG_TEST_RUN`; the table is read in place as smtpflow's sweep reads it, and the counts
//! are the kernel's own (`STATS`: `flow_inserts`, `flow_evictions`).
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use smtpflow::{
    drain::flows::{FlowTable, TAGS_WINDOW},
    kernel::{self, Sizes},
};
use smtpflow_common::{
    Config, DEFAULT_MAX_PEERS, DropConfig, Stat,
    flow_table::{FLOW_WAYS, sets_for},
    names,
    rules::tcp_flags::SYN,
};
use smtpflow_tests::{
    frames::{ETH_P_IP, Eth, IPPROTO_TCP, Ipv4, Tcp},
    require_root,
};

use super::{
    PLAINTEXT, PORTS,
    corpus::{MAC_GW, MAC_PEER, gw_v4},
    programs::{kernel_available, lo_ifindex},
};

/// The flows the table is sized for: a table of two of the sweep's windows of tags.
const MAX_FLOWS: u32 = 32_768;

/// The programs loaded for the loopback interface with a table of `max_flows` flows, and TC
/// ingress loaded: what the SYNs of these tests go through. With the configuration loaded.
pub(super) fn tc_ingress(max_flows: u32) -> (Ebpf, Config) {
    let mut config = Config::from_ports(PORTS, PLAINTEXT).expect("ports");
    config.set_ifaces(&[lo_ifindex()]).expect("interfaces");
    let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows };
    let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, 0).expect("load");
    let name = names::PROG_TC_INGRESS;
    let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().unwrap();
    prog.load().expect("loading TC ingress");
    (ebpf, config)
}

/// Runs a SYN from `src`, port `sport`, to the gateway's port 25 through TC ingress (loaded by
/// [`tc_ingress`]); the packet's fate must not change.
pub(super) fn syn_through(ebpf: &Ebpf, src: Ipv4Addr, sport: u16) {
    let prog: &SchedClassifier =
        ebpf.program(names::PROG_TC_INGRESS).expect("program").try_into().unwrap();
    let tcp = Tcp::new(sport, 25, SYN);
    let frame = Eth::new(MAC_GW, MAC_PEER)
        .frame(ETH_P_IP, &Ipv4::new(src, gw_v4(), IPPROTO_TCP).packet(&tcp.bytes()));
    let opts = TestRunOptions { data_in: Some(&frame), repeat: 1, ..TestRunOptions::default() };
    let verdict = prog.test_run(opts).expect("test run").return_value;
    assert_eq!(verdict, u32::MAX, "the packet's fate changed");
}

#[test]
fn flows_that_fit_keep_their_way_and_overwrites_are_counted() {
    require_root!();
    if !kernel_available() {
        return;
    }
    let (mut ebpf, config) = tc_ingress(MAX_FLOWS);
    let mut table = FlowTable::take(&mut ebpf, config.flow_seed).expect("FLOWS");
    let ways = u64::from(sets_for(MAX_FLOWS)) * FLOW_WAYS as u64;
    assert_eq!((table.sets(), ways), (8192, 65_536), "twice the ways of --max-flows");
    assert_eq!(table.sets(), 2 * TAGS_WINDOW, "the listing maps two windows of tags");
    let stats: PerCpuArray<_, u64> =
        ebpf.take_map(names::MAP_STATS).expect("no STATS").try_into().unwrap();
    let stat = |s: Stat| -> u64 { stats.get(&(s as u32), 0).unwrap().iter().sum() };
    // Attempt `i`: its own source address and port.
    let syn =
        |i: u32| syn_through(&ebpf, Ipv4Addr::from(0x0a80_0000 + i), 10_000 + (i % 50_000) as u16);

    for i in 0..MAX_FLOWS {
        syn(i);
    }
    let shown = table.for_each(|_, _, _| {}).expect("reading the table");
    let (inserts, evictions) = (stat(Stat::FlowInserts), stat(Stat::FlowEvictions));
    eprintln!("  {MAX_FLOWS} attempts: {inserts} inserted, {evictions} overwritten, {shown} shown");
    assert_eq!(
        (inserts, evictions, shown as u64),
        (MAX_FLOWS.into(), 0, MAX_FLOWS.into()),
        "every flow that fits kept"
    );
    assert_eq!(stat(Stat::FlowInsertFailed), 0);

    // Three times as many: past the table's ways, each new flow overwrites one, and the kernel
    // counts each: what the table shows is what was inserted and not overwritten.
    let more = 3 * MAX_FLOWS;
    for i in MAX_FLOWS..more {
        syn(i);
    }
    let shown = table.for_each(|_, _, _| {}).expect("reading the table") as u64;
    let (inserts, evictions) = (stat(Stat::FlowInserts), stat(Stat::FlowEvictions));
    eprintln!("  {more} attempts: {inserts} inserted, {evictions} overwritten, {shown} shown");
    assert_eq!(inserts, u64::from(more), "every new attempt inserted");
    assert!(evictions > 0 && shown <= ways, "{evictions} overwritten, {shown} shown of {ways}");
    assert_eq!(inserts - evictions, shown, "every flow not shown was counted overwritten");
    assert_eq!(stat(Stat::FlowInsertFailed), 0);
}
