//! What happened: counts by request and status, latencies, run outcomes,
//! and the closing table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// The answer to one request: an HTTP status, or a transport error.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Status(u16),
    Transport(&'static str),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Status(code) if (200..300).contains(code))
    }

    /// A server or network fault (not a client mistake the scenario made on purpose).
    pub fn is_fault(&self) -> bool {
        match self {
            Self::Status(code) => *code >= 500,
            Self::Transport(_) => true,
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Status(code) => {
                let reason = reqwest::StatusCode::from_u16(*code)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                format!("{code} {reason}")
            }
            Self::Transport(kind) => format!("error: {kind}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// (request label, outcome) → count.
    pub requests: BTreeMap<(&'static str, Outcome), u64>,
    /// Request latencies in milliseconds.
    latencies_ms: Vec<f64>,
    /// Final run statuses of followed runs (`succeeded`, `failed`, …, or `still <status>`).
    pub runs: BTreeMap<String, u64>,
    /// `approve`/`reject` calls by outcome.
    pub approvals: BTreeMap<(&'static str, Outcome), u64>,
}

impl Stats {
    pub fn record(&mut self, label: &'static str, outcome: Outcome, latency: Duration) {
        *self.requests.entry((label, outcome)).or_default() += 1;
        self.latencies_ms.push(latency.as_secs_f64() * 1000.0);
    }

    pub fn record_run(&mut self, status: String) {
        *self.runs.entry(status).or_default() += 1;
    }

    pub fn record_approval(&mut self, action: &'static str, outcome: Outcome) {
        *self.approvals.entry((action, outcome)).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }

    pub fn successes(&self) -> u64 {
        self.requests
            .iter()
            .filter(|((_, o), _)| o.is_success())
            .map(|(_, n)| n)
            .sum()
    }

    pub fn faults(&self) -> u64 {
        self.requests
            .iter()
            .filter(|((_, o), _)| o.is_fault())
            .map(|(_, n)| n)
            .sum()
    }

    /// The `q` quantile (0..=1) of the latencies, nearest rank; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        quantile(&sorted, q)
    }

    /// The closing table.
    pub fn table(&self, title: &str, elapsed: Duration) -> String {
        let mut out = String::new();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let total = self.total();
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "  {:<38} {:>8}  throughput {:.1} req/s over {:.1} s",
            "requests",
            total,
            total as f64 / secs,
            secs
        );
        let _ = writeln!(
            out,
            "  {:<38} {:>8}  ({:.1}%)",
            "2xx",
            self.successes(),
            100.0 * self.successes() as f64 / total.max(1) as f64
        );
        for ((label, outcome), n) in &self.requests {
            let _ = writeln!(out, "    {:<36} {:>8}  {}", label, n, outcome.text());
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |q| quantile(&sorted, q).map_or("-".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "  {:<38} p50 {}  p95 {}  p99 {}  max {}",
            "latency (ms)",
            q(0.50),
            q(0.95),
            q(0.99),
            q(1.0)
        );
        if !self.runs.is_empty() {
            let runs: Vec<String> = self.runs.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let _ = writeln!(
                out,
                "  {:<38} {}",
                "followed runs, final status",
                runs.join(", ")
            );
        }
        for ((action, outcome), n) in &self.approvals {
            let _ = writeln!(
                out,
                "  {:<38} {:>8}  {}",
                format!("{action} approval step"),
                n,
                outcome.text()
            );
        }
        out
    }
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut stats = Stats::default();
        for ms in 1..=100 {
            stats.record(
                "POST /v1/runs",
                Outcome::Status(202),
                Duration::from_millis(ms),
            );
        }
        assert_eq!(stats.quantile_ms(0.5), Some(50.0));
        assert_eq!(stats.quantile_ms(0.99), Some(99.0));
        assert_eq!(stats.quantile_ms(1.0), Some(100.0));
        assert_eq!(Stats::default().quantile_ms(0.5), None);
    }

    #[test]
    fn table_counts_by_status() {
        let mut stats = Stats::default();
        stats.record(
            "POST /v1/runs",
            Outcome::Status(202),
            Duration::from_millis(5),
        );
        stats.record(
            "POST /v1/runs",
            Outcome::Status(503),
            Duration::from_millis(9),
        );
        stats.record(
            "POST /v1/runs",
            Outcome::Transport("connect"),
            Duration::from_millis(1),
        );
        assert_eq!(
            (stats.total(), stats.successes(), stats.faults()),
            (3, 1, 2)
        );
        let table = stats.table("t", Duration::from_secs(1));
        assert!(table.contains("202 Accepted"), "{table}");
        assert!(table.contains("503 Service Unavailable"), "{table}");
        assert!(table.contains("error: connect"), "{table}");
        assert!(table.contains("3.0 req/s"), "{table}");
    }
}
