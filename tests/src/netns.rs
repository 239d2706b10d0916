//! Network namespaces and veth pairs that are deleted on drop.
use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out =
        Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Self {
        let name =
            format!("sft{}-{}-{role}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace and returns its output (not checked).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd} in {}: {e}", self.name))
    }

    /// Like [`Netns::exec`], panicking when the command fails.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.exec(cmd, args);
        assert!(
            out.status.success(),
            "{cmd} {} in {} failed: {}{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec_ok("sysctl", &["-qw", &format!("{key}={value}")]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip").args(["netns", "del", &self.name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// Moves the calling thread into `ns` (sockets it creates then belong to that namespace).
pub fn enter(ns_name: &str) {
    let path = format!("/run/netns/{ns_name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd; it affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread that has entered `ns`. Sockets it creates belong to that namespace and
/// may be used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread_in(ns, thread::Builder::new(), f).join().expect("thread in namespace panicked")
}

/// Runs `f` on a new thread (a small stack: many may run at once) that has entered `ns`,
/// without waiting for it (unlike [`in_netns`]).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread_in(ns, thread::Builder::new().stack_size(256 * 1024), f)
}

fn thread_in<T: Send + 'static>(
    ns: &Netns,
    builder: thread::Builder,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let name = ns.name.clone();
    builder
        .spawn(move || {
            enter(&name);
            f()
        })
        .expect("spawn a thread")
}

/// The usual test topology: the gateway (`local`, where smtpflow watches `LOCAL_IF`) and a peer
/// (`peer`), joined by a veth pair with IPv4 and IPv6 addresses.
pub struct Pair {
    // Field order matters for drop: namespaces go last.
    pub local: Netns,
    pub peer: Netns,
}

impl Pair {
    pub const LOCAL_IF: &'static str = "sf0";
    pub const PEER_IF: &'static str = "sf1";
    pub const LOCAL_V4: &'static str = "10.77.0.1";
    pub const PEER_V4: &'static str = "10.77.0.2";
    pub const LOCAL_V6: &'static str = "fd00:77::1";
    pub const PEER_V6: &'static str = "fd00:77::2";

    pub fn new() -> Self {
        let pair = Self { local: Netns::new("gw"), peer: Netns::new("peer") };
        pair.link();
        pair
    }

    /// Creates the veth pair with its addresses, up (again, after `ip link del sf0`).
    pub fn link(&self) {
        // Create inside the gateway namespace so nothing ever touches the host's interfaces.
        self.local.ip(&[
            "link",
            "add",
            Self::LOCAL_IF,
            "type",
            "veth",
            "peer",
            "name",
            Self::PEER_IF,
            "netns",
            &self.peer.name,
        ]);
        for (ns, ifname, v4, v6) in [
            (&self.local, Self::LOCAL_IF, Self::LOCAL_V4, Self::LOCAL_V6),
            (&self.peer, Self::PEER_IF, Self::PEER_V4, Self::PEER_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", ifname, "nodad"]);
            ns.ip(&["link", "set", ifname, "up"]);
        }
    }

    /// The MAC address of an interface in a namespace.
    pub fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
        // `ip netns exec` mounts the namespace's own /sys.
        let out = ns.exec_ok("cat", &[&format!("/sys/class/net/{ifname}/address")]);
        let mut mac = [0u8; 6];
        for (i, part) in out.trim().split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(part, 16).expect("mac");
        }
        mac
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}
