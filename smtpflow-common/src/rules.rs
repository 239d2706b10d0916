//! The event contract: which TCP packet is which event, which port is the SMTP port, who is the
//! client. The kernel program calls these per packet; the unit tests below pin them.

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

use tcp_flags::{ACK, FIN, RST, SYN};

labelled_enum! {
    /// A counted TCP event. At most one per packet: the rules are mutually exclusive.
    pub enum Event: u8 {
        /// SYN set, ACK and RST clear.
        Syn = 0 => "syn",
        /// SYN and ACK set, RST clear.
        SynAck = 1 => "syn_ack",
        /// RST set, whatever else is set.
        Rst = 2 => "rst",
        /// Window field 0 with SYN, FIN and RST clear.
        ZeroWindow = 3 => "zero_window",
    }
}

labelled_enum! {
    /// Who sent the packet: seen on ingress, the peer; on egress, the local host.
    pub enum Side: u8 {
        Peer = 0 => "peer",
        Local = 1 => "local",
    }
}

labelled_enum! {
    /// `Inbound` when the SMTP client is the peer, `Outbound` when it is the local host.
    pub enum Direction: u8 {
        Inbound = 0 => "inbound",
        Outbound = 1 => "outbound",
    }
}

/// Classifies a TCP packet by its flags byte and window field.
#[inline(always)]
pub const fn classify(flags: u8, window: u16) -> Option<Event> {
    if flags & RST != 0 {
        Some(Event::Rst)
    } else if flags & SYN != 0 {
        if flags & ACK != 0 { Some(Event::SynAck) } else { Some(Event::Syn) }
    } else if window == 0 && flags & FIN == 0 {
        Some(Event::ZeroWindow)
    } else {
        None
    }
}

/// The SMTP port of a packet and whether its sender is the SMTP client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub port: u16,
    /// Position of `port` in the configured list.
    pub index: usize,
    /// The destination port is the SMTP port, so the sender is the client.
    pub sender_is_client: bool,
}

/// The destination port if it is an SMTP port, else the source port if it is one.
#[inline(always)]
pub fn smtp_port(src_port: u16, dst_port: u16, ports: &[u16]) -> Option<PortMatch> {
    let mut src_hit = None;
    // A plain bounded loop: the kernel's verifier sees at most `MAX_PORTS` iterations.
    for (index, &p) in ports.iter().take(crate::MAX_PORTS).enumerate() {
        if p == dst_port {
            return Some(PortMatch { port: dst_port, index, sender_is_client: true });
        }
        if p == src_port && src_hit.is_none() {
            src_hit = Some(index);
        }
    }
    src_hit.map(|index| PortMatch { port: src_port, index, sender_is_client: false })
}

/// The connection's direction from who sent the packet and whether the sender is the client.
#[inline(always)]
pub const fn direction_of(side: Side, sender_is_client: bool) -> Direction {
    let client_is_peer = match side {
        Side::Peer => sender_is_client,
        Side::Local => !sender_is_client,
    };
    if client_is_peer { Direction::Inbound } else { Direction::Outbound }
}

#[cfg(test)]
mod tests {
    use super::tcp_flags::*;
    use super::*;

    #[test]
    fn classification_table() {
        let cases: &[(u8, u16, Option<Event>)] = &[
            (SYN, 64240, Some(Event::Syn)),
            (SYN, 0, Some(Event::Syn)),
            (SYN | ECE | CWR, 1, Some(Event::Syn)),
            (SYN | FIN, 1, Some(Event::Syn)),
            (SYN | ACK, 65535, Some(Event::SynAck)),
            (SYN | ACK, 0, Some(Event::SynAck)),
            (RST, 0, Some(Event::Rst)),
            (RST | ACK, 100, Some(Event::Rst)),
            (RST | SYN, 100, Some(Event::Rst)),
            (RST | SYN | ACK | FIN | PSH | URG, 0, Some(Event::Rst)),
            (ACK, 0, Some(Event::ZeroWindow)),
            (ACK | PSH, 0, Some(Event::ZeroWindow)),
            (0, 0, Some(Event::ZeroWindow)),
            (ACK | FIN, 0, None),
            (ACK, 1, None),
            (ACK | PSH, 501, None),
            (FIN, 0, None),
            (0, 1, None),
        ];
        for &(flags, window, want) in cases {
            assert_eq!(classify(flags, window), want, "flags {flags:#04x} window {window}");
        }
    }

    #[test]
    fn at_most_one_event_for_every_flag_byte() {
        for flags in 0..=u8::MAX {
            for window in [0u16, 1, 65535] {
                let e = classify(flags, window);
                let syn = flags & SYN != 0;
                let rst = flags & RST != 0;
                let ack = flags & ACK != 0;
                let fin = flags & FIN != 0;
                let expect = if rst {
                    Some(Event::Rst)
                } else if syn && ack {
                    Some(Event::SynAck)
                } else if syn {
                    Some(Event::Syn)
                } else if window == 0 && !fin {
                    Some(Event::ZeroWindow)
                } else {
                    None
                };
                assert_eq!(e, expect, "flags {flags:#04x} window {window}");
            }
        }
    }

    const PORTS: &[u16] = &[25, 465, 587];

    #[test]
    fn destination_port_wins() {
        let m = |port, index, sender_is_client| Some(PortMatch { port, index, sender_is_client });
        assert_eq!(smtp_port(40000, 25, PORTS), m(25, 0, true));
        assert_eq!(smtp_port(25, 40000, PORTS), m(25, 0, false));
        assert_eq!(smtp_port(40000, 465, PORTS), m(465, 1, true));
        // Both are SMTP ports: the destination decides.
        assert_eq!(smtp_port(25, 587, PORTS), m(587, 2, true));
        assert_eq!(smtp_port(587, 25, PORTS), m(25, 0, true));
        assert_eq!(smtp_port(80, 443, PORTS), None);
        assert_eq!(smtp_port(0, 0, PORTS), None);
        assert_eq!(smtp_port(25, 25, &[]), None);
        assert_eq!(smtp_port(2525, 1, &[2525]), m(2525, 0, false));
    }

    #[test]
    fn only_the_first_max_ports_count() {
        let many: [u16; 20] = core::array::from_fn(|i| 1000 + i as u16);
        assert!(smtp_port(1, 1015, &many).is_some());
        assert!(smtp_port(1, 1016, &many).is_none());
    }

    #[test]
    fn direction_rules() {
        // Ingress, dst is SMTP: the peer is the client connecting to us.
        assert_eq!(direction_of(Side::Peer, true), Direction::Inbound);
        // Ingress, src is SMTP: a remote server answering our client.
        assert_eq!(direction_of(Side::Peer, false), Direction::Outbound);
        // Egress, dst is SMTP: we are the client.
        assert_eq!(direction_of(Side::Local, true), Direction::Outbound);
        // Egress, src is SMTP: our server answering a peer.
        assert_eq!(direction_of(Side::Local, false), Direction::Inbound);
    }

    #[test]
    fn labels_round_trip() {
        for e in Event::ALL {
            assert_eq!(Event::from_repr(e as u8), Some(e));
        }
        for s in Side::ALL {
            assert_eq!(Side::from_repr(s as u8), Some(s));
        }
        for d in Direction::ALL {
            assert_eq!(Direction::from_repr(d as u8), Some(d));
        }
        assert_eq!(Event::from_repr(Event::COUNT as u8), None);
        // The exported label values: a contract with dashboards and rules.
        assert_eq!(
            Event::ALL.map(Event::label).as_slice(),
            ["syn", "syn_ack", "rst", "zero_window"]
        );
    }
}
