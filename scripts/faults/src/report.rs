//! From the recorded answers, run statuses and counter hits to one row per
//! scenario, and the table and Markdown report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::traffic::{Answer, Outcome};

pub struct Times {
    pub started: Instant,
    pub fault: Instant,
    /// When the fault was over (the component back, the broker resumed);
    /// the fault time itself for a replica that stays down.
    pub healed: Instant,
    pub traffic_end: Instant,
}

pub struct Row {
    pub scenario: &'static str,
    pub requests: usize,
    /// Distinct run ids answered 202/200.
    pub accepted: usize,
    /// Answers by status, e.g. `503 broker_unavailable`.
    pub refused: BTreeMap<String, usize>,
    pub no_answer: usize,
    /// Accepted runs that reached a terminal status, by status.
    pub finished: BTreeMap<String, usize>,
    /// Accepted runs not terminal at the end of the drain (or unknown to the store).
    pub lost: usize,
    /// Runs whose first step was executed more than once.
    pub executed_twice: usize,
    /// Idempotency keys that produced more than one run id.
    pub key_duplicates: usize,
    /// Requests never accepted (refused or unanswered) whose run executed anyway.
    pub refused_but_executed: usize,
    /// Longest time without an accepted answer, and without an execution.
    pub intake_gap: Duration,
    pub completion_gap: Duration,
    /// From the end of the fault to the first accepted answer and the first
    /// execution after it (the later of the two).
    pub recovery: Option<Duration>,
    pub fault_offset: Duration,
}

impl Row {
    pub fn build(
        scenario: &'static str,
        answers: &[Answer],
        statuses: &HashMap<String, String>,
        hits: &HashMap<String, Vec<Instant>>,
        times: Times,
    ) -> Self {
        let mut refused = BTreeMap::new();
        let mut no_answer = 0;
        let mut accepted_tags = HashSet::new();
        let mut runs_per_key: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut accepted_times = Vec::new();
        let mut run_ids = HashSet::new();
        for answer in answers {
            match &answer.outcome {
                Outcome::Accepted(id) => {
                    accepted_tags.insert(answer.tag.as_str());
                    run_ids.insert(id.as_str());
                    accepted_times.push(answer.answered);
                    if let Some(key) = &answer.idempotency_key {
                        runs_per_key.entry(key).or_default().insert(id);
                    }
                }
                Outcome::Refused(status, code) => {
                    *refused.entry(format!("{status} {code}")).or_insert(0) += 1;
                }
                Outcome::NoAnswer => no_answer += 1,
            }
        }
        let mut finished = BTreeMap::new();
        let mut lost = 0;
        for id in &run_ids {
            match statuses.get(*id) {
                Some(status) if crate::scenario::terminal(status) => {
                    *finished.entry(status.clone()).or_insert(0) += 1;
                }
                _ => lost += 1,
            }
        }
        let executed_twice = hits.values().filter(|h| h.len() > 1).count();
        let refused_but_executed = hits
            .keys()
            .filter(|tag| !accepted_tags.contains(tag.as_str()))
            .count();
        let key_duplicates = runs_per_key.values().filter(|ids| ids.len() > 1).count();
        let mut hit_times: Vec<Instant> = hits.values().flatten().copied().collect();
        hit_times.sort();
        accepted_times.sort();
        let after = |list: &[Instant]| list.iter().find(|t| **t >= times.healed).copied();
        let recovery = match (after(&accepted_times), after(&hit_times)) {
            (Some(a), Some(h)) => Some(a.max(h) - times.healed),
            _ => None,
        };
        Self {
            scenario,
            requests: answers.len(),
            accepted: run_ids.len(),
            refused,
            no_answer,
            finished,
            lost,
            executed_twice,
            key_duplicates,
            refused_but_executed,
            intake_gap: longest_gap(&accepted_times, times.started, times.traffic_end),
            completion_gap: longest_gap(&hit_times, times.started, times.traffic_end),
            recovery,
            fault_offset: times.fault - times.started,
        }
    }

    /// Nothing accepted was lost and no key made two runs.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.key_duplicates == 0
    }

    pub fn one_line(&self) -> String {
        format!(
            "{}: {} requests, {} accepted, {} finished, {} lost, {} executed twice, {} key duplicates, \
             {} refused but executed, recovery {}",
            self.scenario,
            self.requests,
            self.accepted,
            self.finished.values().sum::<usize>(),
            self.lost,
            self.executed_twice,
            self.key_duplicates,
            self.refused_but_executed,
            self.recovery.map_or("-".to_owned(), secs),
        )
    }
}

/// The longest stretch of `[from, to]` with no event in `events` (sorted).
fn longest_gap(events: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &at in events.iter().filter(|t| **t >= from && **t <= to) {
        longest = longest.max(at - last);
        last = at;
    }
    longest.max(to.saturating_duration_since(last))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "–".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | requests | accepted | refused | no answer | finished | lost | executed twice | key duplicates | refused but executed | intake gap | completion gap | recovery |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.requests,
            r.accepted,
            counts(&r.refused),
            r.no_answer,
            counts(&r.finished),
            r.lost,
            r.executed_twice,
            r.key_duplicates,
            r.refused_but_executed,
            secs(r.intake_gap),
            secs(r.completion_gap),
            r.recovery.map_or("–".to_owned(), secs),
        );
    }
    out
}

pub fn markdown(rows: &[Row], command: &str, store: &str) -> String {
    let store = if store == "sqlite" {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    let fault_at = rows
        .first()
        .map_or("–".to_owned(), |r| secs(r.fault_offset));
    format!(
        "# Fault suite — last report\n\n\
         Written by `scripts/faults` (`{command}`), run store {store}, fault injected {fault_at} \
         after traffic started. Each scenario is a fresh stack (nats-server, gateway, router, \
         one or two workers as processes on loopback) under open-loop mixed traffic; every run's \
         first step calls a counter, so an execution is a counted hit.\n\n\
         Columns: *accepted* distinct run ids answered 202; *finished* accepted runs that ended, by \
         status (`failed` includes the traffic's failing-by-design steps); *lost* accepted runs \
         not terminal after the drain; *executed twice* runs whose first step ran more than once \
         (at-least-once: a step in flight when a worker dies may run again); *key duplicates* \
         Idempotency-Keys that made two runs; *refused but executed* requests answered 4xx/5xx or \
         not at all whose run still executed; *intake gap* / *completion gap* the longest time \
         without a 202 / without an execution; *recovery* from the end of the fault to the first \
         202 and first execution after it.\n\n{}",
        table(rows)
    )
}
