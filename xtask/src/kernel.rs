//! `cargo xtask test --kernel <VERSION>` and `cargo xtask matrix`: smtpflow's kernel suite on
//! the Debian kernels mail gateways run, each booted in a QEMU VM.
//!
//! virtme-ng boots the kernel with the host's filesystem shared read-only (writes land in tmpfs
//! overlays), so the host-built `smtpflow`, the host-built test binaries and the tools the tests
//! use (ip, tc, nft, bpftool, smtp-sink, swaks) run inside unchanged. Kernels come from Debian's
//! packages: `apt-get download` through a private apt configuration (the system's sources and
//! apt state are left as they are), `dpkg -x`, `depmod`. Nothing goes into the host's /boot.
//!
//! Everything is cached under `target/kernels/`:
//! - `venv/` (virtme-ng from PyPI), `vfsd/bin/virtiofsd` (crates.io; 6.1's cloud kernel has no
//!   9p, and QEMU 7.2's own virtiofsd does not work with virtme-ng);
//! - `apt/` (the private package lists), `tree/<uname>/` (unpacked kernels, modules indexed);
//! - `<label>/`: per kernel, `log` (the whole console), `guest.sh`, `out/` (shared read-write
//!   with the guest: `rc`, `results`, `check.txt`, `startup.txt`, `dmesg`).
//!
//! Facts of the machines this runs on (see the README's "Kernel matrix"): no usable KVM, so
//! QEMU emulates the CPU (`--disable-kvm`), 10-13x slower than the host; 6.12 on QEMU 7.2 needs
//! `-cpu max,-cx16`; 6.1 hangs in early boot about one run in eight (boot timeout, one retry);
//! vng's own exit code is always 255, so the guest writes its status into the shared directory.
use std::{
    cmp::Ordering,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{run_cmd, setup, workspace_root};

/// The Debian kernels of the matrix: Debian 12's own, and the one in bookworm-backports.
pub const MATRIX: &[&str] = &["6.1", "6.12"];

/// Debian packages the VMs need (installed only when a kernel run is asked for).
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86", // the VM (software emulation)
    "busybox-static",  // virtme-ng's initramfs
    "kmod",            // depmod for the unpacked trees; modprobe inside the guest
    "python3-venv",    // the virtme-ng venv
    "libseccomp-dev",  // building virtiofsd
    "libcap-ng-dev",
    "pkg-config",
];
const VIRTME_NG: &str = "virtme-ng==1.42";
const VIRTIOFSD: &str = "virtiofsd@1.14.0";

/// Modules the tests need; on Debian's cloud kernels they are modules, not built in.
const GUEST_MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_ct",
    "nfnetlink_queue",
    "nft_queue",
    "xt_NFQUEUE",
];

/// Time for the guest to boot and start the suite (6.1 needs ~15 s; a hang gets one retry).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Time for one test inside the guest (the slowest take about a minute there).
const TEST_TIMEOUT_S: u64 = 600;
/// Guest memory: QEMU's own peak is then about 500 MB.
const GUEST_MEMORY: &str = "1G";

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
/// `bpf_skb_load_bytes` fallback, reply reading), drop reasons by name from each kernel's BTF,
/// the tcp_conn_request fexit, and conntrack statistics through ctnetlink.
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
    ("handshakes", "tc_listen_overflow_drop_reason", Needs::Any),
    ("handshakes", "xdp_ingress_only_outcomes", Needs::Any),
    ("pressure", "conntrack_default_source_is_ctnetlink_and_matches_node_exporter", Needs::Any),
];

fn kernels_dir() -> PathBuf {
    workspace_root().join("target/kernels")
}

/// One test's result.
pub struct TestResult {
    pub name: String,
    /// `ok`, `FAILED`, `TIMEOUT`, `not run`, or `skipped: <why>`.
    pub status: String,
    pub secs: f64,
}

/// One kernel's run.
pub struct Run {
    /// What the column is called: `host` or the version asked for (`6.1`).
    pub label: String,
    pub uname: String,
    pub results: Vec<TestResult>,
    pub check: String,
    pub startup: String,
    /// Problems outside the tests (a VM that never booted, a missing exit status).
    pub errors: Vec<String>,
    pub setup_secs: f64,
    pub run_secs: f64,
    pub boots: u32,
}

