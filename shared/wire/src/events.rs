//! `runs.events`: progress and outcome of a run, reported to the gateway.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{ProviderId, RunId, TenantId};
use crate::run::{RunStatus, StepResult};

pub const SUBJECT: &str = "runs.events";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub status: RunStatus,
    pub provider: Option<ProviderId>,
    /// Step results so far (all of them once the run is terminal).
    pub steps: Vec<StepResult>,
    /// Why the run failed, for terminal failures.
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl RunEvent {
    /// The JetStream `Nats-Msg-Id`. A terminal event has one per run
    /// (`<run_id>.final`): nothing that can change between two attempts
    /// enters it, so a repeated outcome report (a redelivered finished run,
    /// two attempts racing) is dropped by the server inside the duplicate
    /// window, and the store keeps the first outcome anyway. Progress events
    /// have one per run, status and number of step results, so a redelivered
    /// run reporting the same progress again is deduplicated while a run
    /// that goes `running → awaiting_approval → running` reports each change.
    pub fn message_id(&self) -> String {
        if self.status.is_terminal() {
            return format!("{}.final", self.run_id);
        }
        format!(
            "{}.{}.{}",
            self.run_id,
            self.status.as_str(),
            self.steps.len()
        )
    }

    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(SUBJECT, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RunId, TenantId};

    fn event(status: RunStatus, steps: usize, error: Option<&str>) -> RunEvent {
        let step = StepResult {
            id: crate::ids::StepId::parse("a").expect("step id"),
            step_type: "noop".to_owned(),
            status: crate::run::StepStatus::Succeeded,
            attempts: 1,
            output: serde_json::Value::Null,
            error: None,
            started_at: None,
            ended_at: None,
        };
        RunEvent {
            run_id: RunId::parse("01a233be-a3f1-7595-bee1-7a60a06d7294").expect("run id"),
            tenant_id: TenantId::parse("demo").expect("tenant"),
            status,
            provider: None,
            steps: vec![step; steps],
            error: error.map(str::to_owned),
            at: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn terminal_events_of_one_run_share_their_message_id() {
        let first = event(RunStatus::Succeeded, 2, None).message_id();
        for other in [
            event(RunStatus::Failed, 2, Some("boom")),
            event(RunStatus::Failed, 1, None),
            event(RunStatus::TimedOut, 0, None),
            event(RunStatus::Rejected, 0, Some("policy")),
        ] {
            assert_eq!(other.message_id(), first);
        }
    }

    #[test]
    fn progress_events_differ_by_status_and_steps() {
        let running = event(RunStatus::Running, 1, None).message_id();
        assert_ne!(running, event(RunStatus::Running, 2, None).message_id());
        assert_ne!(
            running,
            event(RunStatus::AwaitingApproval, 1, None).message_id()
        );
        assert_ne!(running, event(RunStatus::Succeeded, 1, None).message_id());
    }
}
