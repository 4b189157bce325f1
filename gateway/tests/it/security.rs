//! Regression tests for the security review (issue 11), each named for the
//! attack it replays.

use reqwest::StatusCode;
use serde_json::{Value, json};

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
