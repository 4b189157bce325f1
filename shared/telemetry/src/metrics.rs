//! The Prometheus recorder and the metrics every component exposes.
//!
//! `metrics-exporter-prometheus` renders histograms as summaries unless it is
//! given buckets, and its recorder needs an upkeep task (histogram buffers are
//! only drained by it): both are done here, once.
//!
//! The process metrics are read from `/proc/self` at each scrape and written
//! in the exposition format by [`process_metrics`], not through the `metrics`
//! facade: its counters are integers, which truncated
//! `process_cpu_seconds_total` to whole seconds.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Default buckets (seconds) for every `_seconds` histogram: 1 ms … 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The git revision the binary was built from (`build.rs`: the
/// `BEAMLINE_GIT_REVISION` build variable, else `git rev-parse`, else
/// `unknown`). One revision for the whole workspace: every service links this
/// crate.
pub const BUILD_REVISION: &str = env!("BEAMLINE_GIT_REVISION");

const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The installed recorder's handle.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
}

impl MetricsHandle {
    /// The Prometheus text exposition of every metric, process metrics read now.
    pub fn render(&self) -> String {
        let mut body = self.prometheus.render();
        if !body.is_empty() && !body.ends_with('\n') {
            body.push('\n');
        }
        body.push_str(&process_metrics());
        body
    }
}

/// The standard process metrics (the names client_golang and the
/// Prometheus docs use) in the text exposition format, from `/proc/self`:
/// CPU seconds with their fraction, a limit of "unlimited" as
/// 18446744073709551615 (RLIM_INFINITY, as client_golang reports it), not 0.
/// Empty where `/proc` cannot be read (not Linux).
pub fn process_metrics() -> String {
    let mut out = String::new();
    for (name, kind, help, value) in process_samples() {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    }
    out
}

#[cfg(target_os = "linux")]
fn process_samples() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    use procfs::WithCurrentSystemInfo as _;
    use procfs::process::{LimitValue, Process};

    let limit = |value: LimitValue| match value {
        LimitValue::Value(v) => v as f64,
        LimitValue::Unlimited => u64::MAX as f64,
    };
    let mut samples = Vec::new();
    let Ok(me) = Process::myself() else {
        return samples;
    };
    if let Ok(stat) = me.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        samples.push((
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (stat.utime + stat.stime) as f64 / ticks,
        ));
        samples.push((
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            stat.rss_bytes().get() as f64,
        ));
        samples.push((
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            stat.vsize as f64,
        ));
        samples.push((
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            stat.num_threads as f64,
        ));
        if let Ok(boot) = procfs::boot_time_secs() {
            samples.push((
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.starttime as f64 / ticks,
            ));
        }
    }
    if let Ok(fds) = me.fd_count() {
        samples.push((
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        ));
    }
    if let Ok(limits) = me.limits() {
        samples.push((
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            limit(limits.max_open_files.soft_limit),
        ));
        samples.push((
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            limit(limits.max_address_space.soft_limit),
        ));
    }
    samples
}

#[cfg(not(target_os = "linux"))]
fn process_samples() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    Vec::new()
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

    describe();
    metrics::gauge!(
        "component_build_info",
        "component" => component,
        "version" => version,
        "revision" => BUILD_REVISION
    )
    .set(1.0);

    Ok(MetricsHandle { prometheus })
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
        "Always 1; labels carry the component, its version and the git revision it was built from."
    );
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `utime + stime` of this process from /proc/self/stat, in seconds.
    fn cpu_from_proc() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        ticks as f64 / procfs::ticks_per_second() as f64
    }

    fn sample(body: &str, name: &str) -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    }

    #[test]
    fn cpu_seconds_keep_their_fraction_and_match_proc_self_stat() {
        // Burn CPU until /proc says a non-whole number of seconds.
        let mut x = 0u64;
        while cpu_from_proc() < 0.2 || cpu_from_proc().fract() == 0.0 {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let before = cpu_from_proc();
        let body = process_metrics();
        let after = cpu_from_proc();
        let reported = sample(&body, "process_cpu_seconds_total");
        assert!(
            (before..=after).contains(&reported),
            "{reported} not within {before}..={after} from /proc/self/stat"
        );
        assert!(reported.fract() > 0.0 || after > before, "{reported}");
        assert!(body.contains("# TYPE process_cpu_seconds_total counter"));
    }

    #[test]
    fn limits_are_never_zero_and_every_process_metric_is_there() {
        let body = process_metrics();
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_virtual_memory_max_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(sample(&body, name) > 0.0, "{name} in {body}");
        }
        let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
        let address_space = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .expect("Max address space");
        let soft = address_space.split_whitespace().nth(3).expect("soft limit");
        let expected = match soft {
            "unlimited" => u64::MAX as f64,
            v => v.parse::<f64>().expect("a number"),
        };
        assert_eq!(sample(&body, "process_virtual_memory_max_bytes"), expected);
    }
}
