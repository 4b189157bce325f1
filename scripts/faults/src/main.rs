//! The fault suite: the three release (or debug) binaries under steady mixed
//! traffic while one component or the broker is killed, stalled or
//! restarted, one scenario at a time, each on a fresh stack. Per scenario it
//! prints (and writes to a Markdown report) what was accepted, finished, lost
//! and duplicated, and how long intake and completions stalled.
//!
//! Every run starts with an `http` step that calls a counter served here, so
//! an execution is a hit on the counter: a run whose step ran twice is seen
//! as two hits, a refused (503) request that still ran as a hit without an
//! accepted run.
//!
//! Layout: [`traffic`] sends the requests and records every answer;
//! [`counter`] is the upstream the steps call; [`scenario`] injects the
//! faults; [`report`] turns the records into the table.

mod counter;
mod report;
mod scenario;
mod traffic;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::scenario::Scenario;

/// Replays the outside fault suite against real processes on loopback.
#[derive(Debug, Parser)]
#[command(name = "faults")]
struct Args {
    /// Scenarios to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    scenarios: Vec<Scenario>,
    /// Requests per second of mixed traffic.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// How long traffic runs per scenario, in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// When the fault is injected, in seconds after traffic starts.
    #[arg(long, default_value_t = 8)]
    fault_at: u64,
    /// How long after traffic stops accepted runs may take to finish, in seconds.
    #[arg(long, default_value_t = 90)]
    drain: u64,
    /// Run store: `sqlite` (a file per scenario) or a PostgreSQL admin URL
    /// (a fresh database is created per scenario).
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Where to write the Markdown report (`-` for none).
    #[arg(long, default_value = "docs/benchmarks/faults.md")]
    report: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let plan = traffic::Plan {
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
    };
    let mut rows = Vec::new();
    for scenario in scenarios {
        eprintln!("faults: {} …", scenario.name());
        let row = scenario::run(
            scenario,
            &plan,
            Duration::from_secs(args.fault_at),
            Duration::from_secs(args.drain),
            &args.store,
        )
        .await
        .with_context(|| format!("scenario {}", scenario.name()))?;
        eprintln!("faults: {}", row.one_line());
        rows.push(row);
    }
    let table = report::table(&rows);
    std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes())?;
    if args.report != "-" {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        std::fs::write(&args.report, report::markdown(&rows, &command, &args.store))
            .with_context(|| format!("writing {}", args.report))?;
        eprintln!("faults: report written to {}", args.report);
    }
    let bad: Vec<_> = rows.iter().filter(|r| !r.clean()).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} scenario(s) lost or duplicated work: {}",
            bad.len(),
            bad.iter()
                .map(|r| r.scenario)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
