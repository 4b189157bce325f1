//! `http` steps against the attacks of the security review: internal services
//! on loopback, bare allowlist entries, names that resolve to internal
//! addresses, framing headers, and baggage leaking to the upstream.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::any;
use serde_json::{Value, json};

use crate::support::{run_to_end, stack_with};

/// Every request's headers, as the upstream saw them.
type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// An "internal service" on loopback that records what reaches it.
async fn internal_service() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/{*path}",
            any(
                |axum::extract::State(seen): axum::extract::State<Seen>, headers: HeaderMap| async move {
                    seen.lock().expect("lock").push(
                        headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned())
                            })
                            .collect(),
                    );
                    axum::Json(json!({"internal": "data"}))
                },
            ),
        )
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

fn call(url: String, headers: Value) -> Value {
    json!([{"id": "call", "type": "http", "input": {"url": url, "headers": headers}, "retry": {"max_attempts": 3, "backoff_ms": 10}}])
}

fn assert_refused(run: &Value, code_hint: &str) {
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        run["steps"][0]["attempts"], 1,
        "a refusal is not retried: {run}"
    );
    let error = run["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains(code_hint), "{code_hint:?} not in {error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_default_allowlist_refuses_loopback_services() {
    let (port, seen) = internal_service().await;
    let stack = stack_with(&[]).await;
    for url in [
        format!("http://127.0.0.1:{port}/connz"),
        format!("http://localhost:{port}/jsz"),
        format!("http://[::1]:{port}/admin"),
        format!("http://127.0.0.1:{}/v1/runs", stack.ports.api),
    ] {
        let (_, _, run) = run_to_end(&stack, call(url, json!({}))).await;
        assert_refused(&run, "WORKER_HTTP_ALLOW");
    }
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_entry_without_port_allows_only_the_default_port() {
    let (port, seen) = internal_service().await;
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", "127.0.0.1")]).await;
    let (_, _, run) = run_to_end(
        &stack,
        call(format!("http://127.0.0.1:{port}/internal"), json!({})),
    )
    .await;
    assert_refused(&run, "is not in WORKER_HTTP_ALLOW");
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_name_resolving_to_loopback_is_refused_unless_the_address_is_listed() {
    let (port, seen) = internal_service().await;
    let allow = format!("localhost:{port}");
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", allow.as_str())]).await;
    // The name is allowed; the address it resolves to (loopback) is not.
    let (_, _, run) = run_to_end(
        &stack,
        call(format!("http://localhost:{port}/internal"), json!({})),
    )
    .await;
    assert_refused(&run, "not a public address");
    assert!(seen.lock().expect("lock").is_empty());

    // Listing the loopback address itself makes it reachable.
    let allow = format!("localhost:{port},127.0.0.1/32,::1");
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", allow.as_str())]).await;
    let (_, _, run) = run_to_end(
        &stack,
        call(format!("http://localhost:{port}/internal"), json!({})),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(seen.lock().expect("lock").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_step_headers_cannot_set_host_or_framing() {
    let (port, seen) = internal_service().await;
    let allow = format!("127.0.0.1:{port}");
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", allow.as_str())]).await;
    for (name, value) in [
        ("Host", "gateway.internal"),
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "upgrade"),
    ] {
        let (_, _, run) = run_to_end(
            &stack,
            call(
                format!("http://127.0.0.1:{port}/internal"),
                json!({ name: value }),
            ),
        )
        .await;
        assert_refused(&run, "may not set");
    }
    assert!(
        seen.lock().expect("lock").is_empty(),
        "{:?}",
        seen.lock().expect("lock")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_never_sees_client_baggage_or_the_tenant() {
    let (port, seen) = internal_service().await;
    let allow = format!("127.0.0.1:{port}");
    let stack = stack_with(&[("WORKER_HTTP_ALLOW", allow.as_str())]).await;
    let response = stack
        .submit(&json!({"flow_id": "baggage", "steps": [
            {"id": "call", "type": "http", "input": {"url": format!("http://127.0.0.1:{port}/hook")}}
        ]}))
        .header("baggage", "password=hunter2,session=s3cr3t-session")
        .send()
        .await
        .expect("POST");
    let accepted: Value = response.json().await.expect("JSON");
    let run_id = accepted["run_id"].as_str().expect("run_id");
    let run = stack
        .wait_terminal(run_id, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0];
    assert!(
        headers.iter().any(|(k, _)| k == "traceparent"),
        "{headers:?}"
    );
    for (name, value) in headers {
        assert_ne!(name, "baggage", "baggage reached the upstream: {value}");
        for secret in ["hunter2", "s3cr3t-session", "tenant", "demo"] {
            assert!(
                !value.contains(secret),
                "{secret:?} reached the upstream in {name}: {value}"
            );
        }
    }
}
