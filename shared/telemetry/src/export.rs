//! The span processor between the tracer and the OTLP exporter. It exists so
//! that the exporter can never hurt the service:
//!
//! - `on_end` (on the request path) only does a non-blocking `try_send` into a
//!   bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`); when the queue is full the span
//!   is dropped, never waited for. Memory is bounded by the queue plus one
//!   batch in flight.
//! - One task on the Tokio runtime exports batches of at most
//!   `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` every `OTEL_BSP_SCHEDULE_DELAY` ms, one
//!   export at a time, each cut off after `OTEL_BSP_EXPORT_TIMEOUT` ms. A
//!   collector that is down, slow or refusing only makes the queue fill up.
//! - Every dropped span is counted in `telemetry_spans_dropped_total{reason}`
//!   ([`DropReason`]), and one warning line per [`DROP_LOG_INTERVAL`] at most
//!   says how many were dropped since the last one, and why.
//! - Spans that were recorded but not sampled are not exported, except those
//!   ending with status ERROR (the adaptive sampler's "keep errors", see
//!   [`crate::sampling`]): they are exported with their sampled flag set.
//!
//! The SDK's `BatchSpanProcessor` drops silently when its queue is full; this
//! one counts. The exporter's own diagnostics are silenced while it exports
//! (they would otherwise be one log line per failed batch): the drop warning
//! carries the last export error instead.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, Status, TraceFlags};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tokio::time::Instant;
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

/// The batch settings, from the standard `OTEL_BSP_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (default 2048).
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` in ms (default 5000).
    pub scheduled_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (default 512, at most the queue size).
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_EXPORT_TIMEOUT` in ms (default 30000).
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            scheduled_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

impl BatchConfig {
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
#[derive(Default)]
struct Drops {
    pending: [AtomicU64; 4],
    total: [AtomicU64; 4],
    last_error: Mutex<Option<String>>,
}

impl Drops {
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

    /// Logs what was dropped since the last call, if anything was; whether
    /// it logged.
    fn log(&self) -> bool {
        let counts: Vec<u64> = self
            .pending
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return false;
        }
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
        true
    }
}

/// A processor's drop counts, readable after it was given to the provider.
#[derive(Clone)]
pub struct DropCounts(Arc<Drops>);

impl DropCounts {
    /// Spans dropped for `reason` since the processor started.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.total[reason.index()].load(Ordering::Relaxed)
    }
}

enum Control {
    SetResource(Resource),
    Flush(std::sync::mpsc::SyncSender<OTelSdkResult>),
    Shutdown(Duration, std::sync::mpsc::SyncSender<OTelSdkResult>),
}

/// The bounded, counting batch processor. See the module docs.
pub struct BoundedBatchProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    drops: Arc<Drops>,
    is_shutdown: AtomicBool,
    flush_timeout: Duration,
}

impl fmt::Debug for BoundedBatchProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedBatchProcessor")
            .field("is_shutdown", &self.is_shutdown)
            .finish_non_exhaustive()
    }
}

impl BoundedBatchProcessor {
    /// Starts the export task on `runtime`.
    pub fn new<E>(exporter: E, config: BatchConfig, runtime: &tokio::runtime::Handle) -> Self
    where
        E: SpanExporter + 'static,
    {
        let (spans, queue) = mpsc::channel(config.max_queue_size);
        let (control, control_rx) = mpsc::unbounded_channel();
        let drops = Arc::new(Drops::default());
        runtime.spawn(
            ExportTask {
                exporter,
                config,
                drops: drops.clone(),
            }
            .run(queue, control_rx),
        );
        Self {
            spans,
            control,
            drops,
            is_shutdown: AtomicBool::new(false),
            // A flush drains the whole queue, one timed-out export per batch
            // at worst; bounded so that a caller never waits forever.
            flush_timeout: config.export_timeout.saturating_mul(2) + config.scheduled_delay,
        }
    }

    pub fn drop_counts(&self) -> DropCounts {
        DropCounts(self.drops.clone())
    }

    /// Sends `make(reply)` to the task and waits for the reply, at most `timeout`.
    /// Blocking: never called on the request path.
    fn call(
        &self,
        make: impl FnOnce(std::sync::mpsc::SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        if self.control.send(make(reply)).is_err() {
            return Err(OTelSdkError::InternalFailure(
                "the span export task is gone (runtime shut down?)".to_owned(),
            ));
        }
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(
                OTelSdkError::InternalFailure("the span export task stopped".to_owned()),
            ),
        }
    }
}

/// The span as it should be exported, or `None` when it was not sampled and
/// is not worth keeping.
fn exportable(mut span: SpanData) -> Option<SpanData> {
    if span.span_context.is_sampled() {
        return Some(span);
    }
    if !matches!(span.status, Status::Error { .. }) {
        return None;
    }
    let sc = &span.span_context;
    span.span_context = SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags() | TraceFlags::SAMPLED,
        sc.is_remote(),
        sc.trace_state().clone(),
    );
    Some(span)
}

