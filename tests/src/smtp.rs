//! SMTP servers and clients: Postfix's `smtp-sink` run in a namespace, a minimal SMTP client
//! over `TcpStream`, `swaks`, small servers that reset connections at a chosen point, and a
//! mail exchanger ([`Mx`]) that greylists or throttles by policy with the client that sends it
//! a message ([`mail`]). Every process is stopped on drop and every wait is bounded.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    Netns, in_netns,
    process::{Finished, Process, run_in},
    wait_for,
};

/// Waits (at most 10 s) until something listens on TCP `addr` in `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr, mut alive: impl FnMut()) {
    let ok = wait_for(Duration::from_secs(10), || {
        alive();
        let out = ns.exec("ss", &["-Hltn", &format!("sport = :{}", addr.port())]);
        String::from_utf8_lossy(&out.stdout).contains(&addr.to_string()).then_some(())
    });
    assert!(ok.is_some(), "nothing listens on {addr} in {} after 10s", ns.name);
}

/// Postfix's `smtp-sink` listening on `addr` in a namespace, killed on drop.
pub struct SmtpSink {
    pub addr: SocketAddr,
    process: Process,
}

impl SmtpSink {
    /// `smtp-sink -u nobody <extra...> <addr> 100`: e.g. no extra for a 220 greeting,
    /// `-Q connect` for a 421 greeting (then the server closes), `-W connect:1` to greet after
    /// one second. Returns once it listens.
    pub fn start(ns: &Netns, addr: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = addr.parse().expect("socket address");
        let listen = addr.to_string();
        let mut args = vec!["-u", "nobody"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[listen.as_str(), "100"]);
        let mut process = Process::spawn(ns, "smtp-sink", &args);
        wait_listening(ns, addr, || process.assert_running());
        Self { addr, process }
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }
}

/// What one client session saw.
#[derive(Debug, Clone)]
pub struct Session {
    /// The greeting's reply code.
    pub greeting: u16,
    /// Every reply code, in order (the greeting first).
    pub replies: Vec<u16>,
    /// How long `connect` took (SYN to SYN-ACK, from the client's side).
    pub connect: Duration,
    /// From the start of `connect` to the whole greeting read.
    pub greeted: Duration,
    /// The connection, read to its end (the server closed it) and still open: it closes with
    /// the last clone of the session. Keep the sessions until the counters have been read, as
    /// for [`crate::conn::connect_n`]: a segment late on its way to a closed socket draws a RST.
    pub open: Arc<TcpStream>,
}

/// Reads one complete reply (through a line `NNN <text>\r\n`); `Ok(None)` at end of stream.
fn read_reply(s: &mut TcpStream) -> io::Result<Option<u16>> {
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            return if text.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "reply cut short"))
            };
        }
        text.push(byte[0]);
        if text.ends_with(b"\r\n") {
            let last = text[..text.len() - 2].rsplit(|&b| b == b'\n').next().unwrap_or_default();
            if last.len() >= 4 && last[3] == b' ' {
                let code = std::str::from_utf8(&last[..3]).ok().and_then(|c| c.parse().ok());
                return code.map(Some).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "not an SMTP reply")
                });
            }
        }
    }
}

/// One polite SMTP session: connect, read the greeting; after a 220 send QUIT and read the
/// answer; then read to the end of the stream (the server closes first). Nothing is sent after a
/// non-220 greeting, and the connection stays open in the returned session, so no RST is
/// provoked.
pub fn session(addr: SocketAddr, timeout: Duration) -> io::Result<Session> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    let connect = start.elapsed();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let greeting = read_reply(&mut s)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"))?;
    let greeted = start.elapsed();
    let mut replies = vec![greeting];
    if greeting == 220 {
        s.write_all(b"QUIT\r\n")?;
        if let Some(code) = read_reply(&mut s)? {
            replies.push(code);
        }
    }
    while let Some(code) = read_reply(&mut s)? {
        replies.push(code);
    }
    Ok(Session { greeting, replies, connect, greeted, open: Arc::new(s) })
}

/// Runs `n` sessions to `addr` from `ns`, all at once (one thread each), and returns them (with
/// their connections still open).
pub fn sessions(ns: &Netns, addr: &str, n: usize) -> Vec<Session> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    in_netns(ns, move || {
        let threads: Vec<_> =
            (0..n).map(|_| thread::spawn(move || session(addr, Duration::from_secs(30)))).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("session thread").unwrap_or_else(|e| panic!("{addr}: {e}")))
            .collect()
    })
}

