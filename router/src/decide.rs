//! One decision, traced: `router.decide` → `router.policy.apply` →
//! `router.extension.invoke`… → `router.provider.select`. Shared by the
//! `runs.submitted` consumer and the gRPC `Decide` dry run ([`Mode`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::Instrument as _;
use tracing::field::Empty;
use wire::extensions::{ExtensionType, Verdict as ExtVerdict};
use wire::submitted::RunSubmitted;
use wire::work::DecisionReason;

use crate::events::{DryRunDecided, RunRejected, RunRouted};
use crate::extensions::invoker::{ExtensionOutcome, Invocation, Invoker};
use crate::extensions::registry::FailurePolicy;
use crate::health::ProviderHealth;
use crate::policy::{self, Decision, Policy, PolicySet};

/// The policies in force; replaced whole on a good reload.
#[derive(Clone)]
pub struct PolicyStore(Arc<RwLock<Arc<PolicySet>>>);

impl PolicyStore {
    pub fn new(set: PolicySet) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(set))))
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, set: PolicySet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }
}

/// What the router decided for a run.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Dispatch `run` (as amended by `pre` extensions).
    Route {
        decision: Decision,
        run: RunSubmitted,
        metadata: BTreeMap<String, String>,
    },
    /// Tell the client why; nothing is dispatched.
    Reject { policy_id: String, reason: String },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    pub extensions: Vec<ExtensionOutcome>,
    /// The policy used (its `post` extensions run after dispatch).
    pub policy: Arc<Policy>,
}

/// Whether a decision is for real or only shown to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A submitted run: counted in the metrics, moves the breakers.
    Live,
    /// gRPC `Decide`: the same decision and spans, extensions asked, but no
    /// breaker state changes and no metric is emitted, so a caller's dry runs
    /// can neither open a breaker nor take the tenant label slots of the
    /// cardinality guard (`tenant_id` comes from the caller).
    DryRun,
}

pub struct Decider {
    pub policies: PolicyStore,
    pub invoker: Arc<Invoker>,
    pub health: Arc<ProviderHealth>,
}

impl Decider {
    /// Decides `run` inside a `router.decide` span (a child of the current span).
    pub async fn decide(&self, run: RunSubmitted) -> Outcome {
        self.decide_as(run, Mode::Live).await
    }

    /// Decides `run` as [`Mode::DryRun`]: changes nothing, counts nothing.
    pub async fn dry_run(&self, run: RunSubmitted) -> Outcome {
        self.decide_as(run, Mode::DryRun).await
    }

    async fn decide_as(&self, run: RunSubmitted, mode: Mode) -> Outcome {
        let span = tracing::info_span!(
            "router.decide",
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
            flow.id = run.flow_id.as_str(),
            policy.id = Empty,
            provider = Empty,
            decision.reason = Empty,
            decision.dry_run = mode == Mode::DryRun,
            otel.status_code = Empty,
            error.type = Empty,
        );
        let outcome = self.decide_in(run, mode).instrument(span.clone()).await;
        span.record("policy.id", outcome.policy.id.as_str());
        match &outcome.verdict {
            Verdict::Route { decision, .. } => {
                span.record("provider", decision.provider.as_str());
                span.record("decision.reason", decision.reason.as_str());
            }
            Verdict::Reject { .. } => {
                span.record("decision.reason", DecisionReason::Rejected.as_str());
            }
        }
        outcome
    }

