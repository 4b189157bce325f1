//! One JSON object per line on stdout.
//!
//! `tracing_subscriber`'s own JSON formatter knows nothing of OpenTelemetry, so
//! this small layer writes the line itself: timestamp, level, target, message,
//! `trace_id`/`span_id` of the current span, the correlation fields found in the
//! span scope (`tenant.id` → `tenant_id`, …) and the event's own fields.

use std::io::Write;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Span fields copied onto every log line written inside the span, with the
/// key they get in the log line.
pub const CORRELATION_FIELDS: [(&str, &str); 4] = [
    ("tenant.id", "tenant_id"),
    ("run.id", "run_id"),
    ("flow.id", "flow_id"),
    ("step.id", "step_id"),
];

/// Correlation fields recorded on a span, kept in the span's extensions.
#[derive(Default)]
struct Correlation(Vec<(&'static str, String)>);

impl Visit for Correlation {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some((_, key)) = CORRELATION_FIELDS.iter().find(|(f, _)| *f == field.name()) {
            self.0.retain(|(k, _)| k != key);
            self.0.push((key, value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if CORRELATION_FIELDS.iter().any(|(f, _)| *f == field.name()) {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// The event's fields as JSON values.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

/// The JSON log layer.
pub struct JsonLogLayer<W = fn() -> std::io::Stdout> {
    make_writer: W,
}

impl JsonLogLayer {
    pub fn stdout() -> Self {
        Self {
            make_writer: std::io::stdout,
        }
    }
}

impl<S, W> Layer<S> for JsonLogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: Fn() -> std::io::Stdout + 'static,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut correlation = Correlation::default();
        attrs.record(&mut correlation);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(correlation);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(correlation) = extensions.get_mut::<Correlation>() {
                values.record(correlation);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::from(rfc3339_now()));
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str()),
        );
        line.insert("target".into(), Value::from(event.metadata().target()));

        let mut fields = Fields::default();
        event.record(&mut fields);
        let sanitizer = crate::sanitize::global();
        for (key, value) in fields.0.iter_mut() {
            sanitize_value(sanitizer, key, value);
        }
        let message = fields.0.remove("message").unwrap_or(Value::from(""));
        line.insert("message".into(), message);

        // The current span's OpenTelemetry ids (absent when tracing is off).
        let cx = tracing::Span::current().context();
        let span_ref = cx.span();
        let span_context = span_ref.span_context();
        if span_context.is_valid() {
            line.insert(
                "trace_id".into(),
                Value::from(span_context.trace_id().to_string()),
            );
            line.insert(
                "span_id".into(),
                Value::from(span_context.span_id().to_string()),
            );
        }

        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(correlation) = span.extensions().get::<Correlation>() {
                    for (key, value) in &correlation.0 {
                        let clean = sanitizer.field(key, value);
                        line.insert((*key).to_owned(), Value::from(clean.as_ref()));
                    }
                }
            }
        }
        for (key, value) in fields.0 {
            line.entry(key).or_insert(value);
        }

        let mut buf = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
        buf.push(b'\n');
        // A failed write to stdout has nowhere to be reported; dropping the
        // line is the only option.
        let _ = (self.make_writer)().lock().write_all(&buf);
    }
}

/// A field's value after the sanitizer: by name, then by content (numbers
/// too: a card number can arrive as one).
fn sanitize_value(sanitizer: &crate::sanitize::Sanitizer, key: &str, value: &mut Value) {
    let text = match value {
        Value::String(text) => text.clone(),
        // Only whole numbers can be card numbers.
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return,
    };
    let clean = if key == "message" {
        sanitizer.scrub(&text)
    } else {
        sanitizer.field(key, &text)
    };
    if clean != text {
        *value = Value::String(clean.into_owned());
    }
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A `MakeWriter` for the human-readable format: each event's text is
/// buffered and scrubbed by the sanitizer before it reaches stdout (the
/// pretty formatter writes fields itself, so the JSON layer's per-field
/// sanitizing cannot apply).
pub struct SanitizedStdout;

pub struct ScrubbedEvent(Vec<u8>);

impl std::io::Write for ScrubbedEvent {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbedEvent {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let clean = crate::sanitize::global().scrub(&text);
        let _ = std::io::stdout().lock().write_all(clean.as_bytes());
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SanitizedStdout {
    type Writer = ScrubbedEvent;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedEvent(Vec::new())
    }
}