impl Run {
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && self.results.iter().all(|r| r.status == "ok" || r.status.starts_with("skipped"))
    }

    fn summary(&self) -> String {
        let n = |s: &str| self.results.iter().filter(|r| r.status == s).count();
        let skipped = self.results.iter().filter(|r| r.status.starts_with("skipped")).count();
        let failed = self.results.len() - n("ok") - skipped;
        let mut s = format!(
            "{} ({}): {} passed, {failed} failed, {skipped} skipped; setup {:.0} s, suite {:.0} s{}",
            self.label,
            self.uname,
            n("ok"),
            self.setup_secs,
            self.run_secs,
            if self.boots > 1 { format!(" ({} boots)", self.boots) } else { String::new() }
        );
        for e in &self.errors {
            let _ = write!(s, "\n  error: {e}");
        }
        s
    }

    /// What smtpflow said at start on this kernel: attach methods, degradations, errors (each
    /// line cut short: a verifier log is not a message).
    fn startup_lines(&self) -> String {
        let mut s = String::new();
        for l in self.startup.lines() {
            if l.starts_with("==")
                || l.contains(" INFO ")
                || l.contains(" WARN ")
                || l.contains("error")
            {
                // `[2026-11-23T11:38:38Z INFO ] attached ...` becomes `INFO attached ...`.
                let line = match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                    Some((head, msg)) => {
                        format!("{} {msg}", head.split_whitespace().nth(1).unwrap_or_default())
                    }
                    None => l.to_owned(),
                };
                let cut: String = line.chars().take(160).collect();
                let more = if cut.len() < line.len() { " [...]" } else { "" };
                let _ = writeln!(s, "  {cut}{more}");
            }
        }
        s
    }

    fn report(&self) -> String {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(10);
        let mut s = String::new();
        if !self.startup.is_empty() {
            let _ = writeln!(s, "smtpflow at start on {}:\n{}", self.uname, self.startup_lines());
        }
        for r in &self.results {
            let secs = if r.secs > 0.0 { format!("{:7.1} s", r.secs) } else { String::new() };
            let _ = writeln!(s, "  {:<8} {:<width$} {secs}", r.status_word(), r.name);
        }
        s + &self.summary()
    }
}

impl TestResult {
    fn status_word(&self) -> &str {
        if self.status.starts_with("skipped") { "skipped" } else { &self.status }
    }
}

/// `cargo xtask test --kernel <version>`: the kernel suite (or the tests matching `filter`) in
/// a VM booted on the newest Debian cloud kernel of that version.
pub fn test_kernel(version: &str, filter: Option<&str>) -> anyhow::Result<Run> {
    let run = run_kernel(version, filter)?;
    println!("{}", closing_line(std::slice::from_ref(&run)));
    Ok(run)
}

/// One kernel's run, with its report printed.
fn run_kernel(version: &str, filter: Option<&str>) -> anyhow::Result<Run> {
    let started = Instant::now();
    let tools = vm_tools()?;
    let kernel = debian_kernel(version)?;
    let bin = crate::build()?;
    let binaries = test_binaries()?;
    let setup_secs = started.elapsed().as_secs_f64();
    let plan = plan(&binaries, filter, kernel_version(&kernel.uname))?;
    let mut run = run_suite(
        &Target::Vm { tools: &tools, kernel: &kernel },
        version,
        &kernel.uname,
        &bin,
        &plan,
    )?;
    run.setup_secs = setup_secs;
    println!("\n{}\n", run.report());
    Ok(run)
}

