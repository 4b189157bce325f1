//! One run across three processes: the trace tree of DESIGN §3, the metrics on
//! every admin port and the JSON log lines, all read from real artefacts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use prometheus_parse::{Scrape, Value as Metric};
use serde_json::Value;
use testkit::otlp::CollectedSpan;

use testkit::stack::{Component, Stack, sample_run};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn find<'a>(spans: &'a [CollectedSpan], name: &str) -> Vec<&'a CollectedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [CollectedSpan], name: &str) -> &'a CollectedSpan {
    let found = find(spans, name);
    assert_eq!(
        found.len(),
        1,
        "expected one span {name:?}, got {}: {:#?}",
        found.len(),
        spans
    );
    found[0]
}

fn assert_child(child: &CollectedSpan, parent: &CollectedSpan) {
    assert_eq!(
        child.parent_span_id.as_deref(),
        Some(parent.span_id.as_str()),
        "{} should be a child of {}",
        child.name,
        parent.name
    );
}

fn assert_attr(span: &CollectedSpan, key: &str, value: &str) {
    assert_eq!(
        span.attr(key),
        Some(value),
        "{} attribute {key} in {:?}",
        span.name,
        span.attributes
    );
}

fn assert_messaging(span: &CollectedSpan, kind: &str, operation: &str, destination: &str) {
    assert_eq!(span.kind, kind, "{}", span.name);
    assert_attr(span, "messaging.system", "nats");
    assert_attr(span, "messaging.operation.type", operation);
    assert_attr(span, "messaging.destination.name", destination);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_is_one_trace_across_three_processes() {
    let stack = Stack::full().await;

    let response = stack
        .submit(&sample_run())
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 202);
    let returned_traceparent = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("traceparent response header");
    let accepted: Value = response.json().await.expect("JSON");
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["trace_id"], CLIENT_TRACE);
    assert_eq!(
        accepted["trace_url"].as_str(),
        Some(format!("http://localhost:16686/trace/{CLIENT_TRACE}").as_str())
    );
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();

    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["provider"], "default");
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for (step, id) in steps.iter().zip(["a", "b"]) {
        assert_eq!(step["id"], id);
        assert_eq!(step["status"], "succeeded");
        assert_eq!(step["attempts"], 1);
        assert!(
            step["started_at"].is_string() && step["ended_at"].is_string(),
            "{step}"
        );
    }
    assert_eq!(steps[1]["output"]["slept_ms"], 50);

    // 2 gateway request spans, 5 router, 5 worker (2 steps, 2 reports), 2 gateway event spans.
    let spans = stack
        .otlp
        .wait_for_trace(CLIENT_TRACE, 14, Duration::from_secs(20))
        .await;
    assert_eq!(
        spans.len(),
        14,
        "{:#?}",
        spans
            .iter()
            .map(|s| (&s.service, &s.name))
            .collect::<Vec<_>>()
    );

    // Every span but the server span hangs off another span of the trace; the
    // server span's parent is the client's span. No orphans.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        let parent = span
            .parent_span_id
            .as_deref()
            .expect("no root span inside the services");
        if span.name == "POST /v1/runs" {
            assert_eq!(parent, CLIENT_SPAN);
        } else {
            assert!(
                ids.contains(parent),
                "orphan span {} (parent {parent})",
                span.name
            );
        }
        // Correlation fields on every span.
        assert_attr(span, "tenant.id", "demo");
        assert_attr(span, "run.id", &run_id);
        assert_ne!(span.status_code, 2, "{} has status ERROR", span.name);
    }

    let server = one(&spans, "POST /v1/runs");
    assert_eq!(server.service, "gateway");
    assert_eq!(server.kind, "server");
    assert_attr(server, "http.request.method", "POST");
    assert_attr(server, "http.route", "/v1/runs");
    assert_attr(server, "http.response.status_code", "202");
    assert_attr(server, "url.path", "/v1/runs");
    assert!(
        returned_traceparent.contains(&server.span_id),
        "{returned_traceparent}"
    );

    let submitted = one(&spans, "send runs.submitted");
    assert_eq!(submitted.service, "gateway");
    assert_messaging(submitted, "producer", "send", "runs.submitted");
    assert_attr(submitted, "messaging.message.id", &run_id);
    assert_child(submitted, server);

    let routed = one(&spans, "process runs.submitted");
    assert_eq!(routed.service, "router");
    assert_messaging(routed, "consumer", "process", "runs.submitted");
    assert_attr(routed, "messaging.consumer.group.name", "router");
    assert_child(routed, submitted);

    let decide = one(&spans, "router.decide");
    assert_eq!(decide.kind, "internal");
    assert_attr(decide, "flow.id", "hello");
    assert_child(decide, routed);
    let policy = one(&spans, "router.policy.apply");
    assert_attr(policy, "policy.id", "default");
    assert_child(policy, decide);
    let select = one(&spans, "router.provider.select");
    assert_attr(select, "provider", "default");
    assert_attr(select, "decision.reason", "weighted");
    assert_child(select, decide);

    let dispatched = one(&spans, "send work.default");
    assert_eq!(dispatched.service, "router");
    assert_messaging(dispatched, "producer", "send", "work.default");
    assert_child(dispatched, routed);

    let work = one(&spans, "process work.default");
    assert_eq!(work.service, "worker");
    assert_messaging(work, "consumer", "process", "work.default");
    assert_attr(work, "messaging.consumer.group.name", "worker-default");
    assert_child(work, dispatched);

    let step_spans = find(&spans, "worker.step.execute");
    assert_eq!(step_spans.len(), 2);
    let by_step: HashMap<&str, &&CollectedSpan> = step_spans
        .iter()
        .map(|s| (s.attr("step.id").unwrap_or(""), s))
        .collect();
    for (id, step_type) in [("a", "noop"), ("b", "delay")] {
        let span = by_step
            .get(id)
            .unwrap_or_else(|| panic!("no step span for {id}"));
        assert_eq!(span.service, "worker");
        assert_attr(span, "step.type", step_type);
        assert_attr(span, "attempt", "1");
        assert_child(span, work);
    }

    let reports = find(&spans, "send runs.events");
    assert_eq!(reports.len(), 2);
    let applied = find(&spans, "process runs.events");
    assert_eq!(applied.len(), 2);
    for report in &reports {
        assert_eq!(report.service, "worker");
        assert_messaging(report, "producer", "send", "runs.events");
        assert_child(report, work);
        let consumer = applied
            .iter()
            .find(|a| a.parent_span_id.as_deref() == Some(report.span_id.as_str()))
            .expect("a gateway process span for each report");
        assert_eq!(consumer.service, "gateway");
        assert_messaging(consumer, "consumer", "process", "runs.events");
    }

    // Metrics: each admin port parses as Prometheus text and counts the run.
    let gateway = parse(&stack.scrape(Component::Gateway).await);
    assert!(
        sample(
            &gateway,
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/runs"),
                ("status_class", "2xx")
            ]
        ) >= 1.0
    );
    assert_histogram(
        &gateway,
        "http_request_duration_seconds",
        &[("route", "/v1/runs")],
    );
    assert!(
        sample(
            &gateway,
            "gateway_runs_submitted_total",
            &[("outcome", "accepted")]
        ) >= 1.0
    );

    let router = parse(&stack.scrape(Component::Router).await);
    assert!(
        sample(
            &router,
            "router_decisions_total",
            &[
                ("policy_id", "default"),
                ("provider", "default"),
                ("reason", "weighted"),
                ("tenant_id", "demo")
            ]
        ) >= 1.0
    );
    assert_histogram(&router, "router_decision_duration_seconds", &[]);

    let worker = parse(&stack.scrape(Component::Worker).await);
    for step_type in ["noop", "delay"] {
        assert!(
            sample(
                &worker,
                "worker_step_executions_total",
                &[
                    ("step_type", step_type),
                    ("status", "succeeded"),
                    ("tenant_id", "demo")
                ]
            ) >= 1.0
        );
    }
    assert_histogram(
        &worker,
        "worker_step_duration_seconds",
        &[("step_type", "delay")],
    );
    assert!(
        worker
            .samples
            .iter()
            .any(|s| s.metric == "worker_queue_depth"),
        "worker_queue_depth missing"
    );

    for (component, scrape) in [
        ("gateway", &gateway),
        ("router", &router),
        ("worker", &worker),
    ] {
        assert_eq!(
            sample(
                scrape,
                "component_health_status",
                &[("component", component), ("check", "nats")]
            ),
            1.0
        );
        assert!(
            sample(scrape, "process_resident_memory_bytes", &[]) > 0.0,
            "{component}"
        );
        assert_eq!(
            sample(scrape, "component_build_info", &[("component", component)]),
            1.0
        );
        // No run or step id ever becomes a label.
        for s in &scrape.samples {
            for (label, value) in s.labels.iter() {
                assert!(
                    !value.contains(&run_id),
                    "{} label {label} carries the run id",
                    s.metric
                );
            }
        }
    }

    // Logs: every stdout line is a JSON object; each process logged inside the trace.
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        let lines = stack.process(component).stdout();
        assert!(!lines.is_empty());
        let mut in_trace = 0;
        for line in &lines {
            let json: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(json.get(key).is_some(), "{key} missing in {line}");
            }
            if json["trace_id"] == CLIENT_TRACE {
                assert!(json["span_id"].is_string(), "{line}");
                if json["run_id"] == run_id.as_str() {
                    assert_eq!(json["tenant_id"], "demo", "{line}");
                    in_trace += 1;
                }
            }
        }
        assert!(
            in_trace > 0,
            "{} logged nothing with the trace id",
            component.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_the_run_and_marks_the_span() {
    let stack = Stack::full().await;
    let accepted = stack
        .submit_ok(&serde_json::json!({
            "flow_id": "breaks",
            "steps": [
                {"id": "ok", "type": "noop"},
                {"id": "boom", "type": "fail", "input": {"message": "kaput"}},
                {"id": "never", "type": "noop"}
            ]
        }))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id");
    let trace_id = accepted["trace_id"].as_str().expect("trace_id");
    let run = stack.wait_terminal(run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.contains("boom") && e.contains("kaput")),
        "{run}"
    );
    let statuses: Vec<&str> = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["succeeded", "failed", "skipped"]);
    assert_eq!(run["steps"][1]["error"], "kaput");

    // No client traceparent: the gateway starts the trace. 2 + 5 + (1 + 2 steps + 2 reports) + 2;
    // the skipped step has no span.
    let spans = stack
        .otlp
        .wait_for_trace(trace_id, 14, Duration::from_secs(20))
        .await;
    let server = one(&spans, "POST /v1/runs");
    assert_eq!(
        server.parent_span_id, None,
        "the gateway's server span is the root"
    );
    let failed = find(&spans, "worker.step.execute")
        .into_iter()
        .find(|s| s.attr("step.id") == Some("boom"))
        .expect("span of the failing step");
    assert_eq!(failed.status_code, 2, "status ERROR");
    assert!(
        failed.events.iter().any(|e| e == "exception"),
        "{:?}",
        failed.events
    );
    assert_eq!(one(&spans, "process work.default").status_code, 2);

    let worker = parse(&stack.scrape(Component::Worker).await);
    assert!(
        sample(
            &worker,
            "worker_step_executions_total",
            &[
                ("step_type", "fail"),
                ("status", "failed"),
                ("tenant_id", "demo")
            ]
        ) >= 1.0
    );
}

