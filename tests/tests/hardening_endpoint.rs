//! The hardening contract, part 1: the metrics endpoint faces the network. Only `GET /metrics`
//! and `/healthz`, bounded request heads, header and connection timeouts (slowloris), a bound on
//! concurrent connections, and 1,000 concurrent scrapes all answered in full; against the real
//! `smtpflow watch` binary in test-owned namespaces.
//!
//! Numbers worth reading (latencies) are printed on stderr: run with `--nocapture` to see them.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use smtpflow_tests::{
    Metrics, Netns, Pair, Watch,
    expect::{counters, ev, inbound_only},
    http::{self, timed_scrape},
    in_netns,
    names::{BUILD_INFO, DRAIN_DURATION, EVENTS, PREFIX},
    netfilter::RstOracle,
    procfs::{connections_held, netstat, raise_nofile},
    require_root, spawn_in_netns,
    traffic::inbound,
    wait_for,
};

const SF0: &str = Pair::LOCAL_IF;
/// `serve.rs`: connections served at once, header timeout, connection lifetime.
const MAX_CONNECTIONS: usize = 512;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn endpoint_serves_only_get_metrics_and_healthz() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);
    let req = |method: &str, path: &str| {
        http::request(&pair.local, &w.addr, method, path)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };
    for path in ["/metrics", "/metrics?x=1", "/healthz"] {
        let r = req("GET", path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.head());
    }
    for path in
        ["/", "/metrics/", "/METRICS", "/metricsx", "/debug/pprof", "/favicon.ico", "//metrics"]
    {
        let r = req("GET", path);
        assert_eq!(r.status, 404, "GET {path}: {}\n{}", r.head(), r.body);
        assert!(!r.body.contains(PREFIX), "GET {path} leaked metrics: {}", r.body);
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        for path in ["/metrics", "/healthz"] {
            let r = req(method, path);
            assert_eq!(r.status, 405, "{method} {path}: {}\n{}", r.head(), r.body);
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}: {}", r.head());
            assert!(!r.body.contains(PREFIX), "{method} {path} leaked metrics: {}", r.body);
        }
    }
    // HTTP/1.0 and an absolute-form target are still plain GETs of /metrics.
    let addr = w.addr.clone();
    let (status, _, body) = in_netns(&pair.local, move || {
        http::raw(&addr, b"GET /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(5))
    })
    .expect("HTTP/1.0 GET");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(BUILD_INFO));
    // Garbage is refused and the server carries on.
    let addr = w.addr.clone();
    let (status, head, _) = in_netns(&pair.local, move || {
        http::raw(&addr, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", Duration::from_secs(5))
    })
    .expect("garbage request");
    assert!(status == 400 || status == 0, "garbage answered {status}: {head}");
    assert_eq!(req("GET", "/healthz").status, 200, "the server stopped serving");
}

#[test]
fn endpoint_refuses_request_heads_over_16_kib() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);
    let send = |head: Vec<u8>| {
        let addr = w.addr.clone();
        in_netns(&pair.local, move || {
            let t = Instant::now();
            let r = http::raw(&addr, &head, Duration::from_secs(10));
            (r, t.elapsed())
        })
    };
    let request = |headers: &str| {
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
            .into_bytes()
    };
    // Under the limit: served.
    let (r, _) = send(request(&format!("X-Pad: {}\r\n", "a".repeat(12 * 1024))));
    let (status, head, _) = r.expect("a 12 KiB head");
    assert_eq!(status, 200, "a 12 KiB request head must be served: {head}");

    // Over it: one long header, many headers, and a 1 MiB head; each refused (431, or the
    // connection closed without an answer), quickly, without reading the whole megabyte.
    let many: String = (0..400).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(60))).collect();
    let cases = [
        ("one 20 KiB header", request(&format!("X-Pad: {}\r\n", "a".repeat(20 * 1024)))),
        ("400 headers, 26 KiB", request(&many)),
        ("a 1 MiB header", request(&format!("X-Pad: {}\r\n", "c".repeat(1 << 20)))),
    ];
    for (what, head) in cases {
        let (r, took) = send(head);
        match r {
            Ok((status, head, body)) => {
                assert!(
                    status == 431 || status == 0,
                    "{what}: expected 431 or no answer, got {status}: {head}\n{}",
                    String::from_utf8_lossy(&body)
                );
                eprintln!("{what}: answered {status} in {took:?}");
            }
            Err(e) => eprintln!("{what}: connection ended without an answer ({e}) in {took:?}"),
        }
        assert!(took < Duration::from_secs(5), "{what}: took {took:?} to be refused");
        assert!(http::healthy(&pair.local, &w.addr), "{what}: the server stopped serving");
    }
    let m = w.scrape(&pair.local);
    assert!(m.get(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).is_some());
}

