//! The trace pipeline across processes: the gateway's sampling decision
//! honoured downstream, the exporter never hurting the service (collector
//! down or stalled), and OTLP over TLS.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::{Value, json};
use testkit::otlp::CollectedSpan;
use testkit::stack::{Component, DEMO_KEY, Stack};

const ALL: [Component; 3] = [Component::Gateway, Component::Router, Component::Worker];

fn noop_run() -> Value {
    json!({"flow_id": "hello", "steps": [{"id": "a", "type": "noop"}]})
}

fn failing_run() -> Value {
    json!({
        "flow_id": "hello",
        "steps": [{"id": "a", "type": "fail", "input": {"message": "boom", "probability": 1.0}}]
    })
}

/// A trace id that `traceidratio` 0.5 samples (`keep`) or drops: the SDK
/// compares the low 63 bits of the id with the ratio.
fn trace_id(n: u64, keep: bool) -> String {
    let low = if keep { n } else { 0xf000_0000_0000_0000 | n };
    format!("{:016x}{low:016x}", 0xbeef_0000 + n)
}

fn traceparent(trace_id: &str, sampled: bool) -> String {
    format!("00-{trace_id}-00f067aa0ba902b7-0{}", u8::from(sampled))
}

/// Submits `body` (with `traceparent` if given), waits for a terminal
/// status; returns the run's trace id.
async fn run_to_end(stack: &Stack, body: &Value, traceparent: Option<String>) -> String {
    let mut request = stack.submit(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.expect("POST run");
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("JSON");
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    stack.wait_terminal(&run_id, Duration::from_secs(15)).await;
    accepted["trace_id"]
        .as_str()
        .expect("trace_id in the answer")
        .to_owned()
}

fn services(spans: &[CollectedSpan]) -> BTreeSet<String> {
    spans.iter().map(|s| s.service.clone()).collect()
}

fn of_trace(stack: &Stack, trace_id: &str) -> Vec<CollectedSpan> {
    stack
        .otlp
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

/// Starts all three services, `gateway_env` for the gateway only.
async fn start_with(stack: &mut Stack, gateway_env: &[(&str, &str)], others_env: &[(&str, &str)]) {
    let base = stack.extra_env.clone();
    for (component, extra) in [
        (Component::Gateway, gateway_env),
        (Component::Router, others_env),
        (Component::Worker, others_env),
    ] {
        stack.extra_env = base.clone();
        stack
            .extra_env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        stack.start(component).await;
    }
    stack.extra_env = base;
}

/// Long enough for every process to have exported what it had (the stack's
/// schedule delay is 100 ms).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_always_off_means_nothing_is_exported_downstream() {
    let mut stack = Stack::new().await;
    start_with(&mut stack, &[("OTEL_TRACES_SAMPLER", "always_off")], &[]).await;

    // Even a client that asks for sampling is overruled: the gateway decides.
    let mut unsampled = Vec::new();
    for n in 0..3 {
        let id = trace_id(n, true);
        let returned = run_to_end(&stack, &noop_run(), Some(traceparent(&id, true))).await;
        assert_eq!(returned, id);
        unsampled.push(id);
    }

    // Control: the same router and worker, a gateway that samples.
    stack.kill(Component::Gateway).await;
    stack.start(Component::Gateway).await;
    let sampled = run_to_end(&stack, &noop_run(), None).await;
    let spans = stack
        .otlp
        .wait_for_trace(&sampled, 10, Duration::from_secs(10))
        .await;
    assert_eq!(
        services(&spans),
        BTreeSet::from(["gateway".into(), "router".into(), "worker".into()]),
        "the control run is traced by all three"
    );

    settle().await;
    for id in &unsampled {
        let spans = of_trace(&stack, id);
        assert!(
            spans.is_empty(),
            "trace {id} was not sampled at the gateway, yet: {:?}",
            spans
                .iter()
                .map(|s| format!("{}:{}", s.service, s.name))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceidratio_at_the_gateway_gives_whole_traces_or_nothing() {
    let mut stack = Stack::new().await;
    start_with(
        &mut stack,
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ],
        &[],
    )
    .await;

    // The client's sampled flag is the opposite of the gateway's decision
    // each time: only the trace id counts at the gateway.
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for n in 1..=3 {
        kept.push(
            run_to_end(
                &stack,
                &noop_run(),
                Some(traceparent(&trace_id(n, true), false)),
            )
            .await,
        );
        dropped.push(
            run_to_end(
                &stack,
                &noop_run(),
                Some(traceparent(&trace_id(n, false), true)),
            )
            .await,
        );
    }

    let mut sizes = Vec::new();
    for id in &kept {
        let spans = stack
            .otlp
            .wait_for_trace(id, 10, Duration::from_secs(10))
            .await;
        assert_eq!(
            services(&spans),
            BTreeSet::from(["gateway".into(), "router".into(), "worker".into()]),
            "trace {id}"
        );
        sizes.push(spans.len());
    }
    // Every sampled trace is the same whole tree.
    assert!(sizes.iter().all(|&n| n == sizes[0]), "{sizes:?}");
    settle().await;
    for id in &dropped {
        assert!(
            of_trace(&stack, id).is_empty(),
            "trace {id} should have no spans"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_exported_span_lacks_its_parent_with_ratio_sampling_and_errors() {
    let mut stack = Stack::new().await;
    // traceidratio decides at the gateway; the router and the worker run the
    // adaptive sampler (parent-based), which once recorded unsampled spans and
    // exported their errors anyway: orphans whose parents nobody exported.
    start_with(
        &mut stack,
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ],
        &[
            ("OTEL_TRACES_SAMPLER", "beamline_adaptive"),
            ("OTEL_TRACES_SAMPLER_ARG", "1000"),
        ],
    )
    .await;

    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for n in 1..=3 {
        for body in [failing_run(), noop_run()] {
            let keep = trace_id(n, true);
            let drop = trace_id(n + 10, false);
            kept.push(run_to_end(&stack, &body, Some(traceparent(&keep, true))).await);
            dropped.push(run_to_end(&stack, &body, Some(traceparent(&drop, true))).await);
        }
    }
    for id in &kept {
        stack
            .otlp
            .wait_for_trace(id, 10, Duration::from_secs(10))
            .await;
    }
    settle().await;

    let spans = stack.otlp.spans();
    let ids: BTreeSet<(String, String)> = spans
        .iter()
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    for span in &spans {
        let Some(parent) = &span.parent_span_id else {
            continue;
        };
        // The client's own span (its traceparent) is the only parent that
        // is outside the backend by design.
        if parent == "00f067aa0ba902b7" && span.service == "gateway" && span.kind == "server" {
            continue;
        }
        assert!(
            ids.contains(&(span.trace_id.clone(), parent.clone())),
            "{}:{} (status {}) was exported without its parent {parent}",
            span.service,
            span.name,
            span.status_code
        );
    }
    for id in &dropped {
        let orphans = of_trace(&stack, id);
        assert!(
            orphans.is_empty(),
            "unsampled trace {id} exported: {:?}",
            orphans
                .iter()
                .map(|s| format!("{}:{} status {}", s.service, s.name, s.status_code))
                .collect::<Vec<_>>()
        );
    }
    for id in &kept {
        assert_eq!(
            services(&of_trace(&stack, id)).len(),
            3,
            "trace {id} is whole"
        );
    }
}

// ---------------------------------------------------------------------------
// The exporter never hurts the service.

/// A TCP server that accepts connections and never answers.
async fn stalling_collector() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

struct Outcome {
    p95: Duration,
    elapsed: Duration,
    metrics: HashMap<Component, String>,
    gateway_log: Vec<String>,
}

/// All three services with `env`, then `requests` sequential submissions.
async fn traffic(env: &[(&str, String)], requests: usize) -> Outcome {
    let mut stack = Stack::new().await;
    stack.extra_env.extend(
        [
            ("GATEWAY_RATE_LIMIT_RPS", "100000".to_owned()),
            ("GATEWAY_RATE_LIMIT_BURST", "100000".to_owned()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64".to_owned()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16".to_owned()),
            ("OTEL_BSP_EXPORT_TIMEOUT", "300".to_owned()),
        ]
        .into_iter()
        .chain(env.iter().cloned())
        .map(|(k, v)| (k.to_owned(), v)),
    );
    for component in ALL {
        stack.start(component).await;
    }
    let mut latencies = Vec::with_capacity(requests);
    let started = Instant::now();
    for _ in 0..requests {
        let sent = Instant::now();
        let response = stack.submit(&noop_run()).send().await.expect("POST run");
        latencies.push(sent.elapsed());
        assert_eq!(response.status(), 202);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    // Let the export tasks run into their timeouts and report.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut metrics = HashMap::new();
    for component in ALL {
        metrics.insert(component, stack.scrape(component).await);
    }
    Outcome {
        p95: latencies[latencies.len() * 95 / 100],
        elapsed,
        metrics,
        gateway_log: stack.process(Component::Gateway).stdout(),
    }
}

/// The sum of every series of `name` in a Prometheus text body.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_or_stalls_costs_the_service_nothing() {
    const REQUESTS: usize = 200;
    let baseline = traffic(
        &[("CP2_OBSERVABILITY_TRACING_ENABLED", "false".to_owned())],
        REQUESTS,
    )
    .await;
    let dead_port = testkit::free_port();
    let stalling = stalling_collector().await;
    for (what, endpoint) in [
        (
            "no collector listening",
            format!("http://127.0.0.1:{dead_port}"),
        ),
        (
            "a collector that never answers",
            format!("http://127.0.0.1:{stalling}"),
        ),
    ] {
        let outcome = traffic(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)], REQUESTS).await;
        assert!(
            outcome.p95 <= baseline.p95 * 2 + Duration::from_millis(50),
            "{what}: p95 {:?} vs {:?} without tracing",
            outcome.p95,
            baseline.p95
        );
        assert!(
            outcome.elapsed <= baseline.elapsed * 2 + Duration::from_secs(1),
            "{what}: {REQUESTS} requests took {:?} vs {:?} without tracing",
            outcome.elapsed,
            baseline.elapsed
        );
        for component in ALL {
            let body = &outcome.metrics[&component];
            let dropped = metric(body, "telemetry_spans_dropped_total");
            assert!(
                dropped > 0.0,
                "{what}: {} dropped nothing",
                component.name()
            );
            let rss = metric(body, "process_resident_memory_bytes");
            let base_rss = metric(
                &baseline.metrics[&component],
                "process_resident_memory_bytes",
            );
            assert!(
                rss < base_rss * 2.0 + 64e6,
                "{what}: {} uses {rss} bytes vs {base_rss} without tracing",
                component.name()
            );
        }
        let dropped = metric(
            &outcome.metrics[&Component::Gateway],
            "telemetry_spans_dropped_total",
        );
        let warnings = outcome
            .gateway_log
            .iter()
            .filter(|l| l.contains("spans dropped"))
            .count();
        assert!(
            warnings >= 1,
            "{what}: no drop warning in the gateway's log"
        );
        // At most one per 10 s (the first at once), not one per span or batch.
        let allowed = 1 + (outcome.elapsed.as_secs() / 10 + 1) as usize;
        assert!(
            warnings <= allowed && (warnings as f64) * 10.0 < dropped,
            "{what}: {warnings} warnings for {dropped} dropped spans"
        );
    }
}

// ---------------------------------------------------------------------------
// OTLP over TLS.

#[derive(Clone, Default)]
struct CountingCollector(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[tonic::async_trait]
impl TraceService for CountingCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut names = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            for scope in resource_spans.scope_spans {
                names.extend(scope.spans.into_iter().map(|s| s.name));
            }
        }
        self.0.lock().expect("lock").extend(names);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP receiver over TLS with a certificate for `localhost` made now;
/// returns its port, the CA file (the self-signed certificate) and what it got.
async fn tls_collector(dir: &std::path::Path) -> (u16, std::path::PathBuf, CountingCollector) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    let ca = dir.join("collector-ca.pem");
    std::fs::write(&ca, &cert_pem).expect("write CA");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let collector = CountingCollector::default();
    let service = TraceServiceServer::new(collector.clone());
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    tokio::spawn(async move {
        let incoming = async_stream_of(listener);
        let _ = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("TLS config")
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    (port, ca, collector)
}

fn async_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(socket, _)| socket);
        Some((accepted, listener))
    })
}

