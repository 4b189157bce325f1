//! The span exporter wrapper that runs every exported span through the
//! sanitizer: name, attributes, events, link attributes and status message.
//! Wrapping the exporter (not the call sites) is what makes it fail closed:
//! a span attribute added anywhere, by any crate, passes through here.

use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::Status;
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

use crate::sanitize::{self, Sanitizer};

#[derive(Debug)]
pub struct SanitizingExporter<E> {
    inner: E,
}

impl<E> SanitizingExporter<E> {
    pub fn new(inner: E) -> Self {
        Self { inner }
    }
}

impl<E: SpanExporter> SpanExporter for SanitizingExporter<E> {
    fn export(
        &self,
        mut batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let sanitizer = sanitize::global();
        for span in &mut batch {
            sanitize_span(sanitizer, span);
        }
        self.inner.export(batch)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Sanitizes one span in place.
pub fn sanitize_span(sanitizer: &Sanitizer, span: &mut SpanData) {
    let name = sanitizer.scrub(&span.name);
    if name != span.name {
        span.name = Cow::Owned(name.into_owned());
    }
    attributes(sanitizer, &mut span.attributes);
    for event in span.events.events.iter_mut() {
        let name = sanitizer.scrub(&event.name);
        if name != event.name {
            event.name = Cow::Owned(name.into_owned());
        }
        attributes(sanitizer, &mut event.attributes);
    }
    for link in span.links.links.iter_mut() {
        attributes(sanitizer, &mut link.attributes);
    }
    if let Status::Error { description } = &span.status {
        let clean = sanitizer.scrub(description);
        if clean != *description {
            span.status = Status::error(clean.into_owned());
        }
    }
}

fn attributes(sanitizer: &Sanitizer, attributes: &mut [KeyValue]) {
    for kv in attributes.iter_mut() {
        // Borrowed, not copied: this runs for every attribute of every span.
        let key = kv.key.as_str();
        let clean = match &kv.value {
            Value::String(text) => {
                let clean = sanitizer.field(key, text.as_str());
                (clean != text.as_str()).then(|| Value::String(clean.into_owned().into()))
            }
            // A card number can arrive as a number.
            Value::I64(n) if n.unsigned_abs() >= 1_000_000_000_000 => {
                let text = n.to_string();
                let clean = sanitizer.field(key, &text);
                (clean != text.as_str()).then(|| Value::String(clean.into_owned().into()))
            }
            Value::Array(Array::String(items)) => {
                let cleaned: Vec<Cow<'_, str>> = items
                    .iter()
                    .map(|item| sanitizer.field(key, item.as_str()))
                    .collect();
                cleaned
                    .iter()
                    .any(|item| matches!(item, Cow::Owned(_)))
                    .then(|| {
                        Value::Array(Array::String(
                            cleaned
                                .into_iter()
                                .map(|item| StringValue::from(item.into_owned()))
                                .collect(),
                        ))
                    })
            }
            _ if sanitizer.is_sensitive_name(key) => Some(Value::String(sanitize::REDACTED.into())),
            _ => None,
        };
        if let Some(value) = clean {
            kv.value = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    #[test]
    fn every_part_of_a_span_is_sanitized() {
        let sanitizer = Sanitizer::new(&[], &[]).expect("sanitizer");
        let mut events = SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            "exception",
            std::time::SystemTime::now(),
            vec![KeyValue::new(
                "exception.message",
                "login as bob@example.com with password=hunter2",
            )],
            0,
        ));
        let mut span = SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "GET /users/alice@example.com".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("http.request.header.authorization", "Bearer abcdef123456"),
                KeyValue::new("user_agent.original", "curl token=abcdef"),
                KeyValue::new("card", 4_111_111_111_111_111i64),
                KeyValue::new("http.response.status_code", 200i64),
                // An id whose digits Luhn-check: never masked (issue 10).
                KeyValue::new("run.id", "018e4f45-9fb8-7158-8920-215968893861"),
                KeyValue::new("url.full", "https://x.test/cb?sig=abc123&page=2"),
            ],
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: Status::error("charge 4111 1111 1111 1111 failed"),
            instrumentation_scope: Default::default(),
        };
        sanitize_span(&sanitizer, &mut span);
        let dump = format!("{span:?}");
        for leaked in [
            "alice@example.com",
            "bob@example.com",
            "hunter2",
            "abcdef123456",
            "token=abcdef",
            "4111111111111111",
            "4111 1111",
        ] {
            assert!(!dump.contains(leaked), "{leaked} leaked: {dump}");
        }
        assert_eq!(span.attributes[3].value, Value::I64(200));
        assert_eq!(
            span.attributes[4].value,
            Value::from("018e4f45-9fb8-7158-8920-215968893861")
        );
        assert_eq!(
            span.attributes[5].value,
            Value::from("https://x.test/cb?sig=[REDACTED]&page=[REDACTED]")
        );
    }
}
