//! Calls `ext.<id>` over NATS request/reply: per-extension timeout, retries
//! with exponential backoff and jitter, and a circuit breaker per extension.
//!
//! The breaker counts what says something about the extension's health:
//! timeouts, service errors, no responders, undecodable answers. A request
//! that could never succeed because of the run itself (too large for a NATS
//! message, or refused by the service as a bad request, a 4xx) ends the
//! invocation without a retry and without touching the breaker: one caller's
//! oversized or malformed run must not open a breaker for every tenant. A
//! dry run ([`Mode::DryRun`]) reads the breaker but never changes it, and
//! emits no metric.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wire::extensions::{Dispatched, ExtensionRequest, ExtensionResponse, ExtensionType};
use wire::submitted::RunSubmitted;

use super::registry::{ExtensionSpec, FailurePolicy, Lookup, Registry};
use crate::breaker::{Breaker, State, Transition};
use crate::decide::Mode;
use crate::events::{BreakerCall, BreakerTransitioned, ExtensionInvoked, ExtensionRetried};

/// How an invocation ended: the `status` label and `extension.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    Error,
    Timeout,
    /// Every retry failed.
    MaxRetriesExceeded,
    /// The breaker refused the call.
    CircuitOpen,
    /// The registry does not know the id.
    NotFound,
    /// The request is over the NATS server's max payload: not sent.
    RequestTooLarge,
    /// The service refused the request as malformed (a 4xx service error).
    BadRequest,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::MaxRetriesExceeded => "max_retries_exceeded",
            Self::CircuitOpen => "circuit_open",
            Self::NotFound => "not_found",
            Self::RequestTooLarge => "request_too_large",
            Self::BadRequest => "bad_request",
        }
    }
}

/// What one extension said (or failed to say).
#[derive(Debug, Clone)]
pub struct ExtensionOutcome {
    pub id: String,
    /// `None` when the registry does not know the id.
    pub kind: Option<ExtensionType>,
    pub status: Status,
    pub retries_used: u32,
    /// Unknown extensions fail closed.
    pub failure_policy: FailurePolicy,
    pub response: Option<ExtensionResponse>,
    pub elapsed: Duration,
}

impl ExtensionOutcome {
    pub fn succeeded(&self) -> bool {
        self.status == Status::Success
    }
}

/// The run as an extension is shown it.
pub struct Invocation<'a> {
    pub run: &'a RunSubmitted,
    pub metadata: &'a BTreeMap<String, String>,
    pub policy_id: &'a str,
    pub dispatched: Option<Dispatched>,
}

pub struct Invoker {
    nats: async_nats::Client,
    registry: Arc<Registry>,
    breakers: Mutex<HashMap<String, Breaker>>,
}

/// Why one attempt failed.
#[derive(Debug)]
enum AttemptError {
    Timeout,
    Error(String),
    /// The service answered with a 4xx: the request, not the service, is at fault.
    BadRequest(String),
}

