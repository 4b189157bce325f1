//! The router's telemetry events and metric names.

use std::time::Duration;

use crate::policy::Decision;

pub const DECISIONS_TOTAL: &str = "router_decisions_total";
pub const DECISION_DURATION_SECONDS: &str = "router_decision_duration_seconds";
pub const POLICY_EVALUATION_DURATION_SECONDS: &str = "router_policy_evaluation_duration_seconds";
pub const DISPATCHES_TOTAL: &str = "router_dispatches_total";

pub fn describe() {
    metrics::describe_counter!(
        DECISIONS_TOTAL,
        "Routing decisions, by policy, provider, reason and tenant."
    );
    metrics::describe_histogram!(
        DECISION_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to decide one run, policy and provider selection included."
    );
    metrics::describe_histogram!(
        POLICY_EVALUATION_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to evaluate a tenant's policy."
    );
    metrics::describe_counter!(
        DISPATCHES_TOTAL,
        "Routed runs handed to a provider's work queue, by provider and result."
    );
}

/// A run was decided.
pub struct RunRouted<'a> {
    pub decision: &'a Decision,
    pub tenant_id: &'a str,
    pub decision_time: Duration,
    pub policy_time: Duration,
}

impl RunRouted<'_> {
    pub fn emit(self) {
        let d = self.decision;
        tracing::info!(
            policy.id = %d.policy_id,
            provider = %d.provider,
            decision.reason = d.reason.as_str(),
            "run routed"
        );
        metrics::counter!(
            DECISIONS_TOTAL,
            "policy_id" => d.policy_id.clone(),
            "provider" => d.provider.to_string(),
            "reason" => d.reason.as_str(),
            "tenant_id" => self.tenant_id.to_owned()
        )
        .increment(1);
        metrics::histogram!(DECISION_DURATION_SECONDS, "policy_id" => d.policy_id.clone())
            .record(self.decision_time.as_secs_f64());
        metrics::histogram!(POLICY_EVALUATION_DURATION_SECONDS, "policy_id" => d.policy_id.clone())
            .record(self.policy_time.as_secs_f64());
    }
}

/// A routed run was (or was not) stored in the provider's work queue.
pub struct RunDispatched<'a> {
    pub provider: &'a str,
    pub ok: bool,
}

impl RunDispatched<'_> {
    pub fn emit(self) {
        let result = if self.ok { "ok" } else { "failed" };
        if !self.ok {
            tracing::warn!(
                provider = self.provider,
                "dispatch failed; the run will be retried"
            );
        }
        metrics::counter!(DISPATCHES_TOTAL, "provider" => self.provider.to_owned(), "result" => result)
            .increment(1);
    }
}
