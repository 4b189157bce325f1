//! The router's telemetry events and metric names. Each `emit` writes the log
//! line and the metrics together, with the same bounded labels.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::breaker::{State, Transition};
use crate::extensions::invoker::ExtensionOutcome;
use crate::extensions::registry::ExtensionSpec;
use crate::policy::{Decision, PolicyError};

pub const DECISIONS_TOTAL: &str = "router_decisions_total";
pub const DECISION_DURATION_SECONDS: &str = "router_decision_duration_seconds";
pub const POLICY_EVALUATION_DURATION_SECONDS: &str = "router_policy_evaluation_duration_seconds";
pub const DISPATCHES_TOTAL: &str = "router_dispatches_total";
pub const POLICY_RELOADS_TOTAL: &str = "router_policy_reloads_total";
pub const PROVIDER_HEALTHY: &str = "router_provider_healthy";
pub const EXTENSION_INVOCATIONS_TOTAL: &str = "router_extension_invocations_total";
pub const EXTENSION_INVOCATION_DURATION_SECONDS: &str =
    "router_extension_invocation_duration_seconds";
pub const EXTENSION_RETRIES_TOTAL: &str = "router_extension_retries_total";
pub const REGISTRY_LOOKUPS_TOTAL: &str = "router_extension_registry_lookups_total";
pub const REGISTRY_CACHE_HITS_TOTAL: &str = "router_extension_registry_cache_hits_total";
pub const REGISTRY_CACHE_MISSES_TOTAL: &str = "router_extension_registry_cache_misses_total";
pub const REGISTRY_LOAD_DURATION_SECONDS: &str = "router_extension_registry_load_duration_seconds";
pub const BREAKER_STATE: &str = "router_extension_circuit_breaker_state";
pub const BREAKER_TRANSITIONS_TOTAL: &str = "router_extension_circuit_breaker_transitions_total";
pub const BREAKER_SUCCESS_TOTAL: &str = "router_extension_circuit_breaker_success_total";
pub const BREAKER_FAILURE_TOTAL: &str = "router_extension_circuit_breaker_failure_total";

/// Buckets of the extension invocation histogram (seed O1-5.1).
pub const INVOCATION_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
/// Buckets of the registry load histogram (seed O1-5.2).
pub const REGISTRY_LOAD_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5];

/// The `provider` label of a rejected run.
pub const NO_PROVIDER: &str = "none";

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        DECISIONS_TOTAL,
        "Routing decisions, by policy, provider, reason and tenant (unknown tenants as `other`)."
    );
    describe_histogram!(
        DECISION_DURATION_SECONDS,
        Unit::Seconds,
        "Time to decide one run, extensions and provider selection included."
    );
    describe_histogram!(
        POLICY_EVALUATION_DURATION_SECONDS,
        Unit::Seconds,
        "Time to evaluate a tenant's policy (reject rules)."
    );
    describe_counter!(
        DISPATCHES_TOTAL,
        "Routed runs handed to a provider's work queue, by provider and result."
    );
    describe_counter!(
        POLICY_RELOADS_TOTAL,
        "Policy file reloads on SIGHUP, by result (`ok`, `error`)."
    );
    describe_gauge!(
        PROVIDER_HEALTHY,
        "1 when the provider has a live consumer and its circuit is not open, else 0."
    );
    describe_counter!(
        EXTENSION_INVOCATIONS_TOTAL,
        "Extension invocations, by extension, type and final status."
    );
    describe_histogram!(
        EXTENSION_INVOCATION_DURATION_SECONDS,
        Unit::Seconds,
        "Time of one extension invocation, retries included."
    );
    describe_counter!(
        EXTENSION_RETRIES_TOTAL,
        "Extension attempts retried, by extension, type and reason (`timeout`, `error`)."
    );
    describe_counter!(
        REGISTRY_LOOKUPS_TOTAL,
        "Extension registry lookups, by status (`success`, `not_found`, `error`)."
    );
    describe_counter!(
        REGISTRY_CACHE_HITS_TOTAL,
        "Registry lookups answered from the cache."
    );
    describe_counter!(
        REGISTRY_CACHE_MISSES_TOTAL,
        "Registry lookups that re-read the registry (cache older than its TTL)."
    );
    describe_histogram!(
        REGISTRY_LOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Time to load the extension registry, by source."
    );
    describe_gauge!(
        BREAKER_STATE,
        "1 for the current circuit breaker state of an extension, 0 for the others."
    );
    describe_counter!(
        BREAKER_TRANSITIONS_TOTAL,
        "Circuit breaker transitions, by extension and transition (`open`, `half_open`, `close`)."
    );
    describe_counter!(
        BREAKER_SUCCESS_TOTAL,
        "Calls the circuit breaker counted as successes."
    );
    describe_counter!(
        BREAKER_FAILURE_TOTAL,
        "Calls the circuit breaker counted as failures."
    );
}