/// `cargo xtask matrix`: the kernel suite on the host kernel and on every kernel of [`MATRIX`],
/// one after the other, then one table.
pub fn matrix(host: bool) -> anyhow::Result<bool> {
    let mut runs = Vec::new();
    if host {
        let started = Instant::now();
        let bin = crate::build()?;
        let binaries = test_binaries()?;
        let uname = host_uname();
        let plan = plan(&binaries, None, kernel_version(&uname))?;
        let mut run = run_suite(&Target::Host, "host", &uname, &bin, &plan)?;
        run.setup_secs = started.elapsed().as_secs_f64() - run.run_secs;
        println!("\n{}\n", run.report());
        runs.push(run);
    }
    for version in MATRIX {
        match run_kernel(version, None) {
            Ok(run) => runs.push(run),
            Err(e) => {
                eprintln!("xtask: kernel {version}: {e:#}");
                runs.push(Run {
                    label: (*version).to_owned(),
                    uname: "?".into(),
                    results: Vec::new(),
                    check: String::new(),
                    startup: String::new(),
                    errors: vec![format!("{e:#}")],
                    setup_secs: 0.0,
                    run_secs: 0.0,
                    boots: 0,
                });
            }
        }
    }
    let table = matrix_table(&runs);
    println!("{table}");
    let _ = fs::write(kernels_dir().join("matrix.txt"), &table);
    println!("{}", closing_line(&runs));
    Ok(runs.iter().all(Run::passed))
}

/// The plain last line CI reads: tests passed, failed and skipped over every kernel run (a run
/// that ended without its tests, a VM that never booted, counts as one failure).
fn closing_line(runs: &[Run]) -> String {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for r in runs {
        let ok = r.results.iter().filter(|t| t.status == "ok").count();
        let skip = r.results.iter().filter(|t| t.status.starts_with("skipped")).count();
        passed += ok;
        skipped += skip;
        failed += r.results.len() - ok - skip;
        if !r.errors.is_empty() && r.results.len() == ok + skip {
            failed += 1;
        }
    }
    format!("kernels: {passed} passed, {failed} failed, {skipped} skipped")
}

fn matrix_table(runs: &[Run]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        for t in &r.results {
            if !names.contains(&t.name.as_str()) {
                names.push(&t.name);
            }
        }
    }
    let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let mut s = format!("\nkernel matrix\n{:<width$}", "test");
    for r in runs {
        let _ = write!(s, "  {:<10}", r.label);
    }
    s.push('\n');
    for name in &names {
        let _ = write!(s, "{name:<width$}");
        for r in runs {
            let cell = r.results.iter().find(|t| t.name == *name).map_or("-", |t| t.status_word());
            let _ = write!(s, "  {cell:<10}");
        }
        s.push('\n');
    }
    for r in runs {
        let _ = writeln!(s, "{}", r.summary());
    }
    for r in runs {
        if !r.check.is_empty() {
            let _ = writeln!(
                s,
                "\nsmtpflow check on {} ({}):\n{}",
                r.label,
                r.uname,
                condense_check(&r.check).trim_end()
            );
        }
    }
    s
}

