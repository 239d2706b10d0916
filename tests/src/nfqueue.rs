//! A small NFQUEUE client (the `nfnetlink_queue` protocol over a raw `NETLINK_NETFILTER` socket)
//! that holds queued packets for a set time and then releases them with `NF_ACCEPT`: added delay
//! on a kernel without netem.
//!
//! This kernel has `nfnetlink_queue` and the xtables `NFQUEUE` target but no nftables `queue`
//! expression (`CONFIG_NFT_QUEUE` is off), so the rule that feeds the queue is an `iptables-nft`
//! rule (see [`crate::netfilter::queue_syns`]). Without a bound listener, queued packets are
//! dropped, so bind (start the holder) before adding the rule.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{Netns, in_netns};

// include/uapi/linux/netfilter/nfnetlink.h and nfnetlink_queue.h
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFNETLINK_V0: u8 = 0;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NF_ACCEPT: u32 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// One packet the holder received and released.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The queue's packet id.
    pub id: u32,
    /// TCP ports and flags, when the payload was an IPv4 TCP segment.
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// How long it was held: from its receipt (after the kernel queued it) to just before the
    /// verdict was sent (before it could go on), so a lower bound of the delay it got.
    pub held: Duration,
}

/// Holds every packet of one queue in a namespace for `delay`, then accepts it. Stopped (and any
/// packet still held released) on [`Holder::finish`] or drop.
pub struct Holder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Vec<Held>>>>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An nfnetlink message of the queue subsystem: header, `nfgenmsg` and attributes.
fn message(msg_type: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; NLMSG_HDRLEN];
    b.extend_from_slice(&[libc::AF_UNSPEC as u8, NFNETLINK_V0]);
    b.extend_from_slice(&queue.to_be_bytes());
    for (ty, data) in attrs {
        b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(data);
        b.resize(align4(b.len()), 0);
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg_type).to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl is valid; pid 0 is the kernel.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Receives one datagram (up to the socket's receive timeout); `Ok(None)` on timeout.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: valid buffer.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// The netlink messages in a datagram: (type, whole message).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        out.push((ty, &buf[off..off + len]));
        off += align4(len);
    }
    out
}

/// The attributes of an nfnetlink message: (type, data).
fn attributes(msg: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = NLMSG_HDRLEN + NFGENMSG_LEN;
    while off + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[off], msg[off + 1]]));
        let ty = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > msg.len() {
            break;
        }
        out.push((ty, &msg[off + 4..off + len]));
        off += align4(len);
    }
    out
}

/// Sends a request with NLM_F_ACK and waits (bounded) for the kernel's answer.
fn request(fd: &OwnedFd, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> io::Result<()> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    send(fd, &message(NFQNL_MSG_CONFIG, flags, seq, queue, attrs))?;
    let mut buf = vec![0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Some(n) = recv(fd, &mut buf)? else { continue };
        for (ty, msg) in messages(&buf[..n]) {
            let msg_seq = u32::from_ne_bytes(msg[8..12].try_into().unwrap());
            if ty == libc::NLMSG_ERROR as u16 && msg_seq == seq && msg.len() >= NLMSG_HDRLEN + 4 {
                let err = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
                return if err == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-err)) };
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no answer from nfnetlink_queue"))
}

fn verdict(fd: &OwnedFd, queue: u16, id: u32) -> io::Result<()> {
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    send(
        fd,
        &message(
            NFQNL_MSG_VERDICT,
            libc::NLM_F_REQUEST as u16,
            0,
            queue,
            &[(NFQA_VERDICT_HDR, &hdr)],
        ),
    )
}

/// Ports and flags of an IPv4 TCP packet (the queue's payload starts at the IP header).
fn tcp_of(ip: &[u8]) -> (u16, u16, u8) {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return (0, 0, 0);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    match ip.get(ihl..ihl + 14) {
        Some(t) => (u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]), t[13]),
        None => (0, 0, 0),
    }
}

