//! Attaching the loaded kernel programs to interfaces. Everything attached is owned by
//! [`Attached`]: dropping it detaches (TCX and XDP bpf links also go away with the process, so a
//! killed smtpflow leaves nothing behind; netlink TC filters are cleaned up at the next start).
use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf as AyaBtf, Ebpf,
    programs::{
        BtfTracePoint, FExit, LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, NlOptions, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
use log::{info, warn};
use smtpflow_common::names;

use super::{Mode, TcLink, XdpAttach};

/// An interface we watch.
#[derive(Debug, Clone)]
pub struct Iface {
    pub name: String,
    pub index: u32,
}

impl Iface {
    /// Looks the interface up in the current network namespace.
    pub fn lookup(name: &str) -> anyhow::Result<Self> {
        let c = CString::new(name).with_context(|| format!("bad interface name {name:?}"))?;
        // SAFETY: `c` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            bail!(
                "interface {name} does not exist in this network namespace \
                 (`ip -br link` lists the interfaces here)"
            );
        }
        Ok(Self { name: name.to_owned(), index })
    }
}

/// How one program is attached, for logs and `smtpflow_attachment_info`.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub iface: String,
    pub hook: &'static str,
    pub how: &'static str,
}

/// The loaded object with its programs attached. Drop to detach.
pub struct Attached {
    pub ebpf: Ebpf,
    pub attachments: Vec<Attachment>,
    /// Per-interface locks held while netlink TC filters are ours (released when the process
    /// ends, however it ends).
    _netlink_locks: Vec<File>,
}

/// Where the netlink TC locks live (a tmpfs: nothing survives a reboot).
const LOCK_DIR: &str = "/run/smtpflow";

