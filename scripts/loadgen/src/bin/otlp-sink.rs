//! `otlp-sink`: a stand-in for the collector + Jaeger on a machine without
//! Docker (scripts/dev-up.sh starts it when nothing listens on 4317).
//!
//! * OTLP/gRPC trace receiver (`--otlp`, default 127.0.0.1:4317); keeps the
//!   last `--max-spans` spans in memory.
//! * HTTP (`--http`, default 127.0.0.1:8889):
//!   - `GET /api/traces/{trace_id}` and `GET /api/services` in the shape of
//!     Jaeger's query API (the subset scripts/observability/validate_traces.sh
//!     reads), so the same check runs against this sink or a real Jaeger;
//!   - `GET /metrics`: RED metrics per span in the series shape of the
//!     collector's `spanmetrics` connector behind its Prometheus exporter
//!     (`traces_span_metrics_calls_total`,
//!     `traces_span_metrics_duration_milliseconds_{bucket,sum,count}` with
//!     `service_name`, `span_name`, `span_kind`, `status_code` and the
//!     `tenant_id` dimension (span attribute `tenant.id`, as configured in
//!     observability/otel-collector/config.yaml)), so the
//!     Traces/RED dashboard's queries can be executed without the collector.
//!     No exemplars (the collector adds those).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::{Value, json};

/// The spanmetrics connector's default histogram buckets, in milliseconds.
const BUCKETS_MS: &[f64] = &[
    2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1400.0, 2000.0, 5000.0,
    10000.0, 15000.0,
];

#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    name: String,
    kind: i32,
    start_unix_nano: u64,
    end_unix_nano: u64,
    status_code: i32,
    attributes: Vec<(String, String)>,
    links: Vec<(String, String)>,
}

/// Counters of one (service, span name, kind, status) series.
#[derive(Default)]
struct Red {
    calls: u64,
    sum_ms: f64,
    /// Non-cumulative counts per bucket, plus the +Inf overflow at the end.
    buckets: Vec<u64>,
}

/// (service, span name, kind, status code, tenant.id attribute).
type RedKey = (String, String, i32, i32, Option<String>);

#[derive(Default)]
struct Store {
    spans: VecDeque<Span>,
    red: BTreeMap<RedKey, Red>,
}

#[derive(Clone)]
struct Sink {
    store: Arc<Mutex<Store>>,
    max_spans: usize,
}

