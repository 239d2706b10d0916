//! The kernel suite: which tests run on which kernel, the test binaries, and the script the
//! guest runs.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::workspace_root;

/// Modules the tests need; on Debian's cloud kernels they are modules, not built in.
const GUEST_MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_ct",
    // `reject with icmp ...` and `reject with icmpv6 ...` in an inet table (nf_reject_ipv4/6).
    "nft_reject_inet",
    "nfnetlink_queue",
    "nft_queue",
    "xt_NFQUEUE",
];

/// Time for one test inside the guest (the slowest take about a minute there).
const TEST_TIMEOUT_S: u64 = 600;

/// What a test of the suite needs from the kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    Any,
    /// TCX links: Linux 6.6+. Older kernels run the netlink-TC counterparts.
    Tcx,
}

/// The kernel suite: (test binary, test, needs). Chosen for what differs between kernels:
/// TC through TCX or netlink, XDP driver and generic mode on veth, the crash lifecycle of each
/// attach method, the verifier on every program (the parser's direct reads and its
/// `bpf_skb_load_bytes` fallback, reply reading, the ICMP unreachable path), drop reasons by name from each kernel's BTF (IPv4 and IPv6, read through the kernel's typed pointers),
/// the tcp_conn_request fexit, conntrack statistics through ctnetlink, the LRU maps' room
/// (each kernel's LRU keeps its own number of free entries per CPU), the per-peer log
/// (`--peer-counts log`: the programs write a ring buffer instead of the per-peer map), and the
/// diagnosis at its
/// default thresholds: silent on a noisy but healthy gateway, naming each real fault.
const SUITE: &[(&str, &str, Needs)] = &[
    ("traffic", "tc_ipv4_connections", Needs::Any),
    ("traffic", "tc_ipv6_connections", Needs::Any),
    ("traffic", "xdp_ipv4_connections", Needs::Any),
    ("traffic", "xdp_ipv6_connections", Needs::Any),
    ("frames", "tc_nonlinear_frames", Needs::Any),
    ("frames", "xdp_crafted_frames", Needs::Any),
    ("lifecycle", "sigkill_leaves_nothing_attached_tcx", Needs::Tcx),
    ("lifecycle", "sigkill_leaves_nothing_attached_xdp", Needs::Any),
    ("lifecycle", "netlink_filters_survive_sigkill_and_are_cleaned_at_next_start", Needs::Any),
    ("lifecycle", "sigint_exits_zero_and_detaches_netlink", Needs::Any),
    ("lifecycle", "sigterm_exits_zero_and_detaches_tcx", Needs::Tcx),
    ("handshakes", "tc_inbound_greetings_from_smtp_sink", Needs::Any),
    ("handshakes", "tc_refused_timeouts_and_netfilter_drops", Needs::Any),
    ("handshakes", "tc_ipv6_netfilter_drops", Needs::Any),
    ("handshakes", "tc_listen_overflow_drop_reason", Needs::Any),
    ("handshakes", "tc_outbound_unreachable_answered_by_icmp", Needs::Any),
    ("handshakes", "xdp_ingress_only_outcomes", Needs::Any),
    ("peer_series", "peers_that_fit_are_never_evicted", Needs::Any),
    ("peer_series", "peers_that_fit_are_never_evicted_from_the_peer_log", Needs::Any),
    ("pressure", "conntrack_default_source_is_ctnetlink_and_matches_node_exporter", Needs::Any),
    ("diagnosis", "noisy::noisy_but_healthy_gateway_raises_no_cause", Needs::Any),
    ("diagnosis", "faults::remote_throttling_a_421_on_every_session", Needs::Any),
    ("diagnosis", "faults::remote_refusing_a_closed_port", Needs::Any),
    ("diagnosis", "faults::remote_unreachable_behind_a_firewall", Needs::Any),
    ("diagnosis", "faults::listen_overflow_an_smtp_listener_that_stops_accepting", Needs::Any),
    ("diagnosis", "faults::conntrack_exhaustion_a_full_table", Needs::Any),
    ("diagnosis", "faults::local_receive_stall_an_mta_that_stops_reading", Needs::Any),
    ("diagnosis", "faults::peer_receive_stall_a_remote_that_stops_reading", Needs::Any),
];

