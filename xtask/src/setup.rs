//! Idempotent set-up: every step first checks whether it is needed, so a second run is fast.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// Debian packages the build, `smtpflow watch` and the tests use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",    // ip netns, veth, tc
    "bpftool",     // the tests inspect what is attached
    "util-linux",  // setpriv (tests run smtpflow without privileges)
    "libcap2-bin", // capsh (tests drop single capabilities)
    "procps",      // sysctl
    "ca-certificates",
    "postfix",  // smtp-sink: the real SMTP server of the handshake tests
    "swaks",    // a real SMTP client for the handshake tests
    "nftables", // nft: SYN-dropping rules and their counters in the handshake tests
    "iptables", // iptables-nft: the xtables NFQUEUE target (no nft `queue` on every kernel)
    "iperf3",   // benchmarks: live throughput over veth
    "tcpdump",  // benchmarks: the alternative observer, side by side
    "binutils", // objcopy: `cargo xtask deb` strips the packaged binary
    "systemd",  // systemd-analyze: the tests verify the unit
    // node_exporter: the reference the pressure tests compare smtpflow's values with.
    "prometheus-node-exporter",
    // prometheus and promtool: the rules' checks and unit tests, `promtool check metrics`, and
    // the fleet tests' real Prometheus servers.
    "prometheus",
    // Alertmanager: the alerts test delivers the shipped rules' alerts through a real one.
    "prometheus-alertmanager",
    "curl",    // the hardening tests' client of the TLS and basic-auth metrics endpoint
    "openssl", // the hardening tests' CA, server and client certificates
    "hping3",  // the hardening tests' spoofed-source SYN flood
];

/// The bpf-linker series that matches the nightly's LLVM (its default `rust-llvm-22` feature).
const BPF_LINKER_VERSION: &str = "^0.10";

pub fn setup() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_packages() -> anyhow::Result<()> {
    apt_install(APT_PACKAGES, "the Debian packages smtpflow needs")
}

/// Installs those of `packages` that are missing (`what` names them in an error).
pub(crate) fn apt_install(packages: &[&str], what: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run_cmd(&mut apt_get(&["update", "-q"]))?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    run_cmd(&mut apt_get(&install)).with_context(|| format!("installing {what}"))
}

/// `apt-get <args>`, through sudo when not root.
fn apt_get(args: &[&str]) -> Command {
    let mut c = if crate::is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-E", "apt-get"]);
        c
    };
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed =
        output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"]);
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => return Ok(()),
        Some(_) => {}
        None => {
            eprintln!("setup: installing the nightly toolchain (the kernel programs need it)");
            run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))
            .context("installing the nightly toolchain with rustup")?;
        }
    }
    eprintln!("setup: adding rust-src to nightly");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"]) {
        if v.split_whitespace().nth(1).is_some_and(|v| v.starts_with("0.10.")) {
            return Ok(());
        }
        eprintln!("setup: bpf-linker {} found, replacing it with {BPF_LINKER_VERSION}", v.trim());
    } else {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about 90 s)");
    }
    run_cmd(Command::new("cargo").args([
        "+nightly",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
    ]))?;
    if output("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
