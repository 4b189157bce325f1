//! The gateway's settings, from the environment (DESIGN §2b).

use std::net::SocketAddr;
use std::time::Duration;

use telemetry::env::{self, EnvError};

use crate::auth::ApiKeys;
use crate::ratelimit::{Limit, Limits};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub nats_url: String,
    pub database_url: String,
    pub api_keys: ApiKeys,
    /// Base of `trace_url` in responses.
    pub jaeger_ui_url: String,
    /// Largest accepted request body, bytes.
    pub body_limit: usize,
    /// Most steps in one run.
    pub max_steps: usize,
    /// How long to wait for JetStream to store a submitted run before 503.
    pub publish_timeout: Duration,
    /// Redelivery delay of `runs.events` messages that were not acked.
    pub events_ack_wait: Duration,
    /// `runs.events` messages applied at once.
    pub events_concurrency: usize,
    pub rate_limits: Limits,
    /// `GATEWAY_AUTH_FAILURE_RPS` / `GATEWAY_AUTH_FAILURE_BURST`: failed
    /// authentications a client address may make (per second / in a row)
    /// before it is refused with 429; rate 0 switches throttling off.
    pub auth_failures: Limit,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// The longest `?wait=` a client may ask for.
    pub max_wait: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, EnvError> {
        let mut api_keys = match env::raw("GATEWAY_API_KEYS") {
            None => ApiKeys::default(),
            Some(value) => ApiKeys::parse(&value)
                .map_err(|reason| EnvError::new("GATEWAY_API_KEYS", "<redacted>", reason))?,
        };
        if let Some(path) = env::raw("GATEWAY_API_KEYS_FILE") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| EnvError::new("GATEWAY_API_KEYS_FILE", &path, e))?;
            // One `tenant:key` per line; `#` starts a comment.
            let entries: Vec<&str> = text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .collect();
            let from_file = ApiKeys::parse(&entries.join(","))
                .map_err(|reason| EnvError::new("GATEWAY_API_KEYS_FILE", &path, reason))?;
            api_keys.extend(from_file);
        }
        let rate_limits = Limits {
            default: Limit {
                rate: env::parse_or("GATEWAY_RATE_LIMIT_RPS", 50.0)?,
                burst: env::parse_or("GATEWAY_RATE_LIMIT_BURST", 100.0)?,
            },
            per_tenant: match env::raw("GATEWAY_RATE_LIMITS") {
                None => Default::default(),
                Some(value) => Limits::parse_overrides(&value)
                    .map_err(|reason| EnvError::new("GATEWAY_RATE_LIMITS", &value, reason))?,
            },
        };
        if rate_limits.default.rate < 0.0 || rate_limits.default.burst < 1.0 {
            return Err(EnvError::new(
                "GATEWAY_RATE_LIMIT_BURST",
                &rate_limits.default.burst.to_string(),
                "the rate must be >= 0 and the burst >= 1",
            ));
        }
        let database_url = env::string_or("DATABASE_URL", "sqlite://beamline-gateway.db?mode=rwc");
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(EnvError::new(
                "DATABASE_URL",
                &database_url,
                "expected a sqlite: or postgres:// URL",
            ));
        }
        Ok(Self {
            listen_addr: env::parse_or(
                "GATEWAY_LISTEN_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 3000)),
            )?,
            admin_addr: env::parse_or(
                "GATEWAY_ADMIN_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 3001)),
            )?,
            nats_url: env::string_or("NATS_URL", "nats://127.0.0.1:4222"),
            database_url,
            api_keys,
            jaeger_ui_url: env::string_or("JAEGER_UI_URL", "http://localhost:16686")
                .trim_end_matches('/')
                .to_owned(),
            body_limit: env::parse_or("GATEWAY_BODY_LIMIT_BYTES", 256 * 1024)?,
            max_steps: env::parse_or("GATEWAY_MAX_STEPS", 100)?,
            publish_timeout: Duration::from_millis(env::parse_or(
                "GATEWAY_PUBLISH_TIMEOUT_MS",
                5_000,
            )?),
            events_ack_wait: Duration::from_secs(env::parse_or(
                "GATEWAY_EVENTS_ACK_WAIT_SECS",
                30,
            )?),
            events_concurrency: match env::parse_or("GATEWAY_EVENTS_CONCURRENCY", 16usize)? {
                0 => {
                    return Err(EnvError::new(
                        "GATEWAY_EVENTS_CONCURRENCY",
                        "0",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            rate_limits,
            auth_failures: {
                let limit = Limit {
                    rate: env::parse_or("GATEWAY_AUTH_FAILURE_RPS", 1.0)?,
                    burst: env::parse_or("GATEWAY_AUTH_FAILURE_BURST", 20.0)?,
                };
                if limit.rate < 0.0 || !limit.rate.is_finite() {
                    return Err(EnvError::new(
                        "GATEWAY_AUTH_FAILURE_RPS",
                        &limit.rate.to_string(),
                        "must be a number >= 0",
                    ));
                }
                if limit.burst < 1.0 || !limit.burst.is_finite() {
                    return Err(EnvError::new(
                        "GATEWAY_AUTH_FAILURE_BURST",
                        &limit.burst.to_string(),
                        "must be a number >= 1",
                    ));
                }
                limit
            },
            idempotency_ttl: Duration::from_secs(env::parse_or(
                "GATEWAY_IDEMPOTENCY_TTL_SECS",
                24 * 3600,
            )?),
            max_wait: Duration::from_secs(60),
        })
    }
}
