//! The ctnetlink wire format: the two requests and the parsing of their replies, as pure
//! functions over bytes; the netlink framing around them is [`super::super::netlink`]'s.
//! Constants are those of `include/uapi/linux/netfilter/nfnetlink_conntrack.h` and
//! `nfnetlink.h`; the tests check them against captures of this kernel's replies.
use std::collections::BTreeMap;

use crate::host::pressure::netlink::{
    self, End, NLMSG_HDRLEN, NlError, Walk, align4, malformed, u16_at,
};

/// `NFNL_SUBSYS_CTNETLINK`: the high byte of a ctnetlink message type.
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `enum cntl_msg_types`.
pub const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
pub const IPCTNL_MSG_CT_GET_STATS: u8 = 5;

/// `enum ctattr_stats_cpu` (the ones smtpflow reads).
pub const CTA_STATS_INVALID: u16 = 4;
pub const CTA_STATS_INSERT_FAILED: u16 = 9;
pub const CTA_STATS_DROP: u16 = 10;
pub const CTA_STATS_EARLY_DROP: u16 = 11;
pub const CTA_STATS_SEARCH_RESTART: u16 = 13;
/// `enum ctattr_stats_global`.
pub const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
pub const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

/// `NLA_TYPE_MASK`: the attribute type without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `struct nfgenmsg`: family, version, resource id (the CPU, in per-CPU replies).
const NFGENMSG_LEN: usize = 4;

/// The per-CPU attributes summed, by their [`super::CONNTRACK_STATS`] name.
const CPU_STATS: [(u16, &str); 5] = [
    (CTA_STATS_DROP, "drop"),
    (CTA_STATS_EARLY_DROP, "early_drop"),
    (CTA_STATS_INSERT_FAILED, "insert_failed"),
    (CTA_STATS_INVALID, "invalid"),
    (CTA_STATS_SEARCH_RESTART, "search_restart"),
];

/// A ctnetlink request: `nlmsghdr` + `nfgenmsg` (`AF_UNSPEC`, version 0), no attributes.
pub fn request(msg: u8, flags: u16, seq: u32) -> [u8; NLMSG_HDRLEN + NFGENMSG_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    netlink::put_request_header(&mut b, message_type(msg), flags, seq);
    // nfgenmsg all zero.
    b
}

/// The netlink message type of ctnetlink message `msg`, in requests and their data messages.
fn message_type(msg: u8) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | u16::from(msg)
}

/// What a buffer of received messages amounts to so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scan<'a> {
    /// The terminator (`NLMSG_DONE` or the acknowledgement) arrived: the attribute bytes (after
    /// `nfgenmsg`) of every data message.
    Complete(Vec<&'a [u8]>),
    /// Every message is whole, but the terminator has not come yet.
    Incomplete,
}

/// Walks the netlink messages in `buf` (whole datagrams, concatenated) that answer request `seq`
/// for ctnetlink message `msg`. The reply ends with `NLMSG_DONE` or the acknowledgement.
pub(super) fn scan(buf: &[u8], seq: u32, msg: u8) -> Result<Scan<'_>, NlError> {
    let mut payloads = Vec::new();
    let walk = netlink::walk(buf, seq, message_type(msg), End::DoneOrAck, |body| {
        let Some(attrs) = body.get(align4(NFGENMSG_LEN)..) else {
            return malformed("data message shorter than nfgenmsg");
        };
        payloads.push(attrs);
        Ok(())
    })?;
    Ok(match walk {
        Walk::Complete => Scan::Complete(payloads),
        Walk::Incomplete => Scan::Incomplete,
    })
}

/// Netlink attributes (`struct nlattr`, 4-byte aligned) as `(type, payload)`, flag bits masked
/// off the type.
pub fn parse_attrs(b: &[u8]) -> Result<Vec<(u16, &[u8])>, NlError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < b.len() {
        let rest = &b[off..];
        let (Some(len), Some(ty)) = (u16_at(rest, 0), u16_at(rest, 2)) else {
            return malformed(format!("{} stray bytes after the attributes", rest.len()));
        };
        let len = usize::from(len);
        if len < 4 || len > rest.len() {
            return malformed(format!("attribute length {len} with {} bytes left", rest.len()));
        }
        out.push((ty & NLA_TYPE_MASK, &rest[4..len]));
        off += align4(len).min(rest.len());
    }
    Ok(out)
}

