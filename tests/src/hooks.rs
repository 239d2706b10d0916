//! What is hooked to an interface inside a namespace (TCX, netlink TC filters and XDP), whether
//! a program still exists, and the assertion that nothing is left hooked.
//!
//! Why not `bpftool net show` alone: the bpftool that Debian ships (7.1) does not list TCX links
//! at all (it prints an empty `tc:` section while two TCX programs are attached), so TCX hooks are
//! read with the `BPF_PROG_QUERY` syscall, made from a thread inside the namespace.
use std::{collections::BTreeSet, process::Command, time::Duration};

use crate::{Netns, in_netns, wait_for};

/// One BPF program hooked to an interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hook {
    /// `xdp`, `tc/ingress`, `tc/egress` (netlink clsact filters), `tcx/ingress`, `tcx/egress`.
    pub kind: String,
    /// The program's name as the kernel knows it (`?` if it was freed meanwhile).
    pub name: String,
    pub prog_id: u32,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} (prog id {})", self.kind, self.name, self.prog_id)
    }
}

/// `(kind, name)` of every hook, for comparisons that do not care about ids.
pub fn kinds(hooks: &[Hook]) -> Vec<(String, String)> {
    let mut v: Vec<_> = hooks.iter().map(|h| (h.kind.clone(), h.name.clone())).collect();
    v.sort();
    v
}

/// `(kind, name)` pairs, sorted as [`kinds`] returns them: what a test expects to be hooked.
pub fn expected(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs.iter().map(|(k, n)| ((*k).to_owned(), (*n).to_owned())).collect();
    v.sort();
    v
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The `query` member of `union bpf_attr` (Linux 6.6+ layout, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Program ids attached through TCX to `ifname` in `ns`, for each direction. Empty on kernels
/// without TCX (the query fails with EINVAL there).
fn tcx_prog_ids(ns: &Netns, ifname: &str) -> Vec<(&'static str, u32)> {
    let ifname = ifname.to_owned();
    in_netns(ns, move || {
        let c = std::ffi::CString::new(ifname.clone()).unwrap();
        // SAFETY: valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(ifindex != 0, "no interface {ifname} in the namespace");
        let mut out = Vec::new();
        for (kind, attach_type) in
            [("tcx/ingress", BPF_TCX_INGRESS), ("tcx/egress", BPF_TCX_EGRESS)]
        {
            let mut ids = [0u32; 64];
            let mut attr = QueryAttr {
                target_ifindex: ifindex,
                attach_type,
                prog_ids: ids.as_mut_ptr() as u64,
                count: ids.len() as u32,
                ..Default::default()
            };
            // SAFETY: `attr` is a valid bpf_attr prefix whose prog_ids points at `ids`, which
            // holds `count` entries and outlives the call.
            let rc = unsafe {
                libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut attr, size_of::<QueryAttr>())
            };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EINVAL),
                    "BPF_PROG_QUERY {kind} on {ifname}: {err}"
                );
                continue;
            }
            let n = (attr.count as usize).min(ids.len());
            out.extend(ids[..n].iter().map(|id| (kind, *id)));
        }
        out
    })
}

/// The name of program `id`, or `None` when no such program exists (any more).
pub fn prog_name(id: u32) -> Option<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("run bpftool (is it installed?)");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "name" {
            return words.next().map(str::to_owned);
        }
    }
    Some(String::new())
}

/// Whether BPF program `id` still exists anywhere on the machine.
pub fn prog_exists(id: u32) -> bool {
    prog_name(id).is_some()
}

/// `(id, name)` of every loaded program whose name starts with `prefix`, machine-wide.
pub fn progs_named(prefix: &str) -> Vec<(u32, String)> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("run bpftool (is it installed?)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|line| {
            let (id, rest) = line.split_once(": ")?;
            let id: u32 = id.trim().parse().ok()?;
            let mut words = rest.split_whitespace();
            while let Some(w) = words.next() {
                if w == "name" {
                    let name = words.next()?;
                    return name.starts_with(prefix).then(|| (id, name.to_owned()));
                }
            }
            None
        })
        .collect()
}

