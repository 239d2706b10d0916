//! Builds the kernel programs (`smtpflow-ebpf`) with the nightly toolchain and bpf-linker, into
//! OUT_DIR, where `src/kernel/mod.rs` embeds them. `AYA_BUILD_SKIP=1` skips this for a quick check.
//!
//! `aya_build::build_ebpf` runs the inner cargo and re-emits every line it prints as a
//! `cargo:warning`: some 25 warnings on a build that went well. So it runs in a second copy of
//! this script, whose output is sorted here: cargo's directives pass through, and what the inner
//! build said is shown only when it fails.
use std::{env, fs, path::Path, process::Command};

/// Set in the second copy of this script: the one that runs aya-build.
const INNER: &str = "SMTPFLOW_BUILD_KERNEL_INNER";
const WARNING: &str = "cargo:warning=";

fn main() -> anyhow::Result<()> {
    if env::var_os(INNER).is_some() {
        return build_kernel();
    }
    // No backtrace of this script in the error: the compiler's message is what matters.
    let inner = Command::new(env::current_exe()?)
        .env(INNER, "1")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()?;
    let stdout = String::from_utf8_lossy(&inner.stdout);
    let (said, directives): (Vec<&str>, Vec<&str>) =
        stdout.lines().partition(|l| l.starts_with(WARNING));
    for d in directives {
        println!("{d}");
    }
    if !inner.status.success() {
        let said: Vec<&str> = said.iter().map(|l| &l[WARNING.len()..]).collect();
        eprintln!(
            "building the kernel programs failed:\n{}\n{}\n\
             They need the nightly toolchain with rust-src and bpf-linker 0.10: \
             run `cargo xtask setup` (or set AYA_BUILD_SKIP=1 for a check without them)",
            said.join("\n").trim_end(),
            String::from_utf8_lossy(&inner.stderr).trim_end(),
        );
        std::process::exit(1);
    }
    // With AYA_BUILD_SKIP=1 nothing was built: embed an empty object, which the loader refuses
    // with a clear message, so that `cargo check`/clippy work without the kernel toolchain.
    let object = Path::new(&env::var("OUT_DIR")?).join("smtpflow");
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}

/// aya-build's nightly cargo for `bpfel-unknown-none` (`-Z build-std=core`, release, BTF), which
/// copies the `smtpflow` binary into OUT_DIR.
fn build_kernel() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../smtpflow-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "smtpflow-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
