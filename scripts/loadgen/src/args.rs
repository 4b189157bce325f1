//! Command-line flags (`loadgen --help`).

use std::time::Duration;

use anyhow::{Context, bail};

use crate::scenario::Scenario;

pub const HELP: &str = "\
loadgen: demo traffic for the Beamline gateway

Usage: loadgen [--scenario NAME] [--rate N] [--duration D] [options]

Scenarios:
  steady          noop/delay runs at a constant rate (all expected to succeed)
  burst           the same runs in bursts: 5 s at 4x the rate, 15 s idle
  errors          client mistakes (400, 401, 404, 415) and runs with failing steps
  approvals       runs with an approval step, approved (4 in 5) or rejected via the API
  slow-extension  runs for the tenant whose router policy has a slow extension
  mixed           the demo mix the compose stack runs: mostly steady, some
                  approvals, slow-extension runs and client errors

Options:
  --scenario NAME       scenario (default: steady)
  --rate N              requests per second, average (default: 5)
  --duration D          how long: 30s, 5m, 1h; 0 = until SIGINT/SIGTERM (default: 30s)
  --url URL             gateway base URL (default: $LOADGEN_URL or http://localhost:3000)
  --api-key KEY         API key (default: $LOADGEN_API_KEY or demo-key)
  --slow-api-key KEY    API key of the slow-extension tenant
                        (default: $LOADGEN_SLOW_API_KEY or slow-key)
  --concurrency N       requests in flight at most (default: 64)
  --follow-every N      follow every Nth accepted run to its final status (default: 10; 0 = never)
  --report-every D      with --duration 0, print the table this often and start over (default: 60s)
  --no-progress         no progress bar (also when stderr is not a terminal: a line every 10 s)
  --fail-on-errors      exit 1 if a request got a transport error or a 5xx
  -h, --help            this text
";

#[derive(Debug, Clone)]
pub struct Args {
    pub scenario: Scenario,
    pub rate: f64,
    /// `None`: run until a signal.
    pub duration: Option<Duration>,
    pub url: String,
    pub api_key: String,
    pub slow_api_key: String,
    pub concurrency: usize,
    pub follow_every: u64,
    pub report_every: Duration,
    pub progress: bool,
    pub fail_on_errors: bool,
}

/// `30s`, `5m`, `1h`, `250ms` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .with_context(|| format!("`{text}` is not a duration (try 30s, 5m, 1h)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("`{text}`: unknown unit `{unit}` (use ms, s, m or h)"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

impl Args {
    /// `Ok(None)` means `--help` was printed.
    pub fn parse(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut args = Args {
            scenario: Scenario::Steady,
            rate: 5.0,
            duration: Some(Duration::from_secs(30)),
            url: env_or("LOADGEN_URL", "http://localhost:3000"),
            api_key: env_or("LOADGEN_API_KEY", "demo-key"),
            slow_api_key: env_or("LOADGEN_SLOW_API_KEY", "slow-key"),
            concurrency: 64,
            follow_every: 10,
            report_every: Duration::from_secs(60),
            progress: true,
            fail_on_errors: false,
        };
        while let Some(flag) = argv.next() {
            let (flag, inline) = match flag.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (flag, None),
            };
            let mut value = |name: &str| -> anyhow::Result<String> {
                inline
                    .clone()
                    .or_else(|| argv.next())
                    .with_context(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "-h" | "--help" => {
                    eprint!("{HELP}");
                    return Ok(None);
                }
                "--scenario" => args.scenario = value("--scenario")?.parse()?,
                "--rate" => {
                    args.rate = value("--rate")?
                        .parse()
                        .context("--rate must be a number")?;
                    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
                        bail!("--rate must be in (0, 10000]");
                    }
                }
                "--duration" => {
                    let d = parse_duration(&value("--duration")?)?;
                    args.duration = (!d.is_zero()).then_some(d);
                }
                "--url" => args.url = value("--url")?.trim_end_matches('/').to_owned(),
                "--api-key" => args.api_key = value("--api-key")?,
                "--slow-api-key" => args.slow_api_key = value("--slow-api-key")?,
                "--concurrency" => {
                    args.concurrency = value("--concurrency")?
                        .parse()
                        .context("--concurrency must be a positive integer")?;
                    if args.concurrency == 0 {
                        bail!("--concurrency must be at least 1");
                    }
                }
                "--follow-every" => {
                    args.follow_every = value("--follow-every")?
                        .parse()
                        .context("--follow-every must be an integer")?;
                }
                "--report-every" => {
                    args.report_every = parse_duration(&value("--report-every")?)?;
                    if args.report_every < Duration::from_secs(1) {
                        bail!("--report-every must be at least 1s");
                    }
                }
                "--no-progress" => args.progress = false,
                "--fail-on-errors" => args.fail_on_errors = true,
                other => bail!("unknown argument `{other}` (try --help)"),
            }
        }
        Ok(Some(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Option<Args>> {
        Args::parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("2").ok(), Some(Duration::from_secs(2)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags() -> anyhow::Result<()> {
        let args = parse(&["--scenario", "errors", "--rate=20", "--duration", "0"])?
            .ok_or_else(|| anyhow::anyhow!("no args"))?;
        assert_eq!(args.scenario, Scenario::Errors);
        assert!((args.rate - 20.0).abs() < f64::EPSILON);
        assert_eq!(args.duration, None);
        assert!(parse(&["--rate", "0"]).is_err());
        assert!(parse(&["--scenario", "chaos"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--rate"]).is_err());
        Ok(())
    }
}