/// Parses `bpftool net show dev <if>` (plain text): `(kind, prog id)` per XDP program and TC
/// filter (and TCX link, on a bpftool recent enough to list them).
fn parse_bpftool_net(text: &str) -> Vec<(String, u32)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_suffix(':')
            && !s.contains(' ')
        {
            section = match s {
                "xdp" => "xdp",
                "tc" => "tc",
                _ => "",
            };
            continue;
        }
        if section.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let id = words
            .iter()
            .position(|w| *w == "id" || *w == "prog_id")
            .and_then(|i| words.get(i + 1))
            .and_then(|w| w.parse::<u32>().ok());
        let Some(id) = id else { continue };
        let kind = if section == "xdp" {
            "xdp".to_owned()
        } else {
            // `clsact/ingress` (netlink filter) or `tcx/ingress` (TCX link).
            match words.get(1) {
                Some(k) if k.starts_with("clsact/") => k.replacen("clsact/", "tc/", 1),
                Some(k) => (*k).to_owned(),
                None => continue,
            }
        };
        out.push((kind, id));
    }
    out
}

/// Every BPF program hooked to `ifname` in `ns`: XDP and netlink TC filters from
/// `bpftool net show dev`, TCX links from `BPF_PROG_QUERY`.
pub fn hooks(ns: &Netns, ifname: &str) -> Vec<Hook> {
    let text = ns.exec_ok("bpftool", &["net", "show", "dev", ifname]);
    let mut set: BTreeSet<(String, u32)> = parse_bpftool_net(&text).into_iter().collect();
    set.extend(tcx_prog_ids(ns, ifname).into_iter().map(|(k, id)| (k.to_owned(), id)));
    set.into_iter()
        .map(|(kind, prog_id)| Hook {
            name: prog_name(prog_id).unwrap_or_else(|| "?".into()),
            kind,
            prog_id,
        })
        .collect()
}

/// Waits (at most `timeout`) until `ifname` in `ns` has no BPF program hooked whose name starts
/// with `prefix`; returns what is still hooked on timeout.
pub fn wait_unhooked(ns: &Netns, ifname: &str, prefix: &str, timeout: Duration) -> Vec<Hook> {
    let mut last = Vec::new();
    let done = wait_for(timeout, || {
        last = hooks(ns, ifname)
            .into_iter()
            .filter(|h| h.name.starts_with(prefix) || h.name == "?")
            .collect();
        last.is_empty().then_some(())
    });
    if done.is_some() { Vec::new() } else { last }
}

/// Waits (at most `timeout`) until none of the programs `ids` exists any more; returns the ids
/// still there on timeout.
pub fn wait_freed(ids: &[u32], timeout: Duration) -> Vec<u32> {
    let mut left = ids.to_vec();
    let _ = wait_for(timeout, || {
        left.retain(|id| prog_exists(*id));
        left.is_empty().then_some(())
    });
    left
}

/// The hooks, one a line-free list (`nothing` when empty), for failure messages.
pub fn show(hooks: &[Hook]) -> String {
    if hooks.is_empty() {
        return "nothing".into();
    }
    hooks.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Asserts that nothing at all is hooked to `ifname` in `ns` now; `what` says after what.
pub fn assert_unhooked(ns: &Netns, ifname: &str, what: &str) {
    let left = hooks(ns, ifname);
    assert!(left.is_empty(), "{what}: still hooked to {ifname}: {}", show(&left));
}

/// Asserts that nothing at all is hooked to `ifname` in `ns` within `timeout`.
pub fn assert_unhooked_within(ns: &Netns, ifname: &str, timeout: Duration, what: &str) {
    let left = wait_unhooked(ns, ifname, "", timeout);
    assert!(left.is_empty(), "{what}: still hooked to {ifname} after {timeout:?}: {}", show(&left));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_net_show() {
        let text = "xdp:\nsf0(2) driver id 149\n\ntc:\nsf0(2) clsact/ingress smtpflow_tc_in id 143\n\
                    sf0(2) clsact/egress smtpflow_tc_out id 144\n\
                    sf0(2) tcx/ingress smtpflow_tc_in prog_id 131 link_id 32\n\nflow_dissector:\n\n";
        assert_eq!(
            parse_bpftool_net(text),
            [
                ("xdp".to_owned(), 149),
                ("tc/ingress".to_owned(), 143),
                ("tc/egress".to_owned(), 144),
                ("tcx/ingress".to_owned(), 131),
            ]
        );
        assert!(parse_bpftool_net("xdp:\n\ntc:\n\nflow_dissector:\n\n").is_empty());
    }
}
