//! The admin HTTP server: `/metrics`, `/health/live`, `/health/ready`.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::MetricsHandle;

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Option<MetricsHandle>,
    /// `METRICS_AUTH_TOKEN`: required as a bearer token on `/metrics`.
    token: Option<std::sync::Arc<str>>,
}

/// The admin routes. `/metrics` exists only while metrics are enabled, and
/// wants `Authorization: Bearer <token>` when a token is set; the health
/// endpoints stay open for orchestrators.
pub fn router(health: Health, metrics: Option<MetricsHandle>, token: Option<String>) -> Router {
    let with_metrics = metrics.is_some();
    let router = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready));
    let router = if with_metrics {
        router.route("/metrics", get(render_metrics))
    } else {
        router
    };
    router.with_state(AdminState {
        health,
        metrics,
        token: token.map(std::sync::Arc::from),
    })
}

/// The process's HTTP limits, set once by [`crate::init`] from `HTTP_*`.
static LIMITS: std::sync::OnceLock<crate::serve::Limits> = std::sync::OnceLock::new();

pub(crate) fn set_limits(limits: crate::serve::Limits) {
    let _ = LIMITS.set(limits);
}

/// Serves `router` on `listener` until `shutdown` resolves, with the
/// process's HTTP limits ([`crate::serve`]): silent or idle connections are
/// closed, their number capped, and shutdown drains for a bounded time.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = LIMITS.get().copied().unwrap_or_default();
    crate::serve::serve(listener, router, limits, shutdown).await
}

async fn live() -> Response {
    axum::Json(json!({"status": "alive"})).into_response()
}

async fn ready(State(state): State<AdminState>) -> Response {
    let results = state.health.check().await;
    let ok = results.iter().all(|(_, ok)| *ok);
    let checks: serde_json::Map<_, _> = results
        .into_iter()
        .map(|(name, ok)| (name.to_owned(), json!(if ok { "ok" } else { "failing" })))
        .collect();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if ok { "ready" } else { "not_ready" }, "checks": checks});
    (status, axum::Json(body)).into_response()
}

async fn render_metrics(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(token) = &state.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        if !constant_time_eq(token.as_bytes(), presented.trim().as_bytes()) {
            let body = json!({"error": {"code": "unauthorized", "message": "send Authorization: Bearer <METRICS_AUTH_TOKEN>"}});
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(body),
            )
                .into_response();
        }
    }
    // Refresh the health gauges so a scrape always sees the current state.
    state.health.check().await;
    let body = state
        .metrics
        .as_ref()
        .map(MetricsHandle::render)
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Compares without an early exit, so timing does not reveal a prefix match.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_values() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
