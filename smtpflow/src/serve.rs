//! The HTTP endpoint: `GET /metrics` (the latest rendering) and `GET /healthz`.
use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics address, with an error an operator can act on.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (already in use: another smtpflow or exporter? choose another with --metrics-addr)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (no interface here has that address)",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
    })
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(req: &Request<Incoming>, metrics: &watch::Receiver<Bytes>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz");
    if !known {
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

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: watch::Receiver<Bytes>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&req, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            // A client that stalls mid-response is cut off too.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}
