//! A TCP proxy on loopback that can swallow traffic: a network partition
//! between one service and its peer, with the peer itself still healthy.
//!
//! While [`TcpProxy::blackhole`] is on, bytes from both sides are read and
//! dropped, so a client's writes "succeed" and never arrive (unlike a
//! SIGSTOPped server, whose socket keeps them and reads them when resumed).
//! [`TcpProxy::restore`] resets the connections that lost bytes (their byte
//! streams are broken) and forwards new ones again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpProxy {
    pub port: u16,
    blackhole: Arc<AtomicBool>,
    /// Bumped by `restore`: connections of an older generation close.
    generation: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port and forwards every connection to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let accept = tokio::spawn({
            let blackhole = blackhole.clone();
            let generation = generation.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    tokio::spawn(pump_both(
                        client,
                        server,
                        blackhole.clone(),
                        generation.subscribe(),
                    ));
                }
            }
        });
        Self {
            port,
            blackhole,
            generation,
            accept,
        }
    }

    /// `nats://` URL of the proxy.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every byte from now on, in both directions.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Closes the current connections and forwards again.
    pub fn restore(&self) {
        self.generation.send_modify(|g| *g += 1);
        self.blackhole.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn pump_both(
    client: TcpStream,
    server: TcpStream,
    blackhole: Arc<AtomicBool>,
    mut generation: watch::Receiver<u64>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, blackhole.clone());
    let down = pump(server_read, client_write, blackhole);
    generation.borrow_and_update();
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = generation.changed() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
