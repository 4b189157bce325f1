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
    /// The JetStream `Nats-Msg-Id`: one per run, status and number of step
    /// results, so a redelivered run reporting the same progress again is
    /// deduplicated while a run that goes `running → awaiting_approval →
    /// running` reports each change.
    pub fn message_id(&self) -> String {
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
