//! ICMP and ICMPv6 destination unreachable: which messages answer a handshake with the outcome
//! `unreachable`, and the class of their code (the `reason` label of
//! `smtpflow_unreachable_total`). The kernel calls [`reason`] on every ICMP message it parses;
//! the unit tests below pin the table.
use crate::{FAMILY_V4, FAMILY_V6};

/// What an ICMP or ICMPv6 destination unreachable quotes of the TCP segment it answers, as the
/// kernel's parser and the reference both read it. Addresses in network order (IPv4 in the
/// first 4 bytes), the rest in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub family: u8,
    pub reason: UnreachableReason,
    /// The quoted segment's source and destination: for an answer to our SYN, us and the
    /// remote.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
}

impl Quoted {
    pub const EMPTY: Self = Self {
        family: 0,
        reason: UnreachableReason::Other,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        seq: 0,
    };
}

/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMP type 3: destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type 3 code 4: fragmentation needed (path MTU discovery), not an unreachable.
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 type 1: destination unreachable. (Type 2, packet too big, is path MTU discovery.)
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// Bytes of the ICMP and ICMPv6 header before the quoted packet: type, code, checksum, and
/// 4 unused (or MTU) bytes.
pub const ICMP_HLEN: usize = 8;
/// Bytes of the quoted TCP header an ICMP error must carry at least (RFC 792): the ports and
/// the sequence number.
pub const QUOTED_TCP_LEN: usize = 8;

labelled_enum! {
    /// The class of an unreachable's code.
    pub enum UnreachableReason: u8 {
        /// No route to the network (v4 codes 0, 6, 11; v6 codes 0, 2).
        Net = 0 => "net",
        /// The host is unreachable or unknown (v4 codes 1, 7, 12; v6 code 3).
        Host = 1 => "host",
        /// Nothing listens on the port (v4 code 3, v6 code 4).
        Port = 2 => "port",
        /// The protocol is not supported (v4 code 2).
        Protocol = 3 => "protocol",
        /// Administratively prohibited: a firewall said no (v4 codes 9, 10, 13, 14, 15; v6 codes
        /// 1, 5, 6).
        Admin = 4 => "admin",
        /// Every other code (v4 5, 8 and codes no RFC defines; v6 codes 7 and up).
        Other = 5 => "other",
    }
}

/// The reason of an ICMP message of `family` ([`FAMILY_V4`]: ICMP, [`FAMILY_V6`]: ICMPv6) with
/// type `kind` and `code`, if it is a destination unreachable that answers a handshake;
/// `None` for every other message, fragmentation needed (v4 type 3 code 4) and packet too big
/// (v6 type 2) included.
#[inline(always)]
pub const fn reason(family: u8, kind: u8, code: u8) -> Option<UnreachableReason> {
    use UnreachableReason::*;
    if family == FAMILY_V4 && kind == ICMP_DEST_UNREACH {
        return match code {
            ICMP_FRAG_NEEDED => None,
            0 | 6 | 11 => Some(Net),
            1 | 7 | 12 => Some(Host),
            2 => Some(Protocol),
            3 => Some(Port),
            9 | 10 | 13 | 14 | 15 => Some(Admin),
            _ => Some(Other),
        };
    }
    if family == FAMILY_V6 && kind == ICMPV6_DEST_UNREACH {
        return Some(match code {
            0 | 2 => Net,
            3 => Host,
            4 => Port,
            1 | 5 | 6 => Admin,
            _ => Other,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use UnreachableReason::*;

    #[test]
    fn icmp_codes_by_class() {
        let v4 = |code| reason(FAMILY_V4, ICMP_DEST_UNREACH, code);
        let want: [(u8, Option<UnreachableReason>); 16] = [
            (0, Some(Net)),
            (1, Some(Host)),
            (2, Some(Protocol)),
            (3, Some(Port)),
            (4, None),
            (5, Some(Other)),
            (6, Some(Net)),
            (7, Some(Host)),
            (8, Some(Other)),
            (9, Some(Admin)),
            (10, Some(Admin)),
            (11, Some(Net)),
            (12, Some(Host)),
            (13, Some(Admin)),
            (14, Some(Admin)),
            (15, Some(Admin)),
        ];
        for (code, r) in want {
            assert_eq!(v4(code), r, "ICMP type 3 code {code}");
        }
        for code in 16..=255 {
            assert_eq!(v4(code), Some(Other), "ICMP type 3 code {code}");
        }
    }

    #[test]
    fn icmpv6_codes_by_class() {
        let v6 = |code| reason(FAMILY_V6, ICMPV6_DEST_UNREACH, code);
        let want = [Net, Admin, Net, Host, Port, Admin, Admin];
        for (code, r) in want.into_iter().enumerate() {
            assert_eq!(v6(code as u8), Some(r), "ICMPv6 type 1 code {code}");
        }
        for code in 7..=255 {
            assert_eq!(v6(code), Some(Other), "ICMPv6 type 1 code {code}");
        }
    }

    /// Path MTU discovery, echo, time exceeded, and the other family's type numbers are not
    /// unreachables.
    #[test]
    fn other_messages_are_not_unreachable() {
        for code in 0..=255 {
            // v4: echo reply 0, redirect 5, echo 8, time exceeded 11, parameter problem 12.
            for kind in [0, 1, 2, 4, 5, 8, 11, 12] {
                assert_eq!(reason(FAMILY_V4, kind, code), None, "ICMP {kind}/{code}");
            }
            // v6: packet too big 2, time exceeded 3, parameter problem 4, echo 128/129.
            for kind in [0, 2, 3, 4, 128, 129] {
                assert_eq!(reason(FAMILY_V6, kind, code), None, "ICMPv6 {kind}/{code}");
            }
            assert_eq!(reason(0, ICMP_DEST_UNREACH, code), None, "no family");
        }
        assert_eq!(reason(FAMILY_V4, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), None);
    }
}
