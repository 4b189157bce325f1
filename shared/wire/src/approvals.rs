//! Approval decisions: written by the gateway, awaited by the worker.
//!
//! A decision is a JetStream key-value entry `<run_id>.<step_id>` in bucket
//! [`BUCKET`], created once (a second decision is refused), so it survives a
//! restart of either side and the worker can watch for it.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{RunId, StepId, TenantId};

pub const BUCKET: &str = "beamline_approvals";

/// The key of one step's decision.
pub fn key(run_id: &RunId, step_id: &StepId) -> String {
    format!("{run_id}.{step_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approved,
    Rejected,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    pub verdict: Verdict,
    pub comment: Option<String>,
    pub tenant_id: TenantId,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl ApprovalDecision {
    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(BUCKET, payload)
    }
}

/// Opens the bucket, creating it with `replicas` replicas when missing.
pub async fn bucket(
    js: &async_nats::jetstream::Context,
    replicas: usize,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    crate::jetstream::key_value(
        js,
        BUCKET,
        "approval decisions, key <run_id>.<step_id>",
        replicas,
    )
    .await
}
