//! What a kernel run found: each test's result, read from the guest's files, and the reports,
//! tables and closing line printed from them.
use std::{fmt::Write as _, fs, path::Path};

use super::plan::Planned;
use crate::skips;

/// One test's result.
pub struct TestResult {
    pub name: String,
    /// `ok`, `FAILED`, `TIMEOUT`, `not run`, or `skipped: <why>`.
    pub status: String,
    pub secs: f64,
}

/// One kernel's run.
pub struct Run {
    /// What the column is called: `host` or the version asked for (`6.1`).
    pub label: String,
    pub uname: String,
    pub results: Vec<TestResult>,
    pub check: String,
    pub startup: String,
    /// What the tests skipped or weakened on this kernel (their `SKIPPED`/`WEAKENED` lines).
    pub skipped: Vec<String>,
    /// Problems outside the tests (a VM that never booted, a missing exit status).
    pub errors: Vec<String>,
    pub setup_secs: f64,
    pub run_secs: f64,
    pub boots: u32,
}

impl Run {
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && self.results.iter().all(|r| r.status == "ok" || r.status.starts_with("skipped"))
    }

    fn summary(&self) -> String {
        let n = |s: &str| self.results.iter().filter(|r| r.status == s).count();
        let skipped = self.results.iter().filter(|r| r.status.starts_with("skipped")).count();
        let failed = self.results.len() - n("ok") - skipped;
        let mut s = format!(
            "{} ({}): {} passed, {failed} failed, {skipped} skipped; setup {:.0} s, suite {:.0} s{}",
            self.label,
            self.uname,
            n("ok"),
            self.setup_secs,
            self.run_secs,
            if self.boots > 1 { format!(" ({} boots)", self.boots) } else { String::new() }
        );
        for e in &self.errors {
            let _ = write!(s, "\n  error: {e}");
        }
        s
    }

    /// What smtpflow said at start on this kernel: attach methods, degradations, errors (each
    /// line cut short: a verifier log is not a message).
    fn startup_lines(&self) -> String {
        let mut s = String::new();
        for l in self.startup.lines() {
            if l.starts_with("==")
                || l.contains(" INFO ")
                || l.contains(" WARN ")
                || l.contains("error")
            {
                // `[2026-11-23T11:38:38Z INFO ] attached ...` becomes `INFO attached ...`.
                let line = match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                    Some((head, msg)) => {
                        format!("{} {msg}", head.split_whitespace().nth(1).unwrap_or_default())
                    }
                    None => l.to_owned(),
                };
                let cut: String = line.chars().take(160).collect();
                let more = if cut.len() < line.len() { " [...]" } else { "" };
                let _ = writeln!(s, "  {cut}{more}");
            }
        }
        s
    }

    pub fn report(&self) -> String {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(10);
        let mut s = String::new();
        if !self.startup.is_empty() {
            let _ = writeln!(s, "smtpflow at start on {}:\n{}", self.uname, self.startup_lines());
        }
        for r in &self.results {
            let secs = if r.secs > 0.0 { format!("{:7.1} s", r.secs) } else { String::new() };
            let _ = writeln!(s, "  {:<8} {:<width$} {secs}", r.status_word(), r.name);
        }
        s + &self.summary() + "\n" + &self.skips()
    }

    /// The checks the tests skipped or weakened on this kernel.
    pub fn skips(&self) -> String {
        skips::section(&format!("{} ({})", self.label, self.uname), &self.skipped)
    }
}

impl TestResult {
    fn status_word(&self) -> &str {
        if self.status.starts_with("skipped") { "skipped" } else { &self.status }
    }
}

/// The plain last line CI reads: tests passed, failed and skipped over every kernel run (a run
/// that ended without its tests, a VM that never booted, counts as one failure).
pub fn closing_line(runs: &[Run]) -> String {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for r in runs {
        let ok = r.results.iter().filter(|t| t.status == "ok").count();
        let skip = r.results.iter().filter(|t| t.status.starts_with("skipped")).count();
        passed += ok;
        skipped += skip;
        failed += r.results.len() - ok - skip;
        if !r.errors.is_empty() && r.results.len() == ok + skip {
            failed += 1;
        }
    }
    format!("kernels: {passed} passed, {failed} failed, {skipped} skipped")
}

