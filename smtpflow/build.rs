//! Builds the kernel programs (`smtpflow-ebpf`) with the nightly toolchain and bpf-linker, into
//! OUT_DIR, where `src/attach.rs` embeds them. `AYA_BUILD_SKIP=1` skips this for a quick check.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../smtpflow-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "smtpflow-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the kernel programs failed: {e:#}\n\
             They need the nightly toolchain with rust-src and bpf-linker 0.10: \
             run `cargo xtask setup` (or set AYA_BUILD_SKIP=1 for a check without them)"
        )
    })?;
    // With AYA_BUILD_SKIP=1 nothing was built: embed an empty object, which the loader refuses
    // with a clear message, so that `cargo check`/clippy work without the kernel toolchain.
    let object = Path::new(&std::env::var("OUT_DIR")?).join("smtpflow");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}
