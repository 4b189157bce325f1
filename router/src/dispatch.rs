//! The `runs.submitted` consumer: decide, then hand the run to its provider
//! (or report it rejected), then tell the `post` extensions.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use telemetry::events::ComponentError;
use time::OffsetDateTime;
use tracing::Instrument as _;
use wire::events::RunEvent;
use wire::extensions::{Dispatched, ExtensionType};
use wire::jetstream::{Disposition, Outgoing};
use wire::run::RunStatus;
use wire::submitted::RunSubmitted;
use wire::work::WorkItem;

use crate::decide::{Decider, POST_DEADLINE, Verdict};
use crate::events::RunDispatched;
use crate::extensions::invoker::Invocation;

/// The durable consumer every router replica shares.
pub const DURABLE: &str = "router";

/// What every handler shares.
pub struct Dispatcher {
    pub jetstream: async_nats::jetstream::Context,
    pub decider: Arc<Decider>,
}

impl Dispatcher {
    /// Decides one run and publishes it to `work.<provider>` (or its
    /// rejection to `runs.events`); the submitted message is acked only once
    /// that is stored.
    pub async fn handle(self: Arc<Self>, message: Message) -> Disposition {
        let span = tracing::Span::current();
        let run = match RunSubmitted::decode(&message.payload) {
            Ok(run) => run,
            Err(err) => {
                err.report();
                // Never retried; its run (named by the headers) ends `failed`.
                return wire::jetstream::end_undecodable(
                    &self.jetstream,
                    &message,
                    &err.to_string(),
                )
                .await;
            }
        };
        span.record("tenant.id", run.tenant_id.as_str());
        span.record("run.id", run.run_id.as_str());
        span.record("flow.id", run.flow_id.as_str());

        let outcome = self.decider.decide(run.clone()).await;
        match outcome.verdict {
            Verdict::Reject { reason, .. } => self.reject(&run, reason).await,
            Verdict::Route {
                decision,
                run,
                metadata,
            } => {
                let subject = wire::work::subject(&decision.provider);
                let item = WorkItem {
                    provider: decision.provider.clone(),
                    policy_id: decision.policy_id.clone(),
                    reason: decision.reason,
                    run,
                };
                let published = wire::jetstream::publish(
                    &self.jetstream,
                    Outgoing {
                        subject: &subject,
                        message_id: item.run.run_id.as_str(),
                        payload: item.encode(),
                        tenant_id: item.run.tenant_id.as_str(),
                        run_id: item.run.run_id.as_str(),
                    },
                )
                .await;
                RunDispatched {
                    provider: decision.provider.as_str(),
                    ok: published.is_ok(),
                }
                .emit();
                let breaker = self.decider.policies.current().provider_breaker;
                self.decider
                    .health
                    .record_dispatch(&decision.provider, published.is_ok(), breaker);
                if let Err(err) = published {
                    telemetry::spans::record_error(&span, "publish_failed", &err.to_string());
                    ComponentError {
                        code: "publish_failed",
                        message: &err,
                    }
                    .emit();
                    return Disposition::Retry(Duration::from_secs(2));
                }
                self.notify_post(outcome.policy.extensions.clone(), item, metadata);
                Disposition::Ack
            }
        }
    }

    /// Reports the run `rejected` with `reason` on `runs.events`.
    async fn reject(&self, run: &RunSubmitted, reason: String) -> Disposition {
        let span = tracing::Span::current();
        let event = RunEvent {
            run_id: run.run_id.clone(),
            tenant_id: run.tenant_id.clone(),
            status: RunStatus::Rejected,
            provider: None,
            steps: Vec::new(),
            error: Some(reason),
            at: OffsetDateTime::now_utc(),
        };
        let published = wire::jetstream::publish(
            &self.jetstream,
            Outgoing {
                subject: wire::events::SUBJECT,
                message_id: &event.message_id(),
                payload: event.encode(),
                tenant_id: run.tenant_id.as_str(),
                run_id: run.run_id.as_str(),
            },
        )
        .await;
        match published {
            Ok(_) => Disposition::Ack,
            Err(err) => {
                telemetry::spans::record_error(&span, "publish_failed", &err.to_string());
                ComponentError {
                    code: "publish_failed",
                    message: &err,
                }
                .emit();
                Disposition::Retry(Duration::from_secs(2))
            }
        }
    }

    /// Tells the policy's `post` extensions where the run went, in the
    /// background: the run never waits for them.
    fn notify_post(
        &self,
        chain: Vec<String>,
        item: WorkItem,
        metadata: std::collections::BTreeMap<String, String>,
    ) {
        let invoker = self.decider.invoker.clone();
        let task = async move {
            for id in &chain {
                if invoker.registry().kind_of(id).await != Some(ExtensionType::Post) {
                    continue;
                }
                let invocation = Invocation {
                    run: &item.run,
                    metadata: &metadata,
                    policy_id: &item.policy_id,
                    dispatched: Some(Dispatched {
                        provider: item.provider.clone(),
                        policy_id: item.policy_id.clone(),
                        reason: item.reason,
                    }),
                };
                let _ = tokio::time::timeout(POST_DEADLINE, invoker.invoke(id, &invocation)).await;
            }
        };
        tokio::spawn(task.instrument(tracing::Span::current()));
    }
}
