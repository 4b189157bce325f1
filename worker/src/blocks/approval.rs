//! `approval`: the run waits for a human decision made through the gateway
//! (`POST /v1/runs/{id}/steps/{step}/approve|reject`), which lands in the
//! approvals key-value bucket. The wait is measured from the first request,
//! kept in the run's progress, so a worker restart does not reset the clock.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use time::OffsetDateTime;
use wire::approvals::{ApprovalDecision, Verdict};
use wire::ids::RunId;
use wire::step::{ApprovalInput, StepSpec};

use super::StepOutcome;
use crate::events::ApprovalDecided;

pub struct ApprovalBlock {
    decisions: async_nats::jetstream::kv::Store,
}

impl ApprovalBlock {
    pub fn new(decisions: async_nats::jetstream::kv::Store) -> Self {
        Self { decisions }
    }

    /// Waits for the decision on `step` until `requested_at + timeout_s`.
    pub async fn wait(
        &self,
        run_id: &RunId,
        tenant_id: &wire::ids::TenantId,
        step: &StepSpec,
        input: &ApprovalInput,
        requested_at: OffsetDateTime,
    ) -> StepOutcome {
        let key = wire::approvals::key(run_id, &step.id);
        let deadline = requested_at + Duration::from_secs(input.timeout_s);
        let remaining = (deadline - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let remaining = Duration::try_from(remaining).unwrap_or_default();

        let decision = tokio::time::timeout(remaining, self.decision(&key)).await;
        let waited = (OffsetDateTime::now_utc() - requested_at)
            .as_seconds_f64()
            .max(0.0);
        match decision {
            Err(_) => {
                ApprovalDecided {
                    outcome: "timed_out",
                    waited_secs: waited,
                }
                .emit();
                StepOutcome::TimedOut {
                    message: format!("no approval decision within {} s", input.timeout_s),
                }
            }
            Ok(Err(e)) => StepOutcome::failed(
                "approval_unavailable",
                format!("cannot read approval decisions: {e:#}"),
                true,
            ),
            Ok(Ok(decision)) if decision.tenant_id != *tenant_id => StepOutcome::failed(
                "approval_invalid",
                "the decision was made by another tenant",
                false,
            ),
            Ok(Ok(decision)) => {
                ApprovalDecided {
                    outcome: decision.verdict.as_str(),
                    waited_secs: waited,
                }
                .emit();
                match decision.verdict {
                    Verdict::Approved => StepOutcome::Succeeded(json!({
                        "verdict": "approved",
                        "comment": decision.comment,
                        "prompt": input.prompt,
                    })),
                    Verdict::Rejected => StepOutcome::failed(
                        "approval_rejected",
                        match &decision.comment {
                            Some(comment) => format!("rejected by the approver: {comment}"),
                            None => "rejected by the approver".to_owned(),
                        },
                        false,
                    ),
                }
            }
        }
    }

    /// The decision under `key`, waiting for it to be written.
    async fn decision(&self, key: &str) -> anyhow::Result<ApprovalDecision> {
        // Watch first, then read: a decision written in between is not missed.
        let mut updates = self.decisions.watch(key).await?;
        if let Some(value) = self.decisions.get(key).await? {
            return Ok(ApprovalDecision::decode(&value)?);
        }
        // The watch wakes us at once; the periodic read is a safety net for
        // a watch that misses an update (its ordered consumer is recreated
        // after a reconnect or missed heartbeats).
        let mut recheck = tokio::time::interval(Duration::from_secs(2));
        recheck.tick().await;
        loop {
            tokio::select! {
                entry = updates.next() => match entry {
                    Some(Ok(entry)) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                        return Ok(ApprovalDecision::decode(&entry.value)?);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => tracing::warn!(error = %err, "approval watch error; reading instead"),
                    None => updates = self.decisions.watch(key).await?,
                },
                _ = recheck.tick() => {
                    if let Some(value) = self.decisions.get(key).await? {
                        return Ok(ApprovalDecision::decode(&value)?);
                    }
                }
            }
        }
    }
}
