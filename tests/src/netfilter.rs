//! Netfilter inside a test namespace (removed with the namespace): rules that drop or queue
//! SYNs, counters on an interface's ingress, and the RST oracle, an independent count of the
//! RSTs crossing an interface.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

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
    nft_syn_rule(ns, chain, "", dport, counter, "drop");
}

/// Adds a rule to `chain`: `<matches> tcp dport <dport>` for pure SYNs, counted in the named
/// counter `counter`, then `verdict`.
fn nft_syn_rule(ns: &Netns, chain: &str, matches: &str, dport: u16, counter: &str, verdict: &str) {
    ns.exec_ok("nft", &["add", "counter", "inet", TABLE, counter]);
    let rule = format!(
        "{matches}tcp dport {dport} tcp flags & (syn | ack | rst) == syn counter name \"{counter}\" {verdict}"
    );
    ns.exec_ok("nft", &["add", "rule", "inet", TABLE, chain, &rule]);
}

/// Adds a rule to `chain` that rejects pure SYNs of `nfproto` (`ipv4` or `ipv6`) to TCP port
/// `dport` with `reject` (an nft reject statement: `reject with icmp type host-unreachable`,
/// `reject with icmpv6 type admin-prohibited`), counting them in the named counter `counter`.
/// Each SYN counted is answered by one ICMP error, unless the namespace rate-limits its ICMP
/// errors (`net.ipv4.icmp_ratelimit`, `net.ipv6.icmp.ratelimit`).
pub fn nft_reject_syns(
    ns: &Netns,
    chain: &str,
    nfproto: &str,
    dport: u16,
    counter: &str,
    reject: &str,
) {
    nft_syn_rule(ns, chain, &format!("meta nfproto {nfproto} "), dport, counter, reject);
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

// ---------------------------------------------------------------------------------------------
// An nftables counter on an interface's ingress hook (the same point in the receive path as TC
// ingress).

pub const INGRESS_TABLE: &str = "smtpflow_ingress";

/// Counts, on `ifname`'s ingress, the frames matching `rule` (an nft expression, without the
/// `counter` statement), in the named counter `counter`.
pub fn nft_ingress_counter(ns: &Netns, ifname: &str, rule: &str, counter: &str) {
    let script = format!(
        "table netdev {INGRESS_TABLE} {{\n\
           counter {counter} {{ }}\n\
           chain in {{ type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
             {rule} counter name \"{counter}\"\n\
           }}\n\
         }}\n"
    );
    nft_script(ns, &script);
}

/// Packets counted by the named counter of [`INGRESS_TABLE`].
pub fn nft_ingress_packets(ns: &Netns, counter: &str) -> u64 {
    counter_packets(ns, "netdev", INGRESS_TABLE, counter)
}

// ---------------------------------------------------------------------------------------------
// An independent count of the RSTs on port 25 crossing an interface.

/// RSTs on SMTP port 25, by smtpflow's `direction` and `side`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rsts {
    pub inbound_peer: u64,
    pub inbound_local: u64,
    pub outbound_peer: u64,
    pub outbound_local: u64,
}

impl Rsts {
    pub fn total(&self) -> u64 {
        self.inbound_peer + self.inbound_local + self.outbound_peer + self.outbound_local
    }

    /// The RSTs counted since `base`.
    pub fn since(&self, base: &Rsts) -> Rsts {
        Rsts {
            inbound_peer: self.inbound_peer - base.inbound_peer,
            inbound_local: self.inbound_local - base.inbound_local,
            outbound_peer: self.outbound_peer - base.outbound_peer,
            outbound_local: self.outbound_local - base.outbound_local,
        }
    }
}

/// nftables counters on an interface's ingress (RSTs the peer sends) and egress (RSTs the local
/// host sends) hooks, next to TC's: the oracle for RSTs whose number depends on the kernel's
/// timing, such as the rare RST that ends a connection closed by both sides at once. Removed
/// with the namespace (or [`RstOracle::install`] again, e.g. for a re-created interface).
pub struct RstOracle {
    ns: String,
}

const RST_TABLE: &str = "smtpflow_rst";
const RST_COUNTERS: [&str; 4] =
    ["inbound_peer", "inbound_local", "outbound_peer", "outbound_local"];

impl RstOracle {
    pub fn install(ns: &Netns, ifname: &str) -> Self {
        // A table bound to a deleted interface is replaced (its base chains went with it).
        let _ = ns.exec("nft", &["delete", "table", "netdev", RST_TABLE]);
        let rst = "tcp flags & rst == rst counter name";
        let script = format!(
            "table netdev {RST_TABLE} {{\n\
               counter inbound_peer {{ }}\n  counter inbound_local {{ }}\n\
               counter outbound_peer {{ }}\n  counter outbound_local {{ }}\n\
               chain in {{\n\
                 type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
                 tcp dport 25 {rst} \"inbound_peer\"\n\
                 tcp sport 25 {rst} \"outbound_peer\"\n\
               }}\n\
               chain out {{\n\
                 type filter hook egress device \"{ifname}\" priority 0; policy accept;\n\
                 tcp sport 25 {rst} \"inbound_local\"\n\
                 tcp dport 25 {rst} \"outbound_local\"\n\
               }}\n\
             }}\n"
        );
        nft_script(ns, &script);
        Self { ns: ns.name.clone() }
    }

    /// The RSTs counted so far.
    pub fn read(&self) -> Rsts {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "list", "table", "netdev", RST_TABLE])
            .output()
            .expect("run nft");
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |name: &str| -> u64 {
            let after = text
                .split_once(&format!("counter {name} {{"))
                .unwrap_or_else(|| panic!("no counter {name} in:\n{text}"))
                .1;
            let words: Vec<&str> = after.split_whitespace().take(2).collect();
            assert_eq!(words.first(), Some(&"packets"), "counter {name}: {after}");
            words[1].parse().unwrap_or_else(|_| panic!("counter {name}: {after}"))
        };
        let [a, b, c, d] = RST_COUNTERS.map(get);
        Rsts { inbound_peer: a, inbound_local: b, outbound_peer: c, outbound_local: d }
    }
}

/// Runs an nft script (`nft -f -`) inside `ns`, panicking with its error.
pub fn nft_script(ns: &Netns, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
