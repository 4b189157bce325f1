//! The `work.<provider>` consumer: checkpointed execution, reports, dead letters.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use opentelemetry::KeyValue;
use telemetry::events::ComponentError;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use wire::jetstream::Disposition;
use wire::run::RunStatus;
use wire::work::WorkItem;

use crate::blocks::Blocks;
use crate::events::{DeadLettered, FinishedRunRedelivered, RunInFlight};
use crate::execute::{Journal, RunOutcome, run_steps};
use crate::progress::ProgressStore;

/// The durable consumer name for one provider (shared by its replicas).
pub fn durable(provider: &str) -> String {
    format!("worker-{provider}")
}

/// What every handler shares.
pub struct Executor {
    pub jetstream: async_nats::jetstream::Context,
    pub blocks: Blocks,
    pub progress: ProgressStore,
    /// Deliveries after which a run is dead-lettered instead of executed again.
    pub max_deliver: u64,
}

impl Executor {
    /// Executes one dispatched run. The message is acked only after the final
    /// report is stored; a crash before that means redelivery, and the new
    /// attempt skips the steps the checkpoint says are done. A run whose
    /// outcome is checkpointed is never executed again.
    pub async fn handle(self: Arc<Self>, message: Message) -> Disposition {
        let span = tracing::Span::current();
        let delivered = message
            .info()
            .map(|i| i.delivered.max(1) as u64)
            .unwrap_or(1);
        let item = match WorkItem::decode(message.subject.as_str(), &message.payload) {
            Ok(item) => item,
            Err(err) => {
                err.report();
                // Kept for inspection, never retried; its run ends `failed`.
                if let Err(disposition) = self.dead_letter(&message, "decode_failed", None).await {
                    return disposition;
                }
                return wire::jetstream::end_undecodable(
                    &self.jetstream,
                    &message,
                    &err.to_string(),
                )
                .await;
            }
        };
        let run = &item.run;
        span.record("tenant.id", run.tenant_id.as_str());
        span.record("run.id", run.run_id.as_str());
        span.record("flow.id", run.flow_id.as_str());

        let mut journal = Journal {
            jetstream: self.jetstream.clone(),
            store: self.progress.clone(),
            progress: match self.progress.load(&run.run_id).await {
                Ok(progress) => progress,
                Err(err) => {
                    ComponentError {
                        code: "progress_unavailable",
                        message: &format!("{err:#}"),
                    }
                    .emit();
                    return Disposition::Retry(Duration::from_secs(2));
                }
            },
            provider: item.provider.clone(),
        };
        // A redelivery: show where the earlier attempt went.
        if let Some(earlier) = journal.progress.earlier_attempt() {
            span.add_link_with_attributes(
                earlier,
                vec![KeyValue::new("link.reason", "redelivery")],
            );
        }

        // Finished already (the ack was lost): report the same outcome again
        // if it may not have been stored, execute nothing, ack.
        if let Some(terminal) = journal.progress.terminal.clone() {
            FinishedRunRedelivered {
                provider: item.provider.as_str(),
                status: terminal.status,
                reported: terminal.reported,
            }
            .emit();
            return match journal.report_terminal(run).await {
                Ok(()) => Disposition::Ack,
                Err(err) => publish_failed(&err),
            };
        }

        if delivered > self.max_deliver {
            let reason = format!(
                "max_deliveries_exceeded: delivered {delivered} times (WORKER_MAX_DELIVER={})",
                self.max_deliver
            );
            telemetry::spans::record_error(&span, "max_deliveries_exceeded", &reason);
            if let Err(disposition) = self
                .dead_letter(&message, "max_deliveries_exceeded", Some(&item))
                .await
            {
                return disposition;
            }
            let outcome = RunOutcome {
                status: RunStatus::Failed,
                steps: journal.progress.steps.clone(),
                error: Some(reason),
            };
            return match journal.finish(run, outcome).await {
                Ok(()) => Disposition::Ack,
                Err(err) => publish_failed(&err),
            };
        }

        let cx = span.context();
        let this_attempt = opentelemetry::trace::TraceContextExt::span(&cx)
            .span_context()
            .clone();
        if this_attempt.is_valid() {
            journal.progress.attempt = Some((
                this_attempt.trace_id().to_string(),
                this_attempt.span_id().to_string(),
            ));
            journal.checkpoint(run).await;
        }

        if let Err(err) = journal
            .report(
                run,
                RunStatus::Running,
                journal.progress.steps.clone(),
                None,
            )
            .await
        {
            return publish_failed(&err);
        }

        RunInFlight {
            provider: item.provider.as_str(),
            finished: None,
        }
        .emit();
        let outcome = run_steps(&self.blocks, run, &mut journal).await;
        RunInFlight {
            provider: item.provider.as_str(),
            finished: Some(outcome.status),
        }
        .emit();
        if let Some(error) = &outcome.error {
            telemetry::spans::record_error(&span, "run_failed", error);
        }
        match journal.finish(run, outcome).await {
            Ok(()) => Disposition::Ack,
            Err(err) => publish_failed(&err),
        }
    }

    /// Stores the message on `deadletter.<subject>` with its headers and a
    /// reason header.
    async fn dead_letter(
        &self,
        message: &Message,
        reason: &'static str,
        item: Option<&WorkItem>,
    ) -> Result<(), Disposition> {
        let mut headers = message.headers.clone().unwrap_or_default();
        headers.insert("Beamline-Dead-Letter-Reason", reason);
        let subject = format!("deadletter.{}", message.subject);
        let stored = async {
            self.jetstream
                .publish_with_headers(subject, headers, message.payload.clone())
                .await?
                .await
                .map(|_| ())
                .map_err(async_nats::Error::from)
        }
        .await;
        match stored {
            Ok(()) => {
                DeadLettered {
                    subject: message.subject.as_str(),
                    reason,
                    run_id: item.map(|i| i.run.run_id.as_str()),
                }
                .emit();
                Ok(())
            }
            Err(err) => {
                ComponentError {
                    code: "publish_failed",
                    message: &err,
                }
                .emit();
                Err(Disposition::Retry(Duration::from_secs(2)))
            }
        }
    }
}

/// A report could not be stored: counted, and the message comes back.
fn publish_failed(err: &wire::jetstream::PublishError) -> Disposition {
    ComponentError {
        code: "publish_failed",
        message: err,
    }
    .emit();
    Disposition::Retry(Duration::from_secs(2))
}
