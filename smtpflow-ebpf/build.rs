//! Code generation options for the kernel programs, passed to bpf-linker (which generates the
//! BPF code from the crate's LLVM bitcode).
//!
//! `--disable-expand-memcpy-in-order`: bpf-linker's default asks LLVM to expand only `memcpy`
//! itself (in order, for the JITs' pattern matching), which leaves every `memset` (zeroing a
//! key, a header copy, per-packet state) as a call to a byte loop: a few hundred instructions
//! per packet. Without it LLVM writes small memsets and memcpys as a few stores.
//!
//! Not `allows-misaligned-mem-access`: it would read packet fields with one load instead of
//! byte by byte, but LLVM then also merges stack stores across alignment, and the verifier
//! rejects any misaligned stack access.
fn main() {
    println!("cargo::rustc-link-arg=--disable-expand-memcpy-in-order");
    println!("cargo::rerun-if-changed=build.rs");
}
