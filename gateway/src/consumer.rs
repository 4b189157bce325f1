//! The `runs.events` consumer: workers' reports become store updates.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use telemetry::events::ComponentError;
use wire::events::RunEvent;
use wire::jetstream::Disposition;

use crate::events::RunEventApplied;
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
    match store.apply_event(&event).await {
        Ok(changed) => {
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
