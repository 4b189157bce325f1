//! Executing steps. [`execute_step`] runs one attempt of one step and is what
//! tests drive directly; [`run_steps`] runs a whole run in order, with
//! retries, spans and metrics.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;
use tracing::field::Empty;
use wire::run::{RunStatus, StepResult, StepStatus};
use wire::step::{RetryPolicy, StepKind, StepSpec};
use wire::submitted::RunSubmitted;

use crate::events::{StepExecuted, StepRetried};

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Succeeded(Value),
    Failed {
        message: String,
        /// Whether another attempt could succeed.
        retryable: bool,
    },
}

/// Runs one attempt of `kind`.
pub async fn execute_step(kind: &StepKind) -> StepOutcome {
    match kind {
        StepKind::Noop => StepOutcome::Succeeded(json!({})),
        StepKind::Delay(input) => {
            tokio::time::sleep(Duration::from_millis(input.ms)).await;
            StepOutcome::Succeeded(json!({"slept_ms": input.ms}))
        }
        StepKind::Fail(input) => {
            if input.probability >= 1.0 || fastrand::f64() < input.probability {
                StepOutcome::Failed {
                    message: input.message.clone(),
                    // A probabilistic failure may pass next time.
                    retryable: input.probability < 1.0,
                }
            } else {
                StepOutcome::Succeeded(json!({"failed": false}))
            }
        }
    }
}

/// How a whole run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub status: RunStatus,
    pub steps: Vec<StepResult>,
    pub error: Option<String>,
}

/// Runs every step in order; the first step that fails for good fails the
/// run and the steps after it are `skipped`.
pub async fn run_steps(run: &RunSubmitted) -> RunOutcome {
    let mut steps = Vec::with_capacity(run.steps.len());
    let mut error = None;
    for spec in &run.steps {
        if error.is_some() {
            steps.push(StepResult {
                id: spec.id.clone(),
                step_type: spec.kind.type_name().to_owned(),
                status: StepStatus::Skipped,
                attempts: 0,
                output: Value::Null,
                error: None,
                started_at: None,
                ended_at: None,
            });
            continue;
        }
        let result = run_step(run, spec).await;
        if result.status == StepStatus::Failed {
            error = Some(format!(
                "step {} failed: {}",
                spec.id,
                result.error.as_deref().unwrap_or("unknown error")
            ));
        }
        steps.push(result);
    }
    RunOutcome {
        status: if error.is_some() {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        },
        steps,
        error,
    }
}

/// One step with its retries; each attempt is its own `worker.step.execute` span.
async fn run_step(run: &RunSubmitted, spec: &StepSpec) -> StepResult {
    let started_at = OffsetDateTime::now_utc();
    let step_type = spec.kind.type_name();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let span = tracing::info_span!(
            "worker.step.execute",
            step.id = spec.id.as_str(),
            step.type = step_type,
            attempt,
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
            flow.id = run.flow_id.as_str(),
            otel.status_code = Empty,
            error.type = Empty,
        );
        let began = Instant::now();
        let outcome = execute_step(&spec.kind).instrument(span.clone()).await;
        let elapsed = began.elapsed();
        let _entered = span.enter();
        match outcome {
            StepOutcome::Succeeded(output) => {
                StepExecuted {
                    step_type,
                    status: StepStatus::Succeeded,
                    tenant_id: run.tenant_id.as_str(),
                    elapsed,
                }
                .emit();
                return StepResult {
                    id: spec.id.clone(),
                    step_type: step_type.to_owned(),
                    status: StepStatus::Succeeded,
                    attempts: attempt,
                    output,
                    error: None,
                    started_at: Some(started_at),
                    ended_at: Some(OffsetDateTime::now_utc()),
                };
            }
            StepOutcome::Failed { message, retryable } => {
                telemetry::spans::record_error(&span, "step_failed", &message);
                StepExecuted {
                    step_type,
                    status: StepStatus::Failed,
                    tenant_id: run.tenant_id.as_str(),
                    elapsed,
                }
                .emit();
                if retryable && attempt < spec.retry.max_attempts {
                    StepRetried {
                        step_type,
                        reason: "step_failed",
                    }
                    .emit();
                    drop(_entered);
                    tokio::time::sleep(backoff(&spec.retry, attempt)).await;
                    continue;
                }
                return StepResult {
                    id: spec.id.clone(),
                    step_type: step_type.to_owned(),
                    status: StepStatus::Failed,
                    attempts: attempt,
                    output: Value::Null,
                    error: Some(message),
                    started_at: Some(started_at),
                    ended_at: Some(OffsetDateTime::now_utc()),
                };
            }
        }
    }
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
    use wire::step::{DelayInput, FailInput};

    #[tokio::test(start_paused = true)]
    async fn delay_sleeps_for_its_input() {
        let began = tokio::time::Instant::now();
        let outcome = execute_step(&StepKind::Delay(DelayInput { ms: 250 })).await;
        assert_eq!(outcome, StepOutcome::Succeeded(json!({"slept_ms": 250})));
        assert_eq!(began.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn fail_always_fails_for_good() {
        let outcome = execute_step(&StepKind::Fail(FailInput {
            message: "boom".into(),
            probability: 1.0,
        }))
        .await;
        assert_eq!(
            outcome,
            StepOutcome::Failed {
                message: "boom".into(),
                retryable: false
            }
        );
    }

    #[tokio::test]
    async fn fail_never_with_zero_probability() {
        let outcome = execute_step(&StepKind::Fail(FailInput {
            message: "boom".into(),
            probability: 0.0,
        }))
        .await;
        assert!(matches!(outcome, StepOutcome::Succeeded(_)));
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
