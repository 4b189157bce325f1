//! Liveness and readiness, backed by real dependency checks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

type Probe = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// The set of readiness checks of one component. Cloning shares the set.
#[derive(Clone)]
pub struct Health {
    component: &'static str,
    checks: Arc<Mutex<Vec<(&'static str, Probe)>>>,
    stopping: Arc<AtomicBool>,
}

/// How long one probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Health {
    pub fn new(component: &'static str) -> Self {
        Self {
            component,
            checks: Arc::default(),
            stopping: Arc::default(),
        }
    }

    /// Adds a readiness check, e.g. `("nats", || async { connected })`.
    pub fn register<F, Fut>(&self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let probe: Probe = Arc::new(move || probe().boxed());
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.retain(|(n, _)| *n != name);
        checks.push((name, probe));
    }

    /// Marks the component as stopping: readiness fails from now on, so load
    /// balancers stop sending work while in-flight work drains.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Runs every check and records `component_health_status{component,check}`.
    pub async fn check(&self) -> Vec<(&'static str, bool)> {
        let checks: Vec<_> = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut results = Vec::with_capacity(checks.len() + 1);
        results.push(("serving", !self.stopping.load(Ordering::SeqCst)));
        for (name, probe) in checks {
            let ok = tokio::time::timeout(PROBE_TIMEOUT, probe())
                .await
                .unwrap_or(false);
            results.push((name, ok));
        }
        for (name, ok) in &results {
            metrics::gauge!(
                "component_health_status",
                "component" => self.component,
                "check" => *name
            )
            .set(if *ok { 1.0 } else { 0.0 });
        }
        results
    }
}