/// A big-endian counter attribute: `be32` (what the kernel sends) or `be64`.
fn be_uint(ty: u16, v: &[u8]) -> Result<u64, NlError> {
    match v.len() {
        4 => Ok(u64::from(u32::from_be_bytes(v.try_into().unwrap_or_default()))),
        8 => Ok(u64::from_be_bytes(v.try_into().unwrap_or_default())),
        n => malformed(format!("attribute {ty} has {n} bytes, not 4 or 8")),
    }
}

/// The attributes of one message, by type; an attribute given twice is an error.
fn attr_map(payload: &[u8]) -> Result<BTreeMap<u16, &[u8]>, NlError> {
    let mut map = BTreeMap::new();
    for (ty, v) in parse_attrs(payload)? {
        if map.insert(ty, v).is_some() {
            return malformed(format!("attribute {ty} given twice"));
        }
    }
    Ok(map)
}

/// The complete reply to a per-CPU statistics dump (request `seq`): the
/// [`super::CONNTRACK_STATS`] counters summed over the CPU messages. A counter no message carries
/// (an older kernel) is left out.
pub fn parse_cpu_stats_reply(buf: &[u8], seq: u32) -> Result<BTreeMap<&'static str, u64>, NlError> {
    let Scan::Complete(payloads) = scan(buf, seq, IPCTNL_MSG_CT_GET_STATS_CPU)? else {
        return malformed("the dump ended without NLMSG_DONE");
    };
    if payloads.is_empty() {
        return malformed("no CPU in the statistics dump");
    }
    let mut sums = BTreeMap::new();
    for payload in payloads {
        let attrs = attr_map(payload)?;
        for (ty, name) in CPU_STATS {
            if let Some(v) = attrs.get(&ty) {
                let sum: &mut u64 = sums.entry(name).or_default();
                *sum = sum.saturating_add(be_uint(ty, v)?);
            }
        }
    }
    Ok(sums)
}

/// The table fill from `IPCTNL_MSG_CT_GET_STATS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Global {
    pub entries: u64,
    /// `None` on kernels that do not send `CTA_STATS_GLOBAL_MAX_ENTRIES`.
    pub max_entries: Option<u64>,
}

