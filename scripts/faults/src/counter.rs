//! The upstream every run's first step calls: `POST /hit/{tag}` counts one
//! execution of the run that carries `tag`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;

#[derive(Clone, Default)]
pub struct Counter {
    hits: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

impl Counter {
    /// Serves on a free loopback port; returns the port.
    pub async fn serve(&self) -> anyhow::Result<u16> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let app = Router::new()
            .route("/hit/{tag}", post(hit))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(port)
    }

    /// Executions per tag, and every execution's time.
    pub fn snapshot(&self) -> HashMap<String, Vec<Instant>> {
        self.hits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn hit(State(counter): State<Counter>, Path(tag): Path<String>) -> &'static str {
    counter
        .hits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(tag)
        .or_default()
        .push(Instant::now());
    "counted"
}
