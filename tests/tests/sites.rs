//! Per-site series: remotes named by what they say, summed by site.
//!
//! Outbound: two MXs in the peer namespace, one greeting as `mx3.mail.protection.outlook.com`
//! (site `outlook.com`), the other as `mx.example.net` (`example.net`). Mail to both, then the
//! first is replaced by a server answering every session with a nameless `421 4.7.0` greeting:
//! its sessions still count for `outlook.com` (the name its earlier sessions said), the site
//! series equal what a packet capture on the gateway saw from each MX, and `remote_throttling`
//! names `outlook.com` in its log line, its top-peer gauge and its sentence.
//!
//! Inbound: clients from distinct addresses, each saying `EHLO` with a name of its own domain,
//! more domains than `--max-site-series`: the first sites get their own series, the rest is
//! summed into `other`, and every site's sessions are accounted for exactly once.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use smtpflow_tests::{
    Metrics, Pair, Watch,
    capture::Capture,
    diagnosis::{active, top_peers},
    in_netns,
    names::{
        HANDSHAKES, REPLIES, RESETS, SITE_HANDSHAKES, SITE_OPEN, SITE_REPLIES, SITE_RESETS,
        SITES_EXPORTED, TOP_PEER,
    },
    require_root,
    smtp::{Mail, Mx, Policy, greet_and_hold, mail, mail_from, quit},
};

const IF: &str = Pair::LOCAL_IF;
/// The MX greeting as Microsoft's, then throttling.
const OUTLOOK_MX: &str = "10.77.2.1";
const OUTLOOK_NAME: &str = "mx3.mail.protection.outlook.com";
/// The other MX.
const EXAMPLE_MX: &str = "10.77.2.2";
const EXAMPLE_NAME: &str = "mx.example.net";
/// Messages to each MX while both accept, then sessions throttled by the first.
const NAMED_MAILS: usize = 6;
const EXAMPLE_MAILS: usize = 4;
const THROTTLED: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(5);

const OUTCOMES: [&str; 4] = ["established", "refused", "timeout", "unreachable"];
const PHASES: [&str; 3] = ["handshake", "pre_greeting", "session"];

/// What the gateway received from one remote address on port 25, read from the frames.
#[derive(Debug, Default)]
struct FromWire {
    /// SYNs (without ACK) to the port.
    syns: u64,
    syn_acks: u64,
    rsts: u64,
    /// Segments with a payload that starts with a reply code, by code.
    replies: BTreeMap<u16, u64>,
}

/// The oracle's own reading of received IPv4/TCP frames from or to `port`, by source address.
fn from_wire(frames: &[Vec<u8>], port: u16) -> BTreeMap<Ipv4Addr, FromWire> {
    let mut out: BTreeMap<Ipv4Addr, FromWire> = BTreeMap::new();
    for f in frames {
        if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let Some(tcp) = f.get(14 + ihl..(14 + total).min(f.len())) else { continue };
        if tcp.len() < 20 {
            continue;
        }
        let (sport, dport) =
            (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
        let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
        let flags = tcp[13];
        if dport == port {
            if flags & 0x12 == 0x02 {
                out.entry(src).or_default().syns += 1;
            }
            continue;
        }
        if sport != port {
            continue;
        }
        let w = out.entry(src).or_default();
        if flags & 0x12 == 0x12 {
            w.syn_acks += 1;
        }
        if flags & 0x04 != 0 {
            w.rsts += 1;
        }
        let payload = tcp.get(usize::from(tcp[12] >> 4) * 4..).unwrap_or_default();
        if let Some(code) = payload.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit)) {
            let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
            *w.replies.entry(code).or_default() += 1;
        }
    }
    out
}

/// `n` messages from the gateway to `mx`, each ending cleanly.
fn send(pair: &Pair, mx: &str, n: usize) -> Vec<Mail> {
    let addr: SocketAddr = format!("{mx}:25").parse().expect("an address");
    in_netns(&pair.local, move || {
        (0..n)
            .map(|i| mail(addr, TIMEOUT).unwrap_or_else(|e| panic!("mail {i} to {addr}: {e}")))
            .collect()
    })
}

/// The sum of the replies' codes the client read, by code.
fn codes(mails: &[Mail]) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for m in mails {
        for c in &m.replies {
            *out.entry(*c).or_default() += 1;
        }
    }
    out
}

