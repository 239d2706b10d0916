//! Pure parsers for the procfs and sysctl files the pressure signals come from: text in, `Result`
//! out, never a panic, whatever the text.
//!
//! Every line the kernel writes ends in a newline, and these parsers insist on it for the lines
//! they take numbers from: a file cut short inside a number is an error, not a smaller number.
use std::collections::BTreeMap;

use super::{CONNTRACK_STATS, TCP_STATS};

/// Why a file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// A decimal number made of ASCII digits only (no sign, no spaces), as the kernel prints `%lu`.
fn decimal(s: &str) -> Result<u64, ParseError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return err(format!("{s:?} is not a decimal number"));
    }
    s.parse().map_err(|_| ParseError(format!("{s:?} does not fit in 64 bits")))
}

/// A hexadecimal number made of hex digits only, as the kernel prints `%08x`.
fn hex(s: &str) -> Result<u64, ParseError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return err(format!("{s:?} is not a hexadecimal number"));
    }
    u64::from_str_radix(s, 16).map_err(|_| ParseError(format!("{s:?} does not fit in 64 bits")))
}

/// Complete lines only: the text up to its last newline, split into lines. `Err` when the text
/// does not end in a newline (the file was cut short).
fn complete_lines(text: &str) -> Result<std::str::Lines<'_>, ParseError> {
    if !text.ends_with('\n') {
        return err("the file does not end with a newline (truncated?)");
    }
    Ok(text.lines())
}

/// A one-number sysctl file such as `/proc/sys/net/netfilter/nf_conntrack_count` (`"42\n"`).
pub fn parse_sysctl_u64(text: &str) -> Result<u64, ParseError> {
    let Some(line) = text.strip_suffix('\n') else {
        return err("the sysctl value does not end with a newline (truncated?)");
    };
    decimal(line)
}

/// `/proc/net/stat/nf_conntrack`: a header naming the columns, then one line of hexadecimal
/// values per possible CPU. Returns the [`CONNTRACK_STATS`] columns the header names, summed
/// over the CPU lines (columns this kernel does not have are left out).
///
/// Errors: no header, no CPU line, a line with another number of columns than the header, a
/// value that is not hexadecimal, a file not ending in a newline.
pub fn parse_conntrack_stat(text: &str) -> Result<BTreeMap<&'static str, u64>, ParseError> {
    let mut lines = complete_lines(text)?;
    let header: Vec<&str> = match lines.next() {
        Some(h) if !h.trim().is_empty() => h.split_whitespace().collect(),
        _ => return err("no header line"),
    };
    if header.iter().all(|name| hex(name).is_ok()) {
        // A header of numbers is a file whose header was lost.
        return err("the header line holds numbers, not column names");
    }
    let wanted: Vec<(&'static str, usize)> = CONNTRACK_STATS
        .iter()
        .filter_map(|&stat| header.iter().position(|h| *h == stat).map(|i| (stat, i)))
        .collect();
    let mut sums: BTreeMap<&'static str, u64> = wanted.iter().map(|&(s, _)| (s, 0)).collect();
    let mut cpus = 0usize;
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != header.len() {
            return err(format!(
                "line {} has {} columns, the header names {}",
                n + 2,
                fields.len(),
                header.len()
            ));
        }
        // Every value must be hexadecimal, not only the ones summed: a garbled line is an error.
        for f in &fields {
            hex(f)?;
        }
        for &(stat, i) in &wanted {
            let v = hex(fields[i])?;
            let sum = sums.entry(stat).or_default();
            *sum = sum.checked_add(v).ok_or_else(|| ParseError(format!("{stat} overflows")))?;
        }
        cpus += 1;
    }
    if cpus == 0 {
        return err("no CPU lines after the header");
    }
    Ok(sums)
}

