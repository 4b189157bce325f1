//! Provider health as the decision sees it: a provider is unhealthy when its
//! circuit is open (dispatches to it failed) or no worker consumes its queue.
//!
//! Consumer liveness comes from JetStream consumer info of `worker-<provider>`
//! on `BEAMLINE_WORK`, refreshed in the background, never per run.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use wire::ids::ProviderId;

use crate::breaker::{Breaker, BreakerConfig};
use crate::events::ProviderHealthChanged;

/// A consumer is live when a worker has a pull request waiting, or has
/// received a message this recently.
pub const LIVE_WINDOW: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Entry {
    /// `None` until checked, or when the last check could not tell.
    live_consumer: Option<bool>,
    breaker: Option<Breaker>,
    healthy: Option<bool>,
}

#[derive(Default)]
pub struct ProviderHealth {
    entries: Mutex<HashMap<ProviderId, Entry>>,
}

impl ProviderHealth {
    /// Whether runs should go to `provider` now. An unchecked provider counts
    /// as healthy.
    pub fn is_healthy(&self, provider: &ProviderId) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(provider)
            .is_none_or(|e| Self::healthy(e, Instant::now()))
    }

    fn healthy(entry: &Entry, now: Instant) -> bool {
        entry.live_consumer != Some(false)
            && !entry.breaker.as_ref().is_some_and(|b| b.rejects_at(now))
    }

    /// Counts a dispatch on the provider's circuit breaker.
    pub fn record_dispatch(&self, provider: &ProviderId, ok: bool, config: BreakerConfig) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(provider.clone()).or_default();
        let breaker = entry.breaker.get_or_insert_with(|| Breaker::new(config));
        breaker.set_config(config);
        let now = Instant::now();
        // Past its cool-down an open breaker lets this dispatch be the trial.
        let _ = breaker.try_acquire(now);
        let transition = if ok {
            breaker.on_success(now)
        } else {
            breaker.on_failure(now)
        };
        if let Some(t) = transition {
            tracing::info!(
                provider = %provider,
                from = t.from.as_str(),
                to = t.to.as_str(),
                "provider circuit breaker changed state"
            );
        }
        Self::publish(provider, entry, now);
    }

    /// Records whether `provider` has a live consumer (`None`: unknown).
    pub fn set_live(&self, provider: &ProviderId, live: Option<bool>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(provider.clone()).or_default();
        if live.is_some() {
            entry.live_consumer = live;
        }
        Self::publish(provider, entry, Instant::now());
    }

    fn publish(provider: &ProviderId, entry: &mut Entry, now: Instant) {
        let healthy = Self::healthy(entry, now);
        let changed = entry.healthy.is_some_and(|before| before != healthy)
            || (entry.healthy.is_none() && !healthy);
        entry.healthy = Some(healthy);
        ProviderHealthChanged {
            provider: provider.as_str(),
            healthy,
            changed,
        }
        .emit();
    }

    /// Checks the consumers of `providers` once.
    pub async fn refresh(
        &self,
        jetstream: &async_nats::jetstream::Context,
        providers: &[ProviderId],
    ) {
        let stream = match jetstream.get_stream(wire::jetstream::WORK.name).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the work stream; provider health unchanged");
                return;
            }
        };
        for provider in providers {
            let durable = format!("worker-{provider}");
            let live = match stream.consumer_info(&durable).await {
                Ok(info) => Some(is_live(
                    info.num_waiting,
                    info.delivered.last_active,
                    time::OffsetDateTime::now_utc(),
                )),
                Err(err)
                    if err.kind()
                        == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
                {
                    Some(false)
                }
                Err(err) => {
                    tracing::debug!(provider = %provider, error = %err, "consumer info unavailable");
                    None
                }
            };
            self.set_live(provider, live);
        }
    }
}

/// Whether a consumer with `num_waiting` pull requests, last active at
/// `last_active`, counts as live at `now`.
pub fn is_live(
    num_waiting: usize,
    last_active: Option<time::OffsetDateTime>,
    now: time::OffsetDateTime,
) -> bool {
    num_waiting > 0 || last_active.is_some_and(|at| now - at <= LIVE_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(name: &str) -> ProviderId {
        ProviderId::parse(name).expect("id")
    }

    #[test]
    fn liveness_from_consumer_info() {
        let now = time::OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(is_live(1, None, now));
        assert!(!is_live(0, None, now));
        assert!(is_live(0, Some(now - Duration::from_secs(10)), now));
        assert!(!is_live(0, Some(now - Duration::from_secs(31)), now));
    }

    #[tokio::test(start_paused = true)]
    async fn no_consumer_or_open_circuit_is_unhealthy() {
        let health = ProviderHealth::default();
        let a = pid("a");
        assert!(health.is_healthy(&a), "unchecked counts as healthy");
        health.set_live(&a, Some(false));
        assert!(!health.is_healthy(&a));
        health.set_live(&a, None);
        assert!(!health.is_healthy(&a), "unknown keeps the last answer");
        health.set_live(&a, Some(true));
        assert!(health.is_healthy(&a));

        let config = BreakerConfig {
            failure_threshold: 2,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        };
        health.record_dispatch(&a, false, config);
        assert!(health.is_healthy(&a));
        health.record_dispatch(&a, false, config);
        assert!(!health.is_healthy(&a), "circuit open");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(health.is_healthy(&a), "cool-down over: a trial may go");
        health.record_dispatch(&a, true, config);
        assert!(health.is_healthy(&a));
    }
}
