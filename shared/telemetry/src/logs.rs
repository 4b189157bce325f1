//! The log layers: one JSON object per line on stdout, or the human-readable
//! format; both built by [`layer`], the only way a log line leaves a process.
//!
//! `tracing_subscriber`'s own JSON formatter knows nothing of OpenTelemetry, so
//! the JSON layer writes the line itself: timestamp, level, target, message,
//! `trace_id`/`span_id` of the current span, the correlation fields found in the
//! span scope (`tenant.id` → `tenant_id`, …) and the event's own fields.
//!
//! Every field of every event passes the sanitizer by name and by content,
//! whichever crate emitted it (sqlx's statements, hyper, async-nats, tonic, a
//! `log` record): the sanitizing sits in the field visitors, not at call sites.

use std::io::Write;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_log::NormalizeEvent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
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
        Self::new(std::io::stdout)
    }
}

impl<W> JsonLogLayer<W> {
    /// A layer writing to `make_writer` (tests capture lines this way).
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

impl<S, W> Layer<S> for JsonLogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
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
        let _ = self.make_writer.make_writer().write_all(&buf);
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

/// The log layer for `format` and the `RUST_LOG`-style `filter`, writing to
/// `make_writer`: what `init` installs (with stdout), and what tests install
/// to read the lines.
pub fn layer<S, W>(
    format: crate::LogFormat,
    filter: &str,
    make_writer: W,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::new(filter);
    match format {
        crate::LogFormat::Json => Box::new(JsonLogLayer::new(make_writer).with_filter(filter)),
        crate::LogFormat::Pretty => Box::new(
            tracing_subscriber::fmt::layer()
                // Our own multi-line format: tracing-subscriber's `Pretty`
                // writes an event's fields itself (with ANSI codes between
                // name and value that a scan of the finished text cannot see
                // through), so a password field went out as it was.
                .event_format(HumanEvent)
                .fmt_fields(SanitizedFields)
                .with_ansi(false)
                .with_writer(Scrubbed(make_writer))
                .with_filter(filter),
        ),
    }
}

/// The human-readable event format: a header line with the event's fields
/// (formatted by the layer's field formatter, [`SanitizedFields`]), then
/// where it was emitted and the span scope with each span's fields.
pub struct HumanEvent;

impl<S, N> FormatEvent<S, N> for HumanEvent
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // A `log` record's own target and location, not the bridge's.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(
            writer,
            "  {} {:>5} {}: ",
            rfc3339_now(),
            meta.level(),
            meta.target()
        )?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)?;
        if let (Some(file), Some(line)) = (meta.file(), meta.line()) {
            writeln!(writer, "    at {file}:{line}")?;
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                write!(
                    writer,
                    "    in {}::{}",
                    span.metadata().target(),
                    span.name()
                )?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, " with {fields}")?;
                }
                writeln!(writer)?;
            }
        }
        writeln!(writer)
    }
}

/// Formats an event's or a span's fields as `name: value`, each value
/// sanitized by its field's name (the message by content).
pub struct SanitizedFields;

impl<'w> FormatFields<'w> for SanitizedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut visitor = SanitizingWriter {
            writer,
            sanitizer: crate::sanitize::global(),
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct SanitizingWriter<'w> {
    writer: Writer<'w>,
    sanitizer: &'static crate::sanitize::Sanitizer,
    first: bool,
    result: std::fmt::Result,
}

impl SanitizingWriter<'_> {
    fn write(&mut self, field: &Field, clean: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { ", " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{clean}")
        } else {
            write!(self.writer, "{separator}{}: {clean}", field.name())
        };
    }

    fn text(&mut self, field: &Field, value: &str) {
        // A `log` record's metadata, shown in the header instead.
        if field.name().starts_with("log.") {
            return;
        }
        let clean = if field.name() == "message" {
            self.sanitizer.scrub(value)
        } else {
            self.sanitizer.field(field.name(), value)
        };
        self.write(field, &clean);
    }
}

impl Visit for SanitizingWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.text(field, &value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.text(field, &value.to_string());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write(field, &value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.text(field, if value { "true" } else { "false" });
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, &value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text(field, &format!("{value:?}"));
    }
}

/// A `MakeWriter` whose writers buffer one event's text and scrub it whole
/// before it reaches the inner writer: a second pass over what the
/// formatter adds itself (span names, the target).
pub struct Scrubbed<W>(W);

pub struct ScrubbedEvent<O: std::io::Write>(Vec<u8>, O);

impl<O: std::io::Write> std::io::Write for ScrubbedEvent<O> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<O: std::io::Write> Drop for ScrubbedEvent<O> {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let clean = crate::sanitize::global().scrub(&text);
        // A failed write to stdout has nowhere to be reported.
        let _ = self.1.write_all(clean.as_bytes());
    }
}

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Scrubbed<W> {
    type Writer = ScrubbedEvent<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedEvent(Vec::new(), self.0.make_writer())
    }
}
