//! Regression tests for the security review (issue 11), each named for the
//! attack it replays.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::service::ServiceProcess;
use testkit::stack::{Component, Stack};

/// Step ids become tokens of JetStream KV keys (`<run_id>.<step_id>`) and
/// subjects, where an empty token is invalid: `a.`, `.a` and `a..b` used to
/// be accepted, and approving such a step answered 503 `broker_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_ids_with_empty_dot_tokens_are_refused_at_submit() {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    for id in ["a.", ".a", "a..b", "."] {
        let body = json!({
            "flow_id": "f",
            "steps": [{"id": id, "type": "approval", "input": {"prompt": "ok?", "timeout_s": 60}}],
        });
        let response = stack.submit(&body).send().await.expect("POST run");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "step id {id:?}");
        let body: Value = response.json().await.expect("error body");
        assert_eq!(body["error"]["code"], "invalid_field", "{id:?}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("steps[0].id"), "{id:?}: {message}");
    }
}

/// `METRICS_AUTH_TOKEN=` (or blank) used to switch the bearer check off
/// silently, leaving `/metrics` open while the operator believed it guarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_metrics_token_is_refused_at_start() {
    for binary in ["gateway", "router", "worker"] {
        for blank in ["", "   "] {
            let env = HashMap::from([("METRICS_AUTH_TOKEN".to_owned(), blank.to_owned())]);
            let mut process = ServiceProcess::spawn(binary, &env);
            let status = process
                .wait_exit(Duration::from_secs(10))
                .await
                .expect("exits");
            assert_eq!(
                status.code(),
                Some(2),
                "{binary} with METRICS_AUTH_TOKEN={blank:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stderr = process.stderr();
            assert!(
                stderr.iter().any(|l| l.contains("METRICS_AUTH_TOKEN")),
                "{binary}: {stderr:?}"
            );
        }
    }
}

/// 400 idle or slow-header connections used to stay open indefinitely, on
/// the API and on the admin port alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("HTTP_HEADER_TIMEOUT_MS".into(), "500".into());
    stack.start(Component::Gateway).await;
    let ports = [stack.ports.api, stack.ports.gateway_admin];
    let mut held = Vec::new();
    for port in ports {
        for i in 0..100 {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            if i % 2 == 1 {
                // Half send the start of a request and never finish it.
                let _ = stream
                    .write_all(b"POST /v1/runs HTTP/1.1\r\nHost: x\r\n")
                    .await;
            }
            held.push((port, stream));
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (port, stream) in &mut held {
        let mut buf = [0_u8; 512];
        let closed = tokio::time::timeout_at(deadline, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection to port {port} stayed open");
    }
    // And the gateway still serves.
    let response = stack
        .http
        .get(stack.url("/openapi.json"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
}

/// 16 000 bad-key requests were answered 401 every time: a key could be
/// guessed at line rate. Failed authentication is now throttled per client
/// address, before any key is looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_keys_is_throttled_by_client_address() {
    let mut stack = Stack::new().await;
    stack.extra_env.extend(
        [
            ("GATEWAY_AUTH_FAILURE_BURST", "10"),
            ("GATEWAY_AUTH_FAILURE_RPS", "0.5"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    stack.start(Component::Gateway).await;
    let mut unauthorized = 0;
    let mut throttled = 0;
    for i in 0..60 {
        let response = stack
            .http
            .get(stack.url("/v1/runs"))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .expect("GET");
        match response.status() {
            StatusCode::UNAUTHORIZED => unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(response.headers().contains_key("retry-after"));
                let body: Value = response.json().await.expect("error body");
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                throttled += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(unauthorized <= 12, "{unauthorized} guesses were checked");
    assert!(throttled >= 48, "only {throttled} of 60 guesses throttled");
    // While throttled, the address gets nothing checked, not even a good key.
    let response = stack
        .http
        .get(stack.url("/v1/runs"))
        .bearer_auth(testkit::stack::DEMO_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Good keys never use up the budget: another gateway, many good requests.
    let metrics = stack.scrape(Component::Gateway).await;
    assert!(
        metrics.contains("gateway_auth_throttled_total"),
        "throttling is counted"
    );
}

/// Requests with a valid key are never throttled by the failure budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_keys_do_not_use_the_failure_budget() {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .extend([("GATEWAY_AUTH_FAILURE_BURST", "3")].map(|(k, v)| (k.to_owned(), v.to_owned())));
    stack.start(Component::Gateway).await;
    for _ in 0..30 {
        let response = stack
            .http
            .get(stack.url("/v1/runs"))
            .bearer_auth(testkit::stack::DEMO_KEY)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), StatusCode::OK);
    }
}
