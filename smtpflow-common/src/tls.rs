//! Parsers of the clear-text bytes a payload event carries ([`crate::payload`]) for the STARTTLS
//! funnel: whether an EHLO reply offers STARTTLS, and which TLS version a ServerHello chose.
//! Userspace runs them on bytes a remote peer chose: they read only within the slice, walk it
//! once (every step moves forward), and decide nothing from bytes they did not see.
use crate::payload::TlsVersion;

/// Whether an EHLO reply lists the STARTTLS extension (RFC 3207).
///
/// The reply is a 250 reply of one or more lines, `250-` before every line but the last,
/// `250 ` before the last. The first line names the server and is never an extension; each
/// later line is an extension, whose keyword runs to the first space (RFC 5321 `ehlo-line`).
/// STARTTLS is offered when a keyword equals `STARTTLS`, ignoring case.
///
/// Only complete lines (ending in `\n`, the `\r` before it optional) are read: a line the
/// payload cut may be a longer keyword (`STARTTLSX`). Reading stops at the last line (`250 `),
/// at the first line that is not part of a 250 reply (a 5xx answer to EHLO offers nothing), and
/// at the end of the bytes. One pass over `reply`, so bounded by its length
/// ([`crate::payload::PAYLOAD_BYTES`] for an event).
pub fn offers_starttls(reply: &[u8]) -> bool {
    let mut rest = reply;
    let mut first = true;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let mut line = &rest[..end];
        rest = &rest[end + 1..];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        let (last, text) = match line {
            [b'2', b'5', b'0', b'-', text @ ..] => (false, text),
            [b'2', b'5', b'0', b' ', text @ ..] => (true, text),
            [b'2', b'5', b'0'] => (true, &[][..]),
            _ => return false,
        };
        if !first {
            let keyword = match text.iter().position(|&b| b == b' ' || b == b'\t') {
                Some(space) => &text[..space],
                None => text,
            };
            if keyword.eq_ignore_ascii_case(b"STARTTLS") {
                return true;
            }
        }
        if last {
            return false;
        }
        first = false;
    }
    false
}

/// TLS record content type of a handshake record.
pub const RECORD_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ServerHello.
pub const HANDSHAKE_SERVER_HELLO: u8 = 2;
/// Extension type `supported_versions` (RFC 8446 4.2.1).
pub const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;
/// Bytes of a TLS record header: type, version, length.
pub const RECORD_HEADER: usize = 5;
/// Bytes of a handshake message header: type, 24-bit length.
pub const HANDSHAKE_HEADER: usize = 4;
/// Bytes of a ServerHello's `random`.
pub const RANDOM_BYTES: usize = 32;
/// Longest session id (RFC 8446 4.1.3, RFC 5246 7.4.1.3).
pub const MAX_SESSION_ID: usize = 32;

impl TlsVersion {
    /// The version a protocol version number on the wire names (`0x0303`: TLS 1.2); `Unknown`
    /// for SSL 3.0, drafts and anything else.
    pub const fn from_wire(v: u16) -> Self {
        match v {
            0x0301 => TlsVersion::Tls10,
            0x0302 => TlsVersion::Tls11,
            0x0303 => TlsVersion::Tls12,
            0x0304 => TlsVersion::Tls13,
            _ => TlsVersion::Unknown,
        }
    }

    /// The version number on the wire (`None` for `Unknown`).
    pub const fn wire(self) -> Option<u16> {
        match self {
            TlsVersion::Tls10 => Some(0x0301),
            TlsVersion::Tls11 => Some(0x0302),
            TlsVersion::Tls12 => Some(0x0303),
            TlsVersion::Tls13 => Some(0x0304),
            TlsVersion::Unknown => None,
        }
    }
}

