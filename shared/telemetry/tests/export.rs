//! The counting wrapper around the SDK's batch span processor, with exporters
//! that work, fail, stall and are slow: every sampled span is either exported
//! or counted as dropped, span for span. A real tracer provider, spans
//! started and ended the way the tracing layer does it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::{Span as _, Status, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use telemetry::export::{BatchSettings, CountingProcessor, DropCounts, DropReason};
use telemetry::sampling::AdaptiveSampler;

#[derive(Debug, Clone, Copy)]
enum Mode {
    Accept,
    Fail,
    /// Never answers, like a collector that accepts the connection and hangs.
    Stall,
    /// Slow per batch (the queue overflows), every 3rd call refused, every
    /// 5th never answered.
    Unreliable {
        per_batch: Duration,
    },
}

#[derive(Debug, Clone)]
struct TestExporter {
    mode: Mode,
    exported: Arc<Mutex<Vec<SpanData>>>,
    calls: Arc<AtomicUsize>,
    /// The SDK processor polls exports on its own thread: timers need this.
    runtime: tokio::runtime::Handle,
}

impl TestExporter {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            exported: Arc::default(),
            calls: Arc::default(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn exported(&self) -> Vec<SpanData> {
        self.exported.lock().expect("lock").clone()
    }
}

impl SpanExporter for TestExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match self.mode {
            Mode::Accept => {
                self.exported.lock().expect("lock").extend(batch);
                Ok(())
            }
            Mode::Fail => Err(OTelSdkError::InternalFailure("connection refused".into())),
            Mode::Stall => std::future::pending().await,
            Mode::Unreliable { per_batch } => {
                let slow = {
                    let _runtime = self.runtime.enter();
                    tokio::time::sleep(per_batch)
                };
                slow.await;
                if call % 5 == 0 {
                    std::future::pending::<()>().await;
                }
                if call % 3 == 0 {
                    return Err(OTelSdkError::InternalFailure("refused".into()));
                }
                self.exported.lock().expect("lock").extend(batch);
                Ok(())
            }
        }
    }
}

fn config(queue: usize, batch: usize, delay_ms: u64, timeout_ms: u64) -> BatchSettings {
    BatchSettings {
        max_queue_size: queue,
        scheduled_delay: Duration::from_millis(delay_ms),
        max_export_batch_size: batch,
        export_timeout: Duration::from_millis(timeout_ms),
    }
}

fn provider(
    exporter: &TestExporter,
    config: BatchSettings,
    sampler: Option<AdaptiveSampler>,
) -> (SdkTracerProvider, DropCounts) {
    let processor =
        CountingProcessor::new(exporter.clone(), config, &tokio::runtime::Handle::current());
    let counts = processor.drop_counts();
    let mut builder = SdkTracerProvider::builder().with_span_processor(processor);
    if let Some(sampler) = sampler {
        builder = builder.with_sampler(sampler);
    }
    (builder.build(), counts)
}

