//! The gateway's telemetry events: each `emit` writes its log line and its
//! metrics with the same bounded labels.

use std::time::Duration;

use axum::http::{Method, StatusCode};

pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
pub const RUNS_SUBMITTED_TOTAL: &str = "gateway_runs_submitted_total";
pub const RUN_EVENTS_TOTAL: &str = "gateway_run_events_total";
pub const RATE_LIMITED_TOTAL: &str = "gateway_rate_limited_total";
pub const AUTH_THROTTLED_TOTAL: &str = "gateway_auth_throttled_total";
pub const IDEMPOTENCY_TOTAL: &str = "gateway_idempotency_total";

pub fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests served, by method, route template and status class."
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency, by method, route template and status class."
    );
    metrics::describe_counter!(RUNS_SUBMITTED_TOTAL, "Run submissions, by outcome.");
    metrics::describe_counter!(
        RUN_EVENTS_TOTAL,
        "runs.events messages applied to the store, by run status and result."
    );
    metrics::describe_counter!(RATE_LIMITED_TOTAL, "Requests refused with 429, by tenant.");
    metrics::describe_counter!(
        AUTH_THROTTLED_TOTAL,
        "Requests refused with 429 because their client address failed authentication too often."
    );
    metrics::counter!(AUTH_THROTTLED_TOTAL).absolute(0);
    metrics::describe_counter!(
        IDEMPOTENCY_TOTAL,
        "Idempotency-Key checks: hit (replayed), miss (new run), conflict (reused with another body)."
    );
}

/// A method as a bounded label value.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// One HTTP request served. `route` is the route template (`/v1/runs/{run_id}`),
/// never the raw path.
pub struct HttpRequestServed<'a> {
    pub method: &'a Method,
    pub route: &'static str,
    pub status: StatusCode,
    pub elapsed: Duration,
}

impl HttpRequestServed<'_> {
    pub fn emit(self) {
        let labels = [
            ("method", method_label(self.method)),
            ("route", self.route),
            ("status_class", status_class(self.status)),
        ];
        tracing::info!(
            http.request.method = self.method.as_str(),
            http.route = self.route,
            http.response.status_code = self.status.as_u16(),
            duration_ms = self.elapsed.as_secs_f64() * 1000.0,
            "request served"
        );
        metrics::counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
        metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels)
            .record(self.elapsed.as_secs_f64());
    }
}

/// What became of a run submission.
#[derive(Debug, Clone, Copy)]
pub enum SubmitOutcome {
    Accepted,
    Invalid,
    BrokerUnavailable,
    Failed,
}

impl SubmitOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Invalid => "invalid",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::Failed => "failed",
        }
    }
}

pub struct RunSubmission {
    pub outcome: SubmitOutcome,
}

impl RunSubmission {
    pub fn emit(self) {
        match self.outcome {
            SubmitOutcome::Accepted => tracing::info!("run accepted"),
            outcome => tracing::warn!(outcome = outcome.as_str(), "run not accepted"),
        }
        metrics::counter!(RUNS_SUBMITTED_TOTAL, "outcome" => self.outcome.as_str()).increment(1);
    }
}

/// A `runs.events` message was handled.
pub struct RunEventApplied {
    pub status: wire::run::RunStatus,
    /// False when the event was stale or repeated (the run had moved on).
    pub changed: bool,
}

impl RunEventApplied {
    pub fn emit(self) {
        let result = if self.changed { "applied" } else { "stale" };
        tracing::info!(
            run.status = self.status.as_str(),
            result,
            "run event handled"
        );
        metrics::counter!(RUN_EVENTS_TOTAL, "status" => self.status.as_str(), "result" => result)
            .increment(1);
    }
}

/// A request was refused by the tenant's rate limit.
pub struct RateLimited<'a> {
    pub tenant_id: &'a str,
    pub retry_after_secs: u64,
}

impl RateLimited<'_> {
    pub fn emit(self) {
        // Inside the request span: becomes a span event there.
        tracing::warn!(retry_after_s = self.retry_after_secs, "rate limited");
        metrics::counter!(RATE_LIMITED_TOTAL, "tenant_id" => self.tenant_id.to_owned())
            .increment(1);
    }
}

/// A request was refused because its address failed authentication too often.
pub struct AuthThrottled {
    pub retry_after_secs: u64,
}

impl AuthThrottled {
    pub fn emit(self) {
        tracing::warn!(
            retry_after_s = self.retry_after_secs,
            "client address throttled after failed authentications"
        );
        metrics::counter!(AUTH_THROTTLED_TOTAL).increment(1);
    }
}

/// How an `Idempotency-Key` check ended.
#[derive(Debug, Clone, Copy)]
pub enum IdempotencyResult {
    Hit,
    Miss,
    Conflict,
}

impl IdempotencyResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Conflict => "conflict",
        }
    }
}

pub struct IdempotencyChecked {
    pub result: IdempotencyResult,
}

impl IdempotencyChecked {
    pub fn emit(self) {
        tracing::info!(
            idempotency.result = self.result.as_str(),
            "idempotency key checked"
        );
        metrics::counter!(IDEMPOTENCY_TOTAL, "result" => self.result.as_str()).increment(1);
    }
}
