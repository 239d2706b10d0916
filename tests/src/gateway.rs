//! A mail gateway with the background noise of a real one, and the faults it is told apart from.
//! Everything is real sockets in the usual [`Pair`] of namespaces: the peer namespace holds
//! several remote hosts, each an address on its end of the veth pair.
//!
//! The noise of a healthy gateway ([`MailFlow`] and the `*_noise` functions):
//! - mail both ways: inbound sessions to the gateway's [`Mx`], outbound sessions to the main
//!   remote MX ([`MX`]), whose RCPT answer greylists one session in [`GREYLIST_EVERY`]
//!   (`451 4.7.1` and `450 4.2.0`: about 5 %);
//! - a backup MX ([`BACKUP_MX`]) that is down: a few handshakes refused (nothing listens), a few
//!   unanswered (its firewall drops SYNs);
//! - a blocklisted scanner ([`SCANNER`]) whose SYNs to port 25 the gateway's firewall drops;
//! - a web server on the gateway's port 80 whose accept queue overflows (backlog 1, never
//!   accepts), so the namespace's `ListenOverflows` rises.
//!
//! The gateway's firewall ([`gateway_firewall`]) keeps conntrack in use, as on a real gateway.
//! Every count a test asserts comes from what crossed the wire: the clients' own results, the
//! servers' replies as written, nftables counters.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Netns, Pair, in_netns,
    netfilter::{counter_packets, nft_script},
    smtp::{self, Mx, Policy},
    traffic::{Outcome, Traffic, connect_from_within, connect_refused},
};

/// The gateway (where smtpflow watches `sf0`).
pub const GATEWAY: &str = Pair::LOCAL_V4;
/// The main remote MX, and the inbound clients' address.
pub const MX: &str = Pair::PEER_V4;
/// A backup MX that is down (refuses, or drops SYNs).
pub const BACKUP_MX: &str = "10.77.0.3";
/// A remote MX that throttles (the fault of [`Policy::Throttle`]).
pub const BUSY_MX: &str = "10.77.0.4";
/// A blocklisted scanner.
pub const SCANNER: &str = "10.77.0.66";
/// One outbound session in this many gets a greylisting answer (5 %).
pub const GREYLIST_EVERY: u64 = 20;

/// The gateway's nftables table (removed with the namespace).
pub const FIREWALL: &str = "smtpflow_gateway";
/// The backup MX's firewall table, in the peer namespace.
pub const BACKUP_FIREWALL: &str = "smtpflow_backup";

/// `ip:port`.
pub fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().expect("an IP address"), port).to_string()
}

/// The extra remote hosts: [`BACKUP_MX`], [`BUSY_MX`] and [`SCANNER`] on the peer's interface.
pub fn add_remote_hosts(pair: &Pair) {
    for ip in [BACKUP_MX, BUSY_MX, SCANNER] {
        pair.peer.ip(&["addr", "add", &format!("{ip}/24"), "dev", Pair::PEER_IF]);
    }
}

/// The gateway's firewall: conntrack in use (established traffic accepted by state, invalid
/// dropped), the loopback untracked (metrics scrapes), and the blocklist: SYNs from
/// [`SCANNER`] to port 25 dropped, counted in the named counter `scanner`.
pub fn gateway_firewall(ns: &Netns) {
    nft_script(
        ns,
        &format!(
            "table inet {FIREWALL} {{
    counter scanner {{ }}
    chain raw_prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iif \"lo\" notrack
    }}
    chain raw_output {{
        type filter hook output priority raw; policy accept;
        oif \"lo\" notrack
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        ct state invalid drop
        ip saddr {SCANNER} tcp dport 25 counter name \"scanner\" drop
    }}
}}
"
        ),
    );
}

/// The scanner's SYNs the gateway's firewall dropped so far.
pub fn scanner_syns_dropped(ns: &Netns) -> u64 {
    counter_packets(ns, "inet", FIREWALL, "scanner")
}

// ---------------------------------------------------------------------------------------------
// Mail both ways.