/// Takes the lock that says "this process owns smtpflow's netlink filters on this interface".
/// Netlink filters outlive a killed process, so a new smtpflow removes the ones it finds: the
/// lock tells a crashed owner (lock free) from a running one (lock held), whose filters must be
/// left alone.
fn lock_netlink_iface(iface: &Iface) -> anyhow::Result<File> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    let netns =
        std::fs::metadata("/proc/self/ns/net").context("reading the network namespace")?.ino();
    let path = format!("{LOCK_DIR}/tc-netns{netns}-if{}.lock", iface.index);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        bail!(
            "another smtpflow (pid {}) is attached to {} through netlink TC filters; stop it \
             first (two instances can share an interface only with TCX, on Linux 6.6+)",
            owner.trim(),
            iface.name
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Attaches the programs of `mode` to every interface.
pub fn attach(
    mut ebpf: Ebpf,
    ifaces: &[Iface],
    mode: Mode,
    tc_link: TcLink,
    xdp_mode: XdpAttach,
) -> anyhow::Result<Attached> {
    let mut attachments = Vec::new();
    let mut netlink_locks = Vec::new();
    match mode {
        Mode::Tc => {
            let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
            let use_tcx = match tc_link {
                TcLink::Auto => has_tcx,
                TcLink::Tcx => {
                    if !has_tcx {
                        bail!(
                            "--tc-link tcx needs Linux 6.6 or later; use --tc-link auto or netlink"
                        );
                    }
                    true
                }
                TcLink::Netlink => false,
            };
            if !use_tcx {
                for iface in ifaces {
                    netlink_locks.push(lock_netlink_iface(iface)?);
                }
            }
            for (prog_name, hook, attach_type) in [
                (names::PROG_TC_INGRESS, "tc_ingress", TcAttachType::Ingress),
                (names::PROG_TC_EGRESS, "tc_egress", TcAttachType::Egress),
            ] {
                let prog: &mut SchedClassifier = program(&mut ebpf, prog_name)?.try_into()?;
                prog.load().map_err(|e| rejected(prog_name, e))?;
                for iface in ifaces {
                    let how = attach_tc(prog, prog_name, iface, attach_type, use_tcx)?;
                    attachments.push(Attachment { iface: iface.name.clone(), hook, how });
                }
            }
        }
        Mode::Xdp => {
            let prog: &mut Xdp = program(&mut ebpf, names::PROG_XDP)?.try_into()?;
            prog.load().map_err(|e| rejected(names::PROG_XDP, e))?;
            for iface in ifaces {
                let driver = driver(&iface.name);
                let runs = attach_xdp(prog, iface, xdp_mode, driver.as_deref())?;
                let how = runs.method();
                let advice = mode_advice(&iface.name, driver.as_deref(), runs);
                if advice.use_tc {
                    warn!("--mode xdp: {}", advice.text);
                }
                attachments.push(Attachment { iface: iface.name.clone(), hook: "xdp", how });
            }
        }
    }
    for a in &attachments {
        info!("attached {} on {} ({})", a.hook, a.iface, a.how);
    }
    Ok(Attached { ebpf, attachments, _netlink_locks: netlink_locks })
}

/// Loads one program through the verifier without attaching it (`smtpflow check`). For TC,
/// the ingress program stands for both directions (they are the same code).
pub fn verify(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let prog = program(ebpf, name)?;
    match prog {
        aya::programs::Program::SchedClassifier(p) => p.load().map_err(|e| rejected(name, e))?,
        aya::programs::Program::Xdp(p) => p.load().map_err(|e| rejected(name, e))?,
        _ => bail!("{name} is not a TC or XDP program"),
    }
    Ok(())
}

/// Loads the drop-reason program without attaching it (`smtpflow check`).
pub fn verify_drop_reasons(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let btf = AyaBtf::from_sys_fs().context("reading the kernel's BTF")?;
    let prog: &mut BtfTracePoint = program(ebpf, names::PROG_SKB_DROP)?.try_into()?;
    prog.load("kfree_skb", &btf).context("loading the kfree_skb tracepoint program")?;
    Ok(())
}

/// Attaches the `kfree_skb` drop-reason program, and the `tcp_conn_request` exit program that
/// sees the SYNs refused on a full accept queue (which never reach `kfree_skb`). Best effort:
/// on failure the caller says once what is unavailable and carries on.
pub fn attach_drop_reasons(attached: &mut Attached) -> anyhow::Result<()> {
    let btf = AyaBtf::from_sys_fs().context("reading the kernel's BTF")?;
    let prog: &mut BtfTracePoint = program(&mut attached.ebpf, names::PROG_SKB_DROP)?.try_into()?;
    prog.load("kfree_skb", &btf).context("loading the kfree_skb tracepoint program")?;
    prog.attach().context("attaching to the kfree_skb tracepoint")?;
    attached.attachments.push(Attachment {
        iface: String::new(),
        hook: "kfree_skb",
        how: "tp_btf",
    });
    info!("attached kfree_skb (tp_btf): SYN drop reasons are counted");
    let overflow = (|| -> anyhow::Result<()> {
        let prog: &mut FExit =
            program(&mut attached.ebpf, names::PROG_LISTEN_OVERFLOW)?.try_into()?;
        prog.load("tcp_conn_request", &btf).context("loading the tcp_conn_request exit program")?;
        prog.attach().context("attaching to tcp_conn_request")?;
        Ok(())
    })();
    match overflow {
        Ok(()) => {
            attached.attachments.push(Attachment {
                iface: String::new(),
                hook: "tcp_conn_request",
                how: "fexit",
            });
            info!(
                "attached tcp_conn_request (fexit): SYNs refused on full accept queues are counted"
            );
        }
        Err(e) => warn!(
            "SYNs refused on full accept queues are not counted as TCP_LISTEN_OVERFLOW drops: {e:#} \
             (ListenOverflows in smtpflow_tcp_stat_total still counts them)"
        ),
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).with_context(|| {
        format!("program {name} missing from the embedded object (a build problem)")
    })
}

/// A program the kernel refused, said in a few lines: the syscall's error and the verifier's
/// last words (its full log runs to thousands of lines; RUST_LOG=debug prints it).
fn rejected(name: &str, e: ProgramError) -> anyhow::Error {
    let ProgramError::LoadError { io_error, verifier_log } = &e else {
        return anyhow::Error::new(e).context(format!("loading program {name} failed"));
    };
    let log = verifier_log.to_string();
    log::debug!("verifier log of {name}:\n{log}");
    let verdict: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';') && !l.starts_with("verification time"))
        .filter(|l| !l.starts_with("stack depth") && !l.starts_with("processed "))
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    anyhow::anyhow!(
        "the kernel rejected program {name} ({io_error}): {}. This kernel may be too old for \
         smtpflow (Linux 5.15+ is supported; tested on 6.1, 6.12 and 6.18); `smtpflow check` \
         tells what works here, and RUST_LOG=debug prints the verifier's whole log",
        verdict.join(" / ")
    )
}