impl SpanProcessor for BoundedBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let Some(span) = exportable(span) else {
            return;
        };
        if self.is_shutdown.load(Ordering::Relaxed) {
            self.drops.record(DropReason::Shutdown, 1);
            return;
        }
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.drops.record(DropReason::QueueFull, 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.drops.record(DropReason::Shutdown, 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.is_shutdown.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        self.call(Control::Flush, self.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.is_shutdown.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        // The task answers by the deadline; a little slack for the reply.
        self.call(
            |reply| Control::Shutdown(timeout, reply),
            timeout + Duration::from_millis(200),
        )
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::SetResource(resource.clone()));
    }
}

struct ExportTask<E> {
    exporter: E,
    config: BatchConfig,
    drops: Arc<Drops>,
}

impl<E: SpanExporter> ExportTask<E> {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<SpanData>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.config.max_export_batch_size);
        let mut next_export = Instant::now() + self.config.scheduled_delay;
        let mut next_log = Instant::now();
        loop {
            tokio::select! {
                biased;
                message = control.recv() => match message {
                    Some(Control::SetResource(resource)) => self.exporter.set_resource(&resource),
                    Some(Control::Flush(reply)) => {
                        let result = self.drain(&mut batch, &mut queue, None).await;
                        let _ = reply.send(result);
                    }
                    Some(Control::Shutdown(timeout, reply)) => {
                        let deadline = Instant::now() + timeout;
                        queue.close();
                        let drained = self.drain(&mut batch, &mut queue, Some(deadline)).await;
                        let result = self.exporter.shutdown_with_timeout(
                            deadline.saturating_duration_since(Instant::now()),
                        );
                        let _ = self.drops.log();
                        let _ = reply.send(drained.and(result));
                        return;
                    }
                    // The processor is gone without a shutdown.
                    None => return,
                },
                span = queue.recv(), if batch.len() < self.config.max_export_batch_size => {
                    match span {
                        Some(span) => batch.push(span),
                        None => return,
                    }
                    if batch.len() >= self.config.max_export_batch_size {
                        let full = std::mem::take(&mut batch);
                        let _ = self.export(full, None).await;
                        next_export = Instant::now() + self.config.scheduled_delay;
                    }
                }
                _ = tokio::time::sleep_until(next_export) => {
                    if !batch.is_empty() {
                        let due = std::mem::take(&mut batch);
                        let _ = self.export(due, None).await;
                    }
                    next_export = Instant::now() + self.config.scheduled_delay;
                }
            }
            // The first drops are reported at once, later ones at most once
            // per interval (the schedule delay wakes this loop regularly).
            if Instant::now() >= next_log && self.drops.log() {
                next_log = Instant::now() + DROP_LOG_INTERVAL;
            }
        }
    }

    /// Exports everything batched and queued, batch by batch; by `deadline`
    /// (what is left then is dropped as `shutdown`).
    async fn drain(
        &mut self,
        batch: &mut Vec<SpanData>,
        queue: &mut mpsc::Receiver<SpanData>,
        deadline: Option<Instant>,
    ) -> OTelSdkResult {
        let mut result = Ok(());
        loop {
            while batch.len() < self.config.max_export_batch_size {
                match queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return result;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let mut left = batch.len();
                batch.clear();
                while queue.try_recv().is_ok() {
                    left += 1;
                }
                self.drops.record(DropReason::Shutdown, left);
                return Err(OTelSdkError::Timeout(Duration::ZERO));
            }
            let due = std::mem::take(batch);
            if let Err(err) = self.export(due, deadline).await {
                result = Err(err);
            }
        }
    }

    /// One export, cut off at the export timeout (or `deadline` if sooner);
    /// what fails is counted.
    async fn export(&mut self, batch: Vec<SpanData>, deadline: Option<Instant>) -> OTelSdkResult {
        let count = batch.len();
        let mut timeout = self.config.export_timeout;
        if let Some(deadline) = deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        // The exporter's own log lines (one per failed batch) are silenced;
        // the periodic drop warning reports the last error instead.
        let export = self
            .exporter
            .export(batch)
            .with_subscriber(tracing::subscriber::NoSubscriber::default());
        match tokio::time::timeout(timeout, export).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                self.drops.record(DropReason::ExportFailed, count);
                self.drops.set_error(err.to_string());
                Err(err)
            }
            Err(_) => {
                self.drops.record(DropReason::ExportTimeout, count);
                self.drops
                    .set_error(format!("export timed out after {timeout:?}"));
                Err(OTelSdkError::Timeout(timeout))
            }
        }
    }
}
