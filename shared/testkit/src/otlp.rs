//! An OTLP/gRPC trace receiver: what the services export, collected for
//! assertions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::oneshot;

/// One received span, flattened for assertions.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The exporting process's resource attributes.
    pub resource: HashMap<String, String>,
    pub name: String,
    /// `SPAN_KIND_SERVER` → `server`, …
    pub kind: &'static str,
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub events: Vec<String>,
    /// Each event's attributes, in the order of `events`.
    pub event_attributes: Vec<HashMap<String, String>>,
    /// The status message (for ERROR).
    pub status_message: String,
    /// `(trace_id, span_id)` of each link.
    pub links: Vec<(String, String)>,
}

impl CollectedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Every piece of text the span carries (for leak checks).
    pub fn text(&self) -> String {
        format!(
            "{} {:?} {:?} {:?} {}",
            self.name, self.attributes, self.events, self.event_attributes, self.status_message
        )
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<CollectedSpan>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(CollectedSpan {
                        service: service.clone(),
                        resource: resource.clone(),
                        kind: kind_name(span.kind),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: (!span.parent_span_id.is_empty())
                            .then(|| hex(&span.parent_span_id)),
                        attributes: attributes(&span.attributes),
                        status_code: span.status.as_ref().map(|s| s.code).unwrap_or(0),
                        events: span.events.iter().map(|e| e.name.clone()).collect(),
                        event_attributes: span
                            .events
                            .iter()
                            .map(|e| attributes(&e.attributes))
                            .collect(),
                        status_message: span
                            .status
                            .as_ref()
                            .map(|s| s.message.clone())
                            .unwrap_or_default(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        name: span.name,
                    });
                }
            }
        }
        self.0.lock().expect("collector lock").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    pub port: u16,
    spans: Collector,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let port = listener.local_addr().expect("local addr").port();
        let spans = Collector::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(spans.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            port,
            spans,
            _stop: stop,
        }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.0.lock().expect("collector lock").clone()
    }

    /// The spans of one trace, once at least `count` have arrived and no
    /// more arrived for a moment (so late exporters are not missed).
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<CollectedSpan> {
        let of_trace = || -> Vec<CollectedSpan> {
            self.spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = of_trace();
            if spans.len() >= count {
                tokio::time::sleep(Duration::from_millis(300)).await;
                return of_trace();
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<_> = spans
                    .iter()
                    .map(|s| format!("{}:{}", s.service, s.name))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {count} spans of trace {trace_id}; got {}: {names:?}",
                    spans.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