/// `n` connection attempts to `addr` from `ns`, all at once, each given up after `timeout`.
/// Returns each attempt's result kind (`Ok(())` when it connected).
pub fn attempts(
    ns: &Netns,
    addr: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Result<(), io::ErrorKind>> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    in_netns(ns, move || {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                thread::spawn(move || {
                    TcpStream::connect_timeout(&addr, timeout).map(drop).map_err(|e| e.kind())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("connect thread")).collect()
    })
}

/// Sets `SO_LINGER` to {on, 0 s}: closing the socket then sends a RST instead of a FIN.
pub fn linger_zero(fd: &impl AsRawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a valid socket with a valid struct.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// A TCP listener bound in `ns` with the given accept backlog.
pub fn listen(ns: &Netns, addr: &str, backlog: i32) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("socket address");
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only: {addr}") };
    in_netns(ns, move || {
        // SAFETY: plain socket syscalls with valid arguments; the fd is owned by the listener.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let listener = TcpListener::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4);
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            let rc = libc::bind(fd, (&raw const sin).cast(), size_of::<libc::sockaddr_in>() as u32);
            assert_eq!(rc, 0, "bind {addr}: {}", io::Error::last_os_error());
            let rc = libc::listen(fd, backlog);
            assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
            listener
        }
    })
}

/// Accepts one connection, waiting at most `timeout`.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("nonblocking listener");
    let s = wait_for(timeout, || l.accept().ok().map(|(s, _)| s))
        .unwrap_or_else(|| panic!("no connection to accept within {timeout:?}"));
    s.set_nonblocking(false).expect("blocking stream");
    s
}

/// Serves `n` connections on a thread: accepts each and at once closes it with a RST (before
/// any greeting).
pub fn serve_reset_after_accept(l: TcpListener, n: usize) -> JoinHandle<()> {
    thread::spawn(move || {
        for _ in 0..n {
            let s = accept_within(&l, Duration::from_secs(10));
            linger_zero(&s);
            drop(s);
        }
    })
}

/// Serves `n` connections on a thread: greets each with `220 test ESMTP`, then only reads until
/// the client goes away (sending nothing more, so a client's RST is the connection's last
/// packet).
pub fn serve_greet_then_wait(l: TcpListener, n: usize) -> JoinHandle<()> {
    thread::spawn(move || {
        let conns: Vec<_> = (0..n)
            .map(|_| {
                let mut s = accept_within(&l, Duration::from_secs(10));
                s.write_all(b"220 test ESMTP\r\n").expect("greeting");
                s
            })
            .collect();
        for mut s in conns {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 512];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    })
}

/// From `ns`, `n` times one after the other: connects to `addr` and reads; the server resets the
/// connection. Returns what each read ended with.
pub fn connect_expect_reset(ns: &Netns, addr: &str, n: usize) -> Vec<io::ErrorKind> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                match s.read(&mut buf) {
                    Ok(0) => io::ErrorKind::UnexpectedEof,
                    Ok(_) => io::ErrorKind::InvalidData,
                    Err(e) => e.kind(),
                }
            })
            .collect()
    })
}

/// From `ns`, `n` times one after the other: connects to `addr`, reads the greeting, then aborts
/// the session with a RST. Returns the greeting codes.
pub fn greeting_then_abort(ns: &Netns, addr: &str, n: usize) -> Vec<u16> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let code = read_reply(&mut s).expect("greeting").expect("a greeting");
                linger_zero(&s);
                drop(s);
                code
            })
            .collect()
    })
}

/// One `swaks` session from `ns` to `server:port` that quits after the banner (sending `QUIT`
/// whatever the banner said, as swaks does).
pub fn swaks_banner(ns: &Netns, server: &str, port: u16) -> Finished {
    let port = port.to_string();
    run_in(
        ns,
        "swaks",
        &[
            "--server",
            server,
            "--port",
            &port,
            "--quit-after",
            "banner",
            "--timeout",
            "5",
            "--helo",
            "client.test",
            "--from",
            "a@client.test",
            "--to",
            "b@server.test",
        ],
        Duration::from_secs(20),
    )
}

// ---------------------------------------------------------------------------------------------
// A mail exchanger with a chosen reply policy, and a client that sends one message.

/// What an [`Mx`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// A `220` greeting, `250` to every command, `354` to DATA, `221` to QUIT.
    Accept,
    /// As [`Policy::Accept`], but every `every`-th session's RCPT gets a greylisting answer,
    /// alternately `451 4.7.1` and `450 4.2.0` (transient: "try again later"), not throttling.
    Greylist { every: u64 },
    /// A `421 4.7.0` greeting ("too many connections, slow down"), then the server closes.
    Throttle,
}

