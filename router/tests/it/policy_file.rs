//! The policy file: refused at start with the line and field at fault,
//! reloaded on SIGHUP, a bad reload keeping the policy in force.

use std::collections::HashMap;
use std::time::Duration;

use router::grpc::{DecideRequest, RouterClient};
use testkit::service::ServiceProcess;
use testkit::stack::{Component, Stack};

use crate::support::{authed, file_setting, wait_metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_file_stops_the_router_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "default:\n  providers:\n    - name: a\n      weight: 1\n  stiky: true\n",
    )
    .expect("write");
    let env: HashMap<String, String> = [
        ("ROUTER_POLICY_FILE".to_owned(), path.display().to_string()),
        ("NATS_URL".to_owned(), "nats://127.0.0.1:1".to_owned()),
    ]
    .into();
    let mut router = ServiceProcess::spawn("router", &env);
    let status = router
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert_eq!(status.code(), Some(2));
    // The output reader may still be draining the pipe when exit is seen.
    let stderr = testkit::eventually(Duration::from_secs(5), "the error line", || {
        let lines = router.stderr();
        async move { (!lines.is_empty()).then(|| lines.join("\n")) }
    })
    .await;
    assert!(stderr.contains("ROUTER_POLICY_FILE"), "{stderr}");
    assert!(
        stderr.contains("default: unknown field `stiky`"),
        "{stderr}"
    );
    assert!(stderr.contains("line 5"), "{stderr}");
}

fn policy(provider: &str) -> String {
    format!("default:\n  providers: [{{name: {provider}, weight: 1}}]\n")
}

async fn provider_now(endpoint: &str) -> String {
    let mut client = RouterClient::connect(endpoint.to_owned())
        .await
        .expect("connect");
    client
        .decide(authed(DecideRequest {
            tenant_id: "demo".to_owned(),
            flow_id: "f".to_owned(),
            steps_json: r#"[{"id":"a","type":"noop"}]"#.to_owned(),
            provider: None,
            run_id: String::new(),
        }))
        .await
        .expect("decide")
        .into_inner()
        .provider
}

fn hangup(stack: &Stack) {
    let pid = stack.process(Component::Router).pid().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_file_and_keeps_the_policy_on_a_bad_one() {
    let mut stack = Stack::new().await;
    let path = file_setting(
        &mut stack,
        "ROUTER_POLICY_FILE",
        "policy.yaml",
        &policy("green"),
    );
    stack.start(Component::Router).await;
    let endpoint = format!("http://127.0.0.1:{}", stack.ports.router_grpc);
    assert_eq!(provider_now(&endpoint).await, "green");

    let reloads = "router_policy_reloads_total";
    std::fs::write(
        &path,
        "default:\n  providers:\n    - {name: blue, weight: 0}\n",
    )
    .expect("write");
    hangup(&stack);
    wait_metric(
        &stack,
        Component::Router,
        reloads,
        &[("result", "error")],
        1.0,
    )
    .await;
    assert_eq!(
        provider_now(&endpoint).await,
        "green",
        "the old policy stays"
    );
    let logs = stack.process(Component::Router).stdout().join("\n");
    assert!(
        logs.contains("policy reload refused") && logs.contains("line 3"),
        "{logs}"
    );

    std::fs::write(&path, policy("blue")).expect("write");
    hangup(&stack);
    wait_metric(&stack, Component::Router, reloads, &[("result", "ok")], 1.0).await;
    assert_eq!(provider_now(&endpoint).await, "blue");
}
