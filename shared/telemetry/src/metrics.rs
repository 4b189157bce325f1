//! The Prometheus recorder and the metrics every component exposes.
//!
//! `metrics-exporter-prometheus` renders histograms as summaries unless it is
//! given buckets, and its recorder needs an upkeep task (histogram buffers are
//! only drained by it): both are done here, once.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Default buckets (seconds) for every `_seconds` histogram: 1 ms … 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The installed recorder's handle plus the process collector.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
}

impl MetricsHandle {
    /// The Prometheus text exposition of every metric, process metrics refreshed.
    pub fn render(&self) -> String {
        self.process.collect();
        self.prometheus.render()
    }
}

/// Installs the global recorder (once per process), starts its upkeep task and
/// records the build info. `buckets` overrides the default buckets per metric.
pub(crate) fn install(
    component: &'static str,
    version: &'static str,
    buckets: &[(&'static str, &'static [f64])],
    limits: crate::cardinality::CardinalityLimits,
) -> anyhow::Result<MetricsHandle> {
    let mut builder = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS)?;
    for (name, values) in buckets {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), values)?;
    }
    let recorder = builder.build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(crate::cardinality::GuardedRecorder::new(recorder, limits))
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;

    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    let process = metrics_process::Collector::default();
    process.describe();
    describe();
    metrics::gauge!(
        "component_build_info",
        "component" => component,
        "version" => version
    )
    .set(1.0);

    Ok(MetricsHandle {
        prometheus,
        process: std::sync::Arc::new(process),
    })
}

fn describe() {
    metrics::describe_counter!(
        crate::cardinality::OVERFLOW_METRIC,
        "Metric emissions folded into a metric's overflow series because it hit its series cap."
    );
    metrics::describe_counter!(
        "component_errors_total",
        "Errors inside a component, by closed-set error code."
    );
    metrics::describe_gauge!(
        "component_health_status",
        "1 when the named readiness check passes, else 0."
    );
    metrics::describe_gauge!(
        "component_build_info",
        "Always 1; labels carry the component and its version."
    );
}
