//! `loadgen`: demo traffic for the Beamline gateway. It sends a scenario's
//! requests at a rate for a duration (or until SIGINT/SIGTERM), shows a
//! progress bar, and prints a closing table: requests by status, p50/p95/p99
//! latency, throughput, the final status of sampled runs and the answers to
//! approval calls. It reports whatever the gateway answers; it never retries.
//!
//! Layout:
//! - `args` — flags;
//! - `scenario` — request payloads per scenario, the burst shape;
//! - `stats` — counts, latencies and the table;
//! - `main` — the rate loop, one task per request, run following, progress.

mod args;
mod scenario;
mod stats;

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;

use args::Args;
use scenario::{Follow, Key, Request};
use stats::{Outcome, Stats};

/// How long a followed run is polled before it is reported as `still <status>`.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(60);
/// Polls count against the tenant's rate limit like any request: keep them rare.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

struct Shared {
    args: Args,
    http: reqwest::Client,
    stats: Mutex<Stats>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, key: Key) -> Option<&str> {
        match key {
            Key::Demo => Some(&self.args.api_key),
            Key::SlowTenant => Some(&self.args.slow_api_key),
            Key::Unknown => Some("not-a-tenant-key"),
            Key::None => None,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str, key: Key) -> reqwest::RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{path}", self.args.url));
        match self.key(key) {
            Some(k) => builder.bearer_auth(k),
            None => builder,
        }
    }
}

fn transport_kind(err: &reqwest::Error) -> &'static str {
    if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

fn outcome(result: &Result<reqwest::Response, reqwest::Error>) -> Outcome {
    match result {
        Ok(response) => Outcome::Status(response.status().as_u16()),
        Err(err) => Outcome::Transport(transport_kind(err)),
    }
}

/// Send one request, record it, then follow the run if asked to. The permit
/// bounds requests in flight; it is released before the (long) follow-up.
async fn send(
    shared: Arc<Shared>,
    n: u64,
    request: Request,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let label = request.label();
    let started = Instant::now();
    let (result, key, follow) = match request {
        Request::Submit {
            key,
            body,
            follow,
            idempotency_key,
        } => {
            let mut builder = shared
                .request(reqwest::Method::POST, "/v1/runs", key)
                .json(&body);
            if let Some(k) = idempotency_key {
                builder = builder.header("Idempotency-Key", k);
            }
            let r = builder.send().await;
            (r, key, Some(follow))
        }
        Request::Raw {
            method,
            path,
            key,
            content_type,
            body,
            ..
        } => {
            let r = shared
                .request(method, &path, key)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
                .send()
                .await;
            (r, key, None)
        }
    };
    shared
        .stats()
        .record(label, outcome(&result), started.elapsed());
    drop(permit);

    let (Ok(response), Some(follow)) = (result, follow) else {
        return;
    };
    if !response.status().is_success() {
        return;
    }
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return;
    };
    let Some(run_id) = body["run_id"].as_str().map(str::to_owned) else {
        return;
    };
    match follow {
        Follow::Approval { step_id, approve } => {
            approve_when_waiting(&shared, &run_id, key, &step_id, approve).await;
        }
        Follow::Sampled => {
            let every = shared.args.follow_every;
            if every > 0 && n % every == 0 {
                let status = follow_to_end(&shared, &run_id, key).await;
                shared.stats().record_run(status);
            }
        }
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "rejected" | "timed_out")
}

