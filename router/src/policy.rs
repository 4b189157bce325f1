//! Tenant policies and the routing decision: pure functions of the policy,
//! the run and provider health, tested without NATS.
//!
//! A policy file (`ROUTER_POLICY_FILE`, YAML) has a `default` policy and one
//! per tenant under `tenants`. Every value is checked while it is read, so a
//! bad file is refused with the line, column and field at fault:
//!
//! ```yaml
//! default:
//!   providers: [{name: default, weight: 1}]
//! tenants:
//!   acme:
//!     id: acme-v2                    # policy.id (label value); defaults to the tenant
//!     providers:                     # weighted choice
//!       - {name: fast, weight: 3}
//!       - {name: cheap, weight: 1}
//!     fallback: [default]            # in order, when the choice is unhealthy
//!     sticky: true                   # same flow_id → same provider while healthy
//!     allow_hint: [gpu]              # providers a run's `provider` hint may name
//!     reject: {step_types: [sql], max_steps: 20}
//!     extensions: [pii-guard, enrich]
//! provider_breaker: {failures: 5, window_secs: 30, cooldown_secs: 15}
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use wire::ids::{ProviderId, TenantId};
use wire::step::STEP_TYPES;
use wire::submitted::RunSubmitted;
use wire::work::DecisionReason;

use crate::breaker::BreakerConfig;

/// One tenant's routing policy, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `policy.id`: from the file, so a bounded label value.
    pub id: String,
    /// Providers and their weights (each > 0, at least one).
    pub providers: Vec<(ProviderId, u32)>,
    /// Tried in order when the weighted (or sticky, or hinted) choice is unhealthy.
    pub fallback: Vec<ProviderId>,
    pub sticky: bool,
    /// Providers a run's explicit `provider` hint may name.
    pub allow_hint: Vec<ProviderId>,
    pub reject: RejectRules,
    /// Extension ids, invoked in this order (each type at its stage).
    pub extensions: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectRules {
    /// Step types this tenant may not use.
    #[serde(default)]
    pub step_types: Vec<StepTypeName>,
    /// Runs with more steps than this are rejected.
    #[serde(default)]
    pub max_steps: Option<usize>,
}

impl Policy {
    /// The built-in policy when no file is given: every run to `default`.
    pub fn builtin() -> Self {
        Self {
            id: "default".to_owned(),
            providers: vec![(ProviderId::default_provider(), 1)],
            fallback: Vec::new(),
            sticky: false,
            allow_hint: Vec::new(),
            reject: RejectRules::default(),
            extensions: Vec::new(),
        }
    }
}

/// Every tenant's policy: what one policy file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySet {
    pub default: Arc<Policy>,
    pub tenants: HashMap<TenantId, Arc<Policy>>,
    /// The circuit breaker of every provider (tripped by dispatch failures).
    pub provider_breaker: BreakerConfig,
}

impl PolicySet {
    pub fn builtin() -> Self {
        Self {
            default: Arc::new(Policy::builtin()),
            tenants: HashMap::new(),
            provider_breaker: BreakerConfig::default(),
        }
    }

