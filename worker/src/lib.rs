//! The worker: consumes dispatched runs from `work.<provider>`, executes their
//! steps in order and reports progress and results on `runs.events`.
//!
//! Layout:
//! - [`config`]: settings from the environment.
//! - [`app`]: `App::build` and `App::run` (consumers, queue depth, admin).
//! - [`blocks`]: one module per step type (`http`, `sql`, `fs`, `approval`,
//!   and `noop`/`delay`/`fail`); `Blocks::execute` runs one attempt.
//! - [`execute`]: `run_steps` (a whole run: retries, spans, checkpoints).
//! - [`progress`]: the run checkpoint that makes redelivery resume, not restart.
//! - [`consume`]: the `work.<provider>` consumer (report → execute → report →
//!   ack; dead letters after `WORKER_MAX_DELIVER`).
//! - [`extensions`]: the sample extension services the router calls
//!   (`ext.pii-guard` validator, `ext.enrich` pre).
//! - [`events`]: the worker's telemetry events and metric names.

pub mod app;
pub mod blocks;
pub mod config;
pub mod consume;
pub mod events;
pub mod execute;
pub mod extensions;
pub mod progress;

pub use app::App;
pub use config::Config;

/// What the worker tells telemetry about itself.
pub const SERVICE: telemetry::ServiceInfo = telemetry::ServiceInfo {
    component: "worker",
    version: env!("CARGO_PKG_VERSION"),
    histogram_buckets: &[],
};
