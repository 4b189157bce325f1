//! `Stack`: a nats-server, an OTLP receiver and any of the three services as
//! processes on free ports, with typed helpers for the calls tests make.

use std::collections::HashMap;
use std::time::Duration;

use crate::nats::NatsServer;
use crate::otlp::OtlpReceiver;
use crate::service::ServiceProcess;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;

pub const DEMO_KEY: &str = "demo-key";
pub const ACME_KEY: &str = "acme-key-1";
/// `ROUTER_GRPC_TOKEN` of the router the stack starts (`authorization: Bearer …`).
pub const ROUTER_GRPC_TOKEN: &str = "test-router-grpc-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Gateway,
    Router,
    Worker,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Router => "router",
            Self::Worker => "worker",
        }
    }
}

pub struct Ports {
    pub api: u16,
    pub gateway_admin: u16,
    pub router_admin: u16,
    pub router_grpc: u16,
    pub worker_admin: u16,
}

pub struct Stack {
    pub nats: NatsServer,
    pub otlp: OtlpReceiver,
    pub ports: Ports,
    pub gateway: Option<ServiceProcess>,
    pub router: Option<ServiceProcess>,
    pub worker: Option<ServiceProcess>,
    /// Extra environment for every service.
    pub extra_env: HashMap<String, String>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Stack {
    /// NATS and the OTLP receiver, no services yet.
    pub async fn new() -> Self {
        Self {
            nats: NatsServer::start().await,
            otlp: OtlpReceiver::start().await,
            ports: Ports {
                api: crate::free_port(),
                gateway_admin: crate::free_port(),
                router_admin: crate::free_port(),
                router_grpc: crate::free_port(),
                worker_admin: crate::free_port(),
            },
            gateway: None,
            router: None,
            worker: None,
            extra_env: HashMap::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            http: reqwest::Client::new(),
        }
    }

    /// All three services, ready.
    pub async fn full() -> Self {
        let mut stack = Self::new().await;
        for component in [Component::Gateway, Component::Router, Component::Worker] {
            stack.start(component).await;
        }
        stack
    }

    pub fn database_path(&self) -> std::path::PathBuf {
        self.dir.path().join("gateway.db")
    }

    /// The worker's `sql` step database (SQLite).
    pub fn worker_database_path(&self) -> std::path::PathBuf {
        self.dir.path().join("worker.db")
    }

    /// The worker's `fs` sandbox.
    pub fn sandbox_path(&self) -> std::path::PathBuf {
        self.dir.path().join("sandbox")
    }

    pub fn env(&self, component: Component) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            ("NATS_URL", self.nats.url()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.otlp.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let specific: Vec<(&str, String)> = match component {
            Component::Gateway => vec![
                (
                    "GATEWAY_LISTEN_ADDR",
                    format!("127.0.0.1:{}", self.ports.api),
                ),
                (
                    "GATEWAY_ADMIN_ADDR",
                    format!("127.0.0.1:{}", self.ports.gateway_admin),
                ),
                (
                    "DATABASE_URL",
                    format!("sqlite://{}?mode=rwc", self.database_path().display()),
                ),
                (
                    "GATEWAY_API_KEYS",
                    format!("demo:{DEMO_KEY},acme:{ACME_KEY}"),
                ),
                ("GATEWAY_PUBLISH_TIMEOUT_MS", "1500".to_owned()),
            ],
            Component::Router => vec![
                (
                    "ROUTER_ADMIN_ADDR",
                    format!("127.0.0.1:{}", self.ports.router_admin),
                ),
                (
                    "ROUTER_GRPC_ADDR",
                    format!("127.0.0.1:{}", self.ports.router_grpc),
                ),
                ("ROUTER_GRPC_TOKEN", ROUTER_GRPC_TOKEN.to_owned()),
            ],
            Component::Worker => vec![
                (
                    "WORKER_ADMIN_ADDR",
                    format!("127.0.0.1:{}", self.ports.worker_admin),
                ),
                ("WORKER_ACK_WAIT_SECS", "2".to_owned()),
                ("WORKER_FS_ROOT", self.sandbox_path().display().to_string()),
                (
                    "WORKER_DATABASE_URL",
                    format!(
                        "sqlite://{}?mode=rwc",
                        self.worker_database_path().display()
                    ),
                ),
            ],
        };
        env.extend(specific.into_iter().map(|(k, v)| (k.to_owned(), v)));
        env.extend(self.extra_env.clone());
        env
    }

    pub fn admin_port(&self, component: Component) -> u16 {
        match component {
            Component::Gateway => self.ports.gateway_admin,
            Component::Router => self.ports.router_admin,
            Component::Worker => self.ports.worker_admin,
        }
    }

    fn slot(&mut self, component: Component) -> &mut Option<ServiceProcess> {
        match component {
            Component::Gateway => &mut self.gateway,
            Component::Router => &mut self.router,
            Component::Worker => &mut self.worker,
        }
    }

    /// Starts `component` and waits until it is ready.
    pub async fn start(&mut self, component: Component) {
        let env = self.env(component);
        let port = self.admin_port(component);
        let mut process = ServiceProcess::spawn(component.name(), &env);
        process.wait_ready(port).await;
        *self.slot(component) = Some(process);
    }

    /// Kills `component` with SIGKILL and forgets it.
    pub async fn kill(&mut self, component: Component) {
        if let Some(mut process) = self.slot(component).take() {
            process.kill().await;
        }
    }

    pub fn process(&self, component: Component) -> &ServiceProcess {
        match component {
            Component::Gateway => self.gateway.as_ref(),
            Component::Router => self.router.as_ref(),
            Component::Worker => self.worker.as_ref(),
        }
        .expect("component not started")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.api)
    }

