//! The HTTP server span and request metrics, as one middleware.
//!
//! The span is named `{method} {route}` (SERVER kind, HTTP semantic
//! conventions), continues the client's `traceparent` when there is a valid
//! one, and is returned to the client in the response's `traceparent`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::http::header::{HOST, USER_AGENT};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::events::HttpRequestServed;
use crate::routes;

pub async fn layer(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = matched
        .as_ref()
        .and_then(|m| routes::TEMPLATES.iter().find(|t| **t == m.as_str()))
        .copied();
    let method = request.method().clone();
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_string(),
    };
    let headers = request.headers();
    let span = tracing::info_span!(
        "http.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method.as_str(),
        http.route = route,
        http.response.status_code = Empty,
        url.path = request.uri().path(),
        url.scheme = "http",
        server.address = header_str(headers, HOST.as_str()),
        user_agent.original = header_str(headers, USER_AGENT.as_str()),
        network.protocol.version = protocol(&request),
        error.type = Empty,
        tenant.id = Empty,
        run.id = Empty,
        flow.id = Empty,
    );
    // A missing or malformed traceparent gives an empty context: a new trace.
    let _ = span.set_parent(telemetry::propagation::extract_http(headers));

    let mut response = next.run(request).instrument(span.clone()).await;

    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        telemetry::spans::record_error(&span, status.as_str(), "server error");
    }
    telemetry::propagation::inject_http(&span.context(), response.headers_mut());
    let _entered = span.enter();
    HttpRequestServed {
        method: &method,
        route: route.unwrap_or("unmatched"),
        status,
        elapsed: started.elapsed(),
    }
    .emit();
    response
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn protocol(request: &Request) -> &'static str {
    match request.version() {
        axum::http::Version::HTTP_09 => "0.9",
        axum::http::Version::HTTP_10 => "1.0",
        axum::http::Version::HTTP_2 => "2",
        axum::http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
