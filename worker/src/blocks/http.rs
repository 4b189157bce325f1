//! `http`: an outbound call to allowed targets only, `traceparent` injected.
//!
//! Two checks guard every call. The URL's host and port must match an entry of
//! `WORKER_HTTP_ALLOW` (an entry without a port means the scheme's default
//! port). And every address a connection is made to, as resolved for that
//! connection by [`GuardedResolver`], must be a public address unless an IP or
//! CIDR entry lists it: a name that resolves (or is rebound) to loopback,
//! private, link-local or other special-purpose ranges is refused, so the
//! worker cannot be turned against NATS monitoring, admin ports or the
//! gateway. Redirects are not followed and no proxy is used, so the checks see
//! the real peer. Only `traceparent`/`tracestate` are injected: baggage stays
//! inside Beamline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wire::step::HttpInput;

use super::StepOutcome;

/// Headers a step may not set: they frame the request or pick its target,
/// which is the worker's business (request smuggling, virtual-host hopping).
pub const FORBIDDEN_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// An address block `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr.parse::<IpAddr>().ok()?, prefix.parse::<u8>().ok()?),
            None => {
                let addr = text.parse::<IpAddr>().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an ordinary address on the internet. Loopback, private,
/// shared (CGNAT), link-local, unspecified, documentation, benchmarking,
/// multicast, reserved and NAT64 ranges are not.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => !is_special_v4(v4),
        IpAddr::V6(v6) => !is_special_v6(v6),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0064 && s[1] == 0xff9b)
        // IPv4-compatible (::a.b.c.d, deprecated) and other ::/96 forms.
        || s[..6].iter().all(|x| *x == 0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// An exact host name.
    Host(String),
    /// `*.domain`: any name below `domain`.
    Domain(String),
    /// An IP address or CIDR block.
    Net(Net),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    target: Target,
    /// `None`: the scheme's default port only.
    port: Option<u16>,
}

/// Targets an `http` step may call (`WORKER_HTTP_ALLOW`): `host`, `host:port`,
/// `*.domain[:port]`, `ip[:port]`, `cidr[:port]` (IPv6 in brackets). Empty by
/// default: nothing may be called.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<Entry>);

impl AllowList {
    pub fn parse(value: &str) -> Result<Self, String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|raw| parse_entry(raw).ok_or_else(|| format!("{raw:?} is not a host, host:port, *.domain, IP or CIDR (IPv6 in brackets, [::1]:8080)")))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a URL with this host may be called on `port`; `default_port` is
    /// its scheme's.
    pub fn permits(&self, host: &str, port: u16, default_port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.0.iter().any(|entry| {
            let port_ok = entry.port.unwrap_or(default_port) == port;
            port_ok
                && match (&entry.target, ip) {
                    (Target::Net(net), Some(ip)) => net.contains(ip),
                    (Target::Host(name), None) => *name == host,
                    (Target::Domain(domain), None) => host
                        .strip_suffix(domain.as_str())
                        .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                    _ => false,
                }
        })
    }

    /// Whether a connection may be made to `ip`: public addresses may, the
    /// others only when an IP or CIDR entry lists them.
    pub fn permits_address(&self, ip: IpAddr) -> bool {
        is_public(ip)
            || self.0.iter().any(|entry| match &entry.target {
                Target::Net(net) => net.contains(ip),
                _ => false,
            })
    }
}

fn parse_entry(raw: &str) -> Option<Entry> {
    let raw = raw.to_ascii_lowercase();
    let (target, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
        };
        let net = Net::parse(inside).filter(|n| n.addr.is_ipv6())?;
        return Some(Entry {
            target: Target::Net(net),
            port,
        });
    } else if raw.matches(':').count() > 1 {
        // A bare IPv6 address or block: no port (brackets carry one).
        (raw.as_str(), None)
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port.parse::<u16>().ok()?)),
            None => (raw.as_str(), None),
        }
    };
    if port == Some(0) {
        return None;
    }
    if let Some(net) = Net::parse(target) {
        return Some(Entry {
            target: Target::Net(net),
            port,
        });
    }
    let (wildcard, name) = match target.strip_prefix("*.") {
        Some(domain) => (true, domain),
        None => (false, target),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid || name.parse::<IpAddr>().is_ok() {
        return None;
    }
    let target = if wildcard {
        Target::Domain(name.to_owned())
    } else {
        Target::Host(name.to_owned())
    };
    Some(Entry { target, port })
}

