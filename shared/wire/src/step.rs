//! A step's definition and its parsing from the API body.
//!
//! The gateway parses `{"id","type","input","retry"}` into a [`StepSpec`] once;
//! every later component receives the typed value, never raw JSON to re-check.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::StepId;

/// What a step does, with its typed input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "input", rename_all = "snake_case")]
pub enum StepKind {
    /// Does nothing and succeeds.
    Noop,
    /// Sleeps for `ms` milliseconds and succeeds.
    Delay(DelayInput),
    /// Fails with `message`, always or with `probability`.
    Fail(FailInput),
    /// An outbound HTTP call, `traceparent` injected.
    Http(HttpInput),
    /// A parameterised query through sqlx.
    Sql(SqlInput),
    /// Read, write or list inside the worker's sandbox directory.
    Fs(FsInput),
    /// Waits for a human decision made through the gateway API.
    Approval(ApprovalInput),
}

impl StepKind {
    /// The `type` name: a closed set, safe as a metric label.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::Delay(_) => "delay",
            Self::Fail(_) => "fail",
            Self::Http(_) => "http",
            Self::Sql(_) => "sql",
            Self::Fs(_) => "fs",
            Self::Approval(_) => "approval",
        }
    }
}

/// The step types this version executes.
pub const STEP_TYPES: [&str; 7] = ["noop", "delay", "fail", "http", "sql", "fs", "approval"];

/// HTTP methods an `http` step may use.
pub const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// The longest `timeout_ms` of an `http` step.
pub const MAX_HTTP_TIMEOUT_MS: u64 = 60_000;

/// The longest `timeout_s` of an `approval` step (7 days).
pub const MAX_APPROVAL_TIMEOUT_S: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpInput {
    #[serde(default = "default_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// JSON is sent as `application/json`, a string as-is.
    #[serde(default)]
    pub body: Option<Value>,
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "GET".to_owned()
}

