//! The JetStream side of the contract: streams, durable consumers and the
//! deduplicated, traced publish every hand-off uses.
//!
//! Streams and consumers are created idempotently by whoever starts first, so
//! services can start in any order and any number of replicas share work.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self as js, Context};
use tracing::Instrument;

/// Connects to NATS, failing fast at start (reconnects are automatic after,
/// to any of the configured servers or those the cluster announces).
///
/// The connection's inbox prefix is `_INBOX.<name>`, so a server's
/// permissions can let each service read only its own replies.
pub async fn connect(
    settings: &crate::connection::NatsSettings,
    name: &str,
) -> anyhow::Result<async_nats::Client> {
    let servers = settings.servers_display();
    let client = settings
        .connect_options()
        .await?
        .name(name)
        .custom_inbox_prefix(format!("_INBOX.{name}"))
        .event_callback(|event| async move {
            tracing::info!(event = %event, "nats connection event");
        })
        .connect(settings.servers.clone())
        .await
        .map_err(|e| anyhow::anyhow!("connecting to NATS at {servers} (NATS_URL): {e}"))?;
    tracing::info!(
        servers = %servers,
        auth = settings.auth.method(),
        tls = settings.tls.enabled(),
        stream_replicas = settings.stream_replicas,
        "connected to NATS"
    );
    Ok(client)
}

/// How long one readiness answer about JetStream is reused: probes come
/// from every load balancer and scrape, and a stalled broker would otherwise
/// hold each of them for the whole timeout.
const READY_CACHE: Duration = Duration::from_secs(1);
/// How long the JetStream round trip of a readiness probe may take.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Readiness check `nats`: the connection is up and JetStream answers for
/// every stream the services use (a stream info request each, at most
/// [`READY_TIMEOUT`], the answer cached for [`READY_CACHE`]). A connection
/// alone says nothing: a stalled broker keeps its connections open, and a
/// missing stream makes every publish fail.
pub fn register_health(health: &telemetry::Health, client: &async_nats::Client) {
    let client = client.clone();
    let jetstream = js::new(client.clone());
    let cache = std::sync::Arc::new(tokio::sync::Mutex::new(None::<(std::time::Instant, bool)>));
    health.register("nats", move || {
        let client = client.clone();
        let jetstream = jetstream.clone();
        let cache = cache.clone();
        async move {
            if client.connection_state() != async_nats::connection::State::Connected {
                return false;
            }
            // Concurrent probes wait for the one round trip under way.
            let mut cached = cache.lock().await;
            if let Some((at, ready)) = *cached
                && at.elapsed() < READY_CACHE
            {
                return ready;
            }
            let ready = streams_answer(&jetstream).await;
            *cached = Some((std::time::Instant::now(), ready));
            ready
        }
    });
}

/// Whether JetStream answers a stream info request for each stream in time.
async fn streams_answer(jetstream: &Context) -> bool {
    let checks = [RUNS, WORK, EVENTS, DEAD_LETTERS].map(|def| async move {
        match tokio::time::timeout(READY_TIMEOUT, jetstream.get_stream(def.name)).await {
            Ok(Ok(_)) => true,
            Ok(Err(err)) => {
                tracing::debug!(stream = def.name, error = %err, "readiness: stream info failed");
                false
            }
            Err(_) => {
                tracing::debug!(stream = def.name, "readiness: stream info timed out");
                false
            }
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .all(|ready| ready)
}

/// A stream and the subjects it captures.
pub struct StreamDef {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
}

pub const RUNS: StreamDef = StreamDef {
    name: "BEAMLINE_RUNS",
    subjects: &[crate::submitted::SUBJECT],
};
pub const WORK: StreamDef = StreamDef {
    name: "BEAMLINE_WORK",
    subjects: &[crate::work::ALL_SUBJECTS],
};
pub const EVENTS: StreamDef = StreamDef {
    name: "BEAMLINE_EVENTS",
    subjects: &[crate::events::SUBJECT],
};
/// Messages no consumer could process, kept for inspection
/// (`deadletter.<original subject>`).
pub const DEAD_LETTERS: StreamDef = StreamDef {
    name: "BEAMLINE_DEADLETTER",
    subjects: &["deadletter.>"],
};

/// How long a stream keeps messages, acked or not.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The window in which a repeated `Nats-Msg-Id` is dropped by the server.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A stream that could not be brought to the configuration the code wants.
#[derive(Debug, thiserror::Error)]
pub enum StreamSetupError {
    /// The stream exists with settings JetStream never changes in place.
    #[error(
        "stream {stream} exists with settings JetStream cannot change: {differences}; \
         to fix: drain it (let consumers finish), back it up if needed, delete it \
         (`nats stream rm {stream}`) and restart a service to recreate it"
    )]
    Immutable {
        stream: String,
        differences: Differences,
    },
    /// The server refused the update (or the creation) of the stream.
    #[error("stream {stream}: JetStream refused to {action} ({differences}): {reason}{hint}")]
    Refused {
        stream: String,
        action: &'static str,
        differences: Differences,
        reason: String,
        hint: &'static str,
    },
    #[error("stream {stream}: {reason}")]
    Unreachable { stream: String, reason: String },
}

/// One setting of an existing stream that differs from the wanted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub setting: &'static str,
    pub current: String,
    pub wanted: String,
    /// JetStream can change it with a stream update.
    pub updatable: bool,
}