/// How long repeats of one warning are only counted after it was logged.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// Rate limit for warnings that come once per run: after an outage hundreds
/// a second say the same thing. The first is logged; repeats within
/// [`REPEAT_WINDOW`] are only counted (metrics still count each one), and
/// the count rides on the first line logged after the window.
#[derive(Default)]
pub struct Repeats {
    seen: Mutex<HashMap<(&'static str, String), Window>>,
}

struct Window {
    since: Instant,
    suppressed: u64,
}

/// A warning to log now, with what was held back before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Repeats not logged since the last line of this warning.
    pub suppressed: u64,
    /// Since the last line of this warning.
    pub over: Duration,
}

impl Repeats {
    /// Whether warning `what` about `subject` (a provider, an extension: a
    /// closed set) is logged at `now`.
    pub fn admit(&self, what: &'static str, subject: &str, now: Instant) -> Option<Admitted> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(&(what, subject.to_owned())) {
            Some(window) if now.saturating_duration_since(window.since) < REPEAT_WINDOW => {
                window.suppressed += 1;
                None
            }
            Some(window) => {
                let admitted = Admitted {
                    suppressed: window.suppressed,
                    over: now.saturating_duration_since(window.since),
                };
                *window = Window {
                    since: now,
                    suppressed: 0,
                };
                Some(admitted)
            }
            None => {
                seen.insert(
                    (what, subject.to_owned()),
                    Window {
                        since: now,
                        suppressed: 0,
                    },
                );
                Some(Admitted {
                    suppressed: 0,
                    over: Duration::ZERO,
                })
            }
        }
    }
}

static REPEATS: LazyLock<Repeats> = LazyLock::new(Repeats::default);

/// Logs warning `message` about `subject` unless it was logged in the last
/// [`REPEAT_WINDOW`]; a line after held-back repeats says how many.
macro_rules! warn_rate_limited {
    ($subject:expr, $message:literal, $($field:tt)*) => {
        if let Some(admitted) = REPEATS.admit($message, $subject, Instant::now()) {
            if admitted.suppressed == 0 {
                tracing::warn!($($field)*, $message);
            } else {
                tracing::warn!(
                    $($field)*,
                    repeated = admitted.suppressed,
                    concat!($message, " (repeated {} times in the last {} s)"),
                    admitted.suppressed,
                    admitted.over.as_secs()
                );
            }
        }
    };
}

/// A run was decided and will be dispatched.
pub struct RunRouted<'a> {
    pub decision: &'a Decision,
    /// Bounded by the recorder's cardinality guard (`telemetry::cardinality`).
    pub tenant_label: &'a str,
    pub decision_time: Duration,
    pub policy_time: Duration,
}

impl RunRouted<'_> {
    pub fn emit(self) {
        let d = self.decision;
        if d.degraded {
            warn_rate_limited!(
                d.provider.as_str(),
                "no healthy provider; the run is queued for the first choice",
                policy.id = %d.policy_id,
                provider = %d.provider,
                decision.reason = d.reason.as_str()
            );
        } else {
            tracing::info!(
                policy.id = %d.policy_id,
                provider = %d.provider,
                decision.reason = d.reason.as_str(),
                "run routed"
            );
        }
        decided(
            &d.policy_id,
            d.provider.as_str(),
            d.reason.as_str(),
            self.tenant_label,
            self.decision_time,
            self.policy_time,
        );
    }
}

