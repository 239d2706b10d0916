//! `/proc` and sysctl files: `/proc/net/netstat`, `/proc/net/snmp`, `/proc/net/stat/nf_conntrack`
//! and the conntrack sysctls.
use std::collections::BTreeMap;

use proptest::{collection::vec, prelude::*, sample::subsequence};

use smtpflow::host::pressure::{CONNTRACK_STATS, TCP_STATS, procfs};

use super::{mangled_text, texty};

const NETSTAT: &str = include_str!("../../src/host/pressure/testdata/netstat");
const SNMP: &str = include_str!("../../src/host/pressure/testdata/snmp");
const CT_STAT: &str = include_str!("../../src/host/pressure/testdata/nf_conntrack.stat");
/// The header of `/proc/net/stat/nf_conntrack` on Linux 6.x.
const CT_STAT_HEADER: &str = "entries  clashres found new invalid ignore delete chainlength \
     insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete \
     search_restart";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sysctl_never_panics(text in texty()) {
        let _ = procfs::parse_sysctl_u64(&text);
    }

    #[test]
    fn sysctl_round_trip(n in any::<u64>()) {
        prop_assert_eq!(procfs::parse_sysctl_u64(&format!("{n}\n")), Ok(n));
        // Cut short (no newline), signed, padded or with a second line: errors.
        for bad in [n.to_string(), format!("-{n}\n"), format!(" {n}\n"), format!("{n}\n{n}\n")] {
            prop_assert!(procfs::parse_sysctl_u64(&bad).is_err(), "{bad:?} was read");
        }
    }

    #[test]
    fn conntrack_stat_never_panics(text in prop_oneof![texty(), mangled_text(CT_STAT)]) {
        let _ = procfs::parse_conntrack_stat(&text);
    }

    /// Any number of CPU lines of `%08x` values: each wanted column is the sum over the lines.
    #[test]
    fn conntrack_stat_sums(rows in vec(vec(any::<u32>(), 17), 1..8)) {
        let mut text = format!("{CT_STAT_HEADER}\n");
        for row in &rows {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:08x}")).collect();
            text.push_str(&cells.join(" "));
            text.push('\n');
        }
        let header: Vec<&str> = CT_STAT_HEADER.split_whitespace().collect();
        let want: BTreeMap<&str, u64> = CONNTRACK_STATS
            .iter()
            .map(|&s| {
                let col = header.iter().position(|h| *h == s).expect("column");
                (s, rows.iter().map(|r| u64::from(r[col])).sum())
            })
            .collect();
        prop_assert_eq!(procfs::parse_conntrack_stat(&text), Ok(want));
        // The same file cut anywhere before its end is never read as other numbers.
        let cut = text.len() - 1 - (rows[0][0] as usize % (text.len() - 1));
        if let Ok(got) = procfs::parse_conntrack_stat(&text[..cut]) {
            prop_assert!(text[..cut].ends_with('\n'), "a cut line was read: {got:?}");
        }
    }

    #[test]
    fn snmp_never_panics(
        netstat in prop_oneof![texty(), mangled_text(NETSTAT)],
        snmp in prop_oneof![texty(), mangled_text(SNMP)],
        prefix in "[A-Za-z]{0,8}",
    ) {
        let _ = procfs::parse_snmp_section(&netstat, &prefix);
        let _ = procfs::parse_tcp_stats(&netstat, &snmp);
    }

    /// `TcpExt`/`Tcp` sections with the counters among others, in any order, after other
    /// sections: every counter comes back with its value.
    #[test]
    fn tcp_stats_round_trip(
        values in vec(any::<u64>(), 6),
        others in subsequence(vec!["Foo", "TCPLossProbes", "RtoMin", "InSegs", "OutRsts"], 0..5),
        swap in any::<bool>(),
    ) {
        let section = |prefix: &str, names: &[&str], vals: &[u64]| {
            let mut all: Vec<(String, u64)> =
                names.iter().zip(vals).map(|(n, v)| ((*n).to_owned(), *v)).collect();
            all.extend(others.iter().enumerate().map(|(i, n)| ((*n).to_owned(), i as u64)));
            if swap {
                all.reverse();
            }
            let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            let vals: Vec<String> = all.iter().map(|(_, v)| v.to_string()).collect();
            format!("{prefix}: {}\n{prefix}: {}\n", names.join(" "), vals.join(" "))
        };
        let tcp_ext = section("TcpExt", &TCP_STATS[..4], &values[..4]);
        let tcp = section("Tcp", &TCP_STATS[4..], &values[4..]);
        let netstat = format!("IpExt: InOctets\nIpExt: 5\n{tcp_ext}");
        let snmp = format!("Ip: Forwarding\nIp: 1\n{tcp}Udp: InErrors\nUdp: 0\n");
        let want: BTreeMap<&str, u64> =
            TCP_STATS.iter().copied().zip(values.iter().copied()).collect();
        prop_assert_eq!(procfs::parse_tcp_stats(&netstat, &snmp), Ok(want));
    }
}
