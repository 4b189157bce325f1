//! The router's settings, from the environment (DESIGN §2b). The policy and
//! extension registry files are read and validated here, so a bad file stops
//! the process at start with one line naming the variable, field and line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use telemetry::env::{self, EnvError};

use crate::extensions::registry::{self, ExtensionSpec};
use crate::policy::PolicySet;

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    /// gRPC `Decide` and `grpc.health.v1`.
    pub grpc_addr: SocketAddr,
    /// `NATS_URL`, credentials, TLS, `NATS_STREAM_REPLICAS`.
    pub nats: wire::connection::NatsSettings,
    /// Runs decided at once by this replica.
    pub concurrency: usize,
    /// Redelivery delay of `runs.submitted` messages that were not acked.
    pub ack_wait: Duration,
    /// `ROUTER_POLICY_FILE`: none means the built-in policy (every run to `default`).
    pub policy_file: Option<PathBuf>,
    pub policies: PolicySet,
    /// `ROUTER_EXTENSIONS_FILE`: the extension registry.
    pub extensions_file: Option<PathBuf>,
    pub extensions: Vec<ExtensionSpec>,
    /// How long registry entries are used before the file is read again.
    pub registry_ttl: Duration,
    /// How often provider consumers are checked for liveness.
    pub provider_health_every: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, EnvError> {
        let extensions_file = env::raw("ROUTER_EXTENSIONS_FILE").map(PathBuf::from);
        let extensions = match &extensions_file {
            None => Vec::new(),
            Some(path) => registry::load(path).map_err(|e| {
                EnvError::new("ROUTER_EXTENSIONS_FILE", &path.display().to_string(), e)
            })?,
        };
        let known: HashSet<String> = extensions.iter().map(|e| e.id.clone()).collect();
        let policy_file = env::raw("ROUTER_POLICY_FILE").map(PathBuf::from);
        let policies = match &policy_file {
            None => PolicySet::builtin(),
            Some(path) => PolicySet::load(path, &known)
                .map_err(|e| EnvError::new("ROUTER_POLICY_FILE", &path.display().to_string(), e))?,
        };
        Ok(Self {
            admin_addr: env::parse_or("ROUTER_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9001)))?,
            grpc_addr: env::parse_or("ROUTER_GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 9000)))?,
            nats: wire::connection::NatsSettings::from_env()?,
            concurrency: env::parse_or("ROUTER_CONCURRENCY", 32)?,
            ack_wait: Duration::from_secs(env::parse_or("ROUTER_ACK_WAIT_SECS", 30)?),
            policy_file,
            policies,
            extensions_file,
            extensions,
            registry_ttl: Duration::from_secs(env::parse_or(
                "ROUTER_EXTENSION_REGISTRY_TTL_SECS",
                30,
            )?),
            provider_health_every: Duration::from_millis(env::parse_or(
                "ROUTER_PROVIDER_HEALTH_INTERVAL_MS",
                2000,
            )?),
        })
    }
}
