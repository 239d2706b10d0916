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
