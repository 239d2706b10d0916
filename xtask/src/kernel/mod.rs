//! `cargo xtask test --kernel <VERSION>` and `cargo xtask matrix`: smtpflow's kernel suite on
//! the Debian kernels mail gateways run, each booted in a QEMU VM.
//!
//! virtme-ng boots the kernel with the host's filesystem shared read-only (writes land in tmpfs
//! overlays), so the host-built `smtpflow`, the host-built test binaries and the tools the tests
//! use (ip, tc, nft, bpftool, smtp-sink, swaks) run inside unchanged. Kernels come from Debian's
//! packages: `apt-get download` through a private apt configuration (the system's sources and
//! apt state are left as they are), `dpkg -x`, `depmod`. Nothing goes into the host's /boot.
//!
//! By job: `download` (Debian's kernels), `vm` (virtme-ng, QEMU, one bounded run), `plan` (the
//! suite, which tests run where, the guest's script) and `report` (results, tables, summary).
//!
//! Everything is cached under `target/kernels/`:
//! - `venv/` (virtme-ng from PyPI), `vfsd/bin/virtiofsd` (crates.io; 6.1's cloud kernel has no
//!   9p, and QEMU 7.2's own virtiofsd does not work with virtme-ng);
//! - `apt/` (the private package lists), `tree/<uname>/` (unpacked kernels, modules indexed);
//! - `<label>/`: per kernel, `log` (the whole console), `guest.sh`, `out/` (shared read-write
//!   with the guest: `rc`, `results`, `check.txt`, `startup.txt`, `skipped`, `dmesg`).
//!
//! Facts of the machines this runs on (see the README's "Kernel matrix"): no usable KVM, so
//! QEMU emulates the CPU (`--disable-kvm`), 10-13x slower than the host; 6.12 on QEMU 7.2 needs
//! `-cpu max,-cx16`; 6.1 hangs in early boot about one run in eight, and 6.12 has panicked there
//! (boot timeout; one retry of a boot that hangs or ends before the suite starts);
//! vng's own exit code is always 255, so the guest writes its status into the shared directory.
use std::{fs, process::Command, time::Instant};

mod download;
mod plan;
mod report;
mod vm;

use download::{MATRIX, debian_kernel, kernel_version, kernels_dir};
use plan::{plan, test_binaries};
use report::{Run, closing_line, matrix_table};
use vm::{Target, run_suite, vm_tools};

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
                    skipped: Vec::new(),
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

pub fn host_uname() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