/// What a [`MailFlow`] did, from the clients' side.
#[derive(Debug, Default)]
pub struct MailTally {
    /// Inbound messages delivered to the gateway.
    pub inbound: u64,
    /// Outbound messages delivered to [`MX`].
    pub outbound: u64,
    /// Outbound sessions whose RCPT was deferred, by reply code.
    pub deferred: BTreeMap<u16, u64>,
    /// Sessions that went wrong otherwise (must be none).
    pub failures: Vec<String>,
}

impl MailTally {
    pub fn outbound_sessions(&self) -> u64 {
        self.outbound + self.deferred.values().sum::<u64>()
    }
}

/// Mail at a steady rate: one inbound session (peer to the gateway's [`Mx`]) and one outbound
/// session (gateway to [`MX`], greylisting one in [`GREYLIST_EVERY`]) every `every`, each a
/// whole message. Stopped (and counted) by [`MailFlow::stop`], or on drop.
pub struct MailFlow {
    inbound: Option<Traffic>,
    outbound: Traffic,
    deferred: Arc<Mutex<BTreeMap<u16, u64>>>,
    /// The servers: the gateway's own (when inbound mail flows) and the main remote MX.
    pub gateway_mx: Option<Mx>,
    pub remote_mx: Mx,
}

impl MailFlow {
    /// Mail both ways.
    pub fn start(pair: &Pair, every: Duration) -> Self {
        Self::start_with(pair, every, true)
    }

    /// Outbound mail only (for faults that break the gateway's own listener).
    pub fn outbound_only(pair: &Pair, every: Duration) -> Self {
        Self::start_with(pair, every, false)
    }

    fn start_with(pair: &Pair, every: Duration, inbound: bool) -> Self {
        let remote_mx =
            Mx::start(&pair.peer, &addr(MX, 25), Policy::Greylist { every: GREYLIST_EVERY });
        let gateway_mx =
            inbound.then(|| Mx::start(&pair.local, &addr(GATEWAY, 25), Policy::Accept));
        let inbound = inbound.then(|| {
            let to: SocketAddr = addr(GATEWAY, 25).parse().unwrap();
            Traffic::start(&pair.peer, every, move || {
                match smtp::mail(to, Duration::from_secs(5)) {
                    Ok(m) if m.delivered() => Ok(()),
                    Ok(m) => Err(format!("inbound {to}: replies {:?}", m.replies)),
                    Err(e) => Err(format!("inbound {to}: {e}")),
                }
            })
        });
        let deferred = Arc::new(Mutex::new(BTreeMap::new()));
        let tally = deferred.clone();
        let to: SocketAddr = addr(MX, 25).parse().unwrap();
        let outbound = Traffic::start(&pair.local, every, move || {
            match smtp::mail(to, Duration::from_secs(5)) {
                Ok(m) if m.delivered() => Ok(()),
                Ok(m) => match m.deferred() {
                    Some(code) => {
                        *tally.lock().unwrap().entry(code).or_insert(0) += 1;
                        Ok(())
                    }
                    None => Err(format!("outbound {to}: replies {:?}", m.replies)),
                },
                Err(e) => Err(format!("outbound {to}: {e}")),
            }
        });
        Self { inbound, outbound, deferred, gateway_mx, remote_mx }
    }