/// The differences, printable as `setting current → wanted; …`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Differences(pub Vec<Difference>);

impl std::fmt::Display for Differences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("new stream");
        }
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} is {} but {} is wanted",
                d.setting, d.current, d.wanted
            )?;
        }
        Ok(())
    }
}

/// The settings of `current` that differ from `wanted`, among those this
/// code sets. Unlimited is `-1` on the server and `0` in a fresh `Config`.
pub fn differences(current: &stream::Config, wanted: &stream::Config) -> Differences {
    fn limit(v: i64) -> i64 {
        if v <= 0 { -1 } else { v }
    }
    let mut out = Vec::new();
    let mut check = |setting, current: String, wanted: String, updatable| {
        if current != wanted {
            out.push(Difference {
                setting,
                current,
                wanted,
                updatable,
            });
        }
    };
    let subjects = |s: &[String]| {
        let mut s = s.to_vec();
        s.sort();
        format!("{s:?}")
    };
    check(
        "subjects",
        subjects(&current.subjects),
        subjects(&wanted.subjects),
        true,
    );
    check(
        "storage",
        format!("{:?}", current.storage),
        format!("{:?}", wanted.storage),
        false,
    );
    check(
        "retention",
        format!("{:?}", current.retention),
        format!("{:?}", wanted.retention),
        false,
    );
    check(
        "num_replicas (NATS_STREAM_REPLICAS)",
        current.num_replicas.max(1).to_string(),
        wanted.num_replicas.max(1).to_string(),
        true,
    );
    check(
        "max_age",
        format!("{:?}", current.max_age),
        format!("{:?}", wanted.max_age),
        true,
    );
    // Zero asks for the server's default: two minutes, at most max_age.
    let window = |c: &stream::Config| match c.duplicate_window {
        Duration::ZERO if c.max_age.is_zero() => DUPLICATE_WINDOW,
        Duration::ZERO => c.max_age.min(DUPLICATE_WINDOW),
        window => window,
    };
    check(
        "duplicate_window",
        format!("{:?}", window(current)),
        format!("{:?}", window(wanted)),
        true,
    );
    check(
        "max_bytes",
        limit(current.max_bytes).to_string(),
        limit(wanted.max_bytes).to_string(),
        true,
    );
    check(
        "max_messages",
        limit(current.max_messages).to_string(),
        limit(wanted.max_messages).to_string(),
        true,
    );
    check(
        "max_messages_per_subject",
        limit(current.max_messages_per_subject).to_string(),
        limit(wanted.max_messages_per_subject).to_string(),
        true,
    );
    check(
        "discard",
        format!("{:?}", current.discard),
        format!("{:?}", wanted.discard),
        true,
    );
    check(
        "allow_rollup",
        current.allow_rollup.to_string(),
        wanted.allow_rollup.to_string(),
        true,
    );
    check(
        "allow_direct",
        current.allow_direct.to_string(),
        wanted.allow_direct.to_string(),
        true,
    );
    // JetStream refuses to clear deny_delete once set; setting it is an update.
    check(
        "deny_delete",
        current.deny_delete.to_string(),
        wanted.deny_delete.to_string(),
        !current.deny_delete,
    );
    Differences(out)
}

