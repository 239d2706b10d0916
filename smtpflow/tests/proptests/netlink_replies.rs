//! ctnetlink replies (the per-CPU and global conntrack statistics) and sock_diag replies (the
//! SMTP listeners' accept queues).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proptest::{collection::vec, prelude::*, sample::subsequence};

use smtpflow::host::pressure::{
    ctnetlink,
    sock_diag::{self, Listener},
};
use smtpflow_tests::netlink::{self, attr};

use super::mangled;

const CPU_REPLY: &[u8] = include_bytes!("../../src/host/pressure/testdata/ct_stats_cpu.bin");
const GLOBAL_REPLY: &[u8] = include_bytes!("../../src/host/pressure/testdata/ct_stats.bin");

/// A ctnetlink data message: `nfgenmsg` then the attributes.
fn ct_msg(msg: u8, seq: u32, attrs: &[(u16, u32)]) -> Vec<u8> {
    netlink::ctnetlink_counters(
        (ctnetlink::NFNL_SUBSYS_CTNETLINK << 8) | u16::from(msg),
        seq,
        attrs,
    )
}

fn seq_of(capture: &[u8]) -> u32 {
    u32::from_ne_bytes(capture[8..12].try_into().unwrap())
}

const CPU_ATTRS: [(u16, &str); 5] = [
    (ctnetlink::CTA_STATS_DROP, "drop"),
    (ctnetlink::CTA_STATS_EARLY_DROP, "early_drop"),
    (ctnetlink::CTA_STATS_INSERT_FAILED, "insert_failed"),
    (ctnetlink::CTA_STATS_INVALID, "invalid"),
    (ctnetlink::CTA_STATS_SEARCH_RESTART, "search_restart"),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn netlink_never_panics(
        buf in prop_oneof![vec(any::<u8>(), 0..300), mangled(CPU_REPLY), mangled(GLOBAL_REPLY)],
        seq in prop_oneof![Just(seq_of(CPU_REPLY)), Just(seq_of(GLOBAL_REPLY)), any::<u32>()],
    ) {
        let _ = ctnetlink::parse_attrs(&buf);
        let _ = ctnetlink::parse_cpu_stats_reply(&buf, seq);
        let _ = ctnetlink::parse_global_reply(&buf, seq);
    }

    #[test]
    fn attrs_round_trip(attrs in vec((0u16..0x4000, vec(any::<u8>(), 0..24)), 0..8)) {
        let bytes: Vec<u8> = attrs.iter().flat_map(|(ty, v)| attr(*ty, v)).collect();
        let got = ctnetlink::parse_attrs(&bytes).expect("well-formed attributes");
        let got: Vec<(u16, Vec<u8>)> = got.into_iter().map(|(t, v)| (t, v.to_vec())).collect();
        prop_assert_eq!(got, attrs);
    }

    /// A dump of any number of CPUs, each with any of the counters: the sums come back, and a
    /// counter no CPU sends is absent.
    #[test]
    fn cpu_stats_round_trip(
        seq in any::<u32>(),
        cpus in vec(subsequence(CPU_ATTRS.to_vec(), 0..=5).prop_flat_map(|attrs| {
            let n = attrs.len();
            (Just(attrs), vec(any::<u32>(), n))
        }), 1..6),
    ) {
        let mut buf = Vec::new();
        let mut want: BTreeMap<&str, u64> = BTreeMap::new();
        for (attrs, values) in &cpus {
            let pairs: Vec<(u16, u32)> =
                attrs.iter().map(|a| a.0).zip(values.iter().copied()).collect();
            buf.extend(ct_msg(ctnetlink::IPCTNL_MSG_CT_GET_STATS_CPU, seq, &pairs));
            for ((_, name), v) in attrs.iter().zip(values) {
                *want.entry(name).or_default() += u64::from(*v);
            }
        }
        buf.extend(netlink::done(seq, 0));
        prop_assert_eq!(ctnetlink::parse_cpu_stats_reply(&buf, seq).expect("well-formed"), want);
        // Cut anywhere before the end: an error (or, at a message boundary, an incomplete dump).
        let cut = seq as usize % buf.len();
        prop_assert!(ctnetlink::parse_cpu_stats_reply(&buf[..cut], seq).is_err());
        // Another request's reply is refused.
        prop_assert!(ctnetlink::parse_cpu_stats_reply(&buf, seq.wrapping_add(1)).is_err());
    }

    #[test]
    fn global_round_trip(
        seq in any::<u32>(),
        entries in any::<u32>(),
        max in any::<Option<u32>>(),
    ) {
        let mut attrs = vec![(ctnetlink::CTA_STATS_GLOBAL_ENTRIES, entries)];
        attrs.extend(max.map(|m| (ctnetlink::CTA_STATS_GLOBAL_MAX_ENTRIES, m)));
        let mut buf = ct_msg(ctnetlink::IPCTNL_MSG_CT_GET_STATS, seq, &attrs);
        buf.extend(netlink::ack(seq));
        let got = ctnetlink::parse_global_reply(&buf, seq).expect("well-formed");
        prop_assert_eq!(got, ctnetlink::Global {
            entries: u64::from(entries),
            max_entries: max.map(u64::from),
        });
    }
}

