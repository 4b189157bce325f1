//! gRPC `Decide` and `grpc.health.v1` over a real socket, with the trace
//! context taken from the request metadata.

use router::grpc::{DecideRequest, RouterClient};
use testkit::stack::{Component, Stack};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{file_setting, named, trace_where};

const POLICY: &str = r#"
default:
  providers: [{name: default, weight: 1}]
tenants:
  acme:
    id: acme-v1
    providers: [{name: blue, weight: 1}]
    allow_hint: [gpu]
    reject: {step_types: [sql]}
"#;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn request(tenant: &str, steps: &str, provider: Option<&str>) -> DecideRequest {
    DecideRequest {
        tenant_id: tenant.to_owned(),
        flow_id: "hello".to_owned(),
        steps_json: steps.to_owned(),
        provider: provider.map(str::to_owned),
        run_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_and_health_over_a_real_socket() {
    let mut stack = Stack::new().await;
    file_setting(&mut stack, "ROUTER_POLICY_FILE", "policy.yaml", POLICY);
    stack.start(Component::Router).await;
    let endpoint = format!("http://127.0.0.1:{}", stack.ports.router_grpc);

    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "beamline.router.v1.Router"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let mut client = RouterClient::connect(endpoint).await.expect("connect");
    let noop = r#"[{"id":"a","type":"noop"}]"#;

    // Weighted, with the caller's trace continued.
    let mut call = tonic::Request::new(request("acme", noop, None));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .expect("metadata"),
    );
    let answer = client.decide(call).await.expect("decide").into_inner();
    assert_eq!(answer.provider, "blue");
    assert_eq!(answer.reason, "weighted");
    assert_eq!(answer.policy_id, "acme-v1");
    assert!(!answer.rejected);
    // No worker consumes `work.blue` in this test.
    assert!(answer.degraded);

    // An allowed hint is explicit; a rule rejects with its reason.
    let answer = client
        .decide(request("acme", noop, Some("gpu")))
        .await
        .expect("decide")
        .into_inner();
    assert_eq!(
        (answer.provider.as_str(), answer.reason.as_str()),
        ("gpu", "explicit")
    );
    let answer = client
        .decide(request(
            "acme",
            r#"[{"id":"q","type":"sql","input":{"query":"SELECT 1"}}]"#,
            None,
        ))
        .await
        .expect("decide")
        .into_inner();
    assert!(answer.rejected);
    assert_eq!(answer.reason, "rejected");
    assert_eq!(
        answer.reject_reason,
        "step q uses type `sql`, which tenant acme may not use"
    );
    assert_eq!(answer.provider, "");

    // Another tenant gets the default policy.
    let answer = client
        .decide(request("zeta", noop, None))
        .await
        .expect("decide")
        .into_inner();
    assert_eq!(
        (answer.policy_id.as_str(), answer.provider.as_str()),
        ("default", "default")
    );

    // Bad input is INVALID_ARGUMENT naming the field.
    let status = client
        .decide(request("acme", r#"[{"id":"a","type":"rocket"}]"#, None))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("steps_json: steps[0].type"),
        "{}",
        status.message()
    );

    // The RPC span continues the client's trace; the decision hangs under it.
    let spans = trace_where(&stack, CLIENT_TRACE, |spans| {
        !named(spans, "router.provider.select").is_empty()
    })
    .await;
    let server = named(&spans, "beamline.router.v1.Router/Decide")[0];
    assert_eq!(server.kind, "server");
    assert_eq!(server.parent_span_id.as_deref(), Some(CLIENT_SPAN));
    assert_eq!(server.attr("rpc.system"), Some("grpc"));
    assert_eq!(
        server.attr("rpc.service"),
        Some("beamline.router.v1.Router")
    );
    assert_eq!(server.attr("rpc.method"), Some("Decide"));
    assert_eq!(server.attr("rpc.grpc.status_code"), Some("0"));
    assert_eq!(server.attr("tenant.id"), Some("acme"));
    let decide = named(&spans, "router.decide")[0];
    assert_eq!(
        decide.parent_span_id.as_deref(),
        Some(server.span_id.as_str())
    );
    assert_eq!(decide.attr("decision.reason"), Some("weighted"));
    assert_eq!(decide.attr("provider"), Some("blue"));
    assert!(
        named(&spans, "send work.blue").is_empty(),
        "a dry run dispatches nothing"
    );
}