fn outbound_site<'a>(site: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![("direction", "outbound"), ("port", "25"), ("site", site)];
    l.extend_from_slice(extra);
    l
}

/// Asserts that the one series of `name` with exactly these labels exists and is `want`.
fn exactly(m: &Metrics, name: &str, labels: &[(&str, &str)], want: u64) {
    assert_eq!(m.get(name, labels), Some(want as f64), "{name}{labels:?}:\n{}", site_lines(m));
}

fn site_lines(m: &Metrics) -> String {
    m.text.lines().filter(|l| l.contains("site")).collect::<Vec<_>>().join("\n")
}

#[test]
fn outbound_sites_count_exactly_and_the_throttling_cause_names_its_site() {
    require_root!();
    let pair = Pair::new();
    for a in [OUTLOOK_MX, EXAMPLE_MX] {
        pair.peer.ip(&["addr", "add", &format!("{a}/32"), "dev", Pair::PEER_IF]);
    }
    pair.local.ip(&["route", "add", "10.77.2.0/24", "dev", IF]);
    let w = Watch::start(
        &pair.local,
        IF,
        &["--window", "60s", "--min-failures", "5", "--max-site-series", "10"],
    );
    let capture = Capture::start(&pair.local, IF);

    let named =
        Mx::start_named(&pair.peer, &format!("{OUTLOOK_MX}:25"), Policy::Accept, OUTLOOK_NAME);
    let example =
        Mx::start_named(&pair.peer, &format!("{EXAMPLE_MX}:25"), Policy::Accept, EXAMPLE_NAME);
    let mut outlook_mails = send(&pair, OUTLOOK_MX, NAMED_MAILS);
    let mut example_mails = send(&pair, EXAMPLE_MX, EXAMPLE_MAILS);
    assert!(
        outlook_mails.iter().chain(&example_mails).all(Mail::delivered),
        "every message delivered"
    );
    // One more session to it, held open after the greeting: example.net has 1 open connection.
    let addr: SocketAddr = format!("{EXAMPLE_MX}:25").parse().expect("an address");
    let held = in_netns(&pair.local, move || greet_and_hold(addr, TIMEOUT))
        .unwrap_or_else(|e| panic!("a held session to {addr}: {e}"));
    let open_at = |m: &Metrics, site: &str| m.get(SITE_OPEN, &outbound_site(site, &[]));
    smtpflow_tests::wait_for(Duration::from_secs(10), || {
        (open_at(&w.scrape(&pair.local), "example.net") == Some(1.0)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!("no open connection at example.net:\n{}", site_lines(&w.scrape(&pair.local)))
    });
    let m = w.scrape(&pair.local);
    assert_eq!(open_at(&m, "outlook.com"), Some(0.0), "{}", site_lines(&m));
    assert_eq!(open_at(&m, "unknown"), Some(0.0), "{}", site_lines(&m));
    let held = in_netns(&pair.local, move || quit(held)).expect("QUIT the held session");
    assert_eq!(held.replies, [220, 221]);
    example_mails.push(held);
    drop(named);
    // The same address now throttles, greeting with no name.
    let throttling = Mx::start(&pair.peer, &format!("{OUTLOOK_MX}:25"), Policy::Throttle);
    let throttled = send(&pair, OUTLOOK_MX, THROTTLED);
    assert!(
        throttled.iter().all(|m| m.replies == [421]),
        "{:?}",
        throttled.iter().map(|m| &m.replies).collect::<Vec<_>>()
    );
    outlook_mails.extend(throttled);
    drop(throttling);
    drop(example);

    // What the gateway received, from the wire; the clients read the same replies.
    let wire = from_wire(&capture.finish(), 25);
    let of = |a: &str| {
        wire.get(&a.parse::<Ipv4Addr>().expect("v4")).unwrap_or_else(|| panic!("nothing from {a}"))
    };
    let (outlook, example) = (of(OUTLOOK_MX), of(EXAMPLE_MX));
    assert_eq!(outlook.replies, codes(&outlook_mails), "the capture against the client");
    assert_eq!(example.replies, codes(&example_mails), "the capture against the client");
    assert_eq!(outlook.syn_acks, (NAMED_MAILS + THROTTLED) as u64);
    assert_eq!(example.syn_acks, EXAMPLE_MAILS as u64 + 1, "and the held session");
    assert_eq!((outlook.rsts, example.rsts), (0, 0), "clean closes");

    let code_labels: Vec<(&str, String, u64)> =
        [("outlook.com", outlook), ("example.net", example)]
            .into_iter()
            .flat_map(|(site, w)| w.replies.iter().map(move |(c, n)| (site, c.to_string(), *n)))
            .collect();
    let mut expected = Vec::new();
    for (site, code, n) in &code_labels {
        expected.push((SITE_REPLIES, outbound_site(site, &[("code", code.as_str())]), *n));
    }
    for (site, w) in [("outlook.com", outlook), ("example.net", example)] {
        expected.push((
            SITE_HANDSHAKES,
            outbound_site(site, &[("outcome", "established")]),
            w.syn_acks,
        ));
    }
    let m = w.expect_settled(&pair.local, &expected);

    // Exactly these series, zeros included: every outcome and phase of each site, unknown
    // and other; no reply code the MX did not send.
    for (site, wire) in [("outlook.com", outlook), ("example.net", example)] {
        for o in OUTCOMES {
            let want = if o == "established" { wire.syn_acks } else { 0 };
            exactly(&m, SITE_HANDSHAKES, &outbound_site(site, &[("outcome", o)]), want);
        }
        for p in PHASES {
            exactly(&m, SITE_RESETS, &outbound_site(site, &[("phase", p)]), 0);
        }
        let got: BTreeMap<u16, u64> = m
            .matching(SITE_REPLIES, &outbound_site(site, &[]))
            .map(|(l, v)| {
                let code =
                    l.iter().find(|(k, _)| k == "code").map(|(_, c)| c.parse().expect("a code"));
                (code.expect("a code label"), v as u64)
            })
            .collect();
        assert_eq!(got, wire.replies, "{site}'s replies by code:\n{}", site_lines(&m));
    }
    for site in ["unknown", "other"] {
        for o in OUTCOMES {
            exactly(&m, SITE_HANDSHAKES, &outbound_site(site, &[("outcome", o)]), 0);
        }
        for p in PHASES {
            exactly(&m, SITE_RESETS, &outbound_site(site, &[("phase", p)]), 0);
        }
    }
    assert_eq!(m.get(SITES_EXPORTED, &[]), Some(2.0));
    for site in ["outlook.com", "example.net", "unknown", "other"] {
        exactly(&m, SITE_OPEN, &outbound_site(site, &[]), 0);
    }
    // The sites sum to the exact totals.
    let out = [("direction", "outbound"), ("port", "25")];
    assert_eq!(m.sum(SITE_REPLIES, &out), m.sum(REPLIES, &out));
    assert_eq!(
        m.sum(
            SITE_HANDSHAKES,
            &[("direction", "outbound"), ("port", "25"), ("outcome", "established")]
        ),
        m.sum(HANDSHAKES, &[("direction", "outbound"), ("port", "25"), ("outcome", "established")])
    );
    assert_eq!(m.sum(SITE_RESETS, &out), m.sum(RESETS, &out));

    // The throttling cause names the site: its gauge, its peer's site label, its log line.
    assert!(active(&m).contains(&"remote_throttling"), "{}", w.stderr());
    let peers = top_peers(&m, "remote_throttling");
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!((peers[0].0.as_str(), peers[0].1.as_str()), (IF, OUTLOOK_MX));
    let site_of_peer = m
        .matching(TOP_PEER, &[("cause", "remote_throttling"), ("peer", OUTLOOK_MX)])
        .next()
        .map(|(l, _)| {
            l.iter().find(|(k, _)| k == "site").map(|(_, v)| v.clone()).unwrap_or_default()
        });
    assert_eq!(site_of_peer.as_deref(), Some("outlook.com"));
    let stderr = w.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("diagnosis: remote_throttling is active: "))
        .unwrap_or_else(|| panic!("no remote_throttling line:\n{stderr}"));
    for part in [
        "is active: outlook.com, 421 or rate-limit replies on ",
        &format!(" sessions, peers {OUTLOOK_MX} on {IF} ("),
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
}

/// Clients `10.77.3.1` to `10.77.3.<CLIENTS>`, client `i` saying `EHLO mail.client<i>.example`.
const CLIENTS: usize = 12;
const MAX_SITES: usize = 4;

fn client(i: usize) -> String {
    format!("10.77.3.{}", i + 1)
}

/// The sites exported with their own series, in `m`, beside `unknown` and `other`.
fn inbound_sites(m: &Metrics) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (l, v) in m.matching(
        SITE_HANDSHAKES,
        &[("direction", "inbound"), ("port", "25"), ("outcome", "established")],
    ) {
        let site = l.iter().find(|(k, _)| k == "site").map(|(_, s)| s.clone()).unwrap_or_default();
        *out.entry(site).or_default() += v as u64;
    }
    out
}

