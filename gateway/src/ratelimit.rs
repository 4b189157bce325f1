//! Per-tenant token buckets. Pure bookkeeping on `tokio::time::Instant`, so
//! tests drive it with paused time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use wire::ids::TenantId;

/// A bucket's shape: refill rate (tokens per second) and capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub rate: f64,
    pub burst: f64,
}

/// The configured limits: a default and per-tenant overrides. A rate of 0
/// means unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub default: Limit,
    pub per_tenant: HashMap<TenantId, Limit>,
}

impl Limits {
    /// Parses `tenant=rate:burst[,tenant=rate:burst…]`.
    pub fn parse_overrides(value: &str) -> Result<HashMap<TenantId, Limit>, String> {
        let mut out = HashMap::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (tenant, limit) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not tenant=rate:burst"))?;
            let (rate, burst) = limit
                .split_once(':')
                .ok_or_else(|| format!("{entry:?} is not tenant=rate:burst"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: rate is not a number"))?;
            let burst: f64 = burst
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: burst is not a number"))?;
            if rate < 0.0 || burst < 1.0 {
                return Err(format!("{entry:?}: rate must be >= 0 and burst >= 1"));
            }
            let tenant =
                TenantId::parse(tenant.trim()).map_err(|e| format!("{entry:?}: tenant {e}"))?;
            out.insert(tenant, Limit { rate, burst });
        }
        Ok(out)
    }

    fn for_tenant(&self, tenant: &TenantId) -> Limit {
        self.per_tenant.get(tenant).copied().unwrap_or(self.default)
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    limits: Limits,
    // One bucket per known tenant: bounded by the configured keys.
    buckets: Mutex<HashMap<TenantId, Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `tenant`, or says how long until one is there.
    pub fn check(&self, tenant: &TenantId) -> Result<(), Duration> {
        let limit = self.limits.for_tenant(tenant);
        if limit.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(tenant.clone()).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate).min(limit.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / limit.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).expect("tenant")
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_at_the_rate() {
        let limiter = RateLimiter::new(Limits {
            default: Limit {
                rate: 2.0,
                burst: 3.0,
            },
            per_tenant: HashMap::new(),
        });
        let demo = tenant("demo");
        for _ in 0..3 {
            assert!(limiter.check(&demo).is_ok());
        }
        let wait = limiter.check(&demo).expect_err("empty bucket");
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limiter.check(&demo).is_ok());
        assert!(limiter.check(&demo).is_err());
        // Other tenants have their own bucket.
        assert!(limiter.check(&tenant("acme")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn overrides_and_unlimited() {
        let limiter = RateLimiter::new(Limits {
            default: Limit {
                rate: 0.0,
                burst: 1.0,
            },
            per_tenant: Limits::parse_overrides("tiny=1:1").expect("valid"),
        });
        for _ in 0..100 {
            assert!(limiter.check(&tenant("demo")).is_ok());
        }
        assert!(limiter.check(&tenant("tiny")).is_ok());
        assert_eq!(limiter.check(&tenant("tiny")), Err(Duration::from_secs(1)));
    }

    #[test]
    fn overrides_parse_errors_name_the_entry() {
        assert!(
            Limits::parse_overrides("demo=5")
                .expect_err("bad")
                .contains("demo=5")
        );
        assert!(Limits::parse_overrides("demo=x:1").is_err());
        assert!(Limits::parse_overrides("demo=1:0").is_err());
    }
}
