//! Checking, before touching the kernel, that this process may load and attach BPF programs.
use anyhow::bail;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parses the `CapEff:` line of `/proc/<pid>/status`.
pub fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// The capabilities `watch` needs that `caps` lacks, by name.
pub fn missing(caps: u64) -> Vec<&'static str> {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // CAP_SYS_ADMIN covers BPF and PERFMON (and is what kernels before 5.8 need).
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    missing
}

/// Set to 1 to go on without the capabilities (a warning instead of an error): to see what the
/// kernel itself refuses, as the tests of the systemd unit's capability set do.
pub const SKIP_ENV: &str = "SMTPFLOW_SKIP_PRIVILEGE_CHECK";

pub fn require() -> anyhow::Result<()> {
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    let result = check();
    match result {
        Err(e) if skip => {
            log::warn!("{e:#}; going on anyway ({SKIP_ENV}=1)");
            Ok(())
        }
        other => other,
    }
}

fn check() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let Some(caps) = effective_caps(&status) else {
        bail!("cannot read this process's capabilities from /proc/self/status");
    };
    let missing = missing(caps);
    if !missing.is_empty() {
        bail!(
            "smtpflow needs to run as root, or with the capabilities {}; missing: {} \
             (try `sudo smtpflow ...`)",
            "CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
            missing.join(", ")
        );
    }
    Ok(())
}

/// What smtpflow still needs once its programs are attached and its map fds held: ctnetlink's
/// statistics and removing netlink TC filters at exit both need CAP_NET_ADMIN; reading maps
/// through held fds needs nothing.
const KEEP: u32 = CAP_NET_ADMIN;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability but CAP_NET_ADMIN (from the effective, permitted, inheritable,
/// ambient and, where allowed, bounding sets), optionally switching to `user` first, and sets
/// no_new_privs.
pub fn drop_after_attach(user: Option<&str>) -> anyhow::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    // SAFETY: prctl calls with plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        for cap in (0..=last).filter(|c| *c != KEEP) {
            // EPERM without CAP_SETPCAP (e.g. under systemd, whose bounding set is already
            // narrow): the effective and permitted sets below are what matter.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
    }
    if let Some(name) = user {
        switch_user(name)?;
    }
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let keep = 1u32 << KEEP;
    let data = [CapData { effective: keep, permitted: keep, inheritable: 0 }, CapData::default()];
    // SAFETY: capset with a valid v3 header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        bail!("dropping capabilities failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(())
}

/// Becomes `name` (uid, gid, no supplementary groups), keeping the permitted capabilities.
fn switch_user(name: &str) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        bail!("--user {name}: no such user");
    }
    // SAFETY: pw is non-null and valid until the next getpw* call.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    // SAFETY: plain syscalls; KEEPCAPS keeps the permitted set across the uid change.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            bail!("--user {name}: switching user failed: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(missing(effective_caps(root).unwrap()), Vec::<&str>::new());
        let none = "CapEff:\t0000000000000000\n";
        assert_eq!(
            missing(effective_caps(none).unwrap()),
            ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]
        );
        let bpf_only = format!("CapEff:\t{:016x}\n", (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN));
        assert_eq!(missing(effective_caps(&bpf_only).unwrap()), ["CAP_PERFMON"]);
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps(""), None);
    }
}
