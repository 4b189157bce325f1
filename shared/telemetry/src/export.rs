//! Between the tracer and the OTLP exporter: the SDK's `BatchSpanProcessor`,
//! wrapped so that every span it does not export is counted, exactly.
//!
//! - [`CountingProcessor`] (a `SpanProcessor`) admits a sampled span into the
//!   SDK processor's queue only while fewer than `OTEL_BSP_MAX_QUEUE_SIZE`
//!   admitted spans wait for the exporter; otherwise it drops and counts it
//!   (`queue_full`). The SDK's own queue has that same capacity, so it never
//!   drops on its own (it would, silently: its count is private and logged
//!   once at shutdown). `on_end` never waits.
//! - [`CountingExporter`] (a `SpanExporter`) is what the SDK processor exports
//!   to: it takes the batch off the admitted count, cuts the export off after
//!   `OTEL_BSP_EXPORT_TIMEOUT` (the SDK's thread-based processor has no
//!   timeout of its own) and counts a failed or timed-out batch.
//! - At shutdown, what is still queued or in an export that did not end in
//!   time is counted as `shutdown`; a span ended after shutdown too.
//!
//! So `telemetry_spans_dropped_total{reason}` plus what the collector
//! received is every sampled span, span for span. One warning line per
//! [`DROP_LOG_INTERVAL`] at most says how many were dropped, and why; the
//! exporter's own diagnostics are silenced (they would be one line per failed
//! batch) and the warning carries the last export error instead.
//!
//! The SDK processor (0.33) exports one batch at a time on its own thread:
//! throughput is `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans per export round trip,
//! which is why the defaults here are larger than the specification's (see
//! [`BatchSettings`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use tracing::instrument::WithSubscriber;

use crate::env::{self, EnvError};

/// The dropped-spans counter.
pub const SPANS_DROPPED_METRIC: &str = "telemetry_spans_dropped_total";

/// At most one "spans dropped" warning per interval.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a span was not exported (the `reason` label; a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue was full: the exporter is behind (collector slow or down).
    QueueFull,
    /// The export call returned an error (collector refusing or unreachable).
    ExportFailed,
    /// The export call did not finish within `OTEL_BSP_EXPORT_TIMEOUT`.
    ExportTimeout,
    /// Ended after shutdown, or still queued when shutdown ran out of time.
    Shutdown,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        Self::QueueFull,
        Self::ExportFailed,
        Self::ExportTimeout,
        Self::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
            Self::ExportTimeout => "export_timeout",
            Self::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::QueueFull => 0,
            Self::ExportFailed => 1,
            Self::ExportTimeout => 2,
            Self::Shutdown => 3,
        }
    }
}

/// Registers the counter's help text and its series at 0, so that
/// `/metrics` shows it before anything was dropped. Call once the recorder
/// is installed.
pub fn describe_metrics() {
    metrics::describe_counter!(
        SPANS_DROPPED_METRIC,
        "Spans that were recorded for export but dropped: queue full, export failed or timed out, shutdown."
    );
    for reason in DropReason::ALL {
        metrics::counter!(SPANS_DROPPED_METRIC, "reason" => reason.as_str()).absolute(0);
    }
}

/// The batch settings, from the standard `OTEL_BSP_*` variables (read here,
/// not by the SDK's `BatchConfigBuilder`, so that a bad value stops the
/// process instead of being ignored).
///
/// The defaults are for a busy service, not the specification's (2048 /
/// 512 / 5000 ms): one export is in flight at a time, so a collector that
/// takes 250 ms per batch moves at most 4 batches a second. 1024 spans per
/// batch (about 1 MiB of OTLP, well below gRPC's 4 MiB message limit) and an
/// 8192-span queue (8 batches, a few seconds of a slow collector) keep that
/// from overflowing at a few hundred runs per second; a 1 s delay keeps spans
/// fresh in the backend and batches small when traffic is light.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (default 8192).
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` in ms (default 1000).
    pub scheduled_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (default 1024, at most the queue size).
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_EXPORT_TIMEOUT` in ms (default 30000).
    pub export_timeout: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_queue_size: 8192,
            scheduled_delay: Duration::from_millis(1000),
            max_export_batch_size: 1024,
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

