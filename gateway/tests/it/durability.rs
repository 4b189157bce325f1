//! A run answered with 202 is not lost when a process dies.

use std::time::Duration;

use serde_json::json;

use testkit::stack::{Component, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_the_worker_being_killed_mid_run() {
    let mut stack = Stack::full().await;
    let accepted = stack
        .submit_ok(&json!({
            "flow_id": "slow",
            "steps": [
                {"id": "first", "type": "noop"},
                {"id": "long", "type": "delay", "input": {"ms": 3000}}
            ]
        }))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();

    // The worker has reported the run as running: it is inside the delay.
    stack
        .wait_status(&run_id, Duration::from_secs(15), |s| s == "running")
        .await;
    stack.kill(Component::Worker).await;

    // Nothing finishes while no worker runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let run: serde_json::Value = stack
        .get_run_as(testkit::stack::DEMO_KEY, &run_id)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(run["status"], "running", "{run}");

    // A new worker gets the unacked message once its ack wait (2 s) has passed.
    stack.start(Component::Worker).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waits_in_jetstream_while_the_router_is_down() {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    stack.start(Component::Worker).await;

    let accepted = stack.submit_ok(&testkit::stack::sample_run()).await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let run: serde_json::Value = stack
        .get_run_as(testkit::stack::DEMO_KEY, &run_id)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(run["status"], "accepted", "{run}");

    stack.start(Component::Router).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_a_gateway_restart_before_its_events_arrive() {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    stack.start(Component::Router).await;

    let accepted = stack.submit_ok(&testkit::stack::sample_run()).await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    stack.kill(Component::Gateway).await;

    // The worker reports while no gateway runs; the events wait in JetStream.
    stack.start(Component::Worker).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.start(Component::Gateway).await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
