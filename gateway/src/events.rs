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
pub const HAND_OFFS_TOTAL: &str = "gateway_hand_offs_total";
pub const OUTBOX_PENDING: &str = "gateway_outbox_pending";
/// Shared with `telemetry::events::ComponentError`, same labels.
const COMPONENT_ERRORS_TOTAL: &str = "component_errors_total";

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
    metrics::describe_counter!(
        HAND_OFFS_TOTAL,
        "Publishes of stored runs to runs.submitted, by attempt (first, republish) and result (acked, failed)."
    );
    metrics::describe_gauge!(
        OUTBOX_PENDING,
        "Stored runs JetStream has not acknowledged yet (the outbox), as of the last reconciler round."
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
    StoreUnavailable,
    Failed,
}

impl SubmitOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Invalid => "invalid",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::StoreUnavailable => "store_unavailable",
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

/// A report about a run the store does not know: nothing can be applied.
/// Counted as a component error (every run is stored before it is handed
/// off, so this is a fault: another gateway's store, a store reset).
pub struct UnknownRunReported<'a> {
    pub status: wire::run::RunStatus,
    pub run_id: &'a str,
}

impl UnknownRunReported<'_> {
    pub fn emit(self) {
        tracing::warn!(
            error.code = "unknown_run",
            run.id = self.run_id,
            run.status = self.status.as_str(),
            "report for a run the store does not know; dropped"
        );
        metrics::counter!(
            COMPONENT_ERRORS_TOTAL,
            "component" => telemetry::events::component(),
            "error_code" => "unknown_run"
        )
        .increment(1);
    }
}

/// Which publish of a stored run.
#[derive(Debug, Clone, Copy)]
pub enum HandOff {
    /// By the request that stored it.
    First,
    /// By the outbox reconciler.
    Republish,
}

impl HandOff {
    fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Republish => "republish",
        }
    }
}

/// A stored run was published to `runs.submitted`.
pub struct HandOffAttempted<'a> {
    pub attempt: HandOff,
    /// Why it is not acknowledged (the run stays in the outbox); `None`: acked.
    pub failure: Option<&'a str>,
}

impl HandOffAttempted<'_> {
    pub fn emit(self) {
        let result = match self.failure {
            None => "acked",
            Some(_) => "failed",
        };
        match (self.attempt, self.failure) {
            (HandOff::First, None) => {}
            (HandOff::Republish, None) => tracing::info!("run republished from the outbox"),
            (attempt, Some(reason)) => tracing::warn!(
                attempt = attempt.as_str(),
                reason,
                "hand-off not acknowledged; the run stays in the outbox"
            ),
        }
        metrics::counter!(HAND_OFFS_TOTAL, "attempt" => self.attempt.as_str(), "result" => result)
            .increment(1);
    }
}

/// A reconciler round found `pending` runs in the outbox.
pub struct OutboxChecked {
    pub pending: i64,
}

impl OutboxChecked {
    pub fn emit(self) {
        if self.pending > 0 {
            tracing::debug!(pending = self.pending, "runs in the outbox");
        }
        metrics::gauge!(OUTBOX_PENDING).set(self.pending as f64);
    }
}

/// A shutdown step did not finish within the grace period and was abandoned.
pub struct ShutdownStepAbandoned {
    pub step: &'static str,
}

impl ShutdownStepAbandoned {
    pub fn emit(self) {
        tracing::warn!(
            step = self.step,
            "shutdown step did not finish within GATEWAY_SHUTDOWN_GRACE_SECS; abandoned"
        );
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
