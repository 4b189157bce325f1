//! Messaging spans for NATS, per the OpenTelemetry messaging conventions:
//! `send <subject>` (PRODUCER) around a publish and `process <subject>`
//! (CONSUMER) around the handling of a delivered message.

use std::str::FromStr;

use opentelemetry::Context;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::TraceContextExt;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::extract_nats;

/// How a `process` span relates to the `send` span of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextMode {
    /// The `process` span is a child of the `send` span: one trace per run.
    #[default]
    Parent,
    /// The `process` span starts a new trace and links to the `send` span.
    Link,
}

impl FromStr for ContextMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "parent" | "child" => Ok(Self::Parent),
            "link" => Ok(Self::Link),
            _ => Err("expected `parent` or `link`".to_owned()),
        }
    }
}

/// A PRODUCER span for publishing one message to `subject`. Callers record
/// the correlation fields (`tenant.id`, `run.id`, `flow.id`) on it.
pub fn send_span(subject: &str, message_id: &str) -> tracing::Span {
    tracing::info_span!(
        "send",
        otel.name = format!("send {subject}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
        error.type = Empty,
        tenant.id = Empty,
        run.id = Empty,
        flow.id = Empty,
    )
}

/// What a consumer knows of a delivered message.
pub struct Delivery<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a async_nats::HeaderMap>,
    /// The durable consumer's name: `messaging.consumer.group.name`.
    pub consumer_group: &'a str,
    /// How many times JetStream has delivered this message (1 = first).
    pub delivery_count: u64,
}

/// A CONSUMER span for processing one delivered message, related to the
/// producer's span as `mode` says. It is always a root in this process: the
/// consume loop's own context never leaks into a message's trace.
pub fn process_span(delivery: &Delivery<'_>, mode: ContextMode) -> tracing::Span {
    let message_id = delivery
        .headers
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        parent: None,
        "process",
        otel.name = format!("process {}", delivery.subject),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = delivery.subject,
        messaging.consumer.group.name = delivery.consumer_group,
        messaging.message.id = message_id,
        messaging.nats.delivery_count = delivery.delivery_count,
        error.type = Empty,
        tenant.id = Empty,
        run.id = Empty,
        flow.id = Empty,
    );
    let remote = extract_nats(delivery.headers);
    // `set_parent` only fails when tracing is off (no OpenTelemetry layer):
    // there is nothing to relate then.
    match mode {
        ContextMode::Parent => {
            let _ = span.set_parent(remote);
        }
        ContextMode::Link => {
            let producer = remote.span().span_context().clone();
            // Keep the baggage (the tenant) but not the remote span as parent.
            let baggage: opentelemetry::baggage::Baggage = remote
                .baggage()
                .iter()
                .map(|(k, (v, m))| (k.clone(), (v.clone(), m.clone())))
                .collect();
            let _ = span.set_parent(Context::new().with_baggage(baggage));
            if producer.is_valid() {
                span.add_link(producer);
            }
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_mode_parses() {
        assert_eq!("parent".parse::<ContextMode>(), Ok(ContextMode::Parent));
        assert_eq!("LINK".parse::<ContextMode>(), Ok(ContextMode::Link));
        assert!("sideways".parse::<ContextMode>().is_err());
    }
}