fn attach_tc(
    prog: &mut SchedClassifier,
    prog_name: &str,
    iface: &Iface,
    attach_type: TcAttachType,
    use_tcx: bool,
) -> anyhow::Result<&'static str> {
    let options = if use_tcx {
        TcAttachOptions::TcxOrder(LinkOrder::default())
    } else {
        // A clsact qdisc may already be there and shared with others: add ours only if missing,
        // and never delete it.
        match tc::qdisc_add_clsact(&iface.name) {
            Ok(()) => info!("added clsact qdisc on {}", iface.name),
            Err(e) if is_exists(&e) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("adding a clsact qdisc on {} failed", iface.name));
            }
        }
        // A previous smtpflow that was killed leaves its netlink filters behind: remove them.
        match tc::qdisc_detach_program(&iface.name, attach_type, prog_name) {
            Ok(()) => {
                warn!("removed stale {prog_name} filters on {} left by an earlier run", iface.name)
            }
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("removing stale {prog_name} filters on {} failed", iface.name)
                });
            }
        }
        TcAttachOptions::Netlink(NlOptions::default())
    };
    prog.attach_with_options(&iface.name, attach_type, options)
        .map_err(|e| tc_attach_error(e, iface, use_tcx))?;
    Ok(if use_tcx { "tcx" } else { "netlink" })
}

fn is_exists(e: &TcError) -> bool {
    match e {
        TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        TcError::IoError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

fn tc_attach_error(e: ProgramError, iface: &Iface, use_tcx: bool) -> anyhow::Error {
    let how = if use_tcx { "TCX" } else { "netlink clsact" };
    anyhow::Error::new(e).context(format!(
        "attaching the TC program to {} through {how} failed{}",
        iface.name,
        if use_tcx { "; on kernels without TCX try --tc-link netlink" } else { "" }
    ))
}

/// Attaches the XDP program to `iface` (of driver `driver`) as `choice` says: generic mode
/// first where [`XdpAttach::generic_first`] says so, else driver mode, falling back to generic
/// unless `--xdp-mode driver` asked for driver mode only. Returns how it runs.
fn attach_xdp(
    prog: &mut Xdp,
    iface: &Iface,
    choice: XdpAttach,
    driver: Option<&str>,
) -> anyhow::Result<XdpRuns> {
    let taken =
        |e: &ProgramError| os_error(e) == Some(libc::EEXIST) || os_error(e) == Some(libc::EBUSY);
    let another = || {
        anyhow!(
            "another XDP program is already attached to {} (`bpftool net show dev {}`); use \
             --mode tc, which runs beside it",
            iface.name,
            iface.name
        )
    };
    let first = XdpRuns::first(choice, driver);
    if first == XdpRuns::Driver {
        match prog.attach(&iface.name, XdpMode::Driver) {
            Ok(_) => return Ok(XdpRuns::Driver),
            Err(e) if taken(&e) => return Err(another()),
            Err(e) if choice == XdpAttach::Driver => {
                return Err(anyhow::Error::new(e).context(format!(
                    "{} refused XDP in driver mode (--xdp-mode driver): its driver ({}) has no \
                     native XDP, or not at this MTU; use --xdp-mode auto, which falls back to \
                     generic mode, or --mode tc",
                    iface.name,
                    driver.unwrap_or("unknown")
                )));
            }
            Err(e) => info!(
                "XDP driver mode is not available on {} ({e}); trying generic mode",
                iface.name
            ),
        }
    }
    prog.attach(&iface.name, XdpMode::Skb).map_err(|e| {
        if taken(&e) {
            return another();
        }
        anyhow::Error::new(e).context(format!(
            "attaching XDP to {} in generic mode failed; if another XDP program is attached \
             there (`bpftool net show dev {}`), use --mode tc instead",
            iface.name, iface.name
        ))
    })?;
    Ok(if first == XdpRuns::Driver { XdpRuns::GenericFallback } else { first })
}

/// The OS error code behind a program error, if any.
fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// The driver behind an interface as `ethtool -i` names it (`veth`, `ixgbe`, `virtio_net`), or
/// `None` when the kernel does not say (loopback, some virtual devices) or the interface is gone.
/// Asks the kernel (`ETHTOOL_GDRVINFO`, which needs no privilege), else reads sysfs (which names
/// only the drivers of real devices: veth, bridges and tun have no `device` directory).
pub fn driver(ifname: &str) -> Option<String> {
    if ifname.contains('/') || ifname == "." || ifname == ".." {
        return None;
    }
    ethtool_driver(ifname).or_else(|| {
        let link = std::fs::read_link(format!("/sys/class/net/{ifname}/device/driver")).ok()?;
        Some(link.file_name()?.to_str()?.to_owned()).filter(|d| !d.is_empty())
    })
}

/// `struct ethtool_drvinfo` of `<linux/ethtool.h>` (libc does not define it).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 3;

fn ethtool_driver(ifname: &str) -> Option<String> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return None;
    }
    // SAFETY: socket() with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: both are plain C structs for which all-zero bytes are valid.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in req.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO reads the name from `req` and writes at most
    // `size_of::<EthtoolDrvinfo>()` bytes through `ifru_data`, which points at `info`; both
    // outlive the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL as _, &raw mut req) } != 0 {
        return None;
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    let driver = String::from_utf8_lossy(&info.driver[..len]).into_owned();
    (!driver.is_empty()).then_some(driver)
}

