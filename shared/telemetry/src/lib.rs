//! Beamline's shared telemetry: everything process-wide lives here, behind one
//! [`init`] that returns a [`Telemetry`] whose drop flushes and shuts down.
//!
//! A service calls `Settings::from_env()` while it reads its own config (so a bad
//! value stops it before anything starts), then `init` inside a multi-thread
//! Tokio runtime, then builds its app with the returned [`Health`] and
//! [`MetricsHandle`] for the admin server.
//!
//! Layout:
//! - [`env`]: reading settings; one error line naming the variable.
//! - [`logs`]: the JSON log layer (trace ids and correlation fields on every line).
//! - `traces` (private): the OTLP/gRPC tracer provider (TLS for `https://`).
//! - [`sampling`]: `OTEL_TRACES_SAMPLER`, including the adaptive sampler.
//! - [`export`]: the SDK's batch span processor, wrapped to count every span it drops.
//! - [`metrics`]: the Prometheus recorder, its upkeep, process and build metrics.
//! - [`propagation`]: W3C context in NATS and HTTP headers via the global propagator.
//! - [`messaging`]: `send`/`process` spans for NATS.
//! - [`spans`]: marking a span as failed.
//! - [`health`], [`admin`]: readiness checks and the admin HTTP server.
//! - [`serve`]: the HTTP listener loop of every port (timeouts, connection cap, bounded drain).
//! - [`events`]: telemetry events shared by every component.
//! - [`process`]: the binary skeleton (runtime, signals, flush order).

pub mod admin;
pub mod cardinality;
pub mod env;
pub mod events;
pub mod export;
pub mod health;
pub mod logs;
pub mod messaging;
pub mod metrics;
pub mod process;
pub mod propagation;
pub mod sampling;
pub mod sanitize;
pub mod serve;
pub mod span_sanitizer;
pub mod spans;
mod traces;

use opentelemetry::global;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use env::EnvError;
pub use health::Health;
pub use messaging::ContextMode;
pub use metrics::MetricsHandle;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default: for machines).
    Json,
    /// Human-readable multi-line output.
    Pretty,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err("expected `json` or `pretty`".to_owned()),
        }
    }
}

/// Telemetry settings, from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `CP2_OBSERVABILITY_METRICS_ENABLED`: false installs no recorder and serves no `/metrics`.
    pub metrics_enabled: bool,
    /// `CP2_OBSERVABILITY_TRACING_ENABLED` (and not `OTEL_SDK_DISABLED`): false
    /// installs no tracer provider and exports nothing.
    pub tracing_enabled: bool,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// `TELEMETRY_MESSAGING_CONTEXT`: `parent` (one trace per run) or `link`.
    pub messaging_context: ContextMode,
    /// `TELEMETRY_REDACT_FIELDS`: field names to redact, besides the built-in ones.
    pub redact_fields: Vec<String>,
    /// `TELEMETRY_REDACT_PATTERNS`: regular expressions to redact anywhere.
    pub redact_patterns: Vec<String>,
    /// `TELEMETRY_BAGGAGE_ALLOW`: baggage keys kept from incoming requests and
    /// messages (none by default; `tenant.id` always travels between components).
    pub baggage_allow: Vec<String>,
    /// `METRICS_AUTH_TOKEN`: when set, `/metrics` wants `Authorization: Bearer <token>`.
    pub metrics_auth_token: Option<String>,
    /// `TELEMETRY_KNOWN_TENANTS` and `TELEMETRY_TENANT_LABEL_LIMIT`, and the
    /// per-metric series cap `TELEMETRY_MAX_SERIES_PER_METRIC`.
    pub cardinality: cardinality::CardinalityLimits,
    /// `HTTP_HEADER_TIMEOUT_MS`, `HTTP_MAX_CONNECTIONS`, `HTTP_DRAIN_SECS`:
    /// the limits of every listening port.
    pub http: serve::Limits,
}

