//! The kernel side, seen from userspace: the embedded object, loading it with its
//! configuration, attaching its programs ([`attach`]), and what the running kernel's BTF tells
//! ([`btf`], [`drop_reasons`]).
pub mod attach;
pub mod btf;
pub mod drop_reasons;
#[cfg(test)]
mod stack_budget;

use std::io;

use anyhow::{Context as _, bail};
use aya::{Ebpf, EbpfLoader, util::KernelVersion};
use clap::ValueEnum;
use log::warn;
use smtpflow_common::{Config, DropConfig, names};

/// The kernel object `build.rs` built from `smtpflow-ebpf` into OUT_DIR: empty when the build
/// was skipped (`AYA_BUILD_SKIP=1`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpflow"));

/// The embedded kernel object: the programs of the binary, the fuzz test and the benchmarks.
pub fn object() -> anyhow::Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this binary was built with AYA_BUILD_SKIP=1 and has no kernel programs; rebuild it with `cargo xtask build`"
        );
    }
    Ok(EBPF_OBJECT)
}

/// Where the kernel programs attach (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// clsact/TCX classifiers on ingress and egress: both directions, every event.
    Tc,
    /// XDP on ingress only (driver mode where the device supports it, else generic): sees what
    /// peers send, nothing the local host sends.
    Xdp,
}

/// How TC programs attach (`--tc-link`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcLink {
    /// TCX links on Linux 6.6 and later, netlink filters on older kernels.
    Auto,
    /// TCX links only (Linux 6.6+).
    Tcx,
    /// netlink clsact filters, as on kernels before 6.6 (stale filters of ours are removed at
    /// start; the clsact qdisc is never deleted).
    Netlink,
}

/// Map sizes chosen on the command line.
pub struct Sizes {
    pub max_peers: u32,
    pub max_flows: u32,
}

/// Loads the kernel object with its configuration.
pub fn load(config: &Config, drop_config: &DropConfig, sizes: &Sizes) -> anyhow::Result<Ebpf> {
    raise_memlock_limit();
    EbpfLoader::new()
        .override_global(names::GLOBAL_CONFIG, config, true)
        .override_global(names::GLOBAL_DROP_CONFIG, drop_config, true)
        .map_max_entries(names::MAP_PEERS, sizes.max_peers)
        .map_max_entries(names::MAP_PEER_GREETINGS, sizes.max_peers)
        .map_max_entries(names::MAP_FLOWS, sizes.max_flows)
        .load(object()?)
        .context(
            "loading the eBPF object failed: the kernel needs BPF with BTF (Linux 5.8+ with \
             CONFIG_DEBUG_INFO_BTF); run as root, and see `dmesg` for the kernel's reason",
        )
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
fn raise_memlock_limit() {
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 11, 0)) {
        return;
    }
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        warn!(
            "could not raise RLIMIT_MEMLOCK ({}); map creation may fail on old kernels",
            io::Error::last_os_error()
        );
    }
}
