//! W3C trace context and baggage through NATS and HTTP headers.
//!
//! Everything goes through the global propagator installed by [`crate::init`]
//! (TraceContext + Baggage); nothing here formats a `traceparent` by hand.
//! NATS header names are case-sensitive, so extraction compares names without
//! regard to case: Go clients write `Traceparent`, browsers `traceparent`.
//!
//! A `traceparent` is continued only if it is well-formed to the letter
//! ([`is_valid_traceparent`]): the SDK's parser does not check the lengths of
//! the ids, so `00-1-1-01` would otherwise continue trace `000…001` and
//! unrelated junk clients would share one trace. Anything else starts a new
//! trace, in every extractor (HTTP, gRPC metadata, NATS headers).
//!
//! Baggage is filtered where it enters: a client's `baggage` header keeps only
//! the keys of `TELEMETRY_BAGGAGE_ALLOW` (none by default), a NATS message's
//! keeps those plus `tenant.id`. Calls to third parties (the worker's `http`
//! steps) carry trace context only ([`inject_http_trace_context`]).

use opentelemetry::Context;
use opentelemetry::baggage::{Baggage, BaggageExt};
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into a NATS message's headers.
pub struct NatsInjector<'a>(pub &'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when there is none.
        if !value.is_empty() {
            self.0.insert(key, value);
        }
    }
}

/// Reads propagation fields from a NATS message's headers, ignoring case.
pub struct NatsExtractor<'a>(pub &'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| header_name(name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| header_name(name)).collect()
    }
}

fn header_name(name: &async_nats::header::HeaderName) -> &str {
    AsRef::<str>::as_ref(name)
}

/// Writes propagation fields into HTTP headers.
pub struct HttpInjector<'a>(pub &'a mut http::HeaderMap);

impl Injector for HttpInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads propagation fields from HTTP headers (whose names are case-insensitive).
pub struct HttpExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The `traceparent` header name (the propagator's key).
const TRACEPARENT: &str = "traceparent";

/// Whether `value` is a W3C `traceparent` worth continuing: `version-traceid-
/// spanid-flags` as `^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}`,
/// version not `ff`, exactly those four parts for version `00` (a later
/// version may append `-…` parts), and neither id all zeros. Surrounding
/// spaces and tabs (HTTP's optional whitespace) are allowed.
pub fn is_valid_traceparent(value: &str) -> bool {
    let value = value.trim_matches([' ', '\t']);
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return false;
    }
    let lower_hex = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let all_zero = |range: std::ops::Range<usize>| bytes[range].iter().all(|&b| b == b'0');
    let shape = lower_hex(0..2)
        && bytes[2] == b'-'
        && lower_hex(3..35)
        && bytes[35] == b'-'
        && lower_hex(36..52)
        && bytes[52] == b'-'
        && lower_hex(53..55);
    if !shape || &value[0..2] == "ff" || all_zero(3..35) || all_zero(36..52) {
        return false;
    }
    match &value[0..2] {
        "00" => bytes.len() == 55,
        _ => bytes.len() == 55 || bytes[55] == b'-',
    }
}

/// Hides a `traceparent` that [`is_valid_traceparent`] refuses from the
/// propagator (and with it `tracestate`, which needs a parent).
struct StrictTraceparent<'a>(&'a dyn Extractor);

impl Extractor for StrictTraceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?;
        if key.eq_ignore_ascii_case(TRACEPARENT) && !is_valid_traceparent(value) {
            return None;
        }
        Some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys()
    }
}

/// Injects `cx` into NATS headers.
pub fn inject_nats(cx: &Context, headers: &mut async_nats::HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut NatsInjector(headers)));
}

/// Extracts the remote context from NATS headers. Missing or malformed headers
/// give an empty context, so the next span starts a new trace. Baggage keeps
/// `tenant.id` and the allowed keys only.
pub fn extract_nats(headers: Option<&async_nats::HeaderMap>) -> Context {
    match headers {
        Some(headers) => filter_baggage(
            global::get_text_map_propagator(|p| {
                p.extract(&StrictTraceparent(&NatsExtractor(headers)))
            }),
            &[TENANT_BAGGAGE_KEY],
        ),
        None => Context::new(),
    }
}

