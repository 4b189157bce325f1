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
        let bucket = buckets
            .entry(tenant.clone())
            .or_insert_with(|| Bucket::full(limit, now));
        bucket.refill(limit, now);
        bucket.take(limit)
    }
}

impl Bucket {
    fn full(limit: Limit, now: Instant) -> Self {
        Self {
            tokens: limit.burst,
            updated: now,
        }
    }

    fn refill(&mut self, limit: Limit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.burst);
        self.updated = now;
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, limit: Limit) -> Result<(), Duration> {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait(limit))
        }
    }

    fn wait(&self, limit: Limit) -> Duration {
        Duration::from_secs_f64((1.0 - self.tokens).max(0.0) / limit.rate)
    }
}

/// Failed authentications per client address: each one takes a token; an
/// address with none left is refused before its key is even looked at, so
/// keys cannot be guessed at line rate. IPv6 clients count per /64 (one
/// host usually has a whole /64). At most `MAX_ADDRESSES` are tracked;
/// buckets that have refilled are forgotten first.
pub struct AuthFailures {
    limit: Limit,
    buckets: Mutex<HashMap<std::net::IpAddr, Bucket>>,
}

const MAX_ADDRESSES: usize = 10_000;

impl AuthFailures {
    /// `limit.rate` failures per second, `limit.burst` in a row; a rate of 0
    /// switches throttling off.
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            buckets: Mutex::default(),
        }
    }

    /// How long `ip` must wait, when it has used up its failures.
    pub fn blocked(&self, ip: std::net::IpAddr) -> Option<Duration> {
        if self.limit.rate <= 0.0 {
            return None;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.get_mut(&client(ip))?;
        bucket.refill(self.limit, now);
        (bucket.tokens < 1.0).then(|| bucket.wait(self.limit))
    }

    /// Counts one failed authentication of `ip`.
    pub fn record_failure(&self, ip: std::net::IpAddr) {
        if self.limit.rate <= 0.0 {
            return;
        }
        let now = Instant::now();
        let limit = self.limit;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_ADDRESSES {
            buckets.retain(|_, b| {
                b.refill(limit, now);
                b.tokens < limit.burst
            });
            if buckets.len() >= MAX_ADDRESSES {
                // Still full of throttled addresses: forget the longest quiet.
                if let Some(oldest) = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.updated)
                    .map(|(k, _)| *k)
                {
                    buckets.remove(&oldest);
                }
            }
        }
        let bucket = buckets
            .entry(client(ip))
            .or_insert_with(|| Bucket::full(limit, now));
        bucket.refill(limit, now);
        let _ = bucket.take(limit);
    }
}

/// The unit a client is counted by: its IPv4 address, or its IPv6 /64.
fn client(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1_u128 << 64) - 1);
                std::net::IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
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

    #[tokio::test(start_paused = true)]
    async fn failed_authentications_block_an_address_until_they_refill() {
        let failures = AuthFailures::new(Limit {
            rate: 1.0,
            burst: 3.0,
        });
        let ip: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
        let other: std::net::IpAddr = "192.0.2.8".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(failures.blocked(ip), None);
            failures.record_failure(ip);
        }
        assert_eq!(failures.blocked(ip), Some(Duration::from_secs(1)));
        assert_eq!(failures.blocked(other), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(failures.blocked(ip), None);
        // One /64 is one client.
        let a: std::net::IpAddr = "2001:db8::1".parse().expect("ip");
        let b: std::net::IpAddr = "2001:db8::ffff:2".parse().expect("ip");
        for _ in 0..3 {
            failures.record_failure(a);
        }
        assert!(failures.blocked(b).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_address_table_stays_bounded() {
        let failures = AuthFailures::new(Limit {
            rate: 1.0,
            burst: 2.0,
        });
        for n in 0..(MAX_ADDRESSES as u32 + 500) {
            failures.record_failure(std::net::IpAddr::V4(n.into()));
        }
        let len = failures.buckets.lock().expect("lock").len();
        assert!(len <= MAX_ADDRESSES, "{len}");
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
