//! Plain TCP traffic between namespaces: servers that accept and close, clients that connect
//! and close (from a chosen source address too), clients that are refused, bursts, and
//! traffic kept up in the background.
use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{Netns, Pair, in_netns, netns::enter, smtp, spawn_in_netns};

/// Listens on `addr` inside `ns` and accepts (then closes) `n` connections on a thread.
pub fn serve(ns: &Netns, addr: &str, n: usize) -> JoinHandle<()> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind test server"));
    thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        }
    })
}

/// Waits (5 s at most) for the server to close `s` first, then closes it.
///
/// Closing first from the client races with the server's accept-and-close: a FIN that reaches
/// the server's child socket while it still waits in the accept queue leaves an ACK pending,
/// which the kernel may send after its own FIN; the client answers that stray ACK from
/// TIME_WAIT, and the server, by then closed, answers with a RST (seen in about 1.5% of
/// connections). Such RSTs are real and smtpflow rightly counts them; waiting makes them rare,
/// and where a test needs exact counts the [`crate::netfilter::RstOracle`] counts any that still
/// happen.
pub fn close_after_server(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    if let Err(e) = io::Read::read(&mut s, &mut [0u8; 64]) {
        eprintln!("waiting for the server to close: {e}");
    }
}

/// Connects `n` times from `ns`, one after the other, and reads each connection to its end (the
/// server's FIN). The connections are returned still open: keep them until the counters have
/// been read. The client closes last, so its socket would be freed as soon as the server
/// acknowledges its FIN (no TIME-WAIT on that side). A server segment still on its way then (a
/// FIN retransmitted after a stall, a TIME-WAIT's re-ACK) finds no socket, and the client's
/// kernel answers it with a RST the client never meant to send. On an emulated VM such late
/// segments happen: veth queues packets on the sending CPU, and a stalled vCPU holds its queue
/// while the other one goes on. An open socket answers them with an ACK, which is no event.
#[must_use = "closing the connections before the counters are read may add a RST"]
pub fn connect_n(ns: &Netns, addr: &str, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
                let end = io::Read::read(&mut s, &mut [0u8; 1]);
                assert!(matches!(end, Ok(0)), "{addr}: the server did not close: {end:?}");
                s
            })
            .collect()
    })
}

/// `n` connection attempts from `ns` to a closed port; each must be refused.
pub fn connect_refused(ns: &Netns, addr: &str, n: usize) {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    in_netns(ns, move || {
        for _ in 0..n {
            let e = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect_err("the port must be closed");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{addr}: {e}");
        }
    });
}

/// `n` inbound connections from the peer to the gateway's port 25 (IPv4), returned still open
/// (see [`connect_n`]).
#[must_use = "closing the connections before the counters are read may add a RST"]
pub fn inbound(pair: &Pair, n: usize) -> Vec<TcpStream> {
    let addr = format!("{}:25", Pair::LOCAL_V4);
    let server = serve(&pair.local, &addr, n);
    let open = connect_n(&pair.peer, &addr, n);
    server.join().expect("test server");
    open
}

/// One inbound connection (peer to the gateway's port 25) and one outbound one (gateway to the
/// peer's port 25), returned still open (see [`connect_n`]).
#[must_use = "closing the connections before the counters are read may add a RST"]
pub fn one_each_way(pair: &Pair) -> Vec<TcpStream> {
    let mut open = inbound(pair, 1);
    let outbound = format!("{}:25", Pair::PEER_V4);
    let remote = serve(&pair.peer, &outbound, 1);
    open.extend(connect_n(&pair.local, &outbound, 1));
    remote.join().expect("test server");
    open
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
    connect_from_within(src, dst, Duration::from_secs(5))
}

/// [`connect_from`], given up after `timeout` (the connect, and writes afterwards).
pub fn connect_from_within(
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we own; TcpStream closes it on drop, on every path below.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(timeout))?; // bounds the connect too
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

/// Connection attempts to `addr`, all at once (a thread each, on the calling thread's
/// namespace), each given up after `timeout`. Connections that succeed are returned open.
pub fn burst(addr: SocketAddr, n: usize, timeout: Duration) -> Vec<io::Result<TcpStream>> {
    let threads: Vec<_> =
        (0..n).map(|_| thread::spawn(move || TcpStream::connect_timeout(&addr, timeout))).collect();
    threads.into_iter().map(|t| t.join().expect("connect thread")).collect()
}

/// What one background action reported.
pub type Outcome = Result<(), String>;

/// An action repeated at a steady rate on a thread inside a namespace, until stopped (or
/// dropped). Each action must bound its own duration.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, Outcome)>>>,
}

impl Traffic {
    pub fn start(
        ns: &Netns,
        every: Duration,
        mut action: impl FnMut() -> Outcome + Send + 'static,
    ) -> Self {
        let name = ns.name.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            enter(&name);
            let mut done = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                done.push((Instant::now(), action()));
                next += every;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            done
        });
        Self { stop, thread: Some(thread) }
    }

    /// Polite SMTP sessions to `addr` (220 greeting, QUIT, 221), one every `every`.
    pub fn sessions(ns: &Netns, addr: &str, every: Duration) -> Self {
        let addr: SocketAddr = addr.parse().expect("socket address");
        Self::start(ns, every, move || match smtp::session(addr, Duration::from_secs(3)) {
            Ok(s) if s.replies == [220, 221] => Ok(()),
            Ok(s) => Err(format!("{addr}: replies {:?}", s.replies)),
            Err(e) => Err(format!("{addr}: {e}")),
        })
    }

    /// Stops and returns every action's start time and outcome.
    pub fn stop(mut self) -> Vec<(Instant, Outcome)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().expect("traffic thread")).unwrap_or_default()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("a background traffic thread panicked");
        }
    }
}

/// Connections made in a loop from the peer to the gateway's port 25 until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    client: thread::JoinHandle<u64>,
    server: thread::JoinHandle<()>,
}

impl Load {
    pub fn start(pair: &Pair) -> Self {
        let addr: SocketAddr = format!("{}:25", Pair::LOCAL_V4).parse().unwrap();
        let listener = in_netns(&pair.local, move || TcpListener::bind(addr).expect("bind"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let server = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let s = stop.clone();
        let client = spawn_in_netns(&pair.peer, move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    n += 1;
                }
            }
            n
        });
        Self { stop, client, server }
    }

    /// Stops, closes the listener, and lets the last packets go by.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.client.join().unwrap();
        self.server.join().unwrap();
        thread::sleep(Duration::from_millis(300));
        n
    }
}
