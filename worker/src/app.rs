//! Building and running the worker.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wire::jetstream::{ConsumeOptions, ConsumerDef};

use crate::blocks::Blocks;
use crate::blocks::approval::ApprovalBlock;
use crate::blocks::fs::FsBlock;
use crate::blocks::http::HttpBlock;
use crate::blocks::sql::SqlBlock;
use crate::config::Config;
use crate::consume::{self, Executor};
use crate::events::QueueDepth;
use crate::progress::ProgressStore;

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
            .with_context(|| format!("binding WORKER_ADMIN_ADDR {}", config.admin_addr))?;
        let nats = wire::jetstream::connect(&config.nats_url, "worker").await?;
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

    /// Executes runs until `shutdown` is cancelled; running runs get
    /// `WORKER_SHUTDOWN_GRACE_SECS` to finish, then are naked for another
    /// replica.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let executor = Arc::new(Executor {
            jetstream: self.jetstream.clone(),
            blocks: Blocks {
                http: HttpBlock::new(self.config.http_allow.clone(), self.config.http_max_body)?,
                sql: SqlBlock::new(
                    self.config.database_url.clone(),
                    self.config.sql_allow_writes,
                    self.config.sql_max_rows,
                ),
                fs: FsBlock::new(&self.config.fs_root)
                    .with_context(|| format!("WORKER_FS_ROOT {}", self.config.fs_root.display()))?,
                approval: ApprovalBlock::new(wire::approvals::bucket(&self.jetstream).await?),
            },
            progress: ProgressStore::open(&self.jetstream).await?,
            max_deliver: self.config.max_deliver,
        });
        let mut tasks = JoinSet::new();
        for provider in &self.config.providers {
            let durable = consume::durable(provider.as_str());
            let subject = wire::work::subject(provider);
            let durable_consumer = wire::jetstream::durable_consumer(
                &self.jetstream,
                &ConsumerDef {
                    stream: wire::jetstream::WORK.name,
                    durable: &durable,
                    filter_subject: &subject,
                    ack_wait: self.config.ack_wait,
                    max_deliver: -1,
                },
            )
            .await?;
            tasks.spawn(watch_queue_depth(
                durable_consumer.consumer.clone(),
                provider.to_string(),
                self.config.queue_depth_every,
                shutdown.clone(),
            ));
            let executor = executor.clone();
            tasks.spawn(wire::jetstream::consume(
                durable_consumer,
                ConsumeOptions {
                    group: durable,
                    context_mode: self.context_mode,
                    concurrency: self.config.concurrency,
                    progress_every: Some(self.config.progress_every()),
                    drain: Some(self.config.shutdown_grace),
                },
                shutdown.clone(),
                move |message| executor.clone().handle(message),
            ));
        }
        // The sample extension services the router calls (`ext.<id>`).
        tasks.spawn(crate::extensions::serve(
            self.nats.clone(),
            crate::extensions::Settings::from_env()?,
            shutdown.clone(),
        ));
        let admin = tokio::spawn(telemetry::admin::serve(
            self.admin,
            self.admin_router,
            shutdown.clone().cancelled_owned(),
        ));
        tracing::info!(
            admin = %self.config.admin_addr,
            providers = ?self.config.providers.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "worker started"
        );

        // A task that fails before shutdown (a consume loop whose consumer
        // was deleted) ends the process: a worker that pulls nothing must
        // not look alive. Tasks may end early without error (extensions
        // disabled).
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = tasks.join_next() => {
                    if let Err(err) = done.map_err(anyhow::Error::from).and_then(|ended| ended) {
                        shutdown.cancel();
                        self.health.set_stopping();
                        return Err(err.context("a worker task failed"));
                    }
                }
            }
        }
        self.health.set_stopping();
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        admin.await?.context("serving the admin port")?;
        self.nats.flush().await.context("flushing NATS")?;
        Ok(())
    }
}

/// Refreshes `worker_queue_depth{provider}` from the consumer's pending count.
async fn watch_queue_depth(
    mut consumer: PullConsumer,
    provider: String,
    every: std::time::Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match consumer.info().await {
            Ok(info) => QueueDepth {
                provider: &provider,
                pending: info.num_pending,
            }
            .emit(),
            Err(err) => {
                tracing::warn!(provider, error = %err, "cannot read the consumer's pending count")
            }
        }
    }
}
