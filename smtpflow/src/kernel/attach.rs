//! Attaching the loaded kernel programs to interfaces. Everything attached is owned by
//! [`Attached`]: dropping it detaches (TCX and XDP bpf links also go away with the process, so a
//! killed smtpflow leaves nothing behind; netlink TC filters are cleaned up at the next start).
use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
};

use anyhow::{Context as _, bail};
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

use super::{Mode, TcLink};

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
                let how = attach_xdp(prog, iface)?;
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

fn attach_xdp(prog: &mut Xdp, iface: &Iface) -> anyhow::Result<&'static str> {
    match prog.attach(&iface.name, XdpMode::Driver) {
        Ok(_) => return Ok("xdp driver mode"),
        Err(e) if os_error(&e) == Some(libc::EEXIST) || os_error(&e) == Some(libc::EBUSY) => {
            bail!(
                "another XDP program is already attached to {} (`bpftool net show dev {}`); \
                 use --mode tc, which runs beside it",
                iface.name,
                iface.name
            );
        }
        Err(e) => {
            info!("XDP driver mode is not available on {} ({e}); trying generic mode", iface.name)
        }
    }
    prog.attach(&iface.name, XdpMode::Skb).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "attaching XDP to {} failed in driver and generic mode; if another XDP program is \
             attached there (`bpftool net show dev {}`), use --mode tc instead",
            iface.name, iface.name
        ))
    })?;
    Ok("xdp generic mode")
}

/// The OS error code behind a program error, if any.
fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}