/// A sock_diag data message for a listener, as the kernel writes it, with `extra_attrs` after
/// the attribute it always adds.
fn listener_msg(seq: u32, l: &Listener, extra_attrs: &[u8]) -> Vec<u8> {
    netlink::inet_diag_listener(seq, l.addr, l.port, l.queue, l.limit, extra_attrs)
}

fn listener() -> impl Strategy<Value = Listener> {
    let addr = prop_oneof![
        any::<[u8; 4]>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<[u8; 16]>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ];
    (addr, any::<u16>(), any::<u32>(), any::<u32>())
        .prop_map(|(addr, port, queue, limit)| Listener { addr, port, queue, limit })
}

/// A captured-like dump of two listeners (seq 7), mangled by the tests below.
fn listeners_capture() -> &'static [u8] {
    static CAPTURE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let a =
            Listener { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), port: 25, queue: 1, limit: 100 };
        let b =
            Listener { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), port: 587, queue: 0, limit: 4096 };
        [listener_msg(7, &a, &[]), listener_msg(7, &b, &[]), netlink::done(7, 0)].concat()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sock_diag_never_panics(
        buf in prop_oneof![vec(any::<u8>(), 0..400), mangled(listeners_capture())],
        seq in prop_oneof![Just(7u32), any::<u32>()],
    ) {
        let _ = sock_diag::parse_listeners_reply(&buf, seq);
        let _ = sock_diag::scan(&buf, seq);
    }

    /// Any listeners, in any number of datagrams' worth of messages, with attributes after
    /// each message: the same listeners come back, in order; a cut reply or another request's
    /// is an error.
    #[test]
    fn sock_diag_round_trip(
        seq in any::<u32>(),
        listeners in vec(listener(), 0..8),
        extra in vec(any::<u8>(), 0..12),
    ) {
        let extra = attr(9, &extra);
        let mut buf: Vec<u8> = listeners.iter().flat_map(|l| listener_msg(seq, l, &extra)).collect();
        prop_assert_eq!(sock_diag::scan(&buf, seq).expect("whole messages"), sock_diag::Scan::Incomplete);
        buf.extend(netlink::done(seq, 0));
        prop_assert_eq!(sock_diag::parse_listeners_reply(&buf, seq).expect("well-formed"), listeners);
        let cut = seq as usize % buf.len();
        prop_assert!(sock_diag::parse_listeners_reply(&buf[..cut], seq).is_err());
        prop_assert!(sock_diag::parse_listeners_reply(&buf, seq.wrapping_add(1)).is_err());
    }
}
