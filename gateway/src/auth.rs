//! API keys → tenants. Keys are compared in constant time and never logged.

use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use wire::ids::TenantId;

use crate::ratelimit::AuthFailures;

/// The configured `tenant:key` pairs.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<(TenantId, String)>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tenants only: keys never reach a log line.
        f.debug_list()
            .entries(self.0.iter().map(|(t, _)| t))
            .finish()
    }
}

impl ApiKeys {
    /// Parses `tenant:key[,tenant:key…]`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, pair) in value
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let (tenant, key) = pair
                .split_once(':')
                .ok_or_else(|| format!("entry {} is not tenant:key", i + 1))?;
            let tenant = TenantId::parse(tenant.trim())
                .map_err(|e| format!("entry {}: tenant {e}", i + 1))?;
            let key = key.trim();
            if key.len() < 8 {
                return Err(format!(
                    "entry {}: key must be at least 8 characters",
                    i + 1
                ));
            }
            keys.push((tenant, key.to_owned()));
        }
        Ok(Self(keys))
    }

    /// Adds `other`'s keys (a key file next to the environment's keys).
    pub fn extend(&mut self, other: ApiKeys) {
        self.0.extend(other.0);
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.0.iter().map(|(t, _)| t)
    }

    /// The tenant whose key is `presented`. Every configured key is compared,
    /// in constant time, so timing does not reveal which one nearly matched.
    pub fn lookup(&self, presented: &str) -> Option<&TenantId> {
        let mut found = None;
        for (tenant, key) in &self.0 {
            if constant_time_eq(key.as_bytes(), presented.as_bytes()) {
                found = Some(tenant);
            }
        }
        found
    }

    /// The tenant named by the request's `Authorization: Bearer <key>`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<&TenantId> {
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.lookup(key.trim())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware in front of every API route: an address that has used up its
/// failed authentications ([`AuthFailures`]) is refused with 429 before its
/// key is looked at; a 401 answer counts one failure for its address.
pub async fn throttle_failures(
    axum::extract::State(failures): axum::extract::State<std::sync::Arc<AuthFailures>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let ip = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(ip) = ip
        && let Some(wait) = failures.blocked(ip)
    {
        let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        crate::events::AuthThrottled { retry_after_secs }.emit();
        return crate::error::ApiError::RateLimited(retry_after_secs).into_response();
    }
    let response = next.run(request).await;
    if let Some(ip) = ip
        && response.status() == axum::http::StatusCode::UNAUTHORIZED
    {
        failures.record_failure(ip);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_looks_up() {
        let keys = ApiKeys::parse("demo:demo-key, acme:acme-secret-1").expect("valid");
        assert_eq!(
            keys.lookup("acme-secret-1").map(TenantId::as_str),
            Some("acme")
        );
        assert_eq!(keys.lookup("demo-key").map(TenantId::as_str), Some("demo"));
        assert!(keys.lookup("demo-ke").is_none());
        assert!(keys.lookup("").is_none());
    }

    #[test]
    fn rejects_bad_entries_without_echoing_keys() {
        assert!(
            ApiKeys::parse("nokey")
                .expect_err("bad")
                .contains("entry 1")
        );
        let err = ApiKeys::parse("demo:short").expect_err("short");
        assert!(!err.contains("short:"), "{err}");
        assert!(
            !format!("{:?}", ApiKeys::parse("demo:demo-key").expect("ok")).contains("demo-key")
        );
    }

    #[test]
    fn bearer_scheme_is_required() {
        let keys = ApiKeys::parse("demo:demo-key").expect("valid");
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "Basic demo-key".parse().expect("header"));
        assert!(keys.authenticate(&headers).is_none());
        headers.insert(AUTHORIZATION, "Bearer demo-key".parse().expect("header"));
        assert_eq!(
            keys.authenticate(&headers).map(TenantId::as_str),
            Some("demo")
        );
    }
}
