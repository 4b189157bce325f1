//! `runs.submitted`: the gateway hands a new run to the routers.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{FlowId, ProviderId, RunId, TenantId};
use crate::step::StepSpec;

pub const SUBJECT: &str = "runs.submitted";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSubmitted {
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub flow_id: FlowId,
    pub steps: Vec<StepSpec>,
    /// The client's provider hint, honoured when the tenant's policy allows it.
    pub provider: Option<ProviderId>,
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
}

impl RunSubmitted {
    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(SUBJECT, payload)
    }
}
