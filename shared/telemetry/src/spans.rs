//! Marking spans as failed, the same way everywhere.

use opentelemetry::KeyValue;
use opentelemetry::trace::Status;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Sets status ERROR on `span`, records `error.type` (a closed-set code) and an
/// `exception` event carrying the message.
pub fn record_error(span: &tracing::Span, code: &str, message: &str) {
    span.record("error.type", code);
    span.set_status(Status::error(message.to_owned()));
    span.add_event(
        "exception",
        vec![
            KeyValue::new("exception.type", code.to_owned()),
            KeyValue::new("exception.message", message.to_owned()),
        ],
    );
}
