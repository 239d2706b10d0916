//! The parsers of payload-event bytes (`smtpflow_common::tls`): an EHLO reply's STARTTLS offer
//! and a ServerHello's version. Arbitrary bytes never panic; generated replies and hellos give
//! back what they were built to say, and cutting one never yields another version.
use proptest::{collection::vec, prelude::*};

use smtpflow_common::{
    payload::{PAYLOAD_BYTES, TlsVersion},
    tls::{EXT_SUPPORTED_VERSIONS, offers_starttls, server_hello_version, write_server_hello},
};

/// An EHLO keyword that is not STARTTLS (any case).
fn keyword() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9-]{0,12}"
        .prop_filter("not STARTTLS", |k| !k.eq_ignore_ascii_case("STARTTLS"))
}

/// STARTTLS in a random case.
fn starttls() -> impl Strategy<Value = String> {
    vec(any::<bool>(), 8).prop_map(|upper| {
        "starttls"
            .chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// An EHLO reply: the server's name, the extensions (each with optional parameters), `\r\n`
/// or `\n` line ends.
fn ehlo_reply(extensions: Vec<String>, crlf: bool) -> Vec<u8> {
    let end = if crlf { "\r\n" } else { "\n" };
    let mut lines = vec!["mx.example.com ESMTP".to_owned()];
    lines.extend(extensions);
    let n = lines.len();
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}{end}", if i + 1 == n { ' ' } else { '-' }))
        .collect::<String>()
        .into_bytes()
}

/// A ServerHello's other extensions: neither supported_versions nor empty of meaning.
fn other_extensions() -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
    vec(
        (
            any::<u16>().prop_filter("not supported_versions", |t| *t != EXT_SUPPORTED_VERSIONS),
            vec(any::<u8>(), 0..40),
        ),
        0..6,
    )
}

fn known_version() -> impl Strategy<Value = TlsVersion> {
    prop_oneof![
        Just(TlsVersion::Tls10),
        Just(TlsVersion::Tls11),
        Just(TlsVersion::Tls12),
        Just(TlsVersion::Tls13),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..PAYLOAD_BYTES + 64)) {
        let _ = offers_starttls(&bytes);
        let _ = server_hello_version(&bytes);
        // As a handshake record and a ServerHello, so the walk goes deeper.
        let mut hello = bytes.clone();
        if hello.len() > 5 {
            hello[0] = 0x16;
            hello[5] = 2;
        }
        let _ = server_hello_version(&hello);
    }

    #[test]
    fn generated_ehlo_replies_say_whether_starttls_is_offered(
        before in vec(keyword(), 0..8),
        after in vec(keyword(), 0..8),
        tls in starttls(),
        offered: bool,
        params in vec("( [A-Za-z0-9=]{1,8}){0,2}", 17),
        crlf: bool,
    ) {
        let mut exts: Vec<String> = before;
        if offered {
            exts.push(tls);
        }
        exts.extend(after);
        let exts: Vec<String> =
            exts.into_iter().zip(params.iter().cycle()).map(|(k, p)| format!("{k}{p}")).collect();
        let reply = ehlo_reply(exts, crlf);
        prop_assert_eq!(offers_starttls(&reply), offered, "{}", String::from_utf8_lossy(&reply));
        // Cut anywhere: never offered when it was not; when it was, offered once its line ended.
        for cut in 0..reply.len() {
            let got = offers_starttls(&reply[..cut]);
            prop_assert!(!got || offered, "cut at {}", cut);
        }
    }

    #[test]
    fn generated_server_hellos_give_their_version(
        version in known_version(),
        session_id in vec(any::<u8>(), 0..=32),
        exts in other_extensions(),
        sv12: bool,
        trailing in vec(any::<u8>(), 0..20),
    ) {
        let exts: Vec<(u16, &[u8])> = exts.iter().map(|(t, d)| (*t, d.as_slice())).collect();
        let mut buf = [0u8; 1024];
        let n = write_server_hello(&mut buf, version, &session_id, &exts, sv12).unwrap();
        let mut bytes = buf[..n].to_vec();
        prop_assert_eq!(server_hello_version(&bytes), version);
        // The next record's bytes after it change nothing.
        bytes.extend(&trailing);
        prop_assert_eq!(server_hello_version(&bytes), version);
        // A cut hello is its version or unknown, never another version.
        for cut in 0..n {
            let got = server_hello_version(&bytes[..cut]);
            prop_assert!(got == version || got == TlsVersion::Unknown, "cut at {}: {:?}", cut, got);
        }
    }
}
