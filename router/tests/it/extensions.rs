//! Extensions end to end: the worker's sample services, a timing-out
//! extension retried until its breaker opens, and the failure policies —
//! checked in the run, the metrics and the spans.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::stack::{ACME_KEY, Component, DEMO_KEY, Stack, sample_run};

use crate::support::{
    by_id, file_setting, named, sample, trace_where, wait_metric, wait_terminal_as,
};

const SAMPLE_REGISTRY: &str = r#"
extensions:
  - id: enrich
    type: pre
    timeout_ms: 2000
    failure_policy: fail_open
  - id: pii-guard
    type: validator
    timeout_ms: 2000
    failure_policy: fail_closed
"#;

const SAMPLE_POLICY: &str = r#"
default:
  providers: [{name: default, weight: 1}]
  extensions: [enrich, pii-guard]
"#;

async fn stack_with(registry: &str, policy: &str, worker_env: &[(&str, &str)]) -> Stack {
    let mut stack = Stack::new().await;
    file_setting(
        &mut stack,
        "ROUTER_EXTENSIONS_FILE",
        "extensions.yaml",
        registry,
    );
    file_setting(&mut stack, "ROUTER_POLICY_FILE", "policy.yaml", policy);
    for (k, v) in worker_env {
        stack.extra_env.insert((*k).to_owned(), (*v).to_owned());
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    stack
}

async fn submit_as(stack: &Stack, key: &str, body: &Value) -> Value {
    let response = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("POST run");
    assert_eq!(response.status(), 202);
    response.json().await.expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_extensions_enrich_and_reject_with_the_trace_continued() {
    let stack = stack_with(SAMPLE_REGISTRY, SAMPLE_POLICY, &[]).await;

    // A clean run passes both extensions and runs.
    let accepted = stack.submit_ok(&sample_run()).await;
    let run_id = accepted["run_id"].as_str().expect("run id");
    let run = wait_terminal_as(&stack, DEMO_KEY, run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // The trace goes router → extension service → back, for each extension.
    let trace_id = accepted["trace_id"].as_str().expect("trace id");
    let spans = trace_where(&stack, trace_id, |spans| {
        named(spans, "process ext.enrich").len() == 1
            && named(spans, "process ext.pii-guard").len() == 1
            && named(spans, "router.provider.select").len() == 1
    })
    .await;
    let decide = named(&spans, "router.decide")[0];
    for (id, kind) in [("enrich", "pre"), ("pii-guard", "validator")] {
        let invoke = spans
            .iter()
            .find(|s| s.name == "router.extension.invoke" && s.attr("extension.id") == Some(id))
            .unwrap_or_else(|| panic!("no invoke span for {id}"));
        assert_eq!(invoke.kind, "client");
        assert_eq!(invoke.service, "router");
        assert_eq!(
            invoke.parent_span_id.as_deref(),
            Some(decide.span_id.as_str())
        );
        assert_eq!(invoke.attr("extension.type"), Some(kind));
        assert_eq!(invoke.attr("extension.status"), Some("success"));
        assert_eq!(invoke.attr("extension.retries_used"), Some("0"));
        assert_eq!(
            invoke.attr("extension.subject"),
            Some(format!("ext.{id}").as_str())
        );
        assert_eq!(invoke.attr("tenant.id"), Some("demo"));
        assert_eq!(invoke.attr("run.id"), Some(run_id));
        assert_eq!(invoke.attr("policy.id"), Some("default"));
        let lookup = spans
            .iter()
            .find(|s| {
                s.name == "router.extension.registry.lookup"
                    && s.parent_span_id.as_deref() == Some(invoke.span_id.as_str())
            })
            .expect("lookup span under the invoke span");
        assert_eq!(lookup.attr("lookup.status"), Some("success"));
        let server = named(&spans, &format!("process ext.{id}"))[0];
        assert_eq!(server.service, "worker");
        assert_eq!(server.kind, "server");
        assert_eq!(
            server.parent_span_id.as_deref(),
            Some(invoke.span_id.as_str())
        );
        assert_eq!(server.attr("run.id"), Some(run_id));
        // And back: the reply's context is linked from the invoke span.
        assert!(
            invoke
                .links
                .contains(&(server.trace_id.clone(), server.span_id.clone())),
            "{:?}",
            invoke.links
        );
    }
    let select = named(&spans, "router.provider.select")[0];
    assert_eq!(
        select.parent_span_id.as_deref(),
        Some(decide.span_id.as_str())
    );
    let invokes = named(&spans, "router.extension.invoke");
    let apply = named(&spans, "router.policy.apply")[0];
    assert_eq!(
        apply.parent_span_id.as_deref(),
        Some(decide.span_id.as_str())
    );
    assert!(invokes.len() == 2);

    // A run carrying an email is rejected by the validator, without quoting it.
    let accepted = stack
        .submit_ok(&json!({
            "flow_id": "mailer",
            "steps": [
                {"id": "greet", "type": "noop"},
                {"id": "send", "type": "fail", "input": {"message": "write to alice@example.com", "probability": 0.0}}
            ]
        }))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run id");
    let run = wait_terminal_as(&stack, DEMO_KEY, run_id).await;
    assert_eq!(run["status"], "rejected", "{run}");
    let error = run["error"].as_str().expect("error");
    assert_eq!(
        error,
        "rejected by extension pii-guard: step send input contains an email address"
    );
    assert!(!run.to_string().contains("alice@"), "{run}");

    let router = stack.scrape(Component::Router).await;
    let invocations = |id: &str, kind: &str| {
        sample(
            &router,
            "router_extension_invocations_total",
            &[
                ("extension_id", id),
                ("extension_type", kind),
                ("status", "success"),
            ],
        )
    };
    assert_eq!(invocations("enrich", "pre"), Some(2.0));
    assert_eq!(invocations("pii-guard", "validator"), Some(2.0));
    assert_eq!(
        sample(
            &router,
            "router_decisions_total",
            &[
                ("reason", "rejected"),
                ("provider", "none"),
                ("tenant_id", "demo")
            ]
        ),
        Some(1.0)
    );
    assert!(router.contains(
        "router_extension_invocation_duration_seconds_bucket{extension_id=\"pii-guard\",extension_type=\"validator\",status=\"success\",le=\"0.005\"}"
    ));
    let worker = stack.scrape(Component::Worker).await;
    assert_eq!(
        sample(
            &worker,
            "worker_extension_requests_total",
            &[("extension_id", "pii-guard"), ("result", "reject")]
        ),
        Some(1.0)
    );
}

const SLOW_REGISTRY: &str = r#"
extensions:
  - id: guard-closed
    type: validator
    subject: ext.pii-guard
    timeout_ms: 150
    retries: 1
    backoff_ms: 20
    failure_policy: fail_closed
    breaker: {failures: 2, window_secs: 60, cooldown_secs: 600}
  - id: guard-open
    type: validator
    subject: ext.pii-guard
    timeout_ms: 150
    retries: 1
    backoff_ms: 20
    failure_policy: fail_open
    breaker: {failures: 2, window_secs: 60, cooldown_secs: 600}
"#;

const SLOW_POLICY: &str = r#"
default:
  providers: [{name: default, weight: 1}]
  extensions: [guard-open]
tenants:
  demo:
    providers: [{name: default, weight: 1}]
    extensions: [guard-closed]
  acme:
    providers: [{name: default, weight: 1}]
    extensions: [guard-open]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timing_out_extension_is_retried_then_its_breaker_opens() {
    let stack = stack_with(
        SLOW_REGISTRY,
        SLOW_POLICY,
        &[("WORKER_EXT_VALIDATOR_LATENCY_MS", "1000")],
    )
    .await;

    // fail_closed: two timeouts (one retry), the breaker opens, the run is rejected.
    let first = stack.submit_ok(&sample_run()).await;
    let first_id = first["run_id"].as_str().expect("run id");
    let run = wait_terminal_as(&stack, DEMO_KEY, first_id).await;
    assert_eq!(run["status"], "rejected", "{run}");
    assert_eq!(
        run["error"],
        "extension guard-closed could not be consulted (max_retries_exceeded) and its failure policy is fail_closed"
    );

    // The breaker is open: the next run is refused without a call.
    let second = stack.submit_ok(&sample_run()).await;
    let run = wait_terminal_as(&stack, DEMO_KEY, second["run_id"].as_str().expect("id")).await;
    assert_eq!(run["status"], "rejected");
    assert_eq!(
        run["error"],
        "extension guard-closed could not be consulted (circuit_open) and its failure policy is fail_closed"
    );

    // fail_open: the same failures let the run through.
    let third = submit_as(&stack, ACME_KEY, &sample_run()).await;
    let run = wait_terminal_as(&stack, ACME_KEY, third["run_id"].as_str().expect("id")).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // Metrics.
    let labels = |extra: &[(&'static str, &'static str)]| {
        let mut all = vec![("extension_id", "guard-closed")];
        all.extend_from_slice(extra);
        all
    };
    let m = "router_extension_circuit_breaker_state";
    wait_metric(
        &stack,
        Component::Router,
        m,
        &labels(&[("state", "open")]),
        1.0,
    )
    .await;
    let router = stack.scrape(Component::Router).await;
    assert_eq!(
        sample(&router, m, &labels(&[("state", "closed")])),
        Some(0.0)
    );
    assert_eq!(
        sample(&router, m, &labels(&[("state", "half_open")])),
        Some(0.0)
    );
    let count =
        |name: &str, extra: &[(&'static str, &'static str)]| sample(&router, name, &labels(extra));
    assert_eq!(
        count(
            "router_extension_retries_total",
            &[("extension_type", "validator"), ("retry_reason", "timeout")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count(
            "router_extension_circuit_breaker_transitions_total",
            &[("transition", "open")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count("router_extension_circuit_breaker_failure_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        count(
            "router_extension_invocations_total",
            &[("status", "max_retries_exceeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        count(
            "router_extension_invocations_total",
            &[("status", "circuit_open")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &router,
            "router_extension_invocations_total",
            &[
                ("extension_id", "guard-open"),
                ("status", "max_retries_exceeded")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &router,
            "router_decisions_total",
            &[("reason", "rejected"), ("tenant_id", "demo")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &router,
            "router_decisions_total",
            &[("reason", "weighted"), ("tenant_id", "acme")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &router,
            "router_extension_registry_lookups_total",
            &[("lookup_status", "success")]
        )
        .is_some_and(|v| v >= 3.0)
    );

    // Spans: the invoke span of the first run shows the retry, the breaker
    // opening and both attempts reaching the (slow) service.
    let trace_id = first["trace_id"].as_str().expect("trace id");
    let spans = trace_where(&stack, trace_id, |spans| {
        named(spans, "process ext.pii-guard").len() == 2
            && !named(spans, "router.extension.invoke").is_empty()
    })
    .await;
    let invoke = named(&spans, "router.extension.invoke")[0];
    assert_eq!(invoke.attr("extension.id"), Some("guard-closed"));
    assert_eq!(
        invoke.attr("extension.status"),
        Some("max_retries_exceeded")
    );
    assert_eq!(invoke.attr("extension.retries_used"), Some("1"));
    assert_eq!(invoke.attr("extension.failure_policy"), Some("fail_closed"));
    assert_eq!(invoke.status_code, 2, "ERROR");
    assert_eq!(
        invoke
            .events
            .iter()
            .filter(|e| *e == "extension.attempt_failed")
            .count(),
        2,
        "{:?}",
        invoke.events
    );
    assert!(
        invoke
            .events
            .iter()
            .any(|e| e == "circuit_breaker.transition"),
        "{:?}",
        invoke.events
    );
    for server in named(&spans, "process ext.pii-guard") {
        assert_eq!(
            server.parent_span_id.as_deref(),
            Some(invoke.span_id.as_str())
        );
    }
    let decide = by_id(&spans, invoke.parent_span_id.as_deref()).expect("parent");
    assert_eq!(decide.name, "router.decide");
    assert_eq!(decide.attr("decision.reason"), Some("rejected"));
}

/// A run whose `http` body nests `depth` arrays.
fn nested_run(depth: usize) -> Value {
    let body: Value = serde_json::from_str(&format!("{}1{}", "[".repeat(depth), "]".repeat(depth)))
        .expect("nested JSON");
    json!({
        "flow_id": "nested",
        "steps": [{"id": "a", "type": "http", "input": {"url": "http://localhost/x", "body": body}}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_an_extension_refuses_as_malformed_open_no_breaker() {
    // The compose stack's registry and policy: `pii-guard` fails closed,
    // retries once and opens after 5 failures.
    let stack = stack_with(
        include_str!("../../../observability/stack/extensions.yaml"),
        include_str!("../../../observability/stack/policy.yaml"),
        &[],
    )
    .await;
    // Nested just deep enough to pass the gateway and the router but not the
    // extension service's decoder (its request wraps the run one level
    // deeper): the service answers 400, the request's fault.
    let mut nested = Vec::new();
    for _ in 0..4 {
        let accepted = stack.submit_ok(&nested_run(122)).await;
        let id = accepted["run_id"].as_str().expect("run id").to_owned();
        nested.push(wait_terminal_as(&stack, DEMO_KEY, &id).await);
    }
    // Real runs still pass the guard.
    let clean = stack.submit_ok(&sample_run()).await;
    let run = wait_terminal_as(&stack, DEMO_KEY, clean["run_id"].as_str().expect("id")).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    for run in &nested {
        assert_eq!(run["status"], "rejected", "{run}");
        assert_eq!(
            run["error"],
            "extension pii-guard could not be consulted (bad_request) and its failure policy is fail_closed",
            "{run}"
        );
    }
    let router = stack.scrape(Component::Router).await;
    let pii = |extra: &[(&'static str, &'static str)]| {
        let mut labels = vec![("extension_id", "pii-guard")];
        labels.extend_from_slice(extra);
        labels
    };
    assert_eq!(
        sample(
            &router,
            "router_extension_invocations_total",
            &pii(&[("status", "bad_request")])
        ),
        Some(4.0),
        "{router}"
    );
    assert_eq!(
        sample(
            &router,
            "router_extension_circuit_breaker_failure_total",
            &pii(&[])
        ),
        None,
        "{router}"
    );
    assert_eq!(
        sample(&router, "router_extension_retries_total", &pii(&[])),
        None,
        "not retried: {router}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_too_large_for_nats_is_not_sent_and_opens_no_breaker() {
    use router::breaker::State;
    use router::extensions::invoker::{Invocation, Invoker, Status};
    use router::extensions::registry::{self, Registry};

    let nats = testkit::nats::NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    // A responder that would allow anything: the request must never reach it.
    let mut requests = client.subscribe("ext.guard").await.expect("subscribe");
    let specs = registry::parse(
        "extensions:\n  - {id: guard, type: validator, retries: 2, failure_policy: fail_closed, \
         breaker: {failures: 1, window_secs: 60, cooldown_secs: 600}}\n",
    )
    .expect("registry");
    let invoker = Invoker::new(
        client.clone(),
        std::sync::Arc::new(Registry::new(None, Duration::from_secs(60), specs)),
    );
    let max_payload = client.server_info().max_payload;
    let raw = serde_json::from_value(json!([
        {"id": "a", "type": "fail", "input": {"message": "x".repeat(max_payload), "probability": 0.0}}
    ]))
    .expect("steps");
    let steps = wire::step::parse_steps(raw, 100).expect("valid steps");
    let run = wire::submitted::RunSubmitted {
        run_id: wire::ids::RunId::parse("r-1".to_owned()).expect("id"),
        tenant_id: wire::ids::TenantId::parse("demo".to_owned()).expect("id"),
        flow_id: wire::ids::FlowId::parse("f".to_owned()).expect("id"),
        steps,
        provider: None,
        submitted_at: time::OffsetDateTime::now_utc(),
    };
    let metadata = Default::default();
    let invocation = Invocation {
        run: &run,
        metadata: &metadata,
        policy_id: "default",
        dispatched: None,
    };
    for _ in 0..3 {
        let outcome = invoker.invoke("guard", &invocation).await;
        assert_eq!(outcome.status, Status::RequestTooLarge);
        assert_eq!(outcome.retries_used, 0);
        assert!(outcome.response.is_none());
    }
    assert_eq!(invoker.breaker_state("guard"), State::Closed);
    client.flush().await.expect("flush");
    assert!(
        tokio::time::timeout(
            Duration::from_millis(200),
            futures::StreamExt::next(&mut requests)
        )
        .await
        .is_err(),
        "nothing was sent"
    );
}
