//! Scenarios: what each request is and how the rate varies over time.
//! Payloads follow the gateway API in DESIGN.md §2/§2a.

use std::str::FromStr;
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Steady,
    Burst,
    Errors,
    Approvals,
    SlowExtension,
    Mixed,
}

impl FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "steady" => Self::Steady,
            "burst" => Self::Burst,
            "errors" => Self::Errors,
            "approvals" => Self::Approvals,
            "slow-extension" => Self::SlowExtension,
            "mixed" => Self::Mixed,
            other => anyhow::bail!(
                "unknown scenario `{other}` (steady, burst, errors, approvals, slow-extension, mixed)"
            ),
        })
    }
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Burst => "burst",
            Self::Errors => "errors",
            Self::Approvals => "approvals",
            Self::SlowExtension => "slow-extension",
            Self::Mixed => "mixed",
        }
    }

    /// The rate multiplier at `elapsed`: `burst` sends 5 s at 4x, then 15 s
    /// nothing (the same average as `--rate`); the others are constant.
    pub fn rate_factor(self, elapsed: Duration) -> f64 {
        match self {
            Self::Burst if elapsed.as_secs() % 20 < 5 => 4.0,
            Self::Burst => 0.0,
            _ => 1.0,
        }
    }

    /// The `n`th request of this scenario.
    pub fn request(self, n: u64, rng: &mut fastrand::Rng) -> Request {
        match self {
            Self::Steady | Self::Burst => steady_run(n, rng),
            Self::Errors => error_request(n, rng),
            Self::Approvals => approval_run(n, rng.u8(0..5) != 0),
            Self::SlowExtension => slow_extension_run(n),
            // Mostly healthy traffic: the SLO alerts stay quiet until a fault
            // scenario runs next to it (1 in 300 requests is a failing run).
            Self::Mixed => match rng.u16(0..300) {
                0 => failing_run(n, 1.0),
                1..=29 => client_error(rng),
                30..=53 => approval_run(n, true),
                54..=74 => slow_extension_run(n),
                _ => steady_run(n, rng),
            },
        }
    }
}

/// Which tenant's key a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Demo,
    SlowTenant,
    /// A key no tenant has: 401.
    Unknown,
    None,
}

/// What to do with an accepted run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// Nothing, unless it is picked for `--follow-every`.
    Sampled,
    /// Poll until the approval step waits, then approve (`true`) or reject it.
    Approval { step_id: String, approve: bool },
}

#[derive(Debug, Clone)]
pub enum Request {
    /// `POST /v1/runs` with a JSON body.
    Submit {
        key: Key,
        body: Value,
        follow: Follow,
        /// `Idempotency-Key` header: steady traffic sends a few, in pairs
        /// (the second one is a replay the gateway answers from its store).
        idempotency_key: Option<String>,
    },
    /// Anything else, sent as is (client mistakes).
    Raw {
        method: reqwest::Method,
        path: String,
        key: Key,
        content_type: &'static str,
        body: String,
        label: &'static str,
    },
}

impl Request {
    /// The row of the closing table this request counts in.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "POST /v1/runs",
            Self::Raw { label, .. } => label,
        }
    }
}

fn submit(body: Value) -> Request {
    Request::Submit {
        key: Key::Demo,
        body,
        follow: Follow::Sampled,
        idempotency_key: None,
    }
}

/// A per-process prefix, so idempotency keys of two loadgen runs never collide.
fn key_prefix() -> u64 {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PREFIX.get_or_init(|| fastrand::u64(..))
}

fn steady_run(n: u64, rng: &mut fastrand::Rng) -> Request {
    // Requests 0 and 1 of every 20: the same body under the same
    // Idempotency-Key (a miss, then a hit).
    if n % 20 < 2 {
        return Request::Submit {
            key: Key::Demo,
            body: json!({"flow_id": "idempotent", "steps": [{"id": "first", "type": "noop"}, {"id": "then", "type": "delay", "input": {"ms": 10}}]}),
            follow: Follow::Sampled,
            idempotency_key: Some(format!("loadgen-{:x}-{}", key_prefix(), n / 20)),
        };
    }
    let flow = ["ingest", "enrich", "report"][(n % 3) as usize];
    let mut steps = vec![json!({"id": "start", "type": "noop"})];
    for i in 0..rng.usize(1..=3) {
        steps.push(
            json!({"id": format!("wait-{i}"), "type": "delay", "input": {"ms": rng.u32(5..60)}}),
        );
    }
    steps.push(json!({"id": "done", "type": "noop"}));
    submit(json!({"flow_id": flow, "steps": steps}))
}