/// `smtpflow check`'s table without the verifier logs it may carry: each row cut short, and
/// for a rejected program the verifier's own reason (its line before "verification time").
fn condense_check(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_row = |l: &str| {
        l.split_once("  ").is_some_and(|(name, rest)| {
            !name.trim().is_empty()
                && ["ok ", "warn ", "FAIL ", "STATUS "]
                    .iter()
                    .any(|s| rest.trim_start().starts_with(s))
        })
    };
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let keep = is_row(l)
            || l.trim_start().starts_with("fix: ")
            || l.starts_with("smtpflow can run")
            || l.contains("check(s) failed")
            || l.starts_with("(exit");
        if !keep {
            continue;
        }
        let row = l.split(" Verifier output:").next().unwrap_or(l);
        let cut: String = row.chars().take(150).collect();
        let _ = writeln!(out, "{cut}{}", if cut.len() < row.len() { " [...]" } else { "" });
        if l.contains("Verifier output:") {
            let reason = lines[i..]
                .iter()
                .position(|x| x.starts_with("verification time"))
                .and_then(|p| lines.get(i + p - 1));
            if let Some(reason) = reason {
                let _ = writeln!(out, "{:>22}verifier: {}", "", reason.trim());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tools: apt packages, virtme-ng, virtiofsd.

struct Tools {
    vng: PathBuf,
    path: String,
}

fn vm_tools() -> anyhow::Result<Tools> {
    setup::apt_install(VM_PACKAGES, "the VM tools of the kernel matrix")?;
    let dir = kernels_dir();
    fs::create_dir_all(&dir)?;
    let venv = dir.join("venv");
    let stamp = venv.join(VIRTME_NG);
    if !stamp.exists() {
        let t = Instant::now();
        eprintln!("kernel: installing {VIRTME_NG} into {} (about 20 s)", venv.display());
        run_cmd(Command::new("python3").arg("-m").arg("venv").arg("--clear").arg(&venv))
            .context("creating the virtme-ng venv")?;
        run_cmd(Command::new(venv.join("bin/pip")).args(["install", "-q", VIRTME_NG]))
            .context("installing virtme-ng from PyPI")?;
        fs::write(&stamp, "")?;
        eprintln!("kernel: virtme-ng installed in {:.0} s", t.elapsed().as_secs_f64());
    }
    let vfsd = dir.join("vfsd");
    let vfsd_stamp = vfsd.join(VIRTIOFSD);
    if !vfsd_stamp.exists() || !vfsd.join("bin/virtiofsd").exists() {
        let t = Instant::now();
        eprintln!("kernel: building {VIRTIOFSD} into {} (about 3 min)", vfsd.display());
        run_cmd(
            crate::cargo()
                .args(["install", "--locked", "--force", "--quiet", VIRTIOFSD, "--root"])
                .arg(&vfsd),
        )
        .context("building virtiofsd (needs libseccomp-dev, libcap-ng-dev, pkg-config)")?;
        fs::write(&vfsd_stamp, "")?;
        eprintln!("kernel: virtiofsd built in {:.0} s", t.elapsed().as_secs_f64());
    }
    let path = format!(
        "{}:{}:{}",
        vfsd.join("bin").display(),
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    Ok(Tools { vng: venv.join("bin/vng"), path })
}

// ---------------------------------------------------------------------------------------------
// Kernels from Debian's packages.

pub struct Kernel {
    pub uname: String,
    pub root: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.uname))
    }
}

/// The apt options of the private configuration: its own sources, lists and cache.
fn apt_options(apt: &Path) -> Vec<String> {
    [
        ("Dir::Etc::SourceList", apt.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", apt.join("lists")),
        ("Dir::Cache", apt.join("cache")),
    ]
    .into_iter()
    .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={}", v.display())])
    .chain(["-o".to_owned(), "APT::Sandbox::User=root".to_owned(), "-q".to_owned()])
    .collect()
}

/// The mirrors the system's apt sources name (Debian's, and Debian's security archive).
fn system_mirrors() -> (String, String) {
    let mut text = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                text += &fs::read_to_string(&p).unwrap_or_default();
                text.push('\n');
            }
        }
    }
    let uris: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.starts_with("http://") || w.starts_with("https://"))
        .map(|w| w.trim_end_matches('/'))
        .collect();
    let main = uris.iter().find(|u| u.ends_with("/debian")).copied();
    let security = uris.iter().find(|u| u.ends_with("/debian-security")).copied();
    (
        main.unwrap_or("http://deb.debian.org/debian").to_owned(),
        security.unwrap_or("http://deb.debian.org/debian-security").to_owned(),
    )
}

/// Refreshes the private package lists when they are missing or older than a day.
fn apt_lists(apt: &Path) -> anyhow::Result<()> {
    let stamp = apt.join("updated");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < Duration::from_secs(24 * 3600));
    if fresh {
        return Ok(());
    }
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    let (main, security) = system_mirrors();
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    let signed = if keyring.exists() {
        format!(" [signed-by={}]", keyring.display())
    } else {
        String::new()
    };
    // Debian 12's kernels: its own (bookworm, with security updates) and its backports.
    let sources = format!(
        "deb{signed} {main} bookworm main\n\
         deb{signed} {main} bookworm-backports main\n\
         deb{signed} {security} bookworm-security main\n"
    );
    fs::write(apt.join("sources.list"), sources)?;
    eprintln!("kernel: updating the private package lists in {}", apt.display());
    run_cmd(Command::new("apt-get").args(apt_options(apt)).arg("update"))
        .context("updating the private apt lists (target/kernels/apt)")?;
    fs::write(&stamp, "")?;
    Ok(())
}

/// Does the kernel release `uname` belong to `version` ("6.1" is 6.1.x, not 6.12.x)?
fn matches_version(uname: &str, version: &str) -> bool {
    uname == version
        || uname.strip_prefix(version).is_some_and(|rest| rest.starts_with(['.', '-', '+']))
}

