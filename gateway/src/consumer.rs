//! The `runs.events` consumer: workers' reports become store updates.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use telemetry::events::ComponentError;
use wire::events::RunEvent;
use wire::jetstream::Disposition;

use crate::events::{RunEventApplied, UnknownRunReported};
use crate::store::Store;
use crate::waiters::Waiters;

/// The durable consumer every gateway replica shares.
pub const DURABLE: &str = "gateway-events";

/// Applies one event; acked only once the store has it.
pub async fn handle(store: Store, waiters: Arc<Waiters>, message: Message) -> Disposition {
    let span = tracing::Span::current();
    let event = match RunEvent::decode(&message.payload) {
        Ok(event) => event,
        Err(err) => {
            err.report();
            return Disposition::Reject;
        }
    };
    span.record("tenant.id", event.tenant_id.as_str());
    span.record("run.id", event.run_id.as_str());
    let applied = match store.apply_event(&event).await {
        // Nothing changed: stale or repeated — or about a run never stored.
        Ok(false) => store
            .exists(&event.tenant_id, &event.run_id)
            .await
            .map(|known| (false, known)),
        Ok(true) => Ok((true, true)),
        Err(err) => Err(err),
    };
    match applied {
        Ok((_, false)) => {
            UnknownRunReported {
                status: event.status,
                run_id: event.run_id.as_str(),
            }
            .emit();
            Disposition::Reject
        }
        Ok((changed, true)) => {
            waiters.notify(&event);
            RunEventApplied {
                status: event.status,
                changed,
            }
            .emit();
            Disposition::Ack
        }
        Err(err) => {
            telemetry::spans::record_error(&span, "store_failed", &format!("{err:#}"));
            ComponentError {
                code: "store_failed",
                message: &format!("{err:#}"),
            }
            .emit();
            Disposition::Retry(Duration::from_secs(1))
        }
    }
}
