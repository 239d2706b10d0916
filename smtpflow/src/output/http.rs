//! The HTTP endpoint: `GET /metrics` (the latest rendering) and `GET /healthz`, nothing else.
//! It faces the network, so it is bounded: concurrent connections, header size, time to send
//! the headers (slowloris), time per connection; optionally TLS and basic auth (`web.rs`).
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, watch},
};

use super::web_config::WebConfig;

const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Connections served at once; more wait in the listen backlog until one finishes.
pub const MAX_CONNECTIONS: usize = 512;
/// Request head (request line and headers) size limit; larger requests are refused.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time a client has to send its request head, and to finish a TLS handshake.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time one connection may stay open, keep-alive included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections waiting to be accepted (the kernel's listen backlog; Linux caps it at
/// net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds the metrics address, with an error an operator can act on. A plain (std) socket, so
/// that it can be bound before the async runtime exists: smtpflow binds, attaches and drops its
/// privileges while it still has one thread.
pub fn bind(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (already in use: another smtpflow or exporter? choose another with --metrics-addr)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (no interface here has that address)",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
    })?;
    // std listens with a backlog of 128; a second listen() raises it, so that a burst of
    // scrapes waits instead of having its SYNs dropped.
    use std::os::fd::AsRawFd as _;
    // SAFETY: listen on a socket we own.
    unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(
    req: &Request<Incoming>,
    metrics: &watch::Receiver<Bytes>,
    web: &WebConfig,
) -> Response<Full<Bytes>> {
    if let Some(auth) = &web.auth {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !auth.allows(given) {
            let mut r = respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                Bytes::from_static(b"unauthorized\n"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"smtpflow\""),
            );
            return r;
        }
    }
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz") {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        );
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => respond(StatusCode::OK, CONTENT_TYPE_TEXT, metrics.borrow().clone()),
        _ => respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
    }
}

async fn serve_connection<S>(io: S, metrics: watch::Receiver<Bytes>, web: Arc<WebConfig>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let resp = route(&req, &metrics, &web);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), svc);
    // A client that stalls, or keeps a connection forever, is cut off.
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: watch::Receiver<Bytes>, web: Arc<WebConfig>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let web = web.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match &web.tls {
                None => serve_connection(stream, metrics, web.clone()).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, metrics, web.clone()).await,
                        // Plain HTTP on a TLS port, a bad client certificate, or too slow: refused.
                        Ok(Err(e)) => log::debug!("TLS handshake failed: {e}"),
                        Err(_) => log::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}
