//! Test support shared by the services' integration tests: real parts on
//! loopback, never mocks.
//!
//! Layout:
//! - [`nats`]: a `nats-server -js` of the test's own, on a free port, that can
//!   be stopped and restarted on the same port and store.
//! - [`otlp`]: an OTLP/gRPC trace receiver collecting the spans it is sent.
//! - [`proxy`]: a loopback TCP proxy that can swallow traffic (a partition).
//! - [`service`]: a service binary as a child process, stdout captured.
//! - [`stack`]: NATS + OTLP receiver + any of gateway/router/worker, with
//!   typed helpers for the API calls tests make.

pub mod nats;
pub mod otlp;
pub mod proxy;
pub mod service;
pub mod stack;

use std::time::Duration;

/// A port that was free a moment ago on 127.0.0.1.
///
/// Picked below Linux's ephemeral range (32768+): a port from `bind(0)`
/// comes from that range, where the many outbound connections of a test run
/// take ports too, and a child process could then find it taken.
pub fn free_port() -> u16 {
    for _ in 0..1_000 {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in 20000..32000")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Whether `TEST_LOG` asks for the children's output on the test's stderr.
pub fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some_and(|v| !v.is_empty() && v != "0")
}