pub fn matrix_table(runs: &[Run]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        for t in &r.results {
            if !names.contains(&t.name.as_str()) {
                names.push(&t.name);
            }
        }
    }
    let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let mut s = format!("\nkernel matrix\n{:<width$}", "test");
    for r in runs {
        let _ = write!(s, "  {:<10}", r.label);
    }
    s.push('\n');
    for name in &names {
        let _ = write!(s, "{name:<width$}");
        for r in runs {
            let cell = r.results.iter().find(|t| t.name == *name).map_or("-", |t| t.status_word());
            let _ = write!(s, "  {cell:<10}");
        }
        s.push('\n');
    }
    for r in runs {
        let _ = writeln!(s, "{}", r.summary());
    }
    for r in runs {
        let _ = writeln!(s, "{}", r.skips());
    }
    for r in runs {
        if !r.check.is_empty() {
            let _ = writeln!(
                s,
                "\nsmtpflow check on {} ({}):\n{}",
                r.label,
                r.uname,
                condense_check(&r.check).trim_end()
            );
        }
    }
    s
}

/// `smtpflow check`'s table without the verifier logs it may carry: each row cut short, and
/// for a rejected program the verifier's own reason (its line before "verification time").
fn condense_check(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_row = |l: &str| {
        l.split_once("  ").is_some_and(|(name, rest)| {
            !name.trim().is_empty()
                && ["ok ", "warn ", "FAIL ", "STATUS "]
                    .iter()
                    .any(|s| rest.trim_start().starts_with(s))
        })
    };
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let keep = is_row(l)
            || l.trim_start().starts_with("fix: ")
            || l.starts_with("smtpflow can run")
            || l.contains("check(s) failed")
            || l.starts_with("(exit");
        if !keep {
            continue;
        }
        let row = l.split(" Verifier output:").next().unwrap_or(l);
        let cut: String = row.chars().take(150).collect();
        let _ = writeln!(out, "{cut}{}", if cut.len() < row.len() { " [...]" } else { "" });
        if l.contains("Verifier output:") {
            let reason = lines[i..]
                .iter()
                .position(|x| x.starts_with("verification time"))
                .and_then(|p| lines.get(i + p - 1));
            if let Some(reason) = reason {
                let _ = writeln!(out, "{:>22}verifier: {}", "", reason.trim());
            }
        }
    }
    out
}

/// Reads the guest's results file: `<binary>::<test> <exit status> <start> <end>` a line.
pub fn collect(plan: &[Planned], results: &Path) -> Vec<TestResult> {
    let text = fs::read_to_string(results).unwrap_or_default();
    plan.iter()
        .map(|p| {
            let name = p.name();
            if let Some(why) = &p.skip {
                return TestResult { name, status: format!("skipped: {why}"), secs: 0.0 };
            }
            let line = text.lines().find(|l| l.split_whitespace().next() == Some(name.as_str()));
            let Some(line) = line else {
                return TestResult { name, status: "not run".into(), secs: 0.0 };
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let status = match f.get(1).copied() {
                Some("0") => "ok",
                Some("124" | "137") => "TIMEOUT",
                _ => "FAILED",
            };
            TestResult { name, status: status.into(), secs: num(3) - num(2) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_without_verifier_log() {
        let text = "CHECK         STATUS  DETAIL\n\
                    kernel        ok      6.1.192 (5.15 or later is supported)\n\
                    tc programs   FAIL    the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx\n\
                    ; #[classifier]\n\
                    0: (bf) r6 = r1\n\
                    misaligned access off (0x0; 0xffffffffffffffff)+0+0 size 8\n\
                    verification time 67269 usec\n\
                    : Permission denied (os error 13)\n\
                    \x20                     fix: a kernel too old for smtpflow; run 5.15+\n\
                    1 check(s) failed\n";
        let c = condense_check(text);
        assert!(c.contains("tc programs   FAIL    the BPF_PROG_LOAD syscall returned Permission denied (os error 13).\n"), "{c}");
        assert!(c.contains("verifier: misaligned access off"), "{c}");
        assert!(c.contains("fix: a kernel too old"), "{c}");
        assert!(!c.contains("r6 = r1"), "{c}");
        assert_eq!(c.lines().count(), 6, "{c}");
    }
}
