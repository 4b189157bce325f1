//! Each block against a real counterpart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::json;
use sqlx::Connection;

use crate::support::{run_to_end, spans_named, stack_with};

#[derive(Clone, Default)]
struct Seen {
    traceparents: Arc<Mutex<Vec<String>>>,
    flaky_hits: Arc<Mutex<u32>>,
}

/// An HTTP server on loopback that records the `traceparent` it receives.
async fn upstream() -> (u16, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route(
            "/echo",
            get(|axum::extract::State(seen): axum::extract::State<Seen>, headers: HeaderMap| async move {
                let traceparent = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.traceparents.lock().expect("lock").push(traceparent);
                axum::Json(json!({"hello": "world"}))
            }),
        )
        .route(
            "/unavailable",
            get(|axum::extract::State(seen): axum::extract::State<Seen>| async move {
                *seen.flaky_hits.lock().expect("lock") += 1;
                StatusCode::SERVICE_UNAVAILABLE
            }),
        )
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_injects_traceparent_and_retries_only_retryable_failures() {
    let (port, seen) = upstream().await;
    let allow = format!("127.0.0.1:{port}");
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", allow.as_str())]).await;

    let (run_id, trace_id, run) = run_to_end(
        &stack,
        json!([{"id": "call", "type": "http", "input": {"url": format!("http://127.0.0.1:{port}/echo?token=s3cr3t")}}]),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"]["status"], 200);
    assert_eq!(run["steps"][0]["output"]["body"]["hello"], "world");

    // The upstream saw the run's trace, with the worker's CLIENT span as parent.
    let received = seen.traceparents.lock().expect("lock").clone();
    assert_eq!(received.len(), 1);
    let parts: Vec<&str> = received[0].split('-').collect();
    assert_eq!(parts[1], trace_id);
    // 2 gateway + 5 router + worker (process, step, GET, 2 reports) + 2 gateway.
    let spans = stack
        .otlp
        .wait_for_trace(&trace_id, 14, Duration::from_secs(15))
        .await;
    let client = spans
        .iter()
        .find(|s| s.name == "GET")
        .expect("the http client span");
    assert_eq!(client.kind, "client");
    assert_eq!(client.span_id, parts[2]);
    assert_eq!(client.attr("http.request.method"), Some("GET"));
    assert_eq!(client.attr("http.response.status_code"), Some("200"));
    assert_eq!(client.attr("server.address"), Some("127.0.0.1"));
    let url = client.attr("url.full").expect("url.full");
    assert!(
        url.contains("token=[REDACTED]") && !url.contains("s3cr3t"),
        "{url}"
    );
    let step = spans_named(&stack, "worker.step.execute", &run_id)
        .pop()
        .expect("step span");
    assert_eq!(
        client.parent_span_id.as_deref(),
        Some(step.span_id.as_str())
    );

    // 503 is retried up to max_attempts, each attempt its own span.
    let (run_id, _, run) = run_to_end(
        &stack,
        json!([{"id": "flaky", "type": "http", "input": {"url": format!("http://127.0.0.1:{port}/unavailable")},
                "retry": {"max_attempts": 3, "backoff_ms": 10, "max_backoff_ms": 20}}]),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["steps"][0]["attempts"], 3);
    assert_eq!(run["steps"][0]["error"], "HTTP 503");
    assert_eq!(*seen.flaky_hits.lock().expect("lock"), 3);
    let attempts = testkit::eventually(Duration::from_secs(10), "three attempt spans", || async {
        let mut spans = spans_named(&stack, "worker.step.execute", &run_id);
        (spans.len() == 3).then(|| {
            spans.sort_by_key(|s| s.attr("attempt").unwrap_or("").to_owned());
            spans
        })
    })
    .await;
    for (span, n) in attempts.iter().zip(["1", "2", "3"]) {
        assert_eq!(span.attr("attempt"), Some(n));
        assert_eq!(span.status_code, 2);
    }
    let metrics = stack.scrape(testkit::stack::Component::Worker).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("worker_step_retries_total{")
                && l.contains("reason=\"http_status\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );

    // A 404 is not retried; a host outside WORKER_HTTP_ALLOW is refused.
    let (_, _, run) = run_to_end(
        &stack,
        json!([{"id": "gone", "type": "http", "input": {"url": format!("http://127.0.0.1:{port}/missing")}, "retry": {"max_attempts": 3}}]),
    )
    .await;
    assert_eq!(run["steps"][0]["attempts"], 1);
    assert_eq!(run["steps"][0]["error"], "HTTP 404");
    let (_, _, run) = run_to_end(
        &stack,
        json!([{"id": "out", "type": "http", "input": {"url": "http://example.com/"}, "retry": {"max_attempts": 3}}]),
    )
    .await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["steps"][0]["attempts"], 1);
    assert!(
        run["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("WORKER_HTTP_ALLOW")),
        "{run}"
    );
}

async fn sql_round_trip(stack: &testkit::stack::Stack, table: &str) {
    let (run_id, trace_id, run) = run_to_end(
        stack,
        json!([
            {"id": "add", "type": "sql", "input": {"query": format!("INSERT INTO {table} (id, name) VALUES ($1, $2)"), "params": [3, "carol"], "write": true}},
            {"id": "read", "type": "sql", "input": {"query": format!("SELECT id, name FROM {table} WHERE name <> 'top-secret-literal' AND id >= $1 ORDER BY id"), "params": [2]}}
        ]),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"]["rows_affected"], 1);
    assert_eq!(
        run["steps"][1]["output"]["rows"],
        json!([{"id": 2, "name": "bob"}, {"id": 3, "name": "carol"}])
    );

    let spans = stack
        .otlp
        .wait_for_trace(&trace_id, 16, Duration::from_secs(15))
        .await;
    let select = spans
        .iter()
        .find(|s| s.name == format!("SELECT {table}"))
        .unwrap_or_else(|| {
            panic!(
                "no SELECT span for {run_id}: {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(select.kind, "client");
    assert_eq!(select.attr("db.operation.name"), Some("SELECT"));
    assert_eq!(select.attr("db.collection.name"), Some(table));
    let text = select.attr("db.query.text").expect("query text");
    assert!(
        !text.contains("top-secret-literal") && text.contains("name <> ?"),
        "{text}"
    );
    let insert = spans
        .iter()
        .find(|s| s.name == format!("INSERT {table}"))
        .expect("INSERT span");
    for span in [select, insert] {
        for value in span.attributes.values() {
            assert!(
                !value.contains("carol"),
                "a parameter value reached a span: {value}"
            );
        }
    }

    // A write the step did not declare is refused, nothing changes.
    let (_, _, run) = run_to_end(
        stack,
        json!([{"id": "sneaky", "type": "sql", "input": {"query": format!("DELETE FROM {table}")}}]),
    )
    .await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("write")),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_on_sqlite_with_sanitized_spans() {
    let mut stack = testkit::stack::Stack::new().await;
    stack
        .extra_env
        .insert("WORKER_SQL_ALLOW_WRITES".into(), "true".into());
    let url = format!(
        "sqlite://{}?mode=rwc",
        stack.worker_database_path().display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    for statement in [
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        "INSERT INTO people (id, name) VALUES (1, 'alice'), (2, 'bob')",
    ] {
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect("setup");
    }
    for component in [
        testkit::stack::Component::Gateway,
        testkit::stack::Component::Router,
        testkit::stack::Component::Worker,
    ] {
        stack.start(component).await;
    }
    sql_round_trip(&stack, "people").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_on_postgres_with_sanitized_spans() {
    // scripts/test.sh makes sure PostgreSQL runs and sets TEST_DATABASE_URL.
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let table = format!("people_{}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {url} ({e}); run the tests through scripts/test.sh")
    });
    for statement in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL)"),
        format!("INSERT INTO {table} (id, name) VALUES (1, 'alice'), (2, 'bob')"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect("setup");
    }
    let mut stack = testkit::stack::Stack::new().await;
    stack
        .extra_env
        .insert("WORKER_SQL_ALLOW_WRITES".into(), "true".into());
    stack
        .extra_env
        .insert("WORKER_DATABASE_URL".into(), url.clone());
    for component in [
        testkit::stack::Component::Gateway,
        testkit::stack::Component::Router,
        testkit::stack::Component::Worker,
    ] {
        stack.start(component).await;
    }
    sql_round_trip(&stack, &table).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&mut conn)
        .await
        .expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_steps_stay_inside_the_sandbox() {
    let stack = stack_with(&[]).await;
    let (_, _, run) = run_to_end(
        &stack,
        json!([
            {"id": "w", "type": "fs", "input": {"op": "write", "path": "out/report.txt", "content": "all good"}},
            {"id": "r", "type": "fs", "input": {"op": "read", "path": "out/report.txt"}},
            {"id": "l", "type": "fs", "input": {"op": "list", "path": "out"}}
        ]),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"]["content"], "all good");
    assert_eq!(
        run["steps"][2]["output"]["entries"][0]["name"],
        "report.txt"
    );
    assert_eq!(
        std::fs::read_to_string(stack.sandbox_path().join("out/report.txt")).expect("file on disk"),
        "all good"
    );

    let (_, _, run) = run_to_end(
        &stack,
        json!([{"id": "escape", "type": "fs", "input": {"op": "read", "path": "../gateway.db"}, "retry": {"max_attempts": 3}}]),
    )
    .await;
    assert_eq!(run["status"], "failed");
    assert_eq!(
        run["steps"][0]["attempts"], 1,
        "a sandbox violation is not retried"
    );
    assert!(
        run["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("..")),
        "{run}"
    );
}
