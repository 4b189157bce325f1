//! `POST /v1/runs`, `GET /v1/runs`, `GET /v1/runs/{run_id}`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry::trace::TraceContextExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wire::events::RunEvent;
use wire::ids::{FlowId, ProviderId, RunId, TenantId};
use wire::run::{RunStatus, StepResult};
use wire::step::{FieldError, RawStep};

use crate::app::AppState;
use crate::error::ApiError;
use crate::events::{
    HandOff, IdempotencyChecked, IdempotencyResult, RateLimited, RunSubmission, SubmitOutcome,
};
use crate::idempotency;
use crate::store::{Claimed, Cursor, RunRecord};

pub const COLLECTION: &str = "/v1/runs";
pub const ITEM: &str = "/v1/runs/{run_id}";

const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// The body of `POST /v1/runs`, before parsing.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRunBody {
    /// The client's name for the flow (letters, digits, `_ - . :`; ≤ 128).
    flow_id: String,
    /// The steps, executed in order (1..=GATEWAY_MAX_STEPS, ids unique).
    #[schema(value_type = Vec<Object>)]
    steps: Vec<RawStep>,
    /// A provider hint, honoured when the tenant's policy allows it.
    #[serde(default)]
    provider: Option<String>,
}

/// The answer to an accepted submission.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    #[schema(value_type = String)]
    run_id: RunId,
    #[schema(value_type = String, example = "accepted")]
    status: RunStatus,
    trace_id: Option<String>,
    trace_url: Option<String>,
}

