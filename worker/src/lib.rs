//! The worker: consumes dispatched runs from `work.<provider>`, executes their
//! steps in order and reports progress and results on `runs.events`.
//!
//! Layout:
//! - [`config`]: settings from the environment.
//! - [`app`]: `App::build` and `App::run` (consumers, queue depth, admin).
//! - [`execute`]: `execute_step` (one attempt) and `run_steps` (a whole run).
//! - [`consume`]: the `work.<provider>` consumer (report → execute → report → ack).
//! - [`events`]: the worker's telemetry events and metric names.

pub mod app;
pub mod config;
pub mod consume;
pub mod events;
pub mod execute;

pub use app::App;
pub use config::Config;

/// What the worker tells telemetry about itself.
pub const SERVICE: telemetry::ServiceInfo = telemetry::ServiceInfo {
    component: "worker",
    version: env!("CARGO_PKG_VERSION"),
    histogram_buckets: &[],
};
