//! Building and running the gateway: listeners, store, NATS, consumer.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post};
use telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wire::jetstream::{ConsumeOptions, ConsumerDef};

use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::routes::{approvals, runs};
use crate::store::Store;
use crate::waiters::Waiters;
use crate::{consumer, http_trace};

/// What request handlers share.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub jetstream: async_nats::jetstream::Context,
    /// Approval decisions (key `<run_id>.<step_id>`), read by the worker.
    pub approvals: async_nats::jetstream::kv::Store,
    pub rate_limiter: Arc<RateLimiter>,
    pub waiters: Arc<Waiters>,
}

impl AppState {
    pub fn trace_url(&self, trace_id: &str) -> String {
        format!("{}/trace/{trace_id}", self.config.jaeger_ui_url)
    }
}

/// A built gateway: listeners bound, store migrated, NATS connected.
pub struct App {
    state: AppState,
    api: TcpListener,
    admin: TcpListener,
    admin_router: Router,
    nats: async_nats::Client,
    context_mode: telemetry::ContextMode,
    http_limits: telemetry::serve::Limits,
}

impl App {
    pub async fn build(config: Config, telemetry: &Telemetry) -> anyhow::Result<Self> {
        crate::events::describe();
        let api = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding GATEWAY_LISTEN_ADDR {}", config.listen_addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("binding GATEWAY_ADMIN_ADDR {}", config.admin_addr))?;
        let store = Store::connect(&config.database_url).await?;
        let nats = wire::jetstream::connect(&config.nats_url, "gateway").await?;
        let jetstream = async_nats::jetstream::new(nats.clone());
        wire::jetstream::ensure_streams(&jetstream).await?;
        let approvals = wire::approvals::bucket(&jetstream).await?;

        let health = &telemetry.health;
        wire::jetstream::register_health(health, &nats);
        let probe = store.clone();
        health.register("store", move || {
            let store = probe.clone();
            async move { store.ping().await }
        });

        Ok(Self {
            state: AppState {
                store,
                rate_limiter: Arc::new(RateLimiter::new(config.rate_limits.clone())),
                waiters: Arc::default(),
                config: Arc::new(config),
                jetstream,
                approvals,
            },
            api,
            admin,
            admin_router: telemetry.admin_router(),
            nats,
            context_mode: telemetry.settings.messaging_context,
            http_limits: telemetry.settings.http,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen_addr)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| self.state.config.admin_addr)
    }

    /// Serves until `shutdown` is cancelled, then drains: in-flight requests
    /// finish, the consumer finishes its current message, NATS is flushed.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        health: telemetry::Health,
    ) -> anyhow::Result<()> {
        let events = wire::jetstream::durable_consumer(
            &self.state.jetstream,
            &ConsumerDef {
                stream: wire::jetstream::EVENTS.name,
                durable: consumer::DURABLE,
                filter_subject: wire::events::SUBJECT,
                ack_wait: self.state.config.events_ack_wait,
                max_deliver: -1,
            },
        )
        .await?;
        let store = self.state.store.clone();
        let waiters = self.state.waiters.clone();
        let consuming = tokio::spawn(wire::jetstream::consume(
            events,
            ConsumeOptions {
                group: consumer::DURABLE.to_owned(),
                context_mode: self.context_mode,
                // Events of one run may be applied out of order: the store
                // only moves a run forward, so order does not matter, and
                // overlapping store writes and acks keeps up with the workers.
                concurrency: self.state.config.events_concurrency,
                progress_every: None,
                drain: None,
            },
            shutdown.clone(),
            move |message| consumer::handle(store.clone(), waiters.clone(), message),
        ));
        // Every replica hears every event (core NATS, not the shared durable
        // consumer), so `?wait=` requests wake wherever they are held.
        let wakeups = tokio::spawn(wake_waiters(
            self.nats.clone(),
            self.state.waiters.clone(),
            shutdown.clone(),
        ));
        let expiry = tokio::spawn(expire_idempotency_keys(
            self.state.store.clone(),
            self.state.config.idempotency_ttl,
            shutdown.clone(),
        ));

        let api = router(self.state.clone());
        let stop = shutdown.clone();
        let serving = tokio::spawn(telemetry::serve::serve(
            self.api,
            api,
            self.http_limits,
            stop.cancelled_owned(),
        ));
        let stop = shutdown.clone();
        let admin = tokio::spawn(telemetry::admin::serve(
            self.admin,
            self.admin_router,
            stop.cancelled_owned(),
        ));
        tracing::info!(
            api = %self.state.config.listen_addr,
            admin = %self.state.config.admin_addr,
            "gateway started"
        );

        shutdown.cancelled().await;
        health.set_stopping();
        serving.await?.context("serving the API")?;
        consuming.await??;
        wakeups.await??;
        expiry.await?;
        admin.await?.context("serving the admin port")?;
        self.nats.flush().await.context("flushing NATS")?;
        Ok(())
    }
}

