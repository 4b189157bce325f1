//! The gateway's API contract: bad input gets a clear 4xx JSON error and
//! loses nothing; broker trouble is a 503 that leaves nothing behind.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::stack::{ACME_KEY, Component, DEMO_KEY, Stack, sample_run};

/// Asserts `{"error":{"code","message"}}` with `status` and `code`; returns the message.
async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

async fn gateway_only() -> Stack {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("GATEWAY_BODY_LIMIT_BYTES".into(), "2048".into());
    stack.start(Component::Gateway).await;
    stack
}

/// Rows in the run store, read with sqlx straight from the gateway's file.
async fn stored_runs(stack: &Stack) -> i64 {
    use sqlx::Connection;
    let url = format!("sqlite://{}", stack.database_path().display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("open run store");
    sqlx::query_scalar("SELECT COUNT(*) FROM runs")
        .fetch_one(&mut conn)
        .await
        .expect("count runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_are_400_naming_the_field() {
    let stack = gateway_only().await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"steps": [{"id": "a", "type": "noop"}]}),
            "invalid_field",
            "flow_id",
        ),
        (json!({"flow_id": "f"}), "invalid_field", "steps"),
        (
            json!({"flow_id": "f", "steps": []}),
            "invalid_field",
            "steps",
        ),
        (
            json!({"flow_id": "f", "steps": [{"id": "a", "type": "teleport"}]}),
            "invalid_field",
            "steps[0].type",
        ),
        (
            json!({"flow_id": "f", "steps": [{"id": "a", "type": "noop"}, {"id": "a", "type": "noop"}]}),
            "invalid_field",
            "steps[1].id",
        ),
        (
            json!({"flow_id": "f", "steps": [{"id": "a", "type": "noop", "colour": "red"}]}),
            "invalid_field",
            "colour",
        ),
        (
            json!({"flow_id": "f", "steps": [{"id": "a", "type": "noop"}], "priority": 1}),
            "invalid_field",
            "priority",
        ),
        (
            json!({"flow_id": "f", "steps": [{"id": "a", "type": "delay", "input": {"ms": "soon"}}]}),
            "invalid_field",
            "steps[0].input",
        ),
        (
            json!({"flow_id": "f", "steps": [{"type": "noop"}]}),
            "invalid_field",
            "id",
        ),
        (
            json!({"flow_id": "", "steps": [{"id": "a", "type": "noop"}]}),
            "invalid_field",
            "flow_id",
        ),
        (
            json!({"flow_id": "f", "steps": "a"}),
            "invalid_field",
            "steps",
        ),
        (json!([1, 2]), "invalid_field", "body"),
    ];
    for (body, code, field) in cases {
        let response = stack.submit(&body).send().await.expect("POST");
        let message = expect_error(response, StatusCode::BAD_REQUEST, code).await;
        assert!(
            message.contains(field),
            "message {message:?} should name {field:?} for {body}"
        );
    }

    let malformed = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "application/json")
        .body(r#"{"flow_id": "f", "steps": [}"#)
        .send()
        .await
        .expect("POST");
    expect_error(malformed, StatusCode::BAD_REQUEST, "malformed_json").await;

    let trailing = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "application/json")
        .body(r#"{"flow_id": "f", "steps": [{"id": "a", "type": "noop"}]} extra"#)
        .send()
        .await
        .expect("POST");
    expect_error(trailing, StatusCode::BAD_REQUEST, "malformed_json").await;

    assert_eq!(
        stored_runs(&stack).await,
        0,
        "nothing was stored for invalid input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_media_type_size_and_unknown_runs() {
    let stack = gateway_only().await;

    let no_key = stack
        .http
        .post(stack.url("/v1/runs"))
        .json(&sample_run())
        .send()
        .await
        .expect("POST");
    expect_error(no_key, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let wrong_key = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth("not-a-key")
        .json(&sample_run())
        .send()
        .await
        .expect("POST");
    expect_error(wrong_key, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let get_no_key = stack
        .http
        .get(stack.url("/v1/runs/x"))
        .send()
        .await
        .expect("GET");
    expect_error(get_no_key, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let text = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(DEMO_KEY)
        .header("content-type", "text/plain")
        .body(sample_run().to_string())
        .send()
        .await
        .expect("POST");
    expect_error(
        text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    let huge = json!({"flow_id": "f", "steps": [{"id": "a", "type": "fail", "input": {"message": "x".repeat(4096)}}]});
    let response = stack.submit(&huge).send().await.expect("POST");
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    for id in ["01a1ffab-843e-71f0-abad-7fc4259a0512", "not a run id"] {
        let response = stack.get_run_as(DEMO_KEY, id).await;
        expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    let unknown_route = stack
        .http
        .get(stack.url("/v2/nothing"))
        .send()
        .await
        .expect("GET");
    expect_error(unknown_route, StatusCode::NOT_FOUND, "not_found").await;

    // Another tenant's run is indistinguishable from a missing one.
    let accepted = stack.submit_ok(&sample_run()).await;
    let run_id = accepted["run_id"].as_str().expect("run_id");
    assert_eq!(
        stack.get_run_as(DEMO_KEY, run_id).await.status(),
        StatusCode::OK
    );
    expect_error(
        stack.get_run_as(ACME_KEY, run_id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(stored_runs(&stack).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let stack = gateway_only().await;
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-zz-01",
    ] {
        let response = stack
            .submit(&sample_run())
            .header("traceparent", bad)
            .send()
            .await
            .expect("POST");
        assert_eq!(
            response.status(),
            StatusCode::ACCEPTED,
            "traceparent {bad:?}"
        );
        let body: Value = response.json().await.expect("JSON");
        let trace_id = body["trace_id"].as_str().expect("a trace id");
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "00000000000000000000000000000000");
        assert_ne!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_is_503_and_leaves_nothing_behind() {
    let mut stack = gateway_only().await;
    stack.nats.stop().await;

    let response = stack.submit(&sample_run()).send().await.expect("POST");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "broker_unavailable");
    assert_eq!(stored_runs(&stack).await, 0, "no half-accepted run remains");

    // Readiness says so while NATS is away, and recovers with it.
    let ready = format!(
        "http://127.0.0.1:{}/health/ready",
        stack.ports.gateway_admin
    );
    let status = stack.http.get(&ready).send().await.expect("ready").status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    stack.nats.restart().await;
    testkit::eventually(Duration::from_secs(15), "gateway ready again", || {
        let (http, ready) = (stack.http.clone(), ready.clone());
        async move {
            let status = http.get(&ready).send().await.ok()?.status();
            status.is_success().then_some(())
        }
    })
    .await;
    stack.submit_ok(&sample_run()).await;
}
