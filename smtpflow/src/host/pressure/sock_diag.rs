//! The SMTP listeners' accept queues, read with sock_diag (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`, one dump per address family with the state filter `TCP_LISTEN`). For a
//! listening socket the kernel puts the accept queue's length in `idiag_rqueue` and its limit
//! (the listen backlog, capped by `net.core.somaxconn`) in `idiag_wqueue`: what `ss -lnt` shows
//! as Recv-Q and Send-Q.
//!
//! The byte-level work is pure functions ([`request`], [`parse_listeners_reply`]); [`Socket`]
//! only sends and receives. Dumping listeners needs no privilege; the sockets are those of the
//! network namespace the socket was opened in.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use super::ctnetlink::NlError;

/// `NETLINK_SOCK_DIAG` (`linux/netlink.h`).
pub const NETLINK_SOCK_DIAG: i32 = 4;
/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`): the request and its data messages.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` (`enum tcp_state`) and the state filter bit asking for it.
pub const TCP_LISTEN: u8 = 10;
const LISTEN_STATES: u32 = 1 << TCP_LISTEN;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` (72 bytes; attributes may follow, smtpflow reads none).
const MSG_LEN: usize = 72;

const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// The most reply bytes accepted for one dump (about 150 bytes per listening socket).
const MAX_REPLY: usize = 4 << 20;

/// One listening socket's accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    /// Connections waiting to be accepted (`idiag_rqueue`).
    pub queue: u32,
    /// The accept queue's limit, the listen backlog (`idiag_wqueue`).
    pub limit: u32,
}

impl Listener {
    /// Whether the queue is full: the kernel drops new handshakes (counting `ListenOverflows`)
    /// once it holds more than the backlog, so a length at the limit is full for this purpose.
    pub fn is_full(&self) -> bool {
        self.queue > 0 && self.queue >= self.limit
    }

    /// `addr:port`, with IPv6 in brackets.
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.addr, self.port).to_string()
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn malformed<T>(msg: impl Into<String>) -> Result<T, NlError> {
    Err(NlError::Malformed(msg.into()))
}

/// A dump request for the TCP listening sockets of `family` (`AF_INET` or `AF_INET6`).
pub fn request(family: u8, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + REQ_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0; then inet_diag_req_v2.
    b[16] = family;
    b[17] = libc::IPPROTO_TCP as u8;
    // idiag_ext 0 (no attributes), pad 0.
    b[20..24].copy_from_slice(&LISTEN_STATES.to_ne_bytes());
    // inet_diag_sockid all zero: every socket (with the cookie INET_DIAG_NOCOOKIE unneeded
    // for dumps).
    b
}

/// What a buffer of received messages amounts to so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// `NLMSG_DONE` arrived: every listening socket of the reply.
    Complete(Vec<Listener>),
    /// Every message is whole, but `NLMSG_DONE` has not come yet.
    Incomplete,
}

/// One `inet_diag_msg`.
fn parse_msg(body: &[u8]) -> Result<Listener, NlError> {
    if body.len() < MSG_LEN {
        return malformed(format!("inet_diag_msg of {} bytes, expected {MSG_LEN}", body.len()));
    }
    let (family, state) = (body[0], body[1]);
    if state != TCP_LISTEN {
        return malformed(format!("a socket in state {state}, not LISTEN"));
    }
    // inet_diag_sockid at 4: sport (be16), dport (be16), src[16], dst[16], if, cookie[2].
    let port = u16::from_be_bytes([body[4], body[5]]);
    let src: [u8; 16] = body[8..24].try_into().unwrap_or_default();
    let addr = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(src)),
        f => return malformed(format!("address family {f}")),
    };
    let (Some(queue), Some(limit)) = (u32_at(body, 56), u32_at(body, 60)) else {
        return malformed("inet_diag_msg cut short");
    };
    Ok(Listener { addr, port, queue, limit })
}

/// Walks the netlink messages in `buf` (whole datagrams, concatenated) answering dump `seq`.
pub fn scan(buf: &[u8], seq: u32) -> Result<Scan, NlError> {
    let mut listeners = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        let (Some(len), Some(ty), Some(mseq)) = (u32_at(rest, 0), u16_at(rest, 4), u32_at(rest, 8))
        else {
            return malformed(format!("{} stray bytes at the end", rest.len()));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return malformed(format!("message length {len} with {} bytes left", rest.len()));
        }
        if mseq != seq {
            return malformed(format!("reply to request {mseq}, expected {seq}"));
        }
        let body = &rest[NLMSG_HDRLEN..len];
        let next = off + align4(len).min(rest.len());
        match ty {
            NLMSG_NOOP => {}
            NLMSG_ERROR | NLMSG_DONE => {
                let code = match body.get(..4) {
                    Some(c) => i32::from_ne_bytes(c.try_into().unwrap_or_default()),
                    None if ty == NLMSG_DONE => 0,
                    None => return malformed("NLMSG_ERROR without an error code"),
                };
                if code < 0 {
                    return Err(NlError::Kernel(code.saturating_neg()));
                }
                if code > 0 {
                    return malformed(format!("positive error code {code}"));
                }
                if ty == NLMSG_ERROR {
                    return malformed("an acknowledgement instead of the end of the dump");
                }
                if next < buf.len() {
                    return malformed("messages after the end of the dump");
                }
                return Ok(Scan::Complete(listeners));
            }
            NLMSG_OVERRUN => return malformed("NLMSG_OVERRUN"),
            SOCK_DIAG_BY_FAMILY => listeners.push(parse_msg(body)?),
            t => return malformed(format!("unexpected message type {t:#x}")),
        }
        off = next;
    }
    Ok(Scan::Incomplete)
}

/// The complete reply to a listener dump (request `seq`).
pub fn parse_listeners_reply(buf: &[u8], seq: u32) -> Result<Vec<Listener>, NlError> {
    match scan(buf, seq)? {
        Scan::Complete(listeners) => Ok(listeners),
        Scan::Incomplete => malformed("the dump ended without NLMSG_DONE"),
    }
}

/// An open `NETLINK_SOCK_DIAG` socket, in the network namespace it was opened in.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Socket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        };
        if fd < 0 {
            return Err(last_err());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv =
            libc::timeval { tv_sec: 0, tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t };
        // SAFETY: valid option value and length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_err());
        }
        Ok(Self { fd, seq: 0, buf: vec![0; 64 * 1024] })
    }

    /// The TCP listening sockets of one address family.
    pub fn listeners(&mut self, family: u8) -> Result<Vec<Listener>, NlError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let req = request(family, seq);
        // SAFETY: sockaddr_nl is plain data; pid 0 is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid buffer, address and lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(last_err().into());
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut reply = Vec::new();
        loop {
            if Instant::now() >= deadline {
                return Err(NlError::Timeout(REPLY_TIMEOUT));
            }
            // SAFETY: as above.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: valid buffer and address; MSG_TRUNC makes the result the datagram's real
            // length, so a datagram larger than the buffer is detected, not silently cut.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = last_err();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(NlError::Timeout(RECV_TIMEOUT));
                    }
                    _ => return Err(e.into()),
                }
            }
            let n = n as usize;
            if n > self.buf.len() {
                return malformed(format!("a {n}-byte datagram, larger than the buffer"));
            }
            if from.nl_pid != 0 {
                continue; // not from the kernel
            }
            reply.extend_from_slice(&self.buf[..n]);
            if reply.len() > MAX_REPLY {
                return malformed("reply larger than 4 MiB");
            }
            if let Scan::Complete(listeners) = scan(&reply, seq)? {
                return Ok(listeners);
            }
        }
    }

    /// The listeners on `ports`, IPv4 and IPv6, sorted. IPv6 missing from the kernel (its
    /// sock_diag module absent) leaves IPv4's.
    pub fn smtp_listeners(&mut self, ports: &[u16]) -> Result<Vec<Listener>, NlError> {
        let mut out = self.listeners(libc::AF_INET as u8)?;
        match self.listeners(libc::AF_INET6 as u8) {
            Ok(v6) => out.extend(v6),
            Err(NlError::Kernel(e))
                if [libc::ENOENT, libc::EINVAL, libc::EAFNOSUPPORT].contains(&e) => {}
            Err(e) => return Err(e),
        }
        out.retain(|l| ports.contains(&l.port));
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `SOCK_DIAG_BY_FAMILY` data message as the kernel writes it, with the
    /// `INET_DIAG_SHUTDOWN` attribute it always adds after the message.
    pub(crate) fn listener_msg(seq: u32, l: &Listener) -> Vec<u8> {
        let mut body = vec![0u8; MSG_LEN];
        let (family, src) = match l.addr {
            IpAddr::V4(a) => {
                let mut s = [0u8; 16];
                s[..4].copy_from_slice(&a.octets());
                (libc::AF_INET as u8, s)
            }
            IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets()),
        };
        body[0] = family;
        body[1] = TCP_LISTEN;
        body[4..6].copy_from_slice(&l.port.to_be_bytes());
        body[8..24].copy_from_slice(&src);
        body[56..60].copy_from_slice(&l.queue.to_ne_bytes());
        body[60..64].copy_from_slice(&l.limit.to_ne_bytes());
        body.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]); // INET_DIAG_SHUTDOWN = 0
        nlmsg(SOCK_DIAG_BY_FAMILY, seq, &body)
    }

    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, seq, &code.to_ne_bytes())
    }

    fn l(addr: &str, port: u16, queue: u32, limit: u32) -> Listener {
        Listener { addr: addr.parse().unwrap(), port, queue, limit }
    }

    #[test]
    fn request_layout() {
        assert_eq!(NETLINK_SOCK_DIAG, libc::NETLINK_SOCK_DIAG);
        let r = request(libc::AF_INET6 as u8, 7);
        assert_eq!(u32_at(&r, 0), Some(72));
        assert_eq!(u16_at(&r, 4), Some(20));
        assert_eq!(u16_at(&r, 6), Some(0x301));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!((r[16], r[17], r[18]), (10, 6, 0));
        assert_eq!(u32_at(&r, 20), Some(1 << 10));
        assert!(r[24..].iter().all(|b| *b == 0));
    }

    #[test]
    fn listeners_of_a_dump() {
        let want = [l("0.0.0.0", 25, 0, 100), l("::", 587, 129, 128), l("192.0.2.1", 80, 3, 4)];
        let mut buf: Vec<u8> = want.iter().flat_map(|w| listener_msg(3, w)).collect();
        assert_eq!(scan(&buf, 3).unwrap(), Scan::Incomplete);
        buf.extend(done(3, 0));
        assert_eq!(parse_listeners_reply(&buf, 3).unwrap(), want);
        assert!(!want[0].is_full() && want[1].is_full());
        assert_eq!(want[1].endpoint(), "[::]:587");
        // An empty dump: no listener.
        assert_eq!(parse_listeners_reply(&done(4, 0), 4).unwrap(), []);
    }

    #[test]
    fn kernel_errors_and_hostile_replies() {
        assert!(matches!(
            parse_listeners_reply(&done(1, -libc::EINVAL), 1),
            Err(NlError::Kernel(e)) if e == libc::EINVAL
        ));
        let good = [listener_msg(1, &l("0.0.0.0", 25, 1, 10)), done(1, 0)].concat();
        assert!(parse_listeners_reply(&good, 1).is_ok());
        let mut established = listener_msg(1, &l("0.0.0.0", 25, 1, 10));
        established[NLMSG_HDRLEN + 1] = 1;
        let mut family = listener_msg(1, &l("0.0.0.0", 25, 1, 10));
        family[NLMSG_HDRLEN] = 99;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("no DONE", listener_msg(1, &l("0.0.0.0", 25, 1, 10))),
            ("another request", good.clone()),
            ("data after DONE", [good.clone(), listener_msg(1, &l("::", 25, 0, 1))].concat()),
            (
                "short message",
                [nlmsg(SOCK_DIAG_BY_FAMILY, 1, &[10, 10, 0, 0]), done(1, 0)].concat(),
            ),
            ("not LISTEN", [established, done(1, 0)].concat()),
            ("unknown family", [family, done(1, 0)].concat()),
            ("overrun", nlmsg(NLMSG_OVERRUN, 1, &[])),
            ("other type", [nlmsg(21, 1, &[0; 72]), done(1, 0)].concat()),
            ("ack", nlmsg(NLMSG_ERROR, 1, &[0; 20])),
            ("positive error", done(1, 5)),
            ("stray bytes", [good.clone(), vec![1, 2, 3]].concat()),
        ];
        for (what, buf) in cases {
            let seq = if what == "another request" { 2 } else { 1 };
            assert!(parse_listeners_reply(&buf, seq).is_err(), "{what}");
        }
        for i in 0..good.len() {
            assert!(parse_listeners_reply(&good[..i], 1).is_err(), "cut at {i}");
        }
    }

    /// The real socket in the test's own namespace: a listener with backlog 3 and two
    /// connections not accepted shows queue 2 and limit 3.
    #[test]
    fn live_listener_queue() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // std listens with a backlog of 128; listen again with 3 (allowed: it updates it).
        // SAFETY: plain syscall on a socket we own.
        assert_eq!(unsafe { libc::listen(server.as_raw_fd(), 3) }, 0);
        let _a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut socket = match Socket::open() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("SKIPPED: no NETLINK_SOCK_DIAG socket here: {e}");
                return;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let got = socket.smtp_listeners(&[port]).unwrap();
            if got == [l("127.0.0.1", port, 2, 3)] || Instant::now() > deadline {
                assert_eq!(got, [l("127.0.0.1", port, 2, 3)]);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
