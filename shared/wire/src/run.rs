//! Run status and step results, as stored by the gateway and reported by the worker.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::ids::StepId;

/// A run's lifecycle: `accepted → routed → running → succeeded | failed |
/// rejected | timed_out`, plus `awaiting_approval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Accepted,
    Routed,
    Running,
    AwaitingApproval,
    Succeeded,
    Failed,
    Rejected,
    TimedOut,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Routed => "routed",
            Self::Running => "running",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Accepted,
            Self::Routed,
            Self::Running,
            Self::AwaitingApproval,
            Self::Succeeded,
            Self::Failed,
            Self::Rejected,
            Self::TimedOut,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Rejected | Self::TimedOut
        )
    }

    /// Progress order. Events arrive at least once and possibly out of order;
    /// the store only moves a run forward in rank (and, within the
    /// non-terminal rank 2, forward in event time), so a late or repeated
    /// event never undoes a later one.
    pub fn rank(self) -> i64 {
        match self {
            Self::Accepted => 0,
            Self::Routed => 1,
            Self::Running | Self::AwaitingApproval => 2,
            _ => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    /// An `approval` step waiting for a decision through the gateway.
    AwaitingApproval,
    /// Not run because an earlier step failed.
    Skipped,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Skipped => "skipped",
        }
    }
}

/// One step's outcome, as `GET /v1/runs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub id: StepId,
    #[serde(rename = "type")]
    pub step_type: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub output: Value,
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
}