/// The complete reply to a global statistics request (request `seq`, acknowledged).
pub fn parse_global_reply(buf: &[u8], seq: u32) -> Result<Global, NlError> {
    let Scan::Complete(payloads) = scan(buf, seq, IPCTNL_MSG_CT_GET_STATS)? else {
        return malformed("the reply ended without its acknowledgement");
    };
    let [payload] = payloads[..] else {
        return malformed(format!("{} statistics messages, expected 1", payloads.len()));
    };
    let attrs = attr_map(payload)?;
    let Some(entries) = attrs.get(&CTA_STATS_GLOBAL_ENTRIES) else {
        return malformed("no CTA_STATS_GLOBAL_ENTRIES");
    };
    Ok(Global {
        entries: be_uint(CTA_STATS_GLOBAL_ENTRIES, entries)?,
        max_entries: attrs
            .get(&CTA_STATS_GLOBAL_MAX_ENTRIES)
            .map(|v| be_uint(CTA_STATS_GLOBAL_MAX_ENTRIES, v))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use smtpflow_tests::netlink::{ack, attr, ctnetlink_counters, done, message};

    use super::*;
    use crate::host::pressure::netlink::{
        NLM_F_ACK, NLM_F_DUMP, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, u32_at,
    };

    // Real replies of this project's development machine (Linux 6.18, 2 CPUs), request seq 1,
    // taken in the same namespace and moment as the procfs captures: entries 5, limit 262144,
    // invalid 3 (CPU 0) + 6 (CPU 1).
    const CPU_REPLY: &[u8] = include_bytes!("../testdata/ct_stats_cpu.bin");
    const GLOBAL_REPLY: &[u8] = include_bytes!("../testdata/ct_stats.bin");

    fn cpu_msg(seq: u32, attrs: &[(u16, u32)]) -> Vec<u8> {
        ctnetlink_counters(0x104, seq, attrs)
    }

    #[test]
    fn constants_match_the_uapi_headers() {
        assert_eq!(libc::NETLINK_NETFILTER, 12);
        let r = request(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP, 7);
        assert_eq!(u32_at(&r, 0), Some(20));
        assert_eq!(u16_at(&r, 4), Some(0x0104));
        assert_eq!(u16_at(&r, 6), Some(0x0301));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(&r[12..], &[0; 8]);
    }

    #[test]
    fn cpu_stats_capture() {
        assert_eq!(
            parse_cpu_stats_reply(CPU_REPLY, 1).unwrap(),
            BTreeMap::from([
                ("drop", 0),
                ("early_drop", 0),
                ("insert_failed", 0),
                ("invalid", 9),
                ("search_restart", 0)
            ])
        );
        // Another request's reply is not ours.
        assert!(parse_cpu_stats_reply(CPU_REPLY, 2).is_err());
    }

    #[test]
    fn global_capture() {
        assert_eq!(
            parse_global_reply(GLOBAL_REPLY, 1).unwrap(),
            Global { entries: 5, max_entries: Some(262_144) }
        );
    }

    #[test]
    fn sums_every_cpu_and_masks_attribute_flags() {
        let mut buf = cpu_msg(9, &[(CTA_STATS_DROP, 1), (CTA_STATS_INVALID, u32::MAX)]);
        buf.extend(cpu_msg(9, &[(CTA_STATS_DROP, 2), (CTA_STATS_INVALID, 1), (2, 77)]));
        // NLA_F_NET_BYTEORDER set on the type: still CTA_STATS_EARLY_DROP.
        buf.extend(cpu_msg(9, &[(CTA_STATS_EARLY_DROP | 0x4000, 5)]));
        buf.extend(done(9, 0));
        assert_eq!(
            parse_cpu_stats_reply(&buf, 9).unwrap(),
            BTreeMap::from([("drop", 3), ("early_drop", 5), ("invalid", 1 + u64::from(u32::MAX))])
        );
        // The same split over two datagrams (concatenated) and with a NOOP: the same.
        let mut noop = message(NLMSG_NOOP, 0, 9, &[]);
        noop.extend(buf);
        assert!(parse_cpu_stats_reply(&noop, 9).is_ok());
    }

    #[test]
    fn global_without_max_entries() {
        let mut body = vec![0, 0, 0, 0];
        body.extend(attr(CTA_STATS_GLOBAL_ENTRIES, &42u32.to_be_bytes()));
        let mut buf = message(0x105, 2, 3, &body);
        buf.extend(ack(3));
        assert_eq!(parse_global_reply(&buf, 3).unwrap(), Global { entries: 42, max_entries: None });
    }

    #[test]
    fn kernel_errors() {
        // ctnetlink absent: the request is answered with NLMSG_ERROR -EOPNOTSUPP.
        let mut err = (-libc::EOPNOTSUPP).to_ne_bytes().to_vec();
        err.extend_from_slice(&request(IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK, 4));
        let buf = message(NLMSG_ERROR, 0, 4, &err);
        assert!(
            matches!(parse_global_reply(&buf, 4), Err(NlError::Kernel(e)) if e == libc::EOPNOTSUPP)
        );
        let buf = done(4, -libc::EPERM);
        assert!(
            matches!(parse_cpu_stats_reply(&buf, 4), Err(NlError::Kernel(e)) if e == libc::EPERM)
        );
    }

    #[test]
    fn hostile_replies() {
        let good = [cpu_msg(1, &[(CTA_STATS_DROP, 1)]), done(1, 0)].concat();
        assert!(parse_cpu_stats_reply(&good, 1).is_ok());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("only DONE: no CPU", done(1, 0)),
            ("no DONE", cpu_msg(1, &[(CTA_STATS_DROP, 1)])),
            ("data after DONE", [good.clone(), cpu_msg(1, &[])].concat()),
            ("overrun", message(NLMSG_OVERRUN, 0, 1, &[])),
            ("other type", [message(0x105, 2, 1, &[0; 4]), done(1, 0)].concat()),
            ("positive error", done(1, 5)),
            ("error without code", message(NLMSG_ERROR, 0, 1, &[])),
            ("no nfgenmsg", [message(0x104, 2, 1, &[0, 0]), done(1, 0)].concat()),
            (
                "3-byte attribute",
                [message(0x104, 2, 1, &[0, 0, 0, 0, 7, 0, 10, 0, 1, 2, 3, 0]), done(1, 0)].concat(),
            ),
            (
                "attribute length < 4",
                [message(0x104, 2, 1, &[0, 0, 0, 0, 2, 0, 10, 0]), done(1, 0)].concat(),
            ),
            (
                "attribute past the end",
                [message(0x104, 2, 1, &[0, 0, 0, 0, 40, 0, 10, 0, 0, 0, 0, 1]), done(1, 0)]
                    .concat(),
            ),
            (
                "duplicate attribute",
                [cpu_msg(1, &[(CTA_STATS_DROP, 1), (CTA_STATS_DROP, 2)]), done(1, 0)].concat(),
            ),
            ("header length 0", vec![0; 16]),
            ("header length past the end", {
                let mut m = good.clone();
                m[0] = 0xff;
                m
            }),
            ("stray bytes", [good.clone(), vec![1, 2, 3]].concat()),
        ];
        for (what, buf) in cases {
            assert!(parse_cpu_stats_reply(&buf, 1).is_err(), "{what}");
        }
        // Global: two messages, none, a missing entries attribute, a 2-byte value.
        let ack = ack(1);
        let g = |attrs: &[Vec<u8>]| {
            let mut body = vec![0, 0, 0, 0];
            for a in attrs {
                body.extend(a);
            }
            message(0x105, 2, 1, &body)
        };
        let entries = attr(CTA_STATS_GLOBAL_ENTRIES, &1u32.to_be_bytes());
        for (what, buf) in [
            ("ack only", ack.clone()),
            (
                "two messages",
                [g(std::slice::from_ref(&entries)), g(std::slice::from_ref(&entries)), ack.clone()]
                    .concat(),
            ),
            (
                "no entries",
                [g(&[attr(CTA_STATS_GLOBAL_MAX_ENTRIES, &[0, 0, 0, 1])]), ack.clone()].concat(),
            ),
            ("2-byte value", [g(&[attr(CTA_STATS_GLOBAL_ENTRIES, &[0, 1])]), ack.clone()].concat()),
            ("no ack", g(std::slice::from_ref(&entries))),
        ] {
            assert!(parse_global_reply(&buf, 1).is_err(), "{what}");
        }
    }

    /// Every truncation of each captured reply is an error (the terminator is gone or a
    /// message is cut), never a panic or a smaller sum.
    #[test]
    fn every_truncation_is_an_error() {
        for i in 0..CPU_REPLY.len() {
            assert!(parse_cpu_stats_reply(&CPU_REPLY[..i], 1).is_err(), "cut at {i}");
        }
        for i in 0..GLOBAL_REPLY.len() {
            assert!(parse_global_reply(&GLOBAL_REPLY[..i], 1).is_err(), "cut at {i}");
        }
    }

    /// Garbage: every byte of each capture set to several values, and attribute parsing of
    /// arbitrary bytes: errors or values, never a panic.
    #[test]
    fn garbage_never_panics() {
        for full in [CPU_REPLY, GLOBAL_REPLY] {
            for pos in 0..full.len() {
                for b in [0u8, 1, 3, 4, 0x7f, 0x80, 0xff] {
                    let mut v = full.to_vec();
                    v[pos] = b;
                    let _ = parse_cpu_stats_reply(&v, 1);
                    let _ = parse_global_reply(&v, 1);
                    let _ = parse_attrs(&v);
                    let _ = parse_attrs(&v[pos..]);
                }
            }
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for len in 0..200 {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 9) as u8 // small bytes: plausible lengths and types
                })
                .collect();
            let _ = parse_attrs(&v);
            let _ = parse_cpu_stats_reply(&v, 0);
            let _ = parse_global_reply(&v, 0);
        }
    }
}
