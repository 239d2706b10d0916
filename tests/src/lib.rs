//! Harness for smtpflow's integration tests. They need root: each test builds its own pair of
//! network namespaces joined by a veth pair, runs the real `smtpflow watch` binary in one of
//! them, makes real traffic, and asserts exact counters scraped from its `/metrics`.
//!
//! Everything created is removed on drop, so a failing (panicking) test cleans up too.
pub mod capture;
pub mod conn;
pub mod diagnosis;
pub mod fleet;
pub mod frames;
pub mod hardening_support;
pub mod json;
pub mod lifecycle_support;
pub mod metrics;
pub mod netfilter;
pub mod netns;
pub mod nfqueue;
pub mod prometheus;
pub mod smtp;
pub mod watch;

pub use metrics::Metrics;
pub use netns::{Netns, Pair, in_netns};
pub use watch::Watch;

use std::time::{Duration, Instant};

/// Skips the calling test (returns) with a printed reason when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED: this test needs root (network namespaces, BPF); run `cargo xtask test`"
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

/// Stops a child process: SIGTERM, up to `grace` to exit, then SIGKILL. For guards' `Drop`.
pub fn stop_child(child: &mut Option<std::process::Child>, grace: Duration) {
    if let Some(mut child) = child.take() {
        // `ip netns exec` execs its program, so the child's pid is the program's own.
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if wait_for(grace, || child.try_wait().ok().flatten()).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