/// A connection was refused: the name resolved only to addresses the
/// allowlist does not permit.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {addresses}, not a public address and not listed in WORKER_HTTP_ALLOW")]
pub struct AddressRefused {
    host: String,
    addresses: String,
}

type Lookup = dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> + Send + Sync;

/// The client's DNS resolver: resolves with the system resolver, then keeps
/// only the addresses the allowlist permits. It runs for every new
/// connection, so a name rebound to an internal address after the URL check
/// is refused at connect time, and the connection uses exactly the addresses
/// checked.
pub struct GuardedResolver {
    allow: AllowList,
    lookup: Arc<Lookup>,
}

impl GuardedResolver {
    pub fn new(allow: AllowList) -> Self {
        Self::with_lookup(
            allow,
            Arc::new(|host: String| {
                Box::pin(async move {
                    Ok(tokio::net::lookup_host((host.as_str(), 0))
                        .await?
                        .map(|addr| addr.ip())
                        .collect())
                }) as BoxFuture<'static, _>
            }),
        )
    }

    /// A resolver with its own name lookup (tests play a rebinding DNS server).
    pub fn with_lookup(allow: AllowList, lookup: Arc<Lookup>) -> Self {
        Self { allow, lookup }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        let lookup = (self.lookup)(host.clone());
        Box::pin(async move {
            let resolved = lookup.await?;
            let permitted: Vec<SocketAddr> = resolved
                .iter()
                .filter(|ip| allow.permits_address(**ip))
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
            if permitted.is_empty() {
                let addresses = resolved
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Box::new(AddressRefused { host, addresses }) as _);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
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
            // A proxy would hide the real peer from the address check.
            .no_proxy()
            .dns_resolver(GuardedResolver::new(allow.clone()))
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
        if !matches!(url.scheme(), "http" | "https") {
            return StepOutcome::failed(
                "invalid_url",
                format!("scheme {} is not http or https", url.scheme()),
                false,
            );
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let default_port = if url.scheme() == "https" { 443 } else { 80 };
        let port = url.port().unwrap_or(default_port);
        if !self.allow.permits(&host, port, default_port) {
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
        let headers = match step_headers(input) {
            Ok(mut headers) => {
                // Trace context only: baggage (the tenant, a client's entries)
                // is not for third parties.
                telemetry::propagation::inject_http_trace_context(&span.context(), &mut headers);
                headers
            }
            Err(outcome) => {
                if let StepOutcome::Failed { code, message, .. } = &outcome {
                    telemetry::spans::record_error(&span, code, message);
                }
                return outcome;
            }
        };
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
            Err(e) if refused_address(&e).is_some() => {
                let reason = refused_address(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                return StepOutcome::failed("address_not_allowed", reason, false);
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

/// The step's own headers, refused whole when one is invalid or forbidden.
fn step_headers(input: &HttpInput) -> Result<HeaderMap, StepOutcome> {
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let Ok(name) = HeaderName::try_from(name.as_str()) else {
            return Err(StepOutcome::failed(
                "invalid_header",
                format!("{name:?} is not a valid header name"),
                false,
            ));
        };
        if FORBIDDEN_HEADERS.contains(&name.as_str()) {
            return Err(StepOutcome::failed(
                "header_not_allowed",
                format!("a step may not set the {name} header"),
                false,
            ));
        }
        let Ok(value) = HeaderValue::from_str(value) else {
            return Err(StepOutcome::failed(
                "invalid_header",
                format!("the value of {name} is not a valid header value"),
                false,
            ));
        };
        headers.insert(name, value);
    }
    Ok(headers)
}

/// The [`AddressRefused`] somewhere in a request error's causes.
fn refused_address(error: &reqwest::Error) -> Option<&AddressRefused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<AddressRefused>() {
            return Some(refused);
        }
        source = cause.source();
    }
    None
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
        let allow = AllowList::parse(
            "api.partner.io, echo:8080, *.example.com, 127.0.0.1:18080, [::1]:9000, 10.1.0.0/16",
        )
        .expect("valid");
        // No port in the entry: the scheme's default port only.
        assert!(allow.permits("api.partner.io", 80, 80));
        assert!(allow.permits("api.partner.io", 443, 443));
        assert!(!allow.permits("api.partner.io", 4222, 80));
        assert!(allow.permits("echo", 8080, 80));
        assert!(!allow.permits("echo", 80, 80));
        assert!(allow.permits("api.example.com", 443, 443));
        assert!(!allow.permits("example.com.evil.io", 443, 443));
        assert!(!allow.permits("notexample.com", 443, 443));
        assert!(!allow.permits("example.com", 443, 443));
        assert!(allow.permits("127.0.0.1", 18080, 80));
        assert!(!allow.permits("127.0.0.1", 4222, 80));
        assert!(allow.permits("[::1]", 9000, 80));
        assert!(allow.permits("10.1.2.3", 80, 80));
        assert!(!allow.permits("10.2.0.1", 80, 80));
        // A name is never matched by an address entry, nor an address by a name.
        assert!(!allow.permits("localhost", 18080, 80));
        for bad in [
            "http://x",
            "a b",
            "host:0",
            "host:99999",
            "10.0.0.0/33",
            "[::1",
            "*.",
        ] {
            assert!(AllowList::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowList::parse("").expect("empty").is_empty());
    }

    #[test]
    fn internal_addresses_need_an_explicit_entry() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!(!is_public(ip), "{ip}");
            assert!(!AllowList::default().permits_address(ip), "{ip}");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
        let allow = AllowList::parse("127.0.0.1:18080,172.16.0.0/12").expect("valid");
        assert!(allow.permits_address("127.0.0.1".parse().expect("ip")));
        assert!(allow.permits_address("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(allow.permits_address("172.18.0.3".parse().expect("ip")));
        assert!(!allow.permits_address("127.0.0.2".parse().expect("ip")));
        assert!(!allow.permits_address("192.168.0.1".parse().expect("ip")));
    }

    /// A DNS server that answers with a public address first and loopback
    /// afterwards (rebinding): the second connection is refused.
    #[tokio::test]
    async fn dns_rebinding_to_loopback_is_refused_at_connect() {
        let answers = Arc::new(std::sync::Mutex::new(vec![
            "127.0.0.1".parse::<IpAddr>().expect("ip"),
            "93.184.216.34".parse::<IpAddr>().expect("ip"),
        ]));
        let resolver = GuardedResolver::with_lookup(
            AllowList::parse("rebind.example:8080").expect("valid"),
            Arc::new(move |_| {
                let answer = answers.lock().expect("lock").pop();
                Box::pin(async move { Ok(answer.into_iter().collect()) }) as BoxFuture<'static, _>
            }),
        );
        let first: Vec<SocketAddr> = resolver
            .resolve("rebind.example".parse().expect("name"))
            .await
            .expect("the public answer is permitted")
            .collect();
        assert_eq!(first, vec!["93.184.216.34:0".parse().expect("addr")]);
        let second = resolver
            .resolve("rebind.example".parse().expect("name"))
            .await
            .err()
            .expect("the rebound answer is refused");
        assert!(second.to_string().contains("127.0.0.1"), "{second}");
    }

    #[test]
    fn framing_headers_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "CONNECTION",
            "Upgrade",
        ] {
            let input = HttpInput {
                method: "GET".into(),
                url: "http://x/".into(),
                headers: [(name.to_owned(), "x".to_owned())].into_iter().collect(),
                body: None,
                timeout_ms: 1000,
            };
            match step_headers(&input) {
                Err(StepOutcome::Failed { code, .. }) => assert_eq!(code, "header_not_allowed"),
                other => panic!("{name}: {other:?}"),
            }
        }
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