    /// The tenant's policy, else the default one.
    pub fn for_tenant(&self, tenant: &TenantId) -> &Arc<Policy> {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Every provider any policy can route to, sorted, once each.
    pub fn providers(&self) -> Vec<ProviderId> {
        let mut providers: Vec<ProviderId> = std::iter::once(&self.default)
            .chain(self.tenants.values())
            .flat_map(|p| {
                p.providers
                    .iter()
                    .map(|(id, _)| id)
                    .chain(&p.fallback)
                    .chain(&p.allow_hint)
            })
            .cloned()
            .collect();
        providers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        providers.dedup();
        providers
    }

    /// Parses and validates a policy file. `extensions` are the ids the
    /// registry knows; a policy naming another one is refused.
    pub fn parse(text: &str, extensions: &HashSet<String>) -> Result<Self, PolicyError> {
        let file: PolicyFile = KNOWN_EXTENSIONS.with(|known| {
            *known.borrow_mut() = Some(extensions.clone());
            let parsed = serde_yaml_ng::from_str(text);
            *known.borrow_mut() = None;
            parsed
        })?;
        Ok(Self {
            default: Arc::new(file.default.into_policy("default")),
            tenants: file
                .tenants
                .into_iter()
                .map(|(tenant, doc)| {
                    let policy = doc.into_policy(tenant.as_str());
                    (tenant, Arc::new(policy))
                })
                .collect(),
            provider_breaker: file.provider_breaker.into(),
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path, extensions: &HashSet<String>) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read(e.to_string()))?;
        Self::parse(&text, extensions)
    }
}

/// Why a policy (or registry) file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the file: {0}")]
    Read(String),
    /// serde_yaml_ng's message names the field path, line and column.
    #[error("{0}")]
    Invalid(#[from] serde_yaml_ng::Error),
    /// A rule across fields, named by its path.
    #[error("{0}")]
    Semantic(String),
}

thread_local! {
    /// The registry's extension ids while a policy file is parsed, so an
    /// unknown reference is refused with its line like any other bad value.
    static KNOWN_EXTENSIONS: RefCell<Option<HashSet<String>>> = const { RefCell::new(None) };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: PolicyDoc,
    #[serde(default)]
    tenants: HashMap<TenantId, PolicyDoc>,
    #[serde(default)]
    provider_breaker: BreakerDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    #[serde(default)]
    id: Option<PolicyId>,
    providers: Providers,
    #[serde(default)]
    fallback: Vec<ProviderId>,
    #[serde(default)]
    sticky: bool,
    #[serde(default)]
    allow_hint: Vec<ProviderId>,
    #[serde(default)]
    reject: RejectRules,
    #[serde(default)]
    extensions: Vec<ExtensionRef>,
}

impl PolicyDoc {
    fn into_policy(self, default_id: &str) -> Policy {
        Policy {
            id: self.id.map_or_else(|| default_id.to_owned(), |id| id.0),
            providers: self
                .providers
                .0
                .into_iter()
                .map(|p| (p.name, p.weight.0))
                .collect(),
            fallback: self.fallback,
            sticky: self.sticky,
            allow_hint: self.allow_hint,
            reject: self.reject,
            extensions: self.extensions.into_iter().map(|e| e.0).collect(),
        }
    }
}

/// A circuit breaker's settings as a file spells them.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerDoc {
    #[serde(default = "default_failures")]
    pub failures: NonZero,
    #[serde(default = "default_window_secs")]
    pub window_secs: NonZero,
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: NonZero,
}

impl Default for BreakerDoc {
    fn default() -> Self {
        Self {
            failures: default_failures(),
            window_secs: default_window_secs(),
            cooldown_secs: default_cooldown_secs(),
        }
    }
}

fn default_failures() -> NonZero {
    NonZero(5)
}
fn default_window_secs() -> NonZero {
    NonZero(30)
}
fn default_cooldown_secs() -> NonZero {
    NonZero(15)
}

impl From<BreakerDoc> for BreakerConfig {
    fn from(doc: BreakerDoc) -> Self {
        Self {
            failure_threshold: doc.failures.0,
            window: Duration::from_secs(u64::from(doc.window_secs.0)),
            cooldown: Duration::from_secs(u64::from(doc.cooldown_secs.0)),
        }
    }
}

/// A whole number above zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u32")]
pub struct NonZero(pub u32);

impl TryFrom<u32> for NonZero {
    type Error = &'static str;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        if value == 0 {
            Err("must be at least 1")
        } else {
            Ok(Self(value))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedProvider {
    name: ProviderId,
    weight: Weight,
}

/// A provider's weight: above zero (so every listed provider can be chosen).
#[derive(Deserialize)]
#[serde(try_from = "u32")]
struct Weight(u32);

impl TryFrom<u32> for Weight {
    type Error = &'static str;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        if value == 0 {
            Err("weight must be at least 1")
        } else {
            Ok(Self(value))
        }
    }
}