fn default_http_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlInput {
    pub query: String,
    #[serde(default)]
    pub params: Vec<Value>,
    /// Must be true for anything but a read; the worker must also allow writes.
    #[serde(default)]
    pub write: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsOp {
    Read,
    Write,
    List,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsInput {
    pub op: FsOp,
    /// Relative to the sandbox root.
    pub path: String,
    /// What `write` writes.
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalInput {
    #[serde(default)]
    pub prompt: String,
    #[serde(default = "default_approval_timeout_s")]
    pub timeout_s: u64,
}

fn default_approval_timeout_s() -> u64 {
    3_600
}

/// The longest `delay` a step may ask for.
pub const MAX_DELAY_MS: u64 = 300_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayInput {
    pub ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailInput {
    #[serde(default = "default_fail_message")]
    pub message: String,
    /// Chance of failing on each attempt, 0.0..=1.0.
    #[serde(default = "one")]
    pub probability: f64,
}

fn default_fail_message() -> String {
    "step failed on purpose".to_owned()
}

fn one() -> f64 {
    1.0
}

/// How often a failing step is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1..=10).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each later one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Upper bound of the wait between attempts.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    100
}

fn default_max_backoff_ms() -> u64 {
    5_000
}

pub const MAX_ATTEMPTS: u32 = 10;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

/// One step of a run, parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub id: StepId,
    pub kind: StepKind,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// A step as the API body spells it, before parsing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub id: String,
    #[serde(rename = "type")]
    pub step_type: String,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub retry: Option<Value>,
}

/// A field of the request that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path of the field, e.g. `steps[1].input.ms`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl StepSpec {
    /// Parses the step at `index` of the request's `steps`.
    pub fn parse(index: usize, raw: RawStep) -> Result<Self, FieldError> {
        Self::parse_with_depth(index, raw, MAX_INPUT_DEPTH)
    }

    /// [`parse`](Self::parse) with another limit on how deep `input` nests.
    pub fn parse_with_depth(
        index: usize,
        raw: RawStep,
        max_depth: usize,
    ) -> Result<Self, FieldError> {
        let at = |field: &str| format!("steps[{index}].{field}");
        let id = StepId::parse(raw.id).map_err(|m| FieldError::new(at("id"), m))?;
        let input = raw.input.unwrap_or(Value::Object(Default::default()));
        if depth(&input, max_depth) > max_depth {
            // Every decoder downstream (serde_json's recursion limit of 128,
            // with the envelope around it) must be able to read the run.
            return Err(FieldError::new(
                at("input"),
                format!("is nested deeper than {max_depth} levels"),
            ));
        }
        let input_error = |e: serde_json::Error| FieldError::new(at("input"), e.to_string());
        let kind = match raw.step_type.as_str() {
            "noop" => match &input {
                Value::Object(map) if map.is_empty() => StepKind::Noop,
                Value::Null => StepKind::Noop,
                _ => return Err(FieldError::new(at("input"), "noop takes no input: use {}")),
            },
            "delay" => {
                let delay: DelayInput = serde_json::from_value(input).map_err(input_error)?;
                if delay.ms > MAX_DELAY_MS {
                    return Err(FieldError::new(
                        at("input.ms"),
                        format!("must be at most {MAX_DELAY_MS}"),
                    ));
                }
                StepKind::Delay(delay)
            }
            "fail" => {
                let fail: FailInput = serde_json::from_value(input).map_err(input_error)?;
                if !(0.0..=1.0).contains(&fail.probability) {
                    return Err(FieldError::new(
                        at("input.probability"),
                        "must be between 0.0 and 1.0",
                    ));
                }
                StepKind::Fail(fail)
            }
            "http" => {
                let http: HttpInput = serde_json::from_value(input).map_err(input_error)?;
                let method = http.method.to_ascii_uppercase();
                if !HTTP_METHODS.contains(&method.as_str()) {
                    return Err(FieldError::new(
                        at("input.method"),
                        format!("expected one of {}", HTTP_METHODS.join(", ")),
                    ));
                }
                let scheme_ok = http.url.starts_with("http://") || http.url.starts_with("https://");
                if !scheme_ok
                    || http
                        .url
                        .parse::<http::Uri>()
                        .map(|u| u.host().is_none())
                        .unwrap_or(true)
                {
                    return Err(FieldError::new(
                        at("input.url"),
                        "must be an absolute http:// or https:// URL",
                    ));
                }
                if http.timeout_ms == 0 || http.timeout_ms > MAX_HTTP_TIMEOUT_MS {
                    return Err(FieldError::new(
                        at("input.timeout_ms"),
                        format!("must be between 1 and {MAX_HTTP_TIMEOUT_MS}"),
                    ));
                }
                for name in http.headers.keys() {
                    if name.parse::<http::HeaderName>().is_err() {
                        return Err(FieldError::new(
                            at("input.headers"),
                            format!("invalid header name {name:?}"),
                        ));
                    }
                }
                StepKind::Http(HttpInput { method, ..http })
            }
            "sql" => {
                let sql: SqlInput = serde_json::from_value(input).map_err(input_error)?;
                if sql.query.trim().is_empty() {
                    return Err(FieldError::new(at("input.query"), "must not be empty"));
                }
                StepKind::Sql(sql)
            }
            "fs" => {
                let fs: FsInput = serde_json::from_value(input).map_err(input_error)?;
                if fs.path.is_empty() && fs.op != FsOp::List {
                    return Err(FieldError::new(at("input.path"), "must not be empty"));
                }
                if fs.op == FsOp::Write && fs.content.is_none() {
                    return Err(FieldError::new(
                        at("input.content"),
                        "is required for op write",
                    ));
                }
                StepKind::Fs(fs)
            }
            "approval" => {
                let approval: ApprovalInput = serde_json::from_value(input).map_err(input_error)?;
                if approval.timeout_s == 0 || approval.timeout_s > MAX_APPROVAL_TIMEOUT_S {
                    return Err(FieldError::new(
                        at("input.timeout_s"),
                        format!("must be between 1 and {MAX_APPROVAL_TIMEOUT_S}"),
                    ));
                }
                StepKind::Approval(approval)
            }
            other => {
                return Err(FieldError::new(
                    at("type"),
                    format!(
                        "unknown step type {other:?}; expected one of {}",
                        STEP_TYPES.join(", ")
                    ),
                ));
            }
        };
        let retry = match raw.retry {
            None | Some(Value::Null) => RetryPolicy::default(),
            Some(value) => {
                let retry: RetryPolicy = serde_json::from_value(value)
                    .map_err(|e| FieldError::new(at("retry"), e.to_string()))?;
                if !(1..=MAX_ATTEMPTS).contains(&retry.max_attempts) {
                    return Err(FieldError::new(
                        at("retry.max_attempts"),
                        format!("must be between 1 and {MAX_ATTEMPTS}"),
                    ));
                }
                retry
            }
        };
        Ok(Self { id, kind, retry })
    }
}

/// How deep a step's `input` may nest (objects and arrays).
pub const MAX_INPUT_DEPTH: usize = 32;

/// Nesting depth of `value`: 0 for a scalar, without recursion (the input
/// may be nested far deeper than the stack allows).
fn depth(value: &Value, max: usize) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0_usize)];
    while let Some((value, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        deepest = deepest.max(level + 1);
        if deepest > max {
            return deepest;
        }
        stack.extend(children.map(|child| (child, level + 1)));
    }
    deepest
}