    /// Stops both directions and counts what the clients saw. Deferred sessions are counted
    /// apart from delivered ones (both are successes).
    pub fn stop(self) -> MailTally {
        let Self { inbound, outbound, deferred, gateway_mx, remote_mx } = self;
        let mut tally = MailTally::default();
        let mut count = |outcomes: Vec<(Instant, Outcome)>| {
            let mut ok = 0;
            for (_, o) in outcomes {
                match o {
                    Ok(()) => ok += 1,
                    Err(e) => tally.failures.push(e),
                }
            }
            ok
        };
        let inbound = inbound.map_or(0, |t| count(t.stop()));
        let outbound = count(outbound.stop());
        drop((gateway_mx, remote_mx));
        tally.inbound = inbound;
        tally.deferred = deferred.lock().unwrap().clone();
        tally.outbound = outbound - tally.deferred.values().sum::<u64>();
        tally
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot noise.

/// `n` outbound attempts to the backup MX's port 25, where nothing listens: each refused (RST).
pub fn backup_mx_refused(pair: &Pair, n: usize) {
    connect_refused(&pair.local, &addr(BACKUP_MX, 25), n);
}

/// `n` outbound attempts to the backup MX while its firewall drops SYNs to port 25, all at once,
/// each given up after `give_up`. Returns the SYNs its firewall dropped (retransmissions
/// included). The firewall is removed again before returning.
pub fn backup_mx_unanswered(pair: &Pair, n: usize, give_up: Duration) -> u64 {
    nft_script(
        &pair.peer,
        &format!(
            "table inet {BACKUP_FIREWALL} {{
    counter backup {{ }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {BACKUP_MX} tcp dport 25 tcp flags & (syn | ack | rst) == syn counter name \"backup\" drop
    }}
}}
"
        ),
    );
    let results = smtp::attempts(&pair.local, &addr(BACKUP_MX, 25), n, give_up);
    let dropped = counter_packets(&pair.peer, "inet", BACKUP_FIREWALL, "backup");
    pair.peer.exec_ok("nft", &["delete", "table", "inet", BACKUP_FIREWALL]);
    let answered: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert!(answered.is_empty(), "the backup MX answered {} attempts: {results:?}", answered.len());
    assert!(dropped >= n as u64, "{dropped} SYNs dropped for {n} attempts");
    dropped
}

/// `n` connection attempts from [`SCANNER`] to the gateway's port 25, all at once, each given up
/// after `give_up`: the gateway's firewall drops every SYN (each attempt retransmits its SYN
/// until it gives up). Returns how many attempts failed (all of them, unless the blocklist is
/// missing).
pub fn scanner_noise(pair: &Pair, n: usize, give_up: Duration) -> usize {
    let src: SocketAddr = addr(SCANNER, 0).parse().unwrap();
    let dst: SocketAddr = addr(GATEWAY, 25).parse().unwrap();
    in_netns(&pair.peer, move || {
        let threads: Vec<_> = (0..n)
            .map(|_| thread::spawn(move || connect_from_within(src, dst, give_up).is_err()))
            .collect();
        threads.into_iter().map(|t| t.join().expect("scanner thread")).filter(|f| *f).count()
    })
}

/// A web server on the gateway's port 80 with an accept backlog of 1 that never accepts: its
/// queue overflows at the first burst ([`WebServer::overflow`]), and stays full.
pub struct WebServer {
    _listener: TcpListener,
}

impl WebServer {
    pub const PORT: u16 = 80;

    pub fn start(pair: &Pair) -> Self {
        Self { _listener: smtp::listen(&pair.local, &addr(GATEWAY, Self::PORT), 1) }
    }

    /// `n` connection attempts from the peer at once, each given up after `give_up`; returns
    /// how many failed (the queue holds two at most: every other SYN overflows it).
    pub fn overflow(&self, pair: &Pair, n: usize, give_up: Duration) -> usize {
        let results = smtp::attempts(&pair.peer, &addr(GATEWAY, Self::PORT), n, give_up);
        results.iter().filter(|r| r.is_err()).count()
    }
}

/// What a round of one-shot noise did.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoiseRound {
    pub backup_refused: u64,
    pub backup_unanswered: u64,
    pub backup_syns_dropped: u64,
    pub scanner_attempts: u64,
    pub web_failed: u64,
}

impl std::ops::AddAssign for NoiseRound {
    fn add_assign(&mut self, o: Self) {
        self.backup_refused += o.backup_refused;
        self.backup_unanswered += o.backup_unanswered;
        self.backup_syns_dropped += o.backup_syns_dropped;
        self.scanner_attempts += o.scanner_attempts;
        self.web_failed += o.web_failed;
    }
}

/// How many of each one-shot noise a round makes: at most 3 handshakes refused and 3 unanswered
/// to the backup MX, 10 scanner attempts (two or three SYNs each), 20 connections to the web
/// server.
pub const BACKUP_REFUSED: usize = 3;
pub const BACKUP_UNANSWERED: usize = 3;
pub const SCANNER_ATTEMPTS: usize = 10;
pub const WEB_ATTEMPTS: usize = 20;

