//! A service binary (gateway, router, worker) as a child process of the test.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The path of a workspace binary. `cargo test --workspace` builds every
/// member's binaries before any test runs; they sit next to the `deps/`
/// folder that holds the test executable.
/// A tool built in the same profile (e.g. `target/debug/faults`) finds them
/// beside itself; `BEAMLINE_BIN_DIR` overrides both.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("BEAMLINE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            let parent = exe.parent().expect("executable directory");
            if parent.file_name().is_some_and(|n| n == "deps") {
                parent.parent().expect("target directory").to_path_buf()
            } else {
                parent.to_path_buf()
            }
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`, or run the \
         tests with `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A running service with its output captured line by line.
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts binary `name` with `env` added to the test's environment.
    pub fn spawn(name: &str, env: &HashMap<String, String>) -> Self {
        let mut command = Command::new(binary(name));
        command
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(collect(
                name.to_owned(),
                BufReader::new(out),
                stdout.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(collect(
                name.to_owned(),
                BufReader::new(err),
                stderr.clone(),
            ));
        }
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    /// Lines written to stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    /// Lines written to stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until `GET http://127.0.0.1:<admin_port>/health/ready` answers 200.
    pub async fn wait_ready(&mut self, admin_port: u16) {
        let url = format!("http://127.0.0.1:{admin_port}/health/ready");
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before it was ready; stderr: {:?}; stdout: {:?}",
                    self.name,
                    self.stderr(),
                    self.stdout()
                );
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready on {url} after 20 s; stdout: {:?}",
                self.name,
                self.stdout()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM (as an orchestrator would).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Kills the process outright (SIGKILL): no draining, no flushing.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

async fn collect<R>(name: String, mut reader: BufReader<R>, into: Arc<Mutex<Vec<String>>>)
where
    R: tokio::io::AsyncRead + Unpin,
{
    let show = crate::test_log();
    let mut line = String::new();
    while let Ok(n) = reader.read_line(&mut line).await {
        if n == 0 {
            break;
        }
        let text = line.trim_end().to_owned();
        if show {
            eprintln!("[{name}] {text}");
        }
        into.lock().expect("output lock").push(text);
        line.clear();
    }
}
