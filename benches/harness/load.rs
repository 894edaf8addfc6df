//! A small HTTP/1.1 load client on hyper + tokio-rustls, the same for Mayfly and OpenBao:
//! closed loop (N connections, each sending its next request when the previous answered)
//! and open loop (a fixed offered rate, latency counted from each request's scheduled
//! time so a stalled server cannot hide its queue — no coordinated omission).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One kind of request against one server.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// TLS (with or without a client certificate); plain TCP when `None`.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// A new connection (and TLS handshake) for every request.
    pub fresh_connection: bool,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    pub want: u16,
    /// A header made anew for every request (a DPoP proof: single-use `jti`, fresh `iat`).
    pub per_request: Option<PerRequest>,
}

/// Makes one header per request.
pub type PerRequest = Arc<dyn Fn() -> (HeaderName, HeaderValue) + Send + Sync>;

enum Outcome {
    Ok,
    Shed,
    Error,
}

struct Conn(SendRequest<Full<Bytes>>);

impl Target {
    async fn connect(&self) -> Result<Conn, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            None => Box::new(tcp),
        };
        let (send, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn(send))
    }

    /// One request on a new connection: status and body (set-up calls).
    pub async fn fetch(&self) -> Result<(u16, Bytes), String> {
        let mut c = self.connect().await?;
        let mut req = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(f) = &self.per_request {
            let (k, v) = f();
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(self.body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = c.0.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    async fn once(&self, conn: &mut Option<Conn>) -> Outcome {
        if conn.is_none() {
            match self.connect().await {
                Ok(c) => *conn = Some(c),
                Err(_) => return Outcome::Error,
            }
        }
        let Some(c) = conn.as_mut() else {
            return Outcome::Error;
        };
        let mut req = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(f) = &self.per_request {
            let (k, v) = f();
            req = req.header(k, v);
        }
        let Ok(req) = req.body(Full::new(self.body.clone())) else {
            return Outcome::Error;
        };
        let outcome = match c.0.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let read = resp.into_body().collect().await.is_ok();
                match status {
                    s if s == self.want && read => Outcome::Ok,
                    429 | 503 => Outcome::Shed,
                    _ => Outcome::Error,
                }
            }
            Err(_) => {
                *conn = None;
                return Outcome::Error;
            }
        };
        if self.fresh_connection {
            *conn = None;
        }
        outcome
    }
}

/// What one measured interval produced.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub ok: usize,
    pub shed: usize,
    pub errors: usize,
    pub seconds: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    /// Server-side CPU seconds (every process of the system under test) per 1000 good
    /// exchanges.
    pub cpu_per_1000: f64,
    /// Offered rate (open loop only).
    pub offered: f64,
    /// Open loop only: for each 100 ms of the measured schedule whose slowest answer
    /// took over `SLOW`, its offset (s) and that answer's latency. Where a tail comes
    /// from: one stall shows as a few adjacent slots, a steady queue as many.
    pub slow_slots: Vec<(f64, Duration)>,
}

/// An answer slower than this marks its 100 ms slot of an open loop as slow.
pub const SLOW: Duration = Duration::from_millis(20);

impl Measured {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// Several runs of one scenario as one: counts and time add up, CPU is weighted by
    /// good exchanges, and each latency quantile is the worst of the runs.
    pub fn merge(runs: &[Measured]) -> Measured {
        let ok: usize = runs.iter().map(|m| m.ok).sum();
        let cpu_s: f64 = runs
            .iter()
            .map(|m| m.cpu_per_1000 * m.ok as f64 / 1000.0)
            .sum();
        Measured {
            ok,
            shed: runs.iter().map(|m| m.shed).sum(),
            errors: runs.iter().map(|m| m.errors).sum(),
            seconds: runs.iter().map(|m| m.seconds).sum(),
            p50: runs.iter().map(|m| m.p50).max().unwrap_or_default(),
            p99: runs.iter().map(|m| m.p99).max().unwrap_or_default(),
            p999: runs.iter().map(|m| m.p999).max().unwrap_or_default(),
            cpu_per_1000: if ok == 0 {
                0.0
            } else {
                cpu_s * 1000.0 / ok as f64
            },
            offered: 0.0,
            slow_slots: Vec::new(),
        }
    }
}

