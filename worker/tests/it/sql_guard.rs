//! `sql` steps against the attacks of the security review, on SQLite and
//! PostgreSQL through the real three processes, and the column types a step
//! returns on each.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;
use testkit::stack::{ACME_KEY, Component, Stack};

use crate::support::run_to_end;

async fn stack(env: &[(&str, String)]) -> Stack {
    let mut stack = Stack::new().await;
    for (key, value) in env {
        stack.extra_env.insert((*key).to_owned(), value.clone());
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    stack
}

fn sql(query: &str, write: bool) -> Value {
    json!([{"id": "q", "type": "sql", "input": {"query": query, "write": write}}])
}

fn error_of(run: &Value) -> String {
    run["steps"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stacked_statements_attach_and_vacuum_into_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("worker.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    for statement in [
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        "INSERT INTO items (id, name) VALUES (1, 'one'), (2, 'two')",
    ] {
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect("setup");
    }
    // Writes are allowed for this worker: the guard must not depend on them being off.
    let stack = stack(&[
        ("WORKER_DATABASE_URL", url.clone()),
        ("WORKER_SQL_ALLOW_WRITES", "true".to_owned()),
    ])
    .await;
    let evil = dir.path().join("evil.db");
    let copy = dir.path().join("copy.db");
    for (query, write) in [
        ("SELECT 1; COMMIT; DELETE FROM items WHERE id = 1", false),
        ("SELECT 1; COMMIT; DELETE FROM items WHERE id = 1", true),
        (
            &format!(
                "SELECT 1; COMMIT; ATTACH DATABASE '{}' AS z; CREATE TABLE z.t(x)",
                evil.display()
            ),
            false,
        ),
        (&format!("ATTACH DATABASE '{}' AS z", evil.display()), true),
        (
            &format!("SELECT 1; COMMIT; VACUUM INTO '{}'", copy.display()),
            false,
        ),
        (&format!("VACUUM INTO '{}'", copy.display()), true),
        ("PRAGMA writable_schema = ON", true),
        ("SELECT 1; PRAGMA journal_mode = DELETE", false),
        ("SELECT ';'; DELETE FROM items", false),
    ] {
        let (_, _, run) = run_to_end(&stack, sql(query, write)).await;
        assert_eq!(run["status"], "failed", "{query}: {run}");
        let error = error_of(&run);
        assert!(
            error.contains("exactly one statement") || error.contains("not allowed"),
            "{query}: {error}"
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(left, 2, "a refused step deleted rows");
    assert!(!evil.exists(), "ATTACH created {}", evil.display());
    assert!(!copy.exists(), "VACUUM INTO wrote {}", copy.display());

    // A read cannot write, whatever it is called: the connection is read-only.
    let (_, _, run) = run_to_end(&stack, sql("SELECT count(*) AS n FROM items", false)).await;
    assert_eq!(
        run["steps"][0]["output"]["rows"],
        json!([{"n": 2}]),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_columns_come_back_typed() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("worker.db").display()
    );
    drop(sqlx::SqliteConnection::connect(&url).await.expect("create"));
    let stack = stack(&[("WORKER_DATABASE_URL", url)]).await;
    let (_, _, run) = run_to_end(
        &stack,
        sql(
            "SELECT 1 AS i, 12.5 AS n, 'x' AS s, datetime('2024-01-02 03:04:05') AS ts, \
             date('2024-01-02') AS d, json_object('a', json_array(1, 2)) AS j, x'cafe' AS blob, NULL AS z",
            false,
        ),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["steps"][0]["output"]["rows"][0],
        json!({"i": 1, "n": 12.5, "s": "x", "ts": "2024-01-02 03:04:05", "d": "2024-01-02",
               "j": "{\"a\":[1,2]}", "blob": "cafe", "z": null})
    );
}

/// A fresh PostgreSQL database for one test.
async fn pg_database(name: &str) -> (String, sqlx::PgConnection) {
    let admin_url = pg_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin_url} ({e}); run the tests through scripts/test.sh")
        });
    let db = format!("{name}_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    let (base, _) = admin_url.rsplit_once('/').expect("a database in the URL");
    let url = format!("{base}/{db}");
    let conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    (url, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_are_read_only_single_statements_and_leave_no_session_state() {
    let (url, mut conn) = pg_database("sqlguard").await;
    sqlx::raw_sql(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
         INSERT INTO items VALUES (1, 'one'), (2, 'two');
         CREATE SEQUENCE ids;",
    )
    .execute(&mut conn)
    .await
    .expect("setup");
    let stack = stack(&[
        ("WORKER_DATABASE_URL", url),
        ("WORKER_SQL_ALLOW_WRITES", "true".to_owned()),
    ])
    .await;
    for query in [
        "SELECT 1; COMMIT; DELETE FROM items WHERE id = 1",
        "SELECT $$;$$; DELETE FROM items",
        "SELECT 1; SET statement_timeout = 0",
    ] {
        let (_, _, run) = run_to_end(&stack, sql(query, false)).await;
        assert_eq!(run["status"], "failed", "{query}: {run}");
        assert!(error_of(&run).contains("exactly one statement"), "{run}");
    }
    for (query, write) in [
        ("COPY items TO PROGRAM 'id'", true),
        ("DO $$ BEGIN DELETE FROM items; END $$", true),
        ("SET statement_timeout = 0", false),
        ("COMMIT", true),
    ] {
        let (_, _, run) = run_to_end(&stack, sql(query, write)).await;
        assert_eq!(run["status"], "failed", "{query}: {run}");
        assert!(error_of(&run).contains("not allowed"), "{query}: {run}");
    }
    // The transaction is READ ONLY: a data-modifying CTE and nextval fail.
    for query in [
        "WITH d AS (DELETE FROM items WHERE id = 1 RETURNING id) SELECT * FROM d",
        "SELECT nextval('ids')",
    ] {
        let (_, _, run) = run_to_end(&stack, sql(query, false)).await;
        assert_eq!(run["status"], "failed", "{query}: {run}");
        assert!(error_of(&run).contains("read-only"), "{query}: {run}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(left, 2);
    let next: i64 = sqlx::query_scalar("SELECT nextval('ids')")
        .fetch_one(&mut conn)
        .await
        .expect("nextval");
    assert_eq!(next, 1, "a read step advanced the sequence");

    // A session-level advisory lock does not outlive the step (DISCARD ALL).
    let (_, _, run) = run_to_end(&stack, sql("SELECT pg_advisory_lock(4242)", false)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // The pool releases the connection just after the step reports.
    let mut free = false;
    for _ in 0..50 {
        free = sqlx::query_scalar("SELECT pg_try_advisory_lock(4242)")
            .fetch_one(&mut conn)
            .await
            .expect("try lock");
        if free {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        free,
        "a step's session-level advisory lock is still held by the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pg_sleep_of_one_tenant_does_not_starve_another() {
    let (url, mut conn) = pg_database("sqlstarve").await;
    let stack = stack(&[
        ("WORKER_DATABASE_URL", url),
        // Long enough for four runs to overlap on a loaded machine, far below 20 s.
        ("WORKER_SQL_TIMEOUT_MS", "8000".to_owned()),
    ])
    .await;
    // Tenant demo takes every pooled connection (4) with a 20 s sleep.
    let mut sleepers = Vec::new();
    for _ in 0..4 {
        let accepted = stack
            .submit_ok(&json!({"flow_id": "sleep", "steps": sql("SELECT pg_sleep(20)", false)}))
            .await;
        sleepers.push(accepted["run_id"].as_str().expect("id").to_owned());
    }
    // Until the four sleeps hold the pool's four connections.
    let mut sleeping = 0;
    for _ in 0..600 {
        sleeping = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'SELECT pg_sleep(20)' AND state = 'active'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
        if sleeping == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sleeping, 4, "the four sleeps never held the pool");
    // Tenant acme's read still gets a connection.
    let response = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(ACME_KEY)
        .json(&json!({"flow_id": "quick", "steps": sql("SELECT 1 AS one", false)}))
        .send()
        .await
        .expect("POST");
    let accepted: Value = response.json().await.expect("JSON");
    let run_id = accepted["run_id"].as_str().expect("id").to_owned();
    let run = testkit::eventually(Duration::from_secs(30), "acme's run ends", || async {
        let run: Value = stack
            .get_run_as(ACME_KEY, &run_id)
            .await
            .json()
            .await
            .expect("JSON");
        matches!(run["status"].as_str(), Some("succeeded" | "failed")).then_some(run)
    })
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"]["rows"], json!([{"one": 1}]));
    // The sleeps were cut at the step timeout, not after 20 s.
    for id in &sleepers {
        let run = stack.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "failed", "{run}");
        assert!(error_of(&run).contains("WORKER_SQL_TIMEOUT_MS"), "{run}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_columns_come_back_typed() {
    let (url, _conn) = pg_database("sqltypes").await;
    let stack = stack(&[("WORKER_DATABASE_URL", url)]).await;
    let (_, _, run) = run_to_end(
        &stack,
        sql(
            "SELECT 12.50::numeric AS n, (-0.000123)::numeric AS small, 123456789012345678901234567890::numeric AS big, \
             '2024-01-02 03:04:05.25+02'::timestamptz AS ts, '2024-01-02 03:04:05'::timestamp AS local_ts, \
             '2024-02-29'::date AS d, '13:14:15.5'::time AS t, \
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '{\"a\": [1, 2]}'::jsonb AS j, \
             '{\"b\": true}'::json AS js, 'pg_class'::name AS nm, 7::int2 AS i2, 8::int4 AS i4, 9::int8 AS i8, \
             2.5::float8 AS f, true AS b, 'x'::varchar AS v, NULL::text AS z",
            false,
        ),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["steps"][0]["output"]["rows"][0],
        json!({"n": "12.50", "small": "-0.000123", "big": "123456789012345678901234567890",
               "ts": "2024-01-02T01:04:05.25Z", "local_ts": "2024-01-02T03:04:05", "d": "2024-02-29",
               "t": "13:14:15.5", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": {"a": [1, 2]},
               "js": {"b": true}, "nm": "pg_class", "i2": 7, "i4": 8, "i8": 9, "f": 2.5, "b": true,
               "v": "x", "z": null})
    );
    // A type without a conversion says how to get it.
    let (_, _, run) = run_to_end(&stack, sql("SELECT interval '1 day' AS i", false)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(error_of(&run).contains("i::text"), "{run}");
}