/// The `http.route` GETs the gateway serves without NATS work.
async fn list_runs(stack: &Stack, n: usize) {
    for _ in 0..n {
        let response = stack
            .http
            .get(stack.url("/v1/runs"))
            .bearer_auth(DEMO_KEY)
            .send()
            .await
            .expect("GET /v1/runs");
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_tls_to_a_collector_with_a_private_ca() {
    let mut stack = Stack::new().await;
    let (port, ca, collector) = tls_collector(stack.dir.path()).await;
    let endpoint = format!("https://localhost:{port}");
    stack
        .extra_env
        .insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone());
    stack.extra_env.insert(
        "OTEL_EXPORTER_OTLP_CERTIFICATE".into(),
        ca.display().to_string(),
    );
    stack.start(Component::Gateway).await;
    list_runs(&stack, 5).await;
    testkit::eventually(Duration::from_secs(10), "spans over TLS", || async {
        (collector.0.lock().expect("lock").len() >= 5).then_some(())
    })
    .await;
    assert!(
        stack.otlp.spans().is_empty(),
        "nothing went to the plain receiver"
    );

    // Without the CA the collector is not trusted: nothing arrives, the
    // failures are counted, and the gateway serves as before.
    stack.kill(Component::Gateway).await;
    collector.0.lock().expect("lock").clear();
    stack.extra_env.remove("OTEL_EXPORTER_OTLP_CERTIFICATE");
    stack.start(Component::Gateway).await;
    list_runs(&stack, 5).await;
    let failed = testkit::eventually(Duration::from_secs(10), "failed exports", || async {
        let dropped = metric(
            &stack.scrape(Component::Gateway).await,
            "telemetry_spans_dropped_total",
        );
        (dropped > 0.0).then_some(dropped)
    })
    .await;
    assert!(failed >= 1.0);
    assert!(collector.0.lock().expect("lock").is_empty());
}

// ---------------------------------------------------------------------------
// Strict traceparent.

/// The gateway's SERVER span of one `GET /v1/runs` sent with `traceparent`.
async fn server_span_for(stack: &Stack, traceparent: &str) -> CollectedSpan {
    let server_spans = || -> Vec<CollectedSpan> {
        stack
            .otlp
            .spans()
            .into_iter()
            .filter(|s| s.service == "gateway" && s.kind == "server")
            .collect()
    };
    let before = server_spans().len();
    let response = stack
        .http
        .get(stack.url("/v1/runs"))
        .bearer_auth(DEMO_KEY)
        .header("traceparent", traceparent)
        .send()
        .await
        .expect("GET /v1/runs");
    assert_eq!(response.status(), 200, "{traceparent}");
    testkit::eventually(Duration::from_secs(10), "the server span", || async {
        let spans = server_spans();
        (spans.len() > before).then(|| spans[before].clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace_at_the_gateway() {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let span = "00f067aa0ba902b7";

    // Control: a valid one is continued.
    let continued = server_span_for(&stack, &format!("00-{trace}-{span}-01")).await;
    assert_eq!(continued.trace_id, trace);
    assert_eq!(continued.parent_span_id.as_deref(), Some(span));

    // Each of these was continued by the SDK's parser alone (the trace id
    // it would have taken is the second element).
    let padded = format!("0{}", &trace[1..]);
    for (bad, would_be) in [
        (format!("00-{}-{span}-01", &trace[1..]), padded.clone()),
        (format!("00-{trace}-{}-01", &span[1..]), trace.to_owned()),
        (format!("00-{trace}-{span}--1"), trace.to_owned()),
        (format!("0--{trace}-{span}-01"), trace.to_owned()),
        ("00-1-1-01".to_owned(), format!("{:032x}", 1)),
        (format!("00-+{}-{span}-01", &trace[1..]), padded),
        (
            format!("00-{}-{span}-01", trace.to_uppercase()),
            trace.to_owned(),
        ),
        (format!("00-{trace}-{span}-01-extra"), trace.to_owned()),
    ] {
        let server = server_span_for(&stack, &bad).await;
        assert_ne!(server.trace_id, would_be, "{bad} was continued");
        assert_ne!(server.trace_id, trace, "{bad} was continued");
        assert_eq!(server.parent_span_id, None, "{bad} gave a parent");
    }
}

// ---------------------------------------------------------------------------
// Build info and instance id.

/// What `build.rs` stamps: `git rev-parse` of this checkout, or `unknown`.
fn expected_revision() -> String {
    std::env::var("BEAMLINE_GIT_REVISION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_carry_the_real_version_revision_and_an_instance_id() {
    let mut stack = Stack::new().await;
    stack.start(Component::Gateway).await;
    let version = env!("CARGO_PKG_VERSION");
    assert_ne!(version, "0.0.0", "the workspace has a real version");
    let revision = expected_revision();

    let first = server_span_for(&stack, "not-a-traceparent").await;
    let resource = &first.resource;
    assert_eq!(
        resource.get("service.version").map(String::as_str),
        Some(version)
    );
    assert_eq!(
        resource.get("vcs.ref.head.revision"),
        Some(&revision),
        "{resource:?}"
    );
    let instance = resource
        .get("service.instance.id")
        .cloned()
        .expect("service.instance.id");
    assert_eq!(instance.len(), 36, "a UUID: {instance}");
    assert_eq!(instance.matches('-').count(), 4, "a UUID: {instance}");

    let metrics = stack.scrape(Component::Gateway).await;
    let build_info = metrics
        .lines()
        .find(|l| l.starts_with("component_build_info{"))
        .expect("component_build_info");
    assert!(
        build_info.contains(&format!("version=\"{version}\""))
            && build_info.contains(&format!("revision=\"{revision}\"")),
        "{build_info}"
    );

    // Another process is another instance; OTEL_RESOURCE_ATTRIBUTES wins.
    stack.kill(Component::Gateway).await;
    stack.start(Component::Gateway).await;
    let second = server_span_for(&stack, "not-a-traceparent").await;
    let other = second
        .resource
        .get("service.instance.id")
        .expect("instance id");
    assert_ne!(other, &instance);
    stack.kill(Component::Gateway).await;
    stack.extra_env.insert(
        "OTEL_RESOURCE_ATTRIBUTES".into(),
        "service.instance.id=gateway-7,service.version=9.9.9".into(),
    );
    stack.start(Component::Gateway).await;
    let third = server_span_for(&stack, "not-a-traceparent").await;
    assert_eq!(
        third
            .resource
            .get("service.instance.id")
            .map(String::as_str),
        Some("gateway-7")
    );
    assert_eq!(
        third.resource.get("service.version").map(String::as_str),
        Some("9.9.9")
    );
}