fn quantiles(mut lat: Vec<Duration>) -> (Duration, Duration, Duration) {
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (q(0.5), q(0.99), q(0.999))
}

/// CPU seconds (user + system) of `pids`, from /proc.
pub fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
                + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            ticks / 100.0
        })
        .sum()
}

/// Peak resident set (VmHWM) of `pids`, MiB.
pub fn peak_rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<f64>().ok())
                })
                .unwrap_or(0.0)
                / 1024.0
        })
        .sum()
}

#[derive(Default)]
struct Tally {
    lat: Vec<Duration>,
    ok: usize,
    shed: usize,
    errors: usize,
    /// Open loop: the slowest answer in each 100 ms slot of the schedule.
    slots: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, o: Outcome, lat: Duration) {
        match o {
            Outcome::Ok => {
                self.ok += 1;
                self.lat.push(lat);
            }
            Outcome::Shed => self.shed += 1,
            Outcome::Error => self.errors += 1,
        }
    }
    fn slot(&mut self, at: Duration, lat: Duration) {
        let i = (at.as_millis() / 100) as usize;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Duration::ZERO);
        }
        self.slots[i] = self.slots[i].max(lat);
    }
    fn merge(&mut self, o: Tally) {
        for (i, l) in o.slots.iter().enumerate() {
            self.slot(Duration::from_millis(100 * i as u64), *l);
        }
        self.lat.extend(o.lat);
        self.ok += o.ok;
        self.shed += o.shed;
        self.errors += o.errors;
    }
}

fn finish(t: Tally, seconds: f64, cpu: f64, offered: f64) -> Measured {
    let ok = t.ok;
    let slow_slots = t
        .slots
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > SLOW)
        .map(|(i, l)| (i as f64 / 10.0, *l))
        .collect();
    let (p50, p99, p999) = quantiles(t.lat);
    Measured {
        ok,
        shed: t.shed,
        errors: t.errors,
        seconds,
        p50,
        p99,
        p999,
        cpu_per_1000: cpu / (ok.max(1) as f64) * 1000.0,
        offered,
        slow_slots,
    }
}

/// Closed loop: `conns` connections, warm-up excluded, then `run` measured.
pub async fn closed_loop(
    target: &Target,
    conns: usize,
    warmup: Duration,
    run: Duration,
    pids: &[u32],
) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let (t, stop, measuring) = (target.clone(), stop.clone(), measuring.clone());
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut conn = None;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let o = t.once(&mut conn).await;
                if measuring.load(Ordering::Relaxed) {
                    tally.add(o, t0.elapsed());
                }
            }
            tally
        }));
    }
    tokio::time::sleep(warmup).await;
    let cpu0 = cpu_secs(pids);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(run).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pids) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            all.merge(t);
        }
    }
    finish(all, seconds, cpu, 0.0)
}

/// Open loop at `rate` requests/s spread over `conns` kept-open connections (each takes
/// every `conns`-th slot of the schedule); latency runs from the scheduled send time.
pub async fn open_loop(
    target: &Target,
    rate: f64,
    conns: usize,
    warmup: Duration,
    run: Duration,
    pids: &[u32],
) -> Measured {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let (m0, m1) = (start + warmup, start + warmup + run);
    let mut handles = Vec::new();
    for k in 0..conns {
        let t = target.clone();
        let first = start + Duration::from_secs_f64(k as f64 / rate);
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut conn = None;
            // Open the connection before the clock starts.
            if let Ok(c) = t.connect().await {
                conn = Some(c);
            }
            let mut due = first;
            while due < m1 {
                tokio::time::sleep_until(due.into()).await;
                let o = t.once(&mut conn).await;
                if due >= m0 {
                    let lat = due.elapsed();
                    if matches!(o, Outcome::Ok) {
                        tally.slot(due - m0, lat);
                    }
                    tally.add(o, lat);
                }
                due += interval;
            }
            tally
        }));
    }
    tokio::time::sleep_until(m0.into()).await;
    let cpu0 = cpu_secs(pids);
    tokio::time::sleep_until(m1.into()).await;
    let cpu = cpu_secs(pids) - cpu0;
    let mut all = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            all.merge(t);
        }
    }
    finish(all, run.as_secs_f64(), cpu, rate)
}
