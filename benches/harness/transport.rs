//! The transport reference: a server that does none of an exchange's work, only its
//! transport. It takes Mayfly's TLS configuration (`mayfly::api::tls::server_config`, the
//! same certificate, ALPN and crypto provider), reads the same request over a kept-open
//! TLS 1.3 connection, and answers with the bytes of a real credential answer captured
//! from Mayfly in the same run (`201`, `application/json`, `no-store`). No identity check,
//! no policy, no signature, no store, no audit.
//!
//! Two ways of speaking HTTP/1.1 over that TLS:
//! - `hyper`: the stack Mayfly serves with (hyper-util's auto builder, HTTP/1.1 only, the
//!   same header-read timer, buffer bound and header cap);
//! - `raw`: a hand-written reader of one request head and its `content-length` body — the
//!   least a server can do on userspace TLS (it answers only the harness's own requests).
//!
//! Its CPU per exchange is what any design on this transport pays before doing any of
//! the work, so floor / (floor + transport) bounds the efficiency such a design reaches.
//!
//! The harness re-runs itself as this server (`MAYFLY_BENCH_TRANSPORT_SERVE`), so its CPU
//! is measured per process like every other system's.

use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `hyper` or `raw`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Hyper,
    Raw,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hyper => "hyper",
            Mode::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hyper" => Some(Mode::Hyper),
            "raw" => Some(Mode::Raw),
            _ => None,
        }
    }
}

/// Serves on `port` until killed (the harness's runtime is multi-threaded with the
/// default worker count, like `mayfly serve`'s).
pub async fn serve(mode: Mode, port: u16, cert: &Path, key: &Path, answer: &Path) {
    let serving = mayfly::api::tls::ServingCert::load(cert, key).expect("serving cert");
    let config = mayfly::api::tls::server_config(serving).expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let answer = Bytes::from(std::fs::read(answer).expect("answer"));
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, answer) = (acceptor.clone(), answer.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            match mode {
                Mode::Hyper => serve_hyper(tls, answer).await,
                Mode::Raw => serve_raw(tls, &answer).await,
            }
        });
    }
}

async fn serve_hyper(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, answer: Bytes) {
    use http_body_util::{BodyExt, Full};
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let answer = answer.clone();
        async move {
            // Mayfly reads the whole body before it admits a request: so does this.
            let _ = req.into_body().collect().await;
            hyper::Response::builder()
                .status(201)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::CACHE_CONTROL, "no-store")
                .body(Full::new(answer))
        }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(16 * 1024)
        .max_headers(100);
    let _ = b
        .http1_only()
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

/// One request head, then `content-length` body bytes, then the fixed answer; again.
async fn serve_raw(mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, answer: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\n\r\n",
        answer.len()
    )
    .into_bytes();
    head.extend_from_slice(answer);
    let response: Arc<[u8]> = head.into();
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    loop {
        // Until the head is complete.
        let end = loop {
            if let Some(i) = find(&buf[..filled], b"\r\n\r\n") {
                break i + 4;
            }
            if filled == buf.len() {
                return;
            }
            match tls.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        let body = content_length(&buf[..end]);
        let total = end + body;
        if total > buf.len() {
            return;
        }
        while filled < total {
            match tls.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        }
        if tls.write_all(&response).await.is_err() || tls.flush().await.is_err() {
            return;
        }
        buf.copy_within(total..filled, 0);
        filled -= total;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}
