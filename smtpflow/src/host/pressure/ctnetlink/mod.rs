//! A small `NETLINK_NETFILTER` client for ctnetlink's statistics: the per-CPU counters
//! (`IPCTNL_MSG_CT_GET_STATS_CPU`, a dump with one message per possible CPU) and the table fill
//! (`IPCTNL_MSG_CT_GET_STATS`: entries, and the limit on kernels that send it). This works where
//! a kernel is built without `/proc/net/stat/nf_conntrack`.
//!
//! The byte-level work is pure functions ([`request`], [`parse_cpu_stats_reply`],
//! [`parse_global_reply`], [`parse_attrs`]); [`Socket`] only sends and receives.
mod wire;

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

pub use wire::*;
use wire::{NLM_F_ACK, NLM_F_DUMP, Scan, malformed, scan};

const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// The most reply bytes accepted for one request (a few hundred bytes per CPU are expected).
const MAX_REPLY: usize = 4 << 20;

/// An open `NETLINK_NETFILTER` socket, in the network namespace it was opened in.
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
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
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

    /// Sends one request and collects the kernel's datagrams until the reply is complete.
    /// Returns the request's sequence number and the reply bytes.
    fn transact(&mut self, msg: u8, flags: u16) -> Result<(u32, Vec<u8>), NlError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let req = request(msg, flags, seq);
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
            if let Scan::Complete(_) = scan(&reply, seq, msg)? {
                return Ok((seq, reply));
            }
        }
    }

    /// The per-CPU statistics, summed.
    pub fn cpu_stats(&mut self) -> Result<BTreeMap<&'static str, u64>, NlError> {
        let (seq, reply) = self.transact(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP)?;
        parse_cpu_stats_reply(&reply, seq)
    }

    /// Entries in the table, and its limit where the kernel sends it.
    pub fn global(&mut self) -> Result<Global, NlError> {
        let (seq, reply) = self.transact(IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK)?;
        parse_global_reply(&reply, seq)
    }
}