#[derive(Deserialize)]
#[serde(try_from = "Vec<WeightedProvider>")]
struct Providers(Vec<WeightedProvider>);

impl TryFrom<Vec<WeightedProvider>> for Providers {
    type Error = String;
    fn try_from(value: Vec<WeightedProvider>) -> Result<Self, Self::Error> {
        if value.is_empty() {
            return Err("at least one provider is required".to_owned());
        }
        let mut seen = HashSet::new();
        if let Some(dup) = value.iter().find(|p| !seen.insert(p.name.clone())) {
            return Err(format!("provider `{}` is listed twice", dup.name));
        }
        Ok(Self(value))
    }
}

/// A policy id: used as a metric label, so short and plain.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct PolicyId(String);

impl TryFrom<String> for PolicyId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        // Same rules as a tenant id.
        TenantId::parse(value.clone()).map(|_| Self(value))
    }
}

/// A step type name a reject rule may name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StepTypeName(pub String);

impl TryFrom<String> for StepTypeName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        if STEP_TYPES.contains(&value.as_str()) {
            Ok(Self(value))
        } else {
            Err(format!(
                "unknown step type `{value}`; expected one of {}",
                STEP_TYPES.join(", ")
            ))
        }
    }
}

/// An extension id that the registry knows.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct ExtensionRef(String);

impl TryFrom<String> for ExtensionRef {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        KNOWN_EXTENSIONS.with(|known| match known.borrow().as_ref() {
            Some(known) if !known.contains(&value) => Err(format!(
                "extension `{value}` is not in the extension registry (ROUTER_EXTENSIONS_FILE)"
            )),
            _ => Ok(Self(value)),
        })
    }
}

/// Where a run goes and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub policy_id: String,
    pub provider: ProviderId,
    pub reason: DecisionReason,
    /// No candidate was healthy: the run is queued for the first choice anyway
    /// (JetStream keeps it until a worker of that pool consumes it).
    pub degraded: bool,
}

/// The reject rule a run breaks, as a sentence for the client.
pub fn check_rejects(policy: &Policy, tenant: &TenantId, run: &RunSubmitted) -> Option<String> {
    if let Some(max) = policy.reject.max_steps
        && run.steps.len() > max
    {
        return Some(format!(
            "the run has {} steps; tenant {tenant} may run at most {max}",
            run.steps.len()
        ));
    }
    run.steps.iter().find_map(|step| {
        let step_type = step.kind.type_name();
        policy
            .reject
            .step_types
            .iter()
            .any(|t| t.0 == step_type)
            .then(|| {
                format!(
                    "step {} uses type `{step_type}`, which tenant {tenant} may not use",
                    step.id
                )
            })
    })
}

/// Sum of the policy's weights (the range of `roll`).
pub fn total_weight(policy: &Policy) -> u64 {
    policy.providers.iter().map(|(_, w)| u64::from(*w)).sum()
}

/// The provider that owns `point` (in `0..total_weight`) of the weight line.
fn by_weight(policy: &Policy, point: u64) -> &ProviderId {
    let total = total_weight(policy).max(1);
    let mut point = point % total;
    for (provider, weight) in &policy.providers {
        let weight = u64::from(*weight);
        if point < weight {
            return provider;
        }
        point -= weight;
    }
    // Unreachable for a validated policy (at least one provider); the first
    // provider is still the sensible answer.
    &policy.providers[0].0
}