fn open(queue: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket syscall.
    let raw = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER)
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval { tv_sec: 0, tv_usec: 2_000 };
    // SAFETY: valid option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    // Bind the queue (pf 0: the per-family bind commands are no-ops on current kernels), then
    // ask for whole packets.
    request(&fd, 1, queue, &[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])])?;
    let mut params = [0u8; 5];
    params[..4].copy_from_slice(&0xffffu32.to_be_bytes());
    params[4] = NFQNL_COPY_PACKET;
    request(&fd, 2, queue, &[(NFQA_CFG_PARAMS, &params)])?;
    Ok(fd)
}

impl Holder {
    /// Binds queue `queue` in `ns` (panics if that fails) and holds its packets for `delay`.
    pub fn start(ns: &Netns, queue: u16, delay: Duration) -> Self {
        let fd = in_netns(ns, move || open(queue))
            .unwrap_or_else(|e| panic!("binding NFQUEUE {queue}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || -> io::Result<Vec<Held>> {
            let mut buf = vec![0u8; 65536];
            let mut pending: Vec<(Instant, Held)> = Vec::new();
            let mut done = Vec::new();
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                let now = Instant::now();
                let mut i = 0;
                while i < pending.len() {
                    if stopping || now.duration_since(pending[i].0) >= delay {
                        let (at, mut h) = pending.swap_remove(i);
                        // Measured before the verdict: the packet may be processed (and
                        // answered) within the send itself.
                        h.held = at.elapsed();
                        verdict(&fd, queue, h.id)?;
                        done.push(h);
                    } else {
                        i += 1;
                    }
                }
                if stopping {
                    let _ =
                        request(&fd, 3, queue, &[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])]);
                    done.sort_by_key(|h| h.id);
                    return Ok(done);
                }
                let Some(n) = recv(&fd, &mut buf)? else { continue };
                let at = Instant::now();
                for (ty, msg) in messages(&buf[..n]) {
                    if ty != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                        continue;
                    }
                    let mut held = Held {
                        id: 0,
                        src_port: 0,
                        dst_port: 0,
                        tcp_flags: 0,
                        held: Duration::ZERO,
                    };
                    let mut has_id = false;
                    for (aty, data) in attributes(msg) {
                        match aty {
                            NFQA_PACKET_HDR if data.len() >= 4 => {
                                held.id = u32::from_be_bytes(data[..4].try_into().unwrap());
                                has_id = true;
                            }
                            NFQA_PAYLOAD => {
                                (held.src_port, held.dst_port, held.tcp_flags) = tcp_of(data);
                            }
                            _ => {}
                        }
                    }
                    if has_id {
                        pending.push((at, held));
                    }
                }
            }
        });
        Self { stop, thread: Some(thread) }
    }

    /// Releases whatever is still held, unbinds, and returns every packet held, by id.
    pub fn finish(mut self) -> Vec<Held> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(held))) => held,
            Some(Ok(Err(e))) => panic!("NFQUEUE holder failed: {e}"),
            Some(Err(_)) => panic!("NFQUEUE holder thread panicked"),
            None => Vec::new(),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The loop wakes every 2 ms (receive timeout), so this join is short.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_messages() {
        let m =
            message(NFQNL_MSG_VERDICT, 1, 7, 5, &[(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 9])]);
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (3 << 8) | 1);
        assert_eq!(&m[18..20], &5u16.to_be_bytes());
        let msgs = messages(&m);
        assert_eq!(msgs.len(), 1);
        let attrs = attributes(msgs[0].1);
        assert_eq!(attrs, vec![(NFQA_VERDICT_HDR, &[0u8, 0, 0, 1, 0, 0, 0, 9][..])]);
        // An odd-length attribute is padded, and the next one still parses.
        let m = message(NFQNL_MSG_CONFIG, 1, 1, 0, &[(2, &[1, 2, 3, 4, 5]), (1, &[7, 0, 0, 0])]);
        let attrs = attributes(&m);
        assert_eq!(attrs, vec![(2, &[1u8, 2, 3, 4, 5][..]), (1, &[7u8, 0, 0, 0][..])]);
    }
}
