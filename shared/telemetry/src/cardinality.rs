//! The cardinality guard: a `metrics::Recorder` wrapper that every metric
//! passes through before the Prometheus recorder.
//!
//! - Label names that must never be labels (`run_id`, `step_id`, `url`, …)
//!   are dropped.
//! - Every label value is sanitized.
//! - `tenant_id` keeps known tenants (configured, else the first N seen);
//!   any other tenant becomes `other`.
//! - Each metric holds at most `max_series_per_metric` label sets; past
//!   that, new series fold into one overflow series (every label value
//!   `overflow`) and `telemetry_cardinality_overflow_total{metric}` counts it.
//!   Never an error in the request path.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};

/// Labels that would carry unbounded values.
pub const FORBIDDEN_LABELS: &[&str] = &[
    "run_id",
    "step_id",
    "trace_id",
    "span_id",
    "user_id",
    "email",
    "url",
    "path",
    "error",
    "message",
    "idempotency_key",
];

pub const OVERFLOW_METRIC: &str = "telemetry_cardinality_overflow_total";
pub const OVERFLOW_VALUE: &str = "overflow";
pub const OTHER_TENANT: &str = "other";

/// How many distinct values the guard lets through.
#[derive(Clone, Default)]
pub struct CardinalityLimits {
    /// Tenants always kept as themselves (e.g. the gateway's configured ones).
    pub known_tenants: Vec<String>,
    /// With no known tenants configured: how many first-seen tenants are kept.
    pub tenant_limit: usize,
    pub max_series_per_metric: usize,
}

#[derive(Default)]
struct State {
    tenants: HashSet<String>,
    series: HashMap<String, HashSet<Vec<Label>>>,
    /// Keys already admitted, as recorded: the same few label sets repeat on
    /// every call, and an admitted key's verdict never changes (tenants and
    /// series are only ever added), so it is computed once.
    admitted: HashMap<Key, Key>,
}

/// Most admitted keys remembered (beyond that, keys are guarded on every call).
const ADMITTED_CACHE: usize = 50_000;

pub struct GuardedRecorder<R> {
    inner: R,
    limits: CardinalityLimits,
    state: Mutex<State>,
}

impl<R: Recorder> GuardedRecorder<R> {
    pub fn new(inner: R, limits: CardinalityLimits) -> Self {
        Self {
            inner,
            limits,
            state: Mutex::default(),
        }
    }

    /// The key as it may be recorded.
    fn guard(&self, key: &Key, metadata: &Metadata<'_>) -> Key {
        let sanitizer = crate::sanitize::global();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(admitted) = state.admitted.get(key) {
            return admitted.clone();
        }
        let mut labels: Vec<Label> = Vec::with_capacity(key.labels().len());
        for label in key.labels() {
            if FORBIDDEN_LABELS.contains(&label.key()) {
                continue;
            }
            let mut value = sanitizer.field(label.key(), label.value()).into_owned();
            if label.key() == "tenant_id" {
                value = self.tenant(&mut state, value);
            }
            labels.push(Label::new(label.key().to_owned(), value));
        }
        let metric = key.name().to_owned();
        let series = state.series.entry(metric.clone()).or_default();
        if series.contains(&labels) || series.len() < self.limits.max_series_per_metric {
            series.insert(labels.clone());
            let guarded = Key::from_parts(key.name().to_owned(), labels);
            if state.admitted.len() < ADMITTED_CACHE {
                state.admitted.insert(key.clone(), guarded.clone());
            }
            return guarded;
        }
        drop(state);
        self.inner
            .register_counter(
                &Key::from_parts(OVERFLOW_METRIC, vec![Label::new("metric", metric)]),
                metadata,
            )
            .increment(1);
        let folded: Vec<Label> = labels
            .into_iter()
            .map(|l| Label::new(l.key().to_owned(), OVERFLOW_VALUE))
            .collect();
        Key::from_parts(key.name().to_owned(), folded)
    }