/// One round of the one-shot noise (takes about as long as the longest give-up, 3 s).
pub fn noise_round(pair: &Pair, web: &WebServer) -> NoiseRound {
    let give_up = Duration::from_millis(1500);
    // The scanner runs beside the backup MX's attempts and the web burst.
    let (scanned, dropped, web_failed) = thread::scope(|s| {
        let scanner = s.spawn(|| scanner_noise(pair, SCANNER_ATTEMPTS, Duration::from_secs(3)));
        backup_mx_refused(pair, BACKUP_REFUSED);
        let dropped = backup_mx_unanswered(pair, BACKUP_UNANSWERED, give_up);
        let web_failed = web.overflow(pair, WEB_ATTEMPTS, give_up);
        (scanner.join().expect("scanner thread"), dropped, web_failed)
    });
    assert_eq!(scanned, SCANNER_ATTEMPTS, "every scanner attempt must fail (the blocklist)");
    assert!(web_failed > 0, "the web server's queue did not overflow");
    NoiseRound {
        backup_refused: BACKUP_REFUSED as u64,
        backup_unanswered: BACKUP_UNANSWERED as u64,
        backup_syns_dropped: dropped,
        scanner_attempts: scanned as u64,
        web_failed: web_failed as u64,
    }
}

// ---------------------------------------------------------------------------------------------
// The whole noisy but healthy gateway.

/// A noisy but healthy gateway on a [`Pair`]: the remote hosts, the gateway's firewall, the web
/// server on port 80, and mail both ways every [`NoisyGateway::EVERY`]; [`NoisyGateway::round`]
/// adds a round of one-shot noise.
pub struct NoisyGateway {
    pub flow: MailFlow,
    pub web: WebServer,
    /// The one-shot noise made so far.
    pub noise: NoiseRound,
    pub rounds: u32,
}

impl NoisyGateway {
    /// One inbound and one outbound message every 100 ms: 10 sessions a second each way.
    pub const EVERY: Duration = Duration::from_millis(100);

    pub fn start(pair: &Pair) -> Self {
        add_remote_hosts(pair);
        gateway_firewall(&pair.local);
        let web = WebServer::start(pair);
        let flow = MailFlow::start(pair, Self::EVERY);
        Self { flow, web, noise: NoiseRound::default(), rounds: 0 }
    }

    /// One round of one-shot noise ([`noise_round`]).
    pub fn round(&mut self, pair: &Pair) {
        self.noise += noise_round(pair, &self.web);
        self.rounds += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// A receiver that stops reading.

/// Connections whose server accepts and never reads while the client writes until its sends
/// block: the server's receive window closes, it advertises zero windows, and the client's
/// kernel keeps probing (each probe answered with a zero window again). Held open until dropped.
pub struct Stall {
    _accepted: Vec<std::net::TcpStream>,
    _clients: Vec<std::net::TcpStream>,
    _listener: TcpListener,
}

impl Stall {
    /// `n` such connections to `addr` (IPv4), served in `server_ns` and made from `client_ns`.
    pub fn start(server_ns: &Netns, client_ns: &Netns, addr: &str, n: usize) -> Self {
        let listener = smtp::listen(server_ns, addr, 16);
        let target: SocketAddr = addr.parse().expect("socket address");
        let clients = in_netns(client_ns, move || {
            (0..n)
                .map(|_| {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connect {target}: {e}"))
                })
                .collect::<Vec<_>>()
        });
        let accepted: Vec<_> =
            (0..n).map(|_| smtp::accept_within(&listener, Duration::from_secs(10))).collect();
        for c in &clients {
            fill(c, Duration::from_secs(10));
        }
        Self { _accepted: accepted, _clients: clients, _listener: listener }
    }
}

/// Writes to `s` until a write would block (its peer's window and its own send buffer full),
/// for at most `limit`.
fn fill(s: &std::net::TcpStream, limit: Duration) {
    use std::io::Write as _;
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![b'x'; 64 * 1024];
    let deadline = Instant::now() + limit;
    let mut w = s;
    while Instant::now() < deadline {
        match w.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The window may still open a little as the receiver's buffer grows: once more.
                thread::sleep(Duration::from_millis(200));
                if matches!(w.write(&chunk), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                {
                    return;
                }
            }
            Err(e) => panic!("writing to a stalled receiver: {e}"),
        }
    }
    panic!("the receiver's window never closed within {limit:?}");
}