/// The `prefix:` section of an SNMP-style file (`/proc/net/netstat`, `/proc/net/snmp`): a line
/// `Prefix: Name1 Name2 ...` followed at once by `Prefix: v1 v2 ...`. Returns `(name, value)`
/// pairs as text, in order. `prefix` is given without its colon (`"TcpExt"`).
///
/// Errors: the section is absent, its value line is missing or has another number of fields,
/// a value line where a header belongs, the value line does not end with a newline.
pub fn parse_snmp_section<'a>(
    text: &'a str,
    prefix: &str,
) -> Result<Vec<(&'a str, &'a str)>, ParseError> {
    let tag = format!("{prefix}:");
    let mut lines = text.split_inclusive('\n');
    while let Some(header) = lines.next() {
        let mut names = header.split_whitespace();
        if names.next() != Some(tag.as_str()) {
            continue;
        }
        let Some(values_line) = lines.next() else {
            return err(format!("{prefix}: header without a value line"));
        };
        if !values_line.ends_with('\n') {
            return err(format!("{prefix}: value line cut short (no newline)"));
        }
        let mut values = values_line.split_whitespace();
        if values.next() != Some(tag.as_str()) {
            return err(format!("{prefix}: header not followed by its value line"));
        }
        let names: Vec<&str> = names.collect();
        let values: Vec<&str> = values.collect();
        if names.len() != values.len() {
            return err(format!("{prefix}: {} names but {} values", names.len(), values.len()));
        }
        if names.is_empty() {
            return err(format!("{prefix}: empty section"));
        }
        if let Some(n) = names.iter().find(|n| decimal(n).is_ok() || n.starts_with('-')) {
            return err(format!("{prefix}: a number ({n}) where a name belongs"));
        }
        return Ok(names.into_iter().zip(values).collect());
    }
    err(format!("no {prefix}: section"))
}

/// The [`TCP_STATS`] counters: `TcpExt` ones from `/proc/net/netstat`, `Tcp` ones from
/// `/proc/net/snmp`. A counter this kernel does not have is left out; a counter present with a
/// value that is not a number is an error.
pub fn parse_tcp_stats(
    netstat: &str,
    snmp: &str,
) -> Result<BTreeMap<&'static str, u64>, ParseError> {
    let tcp_ext = parse_snmp_section(netstat, "TcpExt")?;
    let tcp = parse_snmp_section(snmp, "Tcp")?;
    let mut out = BTreeMap::new();
    for stat in TCP_STATS {
        let section = if TCP_EXT_STATS.contains(&stat) { &tcp_ext } else { &tcp };
        if let Some((_, v)) = section.iter().find(|(name, _)| *name == stat) {
            let value = decimal(v).map_err(|e| ParseError(format!("{stat}: {}", e.0)))?;
            out.insert(stat, value);
        }
    }
    Ok(out)
}

/// The [`TCP_STATS`] that live in `/proc/net/netstat`'s `TcpExt` section; the others are in
/// `/proc/net/snmp`'s `Tcp` section.
pub const TCP_EXT_STATS: [&str; 4] =
    ["ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop"];

#[cfg(test)]
mod tests {
    use super::*;

    // Real captures from this project's development machine (Linux 6.18, 2 CPUs), taken in a
    // network namespace with an nftables `ct state` rule after real connections, a listen queue
    // overflow, resets, refused connections and a few invalid TCP segments.
    const CT_STAT: &str = include_str!("testdata/nf_conntrack.stat");
    const CT_COUNT: &str = include_str!("testdata/nf_conntrack_count");
    const CT_MAX: &str = include_str!("testdata/nf_conntrack_max");
    const NETSTAT: &str = include_str!("testdata/netstat");
    const SNMP: &str = include_str!("testdata/snmp");
    // The same machine's initial namespace (busier counters, IPv6 and MPTCP sections).
    const HOST_NETSTAT: &str = include_str!("testdata/host_netstat");
    const HOST_SNMP: &str = include_str!("testdata/host_snmp");

    /// The column layout of kernels before 5.x (`searched` instead of `clashres`, `delete_list`
    /// instead of `chainlength`), in the kernel's own format: 4 CPUs.
    const CT_STAT_OLD_LAYOUT: &str = "\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000002a  00000000 00000010 00000000 00000001 00000000 00000000 00000000 00000000 00000002 00000003 00000004 00000000  00000000 00000000 00000000 00000005
0000002a  00000000 00000010 00000000 00000010 00000000 00000000 00000000 00000000 00000020 00000030 00000040 00000000  00000000 00000000 00000000 00000050
0000002a  00000000 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000
0000002a  00000000 00000010 00000000 ffffffff 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000
";

