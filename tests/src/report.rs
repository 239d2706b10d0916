//! How a test says that it skipped something or checked less than it meant to: one line on
//! stderr and, when `SMTPFLOW_SKIP_LOG` names a file, the same line appended to it, so that
//! `cargo xtask test` can list every skip and weakening of a run at its end.
//!
//! The file's lines are `SKIPPED <test>: <reason>` and `WEAKENED <test>: <reason>`; each is one
//! `write` on a file opened for appending, so lines from concurrent tests never interleave.
use std::io::Write as _;

/// The environment variable naming the file the lines are appended to.
pub const SKIP_LOG: &str = "SMTPFLOW_SKIP_LOG";

/// `test` (or part of it) did not run, for `reason`.
pub fn skipped(test: &str, reason: &str) {
    line("SKIPPED", test, reason);
}

/// `test` ran but checked less than it is written to (a fallback the kernel forced), for `reason`.
pub fn weakened(test: &str, reason: &str) {
    line("WEAKENED", test, reason);
}

/// The name of the running test: the test thread's name (`--test-threads=1` keeps it).
pub fn current_test() -> String {
    std::thread::current().name().unwrap_or("unknown test").to_owned()
}

fn line(kind: &str, test: &str, reason: &str) {
    let text = format!("{kind} {test}: {reason}\n");
    eprint!("{text}");
    let Some(path) = std::env::var_os(SKIP_LOG).filter(|p| !p.is_empty()) else { return };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot append to {} ({SKIP_LOG}): {e}", path.to_string_lossy());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_line_each() {
        let path = std::env::temp_dir().join(format!("smtpflow-skip-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // SAFETY: no other thread of this unit-test binary reads the environment meanwhile.
        unsafe { std::env::set_var(SKIP_LOG, &path) };
        skipped("a::b", "no root");
        weakened("c", "fexit refused");
        unsafe { std::env::remove_var(SKIP_LOG) };
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "SKIPPED a::b: no root\nWEAKENED c: fexit refused\n");
    }
}
