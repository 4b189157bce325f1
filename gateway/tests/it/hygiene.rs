//! Telemetry hygiene across the three processes: no secret or personal
//! data in any log line, span or metric; bounded, id-free labels; a
//! protected `/metrics`; each pillar switched off completely by its flag.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::stack::{Component, DEMO_KEY, Stack};

/// Secrets and personal data planted in inputs, headers and outputs.
const PLANTED: &[&str] = &[
    "hunter2",
    "sk_live_TESTKEY123456789",
    "k3y-SECRET-999",
    "supersecret123",
    "alice@example.com",
    "4111 1111 1111 1111",
    "4111111111111111",
    "ua-secret-42",
    "tok_ABCDEF123",
    "demo-key",
    "session=abc123",
    "carol@example.org",
];

async fn echo_server() -> u16 {
    let app = Router::new().route(
        "/echo",
        get(|| async {
            axum::Json(json!({"owner": "carol@example.org", "card": "4111 1111 1111 1111", "token": "tok_ABCDEF123"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_personal_data_leaves_a_process() {
    let port = echo_server().await;
    // Both http targets must be listed: WORKER_HTTP_ALLOW allows nothing by default.
    let mut stack = Stack::new().await;
    stack.extra_env.insert(
        "WORKER_HTTP_ALLOW".into(),
        format!("127.0.0.1:{port},127.0.0.1:1"),
    );
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let body = json!({"flow_id": "leaky", "steps": [
        {"id": "call", "type": "http", "input": {
            "url": format!("http://127.0.0.1:{port}/echo?api_key=supersecret123&page=1"),
            "headers": {"Authorization": "Bearer sk_live_TESTKEY123456789", "X-Api-Key": "k3y-SECRET-999"}}},
        {"id": "refused", "type": "http", "input": {"url": "http://127.0.0.1:1/x?token=tok_ABCDEF123"}},
    ]});
    let response = stack
        .submit(&body)
        .header("Cookie", "session=abc123")
        .header("User-Agent", "tester token=ua-secret-42")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let run_id = response.json::<Value>().await.expect("JSON")["run_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    // The data did flow: the upstream's answer is the step's output (the API may show it).
    assert_eq!(
        run["steps"][0]["output"]["body"]["owner"],
        "carol@example.org"
    );

    let failing = json!({"flow_id": "leaky", "steps": [
        {"id": "boom", "type": "fail", "input": {"message": "charge failed for alice@example.com card 4111 1111 1111 1111 password=hunter2"}}
    ]});
    let accepted = stack.submit_ok(&failing).await;
    let failed_id = accepted["run_id"].as_str().expect("id").to_owned();
    let trace_id = accepted["trace_id"].as_str().expect("trace").to_owned();
    stack
        .wait_terminal(&failed_id, Duration::from_secs(30))
        .await;
    // 2 gateway + 5 router + worker (process, step, 2 reports) + 2 gateway.
    let spans = stack
        .otlp
        .wait_for_trace(&trace_id, 13, Duration::from_secs(20))
        .await;

    // The failure reached telemetry, redacted.
    let step = spans
        .iter()
        .find(|s| s.name == "worker.step.execute")
        .expect("step span");
    let exception = step
        .event_attributes
        .iter()
        .find_map(|a| a.get("exception.message"))
        .expect("exception event");
    assert!(
        exception.contains("[REDACTED:email]") && exception.contains("****1111"),
        "{exception}"
    );
    let worker_logs = stack.process(Component::Worker).stdout().join("\n");
    assert!(
        worker_logs.contains("step attempt failed") && worker_logs.contains("[REDACTED"),
        "the failure is logged, redacted"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut haystacks: Vec<(String, String)> = Vec::new();
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        for line in stack.process(component).stdout() {
            haystacks.push((format!("{} stdout", component.name()), line));
        }
        haystacks.push((
            format!("{} /metrics", component.name()),
            stack.scrape(component).await,
        ));
    }
    for span in stack.otlp.spans() {
        haystacks.push((
            format!("span {} ({})", span.name, span.service),
            span.text(),
        ));
    }
    for (place, text) in &haystacks {
        for planted in PLANTED {
            assert!(
                !text.contains(planted),
                "{planted:?} leaked into {place}: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_bounded_and_carry_no_ids_urls_or_errors() {
    let stack = Stack::full().await;
    let mut run_ids = Vec::new();
    for i in 0..5 {
        let accepted = stack
            .submit_ok(&json!({"flow_id": format!("flow-{i}"), "steps": [{"id": format!("s{i}"), "type": "fail", "input": {"message": format!("error number {i}")}}]}))
            .await;
        run_ids.push(accepted["run_id"].as_str().expect("id").to_owned());
    }
    for id in &run_ids {
        stack.wait_terminal(id, Duration::from_secs(30)).await;
    }
    let uuid = regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        .expect("regex");
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        let scrape = crate::e2e::parse(&stack.scrape(component).await);
        assert!(!scrape.samples.is_empty());
        for sample in &scrape.samples {
            for (name, value) in sample.labels.iter() {
                assert!(
                    !telemetry::cardinality::FORBIDDEN_LABELS.contains(&name.as_str()),
                    "{} has label {name}",
                    sample.metric
                );
                assert!(
                    !uuid.is_match(value),
                    "{} label {name}={value} is an id",
                    sample.metric
                );
                if name != "route" {
                    assert!(
                        !value.contains("://") && !value.starts_with('/'),
                        "{} label {name}={value} is a URL or path",
                        sample.metric
                    );
                }
                assert!(
                    !value.contains("error number"),
                    "{} label {name} carries an error string",
                    sample.metric
                );
                assert!(
                    !value.starts_with("flow-"),
                    "{} label {name}={value} is a flow id",
                    sample.metric
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_and_health_stays_open() {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("METRICS_AUTH_TOKEN".into(), "m3trics-t0ken".into());
    stack.start(Component::Gateway).await;
    let base = format!("http://127.0.0.1:{}", stack.ports.gateway_admin);
    let none = stack
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let body: Value = none.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = stack
        .http
        .get(format!("{base}/metrics"))
        .bearer_auth("m3trics-t0kem")
        .send()
        .await
        .expect("GET");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = stack
        .http
        .get(format!("{base}/metrics"))
        .bearer_auth("m3trics-t0ken")
        .send()
        .await
        .expect("GET");
    assert_eq!(right.status(), StatusCode::OK);
    assert!(
        right
            .text()
            .await
            .expect("text")
            .contains("component_build_info")
    );
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(
            stack
                .http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("GET")
                .status(),
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flag_switches_its_pillar_off_and_logs_keep_working() {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("CP2_OBSERVABILITY_METRICS_ENABLED".into(), "false".into());
    stack
        .extra_env
        .insert("CP2_OBSERVABILITY_TRACING_ENABLED".into(), "false".into());
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let accepted = stack.submit_ok(&testkit::stack::sample_run()).await;
    assert!(
        accepted["trace_id"].is_null(),
        "no tracer, no trace id: {accepted}"
    );
    let run_id = accepted["run_id"].as_str().expect("id");
    assert_eq!(
        stack.wait_terminal(run_id, Duration::from_secs(20)).await["status"],
        "succeeded"
    );
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        let base = format!("http://127.0.0.1:{}", stack.admin_port(component));
        assert_eq!(
            stack
                .http
                .get(format!("{base}/metrics"))
                .send()
                .await
                .expect("GET")
                .status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            stack
                .http
                .get(format!("{base}/health/ready"))
                .send()
                .await
                .expect("GET")
                .status(),
            StatusCode::OK
        );
        let lines = stack.process(component).stdout();
        assert!(
            lines.iter().any(|l| l.contains(run_id)),
            "{} still logs the run",
            component.name()
        );
        for line in &lines {
            let json: Value = serde_json::from_str(line).expect("JSON log line");
            assert!(json.get("trace_id").is_none(), "{line}");
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        stack.otlp.spans().is_empty(),
        "nothing exported with tracing off"
    );
    // The same request with a bearer key for the flagged-off stack still works.
    assert_eq!(
        stack.get_run_as(DEMO_KEY, run_id).await.status(),
        StatusCode::OK
    );
}