/// Creates stream `wanted.name` when missing; an existing one with other
/// settings is updated to `wanted` where JetStream allows it, and reported
/// (which setting, what to do) where it does not.
pub async fn ensure_stream(
    js: &Context,
    wanted: stream::Config,
) -> Result<stream::Info, StreamSetupError> {
    let name = wanted.name.clone();
    let replicas_hint = |reason: &str| {
        if wanted.num_replicas > 1 && (reason.contains("replicas") || reason.contains("peers")) {
            "; NATS_STREAM_REPLICAS must not exceed the number of JetStream servers \
             up in the cluster (1 on a single server); a cluster still forming \
             answers this too, so a restart may succeed"
        } else if reason.contains("timed out") {
            // The server drops a request its user may not publish, so a
            // missing permission looks like a timeout here.
            "; if the server answers other requests, this user may lack the \
             permission for $JS.API.STREAM.CREATE/UPDATE of this stream (see the \
             server log, and observability/nats/permissions.conf)"
        } else {
            ""
        }
    };
    let existing = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(err.kind(), js::context::GetStreamErrorKind::JetStream(ref e)
                if e.code() == 404) =>
        {
            return match js.create_stream(wanted.clone()).await {
                Ok(stream) => kept(stream.cached_info().clone(), &wanted, "create it"),
                Err(err) => {
                    let reason = err.to_string();
                    Err(StreamSetupError::Refused {
                        hint: replicas_hint(&reason),
                        stream: name,
                        action: "create it",
                        differences: Differences::default(),
                        reason,
                    })
                }
            };
        }
        Err(err) => {
            return Err(StreamSetupError::Unreachable {
                stream: name,
                reason: err.to_string(),
            });
        }
    };
    let info = existing.cached_info().clone();
    let found = differences(&info.config, &wanted);
    if found.0.is_empty() {
        return kept(info, &wanted, "use it");
    }
    let fixed: Vec<Difference> = found.0.iter().filter(|d| !d.updatable).cloned().collect();
    if !fixed.is_empty() {
        return Err(StreamSetupError::Immutable {
            stream: name,
            differences: Differences(fixed),
        });
    }
    match js.update_stream(&wanted).await {
        Ok(updated) => {
            let updated = kept(updated, &wanted, "update it")?;
            tracing::info!(stream = %name, changed = %found, "stream settings updated");
            Ok(updated)
        }
        Err(err) => {
            let reason = err.to_string();
            Err(StreamSetupError::Refused {
                hint: replicas_hint(&reason),
                stream: name,
                action: "update it",
                differences: found,
                reason,
            })
        }
    }
}

/// Checks that the server kept what it was asked for: a standalone server
/// accepts `num_replicas: 3` and quietly keeps one replica.
fn kept(
    info: stream::Info,
    wanted: &stream::Config,
    action: &'static str,
) -> Result<stream::Info, StreamSetupError> {
    let mut left = differences(&info.config, wanted);
    // A server outside a cluster has no RAFT group for the stream: it
    // records the replica count it was given and keeps one copy.
    let clustered = info
        .cluster
        .as_ref()
        .is_some_and(|c| c.raft_group.is_some() || c.name.is_some());
    if wanted.num_replicas > 1 && !clustered {
        left.0.push(Difference {
            setting: "num_replicas (NATS_STREAM_REPLICAS)",
            current: "1 (the server is not in a JetStream cluster)".to_owned(),
            wanted: wanted.num_replicas.to_string(),
            updatable: false,
        });
    }
    if left.0.is_empty() {
        return Ok(info);
    }
    let single =
        wanted.num_replicas > 1 && left.0.iter().any(|d| d.setting.starts_with("num_replicas"));
    Err(StreamSetupError::Refused {
        stream: wanted.name.clone(),
        action,
        differences: left,
        reason: "the server accepted the request but kept these settings".to_owned(),
        hint: if single {
            "; NATS_STREAM_REPLICAS must not exceed the number of JetStream servers \
             in the cluster (1 on a single server)"
        } else {
            ""
        },
    })
}