/// Parses a run's `steps`: at least one, at most `max`, ids unique.
pub fn parse_steps(raw: Vec<RawStep>, max: usize) -> Result<Vec<StepSpec>, FieldError> {
    parse_steps_with_depth(raw, max, MAX_INPUT_DEPTH)
}

/// [`parse_steps`] with another limit on how deep each step's `input` nests.
pub fn parse_steps_with_depth(
    raw: Vec<RawStep>,
    max: usize,
    max_depth: usize,
) -> Result<Vec<StepSpec>, FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new("steps", "must contain at least one step"));
    }
    if raw.len() > max {
        return Err(FieldError::new(
            "steps",
            format!("must contain at most {max} steps"),
        ));
    }
    let mut steps: Vec<StepSpec> = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let step = StepSpec::parse_with_depth(index, raw, max_depth)?;
        if steps.iter().any(|s| s.id == step.id) {
            return Err(FieldError::new(
                format!("steps[{index}].id"),
                format!("duplicate step id {:?}", step.id.as_str()),
            ));
        }
        steps.push(step);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: Value) -> RawStep {
        serde_json::from_value(v).expect("raw step")
    }

    #[test]
    fn parses_each_type() {
        let steps = parse_steps(
            vec![
                raw(json!({"id": "a", "type": "noop"})),
                raw(json!({"id": "b", "type": "delay", "input": {"ms": 50}})),
                raw(json!({"id": "c", "type": "fail", "input": {"probability": 0.5}, "retry": {"max_attempts": 3}})),
            ],
            10,
        )
        .expect("valid");
        assert_eq!(steps[0].kind, StepKind::Noop);
        assert_eq!(steps[1].kind, StepKind::Delay(DelayInput { ms: 50 }));
        assert_eq!(steps[2].retry.max_attempts, 3);
        // The wire form round-trips.
        let wire = serde_json::to_string(&steps).expect("encode");
        let back: Vec<StepSpec> = serde_json::from_str(&wire).expect("decode");
        assert_eq!(back, steps);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"id": "a", "type": "teleport"}), "steps[0].type"),
            (json!({"id": "", "type": "noop"}), "steps[0].id"),
            (
                json!({"id": "a", "type": "delay", "input": {"ms": "x"}}),
                "steps[0].input",
            ),
            (
                json!({"id": "a", "type": "delay", "input": {"ms": 999999999}}),
                "steps[0].input.ms",
            ),
            (
                json!({"id": "a", "type": "delay", "input": {"ms": 1, "extra": 2}}),
                "steps[0].input",
            ),
            (
                json!({"id": "a", "type": "fail", "input": {"probability": 2.0}}),
                "steps[0].input.probability",
            ),
            (
                json!({"id": "a", "type": "noop", "retry": {"max_attempts": 0}}),
                "steps[0].retry.max_attempts",
            ),
        ];
        for (step, field) in cases {
            let err = parse_steps(vec![raw(step.clone())], 10).expect_err("invalid");
            assert_eq!(err.field, field, "{step}");
        }
    }

    #[test]
    fn empty_and_duplicate_steps_are_rejected() {
        assert_eq!(parse_steps(vec![], 10).expect_err("empty").field, "steps");
        let err = parse_steps(
            vec![
                raw(json!({"id": "a", "type": "noop"})),
                raw(json!({"id": "a", "type": "noop"})),
            ],
            10,
        )
        .expect_err("dup");
        assert_eq!(err.field, "steps[1].id");
        assert!(err.message.contains("duplicate"));
    }
}
