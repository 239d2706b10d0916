use smtpflow_common::{FAMILY_V4, payload::PAYLOAD_BYTES};

use super::*;

fn key(last: u8, port: u16, direction: Direction) -> PeerKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[198, 51, 100, last]);
    PeerKey { ifindex: 2, addr, port, family: FAMILY_V4, direction: direction as u8 }
}

fn event(peer: PeerKey, kind: PayloadKind, text: &str) -> PayloadEvent {
    let mut bytes = [0u8; PAYLOAD_BYTES];
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    PayloadEvent {
        peer,
        kind: kind as u8,
        _pad: 0,
        len: text.len() as u16,
        payload_len: text.len() as u32,
        bytes,
    }
}

fn established(n: u64) -> PeerCounters {
    let mut c = PeerCounters::default();
    c.outcomes[Outcome::Established as usize] = n;
    c
}

fn value(v: &SiteView, site: &str, counted: SiteCounted) -> Option<u64> {
    let s: Vec<u64> = v
        .series
        .iter()
        .filter(|s| &*s.site == site && s.counted == counted)
        .map(|s| s.value)
        .collect();
    (!s.is_empty()).then(|| s.iter().sum())
}

const EST: SiteCounted = SiteCounted::Handshake(Outcome::Established);

/// A read at `at` of these entries and replies.
fn read(
    s: &mut Sites,
    at: Instant,
    entries: &[(PeerKey, PeerCounters)],
    replies: &[(PeerKey, u16, u64)],
) -> SiteView {
    s.start(at);
    for (k, v) in entries {
        s.entry(k, v);
    }
    for (k, code, n) in replies {
        s.reply(&PeerGreetingKey::any(*k, *code), *n);
        s.reply(&PeerGreetingKey::greeting(*k, *code), 1000);
    }
    s.finish(entries.iter().map(|(k, _)| k))
}

/// Sites on port 25 (at most 10) that know one outbound MX, greeting as an outlook.com host.
fn outlook_mx(t0: Instant) -> (Sites, PeerKey) {
    let mut s = Sites::new(SiteMap::default(), 10, &[25]);
    let mx = key(1, 25, Direction::Outbound);
    s.learn(
        &[event(mx, PayloadKind::Greeting, "220 mx3.mail.protection.outlook.com ESMTP\r\n")],
        t0,
    );
    (s, mx)
}

#[test]
fn rises_go_to_the_named_site_and_are_remembered() {
    let t0 = Instant::now();
    let (mut s, mx) = outlook_mx(t0);
    let v = read(&mut s, t0, &[(mx, established(2))], &[(mx, 220, 2), (mx, 250, 4)]);
    assert_eq!(value(&v, "outlook.com", EST), Some(2));
    assert_eq!(value(&v, "outlook.com", SiteCounted::Reply(250)), Some(4));
    assert_eq!(
        value(&v, "outlook.com", SiteCounted::Handshake(Outcome::Refused)),
        Some(0),
        "seeded"
    );
    assert_eq!(v.site_of(&mx), "outlook.com");
    // A nameless 421 greeting later: the peer keeps its site.
    s.learn(&[event(mx, PayloadKind::Greeting, "421 4.3.2 Service not available\r\n")], t0);
    let v = read(&mut s, t0, &[(mx, established(3))], &[(mx, 220, 2), (mx, 250, 4), (mx, 421, 1)]);
    assert_eq!(value(&v, "outlook.com", EST), Some(3));
    assert_eq!(value(&v, "outlook.com", SiteCounted::Reply(421)), Some(1));
    assert_eq!(
        value(&v, "outlook.com", SiteCounted::Reply(220)),
        Some(2),
        "greeting entries not counted"
    );
    assert_eq!(value(&v, UNKNOWN, EST), Some(0));
    // Evicted and created again: all of its new value is new.
    let v = read(&mut s, t0, &[(mx, established(1))], &[]);
    assert_eq!(value(&v, "outlook.com", EST), Some(4));
}