fn failing_run(n: u64, probability: f64) -> Request {
    submit(json!({
        "flow_id": "flaky",
        "steps": [
            {"id": "start", "type": "noop"},
            {"id": "flaky", "type": "fail",
             "input": {"message": format!("loadgen failure #{n}"), "probability": probability},
             "retry": {"max_attempts": 2, "backoff_ms": 20, "max_backoff_ms": 100}},
            {"id": "done", "type": "noop"}
        ]
    }))
}

fn approval_run(n: u64, approve: bool) -> Request {
    Request::Submit {
        key: Key::Demo,
        body: json!({
            "flow_id": "approval",
            "steps": [
                {"id": "prepare", "type": "noop"},
                {"id": "sign-off", "type": "approval",
                 "input": {"prompt": format!("loadgen approval #{n}"), "timeout_s": 30}},
                {"id": "ship", "type": "delay", "input": {"ms": 10}}
            ]
        }),
        follow: Follow::Approval {
            step_id: "sign-off".to_owned(),
            approve,
        },
        idempotency_key: None,
    }
}

fn slow_extension_run(n: u64) -> Request {
    Request::Submit {
        key: Key::SlowTenant,
        body: json!({
            "flow_id": "slow-extension",
            "steps": [{"id": "start", "type": "noop"}, {"id": "tag", "type": "delay", "input": {"ms": 5 + n % 10}}]
        }),
        follow: Follow::Sampled,
        idempotency_key: None,
    }
}

fn raw(
    method: reqwest::Method,
    path: &str,
    key: Key,
    content_type: &'static str,
    body: &str,
    label: &'static str,
) -> Request {
    Request::Raw {
        method,
        path: path.to_owned(),
        key,
        content_type,
        body: body.to_owned(),
        label,
    }
}

/// One client mistake; each should get its 4xx.
fn client_error(rng: &mut fastrand::Rng) -> Request {
    use reqwest::Method;
    const JSON: &str = "application/json";
    let valid = r#"{"flow_id":"hello","steps":[{"id":"a","type":"noop"}]}"#;
    match rng.u8(0..6) {
        0 => raw(
            Method::POST,
            "/v1/runs",
            Key::Demo,
            JSON,
            r#"{"flow_id":"#,
            "POST /v1/runs (malformed)",
        ),
        1 => raw(
            Method::POST,
            "/v1/runs",
            Key::Demo,
            JSON,
            r#"{"flow_id":"hello","steps":[{"id":"a","type":"teleport"}]}"#,
            "POST /v1/runs (invalid step)",
        ),
        2 => raw(
            Method::POST,
            "/v1/runs",
            Key::Unknown,
            JSON,
            valid,
            "POST /v1/runs (bad key)",
        ),
        3 => raw(
            Method::POST,
            "/v1/runs",
            Key::None,
            JSON,
            valid,
            "POST /v1/runs (no key)",
        ),
        4 => raw(
            Method::POST,
            "/v1/runs",
            Key::Demo,
            "text/plain",
            valid,
            "POST /v1/runs (text/plain)",
        ),
        _ => raw(
            Method::GET,
            "/v1/runs/00000000-0000-7000-8000-000000000000",
            Key::Demo,
            JSON,
            "",
            "GET /v1/runs/{unknown}",
        ),
    }
}

/// `errors`: half client mistakes, half runs whose steps fail (always, or
/// with probability 0.5 and a retry).
fn error_request(n: u64, rng: &mut fastrand::Rng) -> Request {
    match n % 4 {
        0 => failing_run(n, 1.0),
        1 => failing_run(n, 0.5),
        _ => client_error(rng),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() -> anyhow::Result<()> {
        for s in [
            Scenario::Steady,
            Scenario::Burst,
            Scenario::Errors,
            Scenario::Approvals,
            Scenario::SlowExtension,
            Scenario::Mixed,
        ] {
            assert_eq!(s.name().parse::<Scenario>()?, s);
        }
        Ok(())
    }

    #[test]
    fn burst_keeps_the_average_rate() {
        let total: f64 = (0..20)
            .map(|s| Scenario::Burst.rate_factor(Duration::from_secs(s)))
            .sum();
        assert!((total / 20.0 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn payloads_match_the_api() {
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 0..200 {
            for scenario in [Scenario::Steady, Scenario::Approvals, Scenario::Mixed] {
                if let Request::Submit { body, .. } = scenario.request(n, &mut rng) {
                    assert!(body["flow_id"].is_string());
                    let steps = body["steps"].as_array().map(Vec::len).unwrap_or(0);
                    assert!(steps >= 2, "{body}");
                }
            }
        }
        let Request::Submit { follow, .. } = Scenario::Approvals.request(1, &mut rng) else {
            panic!("approvals submit runs");
        };
        assert!(matches!(follow, Follow::Approval { .. }));
        let Request::Submit { key, .. } = Scenario::SlowExtension.request(1, &mut rng) else {
            panic!("slow-extension submits runs");
        };
        assert_eq!(key, Key::SlowTenant);
    }
}
