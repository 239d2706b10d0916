//! The remote-name parsers (`sites::names`) and the `--site-map` file (`sites::SiteMap`) on
//! arbitrary bytes: never a panic, and a name out is always a valid, bounded, lowercased host
//! name whose site is too.
use proptest::{collection::vec, prelude::*};

use smtpflow::sites::{SiteMap, map::registrable, names};
use smtpflow_common::PayloadKind;

use super::{mangled, texty};

/// What [`names::hostname`] promises of its output.
fn valid(name: &str) {
    assert!(!name.is_empty() && name.len() <= names::MAX_NAME, "{name:?}");
    let labels: Vec<&str> = name.split('.').collect();
    assert!(labels.len() >= 2, "{name:?}");
    for l in &labels {
        assert!((1..=63).contains(&l.len()), "{name:?}");
        assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert!(!l.starts_with('-') && !l.ends_with('-'), "{name:?}");
    }
    let tld = labels[labels.len() - 1];
    assert!(tld.bytes().all(|b| b.is_ascii_lowercase()) || tld.starts_with("xn--"), "{name:?}");
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..600),
        texty().prop_map(String::into_bytes),
        mangled(b"220 mx3.mail.protection.outlook.com Microsoft ESMTP MAIL Service ready\r\n"),
        mangled(b"250-mx.example.net Hello [203.0.113.9]\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"),
        mangled(b"EHLO client-7.relay.example.co.uk\r\n"),
        "(220|250|421)[ -]([a-zA-Z0-9-]{0,70}\\.){0,6}[a-zA-Z0-9-]{0,10}\\.?( .*)?"
            .prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn names_are_valid_or_none(bytes in payload(), kind in 0u8..4) {
        let kind = PayloadKind::from_repr(kind).expect("a kind");
        if let Some(name) = names::name_of(kind, &bytes) {
            valid(&name);
            let site = SiteMap::default().site_of_name(&name);
            prop_assert!(!site.is_empty() && site.len() <= name.len());
            prop_assert!(name.ends_with(&*site), "{name} {site}");
            prop_assert!(site.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
            prop_assert_eq!(registrable(&name), &*site);
        }
    }

    #[test]
    fn site_maps_parse_or_fail(text in prop_oneof![
        texty(),
        "((suffix|cidr|#| )[ a-z0-9./:_-]{0,40}\n){0,8}",
    ]) {
        if let Ok(map) = SiteMap::parse(&text) {
            let _ = map.site_of_name("mx.example.com");
            let _ = map.site_of_addr("192.0.2.1".parse().expect("addr"));
        }
    }
}
