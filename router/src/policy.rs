//! Routing decisions: pure functions of the policy and the run, tested
//! without NATS.

use wire::ids::ProviderId;
use wire::submitted::RunSubmitted;
use wire::work::DecisionReason;

/// A tenant's routing policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub id: String,
    /// Providers and their weights (> 0).
    pub providers: Vec<(ProviderId, u32)>,
}

impl Policy {
    /// The built-in policy: every run to provider `default`.
    pub fn builtin() -> Self {
        Self {
            id: "default".to_owned(),
            providers: vec![(ProviderId::default_provider(), 1)],
        }
    }
}

/// Where a run goes and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub policy_id: String,
    pub provider: ProviderId,
    pub reason: DecisionReason,
}

/// Picks a provider by weight. `roll` is a uniform number in `0..total weight`
/// supplied by the caller, so the choice is reproducible in tests.
pub fn decide(policy: &Policy, _run: &RunSubmitted, roll: u64) -> Option<Decision> {
    let total: u64 = policy.providers.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut point = roll % total;
    for (provider, weight) in &policy.providers {
        let weight = u64::from(*weight);
        if point < weight {
            return Some(Decision {
                policy_id: policy.id.clone(),
                provider: provider.clone(),
                reason: DecisionReason::Weighted,
            });
        }
        point -= weight;
    }
    None
}

/// Sum of the policy's weights (the range of `roll`).
pub fn total_weight(policy: &Policy) -> u64 {
    policy.providers.iter().map(|(_, w)| u64::from(*w)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use wire::ids::{FlowId, RunId, TenantId};

    fn run() -> RunSubmitted {
        RunSubmitted {
            run_id: RunId::parse("r1").expect("id"),
            tenant_id: TenantId::parse("demo").expect("id"),
            flow_id: FlowId::parse("hello").expect("id"),
            steps: vec![],
            provider: None,
            submitted_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn builtin_policy_routes_to_default_by_weight() {
        let decision = decide(&Policy::builtin(), &run(), 0).expect("decision");
        assert_eq!(decision.provider.as_str(), "default");
        assert_eq!(decision.reason, DecisionReason::Weighted);
        assert_eq!(decision.policy_id, "default");
    }

    #[test]
    fn weights_partition_the_roll() {
        let policy = Policy {
            id: "p".to_owned(),
            providers: vec![
                (ProviderId::parse("a").expect("id"), 1),
                (ProviderId::parse("b").expect("id"), 3),
            ],
        };
        let picks: Vec<String> = (0..total_weight(&policy))
            .map(|roll| {
                decide(&policy, &run(), roll)
                    .expect("decision")
                    .provider
                    .to_string()
            })
            .collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
    }

    #[test]
    fn no_weight_no_decision() {
        let policy = Policy {
            id: "p".to_owned(),
            providers: vec![],
        };
        assert!(decide(&policy, &run(), 0).is_none());
    }
}
