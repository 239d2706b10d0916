//! The netlink framing smtpflow's netlink clients share, as pure functions over bytes: the
//! request header, and the walk over a reply's messages (`nlmsghdr`, the sequence number, and
//! the control messages `NLMSG_NOOP`, `NLMSG_ERROR`, `NLMSG_DONE` and `NLMSG_OVERRUN`). What is
//! inside a data message is the protocol's business ([`super::super::sock_diag`],
//! [`super::super::ctnetlink`]). Constants are those of `include/uapi/linux/netlink.h`.
use std::{io, time::Duration};

/// Netlink control messages and flags (`linux/netlink.h`).
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub const NLMSG_HDRLEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The kernel answered with an error (a positive errno).
    #[error("the kernel answered: {}", io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
}

pub fn malformed<T>(msg: impl Into<String>) -> Result<T, NlError> {
    Err(NlError::Malformed(msg.into()))
}

pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Writes the `nlmsghdr` of a request at the start of `req` (the whole request): its length,
/// `ty`, `NLM_F_REQUEST | flags` and `seq`; the port id stays 0 (the kernel fills in ours).
pub fn put_request_header(req: &mut [u8], ty: u16, flags: u16, seq: u32) {
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&ty.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
}

/// How a reply ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A dump: `NLMSG_DONE` only; an acknowledgement (`NLMSG_ERROR` with code 0) is malformed.
    Dump,
    /// `NLMSG_DONE` or an acknowledgement, whichever comes.
    DoneOrAck,
}

impl End {
    /// What the terminator ends, in error messages.
    fn what(self) -> &'static str {
        match self {
            Self::Dump => "dump",
            Self::DoneOrAck => "reply",
        }
    }
}

/// What a buffer of received messages amounts to so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// The terminator arrived, and nothing after it.
    Complete,
    /// Every message is whole, but the terminator has not come yet.
    Incomplete,
}

/// Walks the netlink messages in `buf` (whole datagrams, concatenated) answering request `seq`,
/// giving the body of each data message (type `data_type`) to `on_data`, in order. Another type,
/// another request's message, a kernel error, an overrun or a message cut short is an error.
pub fn walk<'a>(
    buf: &'a [u8],
    seq: u32,
    data_type: u16,
    end: End,
    mut on_data: impl FnMut(&'a [u8]) -> Result<(), NlError>,
) -> Result<Walk, NlError> {
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
                    // An old kernel's NLMSG_DONE may carry nothing.
                    None if ty == NLMSG_DONE => 0,
                    None => return malformed("NLMSG_ERROR without an error code"),
                };
                if code < 0 {
                    return Err(NlError::Kernel(code.saturating_neg()));
                }
                if code > 0 {
                    return malformed(format!("positive error code {code}"));
                }
                if ty == NLMSG_ERROR && end == End::Dump {
                    return malformed("an acknowledgement instead of the end of the dump");
                }
                if next < buf.len() {
                    return malformed(format!("messages after the end of the {}", end.what()));
                }
                return Ok(Walk::Complete);
            }
            NLMSG_OVERRUN => return malformed("NLMSG_OVERRUN"),
            t if t == data_type => on_data(body)?,
            t => return malformed(format!("unexpected message type {t:#x}")),
        }
        off = next;
    }
    Ok(Walk::Incomplete)
}

#[cfg(test)]
mod tests {
    use smtpflow_tests::netlink::{ack, done, message};

    use super::*;

    const DATA: u16 = 0x104;

