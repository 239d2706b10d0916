//! Remote names read from the clear-text bytes the kernel copies ([`PayloadKind`]): the host name
//! in a server's greeting (`220 mx.example.com ESMTP`, `220-mx.example.com`) and in the first
//! line of its EHLO reply (`250-mx.example.com Hello`), and the argument of a client's
//! `EHLO`/`HELO`. Pure functions over attacker-controlled bytes: only a strict host name comes
//! out (LDH labels of 1 to 63 characters, at most 253 in all, at least two labels, an
//! alphabetic or `xn--` last label, lowercased); address literals (`[192.0.2.1]`), numbers such
//! as the `4.3.2` of `421 4.3.2 ...`, and anything else give no name.
use smtpflow_common::{Direction, PayloadKind};

/// Longest host name (RFC 1035, without the final dot).
pub const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// The name a payload event says, if any: greetings and EHLO replies name the server, an
/// EHLO/HELO command the client. Other kinds (the ServerHello) name nothing.
pub fn name_of(kind: PayloadKind, bytes: &[u8]) -> Option<String> {
    match kind {
        PayloadKind::Greeting => reply_name(bytes, None),
        PayloadKind::EhloReply => reply_name(bytes, Some(b"250")),
        PayloadKind::Ehlo => client_name(bytes),
        PayloadKind::ServerHello => None,
    }
}

/// Whether a payload of `kind` in a connection of `direction` is the remote's word: the server
/// speaks first in both directions, so outbound the greeting and the EHLO reply are the remote
/// MX's, and inbound they are our own server's; the EHLO is the client's, ours outbound.
pub fn names_the_remote(kind: PayloadKind, direction: Direction) -> bool {
    match kind {
        PayloadKind::Greeting | PayloadKind::EhloReply => direction == Direction::Outbound,
        PayloadKind::Ehlo => direction == Direction::Inbound,
        PayloadKind::ServerHello => false,
    }
}

/// The first line of `bytes`, without its line end.
fn first_line(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
    let line = &bytes[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The name after a reply code on the first line: `CODE name ...` or `CODE-name ...`. `code`:
/// the only code accepted (`None`: any three digits, as a greeting may be a 220, a 421 or a
/// 554).
pub fn reply_name(bytes: &[u8], code: Option<&[u8; 3]>) -> Option<String> {
    let line = first_line(bytes);
    let (digits, rest) = (line.get(..3)?, line.get(3..)?);
    if !digits.iter().all(u8::is_ascii_digit) || code.is_some_and(|c| c.as_slice() != digits) {
        return None;
    }
    let rest = rest.strip_prefix(b" ").or_else(|| rest.strip_prefix(b"-"))?;
    hostname(first_word(rest))
}

/// The argument of a client's first command: `EHLO name` or `HELO name` (any case).
pub fn client_name(bytes: &[u8]) -> Option<String> {
    let line = first_line(bytes);
    let verb = line.get(..4)?;
    if !verb.eq_ignore_ascii_case(b"EHLO") && !verb.eq_ignore_ascii_case(b"HELO") {
        return None;
    }
    let rest = line.get(4..)?;
    let rest = rest.strip_prefix(b" ")?;
    hostname(first_word(rest))
}

fn first_word(s: &[u8]) -> &[u8] {
    let s = s.trim_ascii_start();
    let end = s.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(s.len());
    &s[..end]
}

/// `s` as a host name, lowercased, if it is one (see the module's documentation). A single
/// final dot is allowed and dropped.
pub fn hostname(s: &[u8]) -> Option<String> {
    let s = s.strip_suffix(b".").unwrap_or(s);
    if s.is_empty() || s.len() > MAX_NAME {
        return None;
    }
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in s.split(|&b| b == b'.') {
        let ok = (1..=MAX_LABEL).contains(&label.len())
            && label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && !label.starts_with(b"-")
            && !label.ends_with(b"-");
        if !ok {
            return None;
        }
        labels += 1;
        last = label;
    }
    let tld_ok = last.iter().all(u8::is_ascii_alphabetic)
        || (last.len() > 4 && last[..4].eq_ignore_ascii_case(b"xn--"));
    if labels < 2 || !tld_ok {
        return None;
    }
    Some(String::from_utf8_lossy(s).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings() {
        let g = |s: &str| reply_name(s.as_bytes(), None);
        assert_eq!(
            g("220 MX3.mail.protection.outlook.com Microsoft ESMTP MAIL Service ready\r\n")
                .as_deref(),
            Some("mx3.mail.protection.outlook.com")
        );
        assert_eq!(
            g("220-mx.example.org ESMTP\r\n220 more\r\n").as_deref(),
            Some("mx.example.org")
        );
        assert_eq!(
            g("421 mx.example.org Service not available\r\n").as_deref(),
            Some("mx.example.org")
        );
        assert_eq!(g("220 mx.example.org."), Some("mx.example.org".into()), "cut, final dot");
        for none in [
            "421 4.3.2 Service not available\r\n",
            "421 4.0.0\r\n",
            "220 [192.0.2.1] ESMTP\r\n",
            "220 192.0.2.1 ESMTP\r\n",
            "220 localhost ESMTP\r\n",
            "220 -bad.example.org\r\n",
            "220 bad_.example.org\r\n",
            "220\r\n",
            "22 mx.example.org",
            "220mx.example.org",
            "",
        ] {
            assert_eq!(g(none), None, "{none:?}");
        }
        let long = format!("220 {}.example.org\r\n", "a".repeat(64));
        assert_eq!(g(&long), None, "a label over 63");
        let total = format!("220 {}example.org\r\n", "abcdefgh.".repeat(28));
        assert_eq!(g(&total), None, "over 253");
        assert_eq!(g("220 mx.xn--p1ai ok").as_deref(), Some("mx.xn--p1ai"));
    }

    #[test]
    fn ehlo_replies_and_commands() {
        let r = |s: &str| name_of(PayloadKind::EhloReply, s.as_bytes());
        assert_eq!(
            r("250-mx.example.net Hello [203.0.113.9]\r\n250 STARTTLS\r\n").as_deref(),
            Some("mx.example.net")
        );
        assert_eq!(r("250 mx.example.net\r\n").as_deref(), Some("mx.example.net"));
        assert_eq!(r("501 mx.example.net\r\n"), None, "not a 250");
        let c = |s: &str| name_of(PayloadKind::Ehlo, s.as_bytes());
        assert_eq!(c("EHLO Client.Example.com\r\n").as_deref(), Some("client.example.com"));
        assert_eq!(c("helo relay.example.com\r\n").as_deref(), Some("relay.example.com"));
        assert_eq!(c("EHLO [198.51.100.7]\r\n"), None);
        assert_eq!(c("MAIL FROM:<a@b.example>\r\n"), None);
        assert_eq!(c("EHLOmx.example.com\r\n"), None);
        assert_eq!(name_of(PayloadKind::ServerHello, b"\x16\x03\x03"), None);
        // Our own server's greeting inbound, our own EHLO outbound: not the remote's.
        assert!(names_the_remote(PayloadKind::Greeting, Direction::Outbound));
        assert!(!names_the_remote(PayloadKind::Greeting, Direction::Inbound));
        assert!(!names_the_remote(PayloadKind::EhloReply, Direction::Inbound));
        assert!(names_the_remote(PayloadKind::Ehlo, Direction::Inbound));
        assert!(!names_the_remote(PayloadKind::Ehlo, Direction::Outbound));
    }
}
