//! Building and running the gateway: listeners, store, NATS, consumer.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wire::jetstream::{ConsumeOptions, ConsumerDef};

use crate::config::Config;
use crate::routes::{approvals, runs};
use crate::store::Store;
use crate::{consumer, http_trace};

/// What request handlers share.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub jetstream: async_nats::jetstream::Context,
    /// Approval decisions (key `<run_id>.<step_id>`), read by the worker.
    pub approvals: async_nats::jetstream::kv::Store,
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
                config: Arc::new(config),
                store,
                jetstream,
                approvals,
            },
            api,
            admin,
            admin_router: telemetry.admin_router(),
            nats,
            context_mode: telemetry.settings.messaging_context,
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
        let consuming = tokio::spawn(wire::jetstream::consume(
            events,
            ConsumeOptions {
                group: consumer::DURABLE.to_owned(),
                context_mode: self.context_mode,
                concurrency: 1,
                progress_every: None,
                drain: None,
            },
            shutdown.clone(),
            move |message| consumer::handle(store.clone(), message),
        ));

        let api = router(self.state.clone());
        let stop = shutdown.clone();
        let serving = tokio::spawn(async move {
            axum::serve(self.api, api)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
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
        admin.await?.context("serving the admin port")?;
        self.nats.flush().await.context("flushing NATS")?;
        Ok(())
    }
}

/// The API routes with their middleware.
pub fn router(state: AppState) -> Router {
    let limit = state.config.body_limit;
    Router::new()
        .route(runs::COLLECTION, post(runs::create))
        .route(runs::ITEM, get(runs::get))
        .route(approvals::APPROVE, post(approvals::approve))
        .route(approvals::REJECT, post(approvals::reject))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(http_trace::layer))
        .with_state(state)
}

async fn fallback() -> crate::error::ApiError {
    crate::error::ApiError::NotFound("route")
}