/// The greylisting answers of [`Policy::Greylist`], in the order they alternate.
pub const GREYLIST_REPLIES: [&str; 2] =
    ["451 4.7.1 Greylisted, please try again later", "450 4.2.0 Greylisted, come back later"];
/// The greeting of [`Policy::Throttle`].
pub const THROTTLE_GREETING: &str = "421 4.7.0 Too many connections from your host, slow down";

/// What an [`Mx`] sent, counted as it wrote it.
#[derive(Debug, Default)]
pub struct MxCounts {
    pub sessions: AtomicU64,
    pub messages: AtomicU64,
    /// Greylisting answers sent, by [`GREYLIST_REPLIES`] index.
    pub greylisted: [AtomicU64; 2],
    pub throttled: AtomicU64,
}

/// A small SMTP server on `addr` in a namespace: one thread accepts, one thread serves each
/// session (every read bounded by 10 s). Stopped on drop; sessions still open are left to their
/// clients.
pub struct Mx {
    pub addr: SocketAddr,
    pub counts: Arc<MxCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Mx {
    /// An MX greeting as `mx.test` (`220 mx.test ESMTP`, `250 mx.test` to EHLO).
    pub fn start(ns: &Netns, addr: &str, policy: Policy) -> Self {
        Self::start_named(ns, addr, policy, "mx.test")
    }

    /// An MX greeting with `name` (`220 <name> ESMTP`, `250 <name>` to EHLO; [`Policy::Throttle`]
    /// greets with [`THROTTLE_GREETING`], which names nobody).
    pub fn start_named(ns: &Netns, addr: &str, policy: Policy, name: &str) -> Self {
        let name: Arc<str> = name.into();
        let addr: SocketAddr = addr.parse().expect("socket address");
        let listener = in_netns(ns, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let counts = Arc::new(MxCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut sessions = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let n = c.sessions.fetch_add(1, Ordering::Relaxed) + 1;
                        let (c, name) = (c.clone(), name.clone());
                        sessions.push(thread::spawn(move || {
                            if let Err(e) = serve_session(conn, policy, n, &c, &name) {
                                eprintln!("mx session {n}: {e}");
                            }
                        }));
                        sessions.retain(|t| !t.is_finished());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => eprintln!("mx accept: {e}"),
                }
            }
            for t in sessions {
                if t.join().is_err() {
                    eprintln!("an mx session thread panicked");
                }
            }
        });
        Self { addr, counts, stop, thread: Some(thread) }
    }

    /// Greylisting answers sent so far (both kinds).
    pub fn greylisted(&self) -> u64 {
        self.counts.greylisted.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Mx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("the mx accept thread panicked");
        }
    }
}

/// One session of an [`Mx`]: every reply is one write (one segment), the server closes first.
fn serve_session(
    mut s: TcpStream,
    policy: Policy,
    n: u64,
    counts: &MxCounts,
    name: &str,
) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let reply = |s: &mut TcpStream, line: &str| s.write_all(format!("{line}\r\n").as_bytes());
    if policy == Policy::Throttle {
        reply(&mut s, THROTTLE_GREETING)?;
        counts.throttled.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    reply(&mut s, &format!("220 {name} ESMTP"))?;
    let greylist =
        matches!(policy, Policy::Greylist { every } if every > 0 && n.is_multiple_of(every));
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(&mut s, &mut line)? {
            return Ok(());
        }
        let verb = String::from_utf8_lossy(&line).to_ascii_uppercase();
        match verb.get(..4).unwrap_or_default() {
            "EHLO" | "HELO" => reply(&mut s, &format!("250 {name}"))?,
            "MAIL" => reply(&mut s, "250 2.1.0 Ok")?,
            "RCPT" if greylist => {
                let kind = ((n / policy_every(policy)) % 2) as usize;
                reply(&mut s, GREYLIST_REPLIES[kind])?;
                counts.greylisted[kind].fetch_add(1, Ordering::Relaxed);
            }
            "RCPT" => reply(&mut s, "250 2.1.5 Ok")?,
            "DATA" => {
                reply(&mut s, "354 End data with <CR><LF>.<CR><LF>")?;
                loop {
                    line.clear();
                    if !read_line(&mut s, &mut line)? {
                        return Ok(());
                    }
                    if line == b"." {
                        break;
                    }
                }
                reply(&mut s, "250 2.0.0 Ok: queued")?;
                counts.messages.fetch_add(1, Ordering::Relaxed);
            }
            "RSET" | "NOOP" => reply(&mut s, "250 2.0.0 Ok")?,
            "QUIT" => {
                reply(&mut s, "221 2.0.0 Bye")?;
                return Ok(());
            }
            _ => reply(&mut s, "502 5.5.2 Error: command not recognized")?,
        }
    }
}

