//! Payload events: the few clear-text bytes of a session that name its remote or describe its
//! TLS, copied by the kernel into a ring buffer once per session and kind, and read by userspace
//! (sites from names, the STARTTLS `offered` stage, the TLS version). The kernel decides only
//! *when* to copy (the flow state machine, [`crate::flow::step`]); every parse of the bytes is
//! userspace's, so attacker-controlled text never steers the kernel.
use crate::PeerKey;

labelled_enum! {
    /// Which bytes an event carries.
    pub enum PayloadKind: u8 {
        /// The server's first reply (its greeting: `220 mx.example.com ESMTP`, or `421 ...`).
        Greeting = 0 => "greeting",
        /// The client's `EHLO` or `HELO` command (its first, in clear text).
        Ehlo = 1 => "ehlo",
        /// The server's reply to the client's first `EHLO`/`HELO` (its first segment): the
        /// server's name, and the extensions it offers (STARTTLS).
        EhloReply = 2 => "ehlo_reply",
        /// The server's first segment once TLS started (after a 220 to STARTTLS, or on an
        /// implicit-TLS port such as 465): its ServerHello, in clear text.
        ServerHello = 3 => "server_hello",
    }
}

/// Most payload bytes an event carries: enough for a name line (RFC 5321 caps a command line at
/// 512 octets), an EHLO reply's first segment of extensions, and a ServerHello's fixed part and
/// the extensions after it. Longer payloads are cut ([`PayloadEvent::len`] says how much was
/// copied).
pub const PAYLOAD_BYTES: usize = 512;

/// Size of the payload ring buffer: about 7,500 events between two drains (1 s by default).
/// Events that do not fit are lost, and counted ([`crate::Stat::PayloadsLost`]).
pub const PAYLOAD_RING_BYTES: u32 = 4 << 20;

/// One record of the payload ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadEvent {
    /// The remote peer, as in the per-peer map (its address, the SMTP port, the direction).
    pub peer: PeerKey,
    /// [`PayloadKind`] as u8.
    pub kind: u8,
    pub _pad: u8,
    /// Bytes of `bytes` copied (at most [`PAYLOAD_BYTES`]); the rest is undefined.
    pub len: u16,
    /// The segment's payload length (what was sent, before the cut).
    pub payload_len: u32,
    pub bytes: [u8; PAYLOAD_BYTES],
}

impl PayloadEvent {
    /// The copied bytes.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(PAYLOAD_BYTES)]
    }
}

const _: () = {
    assert!(size_of::<PayloadEvent>() == 32 + PAYLOAD_BYTES);
    // The ring buffer's size must be a power of two and a multiple of the page size.
    assert!(PAYLOAD_RING_BYTES.is_power_of_two() && PAYLOAD_RING_BYTES >= 4096);
};

labelled_enum! {
    /// The TLS version a ServerHello chose (`version` label): `supported_versions` when the
    /// ServerHello carries it (TLS 1.3), else its `legacy_version`.
    pub enum TlsVersion: u8 {
        Tls10 = 0 => "TLSv1.0",
        Tls11 = 1 => "TLSv1.1",
        Tls12 = 2 => "TLSv1.2",
        Tls13 = 3 => "TLSv1.3",
        /// Not a ServerHello, cut before its version, or a version this list does not name.
        Unknown = 4 => "unknown",
    }
}
