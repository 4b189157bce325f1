//! `http`: an outbound call with `traceparent` injected, to allowed hosts only.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wire::step::HttpInput;

use super::StepOutcome;

/// Hosts an `http` step may call: `host`, `host:port` or `*.domain`.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<String>);

impl AllowList {
    pub fn parse(value: &str) -> Result<Self, String> {
        let entries: Vec<String> = value
            .split(',')
            .map(|e| {
                e.trim()
                    .trim_start_matches('[')
                    .replace(']', "")
                    .to_ascii_lowercase()
            })
            .filter(|e| !e.is_empty())
            .collect();
        if let Some(bad) = entries.iter().find(|e| e.contains('/') || e.contains(' ')) {
            return Err(format!("{bad:?} is not a host, host:port or *.domain"));
        }
        Ok(Self(entries))
    }

    pub fn permits(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let with_port = format!("{host}:{port}");
        self.0.iter().any(|entry| {
            if let Some(domain) = entry.strip_prefix("*.") {
                host.ends_with(&format!(".{domain}"))
            } else {
                *entry == host || *entry == with_port
            }
        })
    }
}

pub struct HttpBlock {
    client: reqwest::Client,
    allow: AllowList,
    max_body: usize,
}

impl HttpBlock {
    pub fn new(allow: AllowList, max_body: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            // A redirect could lead anywhere; the allowlist must see every hop.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            allow,
            max_body,
        })
    }

    pub async fn execute(&self, input: &HttpInput) -> StepOutcome {
        let url = match reqwest::Url::parse(&input.url) {
            Ok(url) => url,
            Err(e) => {
                return StepOutcome::failed("invalid_url", format!("invalid url: {e}"), false);
            }
        };
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        if !self.allow.permits(&host, port) {
            return StepOutcome::failed(
                "host_not_allowed",
                format!("host {host}:{port} is not in WORKER_HTTP_ALLOW"),
                false,
            );
        }
        let method = match reqwest::Method::from_bytes(input.method.as_bytes()) {
            Ok(method) => method,
            Err(_) => {
                return StepOutcome::failed(
                    "invalid_method",
                    format!("invalid method {}", input.method),
                    false,
                );
            }
        };
        let span = tracing::info_span!(
            "http.client",
            otel.name = method.as_str(),
            otel.kind = "client",
            otel.status_code = Empty,
            error.type = Empty,
            http.request.method = method.as_str(),
            server.address = host.as_str(),
            server.port = port,
            url.full = display_url(&url),
            http.response.status_code = Empty,
        );
        let mut headers = HeaderMap::new();
        for (name, value) in &input.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        telemetry::propagation::inject_http(&span.context(), &mut headers);
        let mut request = self
            .client
            .request(method, url)
            .headers(headers)
            .timeout(Duration::from_millis(input.timeout_ms));
        request = match &input.body {
            None => request,
            Some(Value::String(text)) => request.body(text.clone()),
            Some(json) => request.json(json),
        };
        let outcome = self.send(request).instrument(span.clone()).await;
        if let StepOutcome::Failed { code, message, .. } = &outcome {
            telemetry::spans::record_error(&span, code, message);
        }
        outcome
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> StepOutcome {
        let span = tracing::Span::current();
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return StepOutcome::failed("timeout", format!("request timed out: {e}"), true);
            }
            Err(e) if e.is_connect() => {
                return StepOutcome::failed(
                    "connection_failed",
                    format!("cannot connect: {e}"),
                    true,
                );
            }
            Err(e) => {
                return StepOutcome::failed("request_failed", format!("request failed: {e}"), true);
            }
        };
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.max_body.saturating_sub(body.len());
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    return StepOutcome::failed(
                        "timeout",
                        format!("reading the body timed out: {e}"),
                        true,
                    );
                }
                Err(e) => {
                    return StepOutcome::failed(
                        "request_failed",
                        format!("reading the body failed: {e}"),
                        true,
                    );
                }
            }
        }
        let body = match serde_json::from_slice::<Value>(&body) {
            Ok(json) if !truncated => json,
            _ => Value::String(String::from_utf8_lossy(&body).into_owned()),
        };
        if status.is_client_error() || status.is_server_error() {
            // 5xx and 429 may pass later; other 4xx will not.
            let retryable = status.is_server_error() || status.as_u16() == 429;
            return StepOutcome::failed(
                "http_status",
                format!("HTTP {}", status.as_u16()),
                retryable,
            );
        }
        StepOutcome::Succeeded(json!({
            "status": status.as_u16(),
            "content_type": content_type,
            "body": body,
            "truncated": truncated,
        }))
    }
}

/// The URL for spans: no credentials, query values replaced.
fn display_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if url.query().is_some() {
        let keys: Vec<String> = url
            .query_pairs()
            .map(|(k, _)| format!("{k}={}", telemetry::sanitize::REDACTED))
            .collect();
        shown.set_query(Some(&keys.join("&")));
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matches_hosts_ports_and_domains() {
        let allow =
            AllowList::parse("localhost, 127.0.0.1:8080, *.example.com, [::1]").expect("valid");
        assert!(allow.permits("localhost", 1234));
        assert!(allow.permits("127.0.0.1", 8080));
        assert!(!allow.permits("127.0.0.1", 8081));
        assert!(allow.permits("api.example.com", 443));
        assert!(!allow.permits("example.com.evil.io", 443));
        assert!(!allow.permits("notexample.com", 443));
        assert!(allow.permits("[::1]", 80));
        assert!(!allow.permits("10.0.0.1", 80));
        assert!(AllowList::parse("http://x").is_err());
    }

    #[test]
    fn urls_in_spans_carry_no_secrets() {
        let url = reqwest::Url::parse("http://user:pw@host:8080/p?token=abc&x=1").expect("url");
        assert_eq!(
            display_url(&url),
            "http://host:8080/p?token=[REDACTED]&x=[REDACTED]"
        );
    }
}
