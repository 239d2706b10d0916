//! Netfilter rules inside a test namespace (removed with the namespace), their packet counters,
//! and the kernel's own TCP statistics of a namespace.
use crate::Netns;

/// The nftables table the tests create in a namespace.
pub const TABLE: &str = "smtpflow_test";

/// Creates `inet smtpflow_test` with an `input` and an `output` filter chain (policy accept).
pub fn nft_table(ns: &Netns) {
    ns.exec_ok("nft", &["add", "table", "inet", TABLE]);
    for (chain, hook) in [("input", "input"), ("output", "output")] {
        ns.exec_ok(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                TABLE,
                chain,
                &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
            ],
        );
    }
}

/// Adds a rule to `chain` (`input` or `output`) that drops pure SYNs to TCP port `dport`,
/// counting them in the named counter `counter`.
pub fn nft_drop_syns(ns: &Netns, chain: &str, dport: u16, counter: &str) {
    ns.exec_ok("nft", &["add", "counter", "inet", TABLE, counter]);
    ns.exec_ok(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            TABLE,
            chain,
            &format!(
                "tcp dport {dport} tcp flags & (syn | ack | rst) == syn counter name \"{counter}\" drop"
            ),
        ],
    );
}

/// The packets counted by a named counter of the test table.
pub fn nft_counter(ns: &Netns, counter: &str) -> u64 {
    counter_packets(ns, "inet", TABLE, counter)
}

/// The packets counted by the named counter `counter` of table `family table`.
pub fn counter_packets(ns: &Netns, family: &str, table: &str, counter: &str) -> u64 {
    let out = ns.exec_ok("nft", &["list", "counter", family, table, counter]);
    // "... counter NAME { packets N bytes M }"
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no packet count in nft output: {out}"))
}

/// Queues pure SYNs to TCP port `dport` arriving at the namespace's local stack (the `INPUT`
/// chain, after TC ingress) to NFQUEUE `queue`. An `iptables-nft` rule: the xtables NFQUEUE
/// target, since this kernel lacks the nftables `queue` expression.
pub fn queue_syns(ns: &Netns, dport: u16, queue: u16) {
    ns.exec_ok(
        "iptables-nft",
        &[
            "-w",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &dport.to_string(),
            "--tcp-flags",
            "SYN,ACK,RST",
            "SYN",
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue.to_string(),
        ],
    );
}

/// A counter of `/proc/net/netstat` (e.g. `TcpExt`, `ListenOverflows`) as the namespace sees it.
pub fn netstat(ns: &Netns, group: &str, name: &str) -> u64 {
    let text = ns.exec_ok("cat", &["/proc/net/netstat"]);
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 2, "no {group} header and values in /proc/net/netstat:\n{text}");
    let names = lines[0].split_whitespace().skip(1);
    let values = lines[1].split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/netstat:\n{text}"))
}
