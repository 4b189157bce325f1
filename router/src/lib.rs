//! The router: consumes submitted runs, decides which provider (worker pool)
//! runs each one and why, and dispatches it to `work.<provider>`.
//!
//! Layout:
//! - [`config`]: settings from the environment.
//! - [`app`]: `App::build` and `App::run`.
//! - [`policy`]: the decision, a pure function of policy and run.
//! - [`dispatch`]: the `runs.submitted` consumer (decide → publish → ack).
//! - [`events`]: the router's telemetry events and metric names.

pub mod app;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod policy;

pub use app::App;
pub use config::Config;

/// What the router tells telemetry about itself.
pub const SERVICE: telemetry::ServiceInfo = telemetry::ServiceInfo {
    component: "router",
    version: env!("CARGO_PKG_VERSION"),
    histogram_buckets: &[],
};