/// The TLS version a server's first TLS bytes (a record holding its ServerHello) chose.
///
/// The bytes must start a handshake record (type 0x16) whose fragment starts a ServerHello
/// (type 2). Only that record's fragment is read (bytes after it belong to another record). Its
/// fields, in order: `legacy_version`, `random` (32 bytes), `legacy_session_id` (at most 32
/// bytes), `cipher_suite` (2), `legacy_compression_method` (1), then, optionally, the
/// extensions (a 2-byte length and the extensions, each a 2-byte type, a 2-byte length and its
/// data).
///
/// - `supported_versions` (0x002b), when present, holds the version chosen (RFC 8446 4.2.1:
///   TLS 1.3 sends it and sets `legacy_version` to TLS 1.2); its data must be exactly 2 bytes.
/// - Without it, `legacy_version` is the version (TLS 1.0 to 1.2).
/// - `legacy_version` 0x0301 or 0x0302 decides as soon as it is read: a server choosing TLS 1.3
///   always sends 0x0303, so no extension can change it; the rest may be cut or missing.
/// - `legacy_version` 0x0303 is TLS 1.2 only once the whole message was seen without
///   `supported_versions` (the message ends after the compression method, or the extensions
///   were all read); bytes cut before that (by the event's [`crate::payload::PAYLOAD_BYTES`],
///   or a ServerHello split over records) give `Unknown`, unless `supported_versions` was
///   already read whole.
/// - Anything malformed (another record or message type, a session id over 32 bytes, an
///   extension running past the extensions block, an extensions block running past the
///   message, a bad `supported_versions`) gives `Unknown`, as does a version this list does not
///   name (SSL 3.0, drafts).
///
/// One forward walk: every extension read moves at least 4 bytes on, so at most `len / 4`
/// steps.
pub fn server_hello_version(bytes: &[u8]) -> TlsVersion {
    let be16 = |at: usize, end: usize| -> Option<u16> {
        if at + 2 <= end { Some(u16::from_be_bytes([bytes[at], bytes[at + 1]])) } else { None }
    };
    if bytes.len() < RECORD_HEADER + HANDSHAKE_HEADER
        || bytes[0] != RECORD_HANDSHAKE
        || bytes[RECORD_HEADER] != HANDSHAKE_SERVER_HELLO
    {
        return TlsVersion::Unknown;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    // What of the record was seen.
    let seen = bytes.len().min(RECORD_HEADER + record_len);
    let h = RECORD_HEADER;
    let msg_len = (usize::from(bytes[h + 1]) << 16)
        | (usize::from(bytes[h + 2]) << 8)
        | usize::from(bytes[h + 3]);
    let body = h + HANDSHAKE_HEADER;
    let msg_end = body + msg_len;
    // What of the message was seen; `whole`: all of it.
    let end = seen.min(msg_end);
    let whole = msg_end <= seen;
    let Some(legacy) = be16(body, end) else { return TlsVersion::Unknown };
    let legacy = TlsVersion::from_wire(legacy);
    match legacy {
        TlsVersion::Tls10 | TlsVersion::Tls11 => return legacy,
        TlsVersion::Tls12 => {}
        TlsVersion::Tls13 | TlsVersion::Unknown => return TlsVersion::Unknown,
    }
    // legacy_version 0x0303: TLS 1.2, unless supported_versions says otherwise.
    let sid_at = body + 2 + RANDOM_BYTES;
    if sid_at >= end {
        return TlsVersion::Unknown;
    }
    let sid_len = usize::from(bytes[sid_at]);
    if sid_len > MAX_SESSION_ID {
        return TlsVersion::Unknown;
    }
    // After the session id, the cipher suite (2) and the compression method (1).
    let ext_len_at = sid_at + 1 + sid_len + 3;
    if ext_len_at > msg_end {
        return TlsVersion::Unknown; // the message is shorter than its fixed fields
    }
    if ext_len_at == msg_end {
        // No extensions: TLS 1.2, if the message's end was seen.
        return if whole { TlsVersion::Tls12 } else { TlsVersion::Unknown };
    }
    let Some(ext_len) = be16(ext_len_at, end) else { return TlsVersion::Unknown };
    let exts_end = ext_len_at + 2 + usize::from(ext_len);
    if exts_end > msg_end {
        return TlsVersion::Unknown;
    }
    let mut at = ext_len_at + 2;
    while at + 4 <= exts_end.min(end) {
        let (Some(kind), Some(len)) = (be16(at, end), be16(at + 2, end)) else {
            return TlsVersion::Unknown;
        };
        let data = at + 4;
        let next = data + usize::from(len);
        if next > exts_end {
            return TlsVersion::Unknown;
        }
        if kind == EXT_SUPPORTED_VERSIONS {
            if len != 2 {
                return TlsVersion::Unknown;
            }
            return match be16(data, end) {
                Some(v) => TlsVersion::from_wire(v),
                None => TlsVersion::Unknown, // cut inside it
            };
        }
        at = next;
    }
    // Every extension read, none of them supported_versions: TLS 1.2. Stopped short (cut, or a
    // trailing 1 to 3 bytes that are no extension): not known.
    if at == exts_end && exts_end <= end { TlsVersion::Tls12 } else { TlsVersion::Unknown }
}

/// Writes a ServerHello record choosing `version` into `out` and returns its length: the
/// reference the tests parse back. `session_id` at most 32 bytes; `extensions`: other
/// extensions (type and data) written before `supported_versions`, which is written for TLS 1.3
/// (and for TLS 1.2 when `supported_versions_12`). `None` when `out` is too small. Userspace
/// and tests only: nothing of it goes into the kernel object.
#[cfg(any(test, feature = "user"))]
pub fn write_server_hello(
    out: &mut [u8],
    version: TlsVersion,
    session_id: &[u8],
    extensions: &[(u16, &[u8])],
    supported_versions_12: bool,
) -> Option<usize> {
    let wire = version.wire()?;
    if session_id.len() > MAX_SESSION_ID {
        return None;
    }
    let legacy = if version == TlsVersion::Tls13 { 0x0303 } else { wire };
    let with_sv =
        version == TlsVersion::Tls13 || (version == TlsVersion::Tls12 && supported_versions_12);
    let mut w = Writer { out, at: 0 };
    w.put(&[RECORD_HANDSHAKE, 0x03, 0x03, 0, 0])?; // record length, set below
    w.put(&[HANDSHAKE_SERVER_HELLO, 0, 0, 0])?; // message length, set below
    w.put(&legacy.to_be_bytes())?;
    w.put(&[0x5a; RANDOM_BYTES])?;
    w.put(&[session_id.len() as u8])?;
    w.put(session_id)?;
    w.put(&[0x13, 0x01, 0])?; // a cipher suite, no compression
    let mut ext_len = 0usize;
    for (_, data) in extensions {
        ext_len += 4 + data.len();
    }
    if with_sv {
        ext_len += 6;
    }
    if ext_len > 0 || !extensions.is_empty() {
        w.put(&u16::try_from(ext_len).ok()?.to_be_bytes())?;
        for (kind, data) in extensions {
            w.put(&kind.to_be_bytes())?;
            w.put(&u16::try_from(data.len()).ok()?.to_be_bytes())?;
            w.put(data)?;
        }
        if with_sv {
            w.put(&EXT_SUPPORTED_VERSIONS.to_be_bytes())?;
            w.put(&[0, 2])?;
            w.put(&wire.to_be_bytes())?;
        }
    }
    let len = w.at;
    let record = u16::try_from(len - RECORD_HEADER).ok()?;
    let msg = len - RECORD_HEADER - HANDSHAKE_HEADER;
    w.out[3..5].copy_from_slice(&record.to_be_bytes());
    w.out[6..9].copy_from_slice(&[(msg >> 16) as u8, (msg >> 8) as u8, msg as u8]);
    Some(len)
}

#[cfg(any(test, feature = "user"))]
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

#[cfg(any(test, feature = "user"))]
impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> Option<()> {
        let end = self.at.checked_add(b.len())?;
        self.out.get_mut(self.at..end)?.copy_from_slice(b);
        self.at = end;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttls_offered_in_an_ehlo_reply() {
        let postfix = b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
            250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n";
        assert!(offers_starttls(postfix));
        assert!(offers_starttls(b"250-mx\r\n250 starttls\r\n"), "the last line, any case");
        assert!(offers_starttls(b"250-mx\n250-StartTLS \r\n250 OK\n"), "bare LF, trailing space");
        assert!(!offers_starttls(b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"));
        assert!(!offers_starttls(b"250 STARTTLS\r\n"), "the first line is the server's name");
        assert!(!offers_starttls(b"250-STARTTLS\r\n250 OK\r\n"), "the first line again");
        assert!(!offers_starttls(b"250-mx\r\n250-STARTTLS"), "a cut line");
        assert!(!offers_starttls(b"250-mx\r\n250-STARTTLSX\r\n250 OK\r\n"));
        assert!(!offers_starttls(b"250-mx\r\n250-X-STARTTLS\r\n250 OK\r\n"));
        assert!(!offers_starttls(b"250-mx\r\n250-AUTH STARTTLS\r\n250 OK\r\n"), "a parameter");
        assert!(!offers_starttls(b"250 mx\r\n250 STARTTLS\r\n"), "after the last line");
        assert!(!offers_starttls(b"502 5.5.1 no EHLO\r\n250-x\r\n250 STARTTLS\r\n"));
        assert!(!offers_starttls(b"250-mx\r\n251-STARTTLS\r\n"));
        assert!(!offers_starttls(b""));
        assert!(!offers_starttls(b"250"));
    }

    fn hello(
        version: TlsVersion,
        sid: &[u8],
        exts: &[(u16, &[u8])],
        sv12: bool,
    ) -> ([u8; 512], usize) {
        let mut buf = [0u8; 512];
        let n = write_server_hello(&mut buf, version, sid, exts, sv12).unwrap();
        (buf, n)
    }

    #[test]
    fn server_hello_versions() {
        let alpn: &[u8] = &[0, 3, 2, b'h', b'2'];
        for v in [TlsVersion::Tls10, TlsVersion::Tls11, TlsVersion::Tls12, TlsVersion::Tls13] {
            for sid in [&[][..], &[7; 32]] {
                for exts in [&[][..], &[(0x0010, alpn), (0xff01, &[0][..])]] {
                    let (b, n) = hello(v, sid, exts, false);
                    assert_eq!(server_hello_version(&b[..n]), v, "{v:?} {sid:?} {exts:?}");
                    // Bytes after the record (the next record) change nothing.
                    assert_eq!(server_hello_version(&b[..n + 20]), v);
                }
            }
        }
        let (b, n) = hello(TlsVersion::Tls12, &[1; 32], &[], true);
        assert_eq!(server_hello_version(&b[..n]), TlsVersion::Tls12, "sv naming 1.2");
    }

    #[test]
    fn cut_server_hellos() {
        let (b, n) = hello(TlsVersion::Tls13, &[1; 32], &[(0x0010, &[0; 20])], false);
        for cut in 0..n {
            assert_eq!(server_hello_version(&b[..cut]), TlsVersion::Unknown, "1.3 cut at {cut}");
        }
        let (b, n) = hello(TlsVersion::Tls12, &[1; 32], &[(0x0010, &[0; 20])], false);
        for cut in 0..n {
            assert_eq!(server_hello_version(&b[..cut]), TlsVersion::Unknown, "1.2 cut at {cut}");
        }
        // TLS 1.0 and 1.1 decide at legacy_version: a 1.3 server never sends those.
        let (b, n) = hello(TlsVersion::Tls11, &[1; 32], &[(0x0010, &[0; 20])], false);
        for cut in 0..n {
            let want = if cut >= 11 { TlsVersion::Tls11 } else { TlsVersion::Unknown };
            assert_eq!(server_hello_version(&b[..cut]), want, "1.1 cut at {cut}");
        }
        // supported_versions read whole before the cut: decided.
        let (b, n) = hello(TlsVersion::Tls13, &[], &[], false);
        let mut longer = [0u8; 600];
        longer[..n].copy_from_slice(&b[..n]);
        // A message declared longer than the record is cut by the record.
        longer[3..5].copy_from_slice(&((n - 5 + 100) as u16).to_be_bytes());
        longer[7..9].copy_from_slice(&((n - 9 + 100) as u16).to_be_bytes());
        // The extensions block (its length at 47: no session id) too, as if another extension
        // followed.
        longer[47..49].copy_from_slice(&((6 + 100) as u16).to_be_bytes());
        assert_eq!(server_hello_version(&longer[..n]), TlsVersion::Tls13);
    }

    #[test]
    fn malformed_server_hellos() {
        let (b, n) = hello(TlsVersion::Tls12, &[], &[], false);
        let mut alert = b;
        alert[0] = 0x15;
        assert_eq!(server_hello_version(&alert[..n]), TlsVersion::Unknown);
        let mut client_hello = b;
        client_hello[5] = 1;
        assert_eq!(server_hello_version(&client_hello[..n]), TlsVersion::Unknown);
        let mut ssl3 = b;
        ssl3[9..11].copy_from_slice(&[3, 0]);
        assert_eq!(server_hello_version(&ssl3[..n]), TlsVersion::Unknown);
        let mut long_sid = b;
        long_sid[43] = 33;
        assert_eq!(server_hello_version(&long_sid[..n]), TlsVersion::Unknown);
        // An extension running past its block.
        let (b, n) = hello(TlsVersion::Tls12, &[], &[(0x0010, &[0; 4])], false);
        let mut over = b;
        over[n - 5] = 5;
        assert_eq!(server_hello_version(&over[..n]), TlsVersion::Unknown);
        // supported_versions of the wrong length, or naming a draft.
        let (b, n) = hello(TlsVersion::Tls13, &[], &[], false);
        let mut draft = b;
        draft[n - 2..n].copy_from_slice(&[0x7f, 0x1c]);
        assert_eq!(server_hello_version(&draft[..n]), TlsVersion::Unknown);
        assert_eq!(server_hello_version(b"220 mx ESMTP\r\n"), TlsVersion::Unknown);
    }

    #[test]
    fn wire_numbers_round_trip() {
        for v in TlsVersion::ALL {
            match v.wire() {
                Some(w) => assert_eq!(TlsVersion::from_wire(w), v),
                None => assert_eq!(v, TlsVersion::Unknown),
            }
        }
    }
}