/// Slow clients, each on its own connection, sending one header byte every `every`, until the
/// server closes the connection or `deadline` passes. Returns, per connection, how long after
/// connecting the server closed it (`None`: still open at the deadline).
fn slowloris(
    ns: &Netns,
    addr: &str,
    n: usize,
    every: Duration,
    deadline: Duration,
) -> thread::JoinHandle<Vec<Option<Duration>>> {
    let addr: SocketAddr = addr.parse().unwrap();
    let streams: Vec<(TcpStream, Instant)> = in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .expect("slowloris connect");
                s.set_nonblocking(true).unwrap();
                (s, Instant::now())
            })
            .collect()
    });
    thread::spawn(move || {
        let start = Instant::now();
        let mut closed: Vec<Option<Duration>> = vec![None; streams.len()];
        let prefix = b"GET /metrics HTTP/1.1\r\nX-Slow: ";
        let mut sent = 0usize;
        let mut next = Instant::now();
        while start.elapsed() < deadline && closed.iter().any(Option::is_none) {
            let now = Instant::now();
            let write = now >= next;
            if write {
                next = now + every;
            }
            for (i, (s, t0)) in streams.iter().enumerate() {
                if closed[i].is_some() {
                    continue;
                }
                let mut buf = [0u8; 4096];
                match (&*s).read(&mut buf) {
                    Ok(_) => closed[i] = Some(t0.elapsed()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => closed[i] = Some(t0.elapsed()),
                }
                if write && closed[i].is_none() {
                    let byte = if sent < prefix.len() { &prefix[sent..=sent] } else { b"a" };
                    let _ = (&*s).write(byte);
                }
            }
            if write {
                sent += 1;
            }
            thread::sleep(Duration::from_millis(50));
        }
        closed
    })
}

#[test]
fn slowloris_cannot_hold_the_endpoint() {
    require_root!();
    raise_nofile();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);

    // Fewer slow clients than the connection bound: scrapes stay prompt, and every slow client is
    // cut off by the header timeout although it keeps sending (the timeout is not per byte).
    let slow =
        slowloris(&pair.local, &w.addr, 300, Duration::from_secs(2), Duration::from_secs(30));
    thread::sleep(Duration::from_secs(1));
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (status, took, _) = timed_scrape(&pair.local, &w.addr, Duration::from_secs(5));
        assert_eq!(status, 200, "a scrape failed while 300 slow clients were connected");
        worst = worst.max(took);
        thread::sleep(Duration::from_millis(300));
    }
    eprintln!("300 slowloris connections: worst scrape latency {worst:?}");
    assert!(worst < Duration::from_secs(1), "scrapes took up to {worst:?} beside slow clients");
    let closed = slow.join().unwrap();
    let open = closed.iter().filter(|c| c.is_none()).count();
    let latest = closed.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("300 slowloris connections: all cut off, the last after {latest:?}");
    assert_eq!(open, 0, "{open} of 300 slow clients still connected after 30 s");
    assert!(
        latest <= HEADER_TIMEOUT + Duration::from_secs(4),
        "a slow client held its connection for {latest:?} (header timeout {HEADER_TIMEOUT:?})"
    );

    // More slow clients than the bound: the extra ones wait in the listen backlog (128 deep:
    // tokio's default, so 512 + 128 connections fit; more would see their SYNs dropped), and a
    // scrape gets through once the header timeout has freed the slots: never stuck.
    let slow =
        slowloris(&pair.local, &w.addr, 600, Duration::from_secs(2), Duration::from_secs(40));
    thread::sleep(Duration::from_millis(500));
    let (status, took, _) = timed_scrape(&pair.local, &w.addr, Duration::from_secs(30));
    eprintln!("600 slowloris connections (bound {MAX_CONNECTIONS}): a scrape took {took:?}");
    assert_eq!(status, 200, "no scrape got through 600 slow clients (after {took:?})");
    assert!(
        took <= HEADER_TIMEOUT + Duration::from_secs(5),
        "a scrape took {took:?} beside 600 slow clients"
    );
    let closed = slow.join().unwrap();
    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{open} of 600 slow clients still connected after 40 s");
    let (status, took, _) = timed_scrape(&pair.local, &w.addr, Duration::from_secs(5));
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "after the slow clients left a scrape took {took:?}");
}