/// A run was rejected (a reject rule, a validator, or a failing extension).
pub struct RunRejected<'a> {
    pub policy_id: &'a str,
    pub reason: &'a str,
    pub tenant_label: &'a str,
    pub decision_time: Duration,
    pub policy_time: Duration,
}

impl RunRejected<'_> {
    pub fn emit(self) {
        tracing::info!(
            policy.id = self.policy_id,
            decision.reason = "rejected",
            rejection = self.reason,
            "run rejected"
        );
        decided(
            self.policy_id,
            NO_PROVIDER,
            "rejected",
            self.tenant_label,
            self.decision_time,
            self.policy_time,
        );
    }
}

fn decided(
    policy_id: &str,
    provider: &str,
    reason: &'static str,
    tenant: &str,
    decision_time: Duration,
    policy_time: Duration,
) {
    metrics::counter!(
        DECISIONS_TOTAL,
        "policy_id" => policy_id.to_owned(),
        "provider" => provider.to_owned(),
        "reason" => reason,
        "tenant_id" => tenant.to_owned()
    )
    .increment(1);
    metrics::histogram!(DECISION_DURATION_SECONDS, "policy_id" => policy_id.to_owned())
        .record(decision_time.as_secs_f64());
    metrics::histogram!(POLICY_EVALUATION_DURATION_SECONDS, "policy_id" => policy_id.to_owned())
        .record(policy_time.as_secs_f64());
}

/// A gRPC `Decide` dry run was decided: logged only. No metric counts it, so
/// a caller cannot move production numbers or take tenant label slots.
pub struct DryRunDecided<'a> {
    pub policy_id: &'a str,
    /// `None` when rejected.
    pub provider: Option<&'a str>,
    pub reason: &'static str,
}

impl DryRunDecided<'_> {
    pub fn emit(self) {
        tracing::info!(
            policy.id = self.policy_id,
            provider = self.provider.unwrap_or(NO_PROVIDER),
            decision.reason = self.reason,
            "dry run decided"
        );
    }
}

/// The gRPC port accepts `Decide` without a token
/// (`ROUTER_GRPC_ALLOW_UNAUTHENTICATED=true`): said at start, at WARN.
pub struct GrpcPortOpen<'a> {
    pub addr: &'a std::net::SocketAddr,
}

impl GrpcPortOpen<'_> {
    pub fn emit(self) {
        tracing::warn!(
            grpc = %self.addr,
            "gRPC port is open: Decide accepts calls without a token \
             (ROUTER_GRPC_ALLOW_UNAUTHENTICATED=true); for local development only, \
             set ROUTER_GRPC_TOKEN anywhere else"
        );
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
            warn_rate_limited!(
                self.provider,
                "dispatch failed; the run will be retried",
                provider = self.provider
            );
        }
        metrics::counter!(DISPATCHES_TOTAL, "provider" => self.provider.to_owned(), "result" => result)
            .increment(1);
    }
}

/// The policy file was read again (SIGHUP).
pub struct PolicyReloaded<'a> {
    pub error: Option<&'a PolicyError>,
    pub tenants: usize,
}

impl PolicyReloaded<'_> {
    pub fn emit(self) {
        let result = match self.error {
            None => {
                tracing::info!(tenants = self.tenants, "policy reloaded");
                "ok"
            }
            Some(err) => {
                tracing::error!(
                    error = %err,
                    "policy reload refused; the previous policy stays in force"
                );
                "error"
            }
        };
        metrics::counter!(POLICY_RELOADS_TOTAL, "result" => result).increment(1);
    }
}

/// A provider's health as the decision sees it.
pub struct ProviderHealthChanged<'a> {
    pub provider: &'a str,
    pub healthy: bool,
    /// Whether the value changed since the last check (only changes are logged).
    pub changed: bool,
}

impl ProviderHealthChanged<'_> {
    pub fn emit(self) {
        if self.changed {
            if self.healthy {
                tracing::info!(provider = self.provider, "provider healthy");
            } else {
                tracing::warn!(
                    provider = self.provider,
                    "provider unhealthy (no live consumer or circuit open); fallbacks will be used"
                );
            }
        }
        metrics::gauge!(PROVIDER_HEALTHY, "provider" => self.provider.to_owned())
            .set(if self.healthy { 1.0 } else { 0.0 });
    }
}

