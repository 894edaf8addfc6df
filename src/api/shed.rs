//! Overload shedding: a bound on `/v1` requests in flight. Past it a request is answered
//! at once with `503 overloaded` and `Retry-After`, before any identity check, store
//! access or audit write — so excess load costs almost nothing and never queues without
//! bound. A shed request did nothing: no lease, no task, no audit record (it is counted in
//! `mayfly_requests_shed_total`; auditing it would turn a flood into audit writes).
//!
//! Health, readiness, metrics and key discovery are never shed: a probe that fails under
//! load would get a busy replica restarted, which is worse than slow.
//!
//! The permit covers work, not waiting for a client: a `/v1` request's body is read
//! first (at most `max_body_bytes`, within `body_read_timeout`), so slow senders hold
//! only their own connection, never a slot an authenticated agent needs; a body refused
//! while it was read (`408` past the timeout, `413` past the size) is answered without a
//! slot, so slow senders timing out together each get their own refusal, not `503`.
//!
//! [`SourceBuckets`] rate-limits what one source can make the broker do without proving
//! who it is: each unauthenticated refusal costs a token; a source with none left gets
//! its requests without a verified client certificate refused before any verification.

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use super::error::{ApiError, OAuthError};

/// How a `/v1` body is read before the request is admitted.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Wraps `router` so at most `max_in_flight` `/v1` requests run at once, each with its
/// body already read.
pub fn limit_in_flight(router: Router, max_in_flight: usize, body: BodyLimits) -> Router {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let permits = permits.clone();
        async move { admit(&permits, body, req, next).await }
    }))
}

async fn admit(permits: &Semaphore, body: BodyLimits, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let req = super::extract::buffer_body(req, body.max_bytes, body.timeout).await;
    // A body refused while it was read (too slow, too large) is answered with that
    // refusal, without a slot: its answer does no work a slot bounds, and a burst of
    // slow senders timing out together must each get their 408, not a 503.
    if req
        .extensions()
        .get::<super::extract::BodyRejected>()
        .is_some()
    {
        return next.run(req).await;
    }
    // Held until the handler (and the audit write) is done.
    let Ok(_permit) = permits.try_acquire() else {
        metrics::counter!("mayfly_requests_shed_total").increment(1);
        return if req.uri().path() == "/v1/token" {
            OAuthError::from(ApiError::Overloaded).into_response()
        } else {
            ApiError::Overloaded.into_response()
        };
    };
    next.run(req).await
}

/// Per-source token buckets for unauthenticated refusals.
#[derive(Debug)]
pub struct SourceBuckets {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Sources tracked at once; past it, full buckets are forgotten, then new sources share
/// one bucket (a spread-out flood is limited as one).
const MAX_SOURCES: usize = 16 * 1024;
const OVERFLOW: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

impl SourceBuckets {
    pub fn new(rate_per_second: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate_per_second),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let gained = now.duration_since(b.at).as_secs_f64() * self.rate;
        Bucket {
            tokens: (b.tokens + gained).min(self.burst),
            at: now,
        }
    }

    fn key(&self, map: &mut HashMap<IpAddr, Bucket>, ip: IpAddr, now: Instant) -> IpAddr {
        if map.contains_key(&ip) || map.len() < MAX_SOURCES {
            return ip;
        }
        map.retain(|_, b| {
            let gained = now.duration_since(b.at).as_secs_f64() * self.rate;
            b.tokens + gained < self.burst
        });
        if map.len() < MAX_SOURCES {
            ip
        } else {
            OVERFLOW
        }
    }

    /// Whether `ip` has no token left: its unauthenticated requests are refused unread.
    pub fn exhausted(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = self.key(&mut map, ip, now);
        map.get(&key)
            .is_some_and(|b| self.refilled(*b, now).tokens < 1.0)
    }

    /// One unauthenticated refusal from `ip`.
    pub fn charge(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = self.key(&mut map, ip, now);
        let b = map.get(&key).copied().unwrap_or(Bucket {
            tokens: self.burst,
            at: now,
        });
        let mut b = self.refilled(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
        map.insert(key, b);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "tests")]
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;
    use tower::ServiceExt;

    /// A router whose `/v1/slow` handler waits for `release`; counts handler entries.
    fn app(entered: Arc<AtomicUsize>, release: Arc<Notify>, limit: usize) -> Router {
        let slow = {
            let entered = entered.clone();
            move || {
                let (entered, release) = (entered.clone(), release.clone());
                async move {
                    entered.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    StatusCode::CREATED
                }
            }
        };
        let r = Router::new()
            .route("/v1/slow", post(slow))
            .route("/healthz", get(|| async { "ok" }));
        limit_in_flight(
            r,
            limit,
            BodyLimits {
                max_bytes: 1024,
                timeout: Duration::from_secs(5),
            },
        )
    }