fn policy_every(policy: Policy) -> u64 {
    match policy {
        Policy::Greylist { every } => every.max(1),
        _ => 1,
    }
}

/// Reads one line (without its CRLF) into `line`; `false` at the end of the stream.
fn read_line(s: &mut TcpStream, line: &mut Vec<u8>) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            return Ok(false);
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(true);
        }
        line.push(byte[0]);
    }
}

/// What one [`mail`] session saw.
#[derive(Debug)]
pub struct Mail {
    /// Every reply code, in order (the greeting first).
    pub replies: Vec<u16>,
    /// The connection, read to its end (the server closed first), still open.
    pub open: TcpStream,
}

impl Mail {
    /// The message was accepted: greeting, EHLO, MAIL, RCPT, DATA, the message, QUIT.
    pub fn delivered(&self) -> bool {
        self.replies == [220, 250, 250, 250, 354, 250, 221]
    }

    /// The RCPT got a 4xx (and the client said QUIT).
    pub fn deferred(&self) -> Option<u16> {
        match self.replies[..] {
            [220, 250, 250, code, 221] if (400..500).contains(&code) => Some(code),
            _ => None,
        }
    }
}

/// One message to `addr` as an MTA sends it: greeting, EHLO, MAIL FROM, RCPT TO, and DATA when
/// the recipient is accepted, then QUIT; after a non-220 greeting nothing is sent. Reads to the
/// end of the stream (the server closes first); every wait is bounded by `timeout`.
pub fn mail(addr: SocketAddr, timeout: Duration) -> io::Result<Mail> {
    mail_as(addr, timeout, "client.test")
}

/// [`mail`], saying `EHLO <ehlo>`.
pub fn mail_as(addr: SocketAddr, timeout: Duration, ehlo: &str) -> io::Result<Mail> {
    mail_on(TcpStream::connect_timeout(&addr, timeout)?, timeout, ehlo, true)
}

/// [`mail`] from the local address `src`, saying `EHLO <ehlo>`.
pub fn mail_from(
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    ehlo: &str,
) -> io::Result<Mail> {
    mail_on(crate::traffic::connect_from_within(src, dst, timeout)?, timeout, ehlo, true)
}

/// A session with no message from the local address `src`: greeting, `EHLO <ehlo>`, QUIT (after
/// a non-220 greeting nothing is sent), read to the end of the stream as [`mail`] does.
pub fn hello_from(
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    ehlo: &str,
) -> io::Result<Mail> {
    mail_on(crate::traffic::connect_from_within(src, dst, timeout)?, timeout, ehlo, false)
}

/// A session held open after the greeting: connect to `addr` and read its greeting; [`quit`]
/// ends it.
pub fn greet_and_hold(addr: SocketAddr, timeout: Duration) -> io::Result<Mail> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let greeting = read_reply(&mut s)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"))?;
    Ok(Mail { replies: vec![greeting], open: s })
}

/// Ends a session of [`greet_and_hold`]: QUIT, then every reply to the end of the stream (the
/// server closes first).
pub fn quit(mut held: Mail) -> io::Result<Mail> {
    held.open.write_all(b"QUIT\r\n")?;
    while let Some(code) = read_reply(&mut held.open)? {
        held.replies.push(code);
    }
    Ok(held)
}

/// [`mail`] on a connected stream; with `message` false, no MAIL, RCPT or DATA ([`hello_from`]).
fn mail_on(mut s: TcpStream, timeout: Duration, ehlo: &str, message: bool) -> io::Result<Mail> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut replies = Vec::new();
    let step = |s: &mut TcpStream, send: &[u8], replies: &mut Vec<u16>| -> io::Result<u16> {
        if !send.is_empty() {
            s.write_all(send)?;
        }
        let code = read_reply(s)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"))?;
        replies.push(code);
        Ok(code)
    };
    if step(&mut s, b"", &mut replies)? == 220 {
        step(&mut s, format!("EHLO {ehlo}\r\n").as_bytes(), &mut replies)?;
        if message {
            step(&mut s, b"MAIL FROM:<sender@client.test>\r\n", &mut replies)?;
            if step(&mut s, b"RCPT TO:<rcpt@mx.test>\r\n", &mut replies)? == 250
                && step(&mut s, b"DATA\r\n", &mut replies)? == 354
            {
                step(&mut s, b"Subject: smtpflow test\r\n\r\nhello\r\n.\r\n", &mut replies)?;
            }
        }
        step(&mut s, b"QUIT\r\n", &mut replies)?;
    }
    while let Some(code) = read_reply(&mut s)? {
        replies.push(code);
    }
    Ok(Mail { replies, open: s })
}