/// A stable hash of the tenant and flow (FNV-1a): every replica, and every
/// restart, maps the same flow to the same provider without shared state.
pub fn flow_hash(tenant: &TenantId, flow: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant
        .as_str()
        .bytes()
        .chain(std::iter::once(0))
        .chain(flow.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Picks the provider: the explicit hint when the policy allows it, else the
/// sticky or weighted choice; an unhealthy choice gives way to the first
/// healthy fallback. `roll` is uniform in `0..total_weight(policy)`, supplied
/// by the caller so the choice is reproducible in tests.
pub fn select(
    policy: &Policy,
    run: &RunSubmitted,
    healthy: impl Fn(&ProviderId) -> bool,
    roll: u64,
) -> Decision {
    let decision = |provider: &ProviderId, reason, degraded| Decision {
        policy_id: policy.id.clone(),
        provider: provider.clone(),
        reason,
        degraded,
    };
    let hinted = run
        .provider
        .as_ref()
        .filter(|hint| policy.allow_hint.contains(hint));
    let (first, reason) = match hinted {
        Some(hint) => (hint, DecisionReason::Explicit),
        None if policy.sticky => (
            by_weight(policy, flow_hash(&run.tenant_id, run.flow_id.as_str())),
            DecisionReason::Sticky,
        ),
        None => (by_weight(policy, roll), DecisionReason::Weighted),
    };
    if healthy(first) {
        return decision(first, reason, false);
    }
    match policy.fallback.iter().find(|p| healthy(p)) {
        Some(fallback) => decision(fallback, DecisionReason::Fallback, false),
        None => decision(first, reason, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::OffsetDateTime;
    use wire::ids::{FlowId, RunId, StepId};
    use wire::step::{StepKind, StepSpec};

    fn run_of(tenant: &str, flow: &str) -> RunSubmitted {
        RunSubmitted {
            run_id: RunId::parse("r1").expect("id"),
            tenant_id: TenantId::parse(tenant).expect("id"),
            flow_id: FlowId::parse(flow).expect("id"),
            steps: vec![],
            provider: None,
            submitted_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn run() -> RunSubmitted {
        run_of("demo", "hello")
    }

    fn pid(name: &str) -> ProviderId {
        ProviderId::parse(name).expect("provider id")
    }

    fn weighted(providers: &[(&str, u32)]) -> Policy {
        Policy {
            id: "p".to_owned(),
            providers: providers.iter().map(|(n, w)| (pid(n), *w)).collect(),
            ..Policy::builtin()
        }
    }

    fn all_healthy(_: &ProviderId) -> bool {
        true
    }

    const FILE: &str = r#"
default:
  providers: [{name: default, weight: 1}]
tenants:
  acme:
    id: acme-v2
    providers:
      - {name: fast, weight: 3}
      - {name: cheap, weight: 1}
    fallback: [default]
    sticky: true
    allow_hint: [gpu]
    reject: {step_types: [sql, fs], max_steps: 3}
    extensions: [pii-guard]
provider_breaker: {failures: 2, window_secs: 10, cooldown_secs: 5}
"#;

    fn known() -> HashSet<String> {
        ["pii-guard".to_owned()].into()
    }

    #[test]
    fn a_policy_file_parses() {
        let set = PolicySet::parse(FILE, &known()).expect("valid file");
        assert_eq!(set.default.id, "default");
        let acme = set.for_tenant(&TenantId::parse("acme").expect("id"));
        assert_eq!(acme.id, "acme-v2");
        assert_eq!(acme.providers, vec![(pid("fast"), 3), (pid("cheap"), 1)]);
        assert_eq!(acme.fallback, vec![pid("default")]);
        assert!(acme.sticky);
        assert_eq!(acme.allow_hint, vec![pid("gpu")]);
        assert_eq!(acme.reject.max_steps, Some(3));
        assert_eq!(acme.extensions, vec!["pii-guard".to_owned()]);
        assert_eq!(set.provider_breaker.failure_threshold, 2);
        assert_eq!(set.provider_breaker.cooldown, Duration::from_secs(5));
        let other = set.for_tenant(&TenantId::parse("zeta").expect("id"));
        assert_eq!(other.id, "default");
        assert_eq!(
            set.providers()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>(),
            ["cheap", "default", "fast", "gpu"]
        );
    }

    /// The error names the field and its line.
    fn refused(text: &str) -> String {
        PolicySet::parse(text, &known())
            .expect_err("invalid file")
            .to_string()
    }

    #[test]
    fn bad_files_name_the_line_and_field() {
        let zero = "default:\n  providers:\n    - name: a\n      weight: 0\n";
        let err = refused(zero);
        assert!(err.contains("default.providers[0]"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("weight must be at least 1"), "{err}");

        let typo = "default:\n  providers: [{name: a, weight: 1}]\n  stiky: true\n";
        let err = refused(typo);
        assert!(err.contains("stiky") && err.contains("line 3"), "{err}");

        let bad_provider = "default:\n  providers: [{name: a.b, weight: 1}]\n";
        let err = refused(bad_provider);
        assert!(err.contains("line 2") && err.contains("'.'"), "{err}");

        let empty = "default:\n  providers: []\n";
        assert!(refused(empty).contains("at least one provider"));

        let step =
            "default:\n  providers: [{name: a, weight: 1}]\n  reject:\n    step_types: [rocket]\n";
        let err = refused(step);
        assert!(err.contains("rocket") && err.contains("line 4"), "{err}");

        let ext =
            "default:\n  providers: [{name: a, weight: 1}]\n  extensions: [pii-guard, nope]\n";
        let err = refused(ext);
        assert!(
            err.contains("`nope` is not in the extension registry") && err.contains("line 3"),
            "{err}"
        );

        let dup = "default:\n  providers: [{name: a, weight: 1}, {name: a, weight: 2}]\n";
        assert!(refused(dup).contains("listed twice"));
        assert!(refused("tenants: {}\n").contains("missing field `default`"));
        let broken = refused("default:\n  providers: [\n");
        assert!(broken.contains("line"), "{broken}");
    }

    #[test]
    fn weights_partition_the_roll() {
        let policy = weighted(&[("a", 1), ("b", 3)]);
        let picks: Vec<String> = (0..total_weight(&policy))
            .map(|roll| select(&policy, &run(), all_healthy, roll).provider.into())
            .collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
        let d = select(&policy, &run(), all_healthy, 0);
        assert_eq!(d.reason, DecisionReason::Weighted);
        assert!(!d.degraded);
    }

    #[test]
    fn an_unhealthy_choice_takes_the_first_healthy_fallback() {
        let mut policy = weighted(&[("a", 1)]);
        policy.fallback = vec![pid("b"), pid("c")];
        let d = select(&policy, &run(), |p| p.as_str() == "c", 0);
        assert_eq!(d.provider.as_str(), "c");
        assert_eq!(d.reason, DecisionReason::Fallback);

        // Nothing healthy: queue for the first choice, flagged.
        let d = select(&policy, &run(), |_| false, 0);
        assert_eq!(d.provider.as_str(), "a");
        assert_eq!(d.reason, DecisionReason::Weighted);
        assert!(d.degraded);
    }

    #[test]
    fn stickiness_keeps_a_flow_on_one_provider_while_healthy() {
        let mut policy = weighted(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        policy.sticky = true;
        policy.fallback = vec![pid("z")];
        let first = select(&policy, &run_of("acme", "nightly"), all_healthy, 0);
        assert_eq!(first.reason, DecisionReason::Sticky);
        for roll in 0..50 {
            let again = select(&policy, &run_of("acme", "nightly"), all_healthy, roll);
            assert_eq!(again.provider, first.provider);
        }
        // Different flows spread over the providers.
        let spread: HashSet<ProviderId> = (0..64)
            .map(|i| {
                select(
                    &policy,
                    &run_of("acme", &format!("flow-{i}")),
                    all_healthy,
                    0,
                )
                .provider
            })
            .collect();
        assert!(spread.len() > 1, "{spread:?}");
        // Unhealthy sticky provider: fallback.
        let sticky = first.provider.clone();
        let d = select(&policy, &run_of("acme", "nightly"), |p| *p != sticky, 0);
        assert_eq!(d.provider.as_str(), "z");
        assert_eq!(d.reason, DecisionReason::Fallback);
    }

    #[test]
    fn a_hint_is_honoured_only_when_allowed() {
        let mut policy = weighted(&[("a", 1)]);
        policy.allow_hint = vec![pid("gpu")];
        let mut hinted = run();
        hinted.provider = Some(pid("gpu"));
        let d = select(&policy, &hinted, all_healthy, 0);
        assert_eq!(
            (d.provider.as_str(), d.reason),
            ("gpu", DecisionReason::Explicit)
        );

        hinted.provider = Some(pid("secret"));
        let d = select(&policy, &hinted, all_healthy, 0);
        assert_eq!(
            (d.provider.as_str(), d.reason),
            ("a", DecisionReason::Weighted)
        );

        // An allowed but unhealthy hint falls back.
        policy.fallback = vec![pid("b")];
        hinted.provider = Some(pid("gpu"));
        let d = select(&policy, &hinted, |p| p.as_str() != "gpu", 0);
        assert_eq!(
            (d.provider.as_str(), d.reason),
            ("b", DecisionReason::Fallback)
        );
    }

    #[test]
    fn reject_rules_explain_themselves() {
        let set = PolicySet::parse(FILE, &known()).expect("valid");
        let acme = TenantId::parse("acme").expect("id");
        let policy = set.for_tenant(&acme);
        let mut run = run_of("acme", "f");
        let step = |id: &str, kind: StepKind| StepSpec {
            id: StepId::parse(id).expect("id"),
            kind,
            retry: Default::default(),
        };
        run.steps = vec![step("s1", StepKind::Noop)];
        assert_eq!(check_rejects(policy, &acme, &run), None);
        run.steps.push(step(
            "s2",
            StepKind::Sql(wire::step::SqlInput {
                query: "SELECT 1".to_owned(),
                params: vec![],
                write: false,
            }),
        ));
        assert_eq!(
            check_rejects(policy, &acme, &run).as_deref(),
            Some("step s2 uses type `sql`, which tenant acme may not use")
        );
        run.steps = (0..4)
            .map(|i| step(&format!("n{i}"), StepKind::Noop))
            .collect();
        assert_eq!(
            check_rejects(policy, &acme, &run).as_deref(),
            Some("the run has 4 steps; tenant acme may run at most 3")
        );
    }

    proptest! {
        /// Over 20 000 decisions with a uniform roll, each provider's share is
        /// within 2 percentage points of its weight's share (about 5.7 standard
        /// deviations at the widest, p = 0.5).
        #[test]
        fn weights_are_respected(
            weights in proptest::collection::vec(1u32..50, 1..6),
            seed: u64,
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("p{i}")).collect();
            let providers: Vec<(&str, u32)> =
                names.iter().map(String::as_str).zip(weights.iter().copied()).collect();
            let policy = weighted(&providers);
            let total = total_weight(&policy);
            let mut rng = fastrand::Rng::with_seed(seed);
            const N: usize = 20_000;
            let mut counts: HashMap<ProviderId, usize> = HashMap::new();
            for _ in 0..N {
                let d = select(&policy, &run(), all_healthy, rng.u64(0..total));
                *counts.entry(d.provider).or_default() += 1;
            }
            for (provider, weight) in &policy.providers {
                let expected = f64::from(*weight) / total as f64;
                let got = counts.get(provider).copied().unwrap_or(0) as f64 / N as f64;
                prop_assert!((got - expected).abs() < 0.02,
                    "{provider}: expected {expected:.3}, got {got:.3}");
            }
        }
    }
}