    async fn decide_in(&self, mut run: RunSubmitted, mode: Mode) -> Outcome {
        let started = Instant::now();
        let policies = self.policies.current();
        // `tenant_id` is bounded by the recorder's cardinality guard
        // (`telemetry::cardinality`): known tenants, else `other`.
        let tenant_label = run.tenant_id.as_str().to_owned();

        // router.policy.apply: the tenant's policy and its reject rules.
        let policy = policies.for_tenant(&run.tenant_id).clone();
        let apply = tracing::info_span!(
            "router.policy.apply",
            policy.id = policy.id.as_str(),
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
            rejected = Empty,
        );
        let (rule, policy_time) = apply.in_scope(|| {
            let started = Instant::now();
            let rule = policy::check_rejects(&policy, &run.tenant_id, &run);
            (rule, started.elapsed())
        });
        apply.record("rejected", rule.is_some());
        let reject = |reason: String, extensions| {
            match mode {
                Mode::Live => RunRejected {
                    policy_id: &policy.id,
                    reason: &reason,
                    tenant_label: &tenant_label,
                    decision_time: started.elapsed(),
                    policy_time,
                }
                .emit(),
                Mode::DryRun => DryRunDecided {
                    policy_id: &policy.id,
                    provider: None,
                    reason: DecisionReason::Rejected.as_str(),
                }
                .emit(),
            }
            Outcome {
                verdict: Verdict::Reject {
                    policy_id: policy.id.clone(),
                    reason,
                },
                extensions,
                policy: policy.clone(),
            }
        };
        if let Some(reason) = rule {
            return reject(reason, Vec::new());
        }

        // router.extension.invoke: `pre` and `validator` extensions, in order.
        let mut metadata = BTreeMap::new();
        let mut outcomes = Vec::new();
        for id in &policy.extensions {
            if self.invoker.registry().kind_of(id).await == Some(ExtensionType::Post) {
                continue;
            }
            let invocation = Invocation {
                run: &run,
                metadata: &metadata,
                policy_id: &policy.id,
                dispatched: None,
            };
            let outcome = self.invoker.invoke_as(id, &invocation, mode).await;
            let refusal = match (&outcome.response, outcome.kind) {
                (None, _) => match outcome.failure_policy {
                    FailurePolicy::FailOpen => None,
                    FailurePolicy::FailClosed => Some(format!(
                        "extension {id} could not be consulted ({}) and its failure policy is fail_closed",
                        outcome.status.as_str()
                    )),
                },
                (Some(response), Some(ExtensionType::Validator))
                    if response.verdict == ExtVerdict::Reject =>
                {
                    Some(format!(
                        "rejected by extension {id}: {}",
                        response.reason.as_deref().unwrap_or("no reason given")
                    ))
                }
                (Some(response), Some(ExtensionType::Pre)) => {
                    if let Some(steps) = &response.steps {
                        run.steps = steps.clone();
                    }
                    metadata.extend(response.metadata.clone());
                    None
                }
                (Some(_), _) => None,
            };
            outcomes.push(outcome);
            if let Some(reason) = refusal {
                return reject(reason, outcomes);
            }
        }

        // router.provider.select
        let select = tracing::info_span!(
            "router.provider.select",
            provider = Empty,
            decision.reason = Empty,
            decision.degraded = Empty,
            tenant.id = run.tenant_id.as_str(),
            run.id = run.run_id.as_str(),
        );
        let decision = select.in_scope(|| {
            let total = policy::total_weight(&policy).max(1);
            policy::select(
                &policy,
                &run,
                |p| self.health.is_healthy(p),
                fastrand::u64(0..total),
            )
        });
        select.record("provider", decision.provider.as_str());
        select.record("decision.reason", decision.reason.as_str());
        select.record("decision.degraded", decision.degraded);
        match mode {
            Mode::Live => RunRouted {
                decision: &decision,
                tenant_label: &tenant_label,
                decision_time: started.elapsed(),
                policy_time,
            }
            .emit(),
            Mode::DryRun => DryRunDecided {
                policy_id: &decision.policy_id,
                provider: Some(decision.provider.as_str()),
                reason: decision.reason.as_str(),
            }
            .emit(),
        }
        Outcome {
            verdict: Verdict::Route {
                decision,
                run,
                metadata,
            },
            extensions: outcomes,
            policy,
        }
    }
}

/// How long a `post` extension may take in the background before its
/// invocation is abandoned (its own timeout and retries normally end it first).
pub const POST_DEADLINE: Duration = Duration::from_secs(60);
