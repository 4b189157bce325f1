//! The JetStream side of the contract: streams, durable consumers and the
//! deduplicated, traced publish every hand-off uses.
//!
//! Streams and consumers are created idempotently by whoever starts first, so
//! services can start in any order and any number of replicas share work.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self as js, Context};
use tracing::Instrument;

/// A stream and the subjects it captures.
pub struct StreamDef {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
}

pub const RUNS: StreamDef = StreamDef {
    name: "BEAMLINE_RUNS",
    subjects: &[crate::submitted::SUBJECT],
};
pub const WORK: StreamDef = StreamDef {
    name: "BEAMLINE_WORK",
    subjects: &[crate::work::ALL_SUBJECTS],
};
pub const EVENTS: StreamDef = StreamDef {
    name: "BEAMLINE_EVENTS",
    subjects: &[crate::events::SUBJECT],
};

/// How long a stream keeps messages, acked or not.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The window in which a repeated `Nats-Msg-Id` is dropped by the server.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Creates the three streams when missing; leaves existing ones as they are.
pub async fn ensure_streams(js: &Context) -> anyhow::Result<()> {
    for def in [RUNS, WORK, EVENTS] {
        js.get_or_create_stream(stream::Config {
            name: def.name.to_owned(),
            subjects: def.subjects.iter().map(|s| (*s).to_owned()).collect(),
            storage: StorageType::File,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {}: {e}", def.name))?;
    }
    Ok(())
}

/// A durable pull consumer's settings.
pub struct ConsumerDef<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    pub filter_subject: &'a str,
    /// Unacked messages are redelivered after this long (progress acks extend it).
    pub ack_wait: Duration,
    /// Deliveries before JetStream gives up on a message.
    pub max_deliver: i64,
}

/// Creates or updates a durable pull consumer (replicas share it).
pub async fn durable_consumer(js: &Context, def: &ConsumerDef<'_>) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(def.stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {}: {e}", def.stream))?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(def.durable.to_owned()),
            filter_subject: def.filter_subject.to_owned(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: def.ack_wait,
            max_deliver: def.max_deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("consumer {} on {}: {e}", def.durable, def.stream))
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("JetStream did not acknowledge the publish to {subject}: {reason}")]
pub struct PublishError {
    pub subject: String,
    pub reason: String,
}

/// One message to hand off durably.
pub struct Outgoing<'a> {
    pub subject: &'a str,
    /// `Nats-Msg-Id`: the server drops a repeat inside the duplicate window.
    pub message_id: &'a str,
    pub payload: bytes::Bytes,
    /// Correlation fields for the `send` span.
    pub tenant_id: &'a str,
    pub run_id: &'a str,
}

/// Publishes inside a `send <subject>` PRODUCER span whose context travels in
/// the headers, and waits for the stream's acknowledgement: when this returns
/// `Ok` the message is stored.
pub async fn publish(
    js: &Context,
    out: Outgoing<'_>,
) -> Result<js::publish::PublishAck, PublishError> {
    let span = telemetry::messaging::send_span(out.subject, out.message_id);
    span.record("tenant.id", out.tenant_id);
    span.record("run.id", out.run_id);
    let headers = telemetry::propagation::nats_headers_for(&span);
    let subject = out.subject.to_owned();
    let result = async {
        let publish = PublishMessage::build()
            .payload(out.payload)
            .headers(headers)
            .message_id(out.message_id);
        js.send_publish(subject.clone(), publish)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    }
    .instrument(span.clone())
    .await;
    result.map_err(|reason| {
        telemetry::spans::record_error(&span, "publish_failed", &reason);
        PublishError { subject, reason }
    })
}
