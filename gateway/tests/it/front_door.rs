//! Issue-3 behaviour of the gateway: rate limits, idempotency, `?wait=`,
//! listing, OpenAPI — on SQLite and on PostgreSQL.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::stack::{ACME_KEY, Component, DEMO_KEY, Stack, sample_run};

/// Which run store the gateway uses.
#[derive(Clone, Copy, Debug)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// A fresh PostgreSQL database on the test server, dropped by the guard.
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        // scripts/test.sh makes sure PostgreSQL runs and sets TEST_DATABASE_URL.
        let admin_url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("beamline_it_{}_{}", std::process::id(), fastrand::u32(..));
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {admin_url}: {e}; run the tests through scripts/test.sh")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        Self {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }

    pub async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

async fn stack(store: StoreKind, extra: &[(&str, &str)]) -> (Stack, Option<PgDatabase>) {
    let mut stack = Stack::new().await;
    let db = match store {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => {
            let db = PgDatabase::create().await;
            stack
                .extra_env
                .insert("DATABASE_URL".into(), db.url.clone());
            Some(db)
        }
    };
    for (k, v) in extra {
        stack.extra_env.insert((*k).into(), (*v).into());
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    (stack, db)
}

async fn error(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("error JSON");
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn idempotency_list_and_wait(store: StoreKind) {
    let (mut stack, db) = stack(store, &[]).await;

    // Same key + same body (even reformatted) → the same run, one publish.
    let first = stack
        .submit(&sample_run())
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .expect("POST");
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.expect("JSON");
    let reordered = json!({"steps": sample_run()["steps"], "flow_id": "hello"});
    let again = stack
        .submit(&reordered)
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .expect("POST");
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let again: Value = again.json().await.expect("JSON");
    assert_eq!(again["run_id"], first["run_id"]);

    // Same key, other body → 422; an invalid key → 400.
    let other = json!({"flow_id": "other", "steps": [{"id": "x", "type": "noop"}]});
    let response = stack
        .submit(&other)
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .expect("POST");
    assert_eq!(
        error(response).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused".into()
        )
    );
    let response = stack
        .submit(&other)
        .header("Idempotency-Key", "k".repeat(256))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        error(response).await,
        (StatusCode::BAD_REQUEST, "invalid_field".into())
    );
    // Keys are per tenant.
    let acme = stack
        .http
        .post(stack.url("/v1/runs"))
        .bearer_auth(ACME_KEY)
        .header("Idempotency-Key", "order-1")
        .json(&sample_run())
        .send()
        .await
        .expect("POST");
    let acme: Value = acme.json().await.expect("JSON");
    assert_ne!(acme["run_id"], first["run_id"]);

    // 20 concurrent identical requests create exactly one run.
    let body = json!({"flow_id": "concurrent", "steps": [{"id": "a", "type": "noop"}]});
    let requests = (0..20).map(|_| {
        stack
            .submit(&body)
            .header("Idempotency-Key", "burst-1")
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.expect("POST");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let json: Value = response.json().await.expect("JSON");
        ids.insert(json["run_id"].as_str().expect("run_id").to_owned());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let listed: Value = stack
        .http
        .get(stack.url("/v1/runs?limit=100"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    let concurrent = listed["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["flow_id"] == "concurrent")
        .count();
    assert_eq!(concurrent, 1);

    let metrics = stack.scrape(Component::Gateway).await;
    for result in ["hit", "miss", "conflict"] {
        assert!(
            metrics.contains(&format!("gateway_idempotency_total{{result=\"{result}\"}}")),
            "{result}: {metrics}"
        );
    }

    // The key survives a gateway restart.
    stack.kill(Component::Gateway).await;
    stack.start(Component::Gateway).await;
    let replay = stack
        .submit(&sample_run())
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .expect("POST");
    let replay: Value = replay.json().await.expect("JSON");
    assert_eq!(replay["run_id"], first["run_id"]);

    let metrics = stack.scrape(Component::Gateway).await;
    assert!(
        metrics.contains("gateway_idempotency_total{result=\"hit\"} 1"),
        "{metrics}"
    );

    // ?wait= answers 200 with the finished run, or 202 with the run so far.
    let done = stack
        .http
        .post(stack.url("/v1/runs?wait=20"))
        .bearer_auth(DEMO_KEY)
        .json(&sample_run())
        .send()
        .await
        .expect("POST");
    assert_eq!(done.status(), StatusCode::OK);
    let done: Value = done.json().await.expect("JSON");
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"].as_array().map(Vec::len), Some(2));
    let slow =
        json!({"flow_id": "slow", "steps": [{"id": "d", "type": "delay", "input": {"ms": 3000}}]});
    let began = std::time::Instant::now();
    let pending = stack
        .http
        .post(stack.url("/v1/runs?wait=1"))
        .bearer_auth(DEMO_KEY)
        .json(&slow)
        .send()
        .await
        .expect("POST");
    assert_eq!(pending.status(), StatusCode::ACCEPTED);
    assert!(began.elapsed() < Duration::from_millis(2_500));
    let pending: Value = pending.json().await.expect("JSON");
    assert!(
        matches!(
            pending["status"].as_str(),
            Some("accepted" | "routed" | "running")
        ),
        "{pending}"
    );
    assert!(
        pending["steps"].is_array(),
        "the full run so far: {pending}"
    );
    for bad in ["61", "-1", "soon"] {
        let response = stack
            .http
            .post(stack.url(&format!("/v1/runs?wait={bad}")))
            .bearer_auth(DEMO_KEY)
            .json(&sample_run())
            .send()
            .await
            .expect("POST");
        assert_eq!(
            error(response).await,
            (StatusCode::BAD_REQUEST, "invalid_field".into()),
            "wait={bad}"
        );
    }

    // Listing: newest first, paginated, filtered, tenant-scoped.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => stack.url(&format!("/v1/runs?limit=2&cursor={c}")),
            None => stack.url("/v1/runs?limit=2"),
        };
        let page: Value = stack
            .http
            .get(url)
            .bearer_auth(DEMO_KEY)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        let runs = page["runs"].as_array().expect("runs");
        assert!(runs.len() <= 2);
        seen.extend(runs.iter().map(|r| {
            (
                r["created_at"].as_str().unwrap_or("").to_owned(),
                r["run_id"].as_str().unwrap_or("").to_owned(),
            )
        }));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    // order-1, concurrent, wait=20 and wait=1 (the refused ones stored nothing).
    assert_eq!(seen.len(), 4, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    let succeeded: Value = stack
        .http
        .get(stack.url("/v1/runs?status=succeeded"))
        .bearer_auth(DEMO_KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert!(
        succeeded["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .all(|r| r["status"] == "succeeded")
    );
    let theirs: Value = stack
        .http
        .get(stack.url("/v1/runs"))
        .bearer_auth(ACME_KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        theirs["runs"].as_array().map(Vec::len),
        Some(1),
        "acme sees only its own run"
    );
    for query in ["status=nope", "limit=0", "limit=101", "cursor=zz"] {
        let response = stack
            .http
            .get(stack.url(&format!("/v1/runs?{query}")))
            .bearer_auth(DEMO_KEY)
            .send()
            .await
            .expect("GET");
        assert_eq!(
            error(response).await,
            (StatusCode::BAD_REQUEST, "invalid_field".into()),
            "{query}"
        );
    }

    drop(stack);
    if let Some(db) = db {
        db.drop_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_listing_and_wait_on_sqlite() {
    idempotency_list_and_wait(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_listing_and_wait_on_postgres() {
    idempotency_list_and_wait(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_is_429_and_nothing_is_stored() {
    let (stack, _) = stack(StoreKind::Sqlite, &[("GATEWAY_RATE_LIMITS", "demo=0.2:2")]).await;
    for _ in 0..2 {
        assert_eq!(
            stack
                .submit(&sample_run())
                .send()
                .await
                .expect("POST")
                .status(),
            StatusCode::ACCEPTED
        );
    }
    let response = stack.submit(&sample_run()).send().await.expect("POST");
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    assert_eq!(
        error(response).await,
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into())
    );
    // Reads count too; another tenant is unaffected.
    assert_eq!(
        stack.get_run_as(DEMO_KEY, "x").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let acme = stack
        .http
        .get(stack.url("/v1/runs"))
        .bearer_auth(ACME_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(acme.status(), StatusCode::OK);

    let metrics = stack.scrape(Component::Gateway).await;
    assert!(
        metrics.contains("gateway_rate_limited_total{tenant_id=\"demo\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_runs_submitted_total{outcome=\"accepted\"} 2"),
        "{metrics}"
    );
    // The refusal is an event on the request span.
    let limited = testkit::eventually(Duration::from_secs(10), "a 429 server span", || async {
        stack.otlp.spans().into_iter().find(|s| {
            s.name == "POST /v1/runs" && s.attr("http.response.status_code") == Some("429")
        })
    })
    .await;
    assert!(
        limited.events.iter().any(|e| e == "rate limited"),
        "{:?}",
        limited.events
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served() {
    let (stack, _) = stack(StoreKind::Sqlite, &[]).await;
    let doc: Value = stack
        .http
        .get(stack.url("/openapi.json"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1"))
    );
    for (path, methods, _) in gateway::app::api_routes() {
        for method in methods {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
    }
}