impl BatchSettings {
    pub fn from_env() -> Result<Self, EnvError> {
        let defaults = Self::default();
        let positive = |var: &str, default: u64| -> Result<u64, EnvError> {
            let value: u64 = env::parse_or(var, default)?;
            if value == 0 {
                return Err(EnvError::new(var, "0", "expected a number > 0"));
            }
            Ok(value)
        };
        let max_queue_size = positive("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size as u64)?;
        let max_export_batch_size = positive(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size as u64,
        )?
        .min(max_queue_size);
        Ok(Self {
            max_queue_size: usize::try_from(max_queue_size).unwrap_or(usize::MAX),
            scheduled_delay: Duration::from_millis(positive(
                "OTEL_BSP_SCHEDULE_DELAY",
                defaults.scheduled_delay.as_millis() as u64,
            )?),
            max_export_batch_size: usize::try_from(max_export_batch_size).unwrap_or(usize::MAX),
            export_timeout: Duration::from_millis(positive(
                "OTEL_BSP_EXPORT_TIMEOUT",
                defaults.export_timeout.as_millis() as u64,
            )?),
        })
    }
}

/// Drop counts since the last warning and since the start, per reason, and
/// the last export error.
struct Drops {
    pending: [AtomicU64; 4],
    total: [AtomicU64; 4],
    last_error: Mutex<Option<String>>,
    /// When the last warning was written (`None`: never; the first is at once).
    last_log: Mutex<Option<Instant>>,
}

impl Drops {
    fn new() -> Self {
        Self {
            pending: Default::default(),
            total: Default::default(),
            last_error: Mutex::new(None),
            last_log: Mutex::new(None),
        }
    }

    fn record(&self, reason: DropReason, count: usize) {
        if count == 0 {
            return;
        }
        metrics::counter!(SPANS_DROPPED_METRIC, "reason" => reason.as_str())
            .increment(count as u64);
        self.pending[reason.index()].fetch_add(count as u64, Ordering::Relaxed);
        self.total[reason.index()].fetch_add(count as u64, Ordering::Relaxed);
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    /// Logs what was dropped since the last warning, unless one was written
    /// less than [`DROP_LOG_INTERVAL`] ago (`force`: regardless).
    fn maybe_log(&self, force: bool) {
        let mut last_log = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if !force && last_log.is_some_and(|at| at.elapsed() < DROP_LOG_INTERVAL) {
            return;
        }
        let counts: Vec<u64> = self
            .pending
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        *last_log = Some(Instant::now());
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        tracing::warn!(
            target: "telemetry::export",
            dropped = total,
            queue_full = counts[DropReason::QueueFull.index()],
            export_failed = counts[DropReason::ExportFailed.index()],
            export_timeout = counts[DropReason::ExportTimeout.index()],
            shutdown = counts[DropReason::Shutdown.index()],
            last_error,
            "spans dropped: the trace exporter cannot keep up or the collector is unreachable"
        );
    }
}

/// Where every admitted span is until its export ends.
struct Ledger {
    /// Admitted into the SDK queue, not yet handed to the exporter.
    queued: AtomicUsize,
    /// Spans in exports that have not ended, and whether shutdown has
    /// already counted them (and what was queued) as `shutdown`.
    exports: Mutex<Exports>,
    drops: Drops,
}

#[derive(Default)]
struct Exports {
    in_flight: usize,
    closed: bool,
}

impl Ledger {
    fn exports(&self) -> std::sync::MutexGuard<'_, Exports> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A processor's drop counts, readable after it was given to the provider.
#[derive(Clone)]
pub struct DropCounts(Arc<Ledger>);

impl DropCounts {
    /// Spans dropped for `reason` since the processor started.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.drops.total[reason.index()].load(Ordering::Relaxed)
    }
}

/// The SDK's batch processor behind the admission count. See the module docs.
#[derive(Debug)]
pub struct CountingProcessor {
    inner: BatchSpanProcessor,
    ledger: Arc<Ledger>,
    max_queue_size: usize,
    is_shutdown: AtomicBool,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl CountingProcessor {
    /// The SDK's `BatchSpanProcessor` with `settings`, exporting to
    /// `exporter` through a [`CountingExporter`]. `runtime` drives the export
    /// timeout (the tonic exporter needs a Tokio runtime anyway).
    pub fn new<E>(exporter: E, settings: BatchSettings, runtime: &tokio::runtime::Handle) -> Self
    where
        E: SpanExporter + 'static,
    {
        let ledger = Arc::new(Ledger {
            queued: AtomicUsize::new(0),
            exports: Mutex::new(Exports::default()),
            drops: Drops::new(),
        });
        let exporter = CountingExporter {
            inner: exporter,
            ledger: ledger.clone(),
            timeout: settings.export_timeout,
            runtime: runtime.clone(),
        };
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queue_size)
            .with_max_export_batch_size(settings.max_export_batch_size)
            .with_scheduled_delay(settings.scheduled_delay)
            .build();
        Self {
            inner: BatchSpanProcessor::builder(exporter)
                .with_batch_config(config)
                .build(),
            ledger,
            max_queue_size: settings.max_queue_size,
            is_shutdown: AtomicBool::new(false),
        }
    }

