//! Overload shedding: a bound on `/v1` requests in flight. Past it a request is answered
//! at once with `503 overloaded` and `Retry-After`, before any identity check, store
//! access or audit write — so excess load costs almost nothing and never queues without
//! bound. A shed request did nothing: no lease, no task, no audit record (it is counted in
//! `mayfly_requests_shed_total`; auditing it would turn a flood into audit writes).
//!
//! Health, readiness, metrics and key discovery are never shed: a probe that fails under
//! load would get a busy replica restarted, which is worse than slow.

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tokio::sync::Semaphore;

use super::error::{ApiError, OAuthError};

/// Wraps `router` so at most `max_in_flight` `/v1` requests run at once.
pub fn limit_in_flight(router: Router, max_in_flight: usize) -> Router {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let permits = permits.clone();
        async move { admit(&permits, req, next).await }
    }))
}

async fn admit(permits: &Semaphore, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "tests")]
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
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
        limit_in_flight(r, limit)
    }

    fn req(path: &str, method: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn a_request_past_the_in_flight_limit_is_shed_at_once_without_reaching_its_handler() {
        let (entered, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let router = app(entered.clone(), release.clone(), 1);
        let first = tokio::spawn(router.clone().oneshot(req("/v1/slow", "POST")));
        while entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }

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
}
