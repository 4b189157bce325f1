//! Running a run: steps in order, each attempt in its own
//! `worker.step.execute` span, retries with backoff for retryable failures,
//! progress checkpointed after every step.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;
use time::OffsetDateTime;
use tracing::Instrument;
use tracing::field::Empty;
use wire::events::RunEvent;
use wire::ids::ProviderId;
use wire::jetstream::{Outgoing, PublishError};
use wire::run::{RunStatus, StepResult, StepStatus};
use wire::step::{ApprovalInput, RetryPolicy, StepKind, StepSpec};
use wire::submitted::RunSubmitted;

use crate::blocks::{Blocks, StepOutcome};
use crate::events::{StepExecuted, StepRetried};
use crate::progress::{Progress, ProgressStore, Terminal};

/// How a whole run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub status: RunStatus,
    pub steps: Vec<StepResult>,
    pub error: Option<String>,
}

/// Where a run reports (`runs.events`) and checkpoints (progress bucket).
pub struct Journal {
    pub jetstream: async_nats::jetstream::Context,
    pub store: ProgressStore,
    pub progress: Progress,
    pub provider: ProviderId,
}

impl Journal {
    /// Saves the progress. A failed save only costs re-execution after a
    /// crash, so it is logged, not fatal.
    pub async fn checkpoint(&self, run: &RunSubmitted) {
        if let Err(err) = self.store.save(&run.run_id, &self.progress).await {
            tracing::warn!(error = format!("{err:#}"), "cannot checkpoint run progress");
        }
    }

    /// Publishes the run's status to `runs.events` (deduplicated by
    /// `RunEvent::message_id`).
    pub async fn report(
        &self,
        run: &RunSubmitted,
        status: RunStatus,
        steps: Vec<StepResult>,
        error: Option<String>,
    ) -> Result<(), PublishError> {
        self.publish(RunEvent {
            run_id: run.run_id.clone(),
            tenant_id: run.tenant_id.clone(),
            status,
            provider: Some(self.provider.clone()),
            steps,
            error,
            at: OffsetDateTime::now_utc(),
        })
        .await
    }

    /// Ends the run with `outcome`, once: the outcome is checkpointed first
    /// (a redelivery then reports it again instead of executing), then
    /// reported, then reduced to a terminal marker.
    pub async fn finish(
        &mut self,
        run: &RunSubmitted,
        outcome: RunOutcome,
    ) -> Result<(), PublishError> {
        self.progress.terminal = Some(Terminal {
            status: outcome.status,
            steps: outcome.steps,
            error: outcome.error,
            at: OffsetDateTime::now_utc(),
            reported: false,
        });
        self.checkpoint(run).await;
        self.report_terminal(run).await
    }

    /// Reports the checkpointed outcome (the same event as the first time:
    /// same `Nats-Msg-Id`, same content) and marks it reported.
    pub async fn report_terminal(&mut self, run: &RunSubmitted) -> Result<(), PublishError> {
        let Some(terminal) = self.progress.terminal.clone() else {
            return Ok(());
        };
        if terminal.reported {
            return Ok(());
        }
        self.publish(RunEvent {
            run_id: run.run_id.clone(),
            tenant_id: run.tenant_id.clone(),
            status: terminal.status,
            provider: Some(self.provider.clone()),
            steps: terminal.steps,
            error: terminal.error,
            at: terminal.at,
        })
        .await?;
        // A failed save only means the next redelivery reports again.
        if let Err(err) = self
            .store
            .mark_reported(&run.run_id, terminal.status, terminal.at)
            .await
        {
            tracing::warn!(error = format!("{err:#}"), "cannot mark the run reported");
        }
        Ok(())
    }

    async fn publish(&self, event: RunEvent) -> Result<(), PublishError> {
        let message_id = event.message_id();
        wire::jetstream::publish(
            &self.jetstream,
            Outgoing {
                subject: wire::events::SUBJECT,
                message_id: &message_id,
                payload: event.encode(),
                tenant_id: event.tenant_id.as_str(),
                run_id: event.run_id.as_str(),
            },
        )
        .await
        .map(|_| ())
    }
}

