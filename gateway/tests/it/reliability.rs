//! What a 202 and a 503 promise, under faults: a stalled or partitioned
//! broker, a gateway killed mid-request, a client that hangs up, a store that
//! refuses, SIGTERM with the broker gone (docs/reliability.md, "Gateway").

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::proxy::TcpProxy;
use testkit::service::ServiceProcess;
use testkit::stack::{Component, DEMO_KEY, Stack, sample_run};

use crate::front_door::{PgDatabase, StoreKind};

/// NATS, and the store of `kind`; no service started. Rate limits off: the
/// tests send bursts on purpose.
async fn bare_stack(kind: StoreKind) -> (Stack, Option<PgDatabase>) {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("GATEWAY_RATE_LIMIT_RPS".into(), "0".into());
    // The reconciler looks often, so recoveries show up within seconds.
    stack
        .extra_env
        .insert("GATEWAY_OUTBOX_INTERVAL_MS".into(), "500".into());
    let db = match kind {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => {
            let db = PgDatabase::create().await;
            stack
                .extra_env
                .insert("DATABASE_URL".into(), db.url.clone());
            Some(db)
        }
    };
    (stack, db)
}

/// Starts the gateway with its NATS connection through `proxy`.
async fn start_gateway_via(stack: &mut Stack, proxy: &TcpProxy) {
    let mut env = stack.env(Component::Gateway);
    env.insert("NATS_URL".into(), proxy.nats_url());
    let mut process = ServiceProcess::spawn("gateway", &env);
    process.wait_ready(stack.ports.gateway_admin).await;
    stack.gateway = Some(process);
}

/// `POST /v1/runs` with an Idempotency-Key: the status and the run id answered.
async fn post_keyed(http: &reqwest::Client, url: &str, key: &str, body: &Value) -> Answer {
    let sent = http
        .post(url)
        .bearer_auth(DEMO_KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let Ok(response) = sent else {
        return (None, None);
    };
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        eprintln!("{key}: {status} {body}");
    }
    (Some(status), body["run_id"].as_str().map(str::to_owned))
}

fn body_for(key: &str) -> Value {
    json!({"flow_id": format!("flow-{key}"), "steps": [{"id": "a", "type": "noop"}]})
}