/// Poll `GET /v1/runs/{id}` until a final status; `still <status>` after the timeout.
async fn follow_to_end(shared: &Shared, run_id: &str, key: Key) -> String {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut last = String::from("unknown");
    while Instant::now() < deadline {
        if let Some(status) = run_status(shared, run_id, key).await {
            if is_final(&status) {
                return status;
            }
            last = status;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    format!("still {last}")
}

async fn run_status(shared: &Shared, run_id: &str, key: Key) -> Option<String> {
    let response = shared
        .request(reqwest::Method::GET, &format!("/v1/runs/{run_id}"), key)
        .send()
        .await
        .ok()?;
    if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
        // Rate limited: wait as told (our own traffic is what filled the bucket).
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(wait.min(10))).await;
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["status"].as_str().map(str::to_owned)
}

/// Wait for the run to reach `awaiting_approval`, then approve or reject the
/// step, and follow the run to its end.
async fn approve_when_waiting(shared: &Shared, run_id: &str, key: Key, step: &str, approve: bool) {
    let action = if approve { "approve" } else { "reject" };
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut status = String::from("unknown");
    while Instant::now() < deadline {
        if let Some(s) = run_status(shared, run_id, key).await {
            status = s;
        }
        if status == "awaiting_approval" || is_final(&status) {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    if status != "awaiting_approval" {
        // Never waited (the step type is not served, or the run failed first):
        // report the status the run ended in instead of an approval call.
        shared.stats().record_run(if is_final(&status) {
            status
        } else {
            format!("still {status}")
        });
        return;
    }
    let result = shared
        .request(
            reqwest::Method::POST,
            &format!("/v1/runs/{run_id}/steps/{step}/{action}"),
            key,
        )
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await;
    shared.stats().record_approval(action, outcome(&result));
    let status = follow_to_end(shared, run_id, key).await;
    shared.stats().record_run(status);
}

/// The table goes to stdout (progress and notes go to stderr).
fn report(table: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{table}");
    let _ = out.flush();
}

/// The progress line: a bar when the duration is known, counters otherwise.
fn progress_line(shared: &Shared, elapsed: Duration, sent: u64) -> String {
    let stats = shared.stats();
    let p95 = stats
        .quantile_ms(0.95)
        .map_or("-".to_owned(), |v| format!("{v:.0}ms"));
    let counters = format!(
        "sent {sent}  answered {}  2xx {}  5xx/errors {}  p95 {p95}",
        stats.total(),
        stats.successes(),
        stats.faults()
    );
    match shared.args.duration {
        Some(total) => {
            let frac = (elapsed.as_secs_f64() / total.as_secs_f64()).clamp(0.0, 1.0);
            let filled = (frac * 30.0).round() as usize;
            format!(
                "[{}{}] {:>4.0}/{:.0}s  {counters}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                elapsed.as_secs_f64(),
                total.as_secs_f64()
            )
        }
        None => format!("{:>6.0}s  {counters}", elapsed.as_secs_f64()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    let shared = Arc::new(Shared {
        args: args.clone(),
        http,
        stats: Mutex::new(Stats::default()),
    });
    let tty = args.progress && std::io::stderr().is_terminal();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut rng = fastrand::Rng::new();
    let mut tasks = tokio::task::JoinSet::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);

    eprintln!(
        "loadgen: scenario {} at {}/s for {} against {}",
        args.scenario.name(),
        args.rate,
        args.duration
            .map_or("ever (Ctrl-C to stop)".to_owned(), |d| format!(
                "{:.0}s",
                d.as_secs_f64()
            )),
        args.url
    );
    let started = Instant::now();
    let mut window_started = started;
    let mut next_send = started;
    let mut next_progress = started + Duration::from_secs(if tty { 0 } else { 10 });
    let mut sent: u64 = 0;
    loop {
        let elapsed = started.elapsed();
        if args.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let now = Instant::now();
        if now >= next_progress && (tty || args.progress) {
            let line = progress_line(&shared, elapsed, sent);
            if tty {
                eprint!("\r{line}\x1b[K");
                let _ = std::io::stderr().flush();
                next_progress = now + Duration::from_millis(200);
            } else {
                eprintln!("loadgen: {line}");
                next_progress = now + Duration::from_secs(10);
            }
        }
        if args.duration.is_none() && window_started.elapsed() >= args.report_every {
            // Continuous mode: print the window's table and start over.
            let stats = std::mem::take(&mut *shared.stats());
            if tty {
                eprintln!();
            }
            report(&stats.table(
                &format!(
                    "loadgen: last {:.0}s",
                    window_started.elapsed().as_secs_f64()
                ),
                window_started.elapsed(),
            ));
            window_started = Instant::now();
        }
        let factor = args.scenario.rate_factor(elapsed);
        if factor == 0.0 {
            next_send = now + Duration::from_millis(100);
        } else if now >= next_send {
            let request = args.scenario.request(sent, &mut rng);
            let permit = permits.clone().acquire_owned().await?;
            let shared = shared.clone();
            let n = sent;
            tasks.spawn(send(shared, n, request, permit));
            sent += 1;
            // Catch up after a stall, but never by more than one second of requests.
            next_send = (next_send + Duration::from_secs_f64(1.0 / (args.rate * factor)))
                .max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
            continue;
        }
        while tasks.try_join_next().is_some() {}
        let wake = next_send.min(now + Duration::from_millis(100));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = &mut stop => break,
        }
    }
    if tty {
        eprint!(
            "\r{}\x1b[K",
            progress_line(&shared, started.elapsed(), sent)
        );
        eprintln!();
    }
    let sending = started.elapsed();
    if !tasks.is_empty() {
        eprintln!(
            "loadgen: waiting for {} requests in flight (and followed runs)",
            tasks.len()
        );
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(FOLLOW_TIMEOUT + Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            eprintln!("loadgen: gave up waiting");
        }
    }
    let stats = std::mem::take(&mut *shared.stats());
    let title = format!(
        "loadgen: scenario {}, rate {}/s, {} against {}",
        args.scenario.name(),
        args.rate,
        if args.duration.is_some() {
            "done"
        } else {
            "stopped"
        },
        args.url
    );
    report(&stats.table(
        &title,
        if args.duration.is_some() {
            sending
        } else {
            window_started.elapsed()
        },
    ));
    Ok(!(args.fail_on_errors && stats.faults() > 0))
}

fn main() -> std::process::ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadgen: some requests got a 5xx or a transport error (--fail-on-errors)");
            std::process::ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