#[test]
fn unnamed_peers_wait_then_go_to_unknown_or_a_cidr_site() {
    let t0 = Instant::now();
    let map = SiteMap::parse("cidr 198.51.100.128/25 microsoft\n").expect("map");
    let mut s = Sites::new(map, 10, &[25, 465]);
    let (a, b, c) = (
        key(1, 465, Direction::Outbound),
        key(2, 465, Direction::Outbound),
        key(200, 25, Direction::Outbound),
    );
    let v = read(&mut s, t0, &[(a, established(1)), (b, established(1)), (c, established(5))], &[]);
    assert_eq!(value(&v, UNKNOWN, EST), Some(0), "held");
    assert_eq!(value(&v, "microsoft", EST), Some(5), "a CIDR rule names it at once");
    // b says its name on another port within the grace: its held counts go to its site.
    s.learn(
        &[event(
            key(2, 25, Direction::Outbound),
            PayloadKind::EhloReply,
            "250-mx.example.net hi\r\n",
        )],
        t0,
    );
    let later = t0 + NAME_GRACE;
    let v =
        read(&mut s, later, &[(a, established(1)), (b, established(1)), (c, established(5))], &[]);
    assert_eq!(value(&v, "example.net", EST), Some(1));
    assert_eq!(value(&v, UNKNOWN, EST), Some(1), "a's after the grace");
    // Inbound names are the client's, in its own cache key; our own server's greeting and
    // EHLO reply name nobody.
    let inbound = key(2, 25, Direction::Inbound);
    s.learn(
        &[
            event(inbound, PayloadKind::Greeting, "220 mx.ours.example ESMTP\r\n"),
            event(inbound, PayloadKind::Ehlo, "EHLO relay.example.org\r\n"),
            event(inbound, PayloadKind::EhloReply, "250 mx.ours.example\r\n"),
        ],
        later,
    );
    let v = read(&mut s, later, &[(inbound, established(1))], &[]);
    assert_eq!(value(&v, "example.org", EST), Some(1));
}

#[test]
fn sites_beyond_the_cap_are_summed_into_other_and_idle_ones_leave() {
    let t0 = Instant::now();
    let mut s = Sites::new(SiteMap::default(), 3, &[25]);
    let peers: Vec<PeerKey> = (1..=10).map(|i| key(i, 25, Direction::Inbound)).collect();
    let events: Vec<PayloadEvent> = peers
        .iter()
        .enumerate()
        .map(|(i, k)| event(*k, PayloadKind::Ehlo, &format!("EHLO host.client{i}.example\r\n")))
        .collect();
    s.learn(&events, t0);
    let entries: Vec<_> =
        peers.iter().enumerate().map(|(i, k)| (*k, established(i as u64 + 1))).collect();
    let v = read(&mut s, t0, &entries, &[]);
    assert_eq!(v.exported, 3);
    let sites: std::collections::BTreeSet<&str> = v.series.iter().map(|s| &*s.site).collect();
    assert_eq!(sites.len(), 5, "3 sites, unknown and other: {sites:?}");
    let total: u64 = (1..=10).sum();
    let exported: u64 = ["client0.example", "client1.example", "client2.example"]
        .iter()
        .map(|site| value(&v, site, EST).expect("exported"))
        .sum();
    assert_eq!(exported, 1 + 2 + 3, "the first three");
    assert_eq!(value(&v, OTHER, EST), Some(total - exported));
    // All idle past --peer-series-idle but one: the places free up.
    s.set_idle(Duration::from_secs(60));
    let mut entries = entries;
    entries[9].1 = established(11);
    let v = read(&mut s, t0 + Duration::from_secs(61), &entries, &[]);
    assert_eq!(v.exported, 1);
    assert_eq!(value(&v, "client9.example", EST), Some(1), "a new place, from its rise");
    assert_eq!(value(&v, OTHER, EST), Some(total - exported), "never goes down");
}

#[test]
fn pending_peers_are_bounded() {
    let t0 = Instant::now();
    let mut s = Sites::new(SiteMap::default(), 3, &[25]);
    s.start(t0);
    for i in 0..(PENDING_KEPT + 10) as u32 {
        let mut k = key(0, 25, Direction::Inbound);
        k.addr[..4].copy_from_slice(&i.to_be_bytes());
        s.entry(&k, &established(1));
    }
    let v = s.finish([]);
    assert_eq!(s.pending.len(), PENDING_KEPT);
    assert_eq!(value(&v, UNKNOWN, EST), Some(10));
}

