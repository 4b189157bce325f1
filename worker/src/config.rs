//! The worker's settings, from the environment (DESIGN §2b).

use std::net::SocketAddr;
use std::time::Duration;

use telemetry::env::{self, EnvError};
use wire::ids::ProviderId;

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub nats_url: String,
    /// The providers (work queues) this worker serves.
    pub providers: Vec<ProviderId>,
    /// Runs executed at once by this replica.
    pub concurrency: usize,
    /// Redelivery delay of unacked work; in-progress acks keep long runs alive.
    pub ack_wait: Duration,
    /// How often `worker_queue_depth` is refreshed.
    pub queue_depth_every: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, EnvError> {
        let raw = env::string_or("WORKER_PROVIDERS", "default");
        let providers = raw
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(ProviderId::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| EnvError::new("WORKER_PROVIDERS", &raw, reason))?;
        if providers.is_empty() {
            return Err(EnvError::new("WORKER_PROVIDERS", &raw, "names no provider"));
        }
        let concurrency: usize = env::parse_or("WORKER_CONCURRENCY", 8)?;
        if concurrency == 0 {
            return Err(EnvError::new(
                "WORKER_CONCURRENCY",
                "0",
                "must be at least 1",
            ));
        }
        let ack_wait_secs: u64 = env::parse_or("WORKER_ACK_WAIT_SECS", 30)?;
        if ack_wait_secs == 0 {
            return Err(EnvError::new(
                "WORKER_ACK_WAIT_SECS",
                "0",
                "must be at least 1",
            ));
        }
        Ok(Self {
            admin_addr: env::parse_or("WORKER_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9092)))?,
            nats_url: env::string_or("NATS_URL", "nats://127.0.0.1:4222"),
            providers,
            concurrency,
            ack_wait: Duration::from_secs(ack_wait_secs),
            queue_depth_every: Duration::from_secs(5),
        })
    }
}