/// Which `--mode` fits an interface, said in one line that names it and its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeAdvice {
    /// `--mode xdp` costs more here than it gives: use tc.
    pub use_tc: bool,
    pub text: String,
}

/// What veth keeps of its throughput with an empty XDP program attached in driver mode
/// (docs/benchmarks.md: iperf3 over veth, 16-24 % of no observer; smtpflow in tc mode keeps all
/// of it).
pub const VETH_XDP_THROUGHPUT: &str = "16-24 % of none";

/// What veth keeps of its throughput with an empty XDP program attached in generic mode, where
/// `--mode xdp` attaches on veth (docs/benchmarks.md: iperf3 over veth).
pub const VETH_XDP_GENERIC_THROUGHPUT: &str = "83-89 % of none";

/// How XDP runs (or would run) on an interface, for [`mode_advice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpRuns {
    Driver,
    /// In generic mode by choice: `--xdp-mode auto` on veth, or `--xdp-mode generic`.
    GenericChosen,
    /// In generic mode because the device refused driver mode.
    GenericFallback,
}

impl XdpRuns {
    /// How XDP runs on a device of driver `driver` when `choice` is tried first: in generic
    /// mode by choice ([`XdpAttach::generic_first`]), else in driver mode, unless the device
    /// then refuses it ([`XdpRuns::GenericFallback`], known only once tried).
    pub fn first(choice: XdpAttach, driver: Option<&str>) -> Self {
        if choice.generic_first(driver) { XdpRuns::GenericChosen } else { XdpRuns::Driver }
    }

    /// How the program is attached: the `method` of `smtpflow_attachment_info`.
    pub fn method(self) -> &'static str {
        match self {
            XdpRuns::Driver => "xdp driver mode",
            XdpRuns::GenericChosen | XdpRuns::GenericFallback => "xdp generic mode",
        }
    }
}

