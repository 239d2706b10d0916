//! Property tests of the userspace parsers: the `/proc` and sysctl files and ctnetlink replies
//! (`pressure`), the config file (`config::to_flags`), `--ports` (`cli::parse_ports`) and the
//! kernel's BTF (`btf::Btf::parse`). Each must return a `Result` on any input, never panic, and
//! give back what a well-formed input says (round trips: render values the way the kernel or a
//! user writes them, parse, compare). And the bounded reading of the per-peer maps
//! (`peers::PeerReader`) against the exact one it replaces.
//!
//! Seeded by proptest (`PROPTEST_CASES` raises the case count; a failure prints its minimal
//! input).
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
};

use clap::CommandFactory as _;
use proptest::{collection::vec, prelude::*, sample::subsequence};

use smtpflow::{
    cli::{Cli, PortList, parse_ports},
    config::to_flags,
    drain::peers::{ENTRY_SLACK, FIGURE_KEEP, Figure, PeerId, PeerReader, peer_id},
    host::pressure::{CONNTRACK_STATS, TCP_STATS, ctnetlink, procfs},
    kernel::btf::Btf,
};
use smtpflow_common::{Direction, Event, FAMILY_V4, Outcome, PeerCounters, PeerKey, Side};

/// Arbitrary text, weighted towards the characters these formats are made of.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~\n\t]{0,200}",
        "([A-Za-z_]{1,12}|[0-9a-f]{1,17}|-?[0-9]{1,21}|:| +|\n|\t|=|,|\\[|\\]|\"){0,80}",
    ]
}

/// `bytes` with a few bytes overwritten and cut somewhere: what a hostile or garbled source
/// makes of a real capture.
fn mangled(bytes: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), any::<prop::sample::Index>()).prop_map(
        move |(edits, cut)| {
            let mut b = bytes.to_vec();
            for (at, v) in edits {
                let i = at.index(b.len());
                b[i] = v;
            }
            b.truncate(cut.index(b.len() + 1));
            b
        },
    )
}

fn mangled_text(text: &'static str) -> impl Strategy<Value = String> {
    mangled(text.as_bytes()).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

// ---------------------------------------------------------------------------------------------
// /proc and sysctl files.

const NETSTAT: &str = include_str!("../src/host/pressure/testdata/netstat");
const SNMP: &str = include_str!("../src/host/pressure/testdata/snmp");
const CT_STAT: &str = include_str!("../src/host/pressure/testdata/nf_conntrack.stat");
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

// ---------------------------------------------------------------------------------------------
// ctnetlink replies.

const CPU_REPLY: &[u8] = include_bytes!("../src/host/pressure/testdata/ct_stats_cpu.bin");
const GLOBAL_REPLY: &[u8] = include_bytes!("../src/host/pressure/testdata/ct_stats.bin");

fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(v);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

/// A ctnetlink data message: `nfgenmsg` then the attributes.
fn ct_msg(msg: u8, seq: u32, attrs: &[(u16, u32)]) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    for &(ty, v) in attrs {
        body.extend(attr(ty, &v.to_be_bytes()));
    }
    nlmsg((ctnetlink::NFNL_SUBSYS_CTNETLINK << 8) | u16::from(msg), seq, &body)
}

/// `NLMSG_DONE` (type 3) or an acknowledgement (`NLMSG_ERROR`, type 2, code 0).
fn terminator(ty: u16, seq: u32) -> Vec<u8> {
    nlmsg(ty, seq, &0i32.to_ne_bytes())
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
        buf.extend(terminator(3, seq));
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
        buf.extend(terminator(2, seq));
        let got = ctnetlink::parse_global_reply(&buf, seq).expect("well-formed");
        prop_assert_eq!(got, ctnetlink::Global {
            entries: u64::from(entries),
            max_entries: max.map(u64::from),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The config file and --ports.

/// The long flag names of `command`.
fn long_flags(command: &str) -> Vec<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(command).expect("subcommand");
    sub.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).collect()
}

fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() { format!("{f:?}") } else { "nan".into() }),
        any::<bool>().prop_map(|b| b.to_string()),
    ];
    prop_oneof![
        4 => scalar.clone(),
        1 => vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => vec(vec(scalar, 0..2), 0..2).prop_map(|v| format!("{v:?}").replace('"', "")),
        1 => Just("{ a = 1 }".to_owned()),
    ]
}

