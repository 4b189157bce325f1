//! One fault per scenario, on a fresh stack: NATS, gateway, router and one or
//! two workers as processes on free ports.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::service::ServiceProcess;
use testkit::stack::{Component, DEMO_KEY, Stack};

use crate::counter::Counter;
use crate::report::Row;
use crate::traffic::{self, Plan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// kill -9 of the only worker, restarted 2 s later.
    WorkerKill,
    /// Two workers; kill -9 of one, not restarted.
    WorkerReplicaKill,
    /// Two workers; SIGTERM to one (a rolling restart), not restarted.
    WorkerReplicaTerm,
    /// kill -9 of the router, restarted 2 s later.
    RouterKill,
    /// kill -9 of the gateway, restarted 2 s later (same store).
    GatewayKill,
    /// kill -9 of nats-server, restarted 3 s later on the same store.
    BrokerKill,
    /// nats-server frozen (SIGSTOP) for 7 s, then SIGCONT.
    BrokerStall,
}

impl Scenario {
    pub const ALL: [Self; 7] = [
        Self::WorkerKill,
        Self::WorkerReplicaKill,
        Self::WorkerReplicaTerm,
        Self::RouterKill,
        Self::GatewayKill,
        Self::BrokerKill,
        Self::BrokerStall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::WorkerKill => "worker-kill",
            Self::WorkerReplicaKill => "worker-replica-kill",
            Self::WorkerReplicaTerm => "worker-replica-term",
            Self::RouterKill => "router-kill",
            Self::GatewayKill => "gateway-kill",
            Self::BrokerKill => "broker-kill",
            Self::BrokerStall => "broker-stall",
        }
    }

    fn replicas(self) -> bool {
        matches!(self, Self::WorkerReplicaKill | Self::WorkerReplicaTerm)
    }
}

/// Runs `scenario`: traffic for `plan.duration`, the fault at `fault_at`,
/// then up to `drain` for the accepted runs to finish.
pub async fn run(
    scenario: Scenario,
    plan: &Plan,
    fault_at: Duration,
    drain: Duration,
    store: &str,
) -> anyhow::Result<Row> {
    let counter = Counter::default();
    let counter_port = counter.serve().await?;
    let mut stack = Stack::new().await;
    stack.extra_env.extend(
        [
            ("WORKER_HTTP_ALLOW", format!("127.0.0.1:{counter_port}")),
            ("GATEWAY_RATE_LIMIT_RPS", "10000".to_owned()),
            ("GATEWAY_RATE_LIMIT_BURST", "10000".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
            ("WORKER_CONCURRENCY", "32".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    if store != "sqlite" {
        let url = fresh_postgres_database(store, scenario.name()).await?;
        stack.extra_env.insert("DATABASE_URL".to_owned(), url);
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    let second_worker = if scenario.replicas() {
        Some(start_second_worker(&stack).await)
    } else {
        None
    };

    let api = stack.url("");
    let started = Instant::now();
    let sending = tokio::spawn({
        let api = api.clone();
        let plan = Plan {
            rate: plan.rate,
            duration: plan.duration,
        };
        async move { traffic::send(api, DEMO_KEY, counter_port, &plan).await }
    });
    tokio::time::sleep(fault_at).await;
    let fault = Instant::now();
    inject(scenario, &mut stack).await;
    let healed = Instant::now();
    let answers = sending.await?;
    let traffic_end = Instant::now();

    // Wait for every accepted run to end, at most `drain`.
    let accepted: Vec<String> = {
        let mut ids: Vec<String> = answers
            .iter()
            .filter_map(|a| match &a.outcome {
                traffic::Outcome::Accepted(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let statuses = wait_terminal(&stack, &accepted, drain).await;
    let row = crate::report::Row::build(
        scenario.name(),
        &answers,
        &statuses,
        &counter.snapshot(),
        crate::report::Times {
            started,
            fault,
            healed,
            traffic_end,
        },
    );
    if let Some(mut worker) = second_worker {
        worker.kill().await;
    }
    Ok(row)
}

async fn inject(scenario: Scenario, stack: &mut Stack) {
    match scenario {
        Scenario::WorkerKill | Scenario::RouterKill | Scenario::GatewayKill => {
            let component = match scenario {
                Scenario::WorkerKill => Component::Worker,
                Scenario::RouterKill => Component::Router,
                _ => Component::Gateway,
            };
            stack.kill(component).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            stack.start(component).await;
        }
        Scenario::WorkerReplicaKill => stack.kill(Component::Worker).await,
        Scenario::WorkerReplicaTerm => {
            if let Some(worker) = stack.worker.as_ref() {
                worker.terminate();
            }
            if let Some(mut worker) = stack.worker.take() {
                let _ = worker.wait_exit(Duration::from_secs(60)).await;
            }
        }
        Scenario::BrokerKill => {
            stack.nats.stop().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            stack.nats.restart().await;
        }
        Scenario::BrokerStall => {
            stack.nats.pause();
            tokio::time::sleep(Duration::from_secs(7)).await;
            stack.nats.resume();
        }
    }
}

/// A second worker replica beside the stack's own (same provider, own admin port).
async fn start_second_worker(stack: &Stack) -> ServiceProcess {
    let port = testkit::free_port();
    let mut env: HashMap<String, String> = stack.env(Component::Worker);
    env.insert("WORKER_ADMIN_ADDR".to_owned(), format!("127.0.0.1:{port}"));
    let mut worker = ServiceProcess::spawn("worker", &env);
    worker.wait_ready(port).await;
    worker
}

/// Polls every accepted run until it is terminal or `drain` is over; the
/// last status seen per run (`missing` for a 404).
async fn wait_terminal(
    stack: &Stack,
    run_ids: &[String],
    drain: Duration,
) -> HashMap<String, String> {
    let deadline = Instant::now() + drain;
    let mut statuses: HashMap<String, String> = HashMap::new();
    loop {
        let pending: Vec<&String> = run_ids
            .iter()
            .filter(|id| !statuses.get(*id).is_some_and(|s| terminal(s)))
            .collect();
        if pending.is_empty() || Instant::now() >= deadline {
            return statuses;
        }
        for chunk in pending.chunks(16) {
            let answers = futures::future::join_all(chunk.iter().map(|id| async move {
                let response = stack.get_run_as(DEMO_KEY, id).await;
                let status = if response.status() == reqwest::StatusCode::NOT_FOUND {
                    "missing".to_owned()
                } else {
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    body["status"].as_str().unwrap_or("?").to_owned()
                };
                ((*id).clone(), status)
            }))
            .await;
            statuses.extend(answers);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn terminal(status: &str) -> bool {
    matches!(
        status,
        "succeeded" | "failed" | "rejected" | "timed_out" | "cancelled"
    )
}

/// Creates database `faults_<scenario>_<random>` next to `admin_url`'s and returns its URL.
async fn fresh_postgres_database(admin_url: &str, scenario: &str) -> anyhow::Result<String> {
    use sqlx::Connection as _;
    let name = format!(
        "faults_{}_{:08x}",
        scenario.replace('-', "_"),
        fastrand::u32(..)
    );
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    // `name` is ours: a fixed prefix, the scenario name and hex digits.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(admin_url);
    Ok(format!("{base}/{name}"))
}
