//! The outbox: a stored run reaches `runs.submitted`, whatever happens to the
//! request that stored it.
//!
//! The run row is the source of truth. The request hands the run off once
//! (in a task of its own, so a client hanging up does not cancel it); a run
//! whose publish was not acknowledged stays pending (`handed_off_at` NULL)
//! and [`Outbox::run`] publishes it again — at start, then every
//! `GATEWAY_OUTBOX_INTERVAL_MS` — with the same `Nats-Msg-Id` (the run id),
//! so a publish that did land but whose ack was lost is dropped by the
//! stream's duplicate window instead of running twice.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use wire::ids::ProviderId;
use wire::jetstream::Outgoing;
use wire::submitted::RunSubmitted;

use crate::events::{HandOff, HandOffAttempted, OutboxChecked};
use crate::store::{RunRecord, Store};

/// Runs republished per round, and at once.
const BATCH: u32 = 256;
const CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct Outbox {
    store: Store,
    jetstream: async_nats::jetstream::Context,
    /// How long a publish waits for the stream's acknowledgement.
    publish_timeout: Duration,
}

impl Outbox {
    pub fn new(
        store: Store,
        jetstream: async_nats::jetstream::Context,
        publish_timeout: Duration,
    ) -> Self {
        Self {
            store,
            jetstream,
            publish_timeout,
        }
    }

    /// Whether publishing can work now. While disconnected, async-nats would
    /// buffer publishes; the request path refuses instead (nothing stored).
    pub fn connected(&self) -> bool {
        self.jetstream.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `run` and, once the stream has acknowledged it, takes it out
    /// of the outbox. Not acknowledged in time: it stays and is republished.
    pub async fn hand_off(&self, run: &RunRecord, attempt: HandOff) -> bool {
        let submitted = RunSubmitted {
            run_id: run.run_id.clone(),
            tenant_id: run.tenant_id.clone(),
            flow_id: run.flow_id.clone(),
            steps: run.steps.clone(),
            provider: run
                .provider_hint
                .as_deref()
                .and_then(|p| ProviderId::parse(p).ok()),
            submitted_at: run.created_at,
        };
        let published = tokio::time::timeout(
            self.publish_timeout,
            wire::jetstream::publish(
                &self.jetstream,
                Outgoing {
                    subject: wire::submitted::SUBJECT,
                    message_id: run.run_id.as_str(),
                    payload: submitted.encode(),
                    tenant_id: run.tenant_id.as_str(),
                    run_id: run.run_id.as_str(),
                },
            ),
        )
        .await;
        let failure = match published {
            Ok(Ok(_)) => match self.store.mark_handed_off(&run.run_id).await {
                // Still pending in the store: the next round publishes it
                // again and the stream drops the duplicate.
                Err(err) => Some(format!("{err:#}")),
                Ok(()) => None,
            },
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some("timed out waiting for the JetStream acknowledgement".to_owned()),
        };
        HandOffAttempted {
            attempt,
            failure: failure.as_deref(),
        }
        .emit();
        failure.is_none()
    }

    /// The reconciler: at start and every `interval`, republishes the runs
    /// stored longer than a publish timeout ago that JetStream has not
    /// acknowledged (debris of a crash, a stall, a dropped request).
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let round = self.round();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = round => {}
            }
        }
    }

    async fn round(&self) {
        let pending = match self.store.pending_count().await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "cannot read the outbox");
                return;
            }
        };
        OutboxChecked { pending }.emit();
        if pending == 0 || !self.connected() {
            return;
        }
        // Younger runs are still being handed off by their request.
        let before = OffsetDateTime::now_utc() - self.publish_timeout;
        let runs = match self.store.pending_hand_offs(before, BATCH).await {
            Ok(runs) => runs,
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "cannot read the outbox");
                return;
            }
        };
        futures::stream::iter(runs)
            .for_each_concurrent(CONCURRENCY, |run| async move {
                let span = tracing::info_span!(
                    "gateway.outbox.republish",
                    run.id = run.run_id.as_str(),
                    tenant.id = run.tenant_id.as_str(),
                );
                // Back in the run's trace, as a child of its request span.
                if let Some(fields) = run
                    .trace_context
                    .as_deref()
                    .and_then(|c| serde_json::from_str::<HashMap<String, String>>(c).ok())
                {
                    let parent =
                        opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields));
                    let _ = span.set_parent(parent);
                }
                self.hand_off(&run, HandOff::Republish)
                    .instrument(span)
                    .await;
            })
            .await;
    }
}

/// The propagation fields of `span`, as stored with a run.
pub fn trace_context(span: &tracing::Span) -> Option<String> {
    let mut fields: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&span.context(), &mut fields)
    });
    fields.retain(|_, v| !v.is_empty());
    (!fields.is_empty())
        .then(|| serde_json::to_string(&fields).ok())
        .flatten()
}
