//! A real `nats-server` with JetStream, owned by one test.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The nats-server binary: `NATS_SERVER_BIN`, else on PATH, else /usr/sbin.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    if let Some(path) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    }) {
        return path;
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// How to run one server beyond the defaults (`-js` on a free loopback port
/// with a fresh store).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// nats-server configuration text (an `authorization { … }` or `tls { … }`
    /// block, `include` lines…), written to a file passed with `-c`.
    pub config: String,
    /// Environment of the server process: the configuration may refer to
    /// `$VARIABLES` (passwords).
    pub env: Vec<(String, String)>,
    /// More command-line arguments (cluster flags, a server name).
    pub args: Vec<String>,
    /// Write the server's log (with `-DV` off: errors and permission
    /// violations) to a file [`NatsServer::log`] reads.
    pub log: bool,
}

pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    options: ServerOptions,
    /// Holds the configuration and the log file.
    files: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh JetStream store.
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// Starts a server with `options` (configuration, environment, arguments).
    pub async fn start_with(options: ServerOptions) -> Self {
        Self::start_on(crate::free_port(), options).await
    }

    async fn start_on(port: u16, options: ServerOptions) -> Self {
        let mut server = Self {
            port,
            store: tempfile::tempdir().expect("temp dir for JetStream"),
            options,
            files: tempfile::tempdir().expect("temp dir for nats-server files"),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server logged so far (empty unless `ServerOptions::log`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.files.path().join("nats.log")).unwrap_or_default()
    }

    /// Whether the process is running (not stopped by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn(&mut self) {
        let bin = binary();
        let inherit = || {
            if crate::test_log() {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let mut command = Command::new(&bin);
        if !self.options.config.is_empty() {
            let conf = self.files.path().join("nats.conf");
            std::fs::write(&conf, &self.options.config).expect("write nats-server config");
            command.arg("-c").arg(conf);
        }
        if self.options.log {
            command.arg("-l").arg(self.files.path().join("nats.log"));
        }
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.options.args)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdout(inherit())
            .stderr(inherit())
            .kill_on_drop(true);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); install nats-server or set NATS_SERVER_BIN",
                bin.display()
            )
        });
        self.child = Some(child);
        let port = self.port;
        crate::eventually(
            Duration::from_secs(10),
            "nats-server to listen",
            || async move { crate::port_open(port).await.then_some(()) },
        )
        .await;
    }

    /// Kills the server (clients see the connection drop).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is
    /// answered, as with a stalled broker or a network partition.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }
}

/// A JetStream cluster of nats-server processes on loopback: each node has
/// its own client port, cluster (route) port and store, and routes to all
/// the others. Node `i` is named `n<i+1>` (the name JetStream reports as a
/// stream's leader).
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes (3 for a quorum that survives one loss) and waits
    /// until JetStream has a meta leader.
    pub async fn start(size: usize) -> Self {
        Self::start_with(size, ServerOptions::default()).await
    }

    /// Like [`start`](Self::start), every node with `options` added.
    pub async fn start_with(size: usize, options: ServerOptions) -> Self {
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| (crate::free_port(), crate::free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(size);
        for (i, (port, route)) in ports.iter().enumerate() {
            let mut node_options = options.clone();
            node_options.args.extend([
                "--server_name".to_owned(),
                format!("n{}", i + 1),
                "--cluster_name".to_owned(),
                "beamline-test".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".to_owned(),
                routes.clone(),
            ]);
            nodes.push(NatsServer::start_on(*port, node_options).await);
        }
        let cluster = Self { nodes };
        cluster.wait_for_meta_leader().await;
        cluster
    }

    /// Every node's URL, comma-separated: a `NATS_URL`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The addresses of every node but `skip` (a client that must not land on
    /// a node the test is about to kill).
    pub fn addresses_except(&self, skip: usize) -> Vec<async_nats::ServerAddr> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .filter_map(|(_, n)| n.url().parse().ok())
            .collect()
    }

    /// The node JetStream names `name` (`n1`, `n2`…).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n')?
            .parse::<usize>()
            .ok()?
            .checked_sub(1)
            .filter(|i| *i < self.nodes.len())
    }

    /// The server name of `stream`'s current leader, from
    /// `$JS.API.STREAM.INFO.<stream>` (its `cluster.leader`), asked of any
    /// running node.
    pub async fn stream_leader(&self, stream: &str) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok(client) = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(node.url())
                .await
            else {
                continue;
            };
            let js = async_nats::jetstream::new(client);
            if let Ok(mut handle) = js.get_stream(stream).await
                && let Ok(info) = handle.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            {
                return Some(leader);
            }
        }
        None
    }

    /// Waits until the cluster has elected a JetStream meta leader and knows
    /// all its peers: a probe stream with one replica per node can be placed
    /// (a meta leader alone may still answer "no suitable peers").
    pub async fn wait_for_meta_leader(&self) {
        let url = self.urls();
        let replicas = self.nodes.len();
        crate::eventually(
            Duration::from_secs(30),
            "a JetStream cluster that places R{replicas} streams",
            || {
                let url = url.clone();
                async move {
                    let servers: Vec<async_nats::ServerAddr> =
                        url.split(',').filter_map(|u| u.parse().ok()).collect();
                    let client = async_nats::ConnectOptions::new()
                        .connection_timeout(Duration::from_secs(2))
                        .connect(servers)
                        .await
                        .ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.create_stream(async_nats::jetstream::stream::Config {
                        name: "TESTKIT_PROBE".to_owned(),
                        subjects: vec!["testkit.probe".to_owned()],
                        storage: async_nats::jetstream::stream::StorageType::Memory,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                    js.delete_stream("TESTKIT_PROBE").await.ok()?;
                    Some(())
                }
            },
        )
        .await;
    }
}