impl Invoker {
    pub fn new(nats: async_nats::Client, registry: Arc<Registry>) -> Self {
        Self {
            nats,
            registry,
            breakers: Mutex::new(HashMap::new()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs `f` on the extension's breaker (created closed on first use).
    fn with_breaker<T>(&self, spec: &ExtensionSpec, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let breaker = breakers.entry(spec.id.clone()).or_insert_with(|| {
            BreakerTransitioned::initial(&spec.id);
            Breaker::new(spec.breaker)
        });
        breaker.set_config(spec.breaker);
        f(breaker)
    }

    /// Whether the extension's breaker would refuse a call now (never when
    /// it was never called), without changing it.
    fn breaker_rejects(&self, id: &str) -> bool {
        self.breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|b| b.rejects_at(Instant::now()))
    }

    /// The breaker state of an extension (closed when never called).
    pub fn breaker_state(&self, id: &str) -> State {
        self.breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map_or(State::Closed, Breaker::state)
    }

    /// Calls extension `id` inside a `router.extension.invoke` CLIENT span.
    pub async fn invoke(&self, id: &str, invocation: &Invocation<'_>) -> ExtensionOutcome {
        self.invoke_as(id, invocation, Mode::Live).await
    }

    /// [`invoke`](Self::invoke), for real or as a dry run.
    pub async fn invoke_as(
        &self,
        id: &str,
        invocation: &Invocation<'_>,
        mode: Mode,
    ) -> ExtensionOutcome {
        let run = invocation.run;
        let span = tracing::info_span!(
            "router.extension.invoke",
            otel.kind = "client",
            otel.status_code = Empty,
            error.type = Empty,
            extension.id = id,
            extension.type = Empty,
            extension.subject = Empty,
            extension.status = Empty,
            extension.retries_used = Empty,
            extension.failure_policy = Empty,
            extension.verdict = Empty,
            messaging.system = "nats",
            messaging.destination.name = Empty,
            policy.id = invocation.policy_id,
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
            flow.id = run.flow_id.as_str(),
        );
        let started = std::time::Instant::now();
        let outcome = self
            .invoke_in_span(id, invocation, mode, &span)
            .instrument(span.clone())
            .await;
        span.record("extension.status", outcome.status.as_str());
        span.record("extension.retries_used", outcome.retries_used);
        if let Some(response) = &outcome.response {
            span.record("extension.verdict", verdict_name(response));
        }
        if !outcome.succeeded() {
            telemetry::spans::record_error(
                &span,
                outcome.status.as_str(),
                &format!("extension {id}: {}", outcome.status.as_str()),
            );
        }
        let outcome = ExtensionOutcome {
            elapsed: started.elapsed(),
            ..outcome
        };
        if mode == Mode::Live {
            ExtensionInvoked { outcome: &outcome }.emit();
        }
        outcome
    }

    async fn invoke_in_span(
        &self,
        id: &str,
        invocation: &Invocation<'_>,
        mode: Mode,
        span: &tracing::Span,
    ) -> ExtensionOutcome {
        // A dry run reads the cache as it is: a lookup would count in the
        // registry metrics (and may re-read the file).
        let lookup = match mode {
            Mode::Live => self.registry.lookup(id).await,
            Mode::DryRun => self.registry.cached(id).await,
        };
        let spec = match lookup {
            Lookup::Found(spec) => spec,
            Lookup::NotFound | Lookup::Error => {
                return ExtensionOutcome {
                    id: id.to_owned(),
                    kind: None,
                    status: Status::NotFound,
                    retries_used: 0,
                    failure_policy: FailurePolicy::FailClosed,
                    response: None,
                    elapsed: Duration::ZERO,
                };
            }
        };
        span.record("extension.type", spec.kind.as_str());
        span.record("extension.subject", spec.subject.as_str());
        span.record("messaging.destination.name", spec.subject.as_str());
        span.record("extension.failure_policy", spec.failure_policy.as_str());
        let request = ExtensionRequest {
            extension_id: spec.id.clone(),
            extension_type: spec.kind,
            run: invocation.run.clone(),
            metadata: invocation.metadata.clone(),
            dispatched: invocation.dispatched.clone(),
        }
        .encode();

        let outcome = |status, retries_used, response| ExtensionOutcome {
            id: spec.id.clone(),
            kind: Some(spec.kind),
            status,
            retries_used,
            failure_policy: spec.failure_policy,
            response,
            elapsed: Duration::ZERO,
        };
        // 0 until the server's INFO arrived: then the publish itself decides.
        let max_payload = self.nats.server_info().max_payload;
        if max_payload > 0 && request.len() > max_payload {
            span.add_event(
                "extension.request_too_large",
                vec![
                    KeyValue::new("messaging.message.body.size", request.len() as i64),
                    KeyValue::new("messaging.nats.max_payload", max_payload as i64),
                ],
            );
            return outcome(Status::RequestTooLarge, 0, None);
        }
        let mut last_error = Status::Error;
        for attempt in 0..=spec.retries {
            let allowed = match mode {
                Mode::Live => {
                    let (allowed, transition) =
                        self.with_breaker(&spec, |b| b.try_acquire(Instant::now()));
                    self.transitioned(&spec.id, transition, span);
                    allowed
                }
                // What a live call would find, without taking the half-open
                // trial or creating a breaker.
                Mode::DryRun => !self.breaker_rejects(&spec.id),
            };
            if !allowed {
                let status = if attempt == 0 {
                    Status::CircuitOpen
                } else {
                    last_error
                };
                return outcome(status, attempt, None);
            }
            let tenant = invocation.run.tenant_id.as_str();
            match self.attempt(&spec, request.clone(), tenant, span).await {
                Ok(response) => {
                    if mode == Mode::Live {
                        let transition = self.with_breaker(&spec, |b| b.on_success(Instant::now()));
                        BreakerCall {
                            extension_id: &spec.id,
                            success: true,
                        }
                        .emit();
                        self.transitioned(&spec.id, transition, span);
                    }
                    return outcome(Status::Success, attempt, Some(response));
                }
                Err(AttemptError::BadRequest(message)) => {
                    // Says nothing about the service's health; a retry would
                    // be refused the same way.
                    if mode == Mode::Live {
                        self.with_breaker(&spec, |b| b.release());
                    }
                    span.add_event(
                        "extension.attempt_failed",
                        vec![
                            KeyValue::new("attempt", i64::from(attempt) + 1),
                            KeyValue::new("error.type", Status::BadRequest.as_str()),
                            KeyValue::new("exception.message", message),
                        ],
                    );
                    return outcome(Status::BadRequest, attempt, None);
                }
                Err(err) => {
                    if mode == Mode::Live {
                        let transition = self.with_breaker(&spec, |b| b.on_failure(Instant::now()));
                        BreakerCall {
                            extension_id: &spec.id,
                            success: false,
                        }
                        .emit();
                        self.transitioned(&spec.id, transition, span);
                    }
                    let (status, reason, message) = match err {
                        AttemptError::Timeout => {
                            (Status::Timeout, "timeout", "timed out".to_owned())
                        }
                        AttemptError::Error(message) | AttemptError::BadRequest(message) => {
                            (Status::Error, "error", message)
                        }
                    };
                    last_error = status;
                    span.add_event(
                        "extension.attempt_failed",
                        vec![
                            KeyValue::new("attempt", i64::from(attempt) + 1),
                            KeyValue::new("error.type", reason),
                            KeyValue::new("exception.message", message),
                        ],
                    );
                    if attempt < spec.retries {
                        if mode == Mode::Live {
                            ExtensionRetried {
                                spec: &spec,
                                reason,
                            }
                            .emit();
                        }
                        tokio::time::sleep(backoff(&spec, attempt)).await;
                    }
                }
            }
        }
        let status = if spec.retries > 0 {
            Status::MaxRetriesExceeded
        } else {
            last_error
        };
        outcome(status, spec.retries, None)
    }

    /// One request with the extension's timeout; the trace context of the
    /// invoke span travels in the headers, the service's comes back in the
    /// reply's and is linked.
    async fn attempt(
        &self,
        spec: &ExtensionSpec,
        payload: bytes::Bytes,
        tenant: &str,
        span: &tracing::Span,
    ) -> Result<ExtensionResponse, AttemptError> {
        let headers = telemetry::propagation::nats_headers_for(span, tenant);
        let request = self
            .nats
            .request_with_headers(spec.subject.clone(), headers, payload);
        let reply = match tokio::time::timeout(spec.timeout, request).await {
            Err(_) => return Err(AttemptError::Timeout),
            Ok(Err(err)) => {
                return Err(match err.kind() {
                    async_nats::RequestErrorKind::TimedOut => AttemptError::Timeout,
                    async_nats::RequestErrorKind::NoResponders => {
                        AttemptError::Error(format!("no service listens on {}", spec.subject))
                    }
                    _ => AttemptError::Error(err.to_string()),
                });
            }
            Ok(Ok(reply)) => reply,
        };
        if let Some(headers) = &reply.headers {
            let remote = telemetry::propagation::extract_nats(Some(headers));
            let server = remote.span().span_context().clone();
            if server.is_valid() {
                span.add_link(server);
            }
            if let Some(error) = headers.get(async_nats::service::NATS_SERVICE_ERROR) {
                let code = headers
                    .get(async_nats::service::NATS_SERVICE_ERROR_CODE)
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default();
                let message = format!("service error {code}: {}", error.as_str());
                return Err(if is_client_error(&code) {
                    AttemptError::BadRequest(message)
                } else {
                    AttemptError::Error(message)
                });
            }
        }
        ExtensionResponse::decode(&spec.subject, &reply.payload)
            .map_err(|e| AttemptError::Error(e.to_string()))
    }

    fn transitioned(&self, id: &str, transition: Option<Transition>, span: &tracing::Span) {
        if let Some(transition) = transition {
            span.add_event(
                "circuit_breaker.transition",
                vec![
                    KeyValue::new("extension.id", id.to_owned()),
                    KeyValue::new("circuit_breaker.from", transition.from.as_str()),
                    KeyValue::new("circuit_breaker.to", transition.to.as_str()),
                ],
            );
            BreakerTransitioned {
                extension_id: id,
                transition,
            }
            .emit();
        }
    }
}

/// A NATS service error code in 400..=499: the service refused the request.
fn is_client_error(code: &str) -> bool {
    code.trim()
        .parse::<u16>()
        .is_ok_and(|c| (400..500).contains(&c))
}

fn verdict_name(response: &ExtensionResponse) -> &'static str {
    match response.verdict {
        wire::extensions::Verdict::Allow => "allow",
        wire::extensions::Verdict::Reject => "reject",
    }
}

/// The wait before retry `attempt + 1`: `backoff · 2^attempt`, capped, with
/// "equal jitter" (half fixed, half random) so retries of many runs spread out.
pub fn backoff(spec: &ExtensionSpec, attempt: u32) -> Duration {
    let exp = spec
        .backoff
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(spec.max_backoff);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;

    fn spec() -> ExtensionSpec {
        ExtensionSpec {
            id: "x".to_owned(),
            kind: ExtensionType::Validator,
            subject: "ext.x".to_owned(),
            timeout: Duration::from_millis(100),
            retries: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            failure_policy: FailurePolicy::FailOpen,
            breaker: BreakerConfig::default(),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let spec = spec();
        for _ in 0..200 {
            let first = backoff(&spec, 0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let second = backoff(&spec, 1);
            assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
            let capped = backoff(&spec, 9);
            assert!(capped >= Duration::from_millis(150) && capped <= Duration::from_millis(300));
        }
        assert!(backoff(&spec, u32::MAX) <= Duration::from_millis(300));
    }
}