    fn stats(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn conntrack_stat_capture_sums_cpus() {
        // invalid: 3 on CPU 0, 6 on CPU 1; the rest 0.
        assert_eq!(
            parse_conntrack_stat(CT_STAT).unwrap(),
            stats(&[
                ("drop", 0),
                ("early_drop", 0),
                ("insert_failed", 0),
                ("invalid", 9),
                ("search_restart", 0)
            ])
        );
    }

    #[test]
    fn conntrack_stat_columns_found_by_name() {
        assert_eq!(
            parse_conntrack_stat(CT_STAT_OLD_LAYOUT).unwrap(),
            stats(&[
                ("drop", 0x33),
                ("early_drop", 0x44),
                ("insert_failed", 0x22),
                ("invalid", 0x11 + 0xffff_ffff),
                ("search_restart", 0x55)
            ])
        );
        // A kernel without search_restart: that stat is left out, the others stay right.
        let text = "entries invalid insert_failed drop early_drop\n1 2 3 4 5\n1 1 1 1 1\n";
        assert_eq!(
            parse_conntrack_stat(text).unwrap(),
            stats(&[("drop", 5), ("early_drop", 6), ("insert_failed", 4), ("invalid", 3)])
        );
    }

    #[test]
    fn sysctl_captures() {
        assert_eq!(parse_sysctl_u64(CT_COUNT).unwrap(), 5);
        assert_eq!(parse_sysctl_u64(CT_MAX).unwrap(), 262_144);
    }

    #[test]
    fn tcp_stats_captures() {
        assert_eq!(
            parse_tcp_stats(NETSTAT, SNMP).unwrap(),
            stats(&[
                ("AttemptFails", 4),
                ("EstabResets", 6),
                ("ListenDrops", 18),
                ("ListenOverflows", 18),
                ("SyncookiesSent", 0),
                ("TCPReqQFullDrop", 0)
            ])
        );
        let host = parse_tcp_stats(HOST_NETSTAT, HOST_SNMP).unwrap();
        assert_eq!(host.len(), TCP_STATS.len(), "{host:?}");
        // MaxConn is -1 in every kernel: a section holding it still parses.
        let tcp = parse_snmp_section(SNMP, "Tcp").unwrap();
        assert!(tcp.contains(&("MaxConn", "-1")));
        // Prefixes match whole: MPTcpExt is not TcpExt, IpExt is not Ip.
        let ip = parse_snmp_section(SNMP, "Ip").unwrap();
        assert_eq!(ip[0].0, "Forwarding");
        assert!(parse_snmp_section(NETSTAT, "TcpExt").unwrap()[0].0 == "SyncookiesSent");
    }

    #[test]
    fn tcp_stats_missing_counters_left_out() {
        let netstat = "TcpExt: ListenOverflows ListenDrops\nTcpExt: 7 8\n";
        let snmp = "Tcp: RtoAlgorithm AttemptFails\nTcp: 1 3\n";
        assert_eq!(
            parse_tcp_stats(netstat, snmp).unwrap(),
            stats(&[("AttemptFails", 3), ("ListenDrops", 8), ("ListenOverflows", 7)])
        );
    }

    #[test]
    fn hostile_sysctl() {
        for bad in [
            "",
            "\n",
            "12",
            "-1\n",
            "+5\n",
            " 5\n",
            "5 \n",
            "0x10\n",
            "1e3\n",
            "5\n\n",
            "99999999999999999999999\n",
            "\u{0}\n",
            "٣\n",
        ] {
            assert!(parse_sysctl_u64(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_sysctl_u64("18446744073709551615\n").unwrap(), u64::MAX);
    }

    #[test]
    fn hostile_conntrack_stat() {
        let header = CT_STAT.lines().next().unwrap();
        let line = CT_STAT.lines().nth(1).unwrap();
        for bad in [
            String::new(),
            "\n".to_owned(),
            format!("{header}\n"),                   // no CPU line
            format!("{line}\n{line}\n"),             // header lost
            format!("{header}\n{line} 00000001\n"),  // extra column
            format!("{header}\n{}\n", &line[..line.len() - 9]), // missing column
            format!("{header}\n{}\n", line.replacen("00000003", "0000000g", 1)),
            format!("{header}\n{}\n", line.replacen("00000003", "-0000003", 1)),
            format!("{header}\n{}\n", line.replacen("00000003", "+0000003", 1)),
            format!("{header}\n{}\n", line.replacen("00000003", "10000000000000000", 1)),
            format!("{header}\n{line}"),             // cut before the newline
            format!("{header}\n{line}\n\u{feff}garbage\n"),
            "entries invalid\nffffffffffffffff ffffffffffffffff\nffffffffffffffff ffffffffffffffff\n"
                .to_owned(), // overflow
        ] {
            assert!(parse_conntrack_stat(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_snmp() {
        for (bad, prefix) in [
            ("", "TcpExt"),
            ("TcpExt: A B\n", "TcpExt"), // header without values
            ("TcpExt: A B\nTcpExt: 1\n", "TcpExt"), // missing value
            ("TcpExt: A B\nTcpExt: 1 2 3\n", "TcpExt"), // extra value
            ("TcpExt: A B\nIpExt: 1 2\n", "TcpExt"), // another section's values
            ("TcpExt: A B\nTcpExt: 1 2", "TcpExt"), // cut before the newline
            ("TcpExt: 1 2\nTcpExt: 1 2\n", "TcpExt"), // values where names belong
            ("TcpExt:\nTcpExt:\n", "TcpExt"),
            ("MPTcpExt: A\nMPTcpExt: 1\n", "TcpExt"),
            ("TcpExt:A\nTcpExt:1\n", "TcpExt"),
        ] {
            assert!(parse_snmp_section(bad, prefix).is_err(), "{bad:?}");
        }
        let good_snmp = "Tcp: AttemptFails\nTcp: 1\n";
        for bad in [
            "TcpExt: ListenOverflows\nTcpExt: x\n",
            "TcpExt: ListenOverflows\nTcpExt: -1\n",
            "TcpExt: ListenOverflows\nTcpExt: 1.5\n",
            "TcpExt: ListenOverflows\nTcpExt: 99999999999999999999\n",
        ] {
            assert!(parse_tcp_stats(bad, good_snmp).is_err(), "{bad:?}");
        }
        assert!(parse_tcp_stats("TcpExt: ListenOverflows\nTcpExt: 1\n", "").is_err());
    }

    /// Every prefix of every capture (cut at each character boundary): never a panic, and either
    /// an error or exactly the values of the whole file, except for the one cut the format cannot
    /// tell from a whole file: `/proc/net/stat/nf_conntrack` ending after a complete CPU line
    /// (a machine with fewer CPUs), which must then sum the lines it has.
    #[test]
    fn every_truncation_is_an_error_or_exact() {
        let cuts = |s: &'static str| {
            (0..s.len()).filter(move |&i| s.is_char_boundary(i)).map(move |i| &s[..i])
        };
        for (count, max) in [(CT_COUNT, CT_MAX)] {
            for t in cuts(count) {
                assert!(parse_sysctl_u64(t).is_err(), "{t:?}");
            }
            for t in cuts(max) {
                assert!(parse_sysctl_u64(t).is_err(), "{t:?}");
            }
        }
        for full in [CT_STAT, CT_STAT_OLD_LAYOUT] {
            let whole = parse_conntrack_stat(full).unwrap();
            for t in cuts(full) {
                match parse_conntrack_stat(t) {
                    Err(_) => {}
                    Ok(got) => {
                        assert!(t.ends_with('\n') && t.lines().count() >= 2, "{t:?}");
                        for (k, v) in &got {
                            assert!(*v <= whole[k], "{k}: {v} > {}", whole[k]);
                        }
                    }
                }
            }
        }
        for (netstat, snmp) in [(NETSTAT, SNMP), (HOST_NETSTAT, HOST_SNMP)] {
            let whole = parse_tcp_stats(netstat, snmp).unwrap();
            for t in cuts(netstat) {
                if let Ok(got) = parse_tcp_stats(t, snmp) {
                    assert_eq!(got, whole, "netstat cut to {} bytes", t.len());
                }
            }
            for t in cuts(snmp) {
                if let Ok(got) = parse_tcp_stats(netstat, t) {
                    assert_eq!(got, whole, "snmp cut to {} bytes", t.len());
                }
            }
        }
    }

    /// Garbage: every byte value in every position of a capture, and random-ish noise.
    #[test]
    fn garbage_never_panics() {
        for full in [CT_STAT, NETSTAT, SNMP, CT_COUNT] {
            let bytes = full.as_bytes();
            // A handful of positions per file keeps this fast; every byte value at each.
            let step = (bytes.len() / 40).max(1);
            for pos in (0..bytes.len()).step_by(step) {
                for b in [0u8, b' ', b'\n', b'\t', b':', b'-', b'+', b'f', b'z', b'9', 0x7f] {
                    let mut v = bytes.to_vec();
                    v[pos] = b;
                    let Ok(s) = std::str::from_utf8(&v) else { continue };
                    let _ = parse_conntrack_stat(s);
                    let _ = parse_tcp_stats(s, SNMP);
                    let _ = parse_tcp_stats(NETSTAT, s);
                    let _ = parse_sysctl_u64(s);
                }
            }
        }
        // Deterministic noise (xorshift).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let s: String = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b" \n:0123456789abcdefTcpExt"[(x % 25) as usize] as char
                })
                .collect();
            let _ = parse_conntrack_stat(&s);
            let _ = parse_tcp_stats(&s, &s);
            let _ = parse_sysctl_u64(&s);
        }
    }
}
