//! The worker's telemetry events and metric names.

use std::time::Duration;

use wire::run::StepStatus;

pub const STEP_EXECUTIONS_TOTAL: &str = "worker_step_executions_total";
pub const STEP_DURATION_SECONDS: &str = "worker_step_duration_seconds";
pub const STEP_RETRIES_TOTAL: &str = "worker_step_retries_total";
pub const RUNS_IN_FLIGHT: &str = "worker_runs_in_flight";
pub const RUNS_COMPLETED_TOTAL: &str = "worker_runs_completed_total";
pub const QUEUE_DEPTH: &str = "worker_queue_depth";
pub const DEAD_LETTERS_TOTAL: &str = "worker_dead_letters_total";
pub const APPROVAL_WAIT_SECONDS: &str = "worker_approval_wait_seconds";
pub const APPROVALS_TOTAL: &str = "worker_approvals_total";
pub const FINISHED_REDELIVERIES_TOTAL: &str = "worker_finished_run_redeliveries_total";

pub fn describe() {
    metrics::describe_counter!(
        STEP_EXECUTIONS_TOTAL,
        "Step attempts, by step type, status and tenant."
    );
    metrics::describe_histogram!(
        STEP_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one step attempt, by step type and status."
    );
    metrics::describe_counter!(
        STEP_RETRIES_TOTAL,
        "Step attempts that were retried, by step type and reason."
    );
    metrics::describe_gauge!(RUNS_IN_FLIGHT, "Runs being executed by this worker now.");
    metrics::describe_counter!(
        RUNS_COMPLETED_TOTAL,
        "Runs this worker finished, by provider and final status."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Messages waiting in the provider's JetStream consumer (not yet delivered)."
    );
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Work messages moved to deadletter.> instead of being executed, by reason."
    );
    metrics::describe_histogram!(
        APPROVAL_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "Time approval steps waited for a decision, by outcome."
    );
    metrics::describe_counter!(
        FINISHED_REDELIVERIES_TOTAL,
        "Work messages of runs already finished that came back (a lost ack) and were acked without executing, by provider."
    );
    metrics::describe_counter!(
        APPROVALS_TOTAL,
        "Approval steps ended, by outcome (approved, rejected, timed_out)."
    );
}

/// One step attempt finished.
pub struct StepExecuted<'a> {
    pub step_type: &'static str,
    pub status: StepStatus,
    pub tenant_id: &'a str,
    pub elapsed: Duration,
    /// The failure's message (logs only; sanitized like every log field).
    pub error: Option<&'a str>,
}

impl StepExecuted<'_> {
    pub fn emit(self) {
        let status = self.status.as_str();
        let duration_ms = self.elapsed.as_secs_f64() * 1000.0;
        match self.error {
            None => tracing::info!(step.status = status, duration_ms, "step attempt finished"),
            Some(error) => {
                tracing::warn!(
                    step.status = status,
                    duration_ms,
                    error,
                    "step attempt failed"
                )
            }
        }
        metrics::counter!(
            STEP_EXECUTIONS_TOTAL,
            "step_type" => self.step_type,
            "status" => status,
            "tenant_id" => self.tenant_id.to_owned()
        )
        .increment(1);
        metrics::histogram!(STEP_DURATION_SECONDS, "step_type" => self.step_type, "status" => status)
            .record(self.elapsed.as_secs_f64());
    }
}

/// A failed attempt will be tried again.
pub struct StepRetried {
    pub step_type: &'static str,
    pub reason: &'static str,
}

impl StepRetried {
    pub fn emit(self) {
        tracing::info!(reason = self.reason, "step will be retried");
        metrics::counter!(STEP_RETRIES_TOTAL, "step_type" => self.step_type, "reason" => self.reason).increment(1);
    }
}

/// A run started (`+1` in flight) or ended (`-1`, counted by status).
pub struct RunInFlight<'a> {
    pub provider: &'a str,
    pub finished: Option<wire::run::RunStatus>,
}

impl RunInFlight<'_> {
    pub fn emit(self) {
        match self.finished {
            None => metrics::gauge!(RUNS_IN_FLIGHT).increment(1.0),
            Some(status) => {
                metrics::gauge!(RUNS_IN_FLIGHT).decrement(1.0);
                tracing::info!(run.status = status.as_str(), "run finished");
                metrics::counter!(RUNS_COMPLETED_TOTAL, "provider" => self.provider.to_owned(), "status" => status.as_str())
                    .increment(1);
            }
        }
    }
}

/// The work message of a run that already finished came back (its ack was
/// lost): nothing is executed; the outcome is reported again if its report
/// may not have been stored.
pub struct FinishedRunRedelivered<'a> {
    pub provider: &'a str,
    pub status: wire::run::RunStatus,
    /// Whether the final report was known to be stored.
    pub reported: bool,
}

impl FinishedRunRedelivered<'_> {
    pub fn emit(self) {
        tracing::info!(
            run.status = self.status.as_str(),
            reported = self.reported,
            "finished run redelivered; acked without executing it again"
        );
        metrics::counter!(FINISHED_REDELIVERIES_TOTAL, "provider" => self.provider.to_owned())
            .increment(1);
    }
}

/// The provider's consumer backlog was measured.
pub struct QueueDepth<'a> {
    pub provider: &'a str,
    pub pending: u64,
}

impl QueueDepth<'_> {
    pub fn emit(self) {
        metrics::gauge!(QUEUE_DEPTH, "provider" => self.provider.to_owned())
            .set(self.pending as f64);
    }
}

/// A work message was dead-lettered.
pub struct DeadLettered<'a> {
    pub subject: &'a str,
    pub reason: &'static str,
    pub run_id: Option<&'a str>,
}

impl DeadLettered<'_> {
    pub fn emit(self) {
        tracing::error!(
            messaging.destination.name = self.subject,
            reason = self.reason,
            dead_letter.run_id = self.run_id,
            "work message dead-lettered"
        );
        metrics::counter!(DEAD_LETTERS_TOTAL, "reason" => self.reason).increment(1);
    }
}

/// An approval step ended.
pub struct ApprovalDecided {
    /// `approved`, `rejected` or `timed_out`.
    pub outcome: &'static str,
    pub waited_secs: f64,
}

impl ApprovalDecided {
    pub fn emit(self) {
        tracing::info!(
            approval.outcome = self.outcome,
            waited_s = self.waited_secs,
            "approval decided"
        );
        metrics::counter!(APPROVALS_TOTAL, "outcome" => self.outcome).increment(1);
        metrics::histogram!(APPROVAL_WAIT_SECONDS, "outcome" => self.outcome)
            .record(self.waited_secs);
    }
}
