//! The router's settings, from the environment (DESIGN §2b). The policy and
//! extension registry files are read and validated here, so a bad file stops
//! the process at start with one line naming the variable, field and line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use telemetry::env::{self, EnvError};

use crate::extensions::registry::{self, ExtensionSpec};
use crate::grpc::GrpcAuth;
use crate::policy::PolicySet;

/// The default `ROUTER_GRPC_MAX_REQUEST_BYTES`: the gateway's body limit, so a
/// dry run accepts what a real submission can be, and far below NATS's
/// default max payload (1 MiB), so every accepted request fits in an
/// extension request.
pub const DEFAULT_GRPC_MAX_REQUEST_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    /// gRPC `Decide` and `grpc.health.v1`.
    pub grpc_addr: SocketAddr,
    /// Who may call `Decide` (`ROUTER_GRPC_TOKEN`).
    pub grpc_auth: GrpcAuth,
    /// Larger `Decide` requests are refused before they are decoded; checked
    /// at start against the NATS server's max payload.
    pub grpc_max_request_bytes: usize,
    pub nats_url: String,
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
            nats_url: env::string_or("NATS_URL", "nats://127.0.0.1:4222"),
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
            grpc_max_request_bytes: match env::parse_or(
                "ROUTER_GRPC_MAX_REQUEST_BYTES",
                DEFAULT_GRPC_MAX_REQUEST_BYTES,
            )? {
                0 => {
                    return Err(EnvError::new(
                        "ROUTER_GRPC_MAX_REQUEST_BYTES",
                        "0",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            // Last: a missing token must not hide a malformed setting above.
            grpc_auth: grpc_auth()?,
        })
    }
}

/// The shortest `ROUTER_GRPC_TOKEN` accepted: a shared secret short enough to
/// guess is no authentication.
pub const MIN_GRPC_TOKEN_LEN: usize = 16;

/// `ROUTER_GRPC_TOKEN`, or the explicit development opt-out
/// `ROUTER_GRPC_ALLOW_UNAUTHENTICATED=true`; neither refuses to start, so an
/// open port is never the result of a forgotten setting.
fn grpc_auth() -> Result<GrpcAuth, EnvError> {
    const TOKEN: &str = "ROUTER_GRPC_TOKEN";
    const OPEN: &str = "ROUTER_GRPC_ALLOW_UNAUTHENTICATED";
    let open = env::flag(OPEN, false)?;
    // `env::raw` treats a blank value as unset; a blank token is a mistake
    // (an empty secret in a manifest), not a request for an open port.
    let token = match std::env::var(TOKEN) {
        Err(_) => None,
        Ok(value) if value.trim().is_empty() => {
            return Err(EnvError::new(
                TOKEN,
                "",
                "is blank; set a token or unset it",
            ));
        }
        Ok(value) => Some(value.trim().to_owned()),
    };
    match (token, open) {
        (Some(_), true) => Err(EnvError::new(
            OPEN,
            "true",
            "contradicts ROUTER_GRPC_TOKEN, which is set; unset one of them",
        )),
        (Some(token), false) if token.chars().count() < MIN_GRPC_TOKEN_LEN => Err(EnvError::new(
            TOKEN,
            "[REDACTED]",
            format!("must be at least {MIN_GRPC_TOKEN_LEN} characters"),
        )),
        (Some(token), false) => Ok(GrpcAuth::token(&token)),
        (None, true) => Ok(GrpcAuth::Open),
        (None, false) => Err(EnvError::new(
            TOKEN,
            "",
            "required: the gRPC port does not start unauthenticated \
             (ROUTER_GRPC_ALLOW_UNAUTHENTICATED=true opens it, for local development only)",
        )),
    }
}
