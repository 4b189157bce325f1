//! `POST /v1/runs` and `GET /v1/runs/{run_id}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry::trace::TraceContextExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wire::ids::{FlowId, ProviderId, RunId, TenantId};
use wire::jetstream::Outgoing;
use wire::run::{RunStatus, StepResult};
use wire::step::{FieldError, RawStep, parse_steps};
use wire::submitted::RunSubmitted;

use crate::app::AppState;
use crate::error::ApiError;
use crate::events::{RunSubmission, SubmitOutcome};
use crate::store::RunRecord;

pub const COLLECTION: &str = "/v1/runs";
pub const ITEM: &str = "/v1/runs/{run_id}";

/// The body of `POST /v1/runs`, before parsing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRunBody {
    flow_id: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    provider: Option<String>,
}

#[derive(Debug, Serialize)]
struct Accepted {
    run_id: RunId,
    status: RunStatus,
    trace_id: Option<String>,
    trace_url: Option<String>,
}

/// A run as `GET /v1/runs/{run_id}` shows it.
#[derive(Debug, Serialize)]
pub struct RunView {
    run_id: RunId,
    flow_id: FlowId,
    status: RunStatus,
    provider: Option<String>,
    steps: Vec<StepView>,
    error: Option<String>,
    trace_id: Option<String>,
    trace_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

/// A step's result, or `pending` before the worker has reported it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum StepView {
    Reported(StepResult),
    Pending {
        id: String,
        #[serde(rename = "type")]
        step_type: &'static str,
        status: &'static str,
        attempts: u32,
        output: Value,
        error: Option<String>,
        started_at: Option<String>,
        ended_at: Option<String>,
    },
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = create_inner(&state, &headers, body).await;
    let outcome = match &result {
        Ok(_) => SubmitOutcome::Accepted,
        Err(ApiError::BrokerUnavailable) => SubmitOutcome::BrokerUnavailable,
        Err(ApiError::Unexpected(_)) => SubmitOutcome::Failed,
        Err(_) => SubmitOutcome::Invalid,
    };
    RunSubmission { outcome }.emit();
    result
}

async fn create_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers)?;
    require_json(headers)?;
    let body = body_bytes(state, body)?;
    let request: CreateRunBody = parse_json_object(&body)?;
    let flow_id = FlowId::parse(request.flow_id).map_err(|m| FieldError::new("flow_id", m))?;
    let provider = request
        .provider
        .map(ProviderId::parse)
        .transpose()
        .map_err(|m| FieldError::new("provider", m))?;
    let steps = parse_steps(request.steps, state.config.max_steps)?;

    let span = tracing::Span::current();
    let run_id = RunId::generate(uuid::Uuid::now_v7());
    span.record("run.id", run_id.as_str());
    span.record("flow.id", flow_id.as_str());
    let trace_id = current_trace_id(&span);
    let now = OffsetDateTime::now_utc();

    let run = RunSubmitted {
        run_id: run_id.clone(),
        tenant_id: tenant.clone(),
        flow_id: flow_id.clone(),
        steps: steps.clone(),
        provider,
        submitted_at: now,
    };
    // Stored first, then handed off: an event can never arrive for a run the
    // store does not know. If the hand-off fails the row is removed again, so
    // nothing half-accepted remains.
    state
        .store
        .insert(&RunRecord {
            run_id: run_id.clone(),
            tenant_id: tenant.clone(),
            flow_id,
            status: RunStatus::Accepted,
            steps,
            results: Vec::new(),
            provider: None,
            error: None,
            trace_id: trace_id.clone(),
            created_at: now,
            updated_at: now,
        })
        .await?;
    let published = tokio::time::timeout(
        state.config.publish_timeout,
        wire::jetstream::publish(
            &state.jetstream,
            Outgoing {
                subject: wire::submitted::SUBJECT,
                message_id: run_id.as_str(),
                payload: run.encode(),
                tenant_id: tenant.as_str(),
                run_id: run_id.as_str(),
            },
        ),
    )
    .await;
    if !matches!(published, Ok(Ok(_))) {
        let reason = match published {
            Ok(Err(err)) => err.to_string(),
            _ => "timed out waiting for the JetStream acknowledgement".to_owned(),
        };
        telemetry::events::ComponentError {
            code: "broker_unavailable",
            message: &reason,
        }
        .emit();
        state.store.delete(&run_id).await?;
        return Err(ApiError::BrokerUnavailable);
    }

    let location = format!("{COLLECTION}/{run_id}");
    let body = Accepted {
        trace_url: trace_id.as_ref().map(|t| state.trace_url(t)),
        trace_id,
        status: RunStatus::Accepted,
        run_id,
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let tenant = authenticate(&state, &headers)?;
    // A malformed id cannot name a run: the same 404 as a missing one.
    let run_id = RunId::parse(run_id).map_err(|_| ApiError::NotFound("run"))?;
    tracing::Span::current().record("run.id", run_id.as_str());
    let run = state
        .store
        .get(&tenant, &run_id)
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    Ok(Json(view(&state, run)))
}

fn view(state: &AppState, run: RunRecord) -> RunView {
    let steps = run
        .steps
        .iter()
        .map(|spec| match run.results.iter().find(|r| r.id == spec.id) {
            Some(result) => StepView::Reported(result.clone()),
            None => StepView::Pending {
                id: spec.id.to_string(),
                step_type: spec.kind.type_name(),
                status: "pending",
                attempts: 0,
                output: Value::Null,
                error: None,
                started_at: None,
                ended_at: None,
            },
        })
        .collect();
    RunView {
        trace_url: run.trace_id.as_ref().map(|t| state.trace_url(t)),
        run_id: run.run_id,
        flow_id: run.flow_id,
        status: run.status,
        provider: run.provider,
        steps,
        error: run.error,
        trace_id: run.trace_id,
        created_at: run.created_at,
        updated_at: run.updated_at,
    }
}

/// The body, or 413 when over the limit.
pub fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(state.config.body_limit)
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })
}

/// The tenant of the request's API key (recorded on the span), or 401.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let tenant = state
        .config
        .api_keys
        .authenticate(headers)
        .cloned()
        .ok_or(ApiError::Unauthorized)?;
    tracing::Span::current().record("tenant.id", tenant.as_str());
    Ok(tenant)
}

/// 415 unless the body is declared JSON.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Parses a JSON object body, naming the field at fault (`steps[0].id: …`).
pub fn parse_json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(FieldError::new("body", "must be a JSON object").into());
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        FieldError::new(field, strip_position(err.inner())).into()
    })
}

/// serde_json's message without its " at line 1 column 42" suffix.
fn strip_position(err: &serde_json::Error) -> String {
    let message = err.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

fn current_trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span_ref = cx.span();
    let span_context = span_ref.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