    fn tenant(&self, state: &mut State, tenant: String) -> String {
        if self.limits.known_tenants.contains(&tenant) || state.tenants.contains(&tenant) {
            return tenant;
        }
        if self.limits.known_tenants.is_empty() && state.tenants.len() < self.limits.tenant_limit {
            state.tenants.insert(tenant.clone());
            return tenant;
        }
        OTHER_TENANT.to_owned()
    }
}

impl<R: Recorder> Recorder for GuardedRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner
            .register_counter(&self.guard(key, metadata), metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner
            .register_gauge(&self.guard(key, metadata), metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner
            .register_histogram(&self.guard(key, metadata), metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    /// A guard over a local (not global) Prometheus recorder, and its handle.
    fn guarded(
        limits: CardinalityLimits,
    ) -> (
        GuardedRecorder<metrics_exporter_prometheus::PrometheusRecorder>,
        metrics_exporter_prometheus::PrometheusHandle,
    ) {
        let prometheus = PrometheusBuilder::new().build_recorder();
        let handle = prometheus.handle();
        (GuardedRecorder::new(prometheus, limits), handle)
    }

    fn series(body: &str, metric: &str) -> Vec<String> {
        body.lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn ten_thousand_tenants_stay_bounded() {
        let (guarded, handle) = guarded(CardinalityLimits {
            known_tenants: vec![],
            tenant_limit: 20,
            max_series_per_metric: 1_000,
        });
        metrics::with_local_recorder(&guarded, || {
            for i in 0..10_000 {
                metrics::counter!("runs_total", "tenant_id" => format!("tenant-{i}"), "status" => "ok").increment(1);
            }
        });
        let body = handle.render();
        let lines = series(&body, "runs_total");
        assert_eq!(lines.len(), 21, "20 first-seen tenants + other");
        let other = lines
            .iter()
            .find(|l| l.contains("tenant_id=\"other\""))
            .expect("other");
        assert!(other.ends_with(" 9980"), "{other}");
    }

    #[test]
    fn known_tenants_are_kept_and_the_rest_is_other() {
        let (guarded, handle) = guarded(CardinalityLimits {
            known_tenants: vec!["demo".into()],
            tenant_limit: 50,
            max_series_per_metric: 100,
        });
        metrics::with_local_recorder(&guarded, || {
            for tenant in ["demo", "acme", "zeta"] {
                metrics::counter!("x_total", "tenant_id" => tenant).increment(1);
            }
        });
        let body = handle.render();
        assert!(body.contains("x_total{tenant_id=\"demo\"} 1"), "{body}");
        assert!(body.contains("x_total{tenant_id=\"other\"} 2"), "{body}");
    }

    #[test]
    fn a_full_metric_folds_into_an_overflow_series_and_counts_it() {
        let (guarded, handle) = guarded(CardinalityLimits {
            known_tenants: vec![],
            tenant_limit: 10,
            max_series_per_metric: 5,
        });
        metrics::with_local_recorder(&guarded, || {
            for i in 0..1_000 {
                metrics::counter!("by_provider_total", "provider" => format!("p{i}")).increment(1);
            }
        });
        let body = handle.render();
        assert_eq!(series(&body, "by_provider_total").len(), 6, "{body}");
        assert!(
            body.contains("by_provider_total{provider=\"overflow\"} 995"),
            "{body}"
        );
        assert!(
            body.contains("telemetry_cardinality_overflow_total{metric=\"by_provider_total\"} 995"),
            "{body}"
        );
    }

    #[test]
    fn forbidden_labels_are_dropped_and_values_sanitized() {
        let (guarded, handle) = guarded(CardinalityLimits {
            known_tenants: vec![],
            tenant_limit: 10,
            max_series_per_metric: 10,
        });
        metrics::with_local_recorder(&guarded, || {
            metrics::counter!("y_total", "run_id" => "r-1", "step_id" => "s", "reason" => "mail bob@example.com").increment(1);
        });
        let body = handle.render();
        assert!(
            !body.contains("run_id")
                && !body.contains("step_id")
                && !body.contains("bob@example.com"),
            "{body}"
        );
        assert!(
            body.contains("y_total{reason=\"mail [REDACTED:email]\"} 1"),
            "{body}"
        );
    }
}
