//! The worker's settings, from the environment (DESIGN §2b).

use std::net::SocketAddr;
use std::time::Duration;

use std::path::PathBuf;

use telemetry::env::{self, EnvError};

use crate::blocks::http::AllowList;
use wire::ids::ProviderId;

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub nats_url: String,
    /// The providers (work queues) this worker serves.
    pub providers: Vec<ProviderId>,
    /// Runs executed at once by this replica.
    pub concurrency: usize,
    /// Redelivery delay of unacked work: how soon another replica takes over
    /// the runs of a worker that died. In-progress acks every
    /// [`Config::progress_every`] keep the runs of a live worker with it.
    pub ack_wait: Duration,
    /// How often `worker_queue_depth` is refreshed.
    pub queue_depth_every: Duration,
    /// Deliveries of one work message before it is dead-lettered.
    pub max_deliver: u64,
    /// How long SIGTERM waits for running runs before naking them.
    pub shutdown_grace: Duration,
    /// Hosts `http` steps may call.
    pub http_allow: AllowList,
    /// Largest response body an `http` step keeps.
    pub http_max_body: usize,
    /// The database `sql` steps query.
    pub database_url: String,
    pub sql_allow_writes: bool,
    pub sql_max_rows: usize,
    /// The sandbox directory of `fs` steps.
    pub fs_root: PathBuf,
}

impl Config {
    /// How often a held work message gets an in-progress ack: a third of the
    /// ack wait, so two may be lost (or late) before the message is
    /// redelivered.
    pub fn progress_every(&self) -> Duration {
        self.ack_wait / 3
    }

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
        let ack_wait_secs: u64 = env::parse_or("WORKER_ACK_WAIT_SECS", 3)?;
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
            max_deliver: match env::parse_or("WORKER_MAX_DELIVER", 5u64)? {
                0 => {
                    return Err(EnvError::new(
                        "WORKER_MAX_DELIVER",
                        "0",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            shutdown_grace: Duration::from_secs(env::parse_or("WORKER_SHUTDOWN_GRACE_SECS", 25)?),
            http_allow: {
                let raw = env::string_or("WORKER_HTTP_ALLOW", "localhost,127.0.0.1,::1");
                AllowList::parse(&raw)
                    .map_err(|reason| EnvError::new("WORKER_HTTP_ALLOW", &raw, reason))?
            },
            http_max_body: env::parse_or("WORKER_HTTP_MAX_BODY_BYTES", 64 * 1024)?,
            database_url: {
                let url = env::string_or(
                    "WORKER_DATABASE_URL",
                    "sqlite://beamline-worker.db?mode=rwc",
                );
                if !(url.starts_with("sqlite:")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://"))
                {
                    return Err(EnvError::new(
                        "WORKER_DATABASE_URL",
                        &url,
                        "expected a sqlite: or postgres:// URL",
                    ));
                }
                url
            },
            sql_allow_writes: env::flag("WORKER_SQL_ALLOW_WRITES", false)?,
            sql_max_rows: env::parse_or("WORKER_SQL_MAX_ROWS", 1_000)?,
            fs_root: PathBuf::from(env::string_or("WORKER_FS_ROOT", "beamline-sandbox")),
        })
    }
}
