//! The gateway: Beamline's HTTP front door. It authenticates tenants, stores
//! each run (sqlx: SQLite or PostgreSQL), hands it to the routers over
//! JetStream (`runs.submitted`) and keeps the store current from the workers'
//! reports (`runs.events`).
//!
//! Layout:
//! - [`config`]: settings from the environment.
//! - [`app`]: `App::build` (binds, migrates, connects) and `App::run`.
//! - [`routes`]: the `/v1` API handlers.
//! - [`http_trace`]: the SERVER span and HTTP metrics middleware.
//! - [`auth`]: API keys → tenants; [`ratelimit`]: per-tenant token buckets.
//! - [`idempotency`]: `Idempotency-Key` rules and request fingerprints.
//! - [`waiters`]: `?wait=` requests, woken by `runs.events`.
//! - [`openapi`]: the generated OpenAPI 3.1 document.
//! - [`store`]: the run store.
//! - [`outbox`]: hands stored runs off to JetStream, and again until acked.
//! - [`consumer`]: the `runs.events` consumer.
//! - [`error`]: API errors → status + JSON body.
//! - [`events`]: the gateway's telemetry events and metric names.

pub mod app;
pub mod auth;
pub mod config;
pub mod consumer;
pub mod error;
pub mod events;
pub mod http_trace;
pub mod idempotency;
pub mod openapi;
pub mod outbox;
pub mod ratelimit;
pub mod routes;
pub mod store;
pub mod waiters;

pub use app::App;
pub use config::Config;

/// What the gateway tells telemetry about itself.
pub const SERVICE: telemetry::ServiceInfo = telemetry::ServiceInfo {
    component: "gateway",
    version: env!("CARGO_PKG_VERSION"),
    histogram_buckets: &[],
};