/// The mode that fits interface `iface` of driver `driver` (`None`: unknown), where XDP runs as
/// `runs` says. On veth, driver-mode XDP makes the device give up GSO (every segment goes
/// through veth's NAPI path one by one); generic-mode XDP runs where tc does, after the socket
/// buffer is built, and first copies non-linear packets: in both cases tc costs less and sees
/// both directions.
pub fn mode_advice(iface: &str, driver: Option<&str>, runs: XdpRuns) -> ModeAdvice {
    let name = driver.unwrap_or("unknown");
    let tc = |why: String| ModeAdvice {
        use_tc: true,
        text: format!("{iface} (driver {name}): {why}; use --mode tc here"),
    };
    let veth = driver == Some("veth");
    let generic = |why: &str, so: &str| {
        tc(format!(
            "XDP runs in generic mode here ({why}): where tc runs, after the socket buffer is \
             built, and copying non-linear packets first, so it {so} and sees ingress only"
        ))
    };
    match runs {
        XdpRuns::GenericChosen if veth => {
            let why = format!(
                "in driver mode an empty XDP program keeps veth {VETH_XDP_THROUGHPUT}, in \
                 generic mode {VETH_XDP_GENERIC_THROUGHPUT}, docs/benchmarks.md"
            );
            return generic(&why, "costs more than tc");
        }
        XdpRuns::GenericChosen => return generic("--xdp-mode generic", "saves nothing over tc"),
        XdpRuns::GenericFallback => return generic("no native XDP", "saves nothing over tc"),
        XdpRuns::Driver => {}
    }
    if veth {
        return tc(format!(
            "XDP in driver mode costs veth most of its throughput (an empty XDP program: \
             {VETH_XDP_THROUGHPUT}, docs/benchmarks.md)"
        ));
    }
    ModeAdvice {
        use_tc: false,
        text: format!(
            "{iface} (driver {name}): either mode; --mode tc (the default) sees both directions, \
             --mode xdp ingress only, in driver mode if {} has native XDP, else generic \
             (`watch` logs which)",
            driver.unwrap_or("the device")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_and_generic_mode_are_steered_to_tc() {
        let veth = mode_advice("sf0", Some("veth"), XdpRuns::Driver);
        assert!(veth.use_tc);
        assert_eq!(
            veth.text,
            "sf0 (driver veth): XDP in driver mode costs veth most of its throughput (an empty \
             XDP program: 16-24 % of none, docs/benchmarks.md); use --mode tc here"
        );
        for driver in [Some("veth"), Some("ixgbe"), None] {
            for runs in [XdpRuns::GenericChosen, XdpRuns::GenericFallback] {
                let generic = mode_advice("eth0", driver, runs);
                assert!(generic.use_tc, "{driver:?}");
                assert!(generic.text.contains("generic mode"), "{}", generic.text);
                assert!(generic.text.ends_with("; use --mode tc here"), "{}", generic.text);
                let named = format!("eth0 (driver {})", driver.unwrap_or("unknown"));
                assert!(generic.text.starts_with(&named), "{}", generic.text);
            }
        }
        // On veth generic mode is the default: the advice gives both modes' measured cost.
        assert_eq!(
            mode_advice("sf0", Some("veth"), XdpRuns::GenericChosen).text,
            "sf0 (driver veth): XDP runs in generic mode here (in driver mode an empty XDP \
             program keeps veth 16-24 % of none, in generic mode 83-89 % of none, \
             docs/benchmarks.md): where tc runs, after the socket buffer is built, and copying \
             non-linear packets first, so it costs more than tc and sees ingress only; use --mode \
             tc here"
        );
        // Elsewhere, why generic mode: a device without native XDP, or the flag.
        let fallback = mode_advice("eth0", Some("ixgbe"), XdpRuns::GenericFallback).text;
        assert!(fallback.contains("generic mode here (no native XDP)"), "{fallback}");
        let chosen = mode_advice("eth0", Some("ixgbe"), XdpRuns::GenericChosen).text;
        assert!(chosen.contains("generic mode here (--xdp-mode generic)"), "{chosen}");
    }

    #[test]
    fn auto_starts_in_generic_mode_on_veth_only() {
        use XdpAttach::{Auto, Driver, Generic};
        assert!(Auto.generic_first(Some("veth")));
        for driver in [Some("ixgbe"), Some("virtio_net"), Some("dummy"), None] {
            assert!(!Auto.generic_first(driver), "{driver:?}");
        }
        for driver in [Some("veth"), Some("ixgbe"), None] {
            assert!(!Driver.generic_first(driver), "{driver:?}");
            assert!(Generic.generic_first(driver), "{driver:?}");
        }
    }

    #[test]
    fn native_drivers_are_left_the_choice() {
        for driver in [Some("ixgbe"), Some("virtio_net"), Some("mlx5_core"), None] {
            let a = mode_advice("eth0", driver, XdpRuns::Driver);
            assert!(!a.use_tc, "{driver:?}");
            assert!(!a.text.contains("use --mode tc"), "{}", a.text);
            assert!(a.text.contains("either mode"), "{}", a.text);
        }
        let unknown = mode_advice("eth0", None, XdpRuns::Driver).text;
        assert!(unknown.starts_with("eth0 (driver unknown): "), "{unknown}");
        assert!(unknown.contains("if the device has native XDP"), "{unknown}");
        let ixgbe = mode_advice("eth0", Some("ixgbe"), XdpRuns::Driver).text;
        assert!(ixgbe.contains("if ixgbe has native XDP"), "{ixgbe}");
    }

    #[test]
    fn driver_of_missing_or_odd_interfaces_is_none() {
        for name in ["", "nosuch-iface0", "a-name-too-long-for-linux", "../../etc", "a\0b"] {
            assert_eq!(driver(name), None, "{name:?}");
        }
        // Loopback has no driver the kernel names (and no `device` in sysfs).
        assert_eq!(driver("lo"), None);
    }
}