/// (major, minor) of a kernel release.
fn kernel_version(uname: &str) -> (u32, u32) {
    let mut parts = uname.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Compares version strings with their digit runs as numbers (6.1.0-9 < 6.1.0-56).
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

const PKG_PREFIX: &str = "linux-image-";
const PKG_SUFFIX: &str = "-unsigned";
const FLAVOUR: &str = "-cloud-amd64";

/// The newest `linux-image-<version>*-cloud-amd64-unsigned` on offer, downloaded and unpacked
/// into `target/kernels/tree/<uname>/` (reused when already there).
pub fn debian_kernel(version: &str) -> anyhow::Result<Kernel> {
    let dir = kernels_dir();
    let apt = dir.join("apt");
    let trees = dir.join("tree");
    let cached = || -> Option<String> {
        let mut names: Vec<String> = fs::read_dir(&trees)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| matches_version(n, version) && trees.join(n).join(".ready").exists())
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names.pop()
    };
    let uname = match apt_lists(&apt).and_then(|()| newest_package(&apt, version)) {
        Ok(uname) => uname,
        Err(e) => match cached() {
            Some(uname) => {
                eprintln!("kernel: {e:#}; using the kernel already unpacked, {uname}");
                uname
            }
            None => return Err(e),
        },
    };
    let root = trees.join(&uname);
    let kernel = Kernel { uname: uname.clone(), root: root.clone() };
    if root.join(".ready").exists() {
        return Ok(kernel);
    }
    let t = Instant::now();
    let package = format!("{PKG_PREFIX}{uname}{PKG_SUFFIX}");
    let debs = dir.join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    eprintln!("kernel: downloading {package}");
    // `apt-get download` writes into its working directory (run_cmd would pick the workspace).
    let status = Command::new("apt-get")
        .args(apt_options(&apt))
        .args(["download", &package])
        .current_dir(&debs)
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| {
            format!("apt-get download left no .deb for {package} in {}", debs.display())
        })?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    run_cmd(Command::new("depmod").arg("-b").arg(&root).arg(&uname))
        .context("indexing the kernel's modules (depmod, from kmod)")?;
    if !kernel.vmlinuz().exists() {
        bail!("{package} has no {}", kernel.vmlinuz().display());
    }
    fs::write(root.join(".ready"), &package)?;
    let _ = fs::remove_dir_all(&debs);
    // Older kernels of the same version are not needed any more.
    for e in fs::read_dir(&trees)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != uname && matches_version(&name, version) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    eprintln!("kernel: {uname} unpacked in {:.0} s", t.elapsed().as_secs_f64());
    Ok(kernel)
}

/// The newest cloud kernel of `version` in the private lists, as its kernel release.
fn newest_package(apt: &Path, version: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(apt_options(apt))
        .args(["pkgnames", PKG_PREFIX])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut unames: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(PKG_PREFIX)?.strip_suffix(PKG_SUFFIX))
        .filter(|u| u.ends_with(FLAVOUR) && matches_version(u, version))
        .collect();
    unames.sort_by(|a, b| natural_cmp(a, b));
    unames.pop().map(str::to_owned).with_context(|| {
        format!(
            "no {PKG_PREFIX}{version}*{FLAVOUR}{PKG_SUFFIX} in Debian 12's package lists \
             (bookworm, bookworm-security, bookworm-backports); the matrix has {}",
            MATRIX.join(", ")
        )
    })
}

fn host_uname() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// The suite: test binaries, the plan, the guest script.

/// The integration test binaries by name (`traffic`, `lifecycle`, ...), built with the debug
/// profile like `cargo test` builds them.
fn test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
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
fn list_tests(bin: &Path) -> anyhow::Result<Vec<String>> {
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
struct Planned {
    binary: String,
    path: PathBuf,
    test: String,
    skip: Option<String>,
}

impl Planned {
    fn name(&self) -> String {
        format!("{}::{}", self.binary, self.test)
    }
}

/// The kernel suite for a kernel of `version`, or every test whose name contains `filter`.
fn plan(
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
                "the kernel suite names {binary}::{test}, which does not exist any more: update SUITE in xtask/src/kernel.rs"
            );
        }
        let skip = (needs == Needs::Tcx && !has_tcx)
            .then(|| "TCX needs Linux 6.6; the netlink tests cover this kernel".to_owned());
        plan.push(Planned { binary: binary.to_owned(), path, test: test.to_owned(), skip });
    }
    Ok(plan)
}

