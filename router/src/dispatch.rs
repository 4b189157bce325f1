//! The `runs.submitted` consumer: decide, then hand the run to its provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use telemetry::events::ComponentError;
use tracing::field::Empty;
use wire::jetstream::{Disposition, Outgoing};
use wire::submitted::RunSubmitted;
use wire::work::WorkItem;

use crate::events::{RunDispatched, RunRouted};
use crate::policy::{self, Decision, Policy};

/// The durable consumer every router replica shares.
pub const DURABLE: &str = "router";

/// What every handler shares.
pub struct Dispatcher {
    pub jetstream: async_nats::jetstream::Context,
    pub policy: Policy,
}

impl Dispatcher {
    /// Decides one run and publishes it to `work.<provider>`; the submitted
    /// message is acked only once the work item is stored.
    pub async fn handle(self: Arc<Self>, message: Message) -> Disposition {
        let span = tracing::Span::current();
        let run = match RunSubmitted::decode(&message.payload) {
            Ok(run) => run,
            Err(err) => {
                telemetry::spans::record_error(&span, "decode_failed", &err.to_string());
                ComponentError {
                    code: "decode_failed",
                    message: &err,
                }
                .emit();
                return Disposition::Reject;
            }
        };
        span.record("tenant.id", run.tenant_id.as_str());
        span.record("run.id", run.run_id.as_str());
        span.record("flow.id", run.flow_id.as_str());

        let Some(decision) = self.decide(&run) else {
            let message = format!("policy {} has no provider with weight", self.policy.id);
            telemetry::spans::record_error(&span, "no_provider", &message);
            ComponentError {
                code: "no_provider",
                message: &message,
            }
            .emit();
            return Disposition::Retry(Duration::from_secs(5));
        };

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

    /// `router.decide` with its `router.policy.apply` and
    /// `router.provider.select` children.
    fn decide(&self, run: &RunSubmitted) -> Option<Decision> {
        let started = Instant::now();
        let decide_span = tracing::info_span!(
            "router.decide",
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
            flow.id = run.flow_id.as_str(),
            otel.status_code = Empty,
            error.type = Empty,
        );
        let _decide = decide_span.enter();

        let policy_span = tracing::info_span!(
            "router.policy.apply",
            policy.id = self.policy.id.as_str(),
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
        );
        let (policy, policy_time) = policy_span.in_scope(|| {
            let started = Instant::now();
            // One built-in policy for every tenant until policy files land.
            (&self.policy, started.elapsed())
        });

        let select_span = tracing::info_span!(
            "router.provider.select",
            provider = Empty,
            decision.reason = Empty,
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
        );
        let decision = select_span.in_scope(|| {
            let total = policy::total_weight(policy);
            let roll = if total == 0 {
                0
            } else {
                fastrand::u64(0..total)
            };
            policy::decide(policy, run, roll)
        });
        match &decision {
            Some(decision) => {
                select_span.record("provider", decision.provider.as_str());
                select_span.record("decision.reason", decision.reason.as_str());
                RunRouted {
                    decision,
                    tenant_id: run.tenant_id.as_str(),
                    decision_time: started.elapsed(),
                    policy_time,
                }
                .emit();
            }
            None => {
                telemetry::spans::record_error(&decide_span, "no_provider", "no provider to select")
            }
        }
        decision
    }
}
