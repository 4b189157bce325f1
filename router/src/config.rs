//! The router's settings, from the environment (DESIGN §2b).

use std::net::SocketAddr;
use std::time::Duration;

use telemetry::env::{self, EnvError};

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub nats_url: String,
    /// Runs decided at once by this replica.
    pub concurrency: usize,
    /// Redelivery delay of `runs.submitted` messages that were not acked.
    pub ack_wait: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, EnvError> {
        Ok(Self {
            admin_addr: env::parse_or("ROUTER_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9001)))?,
            nats_url: env::string_or("NATS_URL", "nats://127.0.0.1:4222"),
            concurrency: env::parse_or("ROUTER_CONCURRENCY", 32)?,
            ack_wait: Duration::from_secs(env::parse_or("ROUTER_ACK_WAIT_SECS", 30)?),
        })
    }
}