#[test]
fn concurrent_connections_are_bounded() {
    require_root!();
    raise_nofile();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);
    let pid = w.pid();
    let addr: SocketAddr = w.addr.parse().unwrap();
    // 600 idle connections: all complete their TCP handshake (512 taken, 88 in the listen
    // backlog, which is 128 deep), but smtpflow takes at most MAX_CONNECTIONS of them at a time.
    let idle: Vec<TcpStream> = in_netns(&pair.local, move || {
        (0..600)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
            .collect()
    });
    let reached = wait_for(Duration::from_secs(5), || {
        (connections_held(pid, addr.port()) >= MAX_CONNECTIONS).then_some(())
    });
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(connections_held(pid, addr.port()));
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("600 idle connections: smtpflow held at most {most} (bound {MAX_CONNECTIONS})");
    assert!(reached.is_some(), "smtpflow never took {MAX_CONNECTIONS} connections: {most}");
    assert_eq!(most, MAX_CONNECTIONS, "connections held beyond the bound");
    // The idle ones are cut by the header timeout; then everything is served again.
    let t = Instant::now();
    let (status, took, _) = timed_scrape(&pair.local, &w.addr, Duration::from_secs(30));
    eprintln!("a scrape queued behind 600 idle connections took {took:?}");
    assert_eq!(status, 200);
    assert!(took <= HEADER_TIMEOUT + Duration::from_secs(5), "queued scrape took {took:?}");
    let released = wait_for(HEADER_TIMEOUT * 2 + Duration::from_secs(5), || {
        (connections_held(pid, addr.port()) == 0).then_some(())
    });
    assert!(
        released.is_some(),
        "smtpflow still holds {} connections {:?} later",
        connections_held(pid, addr.port()),
        t.elapsed()
    );
    drop(idle);
}

#[test]
fn connection_lifetime_is_bounded() {
    require_root!();
    let pair = Pair::new();
    let w = Watch::start(&pair.local, SF0, &[]);
    let addr: SocketAddr = w.addr.parse().unwrap();
    // One keep-alive connection, a request every 5 s: each is answered, and the server still
    // closes the connection once it is CONNECTION_TIMEOUT old.
    let (served, lived) = in_netns(&pair.local, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        let mut served = 0;
        while t0.elapsed() < CONNECTION_TIMEOUT + Duration::from_secs(15) {
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
                    served += 1;
                }
            }
            thread::sleep(Duration::from_secs(5));
        }
        (served, t0.elapsed())
    });
    eprintln!("a keep-alive connection was served {served} requests and closed after {lived:?}");
    assert!(served >= 10, "only {served} requests served on a keep-alive connection");
    assert!(
        lived <= CONNECTION_TIMEOUT + Duration::from_secs(6),
        "a keep-alive connection lived {lived:?} (cap {CONNECTION_TIMEOUT:?})"
    );
}

#[test]
fn a_thousand_concurrent_scrapes() {
    require_root!();
    raise_nofile();
    let pair = Pair::new();
    let rsts = RstOracle::install(&pair.local, SF0);
    let w = Watch::start(&pair.local, SF0, &[]);
    // Some per-peer series first, so the body is not trivial.
    let _open = inbound(&pair, 3);
    counters(|| w.scrape(&pair.local), || inbound_only(3, &rsts.read()), || w.stderr());

    const N: usize = 1000;
    let overflows_before = netstat(&pair.local, "TcpExt", "ListenOverflows");
    let barrier = Arc::new(Barrier::new(N));
    let started = Instant::now();
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let barrier = barrier.clone();
            let addr = w.addr.clone();
            spawn_in_netns(&pair.local, move || {
                barrier.wait();
                let t = Instant::now();
                let req =
                    format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                let r = http::raw(&addr, req.as_bytes(), Duration::from_secs(30));
                (r, t.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(N);
    let mut failures = Vec::new();
    for h in handles {
        let (r, took) = h.join().expect("scrape thread");
        latencies.push(took);
        match r {
            Ok((200, head, body)) => {
                let len: Option<usize> =
                    http::header(&head, "content-length").and_then(|v| v.parse().ok());
                let text = String::from_utf8_lossy(&body);
                let full = len == Some(body.len())
                    && text.ends_with('\n')
                    && text.contains(BUILD_INFO)
                    && text.contains(DRAIN_DURATION);
                if !full {
                    failures.push(format!("incomplete body ({} bytes, {head})", body.len()));
                } else {
                    let m = Metrics::parse(&text);
                    if m.sum(EVENTS, &ev(SF0, "inbound", "syn", "peer")) != 3 {
                        failures.push("wrong counts in a body".into());
                    }
                }
            }
            Ok((status, head, _)) => failures.push(format!("status {status}: {head}")),
            Err(e) => failures.push(format!("error: {e}")),
        }
    }
    latencies.sort();
    let total = started.elapsed();
    // smtpflow's listen backlog is 128 (tokio's default): beyond 512 served and 128 queued, SYNs
    // are dropped and retried a second later, which shows in the slowest latencies.
    let overflows = netstat(&pair.local, "TcpExt", "ListenOverflows") - overflows_before;
    eprintln!("{N} concurrent scrapes: {overflows} listen queue overflows");
    eprintln!(
        "{N} concurrent scrapes: all done in {total:?}; latency p50 {:?}, p99 {:?}, max {:?}",
        latencies[N / 2],
        latencies[N * 99 / 100],
        latencies[N - 1]
    );
    assert!(
        failures.is_empty(),
        "{} of {N} scrapes failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total < Duration::from_secs(30), "{N} scrapes took {total:?}");
    assert!(http::healthy(&pair.local, &w.addr));
}
