//! Approval steps end to end through the gateway API.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::stack::{ACME_KEY, Component, DEMO_KEY, Stack};

use crate::support::stack_with;

async fn submit_awaiting(stack: &Stack, timeout_s: u64) -> String {
    let accepted = stack
        .submit_ok(&json!({"flow_id": "needs-ok", "steps": [
            {"id": "prep", "type": "noop"},
            {"id": "gate", "type": "approval", "input": {"prompt": "ship it?", "timeout_s": timeout_s}},
            {"id": "after", "type": "noop"}
        ]}))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    let run = stack
        .wait_status(&run_id, Duration::from_secs(15), |s| {
            s == "awaiting_approval"
        })
        .await;
    assert_eq!(run["steps"][1]["status"], "awaiting_approval", "{run}");
    assert_eq!(run["steps"][1]["output"]["prompt"], "ship it?");
    run_id
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON");
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_resumes_and_reject_fails_the_run() {
    let stack = stack_with(&[]).await;

    let run_id = submit_awaiting(&stack, 600).await;
    // Tenant isolation and wrong steps.
    assert_eq!(
        error_code(
            stack
                .decide(ACME_KEY, &run_id, "gate", "approve", None)
                .await
        )
        .await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    assert_eq!(
        error_code(
            stack
                .decide(DEMO_KEY, &run_id, "prep", "approve", None)
                .await
        )
        .await,
        (StatusCode::CONFLICT, "not_awaiting_approval".into())
    );
    let response = stack
        .decide(DEMO_KEY, &run_id, "gate", "approve", Some("looks fine"))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        error_code(
            stack
                .decide(DEMO_KEY, &run_id, "gate", "reject", None)
                .await
        )
        .await,
        (StatusCode::CONFLICT, "already_decided".into())
    );
    let run = stack.wait_terminal(&run_id, Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"]["verdict"], "approved");
    assert_eq!(run["steps"][1]["output"]["comment"], "looks fine");
    assert_eq!(run["steps"][2]["status"], "succeeded");
    // Once ended, nothing is awaiting.
    assert_eq!(
        error_code(
            stack
                .decide(DEMO_KEY, &run_id, "gate", "approve", None)
                .await
        )
        .await
        .0,
        StatusCode::CONFLICT
    );

    let run_id = submit_awaiting(&stack, 600).await;
    let response = stack
        .decide(DEMO_KEY, &run_id, "gate", "reject", Some("not today"))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let run = stack.wait_terminal(&run_id, Duration::from_secs(15)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.contains("not today")),
        "{run}"
    );
    assert_eq!(run["steps"][2]["status"], "skipped");

    let metrics = stack.scrape(Component::Worker).await;
    assert!(
        metrics.contains("worker_approval_wait_seconds_bucket{outcome=\"approved\""),
        "{metrics}"
    );
    assert!(metrics.contains("worker_approval_wait_seconds_bucket{outcome=\"rejected\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_approval_times_the_run_out() {
    let stack = stack_with(&[]).await;
    let run_id = submit_awaiting(&stack, 2).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(15)).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(run["steps"][1]["status"], "failed");
    assert_eq!(run["steps"][2]["status"], "skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_approval_survives_a_worker_restart() {
    let mut stack = stack_with(&[]).await;
    let run_id = submit_awaiting(&stack, 600).await;
    stack.kill(Component::Worker).await;
    stack.start(Component::Worker).await;
    // The approval can be given while the new worker picks the run up again.
    let response = stack
        .decide(DEMO_KEY, &run_id, "gate", "approve", None)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_approval_does_not_hold_a_worker_slot() {
    let stack = stack_with(&[("WORKER_CONCURRENCY", "1")]).await;
    let waiting = submit_awaiting(&stack, 600).await;
    // With one slot, a second run still goes through while the first waits.
    let accepted = stack.submit_ok(&testkit::stack::sample_run()).await;
    let other = accepted["run_id"].as_str().expect("run_id");
    let run = stack.wait_terminal(other, Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // And the waiting run resumes when approved.
    let response = stack
        .decide(DEMO_KEY, &waiting, "gate", "approve", None)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let run = stack.wait_terminal(&waiting, Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
