//! The SMTP listeners' accept queues, read with sock_diag (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`, one dump per address family with the state filter `TCP_LISTEN`). For a
//! listening socket the kernel puts the accept queue's length in `idiag_rqueue` and its limit
//! (the listen backlog, capped by `net.core.somaxconn`) in `idiag_wqueue`: what `ss -lnt` shows
//! as Recv-Q and Send-Q.
//!
//! The byte-level work is pure functions ([`request`], [`parse_listeners_reply`]); [`Socket`]
//! only sends and receives, through [`super::netlink`], which also walks the netlink messages
//! of a reply. Dumping listeners needs no privilege; the sockets are those of the network
//! namespace the socket was opened in.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::netlink::{self, End, NLM_F_DUMP, NLMSG_HDRLEN, NlError, Walk, malformed, u32_at};

/// `NETLINK_SOCK_DIAG` (`linux/netlink.h`).
pub const NETLINK_SOCK_DIAG: i32 = 4;
/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`): the request and its data messages.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` (`enum tcp_state`) and the state filter bit asking for it.
pub const TCP_LISTEN: u8 = 10;
const LISTEN_STATES: u32 = 1 << TCP_LISTEN;

/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` (72 bytes; attributes may follow, smtpflow reads none).
const MSG_LEN: usize = 72;

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

/// A dump request for the TCP listening sockets of `family` (`AF_INET` or `AF_INET6`).
pub fn request(family: u8, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + REQ_LEN];
    netlink::put_request_header(&mut b, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, seq);
    // Then inet_diag_req_v2.
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
    let walk = netlink::walk(buf, seq, SOCK_DIAG_BY_FAMILY, End::Dump, |body| {
        listeners.push(parse_msg(body)?);
        Ok(())
    })?;
    Ok(match walk {
        Walk::Complete => Scan::Complete(listeners),
        Walk::Incomplete => Scan::Incomplete,
    })
}

/// The complete reply to a listener dump (request `seq`).
pub fn parse_listeners_reply(buf: &[u8], seq: u32) -> Result<Vec<Listener>, NlError> {
    match scan(buf, seq)? {
        Scan::Complete(listeners) => Ok(listeners),
        Scan::Incomplete => malformed("the dump ended without NLMSG_DONE"),
    }
}

/// An open `NETLINK_SOCK_DIAG` socket, in the network namespace it was opened in.
pub struct Socket(netlink::Socket);

impl Socket {
    pub fn open() -> io::Result<Self> {
        netlink::Socket::open(NETLINK_SOCK_DIAG).map(Self)
    }

    /// The TCP listening sockets of one address family.
    pub fn listeners(&mut self, family: u8) -> Result<Vec<Listener>, NlError> {
        let seq = self.0.next_seq();
        let reply = self
            .0
            .transact(&request(family, seq), |r| Ok(matches!(scan(r, seq)?, Scan::Complete(_))))?;
        parse_listeners_reply(&reply, seq)
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
    use std::{
        os::fd::AsRawFd as _,
        time::{Duration, Instant},
    };

    use smtpflow_tests::netlink::{ack, done, inet_diag_listener, message};

    use super::*;
    use crate::host::pressure::netlink::{NLMSG_OVERRUN, u16_at};

    /// A `SOCK_DIAG_BY_FAMILY` data message for `l`, as the kernel writes it.
    fn listener_msg(seq: u32, l: &Listener) -> Vec<u8> {
        inet_diag_listener(seq, l.addr, l.port, l.queue, l.limit, &[])
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
                [message(SOCK_DIAG_BY_FAMILY, 2, 1, &[10, 10, 0, 0]), done(1, 0)].concat(),
            ),
            ("not LISTEN", [established, done(1, 0)].concat()),
            ("unknown family", [family, done(1, 0)].concat()),
            ("overrun", message(NLMSG_OVERRUN, 0, 1, &[])),
            ("other type", [message(21, 2, 1, &[0; 72]), done(1, 0)].concat()),
            ("ack", ack(1)),
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
