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
use smtpflow_common::{Config, DropConfig, HistKind, SCOPE_SLOTS, names};

/// A `SCOPES` entry for a scope not watched (the kernel's `NO_SCOPE`).
const NO_SCOPE: u32 = u32::MAX;

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

/// The aya-log level the kernel programs report at: the most detailed level the logger shows
/// for [`names::KERNEL_LOG_TARGET`] (0 for none). Written into the object's read-only data
/// before load, so that below it the verifier drops the reporting code as dead, and a report
/// costs nothing.
pub fn kernel_log_level() -> u8 {
    use log::Level;
    [Level::Trace, Level::Debug, Level::Info, Level::Warn, Level::Error]
        .into_iter()
        .find(|&l| log::log_enabled!(target: names::KERNEL_LOG_TARGET, l))
        // aya-log's levels: error 1 … trace 5, as `log`'s.
        .map_or(0, |l| l as u8)
}

/// Loads the kernel object with its configuration: the per-scope arrays sized for the
/// interfaces and ports it lists, and where each scope's counters are. `log_level`: the
/// kernel's aya-log level ([`kernel_log_level`]; 0: none).
pub fn load(
    config: &Config,
    drop_config: &DropConfig,
    sizes: &Sizes,
    log_level: u8,
) -> anyhow::Result<Ebpf> {
    raise_memlock_limit();
    // An array has at least one entry; with no interface listed every lookup misses it.
    let scopes = config.scope_count().max(1);
    let mut ebpf = EbpfLoader::new()
        .override_global(names::GLOBAL_CONFIG, config, true)
        .override_global(names::GLOBAL_DROP_CONFIG, drop_config, true)
        .override_global(aya_log::LEVEL, &log_level, true)
        .map_max_entries(names::MAP_PEERS, sizes.max_peers)
        .map_max_entries(names::MAP_PEER_GREETINGS, sizes.max_peers)
        .map_max_entries(names::MAP_FLOWS, sizes.max_flows)
        .map_max_entries(names::MAP_SCOPE_COUNTS, scopes * SCOPE_SLOTS as u32)
        .map_max_entries(names::MAP_HISTS, scopes * HistKind::COUNT as u32)
        .map_max_entries(names::MAP_SCOPES, config.scope_keys_len())
        .load(object()?)
        .context(
            "loading the eBPF object failed: the kernel needs BPF with BTF (Linux 5.8+ with \
             CONFIG_DEBUG_INFO_BTF); run as root, and see `dmesg` for the kernel's reason",
        )?;
    write_scopes(&mut ebpf, config)?;
    Ok(ebpf)
}

/// Writes where the kernel finds each watched scope's counters: `SCOPES`, every scope's index
/// in the per-scope arrays by [`Config::scope_key`].
fn write_scopes(ebpf: &mut Ebpf, config: &Config) -> anyhow::Result<()> {
    let mut scopes: aya::maps::Array<_, u32> = ebpf
        .map_mut(names::MAP_SCOPES)
        .context("the kernel object has no scopes map")?
        .try_into()?;
    let mut index = vec![NO_SCOPE; config.scope_keys_len() as usize];
    for (key, at, _) in config.scope_keys() {
        index[key as usize] = at;
    }
    for (key, at) in (0..).zip(index) {
        scopes.set(key, at, 0).context("writing the scopes map")?;
    }
    Ok(())
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