/// TOML documents made of keys smtpflow knows and does not, with values of every type, at the
/// top level and in sections (known and unknown).
fn toml_doc() -> impl Strategy<Value = String> {
    let mut keys = long_flags("watch");
    keys.extend(long_flags("diagnose"));
    keys.extend(["nope", "config", "watch", "diagnose"].map(str::to_owned));
    keys.sort();
    keys.dedup();
    let key = proptest::sample::select(keys);
    let line = (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}\n"));
    let section = prop_oneof![Just("[watch]\n"), Just("[diagnose]\n"), Just("[other]\n")];
    vec(prop_oneof![4 => line, 1 => section.prop_map(str::to_owned)], 0..10)
        .prop_map(|lines| lines.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_never_panics(
        text in prop_oneof![texty(), toml_doc()],
        command in prop_oneof![
            Just("watch".to_owned()),
            Just("diagnose".to_owned()),
            Just("check".to_owned()),
            "[a-z]{0,6}",
        ],
        cli in vec("-{0,2}[a-z-]{0,14}(=[a-z0-9]{0,4})?", 0..4),
    ) {
        let cli: Vec<OsString> = cli.into_iter().map(OsString::from).collect();
        let _ = to_flags(&text, &command, &cli);
    }

    /// Known keys with string values become `--key=value` flags, one per key, except those the
    /// command line gives itself.
    #[test]
    fn config_round_trip(
        settings in proptest::sample::subsequence(long_flags("watch"), 0..8)
            .prop_flat_map(|keys| {
                let n = keys.len();
                (Just(keys), vec("[a-z0-9.:]{1,10}", n), vec(any::<bool>(), n))
            }),
    ) {
        let (keys, values, on_cli) = settings;
        let keys: Vec<String> = keys.into_iter().filter(|k| k != "config").collect();
        let text: String =
            // Keys quoted: `web.config.file` unquoted is a dotted key, a table `web` in TOML.
            keys.iter().zip(&values).map(|(k, v)| format!("{k:?} = {v:?}\n")).collect();
        let cli: Vec<OsString> = keys
            .iter()
            .zip(&values)
            .zip(&on_cli)
            .filter(|(_, on)| **on)
            .map(|((k, v), _)| OsString::from(format!("--{k}={v}")))
            .collect();
        let mut got: Vec<String> = to_flags(&text, "watch", &cli)
            .expect("known keys")
            .into_iter()
            .map(|f| f.into_string().expect("UTF-8"))
            .collect();
        let mut want: Vec<String> = keys
            .iter()
            .zip(&values)
            .zip(&on_cli)
            .filter(|(_, on)| !**on)
            .map(|((k, v), _)| format!("--{k}={v}"))
            .collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn ports_never_panic(text in prop_oneof![texty(), "[0-9, ]{0,40}", "(-?[0-9]{1,6},){0,20}"]) {
        let _ = parse_ports(&text);
    }

    /// Any list of distinct ports 1-65535, at most 16, written with any spacing around the
    /// commas, comes back in order; a repeat, a 0, an empty entry or a 17th port is refused.
    #[test]
    fn ports_round_trip(
        ports in proptest::collection::btree_set(1u16.., 1..=16)
            .prop_flat_map(|s| Just(s.into_iter().collect::<Vec<u16>>()).prop_shuffle()),
        pad in vec("[ \t]{0,2}", 34),
        extra in 1u16..,
    ) {
        let text: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let comma = if i > 0 { "," } else { "" };
                format!("{comma}{}{p}{}", pad[2 * i], pad[2 * i + 1])
            })
            .collect();
        prop_assert_eq!(parse_ports(&text), Ok(PortList(ports.clone())));
        prop_assert!(parse_ports(&format!("{text},{}", ports[0])).is_err(), "a repeat");
        prop_assert!(parse_ports(&format!("{text},0")).is_err(), "port 0");
        prop_assert!(parse_ports(&format!("{text},")).is_err(), "an empty entry");
        if ports.len() == 16 && !ports.contains(&extra) {
            prop_assert!(parse_ports(&format!("{text},{extra}")).is_err(), "17 ports");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BTF.

/// One BTF type record: kind, name offset, vlen, and the words after the 12-byte header.
#[derive(Clone, Debug)]
struct TypeRec {
    kind: u32,
    kind_flag: bool,
    name: u32,
    /// Members (structs, unions) or values (enums): (name, type id or value, offset or more).
    items: Vec<(u32, u32, u32)>,
    extra: u32,
}

const STRINGS: &[u8] = b"\0sk_buff\0head\0dev\0skb_drop_reason\0X\0\0net\0ns\0a\0";

fn type_rec() -> impl Strategy<Value = TypeRec> {
    let name = prop_oneof![0u32..STRINGS.len() as u32 + 4, any::<u32>()];
    // Member type ids point at the first few types, so that nesting (and anonymous members,
    // name 0) happens; at most 3 members keeps even a self-nesting struct cheap to search (see
    // `btf_nested_search_is_exponential`). Bit offsets stay below 2^27, so that the sums over
    // the 9 levels searched fit in u32 (see `btf_member_offset_overflows`).
    let item = (name.clone(), prop_oneof![0u32..8, any::<u32>()], 0u32..1 << 27);
    (
        // The kinds the parser knows (int, ptr, array, struct, union, enum, typedef,
        // func-proto, var, datasec, decl-tag, enum64), or any.
        prop_oneof![
            proptest::sample::select(vec![1u32, 2, 3, 4, 5, 6, 8, 13, 14, 15, 17, 19]),
            0u32..32,
        ],
        any::<bool>(),
        name,
        vec(item, 0..4),
        any::<u32>(),
    )
        .prop_map(|(kind, kind_flag, name, items, extra)| TypeRec {
            kind,
            kind_flag,
            name,
            items,
            extra,
        })
}

/// A BTF blob: the 24-byte header, the type records laid out as each kind's size says, the
/// string section.
fn btf_blob(types: &[TypeRec]) -> Vec<u8> {
    let mut t = Vec::new();
    let mut put = |w: u32| t.extend_from_slice(&w.to_le_bytes());
    for ty in types {
        let vlen = ty.items.len() as u32;
        put(ty.name);
        put((u32::from(ty.kind_flag) << 31) | (ty.kind << 24) | vlen);
        put(ty.extra);
        for &(a, b, c) in &ty.items {
            // Struct, union, datasec and enum64 items are 12 bytes; enum and func-proto 8.
            match ty.kind {
                4 | 5 | 15 | 19 => [a, b, c].into_iter().for_each(&mut put),
                6 | 13 => [a, b].into_iter().for_each(&mut put),
                _ => {}
            }
        }
        match ty.kind {
            1 | 14 | 17 => put(ty.extra),
            3 => (0..3).for_each(|_| put(ty.extra)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&0xeb9fu16.to_le_bytes());
    out.extend_from_slice(&[1, 0]);
    for w in [24u32, 0, t.len() as u32, t.len() as u32, STRINGS.len() as u32] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&t);
    out.extend_from_slice(STRINGS);
    out
}

fn query(btf: &Btf) {
    let _ = btf.enum_values("skb_drop_reason");
    for (s, m) in [("sk_buff", "head"), ("sk_buff", "dev"), ("net", "ns"), ("", ""), ("a", "X")] {
        let _ = btf.member_offset(s, m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn btf_never_panics(bytes in prop_oneof![
        vec(any::<u8>(), 0..200),
        // A valid header with random types behind it.
        vec(any::<u8>(), 0..200).prop_map(|t| {
            let mut b = vec![0x9f, 0xeb, 1, 0];
            for w in [24u32, 0, t.len() as u32, t.len() as u32, 0] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend(t);
            b
        }),
    ]) {
        if let Ok(btf) = Btf::parse(&bytes) {
            query(&btf);
        }
    }

    /// Well-laid-out records of every kind (unknown kinds included) parse or fail cleanly, and
    /// so does every mangled copy; what parses can be queried.
    #[test]
    fn btf_records(
        types in vec(type_rec(), 0..8),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let blob = btf_blob(&types);
        if let Ok(btf) = Btf::parse(&blob) {
            query(&btf);
        }
        let mut bad = blob.clone();
        for (at, v) in edits {
            let i = at.index(bad.len());
            bad[i] = v;
        }
        bad.truncate(cut.index(bad.len() + 1));
        // Mangled bytes can hold any bit offset: only enums are looked up (member offsets can
        // overflow, see `btf_member_offset_overflows`).
        if let Ok(btf) = Btf::parse(&bad) {
            let _ = btf.enum_values("skb_drop_reason");
        }
    }

    /// An enum and a struct written as the kernel does come back.
    #[test]
    fn btf_round_trip(values in vec(any::<u32>(), 1..4), offsets in vec(0u32..1 << 20, 2)) {
        let name = |s: &str| {
            let needle = [s.as_bytes(), b"\0"].concat();
            STRINGS.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32
        };
        let enum_items = values.iter().map(|&v| (name("X"), v, 0)).collect();
        let types = [
            TypeRec { kind: 1, kind_flag: false, name: 0, items: vec![], extra: 32 },
            TypeRec {
                kind: 6,
                kind_flag: false,
                name: name("skb_drop_reason"),
                items: enum_items,
                extra: 4,
            },
            TypeRec {
                kind: 4,
                kind_flag: false,
                name: name("sk_buff"),
                items: vec![(name("head"), 1, offsets[0] * 8), (name("dev"), 1, offsets[1] * 8)],
                extra: 64,
            },
        ];
        let btf = Btf::parse(&btf_blob(&types)).expect("well-formed BTF");
        prop_assert_eq!(btf.member_offset("sk_buff", "head"), Some(offsets[0]));
        prop_assert_eq!(btf.member_offset("sk_buff", "dev"), Some(offsets[1]));
        let e = btf.enum_values("skb_drop_reason").expect("the enum");
        let last = *values.last().unwrap();
        prop_assert_eq!(e.get(&i64::from(last)).map(String::as_str), Some("X"));
    }
}

/// A struct whose anonymous member is the struct itself, at `bit_offset`, `fanout` times.
fn self_nesting(fanout: usize, bit_offset: u32) -> Vec<u8> {
    let types = [TypeRec {
        kind: 4,
        kind_flag: false,
        name: 1, // "sk_buff"
        items: vec![(0, 1, bit_offset); fanout],
        extra: 8,
    }];
    btf_blob(&types)
}

/// Found by `btf_records` (fixed): nested anonymous members whose bit offsets sum past 2^32
/// made `member_offset` overflow (a panic in debug builds, a wrong offset in release).
#[test]
fn btf_member_offset_overflows() {
    let btf = Btf::parse(&self_nesting(1, 0x8000_0000)).expect("parses");
    assert_eq!(btf.member_offset("sk_buff", "head"), None);
}

/// Found while writing `btf_records` (fixed): a struct with `k` anonymous members of its own
/// type cost about k^9 steps to search (minutes for 10); types already on the search path are
/// no longer searched again.
#[test]
fn btf_nested_search_is_exponential() {
    let btf = Btf::parse(&self_nesting(10, 0)).expect("parses");
    let started = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(btf.member_offset("sk_buff", "head")).unwrap());
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert!(got.is_ok(), "member_offset still running after {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// The per-peer reading.

/// Per-peer map entries: few addresses, so that peers have several entries (ports, directions,
/// interfaces), and small counts, so that ties are common. Keys are unique, as in the map.
fn peer_entries() -> impl Strategy<Value = Vec<(PeerKey, PeerCounters)>> {
    let key = (1u32..3, 0u8..24, prop::sample::select(vec![25u16, 465, 587]), 0u8..2);
    let entry =
        (key, 0u64..6, 0u64..3, 0u64..3).prop_map(|((ifindex, a, port, d), syn, zw, refused)| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&[192, 0, 2, a]);
            let k = PeerKey { ifindex, addr, port, family: FAMILY_V4, direction: d };
            let mut c = PeerCounters::default();
            c.counts[PeerCounters::index(Event::Syn, Side::Peer)] = syn;
            c.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] = zw;
            c.outcomes[Outcome::Refused as usize] = refused;
            (k, c)
        });
    vec(entry, 0..120).prop_map(|v| {
        let mut seen = BTreeSet::new();
        v.into_iter().filter(|(k, _)| seen.insert(*k)).collect()
    })
}

/// The exact ranking the bounded reading replaces (what `export::top_peers` was): activity
/// summed per peer over every entry, the `limit` largest, ties broken by address.
fn exact_top_peers(entries: &[(PeerKey, PeerCounters)], limit: usize) -> BTreeSet<PeerId> {
    let mut activity: BTreeMap<PeerId, u64> = BTreeMap::new();
    for (k, v) in entries {
        *activity.entry(peer_id(k)).or_default() += v.total();
    }
    let mut ranked: Vec<(PeerId, u64)> = activity.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.into_iter().take(limit).map(|(id, _)| id).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// While every entry fits in the candidates (ENTRY_SLACK per exported peer), the reading
    /// chooses exactly the peers the exact ranking does, with all their entries; it always
    /// counts entries and distinct peers exactly, and keeps its figures bounded and sorted.
    #[test]
    fn peer_reading_matches_the_exact_one(entries in peer_entries(), cap in 0usize..12) {
        let v = PeerReader::new(cap).view_of(&entries, &[], &[]);
        let distinct: BTreeSet<PeerId> = entries.iter().map(|(k, _)| peer_id(k)).collect();
        prop_assert_eq!(v.entries, entries.len());
        prop_assert_eq!(v.tracked, distinct.len());
        prop_assert!(v.exported_peers <= cap);
        let chosen: BTreeSet<PeerId> = v.exported.iter().map(|(k, _)| peer_id(k)).collect();
        prop_assert_eq!(chosen.len(), v.exported_peers);
        if entries.len() <= cap * ENTRY_SLACK {
            prop_assert_eq!(&chosen, &exact_top_peers(&entries, cap));
            let all: BTreeSet<PeerKey> =
                entries.iter().filter(|(k, _)| chosen.contains(&peer_id(k))).map(|(k, _)| *k).collect();
            let got: BTreeSet<PeerKey> = v.exported.iter().map(|(k, _)| *k).collect();
            prop_assert_eq!(got, all);
        }
        let zw = v.figure(Figure::ZeroWindowsSent);
        prop_assert!(zw.len() <= FIGURE_KEEP && zw.windows(2).all(|w| w[0].1 >= w[1].1));
        let nonzero = entries
            .iter()
            .filter(|(_, c)| c.counts[PeerCounters::index(Event::ZeroWindow, Side::Local)] > 0)
            .count();
        prop_assert_eq!(zw.len(), nonzero.min(FIGURE_KEEP));
        let outbound = v.figure(Figure::OutboundRefused);
        prop_assert!(outbound.iter().all(|(k, n)| k.direction == Direction::Outbound as u8 && *n > 0));
    }
}