/// Injects `cx` into HTTP headers, baggage included: for Beamline's own
/// components. Calls to anyone else use [`inject_http_trace_context`].
pub fn inject_http(cx: &Context, headers: &mut http::HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HttpInjector(headers)));
}

/// Injects `traceparent` and `tracestate` only, never baggage: for requests
/// to third parties, who must not learn the tenant or a client's entries.
pub fn inject_http_trace_context(cx: &Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HttpInjector(headers));
}

/// Extracts the remote context from HTTP headers (a client's request, or
/// gRPC metadata); a malformed `traceparent` gives an empty context, like a
/// missing one. Its baggage keeps the allowed keys only.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    filter_baggage(
        global::get_text_map_propagator(|p| p.extract(&StrictTraceparent(&HttpExtractor(headers)))),
        &[],
    )
}

static BAGGAGE_ALLOW: OnceLock<Vec<String>> = OnceLock::new();

/// Sets the baggage keys kept on extraction (`TELEMETRY_BAGGAGE_ALLOW`).
/// The first call wins; without one no key is kept (besides `tenant.id` on NATS).
pub fn allow_baggage_keys(keys: Vec<String>) {
    let _ = BAGGAGE_ALLOW.set(keys);
}

/// `cx` with only the baggage entries whose key is allowed or in `also`.
fn filter_baggage(cx: Context, also: &[&str]) -> Context {
    let baggage = cx.baggage();
    if baggage.is_empty() {
        return cx;
    }
    let allowed = BAGGAGE_ALLOW.get().map(Vec::as_slice).unwrap_or_default();
    let kept: Baggage = baggage
        .iter()
        .filter(|(key, _)| {
            also.contains(&key.as_str()) || allowed.iter().any(|a| a.as_str() == key.as_str())
        })
        .map(|(k, (v, m))| (k.clone(), (v.clone(), m.clone())))
        .collect();
    cx.with_baggage(kept)
}

/// The baggage key that carries the tenant between components.
pub const TENANT_BAGGAGE_KEY: &str = "tenant.id";

/// `cx` with `tenant.id` set in its baggage (other entries kept).
pub fn with_tenant(cx: &Context, tenant: &str) -> Context {
    let mut baggage: Baggage = cx
        .baggage()
        .iter()
        .filter(|(key, _)| key.as_str() != TENANT_BAGGAGE_KEY)
        .map(|(k, (v, m))| (k.clone(), (v.clone(), m.clone())))
        .collect();
    baggage.insert(TENANT_BAGGAGE_KEY, tenant.to_owned());
    cx.with_baggage(baggage)
}

