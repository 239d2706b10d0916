//! Helpers for the hardening tests (`tests/hardening.rs`): a `smtpflow watch` started with exactly
//! the arguments given (TLS endpoints, several instances, processes killed at random moments),
//! what `/proc` says about its threads (capabilities, user, memory), a seeded random generator,
//! temporary directories, a test PKI made with `openssl`, connections from a chosen source
//! address, threads inside a namespace, and an nftables ingress counter.
use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{Netns, wait_for, watch::binary};

static SEQ: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// A seeded random generator (SplitMix64): the seed is printed, and SMTPFLOW_TEST_SEED replays it.

pub struct Rng(u64);

impl Rng {
    /// `$SMTPFLOW_TEST_SEED`, else the clock; printed so that a failure can be replayed.
    pub fn from_env(test: &str) -> Self {
        let seed =
            std::env::var("SMTPFLOW_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(
                || SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
            );
        eprintln!("{test}: random seed {seed} (replay with SMTPFLOW_TEST_SEED={seed})");
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories.

/// A directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "smtpflow-{what}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` and returns its path as a string.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A smtpflow process started with exactly the given arguments.

/// `smtpflow <args>` inside a namespace (`ip netns exec` execs it, so the child's pid is
/// smtpflow's), stderr to a file. SIGTERM on drop, SIGKILL if it does not exit within 5 s.
pub struct Instance {
    child: Option<Child>,
    stderr_path: PathBuf,
    pub started: Instant,
}

impl Instance {
    pub fn spawn(ns: &Netns, args: &[&str]) -> Self {
        let stderr_path = std::env::temp_dir().join(format!(
            "{}-instance{}.stderr",
            ns.name,
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = File::create(&stderr_path).expect("stderr file");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn smtpflow");
        Self { child: Some(child), stderr_path, started: Instant::now() }
    }

    /// Spawns and waits (at most 20 s) until `ready()` holds; panics if smtpflow exits first.
    pub fn start(ns: &Netns, args: &[&str], mut ready: impl FnMut() -> bool) -> Self {
        let mut inst = Self::spawn(ns, args);
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(status) = inst.try_wait() {
                panic!("smtpflow {args:?} exited early ({status:?}):\n{}", inst.stderr());
            }
            ready().then_some(())
        });
        assert!(ok.is_some(), "smtpflow {args:?} was not ready within 20s:\n{}", inst.stderr());
        inst
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit code if it has exited (`Some(None)`: ended by a signal).
    pub fn try_wait(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status.code())
    }

    /// Waits at most `timeout` for the exit; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        if self.child.is_none() {
            return Some(None);
        }
        wait_for(timeout, || self.try_wait())
    }

    /// Sends `signal`, waits (10 s at most) and returns the exit code (`None`: a signal ended it).
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        let pid = self.pid() as i32;
        assert!(pid != 0, "smtpflow already exited:\n{}", self.stderr());
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pid, signal) };
        match self.wait_exit(Duration::from_secs(10)) {
            Some(code) => code,
            None => {
                panic!("smtpflow did not exit within 10s of signal {signal}:\n{}", self.stderr())
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

// ---------------------------------------------------------------------------------------------
// /proc: threads, capabilities, user, memory.

/// `/proc/<pid>/task/<tid>/status` of every thread of `pid`, by tid.
pub fn thread_statuses(pid: u32) -> Vec<(u32, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out: Vec<(u32, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("{dir}/{tid}/status")).ok()?;
            Some((tid, status))
        })
        .collect();
    out.sort();
    out
}

/// The value of field `name` in a `/proc/.../status` text.
pub fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
}