    /// The data message bodies of a walk, or its error's text.
    fn bodies(buf: &[u8], seq: u32, end: End) -> Result<(Walk, Vec<Vec<u8>>), String> {
        let mut out = Vec::new();
        walk(buf, seq, DATA, end, |b| {
            out.push(b.to_vec());
            Ok(())
        })
        .map(|w| (w, out))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn constants_match_the_uapi_headers() {
        assert_eq!(NLM_F_REQUEST, libc::NLM_F_REQUEST as u16);
        assert_eq!(NLM_F_DUMP, (libc::NLM_F_ROOT | libc::NLM_F_MATCH) as u16);
        assert_eq!(NLM_F_ACK, libc::NLM_F_ACK as u16);
        assert_eq!(NLMSG_NOOP, libc::NLMSG_NOOP as u16);
        assert_eq!(NLMSG_ERROR, libc::NLMSG_ERROR as u16);
        assert_eq!(NLMSG_DONE, libc::NLMSG_DONE as u16);
        assert_eq!(NLMSG_OVERRUN, libc::NLMSG_OVERRUN as u16);
        let mut r = [0xffu8; 20];
        put_request_header(&mut r, 0x0105, NLM_F_ACK, 9);
        assert_eq!(u32_at(&r, 0), Some(20));
        assert_eq!(u16_at(&r, 4), Some(0x0105));
        assert_eq!(u16_at(&r, 6), Some(0x0005));
        assert_eq!(u32_at(&r, 8), Some(9));
    }

    #[test]
    fn data_in_order_then_the_terminator() {
        let mut buf = [message(DATA, 2, 5, &[1]), message(NLMSG_NOOP, 0, 5, &[])].concat();
        buf.extend(message(DATA, 2, 5, &[2, 3, 4, 5, 6]));
        assert_eq!(
            bodies(&buf, 5, End::Dump),
            Ok((Walk::Incomplete, vec![vec![1], vec![2, 3, 4, 5, 6]]))
        );
        // The bodies keep their padding off: `nlmsg_len` says where each ends.
        for end in [End::Dump, End::DoneOrAck] {
            let whole = [buf.clone(), done(5, 0)].concat();
            assert_eq!(bodies(&whole, 5, end).unwrap().0, Walk::Complete);
            // An old kernel's NLMSG_DONE without a code.
            let bare = [buf.clone(), message(NLMSG_DONE, 2, 5, &[])].concat();
            assert_eq!(bodies(&bare, 5, end).unwrap().0, Walk::Complete);
        }
        assert_eq!(bodies(&[], 5, End::Dump), Ok((Walk::Incomplete, vec![])));
    }

    /// An acknowledgement ends a reply that may end with one, and is malformed in a dump; what
    /// follows the terminator is named after what it ended.
    #[test]
    fn acknowledgements_and_what_follows_the_end() {
        let buf = [message(DATA, 0, 3, &[7]), ack(3)].concat();
        assert_eq!(bodies(&buf, 3, End::DoneOrAck).unwrap().0, Walk::Complete);
        assert_eq!(
            bodies(&buf, 3, End::Dump).unwrap_err(),
            "malformed netlink reply: an acknowledgement instead of the end of the dump"
        );
        let after = [done(3, 0), message(DATA, 2, 3, &[])].concat();
        assert_eq!(
            bodies(&after, 3, End::Dump).unwrap_err(),
            "malformed netlink reply: messages after the end of the dump"
        );
        assert_eq!(
            bodies(&after, 3, End::DoneOrAck).unwrap_err(),
            "malformed netlink reply: messages after the end of the reply"
        );
    }

    #[test]
    fn kernel_errors_and_hostile_replies() {
        for end in [End::Dump, End::DoneOrAck] {
            let err = message(NLMSG_ERROR, 0, 1, &(-libc::EPERM).to_ne_bytes());
            assert!(matches!(
                walk(&err, 1, DATA, end, |_| Ok(())),
                Err(NlError::Kernel(e)) if e == libc::EPERM
            ));
            assert!(matches!(
                walk(&done(1, -libc::EINVAL), 1, DATA, end, |_| Ok(())),
                Err(NlError::Kernel(e)) if e == libc::EINVAL
            ));
            // The callback's error stops the walk.
            let failing =
                walk(&[message(DATA, 2, 1, &[]), done(1, 0)].concat(), 1, DATA, end, |_| {
                    malformed("refused")
                });
            assert_eq!(failing.unwrap_err().to_string(), "malformed netlink reply: refused");
            let good = [message(DATA, 2, 1, &[1, 2, 3, 4]), done(1, 0)].concat();
            let cases: [(&str, Vec<u8>); 8] = [
                ("reply to request 2, expected 1", [message(DATA, 2, 2, &[]), done(1, 0)].concat()),
                ("NLMSG_OVERRUN", message(NLMSG_OVERRUN, 0, 1, &[])),
                ("unexpected message type 0x105", message(0x105, 2, 1, &[])),
                ("positive error code 5", done(1, 5)),
                ("NLMSG_ERROR without an error code", message(NLMSG_ERROR, 0, 1, &[])),
                ("message length 0 with 16 bytes left", vec![0; 16]),
                ("message length 255 with 40 bytes left", {
                    let mut m = good.clone();
                    m[0] = 0xff;
                    m
                }),
                ("3 stray bytes at the end", [message(DATA, 2, 1, &[]), vec![1, 2, 3]].concat()),
            ];
            for (want, buf) in cases {
                assert_eq!(
                    bodies(&buf, 1, end).unwrap_err(),
                    format!("malformed netlink reply: {want}"),
                    "{end:?}"
                );
            }
        }
    }
}
