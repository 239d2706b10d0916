//! A real Alertmanager (Debian's `prometheus-alertmanager`) run as a child process inside a
//! namespace with its own configuration and data directory, and the webhook receiver it
//! delivers to: a tiny HTTP server on a thread that keeps every notification. Both stop on drop.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    Netns, http, in_netns,
    json::{Json, JsonExt},
    process::{Process, installed},
    tempdir::TempDir,
};

/// The `alertmanager` binary: `$ALERTMANAGER_BIN`, else Debian's `prometheus-alertmanager`.
pub fn alertmanager_bin() -> PathBuf {
    std::env::var_os("ALERTMANAGER_BIN")
        .map_or_else(|| "prometheus-alertmanager".into(), PathBuf::from)
}

/// Whether the Alertmanager binary is installed.
pub fn available() -> bool {
    installed(&alertmanager_bin().to_string_lossy())
}

/// A running Alertmanager in a namespace.
pub struct Alertmanager {
    process: Process,
    /// Where its API answers, inside the namespace (`127.0.0.1:<port>`).
    pub addr: String,
    _dir: TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager in `ns` on `127.0.0.1:<port>` with `config` (alertmanager.yml),
    /// clustering off; waits (30 s at most) until it is ready.
    pub fn start(ns: &Netns, port: u16, config: &str) -> Self {
        let dir = TempDir::new("alertmanager");
        let config_path = dir.write("alertmanager.yml", config);
        let addr = format!("127.0.0.1:{port}");
        let mut process = Process::build(ns, alertmanager_bin())
            .arg(format!("--config.file={config_path}"))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // No gossip: a single instance, and a namespace without a default route.
            .arg("--cluster.listen-address=")
            .current_dir(&dir.path)
            .spawn();
        process.wait_ready(Duration::from_secs(30), || {
            http::get(ns, &addr, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        Self { process, addr, _dir: dir }
    }

    /// Its log (stderr).
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    /// A configuration routing every alert to one webhook at `url`, grouped by alert name,
    /// instance and cause, with short group timers (1 s) so that a firing alert is delivered
    /// within seconds; resolved alerts are sent too.
    pub fn webhook_config(url: &str) -> String {
        format!(
            "route:
  receiver: webhook
  group_by: [alertname, instance, cause]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: webhook
    webhook_configs:
      - url: {url:?}
        send_resolved: true
"
        )
    }
}

/// One alert of a webhook notification: its status (`firing`, `resolved`), labels and
/// annotations.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub status: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A webhook receiver: an HTTP server on `127.0.0.1:<port>` in a namespace that answers every
/// POST with 200 and keeps its body (Alertmanager's JSON notification).
pub struct Webhook {
    pub url: String,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    pub fn start(ns: &Netns, port: u16) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listener = in_netns(ns, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind the webhook receiver on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bodies.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => match receive(conn) {
                        Ok(body) => b.lock().unwrap().push(body),
                        Err(e) => eprintln!("webhook receiver: {e}"),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => eprintln!("webhook accept: {e}"),
                }
            }
        });
        Self { url: format!("http://{addr}/alerts"), bodies, stop, thread: Some(thread) }
    }

    /// Every notification body received so far.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    /// How many notifications arrived so far.
    pub fn received(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    /// Every alert of every notification received so far, in order.
    pub fn alerts(&self) -> Vec<Delivered> {
        self.alerts_since(0)
    }

    /// The alerts of the notifications received after the first `n`, in order.
    pub fn alerts_since(&self, n: usize) -> Vec<Delivered> {
        self.bodies()
            .iter()
            .skip(n)
            .flat_map(|body| {
                let v: Json = body.parse().unwrap_or_else(|e| panic!("webhook JSON: {e}: {body}"));
                v["alerts"]
                    .items()
                    .iter()
                    .map(|a| Delivered {
                        status: a["status"].as_str().unwrap_or_default().to_owned(),
                        labels: a["labels"].string_map(),
                        annotations: a["annotations"].string_map(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("the webhook receiver thread panicked");
        }
    }
}

/// Reads one HTTP request (head, then a `Content-Length` body; 10 s at most) and answers 200.
fn receive(mut s: TcpStream) -> io::Result<String> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request head cut short"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request body cut short"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned())
}