pub fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of the one sample of `metric` whose labels include `labels`
/// (counters and gauges); 0 when there is none.
pub fn sample(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// `metric` is exposed as a real histogram (buckets, not a summary) with at
/// least one observation.
fn assert_histogram(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) {
    let found = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s| match &s.value {
            Metric::Histogram(buckets) => buckets.last().map(|b| b.count),
            _ => None,
        });
    assert!(
        found.is_some_and(|count| count >= 1.0),
        "{metric} is not a histogram with observations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_mode_starts_a_trace_per_hop_linked_to_the_producer() {
    let mut stack = Stack::new().await;
    stack
        .extra_env
        .insert("TELEMETRY_MESSAGING_CONTEXT".into(), "link".into());
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let accepted = stack.submit_ok(&sample_run()).await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    let trace_id = accepted["trace_id"].as_str().expect("trace_id").to_owned();
    let run = stack.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded");

    // The gateway's request trace holds only the request and its send.
    let request = stack
        .otlp
        .wait_for_trace(&trace_id, 2, Duration::from_secs(10))
        .await;
    let send = one(&request, "send runs.submitted");

    // Each hop's process span is a root in its own trace, linked to the send span.
    let routed = testkit::eventually(
        Duration::from_secs(10),
        "the router's process span",
        || async {
            stack.otlp.spans().into_iter().find(|s| {
                s.name == "process runs.submitted" && s.attr("run.id") == Some(run_id.as_str())
            })
        },
    )
    .await;
    assert_eq!(routed.parent_span_id, None);
    assert_ne!(routed.trace_id, trace_id);
    assert_eq!(routed.links, vec![(trace_id.clone(), send.span_id.clone())]);

    let dispatched = stack
        .otlp
        .wait_for_trace(&routed.trace_id, 5, Duration::from_secs(10))
        .await;
    let work_send = one(&dispatched, "send work.default");
    let work = testkit::eventually(
        Duration::from_secs(10),
        "the worker's process span",
        || async {
            stack.otlp.spans().into_iter().find(|s| {
                s.name == "process work.default" && s.attr("run.id") == Some(run_id.as_str())
            })
        },
    )
    .await;
    assert_eq!(work.parent_span_id, None);
    assert_eq!(
        work.links,
        vec![(routed.trace_id.clone(), work_send.span_id.clone())]
    );
    // Correlation attributes come from the payload, whatever the trace shape.
    assert_attr(&work, "tenant.id", "demo");
}