/// NATS headers carrying the context of `span`, with the tenant as baggage.
pub fn nats_headers_for(span: &tracing::Span, tenant: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    inject_nats(&with_tenant(&span.context(), tenant), &mut headers);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry::baggage::BaggageExt;
    use opentelemetry::propagation::TextMapCompositePropagator;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
    use proptest::prelude::*;

    fn install() {
        global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]));
    }

    fn remote(trace: u128, span: u64, sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            flags,
            true,
            TraceState::default(),
        ))
    }

    /// Every letter-case variant of `name`, chosen by the bits of `mask`.
    fn recase(name: &str, mask: u64) -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn nats_round_trip_in_any_letter_case(
            trace in 1u128..,
            span in 1u64..,
            sampled: bool,
            tenant in "[a-z][a-z0-9-]{0,15}",
            mask: u64,
        ) {
            install();
            let cx = remote(trace, span, sampled)
                .with_baggage(vec![KeyValue::new("tenant.id", tenant.clone())]);
            let mut injected = async_nats::HeaderMap::new();
            inject_nats(&cx, &mut injected);

            // Re-write every header under a recased name, as another client might.
            let mut recased = async_nats::HeaderMap::new();
            for (name, values) in injected.iter() {
                for value in values {
                    recased.append(recase(header_name(name), mask), value.as_str());
                }
            }
            let out = extract_nats(Some(&recased));
            let sc = out.span().span_context().clone();
            prop_assert_eq!(sc.trace_id(), TraceId::from(trace));
            prop_assert_eq!(sc.span_id(), SpanId::from(span));
            prop_assert_eq!(sc.is_sampled(), sampled);
            prop_assert!(sc.is_remote());
            prop_assert_eq!(
                out.baggage().get("tenant.id").map(|v| v.to_string()),
                Some(tenant)
            );
        }

        #[test]
        fn http_round_trip(trace in 1u128.., span in 1u64.., sampled: bool) {
            install();
            let mut headers = http::HeaderMap::new();
            inject_http(&remote(trace, span, sampled), &mut headers);
            let out = extract_http(&headers);
            let sc = out.span().span_context().clone();
            prop_assert_eq!(sc.trace_id(), TraceId::from(trace));
            prop_assert_eq!(sc.span_id(), SpanId::from(span));
            prop_assert_eq!(sc.is_sampled(), sampled);
        }

        #[test]
        fn garbage_traceparent_gives_no_parent(value in "\\PC{0,80}") {
            install();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("traceparent", value.as_str());
            let sc = extract_nats(Some(&headers)).span().span_context().clone();
            // Only a value that passes the strict check is continued.
            prop_assert_eq!(sc.is_valid(), is_valid_traceparent(&value), "{:?}", value);
        }

        #[test]
        fn near_misses_of_a_valid_traceparent_start_a_new_trace(
            (valid, miss) in near_miss(),
        ) {
            install();
            // The unmutated value is continued: the check is not just refusing everything.
            prop_assert!(continued_nats(&valid) && continued_http(&valid), "{}", valid);
            prop_assert!(!is_valid_traceparent(&miss), "{:?}", miss);
            prop_assert!(!continued_nats(&miss), "NATS continued {:?}", miss);
            prop_assert!(!continued_http(&miss), "HTTP continued {:?}", miss);
        }
    }

    /// A valid `traceparent`'s parts: trace id, span id, flags.
    fn valid_parts() -> impl Strategy<Value = (String, String, String)> {
        (1u128.., 1u64.., 0u8..=255).prop_map(|(trace, span, flags)| {
            (
                format!("{trace:032x}"),
                format!("{span:016x}"),
                format!("{flags:02x}"),
            )
        })
    }

    /// A valid `traceparent` and one near miss of it: each of the ways the
    /// SDK's parser alone lets a malformed value through, and the neighbours.
    fn near_miss() -> impl Strategy<Value = (String, String)> {
        (valid_parts(), 0usize..22, any::<prop::sample::Index>()).prop_map(
            |((trace, span, flags), mutation, at)| {
                let valid = format!("00-{trace}-{span}-{flags}");
                let join = |v: &str, t: &str, s: &str, f: &str| format!("{v}-{t}-{s}-{f}");
                let upper = |hex: &str| {
                    // Uppercase one letter (forcing one in if there is none).
                    let mut chars: Vec<char> = hex.chars().collect();
                    let letters: Vec<usize> = (0..chars.len())
                        .filter(|&i| chars[i].is_ascii_alphabetic())
                        .collect();
                    if letters.is_empty() {
                        let i = at.index(chars.len());
                        chars[i] = 'A';
                    } else {
                        let i = letters[at.index(letters.len())];
                        chars[i] = chars[i].to_ascii_uppercase();
                    }
                    chars.into_iter().collect::<String>()
                };
                let miss = match mutation {
                    0 => join("00", &trace[1..], &span, &flags), // 31-hex trace id
                    1 => join("00", &format!("{trace}0"), &span, &flags), // 33
                    2 => join("00", &trace, &span[1..], &flags), // 15-hex span id
                    3 => join("00", &trace, &format!("{span}0"), &flags), // 17
                    4 => format!("00-{trace}-{span}--1"),        // flags `-1`
                    5 => join("0-", &trace, &span, &flags),      // version `0-`
                    6 => "00-1-1-01".to_owned(),
                    7 => join("00", &format!("+{}", &trace[1..]), &span, &flags),
                    8 => join("00", &trace, &format!("+{}", &span[1..]), &flags),
                    9 => join("00", &upper(&trace), &span, &flags),
                    10 => join("00", &trace, &upper(&span), &flags),
                    11 => join("00", &trace, &span, &upper(&format!("{flags}a")[1..])),
                    12 => format!("{valid}-00"), // extra part for 00
                    13 => format!("{valid}-"),
                    14 => join("00", &"0".repeat(32), &span, &flags), // zero trace id
                    15 => join("00", &trace, &"0".repeat(16), &flags), // zero span id
                    16 => join("ff", &trace, &span, &flags),
                    17 => join("0", &trace, &span, &flags), // 1-digit version
                    18 => join("00", &trace, &span, &flags[1..]), // 1-digit flags
                    19 => format!("00-{trace}-{span}"),     // three parts
                    20 => join(
                        "00",
                        &trace.replacen(|c: char| c.is_ascii_hexdigit(), "g", 1),
                        &span,
                        &flags,
                    ),
                    _ => format!("00_{trace}_{span}_{flags}"),
                };
                (valid, miss)
            },
        )
    }

    fn continued_nats(value: &str) -> bool {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", value);
        extract_nats(Some(&headers))
            .span()
            .span_context()
            .is_valid()
    }

    fn continued_http(value: &str) -> bool {
        let mut headers = http::HeaderMap::new();
        match http::HeaderValue::from_str(value) {
            Ok(v) => headers.insert("traceparent", v),
            // Not even a header value: nothing to continue.
            Err(_) => return false,
        };
        extract_http(&headers).span().span_context().is_valid()
    }

    #[test]
    fn the_issue_s_examples_are_refused_and_later_versions_accepted() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let span = "00f067aa0ba902b7";
        for miss in [
            format!("00-{}-{span}-01", &trace[1..]),
            format!("00-{trace}-{}-01", &span[1..]),
            format!("00-{trace}-{span}--1"),
            format!("0--{trace}-{span}-01"),
            "00-1-1-01".to_owned(),
            format!("00-+{}-{span}-01", &trace[1..]),
        ] {
            assert!(!is_valid_traceparent(&miss), "{miss}");
        }
        assert!(is_valid_traceparent(&format!("00-{trace}-{span}-01")));
        // A later version may carry more parts; ff never exists.
        assert!(is_valid_traceparent(&format!(
            "01-{trace}-{span}-01-future"
        )));
        assert!(!is_valid_traceparent(&format!(
            "01-{trace}-{span}-01future"
        )));
        assert!(!is_valid_traceparent(&format!("ff-{trace}-{span}-01")));
    }

    #[test]
    fn go_style_header_name_is_read() {
        install();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let sc = extract_nats(Some(&headers)).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
    }

    #[test]
    fn client_baggage_is_filtered_to_the_allowed_keys() {
        install();
        allow_baggage_keys(vec!["experiment".to_owned()]);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "baggage",
            http::HeaderValue::from_static("password=hunter2,tenant.id=evil,experiment=b"),
        );
        let cx = extract_http(&headers);
        let keys: Vec<String> = cx.baggage().iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, vec!["experiment".to_owned()]);

        let mut nats = async_nats::HeaderMap::new();
        nats.insert("baggage", "password=hunter2,tenant.id=acme,experiment=b");
        let cx = extract_nats(Some(&nats));
        let mut keys: Vec<String> = cx.baggage().iter().map(|(k, _)| k.to_string()).collect();
        keys.sort();
        assert_eq!(keys, vec!["experiment".to_owned(), "tenant.id".to_owned()]);
    }

    #[test]
    fn third_parties_get_trace_context_only() {
        install();
        let cx = with_tenant(&remote(7, 9, true), "acme");
        let mut headers = http::HeaderMap::new();
        inject_http_trace_context(&cx, &mut headers);
        let names: Vec<&str> = headers.keys().map(http::HeaderName::as_str).collect();
        assert_eq!(names, vec!["traceparent"]);
        let mut internal = http::HeaderMap::new();
        inject_http(&cx, &mut internal);
        assert!(internal.contains_key("baggage"));
    }

    #[test]
    fn missing_headers_give_empty_context() {
        install();
        assert!(!extract_nats(None).span().span_context().is_valid());
    }
}
