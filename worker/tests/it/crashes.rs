//! Crash safety, dead letters and graceful shutdown.

use std::time::Duration;

use serde_json::json;
use testkit::stack::{Component, Stack};

use crate::support::{spans_named, stack_with};

async fn submit_slow(stack: &Stack, ms: u64) -> String {
    let accepted = stack
        .submit_ok(&json!({"flow_id": "slow", "steps": [
            {"id": "first", "type": "noop"},
            {"id": "long", "type": "delay", "input": {"ms": ms}}
        ]}))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    stack
        .wait_status(&run_id, Duration::from_secs(15), |s| s == "running")
        .await;
    // Inside the delay: the first step is done and checkpointed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_resumes_once_with_a_link_to_the_first_attempt() {
    let mut stack = stack_with(&[]).await;
    let run_id = submit_slow(&stack, 2_500).await;
    stack.kill(Component::Worker).await;
    stack.start(Component::Worker).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "no duplicate step results: {run}");
    assert_eq!(steps[0]["attempts"], 1);

    // The first step ran once in all; the second attempt links to the first.
    let processes = testkit::eventually(
        Duration::from_secs(10),
        "the second attempt's span",
        || async {
            let spans = spans_named(&stack, "process work.default", &run_id);
            spans.iter().any(|s| !s.links.is_empty()).then_some(spans)
        },
    )
    .await;
    let second = processes
        .iter()
        .find(|s| !s.links.is_empty())
        .expect("linked span");
    assert_eq!(second.attr("messaging.nats.delivery_count"), Some("2"));
    let first_step_runs: Vec<_> = spans_named(&stack, "worker.step.execute", &run_id)
        .into_iter()
        .filter(|s| s.attr("step.id") == Some("first"))
        .collect();
    assert_eq!(
        first_step_runs.len(),
        1,
        "the finished step was not executed again"
    );
    // The killed attempt never exported its span; its id is what the link names.
    let (linked_trace, _) = &second.links[0];
    assert_eq!(linked_trace, &second.trace_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_max_deliveries_is_dead_lettered_not_looped() {
    let mut stack = stack_with(&[("WORKER_MAX_DELIVER", "1")]).await;
    let run_id = submit_slow(&stack, 2_500).await;
    stack.kill(Component::Worker).await;
    stack.start(Component::Worker).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("max_deliveries_exceeded")),
        "{run}"
    );

    let client = async_nats::connect(stack.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream("BEAMLINE_DEADLETTER")
        .await
        .expect("dead letter stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, 1);
    let metrics = stack.scrape(Component::Worker).await;
    assert!(
        metrics.contains("worker_dead_letters_total{reason=\"max_deliveries_exceeded\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_naks_what_cannot_finish_in_the_grace_period() {
    let mut stack = stack_with(&[("WORKER_SHUTDOWN_GRACE_SECS", "1")]).await;
    let run_id = submit_slow(&stack, 4_000).await;
    let worker = stack.worker.as_mut().expect("worker");
    worker.terminate();
    let began = std::time::Instant::now();
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert!(status.success(), "{status}");
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "exited after the grace period, not after the step"
    );

    // The naked run is picked up at once by the next worker and finishes.
    stack.worker = None;
    stack.start(Component::Worker).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
