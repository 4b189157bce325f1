//! The router: consumes submitted runs, applies the tenant's policy, asks the
//! policy's extensions, decides which provider (worker pool) runs each one and
//! why, and dispatches it to `work.<provider>` — or reports it rejected.
//!
//! Layout:
//! - [`config`]: settings from the environment (policy and registry files
//!   validated at start).
//! - [`app`]: `App::build` and `App::run` (consumer, gRPC, admin, provider
//!   health, SIGHUP reload).
//! - [`policy`]: policy files and the decision, pure functions of policy, run
//!   and provider health.
//! - [`breaker`]: the circuit breaker state machine (extensions and providers).
//! - [`health`]: provider health (consumer liveness + dispatch breaker).
//! - [`extensions`]: the extension registry and invoker (`ext.<id>` over NATS).
//! - [`decide`]: one traced decision, shared by the consumer and gRPC.
//! - [`dispatch`]: the `runs.submitted` consumer (decide → publish → ack).
//! - [`grpc`]: `Decide` (dry run) and `grpc.health.v1`.
//! - [`events`]: the router's telemetry events and metric names.

pub mod app;
pub mod breaker;
pub mod config;
pub mod decide;
pub mod dispatch;
pub mod events;
pub mod extensions;
pub mod grpc;
pub mod health;
pub mod policy;

pub use app::App;
pub use config::Config;

/// What the router tells telemetry about itself.
pub const SERVICE: telemetry::ServiceInfo = telemetry::ServiceInfo {
    component: "router",
    version: env!("CARGO_PKG_VERSION"),
    histogram_buckets: &[
        (
            events::EXTENSION_INVOCATION_DURATION_SECONDS,
            events::INVOCATION_BUCKETS,
        ),
        (
            events::REGISTRY_LOAD_DURATION_SECONDS,
            events::REGISTRY_LOAD_BUCKETS,
        ),
    ],
};