/// The integration test binaries by name (`traffic`, `lifecycle`, ...), built with the debug
/// profile like `cargo test` builds them.
pub fn test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = crate::cargo()
        .args(["test", "--package", "smtpflow-tests", "--no-run", "--message-format=json"])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("building the integration tests")?;
    if !out.status.success() {
        bail!("building the integration tests failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = line.split("\"executable\":\"").nth(1) else { continue };
        let Some(path) = rest.split('"').next() else { continue };
        let path = PathBuf::from(path);
        let stem = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
        if let Some((name, _hash)) = stem.rsplit_once('-') {
            bins.push((name.to_owned(), path));
        }
    }
    if bins.is_empty() {
        bail!("cargo test --no-run named no test binaries");
    }
    Ok(bins)
}

/// The tests a binary has (`--list`).
pub fn list_tests(bin: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(bin)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// One planned test: binary name, its path, the test, and why it is skipped (if it is).
pub struct Planned {
    pub binary: String,
    pub path: PathBuf,
    pub test: String,
    pub skip: Option<String>,
}

impl Planned {
    pub fn name(&self) -> String {
        format!("{}::{}", self.binary, self.test)
    }
}

/// The kernel suite for a kernel of `version`, or every test whose name contains `filter`.
pub fn plan(
    binaries: &[(String, PathBuf)],
    filter: Option<&str>,
    version: (u32, u32),
) -> anyhow::Result<Vec<Planned>> {
    let has_tcx = version >= (6, 6);
    let mut plan = Vec::new();
    if let Some(filter) = filter {
        for (binary, path) in binaries {
            for test in list_tests(path)? {
                if test.contains(filter) || format!("{binary}::{test}").contains(filter) {
                    plan.push(Planned {
                        binary: binary.clone(),
                        path: path.clone(),
                        test,
                        skip: None,
                    });
                }
            }
        }
        if plan.is_empty() {
            bail!("no integration test matches {filter:?}");
        }
        return Ok(plan);
    }
    let mut listed: Vec<(String, Vec<String>)> = Vec::new();
    for &(binary, test, needs) in SUITE {
        let path = binaries
            .iter()
            .find(|(b, _)| b == binary)
            .map(|(_, p)| p.clone())
            .with_context(|| {
                format!("the kernel suite names test binary {binary}, which cargo did not build")
            })?;
        if !listed.iter().any(|(b, _)| b == binary) {
            listed.push((binary.to_owned(), list_tests(&path)?));
        }
        let tests = &listed.iter().find(|(b, _)| b == binary).expect("listed above").1;
        if !tests.iter().any(|t| t == test) {
            bail!(
                "the kernel suite names {binary}::{test}, which does not exist any more: update SUITE in xtask/src/kernel/plan.rs"
            );
        }
        let skip = (needs == Needs::Tcx && !has_tcx)
            .then(|| "TCX needs Linux 6.6; the netlink tests cover this kernel".to_owned());
        plan.push(Planned { binary: binary.to_owned(), path, test: test.to_owned(), skip });
    }
    Ok(plan)
}

/// Run in the guest before the suite: one connection attempt through conntrack, in a namespace
/// of its own, with nothing else running. Linux takes conntrack's hash seed at its first hash
/// (`get_random_once` in `hash_conntrack_raw`), and then patches that one-time branch out of its
/// code. Under QEMU's software emulation a second vCPU running the code while it is patched can
/// take the patch's int3 as an oops: the 6.12 guest died so once, at the first conntrack test's
/// first packets (both vCPUs in `nf_conntrack_in`). Done here, the patch happens while the other
/// vCPU is idle.
const CONNTRACK_WARM_UP: &str = r#"ip netns add xtask-ct && ip -n xtask-ct link set lo up &&
  ip netns exec xtask-ct nft -f - <<'NFT' &&
table inet xtask_ct {
  chain out {
    type filter hook output priority 0;
    ct state new counter
  }
}
NFT
  ip netns exec xtask-ct python3 -c 'import socket; socket.socket().connect_ex(("127.0.0.1", 9))'
echo "xtask-guest: conntrack warmed up: $(ip netns exec xtask-ct nft list chain inet xtask_ct out 2>&1 | grep -o 'packets [0-9]*')"
ip netns del xtask-ct 2>/dev/null
"#;

/// The script the guest runs (also run as is on the host for the matrix's host column).
pub fn guest_script(out: &Path, bin: &Path, plan: &[Planned], guest: bool) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/sh\n# Written by `cargo xtask test --kernel`; run inside the VM.");
    let _ = writeln!(s, "OUT={}\nBIN={}", q(out), q(bin));
    s += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
    s += "export SMTPFLOW_BIN=\"$BIN\" RUST_BACKTRACE=1\n";
    // The tests note there what they skip or weaken on this kernel (see `skips`).
    let _ = writeln!(s, "export {}=\"$OUT/skipped\"\n: > \"$OUT/skipped\"", crate::skips::VAR);
    s += "date +%s > \"$OUT/started\"\n";
    s += "echo \"xtask-guest: $(uname -r): the kernel suite starts\"\n";
    if guest {
        // Kernel messages below warnings stay in dmesg (saved at the end), off the console.
        s += "dmesg -n 4\n";
        let _ = writeln!(s, "for m in {}; do", GUEST_MODULES.join(" "));
        s += "  modprobe \"$m\" 2>/dev/null || echo \"xtask-guest: module $m not loaded\"\ndone\n";
        // As systemd does on a real host (smtpflow does not need it; bpftool pinning does).
        s += "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n";
        s += "mkdir -p /run/netns\n";
        s += CONNTRACK_WARM_UP;
    }
    s += r#"
echo "xtask-guest: smtpflow check"
"$BIN" check > "$OUT/check.txt" 2>&1; echo "(exit $?)" >> "$OUT/check.txt"
cat "$OUT/check.txt"

# What smtpflow says at start on this kernel: TC (auto), XDP, drop reasons, conntrack source.
: > "$OUT/startup.txt"
for mode in tc xdp; do
  ip netns add xtask-probe && ip -n xtask-probe link add p0 type veth peer name p1 &&
    ip -n xtask-probe link set p0 up && ip -n xtask-probe link set p1 up
  echo "== smtpflow diagnose --mode $mode --iface p0 --for 1s" >> "$OUT/startup.txt"
  timeout -k 5 120 ip netns exec xtask-probe "$BIN" diagnose --mode "$mode" --iface p0 --for 1s \
    >> "$OUT/startup.txt" 2>&1
  echo "(exit $?)" >> "$OUT/startup.txt"
  ip netns del xtask-probe
done
cat "$OUT/startup.txt"

: > "$OUT/results"
run() {  # binary-name path test
  echo "xtask-guest: running $1::$3"
  t0=$(date +%s.%N)
"#;
    let _ = writeln!(
        s,
        "  (cd {} && timeout -k 10 {TEST_TIMEOUT_S} \"$2\" --exact \"$3\" --test-threads=1 --color never --nocapture)",
        q(&workspace_root().join("tests"))
    );
    s += r#"  rc=$?
  t1=$(date +%s.%N)
  echo "$1::$3 $rc $t0 $t1" >> "$OUT/results"
  echo "xtask-guest: $1::$3 exit $rc"
}
"#;
    for p in plan.iter().filter(|p| p.skip.is_none()) {
        let _ = writeln!(s, "run {} {} {}", p.binary, q(&p.path), shell_quote(&p.test));
    }
    if guest {
        s += "dmesg > \"$OUT/dmesg\"\n";
    }
    s += "echo done > \"$OUT/rc\"\necho \"xtask-guest: the kernel suite is done\"\n";
    s
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
