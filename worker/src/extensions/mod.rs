//! Sample extension services the router calls over NATS request/reply, hosted
//! by the worker as a NATS micro-service (`beamline-extensions`), so a demo
//! run shows the extra hop:
//!
//! - `pii-guard` (`ext.pii-guard`, a `validator`): rejects runs whose step
//!   inputs contain a card number (Luhn-checked) or an email address. The
//!   reason names the step and the kind of data, never the data.
//! - `enrich` (`ext.enrich`, a `pre`): adds metadata to the run.
//!
//! Each has an injected latency and error rate, so a user can trip the
//! router's circuit breaker on purpose. Settings (read here, not in
//! `config.rs`): `WORKER_EXTENSIONS_ENABLED` (default `true`),
//! `WORKER_EXT_VALIDATOR_LATENCY_MS`, `WORKER_EXT_VALIDATOR_ERROR_RATE`,
//! `WORKER_EXT_PRE_LATENCY_MS`, `WORKER_EXT_PRE_ERROR_RATE` (defaults 0).

pub mod pii;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::{Request, ServiceExt as _};
use futures::StreamExt as _;
use opentelemetry::trace::Status;
use telemetry::env::{self, EnvError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wire::extensions::{ExtensionRequest, ExtensionResponse, ExtensionType, Verdict};

pub const VALIDATOR_ID: &str = "pii-guard";
pub const PRE_ID: &str = "enrich";
pub const SERVICE_NAME: &str = "beamline-extensions";

pub const REQUESTS_TOTAL: &str = "worker_extension_requests_total";

/// Injected faults of one sample extension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    pub latency: Duration,
    /// Probability (0..=1) of answering with a service error.
    pub error_rate: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    pub validator: Faults,
    pub pre: Faults,
}

impl Settings {
    pub fn from_env() -> Result<Self, EnvError> {
        let faults = |prefix: &str| -> Result<Faults, EnvError> {
            let latency_var = format!("WORKER_EXT_{prefix}_LATENCY_MS");
            let rate_var = format!("WORKER_EXT_{prefix}_ERROR_RATE");
            let error_rate: f64 = env::parse_or(&rate_var, 0.0)?;
            if !(0.0..=1.0).contains(&error_rate) {
                return Err(EnvError::new(
                    &rate_var,
                    &error_rate.to_string(),
                    "must be between 0 and 1",
                ));
            }
            Ok(Faults {
                latency: Duration::from_millis(env::parse_or(&latency_var, 0)?),
                error_rate,
            })
        };
        Ok(Self {
            enabled: env::flag("WORKER_EXTENSIONS_ENABLED", true)?,
            validator: faults("VALIDATOR")?,
            pre: faults("PRE")?,
        })
    }
}

/// Serves the sample extensions until `shutdown`; does nothing when disabled.
pub async fn serve(
    nats: async_nats::Client,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !settings.enabled {
        return Ok(());
    }
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered by the sample extension services, by extension and result."
    );
    let service = nats
        .service_builder()
        .description("Beamline sample extensions (pii-guard validator, enrich pre)")
        .start(SERVICE_NAME, "0.1.0")
        .await
        .map_err(|e| anyhow::anyhow!("starting the {SERVICE_NAME} NATS service: {e}"))?;
    let mut handlers = tokio::task::JoinSet::new();
    for (id, kind, faults) in [
        (VALIDATOR_ID, ExtensionType::Validator, settings.validator),
        (PRE_ID, ExtensionType::Pre, settings.pre),
    ] {
        let subject = wire::extensions::subject(id);
        let mut endpoint = service
            .endpoint_builder()
            .name(id)
            .add(subject.clone())
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {subject}: {e}"))?;
        let shutdown = shutdown.clone();
        handlers.spawn(async move {
            let subject: Arc<str> = subject.into();
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = endpoint.next() => match next {
                        Some(request) => request,
                        None => break,
                    },
                };
                tokio::spawn(handle(request, id, kind, faults, subject.clone()));
            }
            let _ = endpoint.stop().await;
        });
    }
    tracing::info!(
        extensions = ?[VALIDATOR_ID, PRE_ID],
        "sample extension services started"
    );
    while handlers.join_next().await.is_some() {}
    service
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("stopping the {SERVICE_NAME} service: {e}"))?;
    Ok(())
}

