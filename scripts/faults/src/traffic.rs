//! Mixed traffic at a fixed rate (open loop: a slow answer does not slow the
//! next request), every answer recorded.
//!
//! Every run starts with an `http` step to the [`counter`](crate::counter);
//! its second step is `noop` (half), `delay` 100–800 ms (a quarter) or a
//! `fail` step with a retry policy (a quarter: the run ends `failed` by
//! design). One request in ten is a twin: two identical requests with one
//! `Idempotency-Key`, sent at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Plan {
    pub rate: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// 202 (or 200): the run id.
    Accepted(String),
    /// A 4xx/5xx answer: status and error code.
    Refused(u16, String),
    /// No answer (connection refused or reset, timeout).
    NoAnswer,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub tag: String,
    pub idempotency_key: Option<String>,
    pub answered: Instant,
    pub outcome: Outcome,
}

/// Sends `plan` against `api` (the gateway's base URL) and returns every answer.
pub async fn send(api: String, api_key: &str, counter_port: u16, plan: &Plan) -> Vec<Answer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let every = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + plan.duration;
    let mut sent = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while Instant::now() < end {
        tick.tick().await;
        n += 1;
        let tag = format!("t{n}-{:08x}", fastrand::u32(..));
        let body = body(&tag, counter_port);
        let twin = fastrand::u8(..100) < 10;
        let key = twin.then(|| format!("k-{tag}"));
        let copies = if twin { 2 } else { 1 };
        for _ in 0..copies {
            let (client, api, api_key) = (client.clone(), api.clone(), api_key.to_owned());
            let (body, tag, key, answers) =
                (body.clone(), tag.clone(), key.clone(), answers.clone());
            sent.spawn(async move {
                let mut request = client
                    .post(format!("{api}/v1/runs"))
                    .bearer_auth(api_key)
                    .json(&body);
                if let Some(key) = &key {
                    request = request.header("Idempotency-Key", key);
                }
                let outcome = match request.send().await {
                    Err(_) => Outcome::NoAnswer,
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let json: Value = response.json().await.unwrap_or(Value::Null);
                        match json["run_id"].as_str() {
                            Some(id) if status < 300 => Outcome::Accepted(id.to_owned()),
                            _ => Outcome::Refused(
                                status,
                                json["error"]["code"].as_str().unwrap_or("?").to_owned(),
                            ),
                        }
                    }
                };
                answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Answer {
                        tag,
                        idempotency_key: key,
                        answered: Instant::now(),
                        outcome,
                    });
            });
        }
        while sent.try_join_next().is_some() {}
    }
    while sent.join_next().await.is_some() {}
    answers.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn body(tag: &str, counter_port: u16) -> Value {
    let hit = json!({
        "id": "hit",
        "type": "http",
        "input": {"method": "POST", "url": format!("http://127.0.0.1:{counter_port}/hit/{tag}")},
    });
    let second = match fastrand::u8(..100) {
        0..50 => json!({"id": "work", "type": "noop"}),
        50..75 => json!({"id": "work", "type": "delay", "input": {"ms": fastrand::u64(100..800)}}),
        _ => json!({
            "id": "work", "type": "fail",
            "input": {"message": "failing by design", "probability": 1.0},
            "retry": {"max_attempts": 2, "backoff_ms": 50},
        }),
    };
    json!({"flow_id": "faults", "steps": [hit, second]})
}