/// Creates the four streams with `replicas` replicas when missing and brings
/// existing ones to these settings (or says why not).
pub async fn ensure_streams(js: &Context, replicas: usize) -> anyhow::Result<()> {
    for def in [RUNS, WORK, EVENTS, DEAD_LETTERS] {
        ensure_stream(
            js,
            stream::Config {
                name: def.name.to_owned(),
                subjects: def.subjects.iter().map(|s| (*s).to_owned()).collect(),
                storage: StorageType::File,
                max_age: MAX_AGE,
                duplicate_window: DUPLICATE_WINDOW,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(())
}

/// Opens key-value bucket `name`, creating it when missing (file storage,
/// one value per key, entries kept for the stream retention period,
/// `replicas` replicas); an existing bucket is brought to these settings
/// like a stream (see [`ensure_stream`]).
///
/// The bucket's stream is created here with the same settings
/// `create_key_value` would use: that call first queries the account, whose
/// answer async-nats 0.51 cannot parse from nats-server 2.9 (Debian's).
pub async fn key_value(
    js: &Context,
    name: &str,
    description: &str,
    replicas: usize,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    ensure_stream(
        js,
        stream::Config {
            name: format!("KV_{name}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            storage: StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("key-value bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| anyhow::anyhow!("opening key-value bucket {name}: {e}"))
}

/// A durable pull consumer's settings.
pub struct ConsumerDef<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    pub filter_subject: &'a str,
    /// Unacked messages are redelivered after this long (progress acks extend it).
    pub ack_wait: Duration,
    /// Deliveries before JetStream gives up on a message.
    pub max_deliver: i64,
}

/// A durable pull consumer, with what the consume loop needs to pull from it.
#[derive(Clone)]
pub struct Durable {
    pub consumer: PullConsumer,
    context: Context,
    stream: String,
    config: pull::Config,
}

/// Creates or updates a durable pull consumer (replicas share it).
pub async fn durable_consumer(js: &Context, def: &ConsumerDef<'_>) -> anyhow::Result<Durable> {
    let config = pull::Config {
        durable_name: Some(def.durable.to_owned()),
        filter_subject: def.filter_subject.to_owned(),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: def.ack_wait,
        max_deliver: def.max_deliver,
        ..Default::default()
    };
    let consumer = create_consumer(js, def.stream, config.clone()).await?;
    Ok(Durable {
        consumer,
        context: js.clone(),
        stream: def.stream.to_owned(),
        config,
    })
}

async fn create_consumer(
    js: &Context,
    stream: &str,
    config: pull::Config,
) -> anyhow::Result<PullConsumer> {
    let durable = config.durable_name.clone().unwrap_or_default();
    js.get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {stream}: {e}"))?
        .create_consumer(config)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {durable} on {stream}: {e}"))
}

/// Unacked messages a durable consumer lets out at once, over all its
/// replicas: room for many replicas at `concurrency` each, and for the
/// worker's approval waits (which hold their message without a slot), yet a
/// bound on what a stuck consumer can hold.
pub fn max_ack_pending(concurrency: usize) -> i64 {
    i64::try_from(concurrency.max(1).saturating_mul(128)).unwrap_or(i64::MAX)
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("JetStream did not acknowledge the publish to {subject}: {reason}")]
pub struct PublishError {
    pub subject: String,
    pub reason: String,
}

/// One message to hand off durably.
pub struct Outgoing<'a> {
    pub subject: &'a str,
    /// `Nats-Msg-Id`: the server drops a repeat inside the duplicate window.
    pub message_id: &'a str,
    pub payload: bytes::Bytes,
    /// Correlation fields for the `send` span.
    pub tenant_id: &'a str,
    pub run_id: &'a str,
}

/// Headers every hand-off carries besides the trace context, so a consumer
/// that cannot decode a payload still knows whose run it was and can end it.
pub const RUN_ID_HEADER: &str = "Beamline-Run-Id";
pub const TENANT_ID_HEADER: &str = "Beamline-Tenant-Id";

/// The run and tenant a message's headers name, when both are valid ids.
pub fn correlation(
    headers: Option<&async_nats::HeaderMap>,
) -> Option<(crate::ids::RunId, crate::ids::TenantId)> {
    let headers = headers?;
    let run = crate::ids::RunId::parse(headers.get(RUN_ID_HEADER)?.as_str()).ok()?;
    let tenant = crate::ids::TenantId::parse(headers.get(TENANT_ID_HEADER)?.as_str()).ok()?;
    Some((run, tenant))
}

/// Ends the run of a message that cannot be decoded: reports it `failed`
/// with `reason` on `runs.events` when the headers say whose run it is.
/// `Ok(false)`: the message names no run (nothing to end).
pub async fn report_undecodable(
    js: &Context,
    message: &js::Message,
    reason: &str,
) -> Result<bool, PublishError> {
    let Some((run_id, tenant_id)) = correlation(message.headers.as_ref()) else {
        return Ok(false);
    };
    let event = crate::events::RunEvent {
        run_id,
        tenant_id,
        status: crate::run::RunStatus::Failed,
        provider: None,
        steps: Vec::new(),
        error: Some(format!(
            "undecodable message on {}: {reason}",
            message.subject
        )),
        at: time::OffsetDateTime::now_utc(),
    };
    publish(
        js,
        Outgoing {
            subject: crate::events::SUBJECT,
            message_id: &event.message_id(),
            payload: event.encode(),
            tenant_id: event.tenant_id.as_str(),
            run_id: event.run_id.as_str(),
        },
    )
    .await
    .map(|_| true)
}

/// What a consumer does with a message it cannot decode: end its run
/// ([`report_undecodable`]) and drop the message, or retry shortly when the
/// report could not be stored.
pub async fn end_undecodable(js: &Context, message: &js::Message, reason: &str) -> Disposition {
    match report_undecodable(js, message, reason).await {
        Ok(_) => Disposition::Reject,
        Err(err) => {
            telemetry::events::ComponentError {
                code: "publish_failed",
                message: &err,
            }
            .emit();
            Disposition::Retry(Duration::from_secs(2))
        }
    }
}

/// Publishes inside a `send <subject>` PRODUCER span whose context travels in
/// the headers, and waits for the stream's acknowledgement: when this returns
/// `Ok` the message is stored.
pub async fn publish(
    js: &Context,
    out: Outgoing<'_>,
) -> Result<js::publish::PublishAck, PublishError> {
    let span = telemetry::messaging::send_span(out.subject, out.message_id);
    span.record("tenant.id", out.tenant_id);
    span.record("run.id", out.run_id);
    let mut headers = telemetry::propagation::nats_headers_for(&span, out.tenant_id);
    headers.insert(RUN_ID_HEADER, out.run_id);
    headers.insert(TENANT_ID_HEADER, out.tenant_id);
    let subject = out.subject.to_owned();
    let result = async {
        let publish = PublishMessage::build()
            .payload(out.payload)
            .headers(headers)
            .message_id(out.message_id);
        js.send_publish(subject.clone(), publish)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    }
    .instrument(span.clone())
    .await;
    result.map_err(|reason| {
        telemetry::spans::record_error(&span, "publish_failed", &reason);
        PublishError { subject, reason }
    })
}

/// The concurrency slot a handler holds while it runs.
#[derive(Clone)]
struct Slot {
    semaphore: std::sync::Arc<tokio::sync::Semaphore>,
    permit: std::sync::Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

tokio::task_local! {
    static SLOT: Slot;
}

/// Runs `wait` without holding the handler's concurrency slot, then takes a
/// slot again. For long waits that use no resources (an approval): the
/// message stays in flight (in-progress acks go on) while other messages
/// use the slot. Outside a consume loop it just runs `wait`.
pub async fn without_slot<F: std::future::Future>(wait: F) -> F::Output {
    let slot = SLOT.try_with(Slot::clone).ok();
    if let Some(slot) = &slot {
        slot.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    let output = wait.await;
    if let Some(slot) = slot
        && let Ok(permit) = slot.semaphore.clone().acquire_owned().await
    {
        *slot.permit.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
    }
    output
}

/// What to tell JetStream once a message has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done: its effect is durable.
    Ack,
    /// Not now: redeliver after the delay (a transient failure).
    Retry(Duration),
    /// Never: the message cannot be processed (logged and counted by the handler).
    Reject,
}

/// How a consume loop runs.
pub struct ConsumeOptions {
    /// The durable consumer's name (the span's `messaging.consumer.group.name`).
    pub group: String,
    pub context_mode: telemetry::ContextMode,
    /// Messages handled at once; also sizes the consumer's `max_ack_pending`
    /// ([`max_ack_pending`]).
    pub concurrency: usize,
    /// Send an in-progress ack this often while a message is held (waiting
    /// for a slot or handled), so long work is not redelivered to another
    /// replica while this one lives. `None` for short handlers.
    pub progress_every: Option<Duration>,
    /// After shutdown, how long running handlers may finish before they are
    /// interrupted and their messages naked for another replica. `None`:
    /// wait for them however long they take.
    pub drain: Option<Duration>,
}

/// How long one pull request waits on the server. Short, so that a pull
/// nobody serves any more is soon gone on the server's side too.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server sends an idle heartbeat this often on a waiting pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence for this long means the pull is lost (the broker restarted, the
/// stream's leader moved, the connection dropped): a new one is sent at once
/// rather than after the expiry.
const PULL_LOST_AFTER: Duration = Duration::from_secs(3);
/// At shutdown, how long the messages already sent to this replica may take
/// to arrive (each is handed back at once).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// Pause before pulling again after the server refused a pull.
const PULL_BACKOFF: Duration = Duration::from_millis(250);

/// Pulls messages from `durable` and runs `handler` on each inside a
/// `process <subject>` CONSUMER span, at most `concurrency` at a time, acking
/// as the handler says.
///
/// Each pull asks for as many messages as there are free slots, expires
/// after [`PULL_EXPIRES`] and carries idle heartbeats, so a lost pull is
/// replaced within [`PULL_LOST_AFTER`]. When `shutdown` is cancelled it
/// stops pulling first: it unsubscribes the pull's inbox (the server drops a
/// pull nobody listens to), hands back at once (nak, no delay) what was
/// already sent and what has not started, lets running handlers finish for
/// `drain`, and returns.
pub async fn consume<H, Fut>(
    durable: Durable,
    options: ConsumeOptions,
    shutdown: tokio_util::sync::CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    H: Fn(js::Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Disposition> + Send + 'static,
{
    use async_nats::StatusCode;
    use futures::StreamExt as _;

    let concurrency = options.concurrency.max(1);
    size_consumer(&durable, concurrency).await;
    let client = durable.context.client();
    let info = durable.consumer.cached_info();
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        info.stream_name, info.name
    );
    let inbox = client.new_inbox();
    let mut deliveries = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| anyhow::anyhow!("pulling from {}: {e}", options.group))?;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    // Cancelled when the drain period after shutdown is over.
    let interrupt = tokio_util::sync::CancellationToken::new();
    let options = std::sync::Arc::new(options);
    let mut running = tokio::task::JoinSet::new();
    // Messages the open pull may still deliver; 0: no pull open.
    let mut open = 0usize;
    let mut heard = tokio::time::Instant::now();
    // Logged once per outage, not once per pull.
    let mut lost_logged = false;
    let mut refused_logged = false;
    // Messages received and waiting for a slot.
    let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    loop {
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            delivery = deliveries.next() => {
                let Some(delivery) = delivery else {
                    anyhow::bail!("the pull subscription of {} ended", options.group);
                };
                heard = tokio::time::Instant::now();
                lost_logged = false;
                match delivery.status {
                    None | Some(StatusCode::OK) => {
                        open = open.saturating_sub(1);
                        refused_logged = false;
                        let message = js::Message {
                            message: delivery,
                            context: durable.context.clone(),
                        };
                        waiting.fetch_add(1, Ordering::SeqCst);
                        running.spawn(handle_one(
                            message,
                            options.clone(),
                            handler.clone(),
                            Waiting {
                                permits: permits.clone(),
                                waiting: waiting.clone(),
                            },
                            shutdown.clone(),
                            interrupt.clone(),
                        ));
                    }
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    // The pull expired: pull again.
                    Some(StatusCode::TIMEOUT) => open = 0,
                    Some(status) => {
                        open = 0;
                        let description = delivery.description.unwrap_or_default();
                        if description.eq_ignore_ascii_case("consumer deleted") {
                            anyhow::bail!("consumer {} was deleted", options.group);
                        }
                        // A leadership change, a limit, no JetStream: the
                        // pull is over; pull again after a pause. Logged
                        // once until messages flow again.
                        if !refused_logged {
                            tracing::warn!(
                                consumer = %options.group,
                                status = status.as_u16(),
                                description,
                                "pull ended by the server; pulling again"
                            );
                            refused_logged = true;
                        }
                        tokio::time::sleep(PULL_BACKOFF).await;
                    }
                }
            }
            permit = permits.clone().acquire_owned(), if open == 0 && waiting.load(Ordering::SeqCst) == 0 => {
                // A free slot and no pull open: ask for every free slot.
                let batch = permits.available_permits() + 1;
                drop(permit?);
                if send_pull(&client, &next, &inbox, batch, &options.group).await {
                    open = batch;
                    heard = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep(PULL_BACKOFF), if open == 0 => {
                // Every slot taken: one pull for a single message stays
                // open anyway, so the consumer shows a waiting pull (the
                // router's liveness check) and the next message is here
                // when a slot frees. At most one message waits like that.
                if waiting.load(Ordering::SeqCst) == 0
                    && permits.available_permits() == 0
                    && send_pull(&client, &next, &inbox, 1, &options.group).await
                {
                    open = 1;
                    heard = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep_until(heard + PULL_LOST_AFTER), if open > 0 => {
                if !lost_logged {
                    tracing::warn!(
                        consumer = %options.group,
                        silent_ms = PULL_LOST_AFTER.as_millis() as u64,
                        "pull lost (no message and no heartbeat); pulling again"
                    );
                    lost_logged = true;
                }
                open = 0;
            }
        }
    }

    // Stop pulling first. Unsubscribing ends the open pull; what the server
    // sent before it saw that arrives before the PONG that closes the
    // subscription, and goes back at once for another replica.
    if deliveries.drain().await.is_ok() {
        let context = durable.context.clone();
        let handed_back = tokio::time::timeout(SHUTDOWN_FLUSH, async {
            while let Some(delivery) = deliveries.next().await {
                if matches!(delivery.status, None | Some(StatusCode::OK)) {
                    let message = js::Message {
                        message: delivery,
                        context: context.clone(),
                    };
                    let _ = message.ack_with(js::AckKind::Nak(None)).await;
                }
            }
        })
        .await;
        if handed_back.is_err() {
            tracing::warn!(consumer = %options.group, "the pull's inbox did not close in time");
        }
    }
    if let Some(drain) = options.drain {
        let timer = interrupt.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            timer.cancel();
        });
    }
    while running.join_next().await.is_some() {}
    interrupt.cancel();
    Ok(())
}

/// Sends a pull request for `batch` messages; `false` when none was sent.
async fn send_pull(
    client: &async_nats::Client,
    next: &str,
    inbox: &str,
    batch: usize,
    group: &str,
) -> bool {
    if client.connection_state() != async_nats::connection::State::Connected {
        // A pull sent now would be buffered and sent, stale, after the
        // reconnect.
        tokio::time::sleep(PULL_BACKOFF).await;
        return false;
    }
    match client
        .publish_with_reply(next.to_owned(), inbox.to_owned(), pull_request(batch))
        .await
    {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(consumer = group, error = %err, "cannot send a pull");
            tokio::time::sleep(PULL_BACKOFF).await;
            false
        }
    }
}

/// Where a received message waits for its slot.
struct Waiting {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// Messages waiting for a slot (the consume loop pulls no more while
    /// one does).
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The body of a pull request for `batch` messages.
fn pull_request(batch: usize) -> bytes::Bytes {
    serde_json::json!({
        "batch": batch,
        "expires": PULL_EXPIRES.as_nanos() as u64,
        "idle_heartbeat": PULL_HEARTBEAT.as_nanos() as u64,
    })
    .to_string()
    .into()
}

/// Sets the consumer's `max_ack_pending` from this replica's concurrency
/// ([`max_ack_pending`]). A failure leaves the consumer as it was: logged.
async fn size_consumer(durable: &Durable, concurrency: usize) {
    let mut config = durable.config.clone();
    config.max_ack_pending = max_ack_pending(concurrency);
    if let Err(err) = create_consumer(&durable.context, &durable.stream, config).await {
        tracing::warn!(error = format!("{err:#}"), "cannot set max_ack_pending");
    }
}

async fn handle_one<H, Fut>(
    message: js::Message,
    options: std::sync::Arc<ConsumeOptions>,
    handler: H,
    slots: Waiting,
    shutdown: tokio_util::sync::CancellationToken,
    interrupt: tokio_util::sync::CancellationToken,
) where
    H: Fn(js::Message) -> Fut,
    Fut: std::future::Future<Output = Disposition>,
{
    let acker = message.clone();
    let work = async {
        // The message first, then a slot: a handler taking its slot back
        // after `without_slot` queues ahead of it (the semaphore is fair).
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            permit = slots.permits.clone().acquire_owned() => permit.ok(),
        };
        slots.waiting.fetch_sub(1, Ordering::SeqCst);
        // Never started: handed back below.
        let permit = permit?;
        let slot = Slot {
            semaphore: slots.permits.clone(),
            permit: std::sync::Arc::new(std::sync::Mutex::new(Some(permit))),
        };
        Some(
            SLOT.scope(slot, process(message, &options, handler, &interrupt))
                .await,
        )
    };
    let Some((disposition, span)) = with_progress(work, &acker, options.progress_every).await
    else {
        // Never started: back at once for another replica, not after ack_wait.
        let _ = acker.ack_with(js::AckKind::Nak(None)).await;
        return;
    };
    let kind = match disposition {
        Disposition::Ack => js::AckKind::Ack,
        Disposition::Retry(delay) if delay.is_zero() => js::AckKind::Nak(None),
        Disposition::Retry(delay) => js::AckKind::Nak(Some(delay)),
        Disposition::Reject => js::AckKind::Term,
    };
    // Double ack: the server confirms, so an Ack is known to have landed.
    if let Err(err) = acker.double_ack_with(kind).await {
        telemetry::spans::record_error(&span, "ack_failed", &err.to_string());
        tracing::warn!(parent: &span, error = %err, "ack failed; the message will be redelivered");
    }
}

/// Runs the handler inside the message's `process` span; interrupted when
/// the drain period is over.
async fn process<H, Fut>(
    message: js::Message,
    options: &ConsumeOptions,
    handler: H,
    interrupt: &tokio_util::sync::CancellationToken,
) -> (Disposition, tracing::Span)
where
    H: Fn(js::Message) -> Fut,
    Fut: std::future::Future<Output = Disposition>,
{
    let delivery_count = message
        .info()
        .map(|i| i.delivered.max(1) as u64)
        .unwrap_or(1);
    let span = telemetry::messaging::process_span(
        &telemetry::messaging::Delivery {
            subject: message.subject.as_str(),
            headers: message.headers.as_ref(),
            consumer_group: &options.group,
            delivery_count,
        },
        options.context_mode,
    );
    let handled = handler(message).instrument(span.clone());
    let disposition = tokio::select! {
        disposition = handled => disposition,
        _ = interrupt.cancelled() => {
            tracing::warn!(parent: &span, "shutdown grace period over; handing the message back");
            telemetry::spans::record_error(&span, "interrupted", "interrupted by shutdown");
            Disposition::Retry(Duration::ZERO)
        }
    };
    (disposition, span)
}

/// Runs `work`, sending an in-progress ack for `message` every `every`.
async fn with_progress<F: std::future::Future>(
    work: F,
    message: &js::Message,
    every: Option<Duration>,
) -> F::Output {
    let Some(every) = every else {
        return work.await;
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tick.tick() => {
                if let Err(err) = message.ack_with(js::AckKind::Progress).await {
                    tracing::warn!(error = %err, "in-progress ack failed");
                }
            }
        }
    }
}
