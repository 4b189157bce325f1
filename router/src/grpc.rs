//! The gRPC API on `ROUTER_GRPC_ADDR`: `beamline.router.v1.Router/Decide` (a
//! dry-run decision) and the standard `grpc.health.v1.Health` service.
//!
//! `Decide` needs `authorization: Bearer <ROUTER_GRPC_TOKEN>` ([`auth`]), is
//! refused over `ROUTER_GRPC_MAX_REQUEST_BYTES` before it is decoded, and
//! changes nothing: no breaker moves and no production metric counts it
//! ([`Decider::dry_run`]). Health stays open: it answers SERVING or
//! NOT_SERVING and nothing else, and orchestrators' gRPC probes cannot send
//! a token. Each `Decide` call gets a SERVER span ([`traced`]) continuing
//! the trace context of the request metadata.

mod auth;
mod traced;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use wire::ids::{FlowId, ProviderId, RunId, TenantId};
use wire::step::RawStep;
use wire::submitted::RunSubmitted;

use crate::decide::{Decider, Verdict};

include!(concat!(env!("OUT_DIR"), "/beamline.router.v1.Router.rs"));

pub use auth::GrpcAuth;
pub use router_client::RouterClient;
pub use router_server::{Router, RouterServer};
pub use traced::{code_name, is_server_error};

/// The most steps a `Decide` request may carry (as the gateway's limit).
const MAX_STEPS: usize = 100;

#[derive(Clone, PartialEq, prost::Message)]
pub struct DecideRequest {
    #[prost(string, tag = "1")]
    pub tenant_id: String,
    #[prost(string, tag = "2")]
    pub flow_id: String,
    /// The `steps` array of `POST /v1/runs`, as JSON.
    #[prost(string, tag = "3")]
    pub steps_json: String,
    #[prost(string, optional, tag = "4")]
    pub provider: Option<String>,
    /// Made up (`dry-run-<uuid>`) when empty.
    #[prost(string, tag = "5")]
    pub run_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtensionResult {
    #[prost(string, tag = "1")]
    pub extension_id: String,
    #[prost(string, tag = "2")]
    pub extension_type: String,
    #[prost(string, tag = "3")]
    pub status: String,
    #[prost(uint32, tag = "4")]
    pub retries_used: u32,
    #[prost(string, tag = "5")]
    pub verdict: String,
    #[prost(string, tag = "6")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DecideResponse {
    #[prost(string, tag = "1")]
    pub policy_id: String,
    #[prost(string, tag = "2")]
    pub provider: String,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(bool, tag = "4")]
    pub rejected: bool,
    #[prost(string, tag = "5")]
    pub reject_reason: String,
    #[prost(bool, tag = "6")]
    pub degraded: bool,
    #[prost(message, repeated, tag = "7")]
    pub extensions: Vec<ExtensionResult>,
    #[prost(map = "string, string", tag = "8")]
    pub metadata: HashMap<String, String>,
}

/// The `Decide` implementation.
pub struct DecideService {
    pub decider: Arc<Decider>,
}

/// Turns the request into the run a `runs.submitted` message would carry;
/// the error names the field at fault.
fn parse_request(request: DecideRequest) -> Result<RunSubmitted, tonic::Status> {
    let invalid = |field: &str, message: String| {
        tonic::Status::invalid_argument(format!("{field}: {message}"))
    };
    let tenant_id = TenantId::parse(request.tenant_id).map_err(|e| invalid("tenant_id", e))?;
    let flow_id = FlowId::parse(request.flow_id).map_err(|e| invalid("flow_id", e))?;
    let run_id = if request.run_id.is_empty() {
        RunId::generate(format!("dry-run-{}", uuid::Uuid::now_v7()))
    } else {
        RunId::parse(request.run_id).map_err(|e| invalid("run_id", e))?
    };
    let provider = request
        .provider
        .filter(|p| !p.is_empty())
        .map(ProviderId::parse)
        .transpose()
        .map_err(|e| invalid("provider", e))?;
    let raw: Vec<RawStep> = serde_json::from_str(&request.steps_json)
        .map_err(|e| invalid("steps_json", e.to_string()))?;
    let steps = wire::step::parse_steps(raw, MAX_STEPS)
        .map_err(|e| invalid(&format!("steps_json: {}", e.field), e.message))?;
    Ok(RunSubmitted {
        run_id,
        tenant_id,
        flow_id,
        steps,
        provider,
        submitted_at: time::OffsetDateTime::now_utc(),
    })
}