/// Starts and ends `n` root spans; returns the slowest `end` (what the
/// request path pays).
fn emit(provider: &SdkTracerProvider, n: usize, error_every: Option<usize>) -> Duration {
    let tracer = provider.tracer("test");
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let mut span = tracer.start(format!("span {i}"));
        if error_every.is_some_and(|k| i % k == 0) {
            span.set_status(Status::error("boom"));
        }
        let started = Instant::now();
        span.end();
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

/// Blocking calls (flush, shutdown) off the runtime's workers, as a service does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_batched_and_flushed() {
    let exporter = TestExporter::new(Mode::Accept);
    let (provider, counts) = provider(&exporter, config(64, 10, 10_000, 1000), None);
    emit(&provider, 25, None);
    // Full batches go out without waiting for the schedule delay.
    testkit_eventually(|| exporter.exported().len() >= 20).await;
    let flusher = provider.clone();
    blocking(move || flusher.force_flush())
        .await
        .expect("flush");
    assert_eq!(exporter.exported().len(), 25);
    assert_eq!(
        exporter.calls.load(Ordering::SeqCst),
        3,
        "batches of at most 10"
    );
    for reason in [
        DropReason::QueueFull,
        DropReason::ExportFailed,
        DropReason::ExportTimeout,
        DropReason::Shutdown,
    ] {
        assert_eq!(counts.get(reason), 0, "{reason:?}");
    }
    blocking(move || provider.shutdown_with_timeout(Duration::from_secs(2)))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_never_blocks_the_caller_and_every_drop_is_counted() {
    let exporter = TestExporter::new(Mode::Stall);
    let (provider, counts) = provider(&exporter, config(16, 8, 20, 150), None);
    let started = Instant::now();
    let slowest = emit(&provider, 5000, None);
    let elapsed = started.elapsed();
    assert!(
        slowest < Duration::from_millis(100),
        "one span end took {slowest:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "5000 spans took {elapsed:?}"
    );
    // Everything beyond the queue and the batch in flight was dropped, counted.
    let queue_full = counts.get(DropReason::QueueFull);
    assert!(queue_full >= 5000 - 16 - 8, "queue_full = {queue_full}");
    // The stalled export is cut off at the export timeout and its batch counted.
    testkit_eventually(|| counts.get(DropReason::ExportTimeout) >= 8).await;
    let accounted = queue_full + counts.get(DropReason::ExportTimeout);
    assert!(accounted <= 5000, "{accounted}");

    // Shutdown ends by its deadline although the exporter never answers.
    let started = Instant::now();
    let result = blocking(move || provider.shutdown_with_timeout(Duration::from_millis(300))).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        started.elapsed()
    );
    // What was left is exported (timed out, counted) or counted as
    // `shutdown` by the deadline, whichever the clock allowed.
    let _ = result;
    // Every span is accounted for: nothing was exported.
    let dropped = counts.get(DropReason::QueueFull)
        + counts.get(DropReason::ExportTimeout)
        + counts.get(DropReason::Shutdown);
    assert_eq!(dropped, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exports_are_counted() {
    let exporter = TestExporter::new(Mode::Fail);
    let (provider, counts) = provider(&exporter, config(1000, 10, 10, 1000), None);
    emit(&provider, 30, None);
    testkit_eventually(|| counts.get(DropReason::ExportFailed) == 30).await;
    assert!(exporter.calls.load(Ordering::SeqCst) >= 3);
    assert_eq!(counts.get(DropReason::QueueFull), 0);
    let _ = blocking(move || provider.shutdown_with_timeout(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_exports_what_is_queued_then_refuses_new_spans() {
    let exporter = TestExporter::new(Mode::Accept);
    let (provider, counts) = provider(&exporter, config(1000, 100, 60_000, 1000), None);
    emit(&provider, 42, None);
    let closing = provider.clone();
    blocking(move || closing.shutdown_with_timeout(Duration::from_secs(2)))
        .await
        .expect("shutdown");
    assert_eq!(exporter.exported().len(), 42);
    // After shutdown the provider no longer records; nothing is queued or
    // counted, and a second shutdown says so.
    emit(&provider, 5, None);
    assert_eq!(exporter.exported().len(), 42);
    assert_eq!(counts.get(DropReason::QueueFull), 0);
    let again = blocking(move || provider.shutdown_with_timeout(Duration::from_secs(1))).await;
    assert!(again.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_span_is_exported_or_counted_span_for_span() {
    // Slow, refusing and stalling by turns; a small queue so that it overflows.
    let exporter = TestExporter::new(Mode::Unreliable {
        per_batch: Duration::from_millis(20),
    });
    let (provider, counts) = provider(&exporter, config(64, 16, 10, 200), None);
    const SPANS: usize = 3000;
    for _ in 0..30 {
        emit(&provider, SPANS / 30, None);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let closing = provider.clone();
    let _ = blocking(move || closing.shutdown_with_timeout(Duration::from_secs(2))).await;
    let reasons = [
        DropReason::QueueFull,
        DropReason::ExportFailed,
        DropReason::ExportTimeout,
        DropReason::Shutdown,
    ];
    let dropped: u64 = reasons.iter().map(|r| counts.get(*r)).sum();
    let exported = exporter.exported().len() as u64;
    let by_reason: Vec<_> = reasons
        .iter()
        .map(|r| (r.as_str(), counts.get(*r)))
        .collect();
    assert_eq!(
        exported + dropped,
        SPANS as u64,
        "exported {exported}, dropped {by_reason:?}"
    );
    for reason in &reasons[..3] {
        assert!(counts.get(*reason) > 0, "no {reason:?} in {by_reason:?}");
    }
    assert!(exported > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_an_unsampled_trace_is_exported_errors_included() {
    let exporter = TestExporter::new(Mode::Accept);
    // A budget of one trace a second: of 40 roots started at once, one is
    // sampled; every fourth ends in ERROR, which keeps none of the others.
    let (provider, counts) = provider(
        &exporter,
        config(1000, 100, 10, 1000),
        Some(AdaptiveSampler::new(1.0)),
    );
    emit(&provider, 40, Some(4));
    let flusher = provider.clone();
    blocking(move || flusher.force_flush())
        .await
        .expect("flush");
    let exported = exporter.exported();
    assert_eq!(exported.len(), 1, "only the sampled span 0: {exported:#?}");
    assert!(exported[0].span_context.is_sampled());
    // Not sampled is not dropped: nothing was meant to be exported.
    assert_eq!(counts.get(DropReason::QueueFull), 0);
    let _ = blocking(move || provider.shutdown_with_timeout(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_follow_their_root_under_the_adaptive_sampler() {
    let exporter = TestExporter::new(Mode::Accept);
    let (provider, _) = provider(
        &exporter,
        config(1000, 100, 10, 1000),
        Some(AdaptiveSampler::new(1.0)),
    );
    let tracer = provider.tracer("test");
    for _ in 0..5 {
        tracer.in_span("root", |_| {
            tracer.in_span("child", |_| {});
        });
    }
    let flusher = provider.clone();
    blocking(move || flusher.force_flush())
        .await
        .expect("flush");
    let exported = exporter.exported();
    // One sampled trace, exported whole: its root and its child.
    assert_eq!(exported.len(), 2, "{exported:#?}");
    assert_eq!(
        exported[0].span_context.trace_id(),
        exported[1].span_context.trace_id()
    );
    let _ = blocking(move || provider.shutdown_with_timeout(Duration::from_secs(1))).await;
}

async fn testkit_eventually(check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