#[test]
fn inbound_ehlo_names_beyond_the_cap_are_summed_into_other() {
    require_root!();
    let pair = Pair::new();
    for i in 0..CLIENTS {
        pair.peer.ip(&["addr", "add", &format!("{}/32", client(i)), "dev", Pair::PEER_IF]);
    }
    pair.local.ip(&["route", "add", "10.77.3.0/24", "dev", IF]);
    let max = MAX_SITES.to_string();
    let w = Watch::start(&pair.local, IF, &["--max-site-series", &max]);
    let capture = Capture::start(&pair.local, IF);
    let _mx = Mx::start(&pair.local, &format!("{}:25", Pair::LOCAL_V4), Policy::Accept);
    let dst: SocketAddr = format!("{}:25", Pair::LOCAL_V4).parse().expect("an address");
    // One client at a time, each site's first session after the one before it was counted,
    // so the order of first activity is the clients' order.
    let mut sessions = BTreeMap::new();
    for i in 0..CLIENTS {
        let src: SocketAddr = format!("{}:0", client(i)).parse().expect("an address");
        let mails = in_netns(&pair.peer, move || {
            (0..=(i % 3))
                .map(|_| {
                    mail_from(src, dst, TIMEOUT, &format!("mail.client{i}.example"))
                        .unwrap_or_else(|e| panic!("mail from {src}: {e}"))
                })
                .collect::<Vec<Mail>>()
        });
        assert!(mails.iter().all(Mail::delivered));
        sessions.insert(format!("client{i}.example"), mails.len() as u64);
        if i < MAX_SITES {
            let site = format!("client{i}.example");
            let want = mails.len() as u64;
            smtpflow_tests::wait_for(Duration::from_secs(10), || {
                (inbound_sites(&w.scrape(&pair.local)).get(&site) == Some(&want)).then_some(())
            })
            .unwrap_or_else(|| {
                panic!("{site} not counted:\n{}", site_lines(&w.scrape(&pair.local)))
            });
        }
    }
    // The SYN-ACKs the gateway sent are not received frames: the clients' SYNs are the
    // handshakes (each answered: every message was delivered).
    let wire = from_wire(&capture.finish(), 25);
    for i in 0..CLIENTS {
        let a: Ipv4Addr = client(i).parse().expect("v4");
        let syns = wire.get(&a).map_or(0, |w| w.syns);
        assert_eq!(syns, sessions[&format!("client{i}.example")], "SYNs from {a} on the wire");
    }
    let total: u64 = sessions.values().sum();
    let first: Vec<String> = (0..MAX_SITES).map(|i| format!("client{i}.example")).collect();
    let in_other: u64 = sessions.iter().filter(|(s, _)| !first.contains(s)).map(|(_, n)| n).sum();
    let mut expected = vec![(
        SITE_HANDSHAKES,
        vec![
            ("direction", "inbound"),
            ("port", "25"),
            ("site", "other"),
            ("outcome", "established"),
        ],
        in_other,
    )];
    for s in &first {
        expected.push((
            SITE_HANDSHAKES,
            vec![
                ("direction", "inbound"),
                ("port", "25"),
                ("site", s.as_str()),
                ("outcome", "established"),
            ],
            sessions[s],
        ));
    }
    let m = w.expect_settled(&pair.local, &expected);
    let sites = inbound_sites(&m);
    let mut want: BTreeMap<String, u64> = first.iter().map(|s| (s.clone(), sessions[s])).collect();
    want.insert("other".into(), in_other);
    want.insert("unknown".into(), 0);
    assert_eq!(sites, want, "bounded: {MAX_SITES} sites, other and unknown:\n{}", site_lines(&m));
    assert_eq!(sites.values().sum::<u64>(), total);
    assert_eq!(
        total,
        m.sum(HANDSHAKES, &[("direction", "inbound"), ("port", "25"), ("outcome", "established")]),
        "every session once"
    );
    assert_eq!(m.get(SITES_EXPORTED, &[]), Some(MAX_SITES as f64));
    let labelled: std::collections::BTreeSet<String> = m.label_values("site");
    assert_eq!(labelled.len(), MAX_SITES + 2, "no other site anywhere: {labelled:?}");
    // Each client's EHLO reply (250) and greeting count for the site, every code summed.
    let inb = [("direction", "inbound"), ("port", "25")];
    assert_eq!(m.sum(SITE_REPLIES, &inb), m.sum(REPLIES, &inb));
}