/// One extension invocation ended.
pub struct ExtensionInvoked<'a> {
    pub outcome: &'a ExtensionOutcome,
}

impl ExtensionInvoked<'_> {
    pub fn emit(self) {
        let o = self.outcome;
        let kind = o.kind.map_or("unknown", |k| k.as_str());
        let status = o.status.as_str();
        if o.succeeded() {
            tracing::info!(
                extension.id = %o.id,
                extension.type = kind,
                extension.status = status,
                extension.retries_used = o.retries_used,
                duration_ms = o.elapsed.as_secs_f64() * 1000.0,
                "extension invoked"
            );
        } else {
            warn_rate_limited!(
                &o.id,
                "extension invocation failed",
                extension.id = %o.id,
                extension.type = kind,
                extension.status = status,
                extension.retries_used = o.retries_used,
                extension.failure_policy = o.failure_policy.as_str(),
                duration_ms = o.elapsed.as_secs_f64() * 1000.0
            );
        }
        metrics::counter!(
            EXTENSION_INVOCATIONS_TOTAL,
            "extension_id" => o.id.clone(),
            "extension_type" => kind,
            "status" => status
        )
        .increment(1);
        metrics::histogram!(
            EXTENSION_INVOCATION_DURATION_SECONDS,
            "extension_id" => o.id.clone(),
            "extension_type" => kind,
            "status" => status
        )
        .record(o.elapsed.as_secs_f64());
    }
}

/// An extension attempt failed and will be retried.
pub struct ExtensionRetried<'a> {
    pub spec: &'a ExtensionSpec,
    /// `timeout` or `error`.
    pub reason: &'static str,
}

impl ExtensionRetried<'_> {
    pub fn emit(self) {
        tracing::info!(
            extension.id = %self.spec.id,
            retry_reason = self.reason,
            "retrying extension"
        );
        metrics::counter!(
            EXTENSION_RETRIES_TOTAL,
            "extension_id" => self.spec.id.clone(),
            "extension_type" => self.spec.kind.as_str(),
            "retry_reason" => self.reason
        )
        .increment(1);
    }
}

/// A registry lookup.
pub struct RegistryLookup {
    pub status: &'static str,
    pub cache_hit: bool,
}

impl RegistryLookup {
    pub fn emit(self) {
        metrics::counter!(REGISTRY_LOOKUPS_TOTAL, "lookup_status" => self.status).increment(1);
        if self.cache_hit {
            metrics::counter!(REGISTRY_CACHE_HITS_TOTAL).increment(1);
        } else {
            metrics::counter!(REGISTRY_CACHE_MISSES_TOTAL).increment(1);
        }
    }
}

/// The registry was (re)loaded from its source.
pub struct RegistryLoaded<'a> {
    pub source: &'static str,
    pub elapsed: Duration,
    pub error: Option<&'a PolicyError>,
}

impl RegistryLoaded<'_> {
    pub fn emit(self) {
        match self.error {
            None => tracing::debug!(source = self.source, "extension registry loaded"),
            Some(err) => telemetry::events::ComponentError {
                code: "registry_load_failed",
                message: &format_args!(
                    "extension registry not reloaded, keeping the cached entries: {err}"
                ),
            }
            .emit(),
        }
        metrics::histogram!(REGISTRY_LOAD_DURATION_SECONDS, "load_source" => self.source)
            .record(self.elapsed.as_secs_f64());
    }
}

/// A call counted by an extension's circuit breaker.
pub struct BreakerCall<'a> {
    pub extension_id: &'a str,
    pub success: bool,
}

impl BreakerCall<'_> {
    pub fn emit(self) {
        let name = if self.success {
            BREAKER_SUCCESS_TOTAL
        } else {
            BREAKER_FAILURE_TOTAL
        };
        metrics::counter!(name, "extension_id" => self.extension_id.to_owned()).increment(1);
    }
}