/// Answers one request inside a `process ext.<id>` SERVER span that
/// continues the router's trace; the reply carries this span's context back.
async fn handle(
    request: Request,
    id: &'static str,
    kind: ExtensionType,
    faults: Faults,
    subject: Arc<str>,
) {
    let span = tracing::info_span!(
        parent: None,
        "process",
        otel.name = format!("process {subject}"),
        otel.kind = "server",
        otel.status_code = Empty,
        error.type = Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = &*subject,
        extension.id = id,
        extension.type = kind.as_str(),
        extension.verdict = Empty,
        tenant.id = Empty,
        run.id = Empty,
        flow.id = Empty,
    );
    let _ = span.set_parent(telemetry::propagation::extract_nats(
        request.message.headers.as_ref(),
    ));
    let (answer, result) = answer(&request, id, kind, faults, &subject)
        .instrument(span.clone())
        .await;
    match &answer {
        Ok(response) => {
            let verdict = match response.verdict {
                Verdict::Allow => "allow",
                Verdict::Reject => "reject",
            };
            span.record("extension.verdict", verdict);
        }
        Err(err) => {
            span.record("error.type", "injected_failure");
            span.set_status(Status::error(err.status.clone()));
        }
    }
    metrics::counter!(REQUESTS_TOTAL, "extension_id" => id, "result" => result).increment(1);
    let mut headers = async_nats::HeaderMap::new();
    telemetry::propagation::inject_nats(&span.context(), &mut headers);
    let reply = answer.map(|r| r.encode());
    if let Err(err) = request.respond_with_headers(reply, headers).await {
        tracing::warn!(parent: &span, extension.id = id, error = %err, "cannot answer the router");
    }
}

async fn answer(
    request: &Request,
    id: &'static str,
    kind: ExtensionType,
    faults: Faults,
    subject: &str,
) -> (
    Result<ExtensionResponse, async_nats::service::error::Error>,
    &'static str,
) {
    let run = match ExtensionRequest::decode(subject, &request.message.payload) {
        Ok(req) => req.run,
        Err(err) => {
            tracing::warn!(extension.id = id, error = %err, "malformed extension request");
            return (
                Err(async_nats::service::error::Error {
                    status: "malformed request".to_owned(),
                    code: 400,
                }),
                "bad_request",
            );
        }
    };
    let span = tracing::Span::current();
    span.record("tenant.id", run.tenant_id.as_str());
    span.record("run.id", run.run_id.as_str());
    span.record("flow.id", run.flow_id.as_str());
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
        tracing::info!(extension.id = id, "injected failure");
        return (
            Err(async_nats::service::error::Error {
                status: "injected failure".to_owned(),
                code: 503,
            }),
            "injected_error",
        );
    }
    match kind {
        ExtensionType::Validator => match pii::find(&run.steps) {
            Some(found) => {
                tracing::info!(extension.id = id, step.id = %found.step_id, kind = found.kind, "run rejected");
                (
                    Ok(ExtensionResponse::reject(format!(
                        "step {} input contains {}",
                        found.step_id, found.kind
                    ))),
                    "reject",
                )
            }
            None => (Ok(ExtensionResponse::allow()), "allow"),
        },
        ExtensionType::Pre => {
            let mut metadata = BTreeMap::new();
            metadata.insert("enriched_by".to_owned(), id.to_owned());
            metadata.insert("step_count".to_owned(), run.steps.len().to_string());
            (
                Ok(ExtensionResponse {
                    metadata,
                    ..ExtensionResponse::allow()
                }),
                "allow",
            )
        }
        ExtensionType::Post => (Ok(ExtensionResponse::allow()), "allow"),
    }
}