/// `--site-map`: a `cidr` rule names a peer that never greets by name (it throttles from its
/// first session), and a `suffix` rule maps a name under `outlook.com` to the same site of the
/// operator's, `microsoft`.
#[test]
fn site_map_rules_name_peers_by_suffix_and_by_prefix() {
    require_root!();
    const NAMELESS_MX: &str = "10.77.2.3";
    const EU_MX: &str = "10.77.2.4";
    const SESSIONS: usize = 5;
    let pair = Pair::new();
    for a in [NAMELESS_MX, EU_MX] {
        pair.peer.ip(&["addr", "add", &format!("{a}/32"), "dev", Pair::PEER_IF]);
    }
    pair.local.ip(&["route", "add", "10.77.2.0/24", "dev", IF]);
    let dir = smtpflow_tests::tempdir::TempDir::new("site-map");
    let map = dir.write(
        "sites",
        format!(
            "# the operator's sites\nsuffix outlook.com microsoft\ncidr {NAMELESS_MX}/32 microsoft # EOP\n"
        ),
    );
    let w = Watch::start(&pair.local, IF, &["--site-map", &map]);
    let capture = Capture::start(&pair.local, IF);
    let nameless = Mx::start(&pair.peer, &format!("{NAMELESS_MX}:25"), Policy::Throttle);
    let eu =
        Mx::start_named(&pair.peer, &format!("{EU_MX}:25"), Policy::Accept, "mx.eu.outlook.com");
    let mut mails = send(&pair, NAMELESS_MX, SESSIONS);
    assert!(mails.iter().all(|m| m.replies == [421]));
    let named = send(&pair, EU_MX, SESSIONS);
    assert!(named.iter().all(Mail::delivered));
    mails.extend(named);
    drop((nameless, eu));
    let wire = from_wire(&capture.finish(), 25);
    let mut syn_acks = 0;
    let mut replies: BTreeMap<u16, u64> = BTreeMap::new();
    for a in [NAMELESS_MX, EU_MX] {
        let w = wire
            .get(&a.parse::<Ipv4Addr>().expect("v4"))
            .unwrap_or_else(|| panic!("nothing from {a}"));
        syn_acks += w.syn_acks;
        for (c, n) in &w.replies {
            *replies.entry(*c).or_default() += n;
        }
    }
    assert_eq!(syn_acks, 2 * SESSIONS as u64);
    assert_eq!(replies, codes(&mails), "the capture against the clients");
    let code_labels: Vec<(String, u64)> =
        replies.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    let mut expected = vec![(
        SITE_HANDSHAKES,
        outbound_site("microsoft", &[("outcome", "established")]),
        syn_acks,
    )];
    for (code, n) in &code_labels {
        expected.push((SITE_REPLIES, outbound_site("microsoft", &[("code", code.as_str())]), *n));
    }
    let m = w.expect_settled(&pair.local, &expected);
    exactly(&m, SITE_HANDSHAKES, &outbound_site("unknown", &[("outcome", "established")]), 0);
    exactly(&m, SITE_HANDSHAKES, &outbound_site("other", &[("outcome", "established")]), 0);
    assert_eq!(m.get(SITES_EXPORTED, &[]), Some(1.0), "{}", site_lines(&m));
    assert!(!m.label_values("site").contains("outlook.com"), "{}", site_lines(&m));
}