    /// `POST /v1/runs` as tenant `demo` with a JSON body.
    pub fn submit(&self, body: &Value) -> RequestBuilder {
        self.http
            .post(self.url("/v1/runs"))
            .bearer_auth(DEMO_KEY)
            .json(body)
    }

    /// `GET /v1/runs/{id}` with `key`.
    pub async fn get_run_as(&self, key: &str, run_id: &str) -> Response {
        self.http
            .get(self.url(&format!("/v1/runs/{run_id}")))
            .bearer_auth(key)
            .send()
            .await
            .expect("GET run")
    }

    /// `POST /v1/runs/{id}/steps/{step}/{approve|reject}` with `key`.
    pub async fn decide(
        &self,
        key: &str,
        run_id: &str,
        step_id: &str,
        verdict: &str,
        comment: Option<&str>,
    ) -> Response {
        let request = self
            .http
            .post(self.url(&format!("/v1/runs/{run_id}/steps/{step_id}/{verdict}")))
            .bearer_auth(key);
        let request = match comment {
            Some(comment) => request.json(&serde_json::json!({"comment": comment})),
            None => request,
        };
        request.send().await.expect("POST decision")
    }

    /// Submits `body` and returns the 202 answer's JSON.
    pub async fn submit_ok(&self, body: &Value) -> Value {
        let response = self.submit(body).send().await.expect("POST run");
        let status = response.status();
        let json: Value = response.json().await.expect("JSON body");
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        json
    }

    /// Polls the run until its status is terminal.
    pub async fn wait_terminal(&self, run_id: &str, timeout: Duration) -> Value {
        self.wait_status(run_id, timeout, |s| {
            matches!(s, "succeeded" | "failed" | "rejected" | "timed_out")
        })
        .await
    }

    pub async fn wait_status(
        &self,
        run_id: &str,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let run: Value = self
                .get_run_as(DEMO_KEY, run_id)
                .await
                .json()
                .await
                .expect("run JSON");
            if run["status"].as_str().is_some_and(&accept) {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} did not reach the awaited status in {timeout:?}: {run}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The body of a component's `/metrics`.
    pub async fn scrape(&self, component: Component) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port(component));
        let response = self.http.get(url).send().await.expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("metrics text")
    }
}

/// The sample run from the README.
pub fn sample_run() -> Value {
    serde_json::json!({
        "flow_id": "hello",
        "steps": [
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "delay", "input": {"ms": 50}}
        ]
    })
}
