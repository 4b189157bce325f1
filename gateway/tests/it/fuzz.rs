//! Arbitrary bytes as a body, content type, headers or path never produce a
//! 5xx or take the gateway down.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use testkit::stack::{Component, DEMO_KEY, Stack};

#[test]
fn arbitrary_requests_never_get_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stack = runtime.block_on(async {
        let mut stack = Stack::new().await;
        stack
            .extra_env
            .insert("GATEWAY_RATE_LIMIT_RPS".into(), "0".into());
        // Half the cases are unauthenticated on purpose: the failed-auth
        // throttle would answer the final check with 429.
        stack
            .extra_env
            .insert("GATEWAY_AUTH_FAILURE_RPS".into(), "0".into());
        stack.start(Component::Gateway).await;
        stack
    });
    let header_text = "[ -~]{0,40}";
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..600),
        prop_oneof![
            Just("application/json".to_owned()),
            header_text.prop_map(|s| s)
        ],
        header_text,
        header_text,
        "[a-zA-Z0-9%._~-]{0,40}",
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 200,
        ..Config::default()
    });
    runner
        .run(
            &strategy,
            |(body, content_type, traceparent, idempotency_key, segment, authed)| {
                runtime.block_on(async {
                    let mut post = stack
                        .http
                        .post(stack.url("/v1/runs"))
                        .header("content-type", content_type.as_str())
                        .header("traceparent", traceparent.as_str())
                        .header("idempotency-key", idempotency_key.as_str())
                        .body(body.clone());
                    let mut get = stack.http.get(stack.url(&format!("/v1/runs/{segment}")));
                    if authed {
                        post = post.bearer_auth(DEMO_KEY);
                        get = get.bearer_auth(DEMO_KEY);
                    }
                    for request in [post, get] {
                        let response = request.send().await.expect("the gateway answers");
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        prop_assert!(status.as_u16() < 500, "{status}: {text}");
                        if !status.is_success() {
                            let json: serde_json::Value =
                                serde_json::from_str(&text).expect("error bodies are JSON");
                            prop_assert!(json["error"]["code"].is_string(), "{text}");
                        }
                    }
                    Ok(())
                })
            },
        )
        .expect("no 5xx for arbitrary input");
    // Still serving.
    runtime.block_on(async {
        let response = stack
            .submit(&testkit::stack::sample_run())
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 202);
    });
}
