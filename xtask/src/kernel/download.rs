//! Kernels from Debian's packages: the private apt lists, the newest cloud kernel of a
//! version, its download, `dpkg -x` and `depmod`, under `target/kernels/`.
use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{run_cmd, workspace_root};

/// The Debian kernels of the matrix: Debian 12's own, and the one in bookworm-backports.
pub const MATRIX: &[&str] = &["6.1", "6.12"];

/// Where the kernel runs keep everything (see the module documentation of `kernel`).
pub fn kernels_dir() -> PathBuf {
    workspace_root().join("target/kernels")
}

pub struct Kernel {
    pub uname: String,
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
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
pub fn kernel_version(uname: &str) -> (u32, u32) {
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
}