/// The script the guest runs (also run as is on the host for the matrix's host column).
fn guest_script(out: &Path, bin: &Path, plan: &[Planned], guest: bool) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/sh\n# Written by `cargo xtask test --kernel`; run inside the VM.");
    let _ = writeln!(s, "OUT={}\nBIN={}", q(out), q(bin));
    s += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
    s += "export SMTPFLOW_BIN=\"$BIN\" RUST_BACKTRACE=1\n";
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

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// Running it: in a VM (bounded, one retry of a boot that hangs) or on the host.

enum Target<'a> {
    Host,
    Vm { tools: &'a Tools, kernel: &'a Kernel },
}

fn run_suite(
    target: &Target<'_>,
    label: &str,
    uname: &str,
    bin: &Path,
    plan: &[Planned],
) -> anyhow::Result<Run> {
    let dir = kernels_dir().join(label);
    let out = dir.join("out");
    fs::create_dir_all(&dir)?;
    let script = dir.join("guest.sh");
    let guest = matches!(target, Target::Vm { .. });
    fs::write(&script, guest_script(&out, bin, plan, guest))?;
    let log_path = dir.join("log");
    let runnable = plan.iter().filter(|p| p.skip.is_none()).count() as u64;
    // Generous: the suite takes a few minutes in the guest; each test is bounded on its own.
    let overall = BOOT_TIMEOUT + Duration::from_secs(300 + 240 * runnable);
    let started = Instant::now();
    let mut errors = Vec::new();
    let mut boots = 0;
    let log = Arc::new(Mutex::new(fs::File::create(&log_path)?));
    loop {
        boots += 1;
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let mut cmd = match target {
            Target::Host => {
                let mut c = Command::new("sh");
                c.arg(&script);
                c
            }
            Target::Vm { tools, kernel } => {
                eprintln!(
                    "kernel: booting {} in QEMU (software emulation; log: {})",
                    kernel.uname,
                    log_path.display()
                );
                let mut c = Command::new(&tools.vng);
                c.arg("--verbose")
                    .arg("--run")
                    .arg(kernel.vmlinuz())
                    .args(["--disable-kvm", "--memory", GUEST_MEMORY, "--cpus", "2"])
                    .arg("--qemu-opts=-cpu max,-cx16")
                    .arg("--rwdir")
                    .arg(&out)
                    .arg("--exec")
                    .arg(format!("sh {}", shell_quote(&script.display().to_string())))
                    .env("PATH", &tools.path);
                c
            }
        };
        cmd.current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().context("starting the VM (vng)")?;
        let echo = Arc::new(Mutex::new(!guest));
        let pumps = [
            pump(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), &log, &echo),
            pump(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), &log, &echo),
        ];
        let boot_deadline = Instant::now() + BOOT_TIMEOUT;
        let deadline = started + overall;
        let mut hung_at_boot = false;
        let mut timed_out = false;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if guest && !out.join("started").exists() && Instant::now() > boot_deadline {
                hung_at_boot = true;
                kill_group(&mut child);
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                kill_group(&mut child);
                break;
            }
            thread::sleep(Duration::from_millis(500));
        }
        // The group may hold more than the leader (QEMU, virtiofsd): none may outlive the run.
        kill_group(&mut child);
        for p in pumps.into_iter().flatten() {
            let _ = p.join();
        }
        if hung_at_boot {
            let msg =
                format!("the guest did not start the suite within {BOOT_TIMEOUT:?} (boot {boots})");
            eprintln!("kernel: {msg}");
            if boots < 2 {
                eprintln!("kernel: retrying once (6.1 occasionally hangs in early boot)");
                continue;
            }
            errors.push(format!("{msg}; see {}", log_path.display()));
        }
        if timed_out {
            errors
                .push(format!("the run was stopped after {overall:?}; see {}", log_path.display()));
        }
        break;
    }
    let run_secs = started.elapsed().as_secs_f64();
    if !out.join("rc").exists() && errors.is_empty() {
        errors.push(format!(
            "the guest ended before the suite did (kernel panic? out of memory?); see {}",
            log_path.display()
        ));
    }
    let results = collect(plan, &out.join("results"));
    let read = |f: &str| fs::read_to_string(out.join(f)).unwrap_or_default();
    let run = Run {
        label: label.to_owned(),
        uname: uname.to_owned(),
        results,
        check: read("check.txt"),
        startup: read("startup.txt"),
        errors,
        setup_secs: 0.0,
        run_secs,
        boots,
    };
    let _ = fs::write(dir.join("summary.txt"), run.report() + "\n");
    Ok(run)
}

