//! `work.<provider>`: a router dispatches a routed run to a worker pool.

use serde::{Deserialize, Serialize};

use crate::ids::ProviderId;
use crate::submitted::RunSubmitted;

/// The subject of one provider's work queue.
pub fn subject(provider: &ProviderId) -> String {
    format!("work.{provider}")
}

/// Every provider's work queue.
pub const ALL_SUBJECTS: &str = "work.>";

/// Why a provider was chosen: a closed set, safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    Weighted,
    Fallback,
    Sticky,
    Explicit,
    Rejected,
}

impl DecisionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::Fallback => "fallback",
            Self::Sticky => "sticky",
            Self::Explicit => "explicit",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub run: RunSubmitted,
    pub provider: ProviderId,
    pub policy_id: String,
    pub reason: DecisionReason,
}

impl WorkItem {
    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(subject: &str, payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(subject, payload)
    }
}
