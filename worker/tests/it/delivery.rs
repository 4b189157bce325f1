//! Delivery under faults: a finished run is never executed again, SIGTERM
//! and kill -9 hand work to another replica at once, readiness follows the
//! broker.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::stack::{Component, Stack};

use crate::support::{AckCutter, spans_named, spawn_worker, stack_with, work_consumer};

/// A stack with the gateway and the router only.
async fn front_only() -> Stack {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    stack.start(Component::Router).await;
    stack
}

async fn submit(stack: &Stack, steps: Value) -> String {
    let accepted = stack
        .submit_ok(&json!({"flow_id": "delivery", "steps": steps}))
        .await;
    accepted["run_id"].as_str().expect("run_id").to_owned()
}

/// The run's status now.
async fn status(stack: &Stack, run_id: &str) -> String {
    let run: Value = stack
        .get_run_as(testkit::stack::DEMO_KEY, run_id)
        .await
        .json()
        .await
        .expect("run JSON");
    run["status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_whose_ack_was_lost_is_not_executed_again() {
    let mut stack = front_only().await;
    let cutter = AckCutter::start(stack.nats.port).await;
    let port = stack.ports.worker_admin;
    let url = cutter.url();
    stack.worker = Some(spawn_worker(&stack, port, &[("NATS_URL", Some(&url))]).await);

    let run_id = submit(
        &stack,
        json!([
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "delay", "input": {"ms": 100}}
        ]),
    )
    .await;
    // The final report is stored, then the ack is lost with the connection…
    testkit::eventually(
        Duration::from_secs(20),
        "the work ack to be cut",
        || async { cutter.has_cut().then_some(()) },
    )
    .await;
    // …and the broker restarts before anything else is acked.
    stack.nats.restart().await;
    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // The message comes back (delivered twice) and is acked without running.
    testkit::eventually(
        Duration::from_secs(30),
        "the redelivered work message to be acked",
        || async {
            let (delivered, pending) = work_consumer(&stack).await;
            (delivered >= 2 && pending == 0).then_some(())
        },
    )
    .await;
    testkit::eventually(
        Duration::from_secs(10),
        "the second delivery's process span",
        || async {
            spans_named(&stack, "process work.default", &run_id)
                .iter()
                .any(|s| s.attr("messaging.nats.delivery_count") == Some("2"))
                .then_some(())
        },
    )
    .await;
    // Give a re-execution time to show up in the spans.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steps: Vec<String> = spans_named(&stack, "worker.step.execute", &run_id)
        .iter()
        .filter_map(|s| s.attr("step.id").map(str::to_owned))
        .collect();
    assert_eq!(
        steps.iter().filter(|s| *s == "a").count(),
        1,
        "step a ran again: {steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| *s == "b").count(),
        1,
        "step b ran again: {steps:?}"
    );
    let run = stack.wait_terminal(&run_id, Duration::from_secs(5)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"].as_array().map(Vec::len), Some(2), "{run}");

    // What remains is a terminal marker, kept as long as the work stream
    // keeps the message that could come back.
    let client = async_nats::connect(stack.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value("beamline_run_progress")
        .await
        .expect("progress bucket");
    let marker: Value = serde_json::from_slice(
        &kv.get(run_id.as_str())
            .await
            .expect("read marker")
            .expect("a marker"),
    )
    .expect("marker JSON");
    assert_eq!(marker["terminal"]["status"], "succeeded", "{marker}");
    assert_eq!(marker["terminal"]["reported"], true, "{marker}");
    let kept = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .expect("stream")
                .get_info()
                .await
                .expect("stream info")
                .config
                .max_age
        }
    };
    let (bucket, work) = (
        kept("KV_beamline_run_progress").await,
        kept("BEAMLINE_WORK").await,
    );
    assert!(
        !work.is_zero() && bucket >= work,
        "markers kept {bucket:?}, work messages {work:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_work_to_the_other_replica_at_once() {
    let mut stack = front_only().await;
    // A long ack wait: a message stranded on the stopping worker would wait
    // 30 s, the finding; a long grace so it is still draining meanwhile.
    let env = [
        ("WORKER_ACK_WAIT_SECS", Some("30")),
        ("WORKER_SHUTDOWN_GRACE_SECS", Some("20")),
        ("WORKER_CONCURRENCY", Some("4")),
    ];
    let port = stack.ports.worker_admin;
    let mut stopping = spawn_worker(&stack, port, &env).await;
    let long = submit(
        &stack,
        json!([{"id": "long", "type": "delay", "input": {"ms": 5000}}]),
    )
    .await;
    stack
        .wait_status(&long, Duration::from_secs(15), |s| s == "running")
        .await;
    let other_port = testkit::free_port();
    stack.worker = Some(spawn_worker(&stack, other_port, &env).await);
    // The other replica's pull is open.
    tokio::time::sleep(Duration::from_millis(500)).await;

    stopping.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..8 {
        let began = Instant::now();
        let run_id = submit(&stack, json!([{"id": "a", "type": "noop"}])).await;
        loop {
            let now = status(&stack, &run_id).await;
            if now == "succeeded" {
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "run {run_id} submitted after the SIGTERM still {now} after 10 s: stranded on \
                 the stopping worker"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest = slowest.max(began.elapsed());
    }
    eprintln!("slowest run after the SIGTERM: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a run took {slowest:?} after the SIGTERM"
    );

    // The draining run still finishes (on the stopping worker, in its grace).
    let status = stopping
        .wait_exit(Duration::from_secs(25))
        .await
        .expect("exits within its grace period");
    assert!(status.success(), "{status}");
    let run = stack.wait_terminal(&long, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_run_is_picked_up_by_another_within_5_s() {
    let mut stack = front_only().await;
    // The worker's own defaults: no ack wait from the test.
    let env = [("WORKER_ACK_WAIT_SECS", None)];
    let port = stack.ports.worker_admin;
    let mut killed = spawn_worker(&stack, port, &env).await;
    let run_id = submit(
        &stack,
        json!([{"id": "long", "type": "delay", "input": {"ms": 3000}}]),
    )
    .await;
    stack
        .wait_status(&run_id, Duration::from_secs(15), |s| s == "running")
        .await;
    let other_port = testkit::free_port();
    stack.worker = Some(spawn_worker(&stack, other_port, &env).await);
    let (delivered, _) = work_consumer(&stack).await;
    assert_eq!(delivered, 1);

    killed.kill().await;
    let began = Instant::now();
    loop {
        let (delivered, _) = work_consumer(&stack).await;
        if delivered >= 2 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(12),
            "the killed worker's run was not redelivered in 12 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let picked_up = began.elapsed();
    eprintln!("picked up by the other replica after {picked_up:?}");
    assert!(
        picked_up < Duration::from_secs(5),
        "picked up after {picked_up:?}"
    );
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

async fn ready(stack: &Stack, component: Component) -> bool {
    let url = format!(
        "http://127.0.0.1:{}/health/ready",
        stack.admin_port(component)
    );
    match stack
        .http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

async fn all_become(stack: &Stack, want: bool, within: Duration, what: &str) {
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        testkit::eventually(
            within,
            &format!("{} to be {what}", component.name()),
            || async { (ready(stack, component).await == want).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_jetstream_not_just_the_connection() {
    let stack = stack_with(&[]).await;
    all_become(&stack, true, Duration::from_secs(5), "ready").await;

    // A stalled broker: connections stay up, JetStream does not answer.
    stack.nats.pause();
    let began = Instant::now();
    all_become(
        &stack,
        false,
        Duration::from_secs(8),
        "not ready under a stall",
    )
    .await;
    let noticed = began.elapsed();
    eprintln!("all three not ready {noticed:?} after SIGSTOP");
    stack.nats.resume();
    assert!(noticed < Duration::from_secs(8), "{noticed:?}");
    all_become(&stack, true, Duration::from_secs(10), "ready after SIGCONT").await;

    // A stream the services need is gone.
    let client = async_nats::connect(stack.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    js.delete_stream("BEAMLINE_DEADLETTER")
        .await
        .expect("delete stream");
    all_become(
        &stack,
        false,
        Duration::from_secs(5),
        "not ready without a stream",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pull_is_kept_alive_by_heartbeats_and_replaced_after_a_restart() {
    let mut stack = stack_with(&[]).await;
    // Longer than the pull's expiry (5 s) and its lost-after (3 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let worker = stack.process(Component::Worker);
    let lost: Vec<_> = worker
        .stdout()
        .into_iter()
        .filter(|l| l.contains("pull lost"))
        .collect();
    assert!(lost.is_empty(), "heartbeats did not arrive: {lost:#?}");
    let client = async_nats::connect(stack.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let info = js
        .get_stream("BEAMLINE_WORK")
        .await
        .expect("work stream")
        .consumer_info("worker-default")
        .await
        .expect("consumer info");
    assert!(info.num_waiting > 0, "no pull open: {info:?}");
    assert_eq!(info.config.max_ack_pending, 8 * 128);

    // The broker restarts: its pulls are gone; a new one is sent soon.
    stack.nats.restart().await;
    let began = Instant::now();
    testkit::eventually(Duration::from_secs(15), "a pull open again", || async {
        let client = async_nats::connect(stack.nats.url()).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let info = js
            .get_stream("BEAMLINE_WORK")
            .await
            .ok()?
            .consumer_info("worker-default")
            .await
            .ok()?;
        (info.num_waiting > 0).then_some(())
    })
    .await;
    eprintln!("pull open again {:?} after the restart", began.elapsed());
    let run = crate::support::run_to_end(&stack, json!([{"id": "a", "type": "noop"}])).await;
    assert_eq!(run.2["status"], "succeeded", "{}", run.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_extensions_are_off_keeps_serving() {
    let mut stack = front_only().await;
    let port = stack.ports.worker_admin;
    stack.worker = Some(
        spawn_worker(
            &stack,
            port,
            &[("WORKER_EXTENSIONS_ENABLED", Some("false"))],
        )
        .await,
    );
    // A task that ends without error is no reason to stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, run) =
        crate::support::run_to_end(&stack, json!([{"id": "a", "type": "noop"}])).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let worker = stack.worker.as_mut().expect("worker");
    assert!(
        worker.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the worker exited: {:?}",
        worker.stderr()
    );
}
