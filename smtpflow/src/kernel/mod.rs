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
use smtpflow_common::{
    Config, DropConfig, HistKind, SCOPE_SLOTS,
    flow_table::{self, SET_BYTES},
    names,
    peer::{PEER_LOG_BYTES, peer_counts},
};

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
    /// XDP on ingress only, in the mode `--xdp-mode` picks: sees what peers send, nothing the
    /// local host sends.
    Xdp,
}

/// Which XDP mode `--mode xdp` attaches in (`--xdp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpAttach {
    /// Generic mode on veth, where driver mode makes the device give up GSO (an empty program
    /// in driver mode keeps a fifth of veth's throughput or less, in generic mode most of it:
    /// docs/benchmarks.md); elsewhere driver mode where the device has native XDP, else generic.
    Auto,
    /// Driver (native) mode only: refused where the device has no native XDP.
    Driver,
    /// Generic (skb) mode only: where tc runs, after the socket buffer is built.
    Generic,
}

impl XdpAttach {
    /// Whether this choice starts in generic mode on a device of driver `driver` (as `ethtool
    /// -i` names it; `None`: unknown), rather than trying driver mode first.
    pub fn generic_first(self, driver: Option<&str>) -> bool {
        match self {
            XdpAttach::Auto => driver == Some("veth"),
            XdpAttach::Driver => false,
            XdpAttach::Generic => true,
        }
    }
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

/// The free entries Linux's LRU hash map may hold back on each CPU, and on its shared list, when
/// it starts to evict. A CPU whose own free list is empty takes up to this many from the shared
/// list (`LOCAL_FREE_TARGET`, 128; since Linux 6.16 fewer for a small map), and evicts live
/// entries for whatever the shared list lacks, while the other CPUs' lists may still hold up
/// to this many each. So a map of exactly `n` entries evicts some before it holds `n` (on this
/// 2-CPU machine, 64 of 201 keys in a 256-entry map); one of `n` + this × (CPUs + 1) entries
/// evicts none while it holds `n` or fewer.
pub const LRU_FREE_ROOM: u32 = 128;

/// Room in the per-peer reply map (`PEER_GREETINGS`) for each peer of `--max-peers`: an
/// entry per reply code and kind. A plain session has four (its greeting, and `220`, `250`,
/// `221` among every reply); a session that sends mail or is refused has one or two more, and
/// one that turns to TLS fewer.
pub const REPLY_ENTRIES_PER_PEER: u32 = 4;

impl Sizes {
    /// The entries a kernel LRU map needs so that it evicts none while it holds `n` or fewer,
    /// with `cpus` possible CPUs ([`LRU_FREE_ROOM`]).
    pub fn lru_entries(n: u32, cpus: u32) -> u32 {
        n.saturating_add(LRU_FREE_ROOM.saturating_mul(cpus.saturating_add(1)))
    }

    /// The entries of the per-peer reply map that `--max-peers` asks for, before the LRU's room
    /// ([`REPLY_ENTRIES_PER_PEER`] a peer).
    pub fn max_peer_replies(&self) -> u32 {
        self.max_peers.saturating_mul(REPLY_ENTRIES_PER_PEER)
    }

    /// The sizes the kernel maps are created with, on a host with `cpus` possible CPUs.
    pub fn maps(&self, cpus: u32) -> MapSizes {
        MapSizes {
            peers: Self::lru_entries(self.max_peers, cpus),
            peer_replies: Self::lru_entries(self.max_peer_replies(), cpus),
            flow_sets: flow_table::sets_for(self.max_flows),
        }
    }
}

/// The sizes of the kernel's per-peer LRU maps ([`Sizes::maps`]: what each can hold before it
/// evicts) and the flow table's sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub peers: u32,
    pub peer_replies: u32,
    pub flow_sets: u32,
}

impl MapSizes {
    /// About how much kernel memory the maps take: an entry of each LRU map, with the hash
    /// table's own share, as `bpftool map show` reports it on Linux 6.18 (240 and 120 bytes),
    /// and the flow table's sets (704 bytes, 88 a way).
    pub fn kernel_bytes(&self) -> u64 {
        u64::from(self.peers) * 240
            + u64::from(self.peer_replies) * 120
            + u64::from(self.flow_sets) * SET_BYTES as u64
    }
}

/// The host's possible CPUs, as the kernel sizes its per-CPU lists.
pub fn possible_cpus() -> anyhow::Result<u32> {
    let n = aya::util::nr_cpus().map_err(|(_, e)| e).context("reading the CPU count")?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
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
    let maps = sizes.maps(possible_cpus()?);
    // The flow table's sets, for `--max-flows`: the programs read their number from the
    // configuration, and the map is created with as many.
    let mut config = *config;
    config.flow_sets = maps.flow_sets;
    let config = &config;
    // An array has at least one entry; with no interface listed every lookup misses it.
    let scopes = config.scope_count().max(1);
    // With the per-peer log, the programs never touch the per-peer map: one entry keeps its
    // place in the object.
    let (peers, peer_log) = match config.peer_log {
        peer_counts::MAP => (maps.peers, 4096),
        _ => (1, PEER_LOG_BYTES),
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(names::GLOBAL_CONFIG, config, true)
        .override_global(names::GLOBAL_DROP_CONFIG, drop_config, true)
        .override_global(aya_log::LEVEL, &log_level, true)
        .map_max_entries(names::MAP_PEERS, peers)
        .map_max_entries(names::MAP_PEER_LOG, peer_log)
        .map_max_entries(names::MAP_PEER_GREETINGS, maps.peer_replies)
        .map_max_entries(names::MAP_FLOWS, config.flow_sets)
        .map_max_entries(names::MAP_FLOW_TAGS, config.flow_sets)
        .map_max_entries(names::MAP_SCOPE_COUNTS, scopes * SCOPE_SLOTS as u32)
        .map_max_entries(names::MAP_HISTS, scopes * HistKind::COUNT as u32)
        .map_max_entries(names::MAP_SCOPES, config.scope_keys_len())
        .load(object()?)
        .with_context(|| {
            format!(
                "loading the eBPF object failed: the kernel needs BPF with BTF (Linux 5.8+ with \
                 CONFIG_DEBUG_INFO_BTF); run as root, and see `dmesg` for the kernel's reason. \
                 The per-peer and flow maps take about {} MiB of kernel memory at these sizes \
                 (--max-peers {}, --max-flows {}): lower them if memory is short",
                (MapSizes { peers, ..maps }.kernel_bytes() + u64::from(peer_log)) >> 20,
                sizes.max_peers,
                sizes.max_flows
            )
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_maps_get_the_room_linux_keeps_free() {
        let sizes = Sizes { max_peers: 65_536, max_flows: 262_144 };
        // Two CPUs: 128 × 3 more each.
        assert_eq!(
            sizes.maps(2),
            MapSizes { peers: 65_920, peer_replies: 262_528, flow_sets: 65_536 }
        );
        // What the load error names: 15.8 + 31.5 + 46.1 MB at the defaults.
        assert_eq!(sizes.maps(2).kernel_bytes(), 93_461_504);
        assert_eq!(Sizes::lru_entries(1, 1), 257);
        // The largest --max-peers (16,777,216) with four reply entries a peer still fits, and
        // nothing wraps.
        let largest = Sizes { max_peers: 16_777_216, max_flows: 16_777_216 };
        assert_eq!(largest.maps(4096).peer_replies, 67_108_864 + 128 * 4097);
        assert_eq!(Sizes::lru_entries(u32::MAX, u32::MAX), u32::MAX);
    }
}
