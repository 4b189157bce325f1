//! A run's progress, checkpointed in a JetStream key-value bucket so that a
//! redelivered run (the worker crashed) skips the steps already done, keeps
//! its approval clocks, and links its new span to the earlier attempt's.
//!
//! A finished run keeps a terminal marker instead of being purged: its work
//! message can come back (a lost ack, a broker restart) for as long as the
//! work stream holds it, and must then be acked, not executed again. The
//! bucket keeps entries as long as the streams keep messages
//! (`wire::jetstream::key_value`), which covers that horizon.

use std::collections::BTreeMap;

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use wire::ids::RunId;
use wire::run::{RunStatus, StepResult};

pub const BUCKET: &str = "beamline_run_progress";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// `(trace_id, span_id)` of the latest attempt's `process` span.
    pub attempt: Option<(String, String)>,
    /// Results of the steps finished so far (succeeded ones are not re-run).
    pub steps: Vec<StepResult>,
    /// When each approval step first asked for a decision.
    #[serde(default)]
    pub approvals_requested: BTreeMap<String, String>,
    /// Set once the run's outcome is decided, before it is reported.
    #[serde(default)]
    pub terminal: Option<Terminal>,
}

/// A run's outcome. Saved before the final report, so that a redelivery
/// reports the same outcome again (the same event, deduplicated by its
/// `Nats-Msg-Id`) instead of executing anything; reduced to the status once
/// the report is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Terminal {
    pub status: RunStatus,
    /// The final report's step results and error (empty once reported).
    #[serde(default)]
    pub steps: Vec<StepResult>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The final report is stored in `runs.events`.
    pub reported: bool,
}

impl Progress {
    /// The earlier attempt's span, to link to.
    pub fn earlier_attempt(&self) -> Option<SpanContext> {
        let (trace, span) = self.attempt.as_ref()?;
        Some(SpanContext::new(
            TraceId::from_hex(trace).ok()?,
            SpanId::from_hex(span).ok()?,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    pub fn requested_at(&self, step: &str) -> Option<OffsetDateTime> {
        let at = self.approvals_requested.get(step)?;
        OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
    }

    pub fn set_requested_at(&mut self, step: &str, at: OffsetDateTime) {
        if let Ok(text) = at.format(&time::format_description::well_known::Rfc3339) {
            self.approvals_requested.insert(step.to_owned(), text);
        }
    }
}

#[derive(Clone)]
pub struct ProgressStore {
    kv: async_nats::jetstream::kv::Store,
}

impl ProgressStore {
    pub async fn open(js: &async_nats::jetstream::Context) -> anyhow::Result<Self> {
        Ok(Self {
            kv: wire::jetstream::key_value(js, BUCKET, "worker run progress, key <run_id>").await?,
        })
    }

    pub async fn load(&self, run: &RunId) -> anyhow::Result<Progress> {
        match self.kv.get(run.as_str()).await? {
            Some(bytes) => Ok(serde_json::from_slice(&bytes)?),
            None => Ok(Progress::default()),
        }
    }

    pub async fn save(&self, run: &RunId, progress: &Progress) -> anyhow::Result<()> {
        self.kv
            .put(run.as_str(), serde_json::to_vec(progress)?.into())
            .await?;
        Ok(())
    }

    /// Keeps only the terminal marker of a run whose final report is stored.
    pub async fn mark_reported(
        &self,
        run: &RunId,
        status: RunStatus,
        at: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let marker = Progress {
            terminal: Some(Terminal {
                status,
                steps: Vec::new(),
                error: None,
                at,
                reported: true,
            }),
            ..Progress::default()
        };
        self.save(run, &marker).await
    }
}