/// Runs every step in order. Steps that succeeded in an earlier attempt of
/// this run are not run again. The first step that fails for good fails the
/// run (an approval that times out times it out) and the rest are `skipped`.
pub async fn run_steps(blocks: &Blocks, run: &RunSubmitted, journal: &mut Journal) -> RunOutcome {
    let mut steps: Vec<StepResult> = Vec::with_capacity(run.steps.len());
    let mut status = RunStatus::Succeeded;
    let mut error = None;
    for spec in &run.steps {
        if status != RunStatus::Succeeded {
            steps.push(skipped(spec));
            continue;
        }
        if let Some(done) = journal
            .progress
            .steps
            .iter()
            .find(|r| r.id == spec.id && r.status == StepStatus::Succeeded)
        {
            steps.push(done.clone());
            continue;
        }
        let (result, timed_out) = match &spec.kind {
            StepKind::Approval(input) => {
                approval_step(blocks, run, spec, input, &steps, journal).await
            }
            _ => (run_step(blocks, run, spec).await, false),
        };
        if result.status == StepStatus::Failed {
            status = if timed_out {
                RunStatus::TimedOut
            } else {
                RunStatus::Failed
            };
            error = Some(format!(
                "step {} failed: {}",
                spec.id,
                result.error.as_deref().unwrap_or("unknown error")
            ));
        }
        steps.push(result);
        journal.progress.steps = steps.clone();
        journal.checkpoint(run).await;
    }
    RunOutcome {
        status,
        steps,
        error,
    }
}

fn skipped(spec: &StepSpec) -> StepResult {
    StepResult {
        id: spec.id.clone(),
        step_type: spec.kind.type_name().to_owned(),
        status: StepStatus::Skipped,
        attempts: 0,
        output: Value::Null,
        error: None,
        started_at: None,
        ended_at: None,
    }
}

/// Calls `attempt` until it succeeds, fails for good, or `policy` runs out of
/// attempts; waits [`backoff`] between attempts. Returns the last outcome and
/// the number of attempts made.
pub async fn with_retries<F, Fut>(
    policy: &RetryPolicy,
    step_type: &'static str,
    mut attempt: F,
) -> (StepOutcome, u32)
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = StepOutcome>,
{
    let mut made = 0;
    loop {
        made += 1;
        let outcome = attempt(made).await;
        match &outcome {
            StepOutcome::Failed {
                retryable: true,
                code,
                ..
            } if made < policy.max_attempts => {
                StepRetried {
                    step_type,
                    reason: code,
                }
                .emit();
                tokio::time::sleep(backoff(policy, made)).await;
            }
            _ => return (outcome, made),
        }
    }
}

/// One step with its retries; each attempt is its own `worker.step.execute` span.
async fn run_step(blocks: &Blocks, run: &RunSubmitted, spec: &StepSpec) -> StepResult {
    let started_at = OffsetDateTime::now_utc();
    let step_type = spec.kind.type_name();
    let (outcome, attempts) = with_retries(&spec.retry, step_type, |attempt| {
        let span = step_span(run, spec, attempt);
        async move {
            let began = Instant::now();
            let outcome = blocks.execute(&spec.kind).instrument(span.clone()).await;
            finish_attempt(&span, &outcome, step_type, run, began.elapsed());
            outcome
        }
    })
    .await;
    result(spec, outcome, attempts, started_at).0
}

/// An `approval` step: report `awaiting_approval`, wait, report `running` again.
async fn approval_step(
    blocks: &Blocks,
    run: &RunSubmitted,
    spec: &StepSpec,
    input: &ApprovalInput,
    done: &[StepResult],
    journal: &mut Journal,
) -> (StepResult, bool) {
    let step_type = spec.kind.type_name();
    let requested_at = match journal.progress.requested_at(spec.id.as_str()) {
        Some(at) => at,
        None => {
            let now = OffsetDateTime::now_utc();
            journal.progress.set_requested_at(spec.id.as_str(), now);
            journal.checkpoint(run).await;
            now
        }
    };
    let mut waiting = done.to_vec();
    waiting.push(StepResult {
        id: spec.id.clone(),
        step_type: step_type.to_owned(),
        status: StepStatus::AwaitingApproval,
        attempts: 1,
        output: serde_json::json!({"prompt": input.prompt, "timeout_s": input.timeout_s}),
        error: None,
        started_at: Some(requested_at),
        ended_at: None,
    });
    if let Err(err) = journal
        .report(run, RunStatus::AwaitingApproval, waiting, None)
        .await
    {
        tracing::warn!(error = %err, "cannot report awaiting_approval; waiting anyway");
    }

    let span = step_span(run, spec, 1);
    let began = Instant::now();
    // Waiting costs nothing: the worker's slot goes to other runs meanwhile.
    let outcome = wire::jetstream::without_slot(
        blocks
            .approval
            .wait(&run.run_id, &run.tenant_id, spec, input, requested_at)
            .instrument(span.clone()),
    )
    .await;
    finish_attempt(&span, &outcome, step_type, run, began.elapsed());
    let (result, timed_out) = result(spec, outcome, 1, requested_at);
    if result.status == StepStatus::Succeeded {
        let mut so_far = done.to_vec();
        so_far.push(result.clone());
        if let Err(err) = journal.report(run, RunStatus::Running, so_far, None).await {
            tracing::warn!(error = %err, "cannot report running after the approval");
        }
    }
    (result, timed_out)
}