    fn req(path: &str, method: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    /// A router with one slot, and a first request holding it (entered, not released).
    async fn one_slot_taken() -> (
        Arc<AtomicUsize>,
        Arc<Notify>,
        Router,
        tokio::task::JoinHandle<Result<Response, std::convert::Infallible>>,
    ) {
        let (entered, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let router = app(entered.clone(), release.clone(), 1);
        let first = tokio::spawn(router.clone().oneshot(req("/v1/slow", "POST")));
        while entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        (entered, release, router, first)
    }

    #[tokio::test]
    async fn a_request_past_the_in_flight_limit_is_shed_at_once_without_reaching_its_handler() {
        let (entered, release, router, first) = one_slot_taken().await;

        let t0 = Instant::now();
        let shed = router
            .clone()
            .oneshot(req("/v1/slow", "POST"))
            .await
            .expect("infallible");
        assert!(t0.elapsed() < Duration::from_millis(500), "shed promptly");
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            shed.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body = axum::body::to_bytes(shed.into_body(), 4096)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("problem json");
        assert_eq!(body["code"], "overloaded");
        assert_eq!(
            entered.load(Ordering::SeqCst),
            1,
            "the shed request never ran"
        );

        // Probes are never shed.
        let health = router
            .clone()
            .oneshot(req("/healthz", "GET"))
            .await
            .expect("infallible");
        assert_eq!(health.status(), StatusCode::OK);

        // Once the first request finishes, its slot is free again.
        release.notify_one();
        let done = first.await.expect("join").expect("infallible");
        assert_eq!(done.status(), StatusCode::CREATED);
        let next = tokio::spawn(router.oneshot(req("/v1/slow", "POST")));
        while entered.load(Ordering::SeqCst) == 1 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        let next = next.await.expect("join").expect("infallible");
        assert_eq!(next.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn a_body_refused_while_read_is_answered_without_a_slot() {
        let (entered, release, router, first) = one_slot_taken().await;
        // The one slot is taken; a body over the limit still reaches its route (which
        // answers its refusal; this test route answers 201 to anything), not shed as
        // overload.
        let big = Request::builder()
            .method("POST")
            .uri("/v1/slow")
            .body(Body::from(vec![b'x'; 4096]))
            .expect("request");
        let big = tokio::spawn(router.clone().oneshot(big));
        // Shed, it would never enter: the wait ends by its timeout and the check fails.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while entered.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        release.notify_waiters();
        let big = big.await.expect("join").expect("infallible");
        assert_eq!(
            big.status(),
            StatusCode::CREATED,
            "the refused body ran unshed"
        );
        let done = first.await.expect("join").expect("infallible");
        assert_eq!(done.status(), StatusCode::CREATED);
    }
}

#[cfg(test)]
mod body_tests {
    #![allow(clippy::expect_used, reason = "tests")]
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_body_that_never_arrives_holds_no_in_flight_slot_and_times_out() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let seen = seen.clone();
            move |req: Request| {
                let seen = seen.clone();
                async move {
                    let rejected = req
                        .extensions()
                        .get::<super::super::extract::BodyRejected>()
                        .map(|r| r.0.to_string());
                    seen.lock().expect("lock").push(rejected);
                    StatusCode::CREATED
                }
            }
        };
        let router = limit_in_flight(
            axum::Router::new().route("/v1/x", post(handler)),
            1,
            BodyLimits {
                max_bytes: 1024,
                timeout: Duration::from_millis(300),
            },
        );
        let stalled = Body::from_stream(futures_util::stream::pending::<
            Result<axum::body::Bytes, std::io::Error>,
        >());
        let req = |body| {
            Request::builder()
                .method("POST")
                .uri("/v1/x")
                .body(body)
                .expect("request")
        };
        let slow = tokio::spawn(router.clone().oneshot(req(stalled)));
        tokio::task::yield_now().await;
        // The one slot is free while the slow body is awaited.
        let t0 = Instant::now();
        let quick = router
            .clone()
            .oneshot(req(Body::from("x")))
            .await
            .expect("infallible");
        assert_eq!(quick.status(), StatusCode::CREATED);
        assert!(t0.elapsed() < Duration::from_millis(250));
        // The slow one reaches its handler only after the timeout, marked as rejected.
        let slow = slow.await.expect("join").expect("infallible");
        assert_eq!(slow.status(), StatusCode::CREATED);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], None);
        assert!(
            seen[1]
                .as_deref()
                .is_some_and(|e| e.contains("did not arrive")),
            "{seen:?}"
        );
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn a_source_is_limited_after_its_burst_and_others_are_not() {
        let b = SourceBuckets::new(1, 3);
        let (bad, good): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        assert!(!b.exhausted(bad), "a source starts with a full bucket");
        for _ in 0..3 {
            b.charge(bad);
        }
        assert!(b.exhausted(bad));
        assert!(!b.exhausted(good));
    }
}
