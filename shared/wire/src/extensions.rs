//! `ext.<id>`: the router asks an extension service about a run (core NATS
//! request/reply, trace context in the headers).
//!
//! Three kinds of extension: a `pre` may amend the run's steps and add
//! metadata, a `validator` may reject the run with a reason, a `post` is told
//! where the run went after dispatch (its answer is not waited on by the run).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::ProviderId;
use crate::step::StepSpec;
use crate::submitted::RunSubmitted;
use crate::work::DecisionReason;

/// The subject an extension with this id listens on by default.
pub fn subject(extension_id: &str) -> String {
    format!("ext.{extension_id}")
}

/// When in the decision an extension runs: a closed set, safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtensionType {
    Pre,
    Validator,
    Post,
}

impl ExtensionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pre => "pre",
            Self::Validator => "validator",
            Self::Post => "post",
        }
    }
}

/// Where a dispatched run went: what a `post` extension is told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatched {
    pub provider: ProviderId,
    pub policy_id: String,
    pub reason: DecisionReason,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtensionRequest {
    pub extension_id: String,
    pub extension_type: ExtensionType,
    /// The run as the router sees it (amended by earlier `pre` extensions).
    pub run: RunSubmitted,
    /// Metadata added by earlier `pre` extensions.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Set for `post` extensions only.
    #[serde(default)]
    pub dispatched: Option<Dispatched>,
}

impl ExtensionRequest {
    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(subject: &str, payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(subject, payload)
    }
}

/// An extension's verdict on the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    #[default]
    Allow,
    /// Only honoured from a `validator`.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExtensionResponse {
    #[serde(default)]
    pub verdict: Verdict,
    /// Why the run was rejected: shown to the client in `GET /v1/runs/{id}`,
    /// so it must not quote the offending data.
    #[serde(default)]
    pub reason: Option<String>,
    /// Replacement steps (only honoured from a `pre`).
    #[serde(default)]
    pub steps: Option<Vec<StepSpec>>,
    /// Metadata to add to the run (only honoured from a `pre`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl ExtensionResponse {
    pub fn allow() -> Self {
        Self::default()
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Reject,
            reason: Some(reason.into()),
            ..Self::default()
        }
    }

    pub fn encode(&self) -> bytes::Bytes {
        crate::encode(self)
    }

    pub fn decode(subject: &str, payload: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::decode(subject, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_answer_allows() {
        let response = ExtensionResponse::decode("ext.x", b"{}").expect("decodes");
        assert_eq!(response, ExtensionResponse::allow());
    }

    #[test]
    fn a_rejection_round_trips() {
        let response = ExtensionResponse::reject("contains a card number");
        let back = ExtensionResponse::decode("ext.x", &response.encode()).expect("decodes");
        assert_eq!(back.verdict, Verdict::Reject);
        assert_eq!(back.reason.as_deref(), Some("contains a card number"));
    }

    #[test]
    fn a_bad_answer_is_a_decode_error() {
        let err = ExtensionResponse::decode("ext.x", br#"{"verdict":"maybe"}"#)
            .expect_err("unknown verdict");
        assert!(err.to_string().contains("ext.x"), "{err}");
    }
}
