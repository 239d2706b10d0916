//! The commands: `watch` and `diagnose` run the whole pipeline through an [`observer::Observer`];
//! `check` tells whether this host can.
pub mod check;
pub mod diagnose;
pub mod observer;
pub mod reading;
pub mod watch;

/// The async runtime of `watch` and `diagnose`: two workers (the drain blocks in syscalls, off
/// the workers, through `block_in_place`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting the async runtime")
}
