//! The process skeleton every service binary shares: settings → runtime →
//! telemetry → app → signal → drain → flush, in that order.
//!
//! The order is the point: the OTLP/tonic exporter is built inside a
//! multi-thread runtime (≥ 2 workers, opentelemetry-rust#2715) and the tracer
//! provider is shut down while that runtime is still alive, or the last spans
//! are lost or shutdown hangs.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::{EnvError, ServiceInfo, Settings, Telemetry};

/// Runs a service. `config` is the service's parsed settings (a bad one exits
/// with status 2 and one line naming the variable); `app` runs until the
/// token is cancelled by SIGTERM or Ctrl-C.
pub fn run<C, F>(info: &ServiceInfo, config: Result<(C, Settings), EnvError>, app: F) -> ExitCode
where
    F: AsyncFnOnce(C, &Telemetry, CancellationToken) -> anyhow::Result<()>,
{
    let (config, settings) = match config {
        Ok(parsed) => parsed,
        Err(err) => {
            // A bad setting's value can be a URL with a password in it.
            let line = err.to_string();
            eprintln!(
                "{}: {}",
                info.component,
                crate::sanitize::global().scrub(&line)
            );
            return ExitCode::from(2);
        }
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{}: cannot start the Tokio runtime: {err}", info.component);
            return ExitCode::FAILURE;
        }
    };

    let outcome = runtime.block_on(async {
        let telemetry = crate::init(info, settings)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = app(config, &telemetry, shutdown).await;
        Ok::<_, anyhow::Error>((telemetry, result))
    });

    match outcome {
        Ok((mut telemetry, result)) => {
            if let Err(err) = &result {
                tracing::error!(
                    error = format!("{err:#}"),
                    "{} stopped on an error",
                    info.component
                );
            } else {
                tracing::info!("{} stopped", info.component);
            }
            // Off the runtime's threads, with the runtime still running.
            telemetry.shutdown();
            drop(runtime);
            if result.is_err() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            let line = format!("{err:#}");
            eprintln!(
                "{}: {}",
                info.component,
                crate::sanitize::global().scrub(&line)
            );
            ExitCode::FAILURE
        }
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = ctrl_c.await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
    token.cancel();
}
