//! The closing list of checks skipped or weakened on the kernel a run used. A test that skips a
//! check (the kernel lacks a feature) or weakens it (an exact count becomes a bound) appends a
//! line `SKIPPED <test>: <reason>` or `WEAKENED <test>: <reason>` to the file named by
//! [`VAR`] when it is set. The xtask creates the file fresh, passes it to the tests, and prints
//! its lines at the very end, so that a green run cannot hide what it did not check.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

/// The environment variable that names the file.
pub const VAR: &str = "SMTPFLOW_SKIP_LOG";

/// A fresh (empty) file for the tests' skip lines.
pub struct SkipLog(PathBuf);

impl SkipLog {
    pub fn fresh(path: PathBuf) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, "")?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The section printed at the end of a run on the kernel `uname`.
    pub fn section(&self, uname: &str) -> String {
        section(uname, &read(&self.0))
    }
}

/// The lines of a skip log (none when it is missing).
pub fn read(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `checks skipped or weakened on <uname>:` and the lines, or a line saying there are none.
pub fn section(uname: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return format!("on {uname}: no check skipped or weakened");
    }
    let mut s = format!("checks skipped or weakened on {uname}:");
    for l in lines {
        let _ = write!(s, "\n  {l}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections() {
        assert_eq!(section("6.1.0-9", &[]), "on 6.1.0-9: no check skipped or weakened");
        let lines = ["SKIPPED a::b: no TCX".to_owned(), "WEAKENED c::d: a bound".to_owned()];
        assert_eq!(
            section("6.1.0-9", &lines),
            "checks skipped or weakened on 6.1.0-9:\n  SKIPPED a::b: no TCX\n  WEAKENED c::d: a bound"
        );
    }
}
