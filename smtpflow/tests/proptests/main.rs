//! Property tests of the userspace parsers: the `/proc` and sysctl files and ctnetlink replies
//! (`pressure`), the config file (`config::to_flags`), `--ports` (`cli::parse_ports`), the
//! kernel's BTF (`btf::Btf::parse`) and the payload-event parsers (`smtpflow_common::tls`).
//! Each must return a `Result` (or its "not known") on any input, never panic, and give back
//! what a well-formed input says (round trips: render values the way the kernel or a user writes
//! them, parse, compare). And the bounded reading of the per-peer maps (`peers::PeerReader`)
//! against the exact one it replaces. And the remote-name parsers of greetings and EHLOs
//! (`sites::names`) with the `--site-map` file.
//!
//! Seeded by proptest (`PROPTEST_CASES` raises the case count; a failure prints its minimal
//! input).
use proptest::{collection::vec, prelude::*};

mod btf;
mod config;
mod names;
mod netlink_replies;
mod peers;
mod proc_files;
mod tls;

/// Arbitrary text, weighted towards the characters these formats are made of.
pub(crate) fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~\n\t]{0,200}",
        "([A-Za-z_]{1,12}|[0-9a-f]{1,17}|-?[0-9]{1,21}|:| +|\n|\t|=|,|\\[|\\]|\"){0,80}",
    ]
}

/// `bytes` with a few bytes overwritten and cut somewhere: what a hostile or garbled source
/// makes of a real capture.
pub(crate) fn mangled(bytes: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), any::<prop::sample::Index>()).prop_map(
        move |(edits, cut)| {
            let mut b = bytes.to_vec();
            for (at, v) in edits {
                let i = at.index(b.len());
                b[i] = v;
            }
            b.truncate(cut.index(b.len() + 1));
            b
        },
    )
}

pub(crate) fn mangled_text(text: &'static str) -> impl Strategy<Value = String> {
    mangled(text.as_bytes()).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}