#[tonic::async_trait]
impl Router for DecideService {
    async fn decide(
        &self,
        request: tonic::Request<DecideRequest>,
    ) -> Result<tonic::Response<DecideResponse>, tonic::Status> {
        // The SERVER span (`traced`) is current; its status is set from the
        // answer the client gets.
        let run = parse_request(request.into_inner())?;
        let span = tracing::Span::current();
        span.record("tenant.id", run.tenant_id.as_str());
        span.record("run.id", run.run_id.as_str());
        span.record("flow.id", run.flow_id.as_str());
        Ok(tonic::Response::new(response(
            self.decider.dry_run(run).await,
        )))
    }
}

fn response(outcome: crate::decide::Outcome) -> DecideResponse {
    let extensions = outcome
        .extensions
        .iter()
        .map(|o| ExtensionResult {
            extension_id: o.id.clone(),
            extension_type: o.kind.map_or("unknown", |k| k.as_str()).to_owned(),
            status: o.status.as_str().to_owned(),
            retries_used: o.retries_used,
            verdict: o
                .response
                .as_ref()
                .map(|r| match r.verdict {
                    wire::extensions::Verdict::Allow => "allow",
                    wire::extensions::Verdict::Reject => "reject",
                })
                .unwrap_or_default()
                .to_owned(),
            reason: o
                .response
                .as_ref()
                .and_then(|r| r.reason.clone())
                .unwrap_or_default(),
        })
        .collect();
    match outcome.verdict {
        Verdict::Route {
            decision, metadata, ..
        } => DecideResponse {
            policy_id: decision.policy_id,
            provider: decision.provider.into(),
            reason: decision.reason.as_str().to_owned(),
            rejected: false,
            reject_reason: String::new(),
            degraded: decision.degraded,
            extensions,
            metadata: metadata.into_iter().collect(),
        },
        Verdict::Reject { policy_id, reason } => DecideResponse {
            policy_id,
            provider: String::new(),
            reason: wire::work::DecisionReason::Rejected.as_str().to_owned(),
            rejected: true,
            reject_reason: reason,
            degraded: false,
            extensions,
            metadata: HashMap::new(),
        },
    }
}

/// How the `Decide` port is guarded.
#[derive(Debug, Clone)]
pub struct GrpcSettings {
    pub auth: GrpcAuth,
    /// Larger requests are refused (RESOURCE_EXHAUSTED) before they are decoded.
    pub max_request_bytes: usize,
}

/// Serves `Decide` and `grpc.health.v1` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    decider: Arc<Decider>,
    settings: GrpcSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<RouterServer<DecideService>>().await;
    let stop = shutdown.clone();
    let stopping = async move {
        stop.cancelled().await;
        reporter
            .set_not_serving::<RouterServer<DecideService>>()
            .await;
    };
    let auth = Arc::new(settings.auth);
    // The interceptor runs on the metadata, before the body is decoded.
    let authenticate = move |request: tonic::Request<()>| {
        auth.check(request.metadata())?;
        Ok(request)
    };
    let decide = RouterServer::new(DecideService { decider })
        .max_decoding_message_size(settings.max_request_bytes);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(traced::Traced::new(InterceptedService::new(
            decide,
            authenticate,
        )))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stopping,
        )
        .await
        .map_err(|e| anyhow::anyhow!("serving gRPC: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(steps: &str) -> DecideRequest {
        DecideRequest {
            tenant_id: "demo".to_owned(),
            flow_id: "hello".to_owned(),
            steps_json: steps.to_owned(),
            provider: None,
            run_id: String::new(),
        }
    }

    #[test]
    fn a_request_becomes_a_run() {
        let run = parse_request(request(r#"[{"id":"a","type":"noop"}]"#)).expect("valid");
        assert_eq!(run.steps.len(), 1);
        assert!(run.run_id.as_str().starts_with("dry-run-"));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let err = parse_request(request("nope")).expect_err("bad json");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("steps_json"), "{}", err.message());
        let err = parse_request(request(r#"[{"id":"a","type":"rocket"}]"#)).expect_err("bad type");
        assert!(
            err.message().contains("steps_json: steps[0].type"),
            "{}",
            err.message()
        );
        let mut bad_tenant = request("[]");
        bad_tenant.tenant_id = "a b".to_owned();
        let err = parse_request(bad_tenant).expect_err("bad tenant");
        assert!(err.message().starts_with("tenant_id"), "{}", err.message());
    }
}
