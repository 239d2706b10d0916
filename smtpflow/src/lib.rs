//! smtpflow's loader, as a library: the `smtpflow` binary is a thin front on [`commands`], and
//! the fuzz test, the property tests and the benchmarks use the same code.
//!
//! The modules, in the order the data flows:
//! - [`kernel`]: the embedded kernel object ([`kernel::object`], [`kernel::load`]), attaching its
//!   programs, and what the running kernel's BTF tells (drop-reason names, field offsets);
//! - [`sites`]: remote names read from greetings and EHLOs (the kernel's payload events), the
//!   site of each peer, and the per-site totals the per-peer reads feed;
//! - [`drain`]: reading the kernel maps into a [`drain::Snapshot`] (exact totals, a bounded view
//!   of the per-peer maps and of the sites, timeouts swept from the flow map);
//! - [`host`]: the host's pressure signals (conntrack, TCP counters, SMTP listeners' accept
//!   queues) and privileges;
//! - [`diagnose`]: the causes, decided over a sliding window of readings;
//! - [`output`]: the metrics text, the HTTP endpoint, the console view and logs;
//! - [`commands`]: `watch`, `diagnose` and `check`, which run the steps above; [`cli`] and
//!   [`config`] are their flags and the TOML file behind them.
pub mod cli;
pub mod commands;
pub mod config;
pub mod diagnose;
pub mod drain;
pub mod host;
pub mod kernel;
pub mod output;
pub mod sites;
