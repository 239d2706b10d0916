//! Netlink replies as the kernel writes them, built by hand for the tests of smtpflow's netlink
//! parsers (`host::pressure::{netlink, sock_diag, ctnetlink}`, its unit tests and property
//! tests): whole messages, the terminators, attributes, and the data messages of sock_diag and
//! ctnetlink. The numbers are written out from the uapi headers rather than taken from
//! smtpflow, so a wrong constant there fails its tests.
use std::net::IpAddr;

/// `NLMSG_ERROR` and `NLMSG_DONE` (`linux/netlink.h`).
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_MULTI`: a message of a dump.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_CAPPED`: an `NLMSG_ERROR` carrying only the request's header.
pub const NLM_F_CAPPED: u16 = 0x100;
/// The port id the kernel addresses its replies to: the client's (the parsers do not read it).
const PORT_ID: u32 = 0x1234;

/// One message: `nlmsghdr` (its length, `ty`, `flags`, `seq`), then `body`, padded to 4 bytes.
pub fn message(ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&PORT_ID.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

/// `NLMSG_DONE` with `code` (0, or a negative errno): the end of a dump.
pub fn done(seq: u32, code: i32) -> Vec<u8> {
    message(NLMSG_DONE, NLM_F_MULTI, seq, &code.to_ne_bytes())
}

/// An acknowledgement: `NLMSG_ERROR` with code 0, then the request's header (zeroes here).
pub fn ack(seq: u32) -> Vec<u8> {
    message(NLMSG_ERROR, NLM_F_CAPPED, seq, &[0; 20])
}

/// One attribute (`struct nlattr`): its length, `ty`, then `value`, padded to 4 bytes.
pub fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

/// A ctnetlink data message of type `ty` (`NFNL_SUBSYS_CTNETLINK << 8 | msg`): `nfgenmsg`, then
/// one big-endian 32-bit attribute for each counter, as the kernel sends its statistics.
pub fn ctnetlink_counters(ty: u16, seq: u32, counters: &[(u16, u32)]) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    for &(t, v) in counters {
        body.extend(attr(t, &v.to_be_bytes()));
    }
    message(ty, NLM_F_MULTI, seq, &body)
}

/// A `SOCK_DIAG_BY_FAMILY` (20) message for a TCP listening socket (state `TCP_LISTEN`, 10) on
/// `addr` and `port`: `inet_diag_msg` with the accept queue's length and limit (`idiag_rqueue`,
/// `idiag_wqueue`), then the `INET_DIAG_SHUTDOWN` attribute the kernel always adds, then `attrs`.
pub fn inet_diag_listener(
    seq: u32,
    addr: IpAddr,
    port: u16,
    queue: u32,
    limit: u32,
    attrs: &[u8],
) -> Vec<u8> {
    let mut body = vec![0u8; 72];
    let (family, src) = match addr {
        IpAddr::V4(a) => {
            let mut s = [0u8; 16];
            s[..4].copy_from_slice(&a.octets());
            (libc::AF_INET as u8, s)
        }
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets()),
    };
    body[0] = family;
    body[1] = 10;
    body[4..6].copy_from_slice(&port.to_be_bytes());
    body[8..24].copy_from_slice(&src);
    body[56..60].copy_from_slice(&queue.to_ne_bytes());
    body[60..64].copy_from_slice(&limit.to_ne_bytes());
    body.extend(attr(8, &[0]));
    body.extend_from_slice(attrs);
    message(20, NLM_F_MULTI, seq, &body)
}
