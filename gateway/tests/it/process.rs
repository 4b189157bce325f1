//! Process behaviour of the three binaries: a bad setting stops the process
//! with one line naming the variable; SIGTERM stops it promptly and cleanly.

use std::collections::HashMap;
use std::time::Duration;

use testkit::service::ServiceProcess;

use testkit::stack::{Component, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_setting_stops_the_process_naming_the_variable() {
    let cases = [
        ("gateway", "GATEWAY_LISTEN_ADDR", "not-an-address"),
        ("gateway", "GATEWAY_API_KEYS", "no-colon-here"),
        ("gateway", "DATABASE_URL", "mysql://nope"),
        ("router", "ROUTER_ADMIN_ADDR", "300.1.1.1:9"),
        ("worker", "WORKER_CONCURRENCY", "many"),
        ("worker", "WORKER_PROVIDERS", "a.b"),
        ("worker", "CP2_OBSERVABILITY_TRACING_ENABLED", "perhaps"),
        ("router", "LOG_FORMAT", "xml"),
        ("gateway", "OTEL_EXPORTER_OTLP_ENDPOINT", "localhost 4317"),
    ];
    for (binary, var, value) in cases {
        let env = HashMap::from([(var.to_owned(), value.to_owned())]);
        let mut process = ServiceProcess::spawn(binary, &env);
        let status = process
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exits");
        assert_eq!(status.code(), Some(2), "{binary} with {var}={value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stderr = process.stderr();
        assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
        assert!(stderr[0].contains(var), "{stderr:?} should name {var}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_each_service_promptly() {
    let mut stack = Stack::full().await;
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        let process = match component {
            Component::Gateway => stack.gateway.as_mut(),
            Component::Router => stack.router.as_mut(),
            Component::Worker => stack.worker.as_mut(),
        }
        .expect("started");
        process.terminate();
        let status = process
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exits within 10 s");
        assert!(
            status.success(),
            "{} exited with {status}",
            component.name()
        );
        let stopped = process
            .stdout()
            .iter()
            .any(|l| l.contains(&format!("{} stopped", component.name())));
        assert!(stopped, "{} logged its stop", component.name());
    }
}
