//! `POST /v1/runs/{run_id}/steps/{step_id}/approve` and `/reject`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use wire::approvals::{ApprovalDecision, Verdict};
use wire::ids::{RunId, StepId};
use wire::run::{RunStatus, StepStatus};
use wire::step::FieldError;

use crate::app::AppState;
use crate::error::ApiError;
use crate::routes::runs::{authorize, body_bytes, parse_json_object};

pub const APPROVE: &str = "/v1/runs/{run_id}/steps/{step_id}/approve";
pub const REJECT: &str = "/v1/runs/{run_id}/steps/{step_id}/reject";

const MAX_COMMENT_CHARS: usize = 1_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    comment: Option<String>,
}

/// Approve an `approval` step that is waiting.
#[utoipa::path(
    post,
    path = "/v1/runs/{run_id}/steps/{step_id}/approve",
    tag = "approvals",
    params(("run_id" = String, Path), ("step_id" = String, Path)),
    request_body(content = Option<crate::openapi::DecisionBodySchema>, content_type = "application/json"),
    responses(
        (status = 202, description = "Decision recorded; the worker resumes the run"),
        (status = 400, description = "Invalid body (`invalid_field`, `malformed_json`)", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or unknown API key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such run for this tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "Step not awaiting approval (`not_awaiting_approval`) or already decided (`already_decided`)", body = crate::openapi::ErrorBody),
        (status = 415, description = "Body not JSON", body = crate::openapi::ErrorBody),
        (status = 429, description = "Tenant rate limit", body = crate::openapi::ErrorBody),
        (status = 503, description = "Broker or run store unavailable (`broker_unavailable`, `store_unavailable`); retry", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
    ),
    security(("api_key" = []))
)]
pub async fn approve(
    state: State<AppState>,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    decide(state, headers, ids, body, Verdict::Approved).await
}

/// Reject an `approval` step that is waiting (the run fails).
#[utoipa::path(
    post,
    path = "/v1/runs/{run_id}/steps/{step_id}/reject",
    tag = "approvals",
    params(("run_id" = String, Path), ("step_id" = String, Path)),
    request_body(content = Option<crate::openapi::DecisionBodySchema>, content_type = "application/json"),
    responses(
        (status = 202, description = "Decision recorded; the run fails"),
        (status = 400, description = "Invalid body", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or unknown API key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such run for this tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "Step not awaiting approval or already decided", body = crate::openapi::ErrorBody),
        (status = 415, description = "Body not JSON", body = crate::openapi::ErrorBody),
        (status = 429, description = "Tenant rate limit", body = crate::openapi::ErrorBody),
        (status = 503, description = "Broker or run store unavailable (`broker_unavailable`, `store_unavailable`); retry", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
    ),
    security(("api_key" = []))
)]
pub async fn reject(
    state: State<AppState>,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    decide(state, headers, ids, body, Verdict::Rejected).await
}

async fn decide(
    State(state): State<AppState>,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
    verdict: Verdict,
) -> Result<Response, ApiError> {
    let tenant = authorize(&state, &headers)?;
    let Ok(Path((run_id, step_id))) = ids else {
        return Err(ApiError::NotFound("run"));
    };
    let run_id = RunId::parse(run_id).map_err(|_| ApiError::NotFound("run"))?;
    tracing::Span::current().record("run.id", run_id.as_str());
    let step_id = StepId::parse(step_id).map_err(|_| ApiError::NotFound("step"))?;
    let body = body_bytes(&state, body)?;
    let decision: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecisionBody::default()
    } else {
        crate::routes::runs::require_json(&headers)?;
        parse_json_object(&body)?
    };
    if decision
        .comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
    {
        return Err(FieldError::new(
            "comment",
            format!("must be at most {MAX_COMMENT_CHARS} characters"),
        )
        .into());
    }

    let run = state
        .store
        .get(&tenant, &run_id)
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    let key = wire::approvals::key(&run_id, &step_id);
    // A decision already made wins over the run's state (which moves on
    // once the worker has read it).
    match state.approvals.get(&key).await {
        Ok(Some(_)) => return Err(ApiError::AlreadyDecided),
        Ok(None) => {}
        Err(_) => return Err(ApiError::BrokerUnavailable),
    }
    let awaiting = run.status == RunStatus::AwaitingApproval
        && run
            .results
            .iter()
            .any(|r| r.id == step_id && r.status == StepStatus::AwaitingApproval);
    if !awaiting {
        return Err(ApiError::NotAwaitingApproval);
    }
    let record = ApprovalDecision {
        verdict,
        comment: decision.comment,
        tenant_id: tenant,
        at: OffsetDateTime::now_utc(),
    };
    match state.approvals.create(&key, record.encode()).await {
        Ok(_) => {}
        Err(err) if err.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            return Err(ApiError::AlreadyDecided);
        }
        Err(_) => return Err(ApiError::BrokerUnavailable),
    }
    tracing::info!(
        step.id = step_id.as_str(),
        verdict = verdict.as_str(),
        "approval decision recorded"
    );
    let body = json!({"run_id": run_id, "step_id": step_id, "verdict": verdict});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