/// The API routes with their middleware.
pub fn router(state: AppState) -> Router {
    let limit = state.config.body_limit;
    api_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, _, handler)| {
            router.route(path, handler)
        })
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(crate::ratelimit::AuthFailures::new(
                state.config.auth_failures,
            )),
            crate::auth::throttle_failures,
        ))
        .layer(axum::middleware::from_fn(http_trace::layer))
        .with_state(state)
}

/// Every API route: path template, methods, handler. The router is built
/// from this table, and a test checks the OpenAPI document against it.
pub fn api_routes() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
)> {
    vec![
        (
            runs::COLLECTION,
            &["post", "get"],
            post(runs::create).get(runs::list),
        ),
        (runs::ITEM, &["get"], get(runs::get)),
        (approvals::APPROVE, &["post"], post(approvals::approve)),
        (approvals::REJECT, &["post"], post(approvals::reject)),
        (
            crate::openapi::PATH,
            &["get"],
            get(crate::openapi::document),
        ),
    ]
}

async fn fallback() -> crate::error::ApiError {
    crate::error::ApiError::NotFound("route")
}

async fn method_not_allowed() -> crate::error::ApiError {
    crate::error::ApiError::MethodNotAllowed
}

/// Passes every `runs.events` message to the local waiters.
async fn wake_waiters(
    nats: async_nats::Client,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut events = nats
        .subscribe(wire::events::SUBJECT)
        .await
        .context("subscribing to runs.events")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = events.next() => match message {
                None => return Ok(()),
                Some(message) => {
                    if let Ok(event) = wire::events::RunEvent::decode(&message.payload) {
                        waiters.notify(&event);
                    }
                }
            }
        }
    }
}

/// Deletes expired idempotency keys every ten minutes.
async fn expire_idempotency_keys(
    store: Store,
    ttl: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => match store.expire_idempotency_keys(ttl).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "idempotency keys expired"),
                Err(err) => tracing::warn!(error = format!("{err:#}"), "cannot expire idempotency keys"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).expect("document");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            doc["openapi"]
        );
        let routes = super::api_routes();
        for (path, methods, _) in &routes {
            for method in *methods {
                assert!(
                    doc["paths"][path][method].is_object(),
                    "{method} {path} missing from the OpenAPI document"
                );
            }
        }
        // And nothing documented that is not served.
        let documented = doc["paths"].as_object().expect("paths").len();
        assert_eq!(documented, routes.len());
        // The span/metric route templates are exactly the served routes.
        let mut templates: Vec<&str> = crate::routes::TEMPLATES.to_vec();
        let mut served: Vec<&str> = routes.iter().map(|(p, _, _)| *p).collect();
        templates.sort_unstable();
        served.sort_unstable();
        assert_eq!(templates, served);
    }

    #[test]
    fn documented_errors_use_the_error_body() {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).expect("document");
        let post = &doc["paths"]["/v1/runs"]["post"]["responses"];
        for status in ["400", "401", "409", "413", "415", "422", "429", "503"] {
            let schema = &post[status]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(schema, "#/components/schemas/ErrorBody", "{status}");
        }
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    }
}