    pub fn drop_counts(&self) -> DropCounts {
        DropCounts(self.ledger.clone())
    }
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // Not sampled: never meant to be exported (the SDK processor would
        // export it all the same), so not a drop either.
        if !span.span_context.is_sampled() {
            return;
        }
        if self.is_shutdown.load(Ordering::Relaxed) {
            self.ledger.drops.record(DropReason::Shutdown, 1);
            return;
        }
        let admitted =
            self.ledger
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    (queued < self.max_queue_size).then_some(queued + 1)
                });
        match admitted {
            Ok(_) => self.inner.on_end(span),
            // Logged by the exporter's next call (on_end must stay cheap).
            Err(_) => self.ledger.drops.record(DropReason::QueueFull, 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.is_shutdown.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let result = self.inner.shutdown_with_timeout(timeout);
        // Whatever the SDK processor did not hand over in time is lost now;
        // an export still running when it gave up counts here, not later.
        let mut exports = self.ledger.exports();
        exports.closed = true;
        let left = self.ledger.queued.swap(0, Ordering::AcqRel) + exports.in_flight;
        drop(exports);
        self.ledger.drops.record(DropReason::Shutdown, left);
        self.ledger.drops.maybe_log(true);
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter the SDK processor exports to: the real one, timed out and
/// counted. See the module docs.
#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    ledger: Arc<Ledger>,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len();
        {
            let mut exports = self.ledger.exports();
            if exports.closed {
                // Already counted as `shutdown`.
                return Ok(());
            }
            exports.in_flight += count;
            self.ledger.queued.fetch_sub(count, Ordering::AcqRel);
        }
        // The exporter's own log lines (one per failed batch) are silenced;
        // the periodic drop warning reports the last error instead. The
        // timer needs the runtime's context when it is created (this runs on
        // the SDK processor's own thread).
        let export = self
            .inner
            .export(batch)
            .with_subscriber(tracing::subscriber::NoSubscriber::default());
        let export = {
            let _runtime = self.runtime.enter();
            tokio::time::timeout(self.timeout, export)
        };
        let outcome = export.await;
        {
            let mut exports = self.ledger.exports();
            if exports.closed {
                return Ok(());
            }
            exports.in_flight -= count;
        }
        let drops = &self.ledger.drops;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                drops.set_error(err.to_string());
                drops.record(DropReason::ExportFailed, count);
            }
            Err(_) => {
                drops.set_error(format!("export timed out after {:?}", self.timeout));
                drops.record(DropReason::ExportTimeout, count);
            }
        }
        drops.maybe_log(false);
        // A failure is counted and warned about above; returned as Ok so the
        // SDK processor does not also log it at ERROR, once per batch.
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
