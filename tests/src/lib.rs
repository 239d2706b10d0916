//! Harness for smtpflow's integration tests. They need root: each test builds its own pair of
//! network namespaces joined by a veth pair, runs the real `smtpflow watch` binary in one of
//! them, makes real traffic, and asserts exact counters scraped from its `/metrics`.
//!
//! Everything created is removed on drop, so a failing (panicking) test cleans up too. Each
//! module is named for what it provides:
//!
//! - the set-up: [`netns`] (namespaces, the veth [`Pair`]), [`process`] (child processes),
//!   [`smtpflow`] (the binary under test: [`Watch`], `diagnose`), [`tempdir`], [`pki`];
//! - traffic: [`traffic`] (plain TCP, in the foreground or background), [`smtp`] (servers and
//!   clients), [`gateway`] (a gateway's everyday noise and the remote hosts behind it),
//!   [`frames`] (crafted Ethernet frames), [`nfqueue`] (held packets);
//! - what is observed: [`http`] (the one HTTP client), [`metrics`] (the exposition format),
//!   [`names`] (every metric and program name), [`expect`] (expected values and the one loop
//!   waiting for them), [`diagnosis`], [`hooks`] (what is attached to an interface),
//!   [`procfs`] (what `/proc` and `/sys` say), [`netfilter`] (nftables counters, the RST
//!   oracle), [`capture`] (an independent packet capture);
//! - Prometheus: [`prometheus`] (the server and promtool), [`alertmanager`] (the server and a
//!   webhook receiver), [`fleet`] (gateways and sites), [`json`];
//! - [`netlink`]: netlink replies as the kernel writes them, for the parser tests of smtpflow's
//!   netlink clients (they need no root);
//! - [`rng`] (seeded randomness) and [`report`] (skipped and weakened checks).
pub mod alertmanager;
pub mod capture;
pub mod diagnosis;
pub mod expect;
pub mod fleet;
pub mod frames;
pub mod gateway;
pub mod hooks;
pub mod http;
pub mod json;
pub mod metrics;
pub mod names;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod nfqueue;
pub mod pki;
pub mod process;
pub mod procfs;
pub mod prometheus;
pub mod report;
pub mod rng;
pub mod smtp;
pub mod smtpflow;
pub mod starttls;
pub mod tempdir;
pub mod traffic;

pub use metrics::Metrics;
pub use netns::{Netns, Pair, in_netns, spawn_in_netns};
pub use smtpflow::Watch;

use std::time::{Duration, Instant};

/// Skips the calling test (returns) with a reported reason when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::report::skipped(
                &$crate::report::current_test(),
                "this test needs root (network namespaces, BPF); run `cargo xtask test`",
            );
            return;
        }
    };
}

pub fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
