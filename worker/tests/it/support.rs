//! Helpers shared by the worker's tests.

use std::time::Duration;

use serde_json::Value;
use testkit::otlp::CollectedSpan;
use testkit::stack::{Component, Stack};

/// A stack with all three services, `extra` environment applied to each.
pub async fn stack_with(extra: &[(&str, &str)]) -> Stack {
    let mut stack = Stack::new().await;
    for (key, value) in extra {
        stack
            .extra_env
            .insert((*key).to_owned(), (*value).to_owned());
    }
    for component in [Component::Gateway, Component::Router, Component::Worker] {
        stack.start(component).await;
    }
    stack
}

/// Submits a run of `steps` and waits for it to end.
pub async fn run_to_end(stack: &Stack, steps: Value) -> (String, String, Value) {
    let accepted = stack
        .submit_ok(&serde_json::json!({"flow_id": "worker-test", "steps": steps}))
        .await;
    let run_id = accepted["run_id"].as_str().expect("run_id").to_owned();
    let trace_id = accepted["trace_id"].as_str().expect("trace_id").to_owned();
    let run = stack.wait_terminal(&run_id, Duration::from_secs(30)).await;
    (run_id, trace_id, run)
}

/// All spans received so far with this name and `run.id`.
pub fn spans_named(stack: &Stack, name: &str, run_id: &str) -> Vec<CollectedSpan> {
    stack
        .otlp
        .spans()
        .into_iter()
        .filter(|s| s.name == name && s.attr("run.id").is_none_or(|r| r == run_id))
        .collect()
}

/// A worker process next to the stack's own, on `admin_port`, with `env`
/// applied over the stack's worker environment (`None` removes a variable,
/// so the worker's default applies). Ready when this returns.
pub async fn spawn_worker(
    stack: &Stack,
    admin_port: u16,
    env: &[(&str, Option<&str>)],
) -> testkit::service::ServiceProcess {
    let mut vars = stack.env(Component::Worker);
    vars.insert(
        "WORKER_ADMIN_ADDR".to_owned(),
        format!("127.0.0.1:{admin_port}"),
    );
    for (key, value) in env {
        match value {
            Some(value) => vars.insert((*key).to_owned(), (*value).to_owned()),
            None => vars.remove(*key),
        };
    }
    let mut worker = testkit::service::ServiceProcess::spawn("worker", &vars);
    worker.wait_ready(admin_port).await;
    worker
}

/// A TCP proxy in front of the test's nats-server that cuts the connection
/// carrying the first acknowledgement (`+ACK`) of a work message, before the
/// server sees it. Everything else, and every later connection, passes. It
/// puts a lost ack exactly after the worker's final report was stored.
pub struct AckCutter {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl AckCutter {
    pub async fn start(upstream: u16) -> Self {
        let port = testkit::free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy port");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(cut_first_work_ack(client, upstream, flag.clone()));
            }
        });
        Self { port, cut, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the ack was cut already.
    pub fn has_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for AckCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn cut_first_work_ack(
    client: tokio::net::TcpStream,
    upstream: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut window: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !cut.load(Ordering::SeqCst) {
            window.extend_from_slice(&buf[..n]);
            if holds_work_ack(&window) {
                // Dropped with the connection: the server never sees it.
                cut.store(true, Ordering::SeqCst);
                break;
            }
            let keep = window.len().saturating_sub(4096);
            window.drain(..keep);
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    down.abort();
}

/// Whether `bytes` hold `PUB $JS.ACK.BEAMLINE_WORK.… <len>\r\n+ACK`.
fn holds_work_ack(bytes: &[u8]) -> bool {
    const SUBJECT: &[u8] = b"$JS.ACK.BEAMLINE_WORK.";
    let mut from = 0;
    while let Some(at) = find(&bytes[from..], SUBJECT) {
        let start = from + at;
        if let Some(eol) = find(&bytes[start..], b"\r\n")
            && bytes[start + eol + 2..].starts_with(b"+ACK")
        {
            return true;
        }
        from = start + SUBJECT.len();
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The work consumer's view of provider `default`: (delivered, ack pending).
pub async fn work_consumer(stack: &Stack) -> (u64, usize) {
    let client = async_nats::connect(stack.nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("BEAMLINE_WORK").await.expect("work stream");
    let info = stream
        .consumer_info("worker-default")
        .await
        .expect("consumer info");
    (info.delivered.consumer_sequence, info.num_ack_pending)
}
