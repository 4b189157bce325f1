//! Building and running the router.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wire::jetstream::{ConsumeOptions, ConsumerDef};

use crate::config::Config;
use crate::dispatch::{self, Dispatcher};
use crate::policy::Policy;

pub struct App {
    config: Config,
    admin: TcpListener,
    admin_router: axum::Router,
    nats: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    health: telemetry::Health,
    context_mode: telemetry::ContextMode,
}

impl App {
    pub async fn build(config: Config, telemetry: &Telemetry) -> anyhow::Result<Self> {
        crate::events::describe();
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("binding ROUTER_ADMIN_ADDR {}", config.admin_addr))?;
        let nats = wire::jetstream::connect(&config.nats_url, "router").await?;
        let jetstream = async_nats::jetstream::new(nats.clone());
        wire::jetstream::ensure_streams(&jetstream).await?;
        wire::jetstream::register_health(&telemetry.health, &nats);
        Ok(Self {
            config,
            admin,
            admin_router: telemetry.admin_router(),
            nats,
            jetstream,
            health: telemetry.health.clone(),
            context_mode: telemetry.settings.messaging_context,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// Routes runs until `shutdown` is cancelled; runs being decided finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let consumer = wire::jetstream::durable_consumer(
            &self.jetstream,
            &ConsumerDef {
                stream: wire::jetstream::RUNS.name,
                durable: dispatch::DURABLE,
                filter_subject: wire::submitted::SUBJECT,
                ack_wait: self.config.ack_wait,
                max_deliver: -1,
            },
        )
        .await?;
        let dispatcher = Arc::new(Dispatcher {
            jetstream: self.jetstream.clone(),
            policy: Policy::builtin(),
        });
        let consuming = tokio::spawn(wire::jetstream::consume(
            consumer,
            ConsumeOptions {
                group: dispatch::DURABLE.to_owned(),
                context_mode: self.context_mode,
                concurrency: self.config.concurrency,
                progress_every: None,
                drain: None,
            },
            shutdown.clone(),
            move |message| dispatcher.clone().handle(message),
        ));
        let admin = tokio::spawn(telemetry::admin::serve(
            self.admin,
            self.admin_router,
            shutdown.clone().cancelled_owned(),
        ));
        tracing::info!(admin = %self.config.admin_addr, "router started");

        shutdown.cancelled().await;
        self.health.set_stopping();
        consuming.await??;
        admin.await?.context("serving the admin port")?;
        self.nats.flush().await.context("flushing NATS")?;
        Ok(())
    }
}