/// A run as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunView {
    #[schema(value_type = String)]
    run_id: RunId,
    #[schema(value_type = String)]
    flow_id: FlowId,
    /// accepted, routed, running, awaiting_approval, succeeded, failed, rejected, timed_out
    #[schema(value_type = String)]
    status: RunStatus,
    provider: Option<String>,
    /// Every step: its result, or `pending`.
    #[schema(value_type = Vec<Object>)]
    steps: Vec<StepView>,
    error: Option<String>,
    trace_id: Option<String>,
    trace_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    updated_at: OffsetDateTime,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunList {
    runs: Vec<RunView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
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

/// Submit a run.
#[utoipa::path(
    post,
    path = "/v1/runs",
    tag = "runs",
    request_body(content = CreateRunBody, content_type = "application/json"),
    params(
        ("wait" = Option<u32>, Query, description = "Hold the request up to this many seconds (max 60) until the run ends"),
        ("Idempotency-Key" = Option<String>, Header, description = "Same key + same body = same run (≤ 255 printable characters, remembered GATEWAY_IDEMPOTENCY_TTL_SECS)"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context to continue"),
    ),
    responses(
        (status = 202, description = "Stored: the run will be executed (handed off to JetStream now, or republished from the outbox until JetStream has it); or, after `wait`, still running", body = Accepted,
         headers(("traceparent" = String, description = "The gateway's server span"), ("Location" = String))),
        (status = 200, description = "With `wait`: the run ended", body = RunView),
        (status = 400, description = "Malformed JSON or an invalid field (`malformed_json`, `invalid_field`)", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or unknown API key (`unauthorized`)", body = crate::openapi::ErrorBody),
        (status = 409, description = "The same Idempotency-Key is still in flight (`idempotency_key_in_flight`)", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
        (status = 413, description = "Body over GATEWAY_BODY_LIMIT_BYTES (`payload_too_large`)", body = crate::openapi::ErrorBody),
        (status = 415, description = "Body not JSON (`unsupported_media_type`)", body = crate::openapi::ErrorBody),
        (status = 422, description = "Idempotency-Key reused with another body (`idempotency_key_reused`)", body = crate::openapi::ErrorBody),
        (status = 429, description = "Tenant rate limit (`rate_limited`)", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
        (status = 503, description = "Nothing was stored; retry (with the same Idempotency-Key to be safe): the gateway is not connected to NATS (`broker_unavailable`) or the run store is unavailable (`store_unavailable`)", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = match query_params(query) {
        Ok(query) => create_inner(&state, &headers, &query, body).await,
        Err(err) => Err(err),
    };
    let outcome = match &result {
        Ok(_) => SubmitOutcome::Accepted,
        Err(ApiError::BrokerUnavailable) => SubmitOutcome::BrokerUnavailable,
        Err(ApiError::StoreUnavailable(_)) => SubmitOutcome::StoreUnavailable,
        Err(ApiError::Unexpected(_)) => SubmitOutcome::Failed,
        Err(_) => SubmitOutcome::Invalid,
    };
    RunSubmission { outcome }.emit();
    result
}

async fn create_inner(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authorize(state, headers)?;
    require_json(headers)?;
    let wait = parse_wait(state, query)?;
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map_err(|_| "must be printable ASCII".to_owned())
                .and_then(idempotency::parse_key)
                .map_err(|m| FieldError::new("Idempotency-Key", m))
        })
        .transpose()?;
    let body = body_bytes(state, body)?;
    let value: Value = parse_json_object(&body)?;
    let request: CreateRunBody = from_value(value.clone())?;
    let flow_id = FlowId::parse(request.flow_id).map_err(|m| FieldError::new("flow_id", m))?;
    let provider = request
        .provider
        .map(ProviderId::parse)
        .transpose()
        .map_err(|m| FieldError::new("provider", m))?;
    let steps = wire::step::parse_steps_with_depth(
        request.steps,
        state.config.max_steps,
        state.config.max_input_depth,
    )?;

    let span = tracing::Span::current();
    let run_id = RunId::generate(uuid::Uuid::now_v7());
    if let Some(key) = &idempotency_key {
        let fingerprint = idempotency::fingerprint(&value);
        match claim(state, &tenant, key, &fingerprint, &run_id).await? {
            Claim::New => {}
            Claim::Replay(existing) => {
                span.record("run.id", existing.as_str());
                let run = state
                    .store
                    .get(&tenant, &existing)
                    .await?
                    .ok_or(ApiError::NotFound("run"))?;
                let waiter = wait.map(|_| state.waiters.subscribe(existing.as_str()));
                let mut response = answer(state, run, wait, waiter).await?;
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
        }
    }
    span.record("run.id", run_id.as_str());
    span.record("flow.id", flow_id.as_str());
    // While NATS is known to be away, refuse before storing anything: a
    // 503 means nothing was recorded.
    if !state.outbox.connected() {
        release(state, &tenant, idempotency_key.as_deref(), &run_id).await;
        return Err(ApiError::BrokerUnavailable);
    }
    let trace_id = current_trace_id(&span);
    let now = OffsetDateTime::now_utc();
    let record = RunRecord {
        run_id: run_id.clone(),
        tenant_id: tenant.clone(),
        flow_id,
        status: RunStatus::Accepted,
        steps,
        results: Vec::new(),
        provider: None,
        error: None,
        trace_id: trace_id.clone(),
        provider_hint: provider.map(|p| p.to_string()),
        trace_context: crate::outbox::trace_context(&span),
        handed_off_at: None,
        created_at: now,
        updated_at: now,
    };
    // The outbox: stored first (with the idempotency key completed in the
    // same transaction), then handed off. Once stored the run is accepted:
    // it reaches JetStream whatever happens to this request or process.
    match state
        .store
        .insert(&record, idempotency_key.as_deref())
        .await
    {
        Ok(true) => {}
        // Our claim outlived its lease and another request took the key.
        Ok(false) => return Err(ApiError::IdempotencyInFlight),
        Err(err) => {
            release(state, &tenant, idempotency_key.as_deref(), &run_id).await;
            return Err(err.into());
        }
    }
    // Subscribed before publishing, so a fast run cannot end unseen.
    let waiter = wait.map(|_| state.waiters.subscribe(run_id.as_str()));
    // In a task of its own: a client hanging up drops this handler, not the
    // hand-off. Waited for (bounded by the publish timeout) so a healthy
    // broker has the run before the client hears 202; if it is not
    // acknowledged, the outbox republishes it.
    let outbox = state.outbox.clone();
    let handing_off = {
        let record = record.clone();
        tokio::spawn(
            async move { outbox.hand_off(&record, HandOff::First).await }.instrument(span.clone()),
        )
    };
    let _ = handing_off.await;
    answer(state, record, wait, waiter).await
}

enum Claim {
    /// The key is ours: create the run.
    New,
    /// The key already stands for this run: answer with it.
    Replay(RunId),
}

/// `gateway.idempotency.check`: claims the key, or finds what it stands for.
/// A request holding the same key concurrently is waited for — at most a
/// claim lease, after which its claim is taken over (its holder is gone).
async fn claim(
    state: &AppState,
    tenant: &TenantId,
    key: &str,
    fingerprint: &str,
    run_id: &RunId,
) -> Result<Claim, ApiError> {
    let span = tracing::info_span!(
        "gateway.idempotency.check",
        idempotency.result = tracing::field::Empty
    );
    let outcome = async {
        let deadline =
            tokio::time::Instant::now() + idempotency::CLAIM_LEASE + Duration::from_secs(2);
        let mut pause = Duration::from_millis(20);
        // The claim is a write; waiting on another request's claim only reads,
        // with a growing pause, so a burst of identical requests does not
        // starve the store of connections and write locks.
        let claim_now = || {
            state.store.claim_idempotency_key(
                tenant,
                key,
                fingerprint,
                run_id,
                state.config.idempotency_ttl,
                idempotency::CLAIM_LEASE,
            )
        };
        let mut claimed = Some(claim_now().await?);
        loop {
            let existing = match claimed.take() {
                Some(Claimed::Ours) => return Ok((Claim::New, IdempotencyResult::Miss)),
                Some(Claimed::Taken(existing)) => Some(existing),
                None => state.store.idempotency_record(tenant, key).await?,
            };
            let held = match existing {
                Some(existing) if existing.body_hash != fingerprint => {
                    return Ok((Claim::Replay(existing.run_id), IdempotencyResult::Conflict));
                }
                Some(existing) if existing.status_code.is_some() => {
                    return Ok((Claim::Replay(existing.run_id), IdempotencyResult::Hit));
                }
                // In flight: another request is between its claim and storing
                // its run (milliseconds, unless it died: then its lease runs out).
                Some(existing) => existing
                    .lease_until
                    .is_some_and(|until| until > OffsetDateTime::now_utc()),
                None => false,
            };
            if !held {
                // Free again, or its holder's lease is out: try to claim it.
                claimed = Some(claim_now().await?);
                // A claim that is still held right after a takeover attempt
                // (a race with another waiter) falls through to the pause.
                if !matches!(&claimed, Some(Claimed::Taken(r)) if r.status_code.is_none()) {
                    continue;
                }
                claimed = None;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::IdempotencyInFlight);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
    .instrument(span.clone())
    .await;
    let (claim, result) = outcome?;
    span.record("idempotency.result", result.as_str());
    let _entered = span.enter();
    IdempotencyChecked { result }.emit();
    match result {
        IdempotencyResult::Conflict => Err(ApiError::IdempotencyKeyReused),
        _ => Ok(claim),
    }
}

/// Gives up our claim on the key when nothing was stored, so a retry need
/// not wait for the lease. Failing that, the lease runs out by itself.
async fn release(state: &AppState, tenant: &TenantId, key: Option<&str>, run_id: &RunId) {
    if let Some(key) = key
        && let Err(err) = state
            .store
            .release_idempotency_key(tenant, key, run_id)
            .await
    {
        tracing::warn!(
            error = format!("{err:#}"),
            "cannot release an idempotency key"
        );
    }
}

/// 202 with the run id, or — with `wait` — 200 with the run once it ends
/// (202 with the run so far if the wait runs out).
async fn answer(
    state: &AppState,
    run: RunRecord,
    wait: Option<Duration>,
    waiter: Option<crate::waiters::Waiter>,
) -> Result<Response, ApiError> {
    let location = format!("{COLLECTION}/{}", run.run_id);
    let mut response = match (wait, waiter) {
        (Some(wait), Some(mut waiter)) => {
            let latest = wait_for_end(&mut waiter, wait, run.status, &state.stopping).await;
            // The run is stored: a store hiccup now must not turn the
            // answer into a 503 ("nothing stored"); show what we have.
            let stored = match state.store.get(&run.tenant_id, &run.run_id).await {
                Ok(Some(stored)) => stored,
                Ok(None) => run,
                Err(err) => {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "cannot re-read the run after the wait; answering with the run as submitted"
                    );
                    run
                }
            };
            let view = view(state, stored, latest.as_ref());
            let status = if view.status.is_terminal() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(view)).into_response()
        }
        _ => {
            let body = Accepted {
                trace_url: run.trace_id.as_ref().map(|t| state.trace_url(t)),
                trace_id: run.trace_id,
                status: run.status,
                run_id: run.run_id,
            };
            (StatusCode::ACCEPTED, Json(body)).into_response()
        }
    };
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

/// Waits for a terminal event, at most `wait` and not past the start of
/// shutdown; returns the latest event seen.
async fn wait_for_end(
    waiter: &mut crate::waiters::Waiter,
    wait: Duration,
    current: RunStatus,
    stopping: &tokio_util::sync::CancellationToken,
) -> Option<RunEvent> {
    if current.is_terminal() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(event) = waiter.events.borrow().as_ref()
            && event.status.is_terminal()
        {
            return Some(event.clone());
        }
        let changed = tokio::select! {
            changed = tokio::time::timeout_at(deadline, waiter.events.changed()) => changed,
            _ = stopping.cancelled() => return waiter.events.borrow().clone(),
        };
        match changed {
            Ok(Ok(())) => continue,
            _ => return waiter.events.borrow().clone(),
        }
    }
}

/// The query string as a map, or 400 when it does not parse.
fn query_params(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| FieldError::new("query", e.body_text()).into())
}

fn parse_wait(
    state: &AppState,
    query: &HashMap<String, String>,
) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = query.get("wait") else {
        return Ok(None);
    };
    let max = state.config.max_wait.as_secs();
    let secs: u64 = raw.parse().ok().filter(|s| *s <= max).ok_or_else(|| {
        FieldError::new(
            "wait",
            format!("must be a whole number of seconds from 0 to {max}"),
        )
    })?;
    Ok((secs > 0).then(|| Duration::from_secs(secs)))
}

/// Get one run.
#[utoipa::path(
    get,
    path = "/v1/runs/{run_id}",
    tag = "runs",
    params(("run_id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 401, description = "No or unknown API key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such run for this tenant (`not_found`)", body = crate::openapi::ErrorBody),
        (status = 429, description = "Tenant rate limit", body = crate::openapi::ErrorBody),
        (status = 503, description = "The run store is unavailable (`store_unavailable`)", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
    ),
    security(("api_key" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    run_id: Result<Path<String>, PathRejection>,
) -> Result<Json<RunView>, ApiError> {
    let tenant = authorize(&state, &headers)?;
    // A malformed id cannot name a run: the same 404 as a missing one.
    let run_id = run_id
        .ok()
        .and_then(|Path(id)| RunId::parse(id).ok())
        .ok_or(ApiError::NotFound("run"))?;
    tracing::Span::current().record("run.id", run_id.as_str());
    let run = state
        .store
        .get(&tenant, &run_id)
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    Ok(Json(view(&state, run, None)))
}

/// List the tenant's runs, newest first.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(
        ("status" = Option<String>, Query, description = "Only runs with this status"),
        ("limit" = Option<u32>, Query, description = "Page size, 1..=100 (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of runs", body = RunList),
        (status = 400, description = "Invalid status, limit or cursor (`invalid_field`)", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or unknown API key", body = crate::openapi::ErrorBody),
        (status = 429, description = "Tenant rate limit", body = crate::openapi::ErrorBody),
        (status = 503, description = "The run store is unavailable (`store_unavailable`)", body = crate::openapi::ErrorBody, headers(("Retry-After" = u64))),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<RunList>, ApiError> {
    let tenant = authorize(&state, &headers)?;
    let query = query_params(query)?;
    let status = query
        .get("status")
        .map(|s| {
            RunStatus::parse(s)
                .ok_or_else(|| FieldError::new("status", format!("unknown run status {s:?}")))
        })
        .transpose()?;
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                FieldError::new(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_PAGE}"),
                )
            })?,
    };
    let cursor = query
        .get("cursor")
        .map(|raw| {
            decode_cursor(raw)
                .ok_or_else(|| FieldError::new("cursor", "is not a cursor this API returned"))
        })
        .transpose()?;
    let page = state
        .store
        .list(&tenant, status, limit, cursor.as_ref())
        .await?;
    Ok(Json(RunList {
        runs: page
            .runs
            .into_iter()
            .map(|r| view(&state, r, None))
            .collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// Cursors are opaque to clients: hex of `created_at|run_id`.
fn encode_cursor(cursor: &Cursor) -> String {
    format!("{}|{}", cursor.created_at, cursor.run_id)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(raw: &str) -> Option<Cursor> {
    if raw.len() % 2 != 0 || raw.len() > 400 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..raw.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(raw.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (created_at, run_id) = text.split_once('|')?;
    OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339).ok()?;
    RunId::parse(run_id).ok()?;
    Some(Cursor {
        created_at: created_at.to_owned(),
        run_id: run_id.to_owned(),
    })
}

/// The run as the API shows it; a newer event than the store has (woken
/// waiters can see it first) is laid over it.
fn view(state: &AppState, mut run: RunRecord, event: Option<&RunEvent>) -> RunView {
    if let Some(event) = event
        && event.status.rank() > run.status.rank()
    {
        run.status = event.status;
        run.results = event.steps.clone();
        run.error = event.error.clone();
        run.provider = event
            .provider
            .as_ref()
            .map(ToString::to_string)
            .or(run.provider);
    }
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

/// The tenant of the request's API key (recorded on the span), within its
/// rate limit; 401 or 429 otherwise.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let tenant = state
        .config
        .api_keys
        .authenticate(headers)
        .cloned()
        .ok_or(ApiError::Unauthorized)?;
    tracing::Span::current().record("tenant.id", tenant.as_str());
    if let Err(wait) = state.rate_limiter.check(&tenant) {
        let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        RateLimited {
            tenant_id: tenant.as_str(),
            retry_after_secs,
        }
        .emit();
        return Err(ApiError::RateLimited(retry_after_secs));
    }
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
    from_value(value)
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            created_at: "2026-11-21T20:00:00.000001Z".to_owned(),
            run_id: "01a1ffab-843e-71f0-abad-7fc4259a0512".to_owned(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)), Some(cursor));
        for bad in ["", "zz", "abc", "7c7c", &"00".repeat(300)] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