/// Every run of tenant `demo`, through the list API (any store).
async fn all_runs(stack: &Stack) -> Vec<Value> {
    let mut runs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = stack.url("/v1/runs?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = stack
            .http
            .get(url)
            .bearer_auth(DEMO_KEY)
            .send()
            .await
            .expect("GET /v1/runs")
            .json()
            .await
            .expect("JSON");
        runs.extend(page["runs"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return runs,
        }
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "rejected" | "timed_out")
}

/// Waits until `expected` runs are stored and every one of them has ended.
async fn wait_all_terminal(stack: &Stack, expected: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let runs = all_runs(stack).await;
        let ended = runs
            .iter()
            .filter(|r| r["status"].as_str().is_some_and(is_terminal))
            .count();
        if runs.len() == expected && ended == expected {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "after {timeout:?}: {} runs stored, {ended} ended, {expected} expected; not ended: {:?}",
            runs.len(),
            runs.iter()
                .filter(|r| !r["status"].as_str().is_some_and(is_terminal))
                .map(|r| format!("{} {}", r["run_id"], r["status"]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Messages in the `runs.submitted` stream: one per run handed off, however
/// often it was published (`Nats-Msg-Id` deduplication).
async fn submitted_messages(stack: &Stack) -> u64 {
    let client = async_nats::connect(stack.nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(wire::jetstream::RUNS.name)
        .await
        .expect("runs stream");
    stream.info().await.expect("stream info").state.messages
}

/// What one request was answered: the status (none when the connection
/// broke) and the run id.
type Answer = (Option<StatusCode>, Option<String>);
/// Every answer, by Idempotency-Key.
type Answers = HashMap<String, Vec<Answer>>;
/// Requests in flight, each yielding its key and answer.
type Wave = tokio::task::JoinSet<(String, Option<StatusCode>, Option<String>)>;

/// Fires `per_key` concurrent identical requests for each key.
fn fire(stack: &Stack, keys: &[String], per_key: usize) -> Wave {
    let mut set = tokio::task::JoinSet::new();
    for key in keys {
        for _ in 0..per_key {
            let (http, url, key) = (stack.http.clone(), stack.url("/v1/runs"), key.clone());
            set.spawn(async move {
                let (status, run) = post_keyed(&http, &url, &key, &body_for(&key)).await;
                (key, status, run)
            });
        }
    }
    set
}

async fn collect(mut set: Wave, answers: &mut Answers) {
    while let Some(joined) = set.join_next().await {
        let (key, status, run) = joined.expect("request task");
        answers.entry(key).or_default().push((status, run));
    }
}

/// Item 1: N identical requests with one key, sent at once while the broker
/// is stalled, and again across a gateway killed mid-burst: one run per key.
async fn one_key_one_run(kind: StoreKind) {
    let (mut stack, db) = bare_stack(kind).await;
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let mut answers = Answers::new();

    // Wave 1: 20 keys × 6 at once during a 7 s stall.
    let stalled: Vec<String> = (0..20).map(|i| format!("stall-{i}")).collect();
    stack.nats.pause();
    let wave = fire(&stack, &stalled, 6);
    tokio::time::sleep(Duration::from_secs(7)).await;
    stack.nats.resume();
    collect(wave, &mut answers).await;
    for key in &stalled {
        for (status, run) in &answers[key] {
            assert!(
                matches!(*status, Some(StatusCode::ACCEPTED | StatusCode::OK)),
                "{key}: every request during a stall is accepted once stored, got {status:?} ({run:?})"
            );
        }
    }

    // Wave 2: 20 more keys × 6 while the broker is stalled again, and the
    // gateway is killed mid-burst; then the same requests again.
    let killed: Vec<String> = (0..20).map(|i| format!("kill-{i}")).collect();
    stack.nats.pause();
    let wave = fire(&stack, &killed, 6);
    tokio::time::sleep(Duration::from_millis(400)).await;
    stack.kill(Component::Gateway).await;
    collect(wave, &mut answers).await;
    stack.nats.resume();
    stack.start(Component::Gateway).await;
    let again: Vec<String> = stalled.iter().chain(&killed).cloned().collect();
    collect(fire(&stack, &again, 3), &mut answers).await;

    let mut run_ids = BTreeSet::new();
    for key in &again {
        let ids: BTreeSet<&String> = answers[key]
            .iter()
            .filter_map(|(_, r)| r.as_ref())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{key} stands for exactly one run: {:?}",
            answers[key]
        );
        run_ids.extend(ids.into_iter().cloned());
    }
    // Nothing else was stored, everything ran, and each run was handed off once.
    let runs = wait_all_terminal(&stack, again.len(), Duration::from_secs(60)).await;
    let stored: BTreeSet<String> = runs
        .iter()
        .filter_map(|r| r["run_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(stored, run_ids);
    assert_eq!(submitted_messages(&stack).await, again.len() as u64);

    drop(stack);
    if let Some(db) = db {
        db.drop_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_is_one_run_across_a_stall_and_a_restart_on_sqlite() {
    one_key_one_run(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_is_one_run_across_a_stall_and_a_restart_on_postgres() {
    one_key_one_run(StoreKind::Postgres).await;
}

/// Item 3: killed while its publishes went nowhere (a partition between the
/// gateway and NATS), the gateway's stored runs are handed off by the next
/// gateway; a key in flight is answered, not 409 for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_store_and_publish_leaves_no_debris() {
    let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
    stack.start(Component::Router).await;
    stack.start(Component::Worker).await;
    let proxy = TcpProxy::start(stack.nats.port).await;
    start_gateway_via(&mut stack, &proxy).await;

    proxy.blackhole();
    let keys: Vec<String> = (0..10).map(|i| format!("lost-{i}")).collect();
    let wave = fire(&stack, &keys, 2);
    // Stored, published into the void, not yet answered (publish timeout 1.5 s).
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack.kill(Component::Gateway).await;
    let mut answers = HashMap::new();
    collect(wave, &mut answers).await;
    proxy.restore();
    drop(proxy);

    stack.start(Component::Gateway).await;
    let started = Instant::now();
    let mut retried = HashMap::new();
    collect(fire(&stack, &keys, 1), &mut retried).await;
    for key in &keys {
        let (status, run) = &retried[key][0];
        assert!(
            matches!(*status, Some(StatusCode::ACCEPTED)),
            "{key} retried after the crash: {status:?} {run:?}"
        );
    }
    // A key still claimed by the dead gateway waits out its 10 s lease, no
    // longer (not the key's TTL, not a 409).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retries waited {:?}",
        started.elapsed()
    );
    let runs = wait_all_terminal(&stack, keys.len(), Duration::from_secs(30)).await;
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    assert_eq!(submitted_messages(&stack).await, keys.len() as u64);
    // Each republish happened inside its run's trace, below the request span
    // (runs the killed gateway had not stored yet were stored and handed off
    // by their retry instead).
    let traces: BTreeSet<String> = runs
        .iter()
        .filter_map(|r| r["trace_id"].as_str().map(str::to_owned))
        .collect();
    let republished = testkit::eventually(Duration::from_secs(10), "republish spans", || {
        let spans = stack.otlp.spans();
        async move {
            let republished: Vec<_> = spans
                .into_iter()
                .filter(|s| s.name == "gateway.outbox.republish")
                .collect();
            (!republished.is_empty()).then_some(republished)
        }
    })
    .await;
    for span in &republished {
        assert!(traces.contains(&span.trace_id), "{span:?}");
        assert!(span.parent_span_id.is_some(), "{span:?}");
    }
}

/// Item 3: killed between claiming an Idempotency-Key and storing its run
/// (the insert held up by a table lock), the gateway leaves an in-flight
/// claim; a retry takes it over once its lease is out instead of a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claimed_by_a_killed_gateway_is_taken_over_after_its_lease() {
    use sqlx::Connection;
    let (mut stack, db) = bare_stack(StoreKind::Postgres).await;
    let db = db.expect("database");
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let mut lock = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    for statement in ["BEGIN", "LOCK TABLE runs IN EXCLUSIVE MODE"] {
        sqlx::query(statement)
            .execute(&mut lock)
            .await
            .expect("lock runs");
    }
    let (http, url) = (stack.http.clone(), stack.url("/v1/runs"));
    let held =
        tokio::spawn(async move { post_keyed(&http, &url, "held", &body_for("held")).await });
    let mut probe = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let claimed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'held'")
                .fetch_one(&mut probe)
                .await
                .expect("count claims");
        if claimed == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the key was not claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.kill(Component::Gateway).await;
    let _ = held.await;
    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("unlock");

    stack.start(Component::Gateway).await;
    let started = Instant::now();
    let (status, run) = post_keyed(
        &stack.http,
        &stack.url("/v1/runs"),
        "held",
        &body_for("held"),
    )
    .await;
    eprintln!("retry answered {status:?} after {:?}", started.elapsed());
    assert_eq!(status, Some(StatusCode::ACCEPTED), "{run:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let runs = wait_all_terminal(&stack, 1, Duration::from_secs(30)).await;
    assert_eq!(runs[0]["run_id"].as_str(), run.as_deref());
    drop(stack);
    db.drop_now().await;
}

/// Item 3: killed after its publishes reached a stalled NATS but before the
/// acks came back (and so before it answered): every run runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_publish_and_answer_leaves_no_debris() {
    let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    stack.nats.pause();
    let mut wave = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = stack.submit(&sample_run()).timeout(Duration::from_secs(30));
        wave.spawn(async move { request.send().await.map(|r| r.status()) });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack.kill(Component::Gateway).await;
    while wave.join_next().await.is_some() {}
    stack.nats.resume();
    stack.start(Component::Gateway).await;

    let runs = all_runs(&stack).await;
    assert!(!runs.is_empty(), "the killed gateway had stored runs");
    let runs = wait_all_terminal(&stack, runs.len(), Duration::from_secs(30)).await;
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    assert_eq!(submitted_messages(&stack).await, runs.len() as u64);
}

/// Item 12: the client hangs up after the run was stored, while its hand-off
/// is stuck; the run is not orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_hand_off_leaves_no_orphan() {
    use tokio::io::AsyncWriteExt;
    let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
    stack.start(Component::Router).await;
    stack.start(Component::Worker).await;
    let proxy = TcpProxy::start(stack.nats.port).await;
    start_gateway_via(&mut stack, &proxy).await;

    proxy.blackhole();
    let body = sample_run().to_string();
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", stack.ports.api))
        .await
        .expect("connect");
    let request = format!(
        "POST /v1/runs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DEMO_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    // Stored; the publish went nowhere and its ack is awaited. Hang up.
    testkit::eventually(Duration::from_secs(10), "the run to be stored", || async {
        (all_runs(&stack).await.len() == 1).then_some(())
    })
    .await;
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();

    let runs = wait_all_terminal(&stack, 1, Duration::from_secs(30)).await;
    assert_eq!(runs[0]["status"], "succeeded", "{runs:?}");
}

/// Item 10: a store that cannot take the write is a retryable 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_store_is_503_store_unavailable() {
    use sqlx::Connection;
    let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
    stack.start(Component::Gateway).await;
    let url = format!("sqlite://{}", stack.database_path().display());
    let mut holder = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("open run store");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("take the write lock");

    let response = stack
        .submit(&sample_run())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("POST");
    expect_store_unavailable(response).await;

    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release the lock");
    stack.submit_ok(&sample_run()).await;
    let metrics = stack.scrape(Component::Gateway).await;
    assert!(
        metrics.contains("gateway_runs_submitted_total{outcome=\"store_unavailable\"} 1"),
        "{metrics}"
    );
}

/// Item 10 on PostgreSQL: the database stops taking connections and the
/// gateway's are terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_refusing_connections_is_503_store_unavailable() {
    use sqlx::Connection;
    let (mut stack, db) = bare_stack(StoreKind::Postgres).await;
    let db = db.expect("database");
    stack.start(Component::Gateway).await;
    let admin_url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let name = db.url.rsplit('/').next().expect("name").to_owned();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    for statement in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
            .expect("admin statement");
    }

    let response = stack
        .submit(&sample_run())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("POST");
    expect_store_unavailable(response).await;
    let read = stack
        .get_run_as(DEMO_KEY, "01a1ffab-843e-71f0-abad-7fc4259a0512")
        .await;
    expect_store_unavailable(read).await;

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .expect("allow connections");
    stack.submit_ok(&sample_run()).await;
    drop(stack);
    db.drop_now().await;
}

async fn expect_store_unavailable(response: reqwest::Response) {
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(retry_after.is_some(), "Retry-After");
}

/// Item 13: SIGTERM while the broker is stalled, with requests in flight
/// (one of them `?wait=60`), or while it is gone: the gateway exits within
/// its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_down_exits_within_the_grace_period() {
    for stalled in [true, false] {
        let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
        stack
            .extra_env
            .insert("GATEWAY_SHUTDOWN_GRACE_SECS".into(), "5".into());
        stack.start(Component::Gateway).await;
        let waiting = stack.submit_ok(&sample_run()).await;
        let waiting = waiting["run_id"].as_str().expect("run id").to_owned();
        if stalled {
            stack.nats.pause();
        } else {
            stack.nats.stop().await;
        }
        let mut in_flight = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let request = stack.submit(&sample_run()).timeout(Duration::from_secs(60));
            in_flight.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        let wait = stack
            .http
            .post(stack.url("/v1/runs?wait=60"))
            .bearer_auth(DEMO_KEY)
            .header("Idempotency-Key", "held")
            .json(&sample_run())
            .timeout(Duration::from_secs(60));
        in_flight.spawn(async move { wait.send().await.map(|r| r.status()) });
        tokio::time::sleep(Duration::from_millis(500)).await;

        let started = Instant::now();
        let gateway = stack.gateway.as_mut().expect("gateway");
        gateway.terminate();
        let status = gateway.wait_exit(Duration::from_secs(15)).await;
        eprintln!(
            "stalled={stalled}: exited {status:?} after {:?}",
            started.elapsed()
        );
        assert!(
            status.is_some() && started.elapsed() < Duration::from_secs(9),
            "stalled={stalled}: exit {status:?} after {:?}; stdout {:?}",
            started.elapsed(),
            gateway.stdout()
        );
        while in_flight.join_next().await.is_some() {}
        let _ = waiting;
        if stalled {
            stack.nats.resume();
        }
    }
}

/// Item 2: a report about a run the store does not know is a component error
/// (WARN + `component_errors_total`), not a stale event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_for_an_unknown_run_is_a_component_error() {
    let (mut stack, _db) = bare_stack(StoreKind::Sqlite).await;
    stack.start(Component::Gateway).await;
    let client = async_nats::connect(stack.nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let event = wire::events::RunEvent {
        run_id: wire::ids::RunId::generate(uuid::Uuid::now_v7()),
        tenant_id: wire::ids::TenantId::parse("demo").expect("tenant"),
        status: wire::run::RunStatus::Succeeded,
        provider: None,
        steps: Vec::new(),
        error: None,
        at: time::OffsetDateTime::now_utc(),
    };
    js.publish(wire::events::SUBJECT, event.encode())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let metrics = testkit::eventually(Duration::from_secs(15), "the error counted", || async {
        let metrics = stack.scrape(Component::Gateway).await;
        metrics
            .contains("component_errors_total{component=\"gateway\",error_code=\"unknown_run\"} 1")
            .then_some(metrics)
    })
    .await;
    assert!(!metrics.contains("result=\"stale\""), "{metrics}");
    let logged = stack.process(Component::Gateway).stdout();
    let line = logged
        .iter()
        .find(|l| l.contains("unknown_run"))
        .expect("a log line");
    assert!(line.contains("\"WARN\""), "{line}");
}
