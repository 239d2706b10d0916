//! The kernel programs are the `smtpflow` binary of this crate (`src/main.rs`), built for
//! `bpfel-unknown-none` by the loader's build script. This empty library lets the loader name the
//! crate as a build dependency, so cargo rebuilds the programs when they change.
#![no_std]