/// Copies a child's output into the log, and to our stdout once the suite has started (the
/// boot messages stay in the log).
fn pump(
    src: Option<Box<dyn Read + Send>>,
    log: &Arc<Mutex<fs::File>>,
    echo: &Arc<Mutex<bool>>,
) -> Option<thread::JoinHandle<()>> {
    let src = src?;
    let (log, echo) = (Arc::clone(log), Arc::clone(echo));
    Some(thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if let Ok(mut f) = log.lock() {
                let _ = f.write_all(&line);
            }
            let text = String::from_utf8_lossy(&line);
            let mut on = echo.lock().map(|e| *e).unwrap_or(true);
            if !on && text.contains("xtask-guest:") {
                if let Ok(mut e) = echo.lock() {
                    *e = true;
                }
                on = true;
            }
            if on {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            line.clear();
        }
    }))
}

fn kill_group(child: &mut Child) {
    let pgid = child.id();
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// Reads the guest's results file: `<binary>::<test> <exit status> <start> <end>` a line.
fn collect(plan: &[Planned], results: &Path) -> Vec<TestResult> {
    let text = fs::read_to_string(results).unwrap_or_default();
    plan.iter()
        .map(|p| {
            let name = p.name();
            if let Some(why) = &p.skip {
                return TestResult { name, status: format!("skipped: {why}"), secs: 0.0 };
            }
            let line = text.lines().find(|l| l.split_whitespace().next() == Some(name.as_str()));
            let Some(line) = line else {
                return TestResult { name, status: "not run".into(), secs: 0.0 };
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let status = match f.get(1).copied() {
                Some("0") => "ok",
                Some("124" | "137") => "TIMEOUT",
                _ => "FAILED",
            };
            TestResult { name, status: status.into(), secs: num(3) - num(2) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(matches_version("6.1.0-56-cloud-amd64", "6.1"));
        assert!(!matches_version("6.12.117+deb12-cloud-amd64", "6.1"));
        assert!(matches_version("6.12.117+deb12-cloud-amd64", "6.12"));
        assert!(matches_version("6.1.0-56-cloud-amd64", "6.1.0-56"));
        assert!(!matches_version("6.1.0-56-cloud-amd64", "6.1.0-5"));
        assert_eq!(kernel_version("6.12.117+deb12-cloud-amd64"), (6, 12));
        assert_eq!(kernel_version("6.1.0-56-cloud-amd64"), (6, 1));
        let mut v = ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-47-cloud-amd64"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v[2], "6.1.0-56-cloud-amd64");
        assert_eq!(natural_cmp("6.12.95+deb12", "6.12.117+deb12"), Ordering::Less);
    }

    #[test]
    fn check_without_verifier_log() {
        let text = "CHECK         STATUS  DETAIL\n\
                    kernel        ok      6.1.192 (5.15 or later is supported)\n\
                    tc programs   FAIL    the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx\n\
                    ; #[classifier]\n\
                    0: (bf) r6 = r1\n\
                    misaligned access off (0x0; 0xffffffffffffffff)+0+0 size 8\n\
                    verification time 67269 usec\n\
                    : Permission denied (os error 13)\n\
                    \x20                     fix: a kernel too old for smtpflow; run 5.15+\n\
                    1 check(s) failed\n";
        let c = condense_check(text);
        assert!(c.contains("tc programs   FAIL    the BPF_PROG_LOAD syscall returned Permission denied (os error 13).\n"), "{c}");
        assert!(c.contains("verifier: misaligned access off"), "{c}");
        assert!(c.contains("fix: a kernel too old"), "{c}");
        assert!(!c.contains("r6 = r1"), "{c}");
        assert_eq!(c.lines().count(), 6, "{c}");
    }
}
