//! What userspace counts from the kernel's payload events ([`smtpflow_common::payload`]): the
//! STARTTLS `offered` stage (an EHLO reply listing STARTTLS) and the TLS version of each
//! ServerHello. Cumulative counters, seeded 0 for every watched scope, never decreasing: each
//! event is counted once, when it is read from the ring buffer.
use std::collections::BTreeMap;

use smtpflow_common::{
    Direction, PayloadEvent, PayloadKind, Scope,
    payload::TlsVersion,
    tls::{offers_starttls, server_hello_version},
};

/// The userspace-counted part of the STARTTLS funnel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsFunnel {
    /// Sessions whose server listed STARTTLS in its EHLO reply
    /// (`smtpflow_starttls_total{stage="offered"}`).
    pub offered: BTreeMap<Scope, u64>,
    /// TLS sessions by the version their ServerHello chose (`smtpflow_tls_versions_total`).
    pub versions: BTreeMap<(Scope, TlsVersion), u64>,
}

impl TlsFunnel {
    /// A watched scope: its series exist from the first scrape, at 0.
    pub fn watch(&mut self, scope: Scope) {
        self.offered.entry(scope).or_default();
        for v in TlsVersion::ALL {
            self.versions.entry((scope, v)).or_default();
        }
    }

    /// Counts one payload event; others kinds (greeting, EHLO) count nothing here.
    pub fn count(&mut self, e: &PayloadEvent) {
        let Some(direction) = Direction::from_repr(e.peer.direction) else { return };
        let scope = Scope { ifindex: e.peer.ifindex, port: e.peer.port, direction };
        match PayloadKind::from_repr(e.kind) {
            Some(PayloadKind::EhloReply) if offers_starttls(e.payload()) => {
                *self.offered.entry(scope).or_default() += 1;
            }
            Some(PayloadKind::ServerHello) => {
                *self.versions.entry((scope, server_hello_version(e.payload()))).or_default() += 1;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use smtpflow_common::{FAMILY_V4, PeerKey, payload::PAYLOAD_BYTES, tls::write_server_hello};

    use super::*;

    fn event(kind: PayloadKind, bytes: &[u8], direction: Direction) -> PayloadEvent {
        let mut e = PayloadEvent {
            peer: PeerKey {
                ifindex: 3,
                addr: [0; 16],
                port: 25,
                family: FAMILY_V4,
                direction: direction as u8,
            },
            kind: kind as u8,
            _pad: 0,
            len: bytes.len() as u16,
            payload_len: bytes.len() as u32,
            bytes: [0; PAYLOAD_BYTES],
        };
        e.bytes[..bytes.len()].copy_from_slice(bytes);
        e
    }

    #[test]
    fn offered_and_versions_by_scope() {
        let inbound = Scope { ifindex: 3, port: 25, direction: Direction::Inbound };
        let outbound = Scope { direction: Direction::Outbound, ..inbound };
        let mut f = TlsFunnel::default();
        f.watch(inbound);
        f.watch(outbound);
        assert_eq!(f.offered[&inbound], 0);
        assert_eq!(f.versions.len(), 2 * TlsVersion::COUNT, "every version seeded");
        let offer = b"250-mx\r\n250-STARTTLS\r\n250 OK\r\n";
        f.count(&event(PayloadKind::EhloReply, offer, Direction::Inbound));
        f.count(&event(PayloadKind::EhloReply, b"250-mx\r\n250 OK\r\n", Direction::Inbound));
        f.count(&event(PayloadKind::Greeting, offer, Direction::Inbound));
        f.count(&event(PayloadKind::EhloReply, offer, Direction::Outbound));
        assert_eq!((f.offered[&inbound], f.offered[&outbound]), (1, 1));
        let mut hello = [0u8; 128];
        let n = write_server_hello(&mut hello, TlsVersion::Tls13, &[], &[], false).unwrap();
        f.count(&event(PayloadKind::ServerHello, &hello[..n], Direction::Outbound));
        f.count(&event(PayloadKind::ServerHello, &hello[..n - 1], Direction::Outbound));
        assert_eq!(f.versions[&(outbound, TlsVersion::Tls13)], 1);
        assert_eq!(f.versions[&(outbound, TlsVersion::Unknown)], 1, "cut");
        assert_eq!(f.versions[&(inbound, TlsVersion::Tls13)], 0);
        // An unknown kind or direction counts nothing.
        let mut odd = event(PayloadKind::EhloReply, offer, Direction::Inbound);
        odd.kind = 9;
        f.count(&odd);
        odd.kind = PayloadKind::EhloReply as u8;
        odd.peer.direction = 7;
        f.count(&odd);
        assert_eq!(f.offered[&inbound], 1);
    }
}
