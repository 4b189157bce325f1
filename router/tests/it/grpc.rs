//! gRPC `Decide` and `grpc.health.v1` over a real socket, with the trace
//! context taken from the request metadata; the port's authentication, its
//! request size limit, and a dry run that changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use router::grpc::{DecideRequest, RouterClient};
use testkit::service::ServiceProcess;
use testkit::stack::{Component, Stack, sample_run};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{authed, file_setting, named, sample, trace_where, wait_terminal_as};

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
    let mut call = authed(request("acme", noop, None));
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
        .decide(authed(request("acme", noop, Some("gpu"))))
        .await
        .expect("decide")
        .into_inner();
    assert_eq!(
        (answer.provider.as_str(), answer.reason.as_str()),
        ("gpu", "explicit")
    );
    let answer = client
        .decide(authed(request(
            "acme",
            r#"[{"id":"q","type":"sql","input":{"query":"SELECT 1"}}]"#,
            None,
        )))
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
        .decide(authed(request("zeta", noop, None)))
        .await
        .expect("decide")
        .into_inner();
    assert_eq!(
        (answer.policy_id.as_str(), answer.provider.as_str()),
        ("default", "default")
    );

    // Bad input is INVALID_ARGUMENT naming the field.
    let status = client
        .decide(authed(request(
            "acme",
            r#"[{"id":"a","type":"rocket"}]"#,
            None,
        )))
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
    // The RPC conventions of the pinned semconv (1.42): `rpc.system.name`, a
    // fully-qualified `rpc.method`, the status as its name; none of the
    // deprecated `rpc.system`/`rpc.service`/`rpc.grpc.status_code`.
    assert_eq!(server.attr("rpc.system.name"), Some("grpc"));
    assert_eq!(
        server.attr("rpc.method"),
        Some("beamline.router.v1.Router/Decide")
    );
    assert_eq!(server.attr("rpc.response.status_code"), Some("OK"));
    for deprecated in ["rpc.system", "rpc.service", "rpc.grpc.status_code"] {
        assert_eq!(server.attr(deprecated), None, "{deprecated}");
    }
    assert_eq!(server.attr("server.address"), Some("127.0.0.1"));
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

fn decide_endpoint(stack: &Stack) -> String {
    format!("http://127.0.0.1:{}", stack.ports.router_grpc)
}

