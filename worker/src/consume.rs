//! The `work.<provider>` consumer: execute the run, report it, then ack.

use std::time::Duration;

use async_nats::jetstream::Message;
use telemetry::events::ComponentError;
use time::OffsetDateTime;
use wire::events::RunEvent;
use wire::jetstream::{Disposition, Outgoing};
use wire::run::RunStatus;
use wire::work::WorkItem;

use crate::events::RunInFlight;
use crate::execute::{RunOutcome, run_steps};

/// The durable consumer name for one provider (shared by its replicas).
pub fn durable(provider: &str) -> String {
    format!("worker-{provider}")
}

/// Executes one dispatched run. The message is acked only after the final
/// `runs.events` report is stored; a crash before that means redelivery and
/// the run is executed again.
pub async fn handle(jetstream: async_nats::jetstream::Context, message: Message) -> Disposition {
    let span = tracing::Span::current();
    let item = match WorkItem::decode(message.subject.as_str(), &message.payload) {
        Ok(item) => item,
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
    let run = &item.run;
    span.record("tenant.id", run.tenant_id.as_str());
    span.record("run.id", run.run_id.as_str());
    span.record("flow.id", run.flow_id.as_str());

    let started = RunEvent {
        run_id: run.run_id.clone(),
        tenant_id: run.tenant_id.clone(),
        status: RunStatus::Running,
        provider: Some(item.provider.clone()),
        steps: Vec::new(),
        error: None,
        at: OffsetDateTime::now_utc(),
    };
    if let Err(disposition) = report(&jetstream, &started).await {
        return disposition;
    }

    RunInFlight {
        provider: item.provider.as_str(),
        finished: None,
    }
    .emit();
    let RunOutcome {
        status,
        steps,
        error,
    } = run_steps(run).await;
    RunInFlight {
        provider: item.provider.as_str(),
        finished: Some(status),
    }
    .emit();
    if let Some(error) = &error {
        telemetry::spans::record_error(&span, "run_failed", error);
    }

    let finished = RunEvent {
        run_id: run.run_id.clone(),
        tenant_id: run.tenant_id.clone(),
        status,
        provider: Some(item.provider.clone()),
        steps,
        error,
        at: OffsetDateTime::now_utc(),
    };
    match report(&jetstream, &finished).await {
        Ok(()) => Disposition::Ack,
        Err(disposition) => disposition,
    }
}

async fn report(
    jetstream: &async_nats::jetstream::Context,
    event: &RunEvent,
) -> Result<(), Disposition> {
    let message_id = event.message_id();
    wire::jetstream::publish(
        jetstream,
        Outgoing {
            subject: wire::events::SUBJECT,
            message_id: &message_id,
            payload: event.encode(),
            tenant_id: event.tenant_id.as_str(),
            run_id: event.run_id.as_str(),
        },
    )
    .await
    .map(|_| ())
    .map_err(|err| {
        ComponentError {
            code: "publish_failed",
            message: &err,
        }
        .emit();
        Disposition::Retry(Duration::from_secs(2))
    })
}
