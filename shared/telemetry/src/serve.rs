//! The HTTP listener loop every port uses (the admin ports and the gateway
//! API): HTTP/1.1 with a header-read timeout that also closes idle
//! keep-alive connections, a cap on open connections, and a shutdown that
//! drains for a bounded time.
//!
//! `axum::serve` has none of these: a client that opens connections and
//! sends nothing (or one header byte a minute) kept them open for good, and
//! graceful shutdown waited for them without end. It lives here beside the
//! admin server, which was its first user.
//!
//! HTTP/2 is not served: hyper has no idle timeout for an HTTP/2 connection
//! that answers pings, and neither the API nor a Prometheus scrape needs it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use crate::env::{self, EnvError};

/// Limits of one listening port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A connection that does not deliver a request's headers within this
    /// long — a new one, or one idle after a response — is closed.
    pub header_timeout: Duration,
    /// Connections served at once; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// After shutdown, how long in-flight requests may finish before the
    /// remaining connections are dropped.
    pub drain: Duration,
}

impl Limits {
    /// `HTTP_HEADER_TIMEOUT_MS` (default 10 000), `HTTP_MAX_CONNECTIONS`
    /// (default 1 024) and `HTTP_DRAIN_SECS` (default 10), for every port.
    pub fn from_env() -> Result<Self, EnvError> {
        let header_timeout_ms: u64 = env::parse_or("HTTP_HEADER_TIMEOUT_MS", 10_000)?;
        let max_connections: usize = env::parse_or("HTTP_MAX_CONNECTIONS", 1_024)?;
        let drain_secs: u64 = env::parse_or("HTTP_DRAIN_SECS", 10)?;
        if header_timeout_ms == 0 {
            return Err(EnvError::new(
                "HTTP_HEADER_TIMEOUT_MS",
                "0",
                "must be at least 1",
            ));
        }
        if max_connections == 0 {
            return Err(EnvError::new(
                "HTTP_MAX_CONNECTIONS",
                "0",
                "must be at least 1",
            ));
        }
        Ok(Self {
            header_timeout: Duration::from_millis(header_timeout_ms),
            max_connections,
            drain: Duration::from_secs(drain_secs),
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1_024,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish for at most `limits.drain`, and
/// returns. Handlers can extract `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Dropping the set aborts what is left: the drain period is the limit.
    let mut connections = tokio::task::JoinSet::new();
    let closing = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |request: axum::http::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(remote));
                request
            },
        ));
        let closing = closing.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = closing.cancelled() => {
                    // Finish the request in flight, then close; idle
                    // connections close at once.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    closing.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.drain, drained).await.is_err() {
        tracing::warn!(
            drain_secs = limits.drain.as_secs(),
            "requests still in flight after the drain period; closing their connections"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    fn limits(header_ms: u64, max_connections: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(header_ms),
            max_connections,
            drain: Duration::from_millis(500),
        }
    }

    /// Serves a router with `/` (fast) and `/slow` (30 s) on a free port.
    async fn start(
        limits: Limits,
    ) -> (
        SocketAddr,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(serve(
            listener,
            router,
            limits,
            stop.clone().cancelled_owned(),
        ));
        (addr, stop, serving)
    }

    /// Reads until the server closes the connection; how long that took.
    async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut buf = [0_u8; 1024];
        let read = tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        read.ok().map(|()| start.elapsed())
    }

    #[tokio::test]
    async fn silent_connections_are_closed_after_the_header_timeout() {
        let (addr, _stop, _serving) = start(limits(300, 1_024)).await;
        let mut silent = Vec::new();
        for _ in 0..50 {
            silent.push(TcpStream::connect(addr).await.expect("connect"));
        }
        for stream in &mut silent {
            assert!(
                closed_within(stream, Duration::from_secs(5))
                    .await
                    .is_some(),
                "a connection that sent nothing stayed open"
            );
        }
    }

    #[tokio::test]
    async fn headers_sent_a_byte_at_a_time_do_not_hold_a_connection() {
        let (addr, _stop, _serving) = start(limits(300, 1_024)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let start = Instant::now();
        // 40 bytes at one per 100 ms would take 4 s; the server hangs up first.
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaa".iter() {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        assert!(
            closed_within(&mut stream, Duration::from_secs(2))
                .await
                .is_some(),
            "slow headers kept the connection"
        );
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let (addr, _stop, _serving) = start(limits(300, 1_024)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut buf = vec![0_u8; 1024];
        let n = stream.read(&mut buf).await.expect("response");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        assert!(
            closed_within(&mut stream, Duration::from_secs(5))
                .await
                .is_some(),
            "an idle keep-alive connection stayed open"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_one() {
        let (addr, _stop, _serving) = start(limits(1_000, 2)).await;
        let _a = TcpStream::connect(addr).await.expect("connect");
        let _b = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        let body = reqwest::get(format!("http://{addr}/"))
            .await
            .expect("answered once a slot is free")
            .text()
            .await
            .expect("body");
        assert_eq!(body, "ok");
        // Served only after the two silent connections timed out.
        assert!(
            start.elapsed() >= Duration::from_millis(700),
            "served at once despite the cap: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn shutdown_drains_for_a_bounded_time() {
        let (addr, stop, serving) = start(limits(10_000, 1_024)).await;
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let slow = tokio::spawn(reqwest::get(format!("http://{addr}/slow")));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("serve returns within the drain period")
            .expect("join")
            .expect("serve");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        slow.abort();
    }
}
