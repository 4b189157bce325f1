//! Step blocks: one module per step type, each with its own span.
//!
//! [`Blocks::execute`] runs one attempt of one step and says whether a failure
//! is worth retrying (timeouts, 5xx, lost connections) or not (4xx, sandbox
//! violations, bad queries).

pub mod approval;
pub mod fs;
pub mod http;
pub mod sql;

use std::time::Duration;

use serde_json::{Value, json};
use wire::step::StepKind;

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Succeeded(Value),
    Failed {
        /// Closed-set code (span `error.type`, retry reason label).
        code: &'static str,
        message: String,
        /// Whether another attempt could succeed.
        retryable: bool,
    },
    /// The step gave up waiting (an approval nobody decided): the run ends `timed_out`.
    TimedOut {
        message: String,
    },
}

impl StepOutcome {
    pub fn failed(code: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        Self::Failed {
            code,
            message: message.into(),
            retryable,
        }
    }
}

/// Everything the blocks need, built once per worker.
pub struct Blocks {
    pub http: http::HttpBlock,
    pub sql: sql::SqlBlock,
    pub fs: fs::FsBlock,
    pub approval: approval::ApprovalBlock,
}

impl Blocks {
    /// Runs one attempt of `kind`. `approval` steps go through
    /// [`approval::ApprovalBlock::wait`] instead (they need the run's context).
    pub async fn execute(&self, kind: &StepKind) -> StepOutcome {
        match kind {
            StepKind::Noop => StepOutcome::Succeeded(json!({})),
            StepKind::Delay(input) => {
                tokio::time::sleep(Duration::from_millis(input.ms)).await;
                StepOutcome::Succeeded(json!({"slept_ms": input.ms}))
            }
            StepKind::Fail(input) => {
                if input.probability >= 1.0 || fastrand::f64() < input.probability {
                    // A probabilistic failure may pass next time.
                    StepOutcome::failed(
                        "step_failed",
                        input.message.clone(),
                        input.probability < 1.0,
                    )
                } else {
                    StepOutcome::Succeeded(json!({"failed": false}))
                }
            }
            StepKind::Http(input) => self.http.execute(input).await,
            StepKind::Sql(input) => self.sql.execute(input).await,
            StepKind::Fs(input) => self.fs.execute(input).await,
            StepKind::Approval(_) => StepOutcome::failed(
                "internal",
                "approval steps are executed by the run loop",
                false,
            ),
        }
    }
}