fn step_span(run: &RunSubmitted, spec: &StepSpec, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        "worker.step.execute",
        step.id = spec.id.as_str(),
        step.type = spec.kind.type_name(),
        attempt,
        tenant.id = run.tenant_id.as_str(),
        run.id = run.run_id.as_str(),
        flow.id = run.flow_id.as_str(),
        otel.status_code = Empty,
        error.type = Empty,
    )
}

fn finish_attempt(
    span: &tracing::Span,
    outcome: &StepOutcome,
    step_type: &'static str,
    run: &RunSubmitted,
    elapsed: Duration,
) {
    let _entered = span.enter();
    let status = match outcome {
        StepOutcome::Succeeded(_) => StepStatus::Succeeded,
        StepOutcome::Failed { code, message, .. } => {
            telemetry::spans::record_error(span, code, message);
            StepStatus::Failed
        }
        StepOutcome::TimedOut { message } => {
            telemetry::spans::record_error(span, "timed_out", message);
            StepStatus::Failed
        }
    };
    let error = match outcome {
        StepOutcome::Succeeded(_) => None,
        StepOutcome::Failed { message, .. } | StepOutcome::TimedOut { message } => {
            Some(message.as_str())
        }
    };
    StepExecuted {
        step_type,
        status,
        tenant_id: run.tenant_id.as_str(),
        elapsed,
        error,
    }
    .emit();
}

/// The step's result from its last outcome; `true` when it timed out.
fn result(
    spec: &StepSpec,
    outcome: StepOutcome,
    attempts: u32,
    started_at: OffsetDateTime,
) -> (StepResult, bool) {
    let (status, output, error, timed_out) = match outcome {
        StepOutcome::Succeeded(output) => (StepStatus::Succeeded, output, None, false),
        StepOutcome::Failed { message, .. } => {
            (StepStatus::Failed, Value::Null, Some(message), false)
        }
        StepOutcome::TimedOut { message } => (StepStatus::Failed, Value::Null, Some(message), true),
    };
    (
        StepResult {
            id: spec.id.clone(),
            step_type: spec.kind.type_name().to_owned(),
            status,
            attempts,
            output,
            error,
            started_at: Some(started_at),
            ended_at: Some(OffsetDateTime::now_utc()),
        },
        timed_out,
    )
}

/// Exponential backoff with full jitter: a random wait in
/// `[0, min(max, base * 2^(attempt-1))]`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy
        .backoff_ms
        .saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
    let cap = exp.min(policy.max_backoff_ms);
    Duration::from_millis(fastrand::u64(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(code: &'static str, retryable: bool) -> StepOutcome {
        StepOutcome::failed(code, "nope", retryable)
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_with_backoff() {
        let policy = RetryPolicy {
            max_attempts: 4,
            backoff_ms: 100,
            max_backoff_ms: 250,
        };
        let began = tokio::time::Instant::now();
        let (outcome, attempts) = with_retries(&policy, "http", |attempt| async move {
            if attempt < 3 {
                failing("timeout", true)
            } else {
                StepOutcome::Succeeded(Value::Null)
            }
        })
        .await;
        assert_eq!(outcome, StepOutcome::Succeeded(Value::Null));
        assert_eq!(attempts, 3);
        // Two waits, each at most min(250, 100 * 2^(n-1)) ms.
        assert!(began.elapsed() <= Duration::from_millis(100 + 200));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_max_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 1_000,
        };
        let began = tokio::time::Instant::now();
        let (outcome, attempts) =
            with_retries(&policy, "http", |_| async { failing("http_status", true) }).await;
        assert_eq!(attempts, 3);
        assert!(matches!(
            outcome,
            StepOutcome::Failed {
                code: "http_status",
                ..
            }
        ));
        assert!(began.elapsed() <= Duration::from_millis(2_000));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let policy = RetryPolicy {
            max_attempts: 5,
            backoff_ms: 10,
            max_backoff_ms: 10,
        };
        let (_, attempts) = with_retries(&policy, "fs", |_| async {
            failing("sandbox_violation", false)
        })
        .await;
        assert_eq!(attempts, 1);
    }

    #[test]
    fn backoff_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        };
        for attempt in 1..10 {
            assert!(backoff(&policy, attempt) <= Duration::from_millis(1_000));
        }
    }
}
