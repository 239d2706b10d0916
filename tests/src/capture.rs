//! An independent packet capture (AF_PACKET) used as the oracle where the exact number of
//! packets depends on the kernel's TCP timers (zero-window probes): what smtpflow counted must
//! equal what crossed the wire.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

use crate::{Netns, in_netns};

/// Frames received on an interface (not the ones it sent), captured on a thread until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str) -> Self {
        let ifname = ifname.to_owned();
        let fd = in_netns(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket syscalls with valid arguments.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let name = std::ffi::CString::new(ifname).unwrap();
                let index = libc::if_nametoindex(name.as_ptr());
                assert!(index != 0, "no interface {name:?}");
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
                let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
                let size: libc::c_int = 8 << 20;
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&raw const size).cast(),
                    4,
                );
                fd
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: valid buffer and address pointers.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&raw mut from).cast(),
                        &mut len,
                    )
                };
                if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops capturing and returns the frames received.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("capture thread")).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A TCP segment read straight from an untagged Ethernet/IPv4 frame (the oracle's own parser).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
    pub window: u16,
}

pub fn ipv4_tcp(frame: &[u8]) -> Option<Seen> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    tcp_at(frame, 14 + ihl)
}

/// The TCP header at `at`, if the frame holds all 20 bytes of it.
fn tcp_at(frame: &[u8], at: usize) -> Option<Seen> {
    let t = frame.get(at..at + 20)?;
    Some(Seen {
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        flags: t[13],
        window: u16::from_be_bytes([t[14], t[15]]),
    })
}

/// A TCP segment read straight from an untagged Ethernet frame, IPv4 or IPv6 (no extension
/// headers), with its family (4 or 6).
pub fn tcp(frame: &[u8]) -> Option<(u8, Seen)> {
    if let Some(seen) = ipv4_tcp(frame) {
        return Some((4, seen));
    }
    if frame.get(12..14)? != [0x86, 0xdd] || *frame.get(20)? != 6 {
        return None;
    }
    Some((6, tcp_at(frame, 14 + 40)?))
}

/// An ICMP destination unreachable (IPv4 type 3, or ICMPv6 type 1) read straight from an
/// untagged Ethernet frame, and the TCP ports of the segment it quotes (the oracle's own
/// parser: no options or extension headers in the outer IPv6 header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    /// 4 or 6.
    pub family: u8,
    pub code: u8,
    /// The quoted segment's ports: for an answer to our SYN, our port and the remote's.
    pub src_port: u16,
    pub dst_port: u16,
}

pub fn unreachable(frame: &[u8]) -> Option<Unreachable> {
    let ethertype = frame.get(12..14)?;
    let (family, icmp, kind) = if ethertype == [0x08, 0x00] {
        if *frame.get(23)? != 1 {
            return None;
        }
        (4, 14 + usize::from(frame.get(14)? & 0x0f) * 4, 3)
    } else if ethertype == [0x86, 0xdd] {
        if *frame.get(20)? != 58 {
            return None;
        }
        (6, 14 + 40, 1)
    } else {
        return None;
    };
    let head = frame.get(icmp..icmp + 2)?;
    if head[0] != kind {
        return None;
    }
    let inner = icmp + 8;
    let tcp = if family == 4 {
        if *frame.get(inner + 9)? != 6 {
            return None;
        }
        inner + usize::from(frame.get(inner)? & 0x0f) * 4
    } else {
        if *frame.get(inner + 6)? != 6 {
            return None;
        }
        inner + 40
    };
    let t = frame.get(tcp..tcp + 4)?;
    Some(Unreachable {
        family,
        code: head[1],
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
    })
}
