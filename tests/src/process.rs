//! Child processes of the tests: one wrapper, [`Process`], for every program a test runs for a
//! while (smtpflow, smtp-sink, Prometheus, node_exporter, ...), and [`run_bounded`] for the
//! ones it runs to their end.
//!
//! A [`Process`] runs inside a network namespace (`ip netns exec` execs the program, so the
//! child's pid is the program's own), its output in temporary files. Dropping it stops the
//! program (SIGTERM, then SIGKILL after a grace period), reaps it and removes its files; what
//! goes wrong meanwhile is printed, never ignored.
use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{Netns, wait_for};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A number unique within this test process, for temporary file names.
pub fn unique() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// How long a stopped program may take to exit after SIGTERM before it is killed.
pub const GRACE: Duration = Duration::from_secs(5);

/// A program started by [`Process::build`], not yet spawned.
pub struct Spawn {
    cmd: Command,
    what: String,
    tag: String,
    stdout: bool,
    grace: Duration,
}

impl Spawn {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.what.push(' ');
        self.what.push_str(&arg.as_ref().to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    pub fn args<S: AsRef<OsStr>>(self, args: impl IntoIterator<Item = S>) -> Self {
        args.into_iter().fold(self, Self::arg)
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cmd.current_dir(dir.into());
        self
    }

    /// Keeps stdout in a file too (read with [`Process::stdout`]); it is discarded otherwise.
    pub fn capture_stdout(mut self) -> Self {
        self.stdout = true;
        self
    }

    /// How long the program may take to exit after SIGTERM on drop (default [`GRACE`]).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn spawn(self) -> Process {
        self.try_spawn().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Spawn::spawn`], with a failure to start returned (for callers that report errors).
    pub fn try_spawn(mut self) -> io::Result<Process> {
        let path =
            |stream: &str| std::env::temp_dir().join(format!("{}-{}.{stream}", self.tag, unique()));
        let stderr_path = path("stderr");
        let stdout_path = self.stdout.then(|| path("stdout"));
        let file = |p: &PathBuf| {
            File::create(p)
                .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", p.display())))
        };
        self.cmd.stdin(Stdio::null()).stderr(file(&stderr_path)?);
        match &stdout_path {
            Some(p) => self.cmd.stdout(file(p)?),
            None => self.cmd.stdout(Stdio::null()),
        };
        let child = self
            .cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", self.what)))?;
        Ok(Process {
            child: Some(child),
            exited: None,
            what: self.what,
            stdout_path,
            stderr_path: Some(stderr_path),
            grace: self.grace,
            started: Instant::now(),
        })
    }
}

/// A running program, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Process {
    child: Option<Child>,
    /// The exit code once reaped (`Some(None)`: a signal ended it).
    exited: Option<Option<i32>>,
    what: String,
    stdout_path: Option<PathBuf>,
    stderr_path: Option<PathBuf>,
    grace: Duration,
    pub started: Instant,
}

impl Process {
    /// `program` inside `ns`, to be given its arguments and spawned.
    pub fn build(ns: &Netns, program: impl AsRef<OsStr>) -> Spawn {
        let program = program.as_ref();
        let base = std::path::Path::new(program)
            .file_name()
            .map_or_else(|| "cmd".into(), |n| n.to_string_lossy().into_owned());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]).arg(program);
        Spawn {
            cmd,
            what: program.to_string_lossy().into_owned(),
            tag: format!("{}-{base}", ns.name),
            stdout: false,
            grace: GRACE,
        }
    }

    /// `program args...` inside `ns`.
    pub fn spawn<S: AsRef<OsStr>>(
        ns: &Netns,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::build(ns, program).args(args).spawn()
    }

    /// Takes over a child spawned some other way (its output is the caller's business).
    pub fn adopt(child: Child, what: &str) -> Self {
        Self {
            child: Some(child),
            exited: None,
            what: what.to_owned(),
            stdout_path: None,
            stderr_path: None,
            grace: GRACE,
            started: Instant::now(),
        }
    }

    /// The child itself, while it runs (e.g. to take a pipe).
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stderr(&self) -> String {
        self.stderr_path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        self.stdout_path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The exit code if it has exited (`Some(None)`: a signal ended it).
    pub fn try_wait(&mut self) -> Option<Option<i32>> {
        if self.exited.is_none() {
            let status = self.child.as_mut()?.try_wait().ok().flatten()?;
            self.child = None;
            self.exited = Some(status.code());
        }
        self.exited
    }

    /// Waits at most `timeout` for the exit; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        wait_for(timeout, || self.try_wait())
    }

    /// Sends `signal` (the program must still run).
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        assert!(pid != 0, "{} already exited:\n{}", self.what, self.stderr());
        // SAFETY: plain syscall on our own, not yet reaped, child.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        assert_eq!(rc, 0, "signal {signal} to {}: {}", self.what, std::io::Error::last_os_error());
    }

    /// Sends `signal`, waits (10 s at most) and returns the exit code (`None`: a signal ended it).
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!("{} did not exit within 10s of signal {signal}:\n{}", self.what, self.stderr())
        })
    }

    /// Panics (with its stderr) if the program has exited.
    pub fn assert_running(&mut self) {
        if let Err(e) = self.running() {
            panic!("{e}");
        }
    }

    /// An error (with its stderr) if the program has exited.
    pub fn running(&mut self) -> io::Result<()> {
        match self.try_wait() {
            Some(code) => Err(io::Error::other(format!(
                "{} exited early ({code:?}):\n{}",
                self.what,
                self.stderr()
            ))),
            None => Ok(()),
        }
    }

    /// Waits (at most `timeout`) until `ready()` holds; panics if the program exits first.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) {
        if let Err(e) = self.try_wait_ready(timeout, |_| ready()) {
            panic!("{e}");
        }
    }

    /// [`Process::wait_ready`] with the failure returned; `ready` may look at the process (e.g.
    /// its output).
    pub fn try_wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(&Self) -> bool,
    ) -> io::Result<()> {
        let ok = wait_for(timeout, || match self.running() {
            Err(e) => Some(Err(e)),
            Ok(()) => ready(self).then_some(Ok(())),
        });
        ok.unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} was not ready within {timeout:?}:\n{}", self.what, self.stderr()),
            ))
        })
    }

    /// Stops the program now as drop does (SIGTERM, then SIGKILL after the grace period), its
    /// output kept to be read.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, self.grace, &self.what);
        }
    }

    /// Waits at most `timeout` for the exit and returns what it printed; kills it and panics
    /// when it still runs then.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let Some(code) = self.wait_exit(timeout) else {
            panic!("{} still ran after {timeout:?}; killed it:\n{}", self.what, self.stderr());
        };
        Finished {
            code,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        for path in self.stdout_path.iter().chain(&self.stderr_path) {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("removing {}: {e}", path.display());
            }
        }
    }
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the child. Reports what went wrong.
fn stop(mut child: Child, grace: Duration, what: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: plain syscall on our own, not yet reaped, child.
    if unsafe { libc::kill(child.id() as i32, libc::SIGTERM) } != 0 {
        eprintln!("SIGTERM to {what} ({}): {}", child.id(), std::io::Error::last_os_error());
    }
    let exited = wait_for(grace, || match child.try_wait() {
        Ok(status) => status.map(|_| true),
        Err(e) => {
            eprintln!("waiting for {what} ({}): {e}", child.id());
            Some(false)
        }
    });
    if exited == Some(true) {
        return;
    }
    eprintln!("{what} ({}) did not exit within {grace:?} of SIGTERM: killing it", child.id());
    if let Err(e) = child.kill() {
        eprintln!("SIGKILL to {what} ({}): {e}", child.id());
    }
    if let Err(e) = child.wait() {
        eprintln!("reaping {what} ({}): {e}", child.id());
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Finished {
    /// Exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// Asserts that it failed (a non-zero exit, not a signal) and that its stderr mentions
    /// every one of `words`; returns stderr.
    pub fn assert_failed(&self, what: &str, words: &[&str]) -> &str {
        let err = &self.stderr;
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "{what}: expected a non-zero exit, got {:?} after {:?}\nstderr:\n{err}\nstdout:\n{}",
            self.code,
            self.elapsed,
            self.stdout
        );
        for w in words {
            assert!(err.contains(w), "{what}: stderr does not mention {w:?}:\n{err}");
        }
        err
    }
}

/// Runs `cmd` (stdin closed, output captured) and waits at most `timeout` for it to exit;
/// panics, after killing it, if it is still running then.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Finished {
    let shown = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let mut process = Process::adopt(child, &shown);
    process.grace = Duration::ZERO;
    let Some(code) = process.wait_exit(timeout) else {
        drop(process); // kills it, which closes its pipes
        let stderr = err.join().unwrap_or_default();
        panic!("{shown} was still running after {timeout:?}; killed it. Its stderr:\n{stderr}");
    };
    Finished {
        code,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Reads a pipe to its end on a thread (so a chatty program never blocks on a full pipe).
pub fn drain(pipe: Option<Box<dyn Read + Send>>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = pipe
            && let Err(e) = r.read_to_end(&mut buf)
        {
            eprintln!("reading a child's output: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd args...` inside `ns` to its end, waiting at most `timeout`.
pub fn run_in(ns: &Netns, cmd: &str, args: &[&str], timeout: Duration) -> Finished {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, cmd]).args(args);
    run_bounded(c, timeout)
}

/// Whether `tool` is installed (it answers `--help` somehow).
pub fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
}
