//! Helpers shared by the router's integration tests.

use std::time::Duration;

use prometheus_parse::{Scrape, Value as Metric};
use serde_json::Value;
use testkit::otlp::CollectedSpan;
use testkit::stack::{Component, Stack};

/// `message` as a gRPC request carrying the stack's `ROUTER_GRPC_TOKEN`.
pub fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", testkit::stack::ROUTER_GRPC_TOKEN)
            .parse()
            .expect("metadata"),
    );
    request
}

/// Writes `text` as `name` in the stack's directory and points `var` at it.
pub fn file_setting(stack: &mut Stack, var: &str, name: &str, text: &str) -> std::path::PathBuf {
    let path = stack.dir.path().join(name);
    std::fs::write(&path, text).expect("write file");
    stack
        .extra_env
        .insert(var.to_owned(), path.display().to_string());
    path
}

/// The value of the sample of `name` whose labels include `labels`.
pub fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Scrapes the component until `name{labels}` equals `want`.
pub async fn wait_metric(
    stack: &Stack,
    component: Component,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) {
    let mut last = None;
    for _ in 0..100 {
        let body = stack.scrape(component).await;
        last = sample(&body, name, labels);
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name}{labels:?} = {last:?}, expected {want}");
}

/// Polls `GET /v1/runs/{id}` with `key` until the run is terminal.
pub async fn wait_terminal_as(stack: &Stack, key: &str, run_id: &str) -> Value {
    testkit::eventually(Duration::from_secs(20), "a terminal run", || async {
        let run: Value = stack
            .get_run_as(key, run_id)
            .await
            .json()
            .await
            .expect("run JSON");
        matches!(
            run["status"].as_str(),
            Some("succeeded" | "failed" | "rejected" | "timed_out")
        )
        .then_some(run)
    })
    .await
}

/// The spans of `trace_id` once `ready` holds for them.
pub async fn trace_where(
    stack: &Stack,
    trace_id: &str,
    ready: impl Fn(&[CollectedSpan]) -> bool,
) -> Vec<CollectedSpan> {
    testkit::eventually(Duration::from_secs(20), "the trace's spans", || async {
        let spans: Vec<CollectedSpan> = stack
            .otlp
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        ready(&spans).then_some(spans)
    })
    .await
}

pub fn named<'a>(spans: &'a [CollectedSpan], name: &str) -> Vec<&'a CollectedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

pub fn by_id<'a>(spans: &'a [CollectedSpan], id: Option<&str>) -> Option<&'a CollectedSpan> {
    spans.iter().find(|s| Some(s.span_id.as_str()) == id)
}
