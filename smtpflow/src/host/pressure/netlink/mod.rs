//! The netlink plumbing of smtpflow's netlink clients ([`super::sock_diag`],
//! [`super::ctnetlink`]): a [`Socket`] that sends one request and collects the kernel's reply,
//! and, in `wire`, the framing they share: the error type [`NlError`], the request header
//! ([`put_request_header`]) and the walk over a reply's messages ([`walk`]). What a request asks
//! and what its data messages hold stays with each client.
mod wire;

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

pub use wire::*;

/// How long one request may take in all, and the longest wait for one datagram.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// The most reply bytes accepted for one request (a listener dump takes about 150 bytes a
/// listening socket, ctnetlink's per-CPU statistics a few hundred bytes a CPU).
const MAX_REPLY: usize = 4 << 20;

/// An open netlink socket of one protocol, in the network namespace it was opened in.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Socket {
    /// A socket of netlink `protocol` (`NETLINK_SOCK_DIAG`, `NETLINK_NETFILTER`), bound to a
    /// port id the kernel chooses (what sending from an unbound socket would do anyway), with
    /// a receive timeout.
    pub fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol)
        };
        if fd < 0 {
            return Err(last_err());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zero but the family binds to a kernel-chosen id.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid address and length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_err());
        }
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

    /// The sequence number for the next request (never 0).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends `req` to the kernel and collects the kernel's datagrams, concatenated, until
    /// `is_whole` says they are the whole reply (or fails on them): the reply bytes.
    pub fn transact(
        &mut self,
        req: &[u8],
        mut is_whole: impl FnMut(&[u8]) -> Result<bool, NlError>,
    ) -> Result<Vec<u8>, NlError> {
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
            if is_whole(&reply)? {
                return Ok(reply);
            }
        }
    }
}
