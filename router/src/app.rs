//! Building and running the router.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wire::jetstream::{ConsumeOptions, ConsumerDef};

use crate::config::Config;
use crate::decide::{Decider, PolicyStore};
use crate::dispatch::{self, Dispatcher};
use crate::events::{GrpcPortOpen, PolicyReloaded};
use crate::extensions::invoker::Invoker;
use crate::extensions::registry::Registry;
use crate::grpc::{GrpcAuth, GrpcSettings};
use crate::health::ProviderHealth;
use crate::policy::PolicySet;

pub struct App {
    config: Config,
    admin: TcpListener,
    grpc: TcpListener,
    admin_router: axum::Router,
    nats: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    health: telemetry::Health,
    context_mode: telemetry::ContextMode,
    decider: Arc<Decider>,
}

impl App {
    pub async fn build(config: Config, telemetry: &Telemetry) -> anyhow::Result<Self> {
        crate::events::describe();
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("binding ROUTER_ADMIN_ADDR {}", config.admin_addr))?;
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding ROUTER_GRPC_ADDR {}", config.grpc_addr))?;
        let nats = wire::jetstream::connect(&config.nats_url, "router").await?;
        // Every accepted `Decide` request must fit in an extension request.
        // (0: the server has not said; the invoker checks each request too.)
        let max_payload = nats.server_info().max_payload;
        if max_payload > 0 && config.grpc_max_request_bytes >= max_payload {
            anyhow::bail!(
                "ROUTER_GRPC_MAX_REQUEST_BYTES={} must be below the NATS server's max_payload ({max_payload} bytes)",
                config.grpc_max_request_bytes
            );
        }
        let jetstream = async_nats::jetstream::new(nats.clone());
        wire::jetstream::ensure_streams(&jetstream).await?;
        wire::jetstream::register_health(&telemetry.health, &nats);
        let registry = Arc::new(Registry::new(
            config.extensions_file.clone(),
            config.registry_ttl,
            config.extensions.clone(),
        ));
        let decider = Arc::new(Decider {
            policies: PolicyStore::new(config.policies.clone()),
            invoker: Arc::new(Invoker::new(nats.clone(), registry)),
            health: Arc::new(ProviderHealth::default()),
        });
        // Know which providers have workers before the first run is decided.
        decider
            .health
            .refresh(&jetstream, &decider.policies.current().providers())
            .await;
        Ok(Self {
            config,
            admin,
            grpc,
            admin_router: telemetry.admin_router(),
            nats,
            jetstream,
            health: telemetry.health.clone(),
            context_mode: telemetry.settings.messaging_context,
            decider,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_addr)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_addr)
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
            decider: self.decider.clone(),
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
        let grpc_addr = self.grpc_addr();
        if self.config.grpc_auth == GrpcAuth::Open {
            GrpcPortOpen { addr: &grpc_addr }.emit();
        }
        let grpc = tokio::spawn(crate::grpc::serve(
            self.grpc,
            self.decider.clone(),
            GrpcSettings {
                auth: self.config.grpc_auth.clone(),
                max_request_bytes: self.config.grpc_max_request_bytes,
            },
            shutdown.clone(),
        ));
        let admin = tokio::spawn(telemetry::admin::serve(
            self.admin,
            self.admin_router,
            shutdown.clone().cancelled_owned(),
        ));
        let watching = tokio::spawn(watch_providers(
            self.decider.clone(),
            self.jetstream.clone(),
            self.config.provider_health_every,
            shutdown.clone(),
        ));
        let reloading = tokio::spawn(reload_on_sighup(
            self.decider.clone(),
            self.config.policy_file.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            admin = %self.config.admin_addr,
            grpc = %grpc_addr,
            grpc_auth = self.config.grpc_auth.as_str(),
            policy_file = ?self.config.policy_file,
            extensions_file = ?self.config.extensions_file,
            "router started"
        );

        shutdown.cancelled().await;
        self.health.set_stopping();
        consuming.await??;
        grpc.await??;
        admin.await?.context("serving the admin port")?;
        watching.await?;
        reloading.await??;
        self.nats.flush().await.context("flushing NATS")?;
        Ok(())
    }
}

/// Refreshes provider liveness every `every`.
async fn watch_providers(
    decider: Arc<Decider>,
    jetstream: async_nats::jetstream::Context,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let providers = decider.policies.current().providers();
        decider.health.refresh(&jetstream, &providers).await;
    }
}

/// On SIGHUP, reads the extension registry and the policy file again; a bad
/// file keeps the policy in force.
async fn reload_on_sighup(
    decider: Arc<Decider>,
    policy_file: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = hangup.recv() => if received.is_none() { return Ok(()) },
        }
        let registry = decider.invoker.registry();
        let reloaded = match registry.reload().await {
            Err(err) => Err(err),
            Ok(()) => {
                let known = registry.ids().await;
                match &policy_file {
                    None => Ok(PolicySet::builtin()),
                    Some(path) => {
                        let path = path.clone();
                        tokio::task::spawn_blocking(move || PolicySet::load(&path, &known))
                            .await
                            .context("reading the policy file")?
                    }
                }
            }
        };
        match reloaded {
            Ok(set) => {
                let tenants = set.tenants.len();
                decider.policies.replace(set);
                PolicyReloaded {
                    error: None,
                    tenants,
                }
                .emit();
            }
            Err(err) => PolicyReloaded {
                error: Some(&err),
                tenants: 0,
            }
            .emit(),
        }
    }
}