/// `request` carrying `authorization: <value>` (none when `None`) and a
/// `traceparent` of trace `trace_id`.
fn call_with(
    request: DecideRequest,
    authorization: Option<&str>,
    trace_id: &str,
) -> tonic::Request<DecideRequest> {
    let mut call = tonic::Request::new(request);
    if let Some(value) = authorization {
        call.metadata_mut()
            .insert("authorization", value.parse().expect("metadata"));
    }
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{CLIENT_SPAN}-01")
            .parse()
            .expect("metadata"),
    );
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_without_the_token_is_unauthenticated() {
    let mut stack = Stack::new().await;
    stack.start(Component::Router).await;
    let endpoint = decide_endpoint(&stack);
    let mut client = RouterClient::connect(endpoint.clone())
        .await
        .expect("connect");
    let noop = r#"[{"id":"a","type":"noop"}]"#;
    let bearer = format!("Bearer {}", testkit::stack::ROUTER_GRPC_TOKEN);
    let wrong_same_length = format!(
        "Bearer {}",
        "x".repeat(testkit::stack::ROUTER_GRPC_TOKEN.len())
    );
    for (authorization, trace) in [
        (None, "10000000000000000000000000000001"),
        (Some("Bearer nope"), "10000000000000000000000000000002"),
        (
            Some(wrong_same_length.as_str()),
            "10000000000000000000000000000003",
        ),
        (
            Some(testkit::stack::ROUTER_GRPC_TOKEN),
            "10000000000000000000000000000004",
        ),
    ] {
        let status = client
            .decide(call_with(request("demo", noop, None), authorization, trace))
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{authorization:?}: {status:?}"
        );
        assert!(
            !status.message().contains(testkit::stack::ROUTER_GRPC_TOKEN),
            "{status:?}"
        );
    }
    let answer = client
        .decide(call_with(
            request("demo", noop, None),
            Some(&bearer),
            "10000000000000000000000000000005",
        ))
        .await
        .expect("the right token is accepted")
        .into_inner();
    assert_eq!(answer.provider, "default");

    // Health stays open: probes cannot send a token, and it tells nothing.
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "beamline.router.v1.Router".to_owned(),
        })
        .await
        .expect("health without a token")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    // A refused call is traced with its real status, which is the caller's
    // mistake: not a server error.
    let spans = trace_where(&stack, "10000000000000000000000000000001", |spans| {
        !spans.is_empty()
    })
    .await;
    let server = named(&spans, "beamline.router.v1.Router/Decide")[0];
    assert_eq!(
        server.attr("rpc.response.status_code"),
        Some("UNAUTHENTICATED")
    );
    assert_eq!(server.status_code, 0, "unset: {server:?}");
    assert_eq!(server.attr("error.type"), None);
    assert!(named(&spans, "router.decide").is_empty(), "not decided");
    let leaked: Vec<_> = stack
        .otlp
        .spans()
        .into_iter()
        .filter(|s| s.text().contains(testkit::stack::ROUTER_GRPC_TOKEN))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_does_not_start_with_an_open_grpc_port_unless_told() {
    let mut stack = Stack::new().await;
    let mut env: HashMap<String, String> = stack.env(Component::Router);
    env.remove("ROUTER_GRPC_TOKEN");
    let mut router = ServiceProcess::spawn("router", &env);
    let status = router
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits without a token");
    assert_eq!(status.code(), Some(2));
    let stderr = testkit::eventually(Duration::from_secs(5), "the error line", || {
        let lines = router.stderr();
        async move { (!lines.is_empty()).then(|| lines.join("\n")) }
    })
    .await;
    assert!(stderr.contains("ROUTER_GRPC_TOKEN"), "{stderr}");

    for (var, value) in [
        ("ROUTER_GRPC_TOKEN", "   "),
        ("ROUTER_GRPC_TOKEN", "short"),
        ("ROUTER_GRPC_ALLOW_UNAUTHENTICATED", "maybe"),
    ] {
        let mut env = env.clone();
        env.insert(var.to_owned(), value.to_owned());
        let mut router = ServiceProcess::spawn("router", &env);
        let status = router
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exits");
        assert_eq!(status.code(), Some(2), "{var}={value:?}");
    }

    // The explicit development opt-out opens the port, and says so.
    env.insert(
        "ROUTER_GRPC_ALLOW_UNAUTHENTICATED".to_owned(),
        "true".to_owned(),
    );
    let mut router = ServiceProcess::spawn("router", &env);
    router.wait_ready(stack.ports.router_admin).await;
    let mut client = RouterClient::connect(decide_endpoint(&stack))
        .await
        .expect("connect");
    client
        .decide(request("demo", r#"[{"id":"a","type":"noop"}]"#, None))
        .await
        .expect("open port");
    let logs = router.stdout().join("\n");
    assert!(
        logs.contains("\"level\":\"WARN\"")
            && logs.contains("gRPC port is open: Decide accepts calls without a token"),
        "{logs}"
    );
    stack.router = Some(router);
}

/// A run step whose `fail` message makes the JSON about `bytes` long.
fn steps_of_size(bytes: usize) -> String {
    format!(
        r#"[{{"id":"a","type":"fail","input":{{"message":"{}","probability":0.0}}}}]"#,
        "x".repeat(bytes)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_decides_for_an_invented_tenant_open_no_breaker() {
    // The compose stack's registry and policy: `pii-guard` fails closed and
    // opens after 5 failures.
    let mut stack = Stack::new().await;
    file_setting(
        &mut stack,
        "ROUTER_EXTENSIONS_FILE",
        "extensions.yaml",
        include_str!("../../../observability/stack/extensions.yaml"),
    );
    file_setting(
        &mut stack,
        "ROUTER_POLICY_FILE",
        "policy.yaml",
        include_str!("../../../observability/stack/policy.yaml"),
    );
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let mut client = RouterClient::connect(decide_endpoint(&stack))
        .await
        .expect("connect");

    // The review's attack: three calls, 1.2 MiB of steps each.
    let big = steps_of_size(1_200 * 1024);
    let mut codes = Vec::new();
    for i in 0..3 {
        let result = client
            .decide(call_with(
                request(&format!("invented-{i}"), &big, None),
                Some(&format!("Bearer {}", testkit::stack::ROUTER_GRPC_TOKEN)),
                &format!("2000000000000000000000000000000{i}"),
            ))
            .await;
        codes.push(
            result
                .map(|r| r.into_inner().rejected)
                .map_err(|s| s.code()),
        );
    }
    let after_attack = stack.scrape(Component::Router).await;

    // Real runs still pass the guard.
    let accepted = stack.submit_ok(&sample_run()).await;
    let run = wait_terminal_as(
        &stack,
        testkit::stack::DEMO_KEY,
        accepted["run_id"].as_str().expect("run id"),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    for code in &codes {
        assert!(
            matches!(
                code,
                Err(tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument)
            ),
            "{codes:?}"
        );
    }
    // Nothing counted, no tenant label taken, no breaker moved.
    assert_eq!(
        sample(&after_attack, "router_decisions_total", &[]),
        None,
        "{after_attack}"
    );
    assert!(!after_attack.contains("invented-"), "{after_attack}");
    assert_eq!(
        sample(
            &after_attack,
            "router_extension_circuit_breaker_failure_total",
            &[("extension_id", "pii-guard")]
        ),
        None
    );
    assert_ne!(
        sample(
            &after_attack,
            "router_extension_circuit_breaker_state",
            &[("extension_id", "pii-guard"), ("state", "open")]
        ),
        Some(1.0)
    );

    // The refusal is on the server span, as the caller's mistake.
    let spans = trace_where(&stack, "20000000000000000000000000000000", |spans| {
        !spans.is_empty()
    })
    .await;
    let server = named(&spans, "beamline.router.v1.Router/Decide")[0];
    assert_eq!(
        server.attr("rpc.response.status_code"),
        Some("RESOURCE_EXHAUSTED")
    );
    assert_eq!(server.status_code, 0, "unset: {server:?}");
}

const FAILING_GUARD: &str = r#"
extensions:
  - id: pii-guard
    type: validator
    timeout_ms: 2000
    failure_policy: fail_closed
    breaker: {failures: 1, window_secs: 600, cooldown_secs: 600}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_move_no_breaker_count_nothing_and_take_no_tenant_label() {
    let mut stack = Stack::new().await;
    file_setting(
        &mut stack,
        "ROUTER_EXTENSIONS_FILE",
        "extensions.yaml",
        FAILING_GUARD,
    );
    file_setting(
        &mut stack,
        "ROUTER_POLICY_FILE",
        "policy.yaml",
        "default:\n  providers: [{name: default, weight: 1}]\n  extensions: [pii-guard]\n",
    );
    // Every guard call fails; the first counted failure opens the breaker.
    stack
        .extra_env
        .insert("WORKER_EXT_VALIDATOR_ERROR_RATE".to_owned(), "1".to_owned());
    // Two first-seen tenants keep their label, later ones become `other`.
    stack
        .extra_env
        .insert("TELEMETRY_TENANT_LABEL_LIMIT".to_owned(), "2".to_owned());
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let mut client = RouterClient::connect(decide_endpoint(&stack))
        .await
        .expect("connect");
    let noop = r#"[{"id":"a","type":"noop"}]"#;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let answer = client
            .decide(authed(request(&format!("invented-{i}"), noop, None)))
            .await
            .expect("decide")
            .into_inner();
        assert!(answer.rejected, "{answer:?}");
        statuses.push(answer.extensions[0].status.clone());
    }
    let after_dry_runs = stack.scrape(Component::Router).await;

    // A real run finds the breaker closed: its own failure is what counts.
    let accepted = stack.submit_ok(&sample_run()).await;
    let run = wait_terminal_as(
        &stack,
        testkit::stack::DEMO_KEY,
        accepted["run_id"].as_str().expect("run id"),
    )
    .await;
    assert_eq!(
        run["error"],
        "extension pii-guard could not be consulted (error) and its failure policy is fail_closed",
        "{run}"
    );
    // Each dry run asked the guard (not refused by an open breaker).
    assert_eq!(statuses, ["error", "error", "error"]);
    let router = stack.scrape(Component::Router).await;
    assert_eq!(
        sample(
            &router,
            "router_decisions_total",
            &[("tenant_id", "demo"), ("reason", "rejected")]
        ),
        Some(1.0),
        "{router}"
    );
    assert!(!router.contains("tenant_id=\"other\""), "{router}");

    for metric in [
        "router_decisions_total",
        "router_decision_duration_seconds",
        "router_extension_invocations_total",
        "router_extension_circuit_breaker_failure_total",
        "router_extension_circuit_breaker_transitions_total",
        "router_extension_registry_lookups_total",
    ] {
        assert_eq!(
            sample(&after_dry_runs, metric, &[]),
            None,
            "{metric} moved by a dry run: {after_dry_runs}"
        );
    }
    assert!(!after_dry_runs.contains("invented-"), "{after_dry_runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decide_span_carries_the_real_status() {
    let mut stack = Stack::new().await;
    stack.start(Component::Router).await;
    let channel = tonic::transport::Endpoint::from_shared(decide_endpoint(&stack))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let bearer = format!("Bearer {}", testkit::stack::ROUTER_GRPC_TOKEN);

    // The caller's mistake: INVALID_ARGUMENT, span status left unset.
    let invalid = "30000000000000000000000000000001";
    let status = RouterClient::new(channel.clone())
        .decide(call_with(
            request("demo", "nope", None),
            Some(&bearer),
            invalid,
        ))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A method the server does not have: UNIMPLEMENTED, a server-side code.
    let unknown = "30000000000000000000000000000002";
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary::<_, router::grpc::DecideResponse, _>(
            call_with(
                request("demo", r#"[{"id":"a","type":"noop"}]"#, None),
                Some(&bearer),
                unknown,
            ),
            http::uri::PathAndQuery::from_static("/beamline.router.v1.Router/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("unknown method");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let spans = trace_where(&stack, invalid, |spans| !spans.is_empty()).await;
    let server = named(&spans, "beamline.router.v1.Router/Decide")[0];
    assert_eq!(
        server.attr("rpc.response.status_code"),
        Some("INVALID_ARGUMENT")
    );
    assert_eq!(server.status_code, 0, "unset: {server:?}");
    assert_eq!(server.attr("error.type"), None);

    let spans = trace_where(&stack, unknown, |spans| !spans.is_empty()).await;
    let server = named(&spans, "_OTHER")[0];
    assert_eq!(server.kind, "server");
    assert_eq!(server.attr("rpc.method"), Some("_OTHER"));
    assert_eq!(
        server.attr("rpc.method_original"),
        Some("beamline.router.v1.Router/Nope")
    );
    assert_eq!(
        server.attr("rpc.response.status_code"),
        Some("UNIMPLEMENTED")
    );
    assert_eq!(server.status_code, 2, "ERROR: {server:?}");
    assert_eq!(server.attr("error.type"), Some("UNIMPLEMENTED"));
}