/// A hex capability set (`CapEff`, `CapPrm`, `CapBnd`, `CapAmb`, `CapInh`) of a status text.
pub fn caps(status: &str, name: &str) -> u64 {
    let v = status_field(status, name).unwrap_or_else(|| panic!("no {name} in:\n{status}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("bad {name} {v:?}"))
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&s, name)?.trim_end_matches("kB").trim().parse().ok()
}

/// `CapEff` of this (test) process: the full set the environment allows.
pub fn own_effective_caps() -> u64 {
    caps(&std::fs::read_to_string("/proc/self/status").expect("/proc/self/status"), "CapEff")
}

/// Raises this process's open-file soft limit to its hard limit (many sockets at once).
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Threads and sockets inside a namespace.

/// Runs `f` on a new thread that has entered `ns`, without waiting for it (unlike `in_netns`).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name);
    thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .expect("spawn a thread")
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A blocking TCP connect from `src` (port 0: any) to `dst`, on the calling thread's namespace.
pub fn connect_from(src: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we own; TcpStream closes it on drop, on every path below.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(Duration::from_secs(5)))?; // bounds the connect too
    let (ss, len) = sockaddr(&src);
    // SAFETY: valid fd and sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, std::ptr::addr_of!(ss).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (ds, dlen) = sockaddr(&dst);
    // SAFETY: valid fd and sockaddr of `dlen` bytes.
    if unsafe { libc::connect(fd, std::ptr::addr_of!(ds).cast(), dlen) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A raw HTTP exchange: sends `request` as is, reads until the server closes (each read bounded
/// by `timeout`) and returns (status, head, body). Status 0: no parsable response.
pub fn raw_http(
    addr: &str,
    request: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let sock: SocketAddr = addr.parse().expect("socket address");
    let mut s = TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // A server that refuses a huge head may close before reading all of it: not an error here.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (String::from_utf8_lossy(&buf[..i]).into_owned(), buf[i + 4..].to_vec()),
        None => (String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
    };
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head, body))
}

/// The value of header `name` (case-insensitive) in an HTTP head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------------
// A test PKI, made with openssl.

/// A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it, and
/// a client certificate from another (untrusted) CA. Files live in a [`TempDir`].
pub struct Pki {
    pub dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let d = dir.0.clone();
        for ca in ["ca", "rogue-ca"] {
            openssl(
                &d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=smtpflow test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        dir.write(
            "server.ext",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        );
        dir.write(
            "client.ext",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("rogue-client", "rogue-ca", "client.ext"),
        ] {
            openssl(
                &d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                &d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.crt"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                    "-out",
                    &format!("{name}.crt"),
                ],
            );
        }
        Self { dir }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.path(name).display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// An nftables counter on an interface's ingress hook (the same point in the receive path as TC
// ingress), removed with the namespace.

pub const INGRESS_TABLE: &str = "smtpflow_ingress";

/// Counts, on `ifname`'s ingress, the frames matching `rule` (an nft expression, without the
/// `counter` statement), in the named counter `counter`.
pub fn nft_ingress_counter(ns: &Netns, ifname: &str, rule: &str, counter: &str) {
    let script = format!(
        "table netdev {INGRESS_TABLE} {{\n\
           counter {counter} {{ }}\n\
           chain in {{ type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
             {rule} counter name \"{counter}\"\n\
           }}\n\
         }}\n"
    );
    nft_script(ns, &script);
}

/// Packets counted by the named counter of [`INGRESS_TABLE`].
pub fn nft_ingress_packets(ns: &Netns, counter: &str) -> u64 {
    crate::netfilter::counter_packets(ns, "netdev", INGRESS_TABLE, counter)
}

/// A statistics counter of an interface (`rx_packets`, `rx_dropped`, ...) as its namespace sees it.
pub fn iface_stat(ns: &Netns, ifname: &str, stat: &str) -> u64 {
    ns.exec_ok("cat", &[&format!("/sys/class/net/{ifname}/statistics/{stat}")])
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad {stat} of {ifname}"))
}

// ---------------------------------------------------------------------------------------------
// An independent count of the RSTs on port 25 crossing an interface.

/// RSTs on SMTP port 25, by smtpflow's `direction` and `side`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rsts {
    pub inbound_peer: u64,
    pub inbound_local: u64,
    pub outbound_peer: u64,
    pub outbound_local: u64,
}

impl Rsts {
    pub fn total(&self) -> u64 {
        self.inbound_peer + self.inbound_local + self.outbound_peer + self.outbound_local
    }

    /// The RSTs counted since `base`.
    pub fn since(&self, base: &Rsts) -> Rsts {
        Rsts {
            inbound_peer: self.inbound_peer - base.inbound_peer,
            inbound_local: self.inbound_local - base.inbound_local,
            outbound_peer: self.outbound_peer - base.outbound_peer,
            outbound_local: self.outbound_local - base.outbound_local,
        }
    }
}

/// nftables counters on an interface's ingress (RSTs the peer sends) and egress (RSTs the local
/// host sends) hooks, next to TC's: the oracle for RSTs whose number depends on the kernel's
/// timing, such as the rare RST that ends a connection closed by both sides at once. Removed
/// with the namespace (or [`RstOracle::install`] again, e.g. for a re-created interface).
pub struct RstOracle {
    ns: String,
}

const RST_TABLE: &str = "smtpflow_rst";
const RST_COUNTERS: [&str; 4] =
    ["inbound_peer", "inbound_local", "outbound_peer", "outbound_local"];

impl RstOracle {
    pub fn install(ns: &Netns, ifname: &str) -> Self {
        // A table bound to a deleted interface is replaced (its base chains went with it).
        let _ = ns.exec("nft", &["delete", "table", "netdev", RST_TABLE]);
        let rst = "tcp flags & rst == rst counter name";
        let script = format!(
            "table netdev {RST_TABLE} {{\n\
               counter inbound_peer {{ }}\n  counter inbound_local {{ }}\n\
               counter outbound_peer {{ }}\n  counter outbound_local {{ }}\n\
               chain in {{\n\
                 type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
                 tcp dport 25 {rst} \"inbound_peer\"\n\
                 tcp sport 25 {rst} \"outbound_peer\"\n\
               }}\n\
               chain out {{\n\
                 type filter hook egress device \"{ifname}\" priority 0; policy accept;\n\
                 tcp sport 25 {rst} \"inbound_local\"\n\
                 tcp dport 25 {rst} \"outbound_local\"\n\
               }}\n\
             }}\n"
        );
        nft_script(ns, &script);
        Self { ns: ns.name.clone() }
    }

    /// The RSTs counted so far.
    pub fn read(&self) -> Rsts {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "list", "table", "netdev", RST_TABLE])
            .output()
            .expect("run nft");
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |name: &str| -> u64 {
            let after = text
                .split_once(&format!("counter {name} {{"))
                .unwrap_or_else(|| panic!("no counter {name} in:\n{text}"))
                .1;
            let words: Vec<&str> = after.split_whitespace().take(2).collect();
            assert_eq!(words.first(), Some(&"packets"), "counter {name}: {after}");
            words[1].parse().unwrap_or_else(|_| panic!("counter {name}: {after}"))
        };
        let [a, b, c, d] = RST_COUNTERS.map(get);
        Rsts { inbound_peer: a, inbound_local: b, outbound_peer: c, outbound_local: d }
    }
}

/// Runs an nft script (`nft -f -`) inside `ns`, panicking with its error.
pub fn nft_script(ns: &Netns, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