impl Sink {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// OTLP `SpanKind` → the connector's label value and Jaeger's `span.kind` tag.
fn kind_names(kind: i32) -> (&'static str, &'static str) {
    match kind {
        1 => ("SPAN_KIND_INTERNAL", "internal"),
        2 => ("SPAN_KIND_SERVER", "server"),
        3 => ("SPAN_KIND_CLIENT", "client"),
        4 => ("SPAN_KIND_PRODUCER", "producer"),
        5 => ("SPAN_KIND_CONSUMER", "consumer"),
        _ => ("SPAN_KIND_UNSPECIFIED", "unspecified"),
    }
}

fn status_name(code: i32) -> &'static str {
    match code {
        1 => "STATUS_CODE_OK",
        2 => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| {
                    pairs(&r.attributes)
                        .into_iter()
                        .find(|(k, _)| k == "service.name")
                })
                .map_or_else(|| "unknown_service".to_owned(), |(_, v)| v);
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Span {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
                    kind: span.kind,
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    status_code: span.status.as_ref().map_or(0, |s| s.code),
                    attributes: pairs(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    name: span.name,
                });
            }
        }
        let mut store = self.store();
        for span in received {
            let ms = span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e6;
            let red = store
                .red
                .entry((
                    span.service.clone(),
                    span.name.clone(),
                    span.kind,
                    span.status_code,
                    span.attributes
                        .iter()
                        .find(|(k, _)| k == "tenant.id")
                        .map(|(_, v)| v.clone()),
                ))
                .or_insert_with(|| Red {
                    buckets: vec![0; BUCKETS_MS.len() + 1],
                    ..Red::default()
                });
            red.calls += 1;
            red.sum_ms += ms;
            let i = BUCKETS_MS
                .iter()
                .position(|le| ms <= *le)
                .unwrap_or(BUCKETS_MS.len());
            red.buckets[i] += 1;
            store.spans.push_back(span);
            while store.spans.len() > self.max_spans {
                store.spans.pop_front();
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Label values escaped for the Prometheus text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The label set of one series, as the connector + Prometheus exporter name it.
fn red_labels((service, name, kind, status, tenant): &RedKey) -> String {
    let mut labels = format!(
        "service_name=\"{}\",span_name=\"{}\",span_kind=\"{}\",status_code=\"{}\"",
        esc(service),
        esc(name),
        kind_names(*kind).0,
        status_name(*status)
    );
    if let Some(tenant) = tenant {
        let _ = write!(labels, ",tenant_id=\"{}\"", esc(tenant));
    }
    labels
}

async fn metrics(State(sink): State<Sink>) -> impl IntoResponse {
    let store = sink.store();
    let mut out = String::new();
    out.push_str("# HELP traces_span_metrics_calls_total Spans received, by service, name, kind and status.\n# TYPE traces_span_metrics_calls_total counter\n");
    for (key, red) in &store.red {
        let _ = writeln!(
            out,
            "traces_span_metrics_calls_total{{{}}} {}",
            red_labels(key),
            red.calls
        );
    }
    out.push_str("# HELP traces_span_metrics_duration_milliseconds Span durations.\n# TYPE traces_span_metrics_duration_milliseconds histogram\n");
    for (key, red) in &store.red {
        let labels = red_labels(key);
        let mut cumulative = 0;
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            cumulative += red.buckets[i];
            let _ = writeln!(
                out,
                "traces_span_metrics_duration_milliseconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "traces_span_metrics_duration_milliseconds_bucket{{{labels},le=\"+Inf\"}} {}",
            red.calls
        );
        let _ = writeln!(
            out,
            "traces_span_metrics_duration_milliseconds_sum{{{labels}}} {}",
            red.sum_ms
        );
        let _ = writeln!(
            out,
            "traces_span_metrics_duration_milliseconds_count{{{labels}}} {}",
            red.calls
        );
    }
    let _ = writeln!(
        out,
        "# HELP otlp_sink_spans_stored Spans held in memory for /api/traces.\n# TYPE otlp_sink_spans_stored gauge\notlp_sink_spans_stored {}",
        store.spans.len()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn tag(key: &str, value: &str) -> Value {
    json!({"key": key, "type": "string", "value": value})
}

/// One trace in the shape of Jaeger's `GET /api/traces/{id}`.
async fn trace(State(sink): State<Sink>, Path(trace_id): Path<String>) -> impl IntoResponse {
    let trace_id = trace_id.to_ascii_lowercase();
    let spans: Vec<Span> = sink
        .store()
        .spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    if spans.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"data": null, "errors": [{"code": 404, "msg": "trace not found"}]})),
        );
    }
    let mut processes: HashMap<String, String> = HashMap::new();
    let mut json_spans = Vec::new();
    for span in &spans {
        let next = format!("p{}", processes.len() + 1);
        let pid = processes
            .entry(span.service.clone())
            .or_insert(next)
            .clone();
        let mut references = Vec::new();
        if let Some(parent) = &span.parent {
            references
                .push(json!({"refType": "CHILD_OF", "traceID": span.trace_id, "spanID": parent}));
        }
        for (t, s) in &span.links {
            references.push(json!({"refType": "FOLLOWS_FROM", "traceID": t, "spanID": s}));
        }
        let mut tags: Vec<Value> = span.attributes.iter().map(|(k, v)| tag(k, v)).collect();
        tags.push(tag("span.kind", kind_names(span.kind).1));
        if span.status_code == 2 {
            tags.push(json!({"key": "error", "type": "bool", "value": true}));
            tags.push(tag("otel.status_code", "ERROR"));
        }
        json_spans.push(json!({
            "traceID": span.trace_id,
            "spanID": span.span_id,
            "operationName": span.name,
            "references": references,
            "startTime": span.start_unix_nano / 1000,
            "duration": span.end_unix_nano.saturating_sub(span.start_unix_nano) / 1000,
            "tags": tags,
            "processID": pid,
        }));
    }
    let processes: serde_json::Map<String, Value> = processes
        .into_iter()
        .map(|(service, pid)| (pid, json!({"serviceName": service, "tags": []})))
        .collect();
    (
        StatusCode::OK,
        axum::Json(
            json!({"data": [{"traceID": trace_id, "spans": json_spans, "processes": processes}]}),
        ),
    )
}

async fn services(State(sink): State<Sink>) -> axum::Json<Value> {
    let mut names: Vec<String> = sink
        .store()
        .spans
        .iter()
        .map(|s| s.service.clone())
        .collect();
    names.sort();
    names.dedup();
    axum::Json(json!({"data": names, "total": names.len()}))
}

struct Flags {
    otlp: SocketAddr,
    http: SocketAddr,
    max_spans: usize,
}

fn flags() -> anyhow::Result<Option<Flags>> {
    let mut flags = Flags {
        otlp: "127.0.0.1:4317".parse()?,
        http: "127.0.0.1:8889".parse()?,
        max_spans: 50_000,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--otlp" => flags.otlp = value()?.parse().context("--otlp: host:port")?,
            "--http" => flags.http = value()?.parse().context("--http: host:port")?,
            "--max-spans" => flags.max_spans = value()?.parse().context("--max-spans: a number")?,
            "-h" | "--help" => {
                eprintln!(
                    "otlp-sink [--otlp 127.0.0.1:4317] [--http 127.0.0.1:8889] [--max-spans 50000]\n\
                     OTLP/gRPC traces in; Jaeger-style /api/traces/{{id}}, /api/services and\n\
                     spanmetrics-style /metrics out."
                );
                return Ok(None);
            }
            other => anyhow::bail!("unknown argument `{other}` (try --help)"),
        }
    }
    Ok(Some(flags))
}

async fn serve(flags: Flags) -> anyhow::Result<()> {
    let sink = Sink {
        store: Arc::new(Mutex::new(Store::default())),
        max_spans: flags.max_spans,
    };
    let otlp = tokio::net::TcpListener::bind(flags.otlp)
        .await
        .with_context(|| format!("binding OTLP/gRPC on {}", flags.otlp))?;
    let http = tokio::net::TcpListener::bind(flags.http)
        .await
        .with_context(|| format!("binding HTTP on {}", flags.http))?;
    eprintln!(
        "otlp-sink: OTLP/gRPC on {}, HTTP (/api/traces/{{id}}, /metrics) on {}",
        otlp.local_addr()?,
        http.local_addr()?
    );
    let app = axum::Router::new()
        .route("/api/traces/{trace_id}", get(trace))
        .route("/api/services", get(services))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(sink.clone());
    let grpc = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(otlp),
            stop_signal(),
        );
    let web = axum::serve(http, app).with_graceful_shutdown(stop_signal());
    let (grpc, web) = tokio::join!(grpc, web);
    grpc.context("OTLP/gRPC server")?;
    web.context("HTTP server")?;
    Ok(())
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> std::process::ExitCode {
    let flags = match flags() {
        Ok(Some(f)) => f,
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("otlp-sink: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(serve(flags)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("otlp-sink: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