/// An extension's circuit breaker changed state.
pub struct BreakerTransitioned<'a> {
    pub extension_id: &'a str,
    pub transition: Transition,
}

impl BreakerTransitioned<'_> {
    pub fn emit(self) {
        let t = self.transition;
        if t.to == State::Open {
            tracing::warn!(
                extension.id = self.extension_id,
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit breaker opened"
            );
        } else {
            tracing::info!(
                extension.id = self.extension_id,
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit breaker changed state"
            );
        }
        metrics::counter!(
            BREAKER_TRANSITIONS_TOTAL,
            "extension_id" => self.extension_id.to_owned(),
            "transition" => t.as_str()
        )
        .increment(1);
        set_state(self.extension_id, t.to);
    }
}

impl BreakerTransitioned<'static> {
    /// A breaker was created (closed).
    pub fn initial(extension_id: &str) {
        set_state(extension_id, State::Closed);
    }
}

fn set_state(extension_id: &str, current: State) {
    for state in State::ALL {
        metrics::gauge!(
            BREAKER_STATE,
            "extension_id" => extension_id.to_owned(),
            "state" => state.as_str()
        )
        .set(if state == current { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use wire::ids::ProviderId;
    use wire::work::DecisionReason;

    use super::*;

    /// The log lines written while `f` runs, as text.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("sink").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf-8");
        text.lines().map(str::to_owned).collect()
    }

    fn degraded(provider: &str) -> Decision {
        Decision {
            policy_id: "default".to_owned(),
            provider: ProviderId::parse(provider).expect("provider"),
            reason: DecisionReason::Fallback,
            degraded: true,
        }
    }

    #[test]
    fn repeats_are_counted_and_reported_after_the_window() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        assert_eq!(
            repeats.admit("w", "p", t0),
            Some(Admitted {
                suppressed: 0,
                over: Duration::ZERO
            })
        );
        for i in 1..=309 {
            assert_eq!(repeats.admit("w", "p", t0 + Duration::from_millis(i)), None);
        }
        // Another subject or warning has its own window.
        assert!(repeats.admit("w", "q", t0).is_some());
        assert!(repeats.admit("v", "p", t0).is_some());
        let later = t0 + REPEAT_WINDOW;
        assert_eq!(
            repeats.admit("w", "p", later),
            Some(Admitted {
                suppressed: 309,
                over: REPEAT_WINDOW
            })
        );
        assert_eq!(
            repeats.admit("w", "p", later + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn a_burst_of_degraded_decisions_logs_one_warning() {
        let decision = degraded("burst-a");
        let lines = logged(|| {
            for _ in 0..300 {
                RunRouted {
                    decision: &decision,
                    tenant_label: "demo",
                    decision_time: Duration::ZERO,
                    policy_time: Duration::ZERO,
                }
                .emit();
            }
        });
        let warnings: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("no healthy provider"))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
    }

    #[test]
    fn the_first_warning_after_the_window_carries_the_count() {
        let dispatch = || {
            RunDispatched {
                provider: "burst-c",
                ok: false,
            }
            .emit()
        };
        let first = logged(|| (0..5).for_each(|_| dispatch()));
        assert_eq!(first.len(), 1, "{first:#?}");
        // Ten seconds pass.
        if let Some(window) = REPEATS.seen.lock().expect("repeats").get_mut(&(
            "dispatch failed; the run will be retried",
            "burst-c".to_owned(),
        )) {
            window.since = Instant::now()
                .checked_sub(REPEAT_WINDOW)
                .expect("an instant 10 s ago");
        }
        let next = logged(dispatch);
        assert_eq!(next.len(), 1, "{next:#?}");
        assert!(
            next[0].contains(
                "dispatch failed; the run will be retried (repeated 4 times in the last 10 s)"
            ) && next[0].contains("repeated=4"),
            "{next:#?}"
        );
    }

    #[test]
    fn a_burst_of_failed_dispatches_logs_one_warning() {
        let lines = logged(|| {
            for _ in 0..300 {
                RunDispatched {
                    provider: "burst-b",
                    ok: false,
                }
                .emit();
            }
        });
        let warnings: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("dispatch failed"))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
    }
}