#[test]
fn open_connections_go_to_the_exported_site_other_or_unknown() {
    let t0 = Instant::now();
    let mut s = Sites::new(SiteMap::default(), 1, &[25]);
    let (a, b, c) = (
        key(1, 25, Direction::Outbound),
        key(2, 25, Direction::Outbound),
        key(3, 25, Direction::Outbound),
    );
    s.learn(
        &[
            event(a, PayloadKind::Greeting, "220 mx3.mail.protection.outlook.com ESMTP\r\n"),
            event(b, PayloadKind::Greeting, "220 mx.example.net ESMTP\r\n"),
        ],
        t0,
    );
    read(&mut s, t0, &[(a, established(1)), (b, established(1))], &[]);
    let mut inbound = c;
    inbound.direction = Direction::Inbound as u8;
    let open = std::collections::HashMap::from([(a, 2u64), (b, 3), (c, 4), (inbound, 1)]);
    let got: Vec<(String, Direction, u64)> = s
        .open_connections(&open)
        .into_iter()
        .map(|o| (o.site.to_string(), o.direction, o.open))
        .collect();
    assert_eq!(
        got,
        [
            ("other".into(), Direction::Inbound, 0),
            ("other".into(), Direction::Outbound, 3),
            ("outlook.com".into(), Direction::Outbound, 2),
            ("unknown".into(), Direction::Inbound, 1),
            ("unknown".into(), Direction::Outbound, 4),
        ]
    );
}

/// Entries with nothing a site counts keep no last value, and their later rises still count
/// whole.
#[test]
fn entries_with_no_counts_are_not_kept() {
    let t0 = Instant::now();
    let (mut s, mx) = outlook_mx(t0);
    let mut entries: Vec<(PeerKey, PeerCounters)> =
        (2..=200).map(|i| (key(i, 25, Direction::Inbound), PeerCounters::default())).collect();
    entries.push((mx, PeerCounters::default()));
    read(&mut s, t0, &entries, &[]);
    assert!(s.entries.is_empty(), "{} kept", s.entries.len());
    entries.pop();
    entries.push((mx, established(3)));
    let v = read(&mut s, t0, &entries, &[]);
    assert_eq!(value(&v, "outlook.com", EST), Some(3));
    assert_eq!(s.entries.len(), 1);
    entries.pop();
    entries.push((mx, established(5)));
    let v = read(&mut s, t0, &entries, &[]);
    assert_eq!(value(&v, "outlook.com", EST), Some(5), "a rise of 2 on 3");
}

/// A peer's timed-out handshakes go to its site as they rise from one read to the next; the
/// part given is kept beside the sweep's count, so a peer the sweep forgot starts over.
#[test]
fn timeouts_go_to_the_site_as_they_rise() {
    const TIMEOUTS: SiteCounted = SiteCounted::Handshake(Outcome::Timeout);
    let t0 = Instant::now();
    let (mut s, mx) = outlook_mx(t0);
    let mut t = PeerTimeouts { total: 3, attributed: 0 };
    let read_timeouts = |s: &mut Sites, t: &mut PeerTimeouts, secs| {
        s.start(t0 + Duration::from_secs(secs));
        s.timeouts(&mx, t);
        s.finish([&mx])
    };
    let v = read_timeouts(&mut s, &mut t, 1);
    assert_eq!(value(&v, "outlook.com", TIMEOUTS), Some(3));
    assert_eq!(t, PeerTimeouts { total: 3, attributed: 3 });
    let v = read_timeouts(&mut s, &mut t, 2);
    assert_eq!(value(&v, "outlook.com", TIMEOUTS), Some(3), "no rise, nothing added");
    t.total = 5;
    let v = read_timeouts(&mut s, &mut t, 3);
    assert_eq!(value(&v, "outlook.com", TIMEOUTS), Some(5));
    // Forgotten by the sweep, counted again from 1: all of it is new.
    let mut again = PeerTimeouts { total: 1, attributed: 0 };
    let v = read_timeouts(&mut s, &mut again, 4);
    assert_eq!(value(&v, "outlook.com", TIMEOUTS), Some(6));
}
