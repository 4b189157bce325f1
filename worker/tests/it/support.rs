//! Helpers shared by the worker's tests.

use std::time::Duration;

use serde_json::Value;
use testkit::otlp::CollectedSpan;
use testkit::stack::{Component, Stack};

/// A stack with all three services, `extra` environment applied to each.
pub async fn stack_with(extra: &[(&str, &str)]) -> Stack {
    let mut stack = Stack::new().await;
    for (key, value) in extra {
        stack
            .extra_env
            .insert((*key).to_owned(), (*value).to_owned());
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    stack
}

/// Submits a run of `steps` and waits for it to end.
pub async fn run_to_end(stack: &Stack, steps: Value) -> (String, String, Value) {
    let accepted = stack
        .submit_ok(&serde_json::json!({"flow_id": "worker-test", "steps": steps}))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    let trace_id = accepted["trace_id"].as_str().expect("trace_id").to_owned();
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    (run_id, trace_id, run)
}

/// All spans received so far with this name and `run.id`.
pub fn spans_named(stack: &Stack, name: &str, run_id: &str) -> Vec<CollectedSpan> {
    stack
        .otlp
        .spans()
        .into_iter()
        .filter(|s| s.name == name && s.attr("run.id").is_none_or(|r| r == run_id))
        .collect()
}
