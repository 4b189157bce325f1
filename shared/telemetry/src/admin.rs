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
}

/// The admin routes. `/metrics` exists only while metrics are enabled.
pub fn router(health: Health, metrics: Option<MetricsHandle>) -> Router {
    let with_metrics = metrics.is_some();
    let router = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready));
    let router = if with_metrics {
        router.route("/metrics", get(render_metrics))
    } else {
        router
    };
    router.with_state(AdminState { health, metrics })
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
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

async fn render_metrics(State(state): State<AdminState>) -> Response {
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
