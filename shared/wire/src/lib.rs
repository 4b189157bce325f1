//! Beamline's NATS wire contract, shared by publishers and consumers: subject
//! and stream names, the payload of each message type, and the parsing of the
//! run input every component agrees on.
//!
//! Layout:
//! - [`ids`]: validated identifiers (`RunId`, `TenantId`, `FlowId`, `StepId`).
//! - [`step`]: a step's definition (`StepSpec`) and its parsing from the API body.
//! - [`run`]: run status and step results.
//! - [`submitted`], [`work`], [`events`]: one module per message type
//!   (`runs.submitted`, `work.<provider>`, `runs.events`).
//! - [`extensions`]: `ext.<id>` request/reply payloads (router ↔ extension services).
//! - [`approvals`]: approval decisions (a JetStream key-value bucket).
//! - [`connection`]: the `NATS_*` settings (servers, credentials, TLS,
//!   stream replicas) every service reads.
//! - [`jetstream`]: the connection, the streams and buckets (created or
//!   updated), durable consumers, the deduplicated publish and the consume loop.

pub mod approvals;
pub mod connection;
pub mod events;
pub mod extensions;
pub mod ids;
pub mod jetstream;
pub mod run;
pub mod step;
pub mod submitted;
pub mod work;

/// A message whose payload did not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed {subject} payload: {source}")]
pub struct DecodeError {
    pub subject: String,
    #[source]
    pub source: serde_json::Error,
}

impl DecodeError {
    /// Marks the current span failed and counts a `decode_failed` component
    /// error: a payload that does not decode never will, so it is not retried.
    pub fn report(&self) {
        telemetry::spans::record_error(
            &tracing::Span::current(),
            "decode_failed",
            &self.to_string(),
        );
        telemetry::events::ComponentError {
            code: "decode_failed",
            message: self,
        }
        .emit();
    }
}

/// Payload encoding shared by every message type (JSON).
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    // Serializing these plain structs to JSON cannot fail (no maps with
    // non-string keys, no custom serializers).
    serde_json::to_vec(value).unwrap_or_default().into()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    subject: &str,
    payload: &[u8],
) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|source| DecodeError {
        subject: subject.to_owned(),
        source,
    })
}
