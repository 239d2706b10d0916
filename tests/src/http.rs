//! HTTP from inside a namespace. Plain HTTP goes through one client, `ureq` (a maintained
//! crate: chunked bodies, any method, every status as an answer rather than an error); the
//! TLS cases use `curl`, whose exit codes are what those tests assert; and the tests of
//! malformed requests (slowloris, oversized heads, garbage) write raw bytes through [`raw`].
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use crate::{Metrics, Netns, in_netns, process::run_bounded};

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Status line and headers, for failure messages.
    pub fn head(&self) -> String {
        let mut head = format!("HTTP {}", self.status);
        for (k, v) in &self.headers {
            head.push_str(&format!("\n{k}: {v}"));
        }
        head
    }
}

/// Sends `method path` to `addr` from inside `ns` and reads the whole reply (connecting within
/// 5 s, all of it within 20 s).
pub fn request(ns: &Netns, addr: &str, method: &str, path: &str) -> io::Result<Reply> {
    let url = format!("http://{addr}{path}");
    let method = method.to_owned();
    in_netns(ns, move || {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(20)))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let req = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url)
            .body(())
            .map_err(io::Error::other)?;
        let mut resp = agent.run(req).map_err(into_io)?;
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        let body =
            resp.body_mut().with_config().limit(256 << 20).read_to_string().map_err(into_io)?;
        Ok(Reply { status: resp.status().as_u16(), headers, body })
    })
}

fn into_io(e: ureq::Error) -> io::Error {
    match e {
        ureq::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

/// `GET path` on `addr` from inside `ns`.
pub fn get(ns: &Netns, addr: &str, path: &str) -> io::Result<Reply> {
    request(ns, addr, "GET", path)
}

/// Whether `GET /healthz` on `addr` answers 200.
pub fn healthy(ns: &Netns, addr: &str) -> bool {
    get(ns, addr, "/healthz").is_ok_and(|r| r.status == 200)
}

/// `GET /metrics` on `addr`, which must answer 200, parsed.
pub fn scrape(ns: &Netns, addr: &str) -> Metrics {
    try_scrape(ns, addr).unwrap_or_else(|e| panic!("{e}"))
}

/// [`scrape`] with the failure returned.
pub fn try_scrape(ns: &Netns, addr: &str) -> io::Result<Metrics> {
    let r = get(ns, addr, "/metrics")
        .map_err(|e| io::Error::new(e.kind(), format!("scrape {addr}/metrics: {e}")))?;
    if r.status != 200 {
        return Err(io::Error::other(format!(
            "GET {addr}/metrics: status {}: {}",
            r.status, r.body
        )));
    }
    Ok(Metrics::parse(&r.body))
}

/// A raw HTTP exchange on the calling thread's namespace: sends `request` as is, reads until
/// the server closes (each read bounded by `timeout`) and returns (status, head, body).
/// Status 0: no parsable response.
pub fn raw(addr: &str, request: &[u8], timeout: Duration) -> io::Result<(u16, String, Vec<u8>)> {
    let sock: SocketAddr = addr.parse().expect("socket address");
    let mut s = TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // A server that refuses a huge head may close before reading all of it: not an error here.
    if let Err(e) = s.write_all(request) {
        eprintln!("sending a {}-byte request to {addr}: {e}", request.len());
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (String::from_utf8_lossy(&buf[..i]).into_owned(), buf[i + 4..].to_vec()),
        None => (String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
    };
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head, body))
}

/// Times a scrape (connect to the last byte) from inside `ns`: (status, time, body length);
/// status 0 when it failed.
pub fn timed_scrape(ns: &Netns, addr: &str, timeout: Duration) -> (u16, Duration, usize) {
    let addr = addr.to_owned();
    in_netns(ns, move || {
        let t = std::time::Instant::now();
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        match raw(&addr, req.as_bytes(), timeout) {
            Ok((status, _, body)) => (status, t.elapsed(), body.len()),
            Err(_) => (0, t.elapsed(), 0),
        }
    })
}

/// The value of header `name` (case-insensitive) in a raw HTTP head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `curl -sS -i --max-time 10 <args>` inside `ns` (the TLS client: `--cacert`, `--cert`, `-u`):
/// its exit code, the HTTP status (0: none), headers and body, and its stderr.
pub fn curl(ns: &Netns, args: &[&str]) -> (Option<i32>, u16, String, String) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "curl", "-sS", "-i", "--max-time", "10"])
        .args(["-w", "\n@@%{http_code}"])
        .args(args);
    let r = run_bounded(cmd, Duration::from_secs(20));
    let (out, code) = r.stdout.rsplit_once("\n@@").unwrap_or((&r.stdout, "000"));
    (r.code, code.trim().parse().unwrap_or(0), out.to_owned(), r.stderr)
}
