//! The VM: virtme-ng and virtiofsd, and one suite run in QEMU (a boot timeout, and one retry
//! of a boot that hangs or ends before the suite starts; the guest's status read from the
//! shared directory) or as is on the host.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    download::{Kernel, kernels_dir},
    plan::{Planned, guest_script, shell_quote},
    report::{Run, collect},
};
use crate::{run_cmd, setup, workspace_root};

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

/// Time for the guest to boot and start the suite (6.1 needs ~15 s; a hang, or a guest that
/// ends before the suite starts, gets one retry).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Guest memory: QEMU's own peak is then about 500 MB.
const GUEST_MEMORY: &str = "1G";

pub struct Tools {
    vng: PathBuf,
    path: String,
}

pub fn vm_tools() -> anyhow::Result<Tools> {
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

pub enum Target<'a> {
    Host,
    Vm { tools: &'a Tools, kernel: &'a Kernel },
}

pub fn run_suite(
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
        // Why the guest never started the suite, if it did not: nothing of ours has run then.
        let mut boot_failed = None;
        let mut timed_out = false;
        let suite_started = || !guest || out.join("started").exists();
        loop {
            if child.try_wait()?.is_some() {
                // A panic in early boot under emulation (seen once in some dozens of 6.12
                // boots: an int3 oops in sched_clock_cpu at 2 s).
                if !suite_started() {
                    boot_failed = Some("the guest ended before it started the suite".to_owned());
                }
                break;
            }
            if !suite_started() && Instant::now() > boot_deadline {
                boot_failed =
                    Some(format!("the guest did not start the suite within {BOOT_TIMEOUT:?}"));
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
        if let Some(why) = boot_failed {
            let msg = format!("{why} (boot {boots})");
            eprintln!("kernel: {msg}");
            if boots < 2 {
                eprintln!(
                    "kernel: retrying once (emulated kernels occasionally hang or panic in early \
                     boot)"
                );
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
        skipped: crate::skips::read(&out.join("skipped")),
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