impl std::fmt::Debug for cardinality::CardinalityLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardinalityLimits")
            .field("known_tenants", &self.known_tenants.len())
            .field("tenant_limit", &self.tenant_limit)
            .field("max_series_per_metric", &self.max_series_per_metric)
            .finish()
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, EnvError> {
        let log_filter = env::string_or("RUST_LOG", "info");
        EnvFilter::try_new(&log_filter).map_err(|e| EnvError::new("RUST_LOG", &log_filter, e))?;
        let sdk_disabled = env::flag("OTEL_SDK_DISABLED", false)?;
        let tracing_enabled =
            env::flag("CP2_OBSERVABILITY_TRACING_ENABLED", true)? && !sdk_disabled;
        if tracing_enabled {
            traces::validate_env()?;
        }
        Ok(Self {
            metrics_enabled: env::flag("CP2_OBSERVABILITY_METRICS_ENABLED", true)?,
            tracing_enabled,
            log_format: env::parse_or("LOG_FORMAT", LogFormat::Json)?,
            log_filter,
            messaging_context: env::parse_or("TELEMETRY_MESSAGING_CONTEXT", ContextMode::Parent)?,
            redact_fields: env::raw("TELEMETRY_REDACT_FIELDS")
                .map(|v| v.split(',').map(|f| f.trim().to_owned()).collect())
                .unwrap_or_default(),
            redact_patterns: match env::raw("TELEMETRY_REDACT_PATTERNS") {
                None => Vec::new(),
                Some(raw) => {
                    let patterns: Vec<String> = serde_json::from_str(&raw).map_err(|e| {
                        EnvError::new(
                            "TELEMETRY_REDACT_PATTERNS",
                            &raw,
                            format!("expected a JSON array of strings: {e}"),
                        )
                    })?;
                    sanitize::Sanitizer::new(&[], &patterns).map_err(|reason| {
                        EnvError::new("TELEMETRY_REDACT_PATTERNS", &raw, reason)
                    })?;
                    patterns
                }
            },
            baggage_allow: env::raw("TELEMETRY_BAGGAGE_ALLOW")
                .map(|v| {
                    v.split(',')
                        .map(|k| k.trim().to_owned())
                        .filter(|k| !k.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            metrics_auth_token: metrics_auth_token()?,
            cardinality: cardinality::CardinalityLimits {
                known_tenants: env::raw("TELEMETRY_KNOWN_TENANTS")
                    .map(|v| {
                        v.split(',')
                            .map(|t| t.trim().to_owned())
                            .filter(|t| !t.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                tenant_limit: env::parse_or("TELEMETRY_TENANT_LABEL_LIMIT", 50)?,
                max_series_per_metric: env::parse_or("TELEMETRY_MAX_SERIES_PER_METRIC", 1_000)?,
            },
            http: serve::Limits::from_env()?,
        })
    }
}

/// `METRICS_AUTH_TOKEN`: unset means `/metrics` is open; set but blank is
/// refused, since it would silently leave `/metrics` open to an operator who
/// meant to protect it.
fn metrics_auth_token() -> Result<Option<String>, EnvError> {
    const VAR: &str = "METRICS_AUTH_TOKEN";
    match std::env::var(VAR) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(EnvError::new(VAR, "<not UTF-8>", "must be printable text"))
        }
        Ok(token) if token.trim().is_empty() => Err(EnvError::new(
            VAR,
            &token,
            "is blank; set a token, or unset the variable to serve /metrics without one",
        )),
        Ok(token) => Ok(Some(token)),
    }
}

/// What one component tells telemetry about itself.
pub struct ServiceInfo {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise; the `component` label.
    pub component: &'static str,
    pub version: &'static str,
    /// Histogram buckets that differ from [`metrics::LATENCY_BUCKETS`], by metric name.
    pub histogram_buckets: &'static [(&'static str, &'static [f64])],
}

/// Process-wide telemetry. Dropping it flushes pending spans and shuts the
/// tracer provider down: keep it alive until the service has stopped, and
/// drop it while the Tokio runtime is still running.
pub struct Telemetry {
    pub settings: Settings,
    pub health: Health,
    pub metrics: Option<MetricsHandle>,
    tracer_provider: Option<SdkTracerProvider>,
}

/// Installs logs, traces, the propagator and metrics. Call once, inside a
/// multi-thread Tokio runtime (the tonic exporter can deadlock a
/// current-thread one, opentelemetry-rust#2715).
pub fn init(info: &ServiceInfo, settings: Settings) -> anyhow::Result<Telemetry> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("telemetry::init must run inside a Tokio runtime"))?;
    if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        anyhow::bail!("telemetry::init needs the multi-thread Tokio runtime");
    }
    events::set_component(info.component);
    admin::set_limits(settings.http);
    sanitize::install(
        sanitize::Sanitizer::new(&settings.redact_fields, &settings.redact_patterns)
            .map_err(|e| anyhow::anyhow!("TELEMETRY_REDACT_PATTERNS: {e}"))?,
    );

    propagation::allow_baggage_keys(settings.baggage_allow.clone());
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));

    let tracer_provider = if settings.tracing_enabled {
        Some(traces::provider(info)?)
    } else {
        None
    };

    let otel_layer = tracer_provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(info.component))
            .with_level(true)
            .with_filter(span_filter())
    });
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(logs::layer(
            settings.log_format,
            &settings.log_filter,
            std::io::stdout,
        ))
        .try_init()?;

    let metrics = if settings.metrics_enabled {
        Some(metrics::install(
            info.component,
            info.version,
            info.histogram_buckets,
            settings.cardinality.clone(),
        )?)
    } else {
        None
    };
    if metrics.is_some() && tracer_provider.is_some() {
        export::describe_metrics();
    }

    Ok(Telemetry {
        settings,
        health: Health::new(info.component),
        metrics,
        tracer_provider,
    })
}

/// Which spans become OpenTelemetry spans: ours at INFO and above, never the
/// transport crates' (their spans would trace the exporter itself).
fn span_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("async_nats", LevelFilter::OFF)
        .with_target("sqlx", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

impl Telemetry {
    /// The admin server's routes for this process.
    pub fn admin_router(&self) -> axum::Router {
        admin::router(
            self.health.clone(),
            self.metrics.clone(),
            self.settings.metrics_auth_token.clone(),
        )
    }

    /// Flushes pending spans and shuts the tracer provider down. Idempotent;
    /// also done on drop.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let flush = move || {
                if let Err(err) = provider.shutdown_with_timeout(traces::SHUTDOWN_TIMEOUT) {
                    tracing::warn!(error = %err, "tracer provider shutdown failed");
                }
            };
            // The batch processor blocks while it exports; on a runtime worker
            // thread tell Tokio so, or the exporter's own tasks could starve.
            match tokio::runtime::Handle::try_current() {
                Ok(handle)
                    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
                {
                    tokio::task::block_in_place(flush)
                }
                _ => flush(),
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}
