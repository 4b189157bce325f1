//! Head sampling: `OTEL_TRACES_SAMPLER[_ARG]`, read here so that a bad value
//! stops the process at start, plus Beamline's adaptive sampler.
//!
//! The decision is taken where a trace starts (the gateway) and travels in the
//! W3C `sampled` flag; every other span follows its parent (the default
//! `parentbased_*` samplers and the adaptive one), so the router and the worker
//! honour the gateway's decision and a trace is exported whole or not at all.
//!
//! `beamline_adaptive` (`OTEL_TRACES_SAMPLER_ARG` = traces per second, default
//! [`DEFAULT_TRACES_PER_SECOND`]): parent-based like the others: a span with a
//! parent follows it; a root span takes a token from a bucket refilled at that
//! rate (burst: one second's worth). A span not sampled is dropped, not
//! recorded: nothing of an unsampled trace is exported, so no exported span
//! ever has a parent that was not exported.
//!
//! Keeping every trace with an error (or a slow one) is not a head-sampling
//! decision: the error is known only at the end, often in another process.
//! The collector's `tail_sampling` processor does it on whole traces
//! (`observability/otel-collector/config.yaml`, docs/instrumentation.md).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TraceState};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};

use crate::env::{self, EnvError};

/// The adaptive sampler's budget when `OTEL_TRACES_SAMPLER_ARG` is unset.
pub const DEFAULT_TRACES_PER_SECOND: f64 = 10.0;

const SAMPLER_VAR: &str = "OTEL_TRACES_SAMPLER";
const ARG_VAR: &str = "OTEL_TRACES_SAMPLER_ARG";

/// The sampler named by `OTEL_TRACES_SAMPLER` (default `parentbased_always_on`).
pub(crate) fn from_env() -> Result<Box<dyn ShouldSample>, EnvError> {
    parse(
        &env::string_or(SAMPLER_VAR, "parentbased_always_on"),
        env::raw(ARG_VAR),
    )
}

/// The sampler for `OTEL_TRACES_SAMPLER=name`, `OTEL_TRACES_SAMPLER_ARG=arg`.
fn parse(name: &str, arg: Option<String>) -> Result<Box<dyn ShouldSample>, EnvError> {
    let ratio = || -> Result<f64, EnvError> {
        match &arg {
            None => Ok(1.0),
            Some(value) => match value.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(EnvError::new(
                    ARG_VAR,
                    value,
                    "expected a ratio between 0 and 1",
                )),
            },
        }
    };
    let sampler: Box<dyn ShouldSample> = match name.trim() {
        "always_on" => Box::new(Sampler::AlwaysOn),
        "always_off" => Box::new(Sampler::AlwaysOff),
        "traceidratio" => Box::new(Sampler::TraceIdRatioBased(ratio()?)),
        "parentbased_always_on" => Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))),
        "parentbased_always_off" => Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))),
        "parentbased_traceidratio" => Box::new(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(ratio()?),
        ))),
        "beamline_adaptive" => {
            let rate = match &arg {
                None => DEFAULT_TRACES_PER_SECOND,
                Some(value) => match value.trim().parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 => r,
                    _ => {
                        return Err(EnvError::new(
                            ARG_VAR,
                            value,
                            "expected the maximum traces per second (a number > 0)",
                        ));
                    }
                },
            };
            Box::new(AdaptiveSampler::new(rate))
        }
        other => {
            return Err(EnvError::new(
                SAMPLER_VAR,
                other,
                "expected always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off, parentbased_traceidratio or beamline_adaptive",
            ));
        }
    };
    Ok(sampler)
}

/// A token bucket: `rate` tokens a second, at most `capacity` saved up.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(rate: f64, now: Instant) -> Self {
        let capacity = rate.max(1.0);
        Self {
            rate,
            capacity,
            state: Mutex::new((capacity, now)),
        }
    }

    fn try_take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.capacity);
        *last = (*last).max(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most `rate` new traces a second; children follow their parent; what is
/// not sampled is dropped.
#[derive(Debug, Clone)]
pub struct AdaptiveSampler {
    bucket: Arc<TokenBucket>,
}

impl AdaptiveSampler {
    pub fn new(traces_per_second: f64) -> Self {
        Self {
            bucket: Arc::new(TokenBucket::new(traces_per_second, Instant::now())),
        }
    }

    /// The decision for a span with `parent` (if any) at `now`.
    fn decide(&self, parent: Option<&Context>, now: Instant) -> SamplingResult {
        let parent = parent.filter(|cx| cx.span().span_context().is_valid());
        let (decision, trace_state) = match parent {
            Some(cx) => {
                let span = cx.span();
                let parent = span.span_context();
                let decision = if parent.is_sampled() {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                };
                (decision, parent.trace_state().clone())
            }
            None if self.bucket.try_take(now) => {
                (SamplingDecision::RecordAndSample, TraceState::default())
            }
            None => (SamplingDecision::Drop, TraceState::default()),
        };
        SamplingResult {
            decision,
            attributes: Vec::new(),
            trace_state,
        }
    }
}

impl ShouldSample for AdaptiveSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        self.decide(parent_context, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};

    use super::*;

    fn remote_parent(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(7),
            SpanId::from(9),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn sampled(result: &SamplingResult) -> bool {
        result.decision == SamplingDecision::RecordAndSample
    }

    #[test]
    fn roots_are_limited_to_the_rate_per_second() {
        let start = Instant::now();
        let sampler = AdaptiveSampler {
            bucket: Arc::new(TokenBucket::new(5.0, start)),
        };
        // A burst: one second's worth, then nothing.
        let burst = (0..100)
            .filter(|_| sampled(&sampler.decide(None, start)))
            .count();
        assert_eq!(burst, 5);
        // Steady traffic of 100/s over 10 s keeps 5/s.
        let mut kept = 0;
        for i in 1..=1000u64 {
            let now = start + Duration::from_millis(10 * i);
            if sampled(&sampler.decide(None, now)) {
                kept += 1;
            }
        }
        assert!((49..=51).contains(&kept), "kept {kept} of 1000 in 10 s");
    }

    #[test]
    fn over_budget_roots_are_dropped_not_recorded() {
        let start = Instant::now();
        let sampler = AdaptiveSampler {
            bucket: Arc::new(TokenBucket::new(1.0, start)),
        };
        assert!(sampled(&sampler.decide(None, start)));
        let over = sampler.decide(None, start);
        assert_eq!(over.decision, SamplingDecision::Drop);
    }

    #[test]
    fn a_parent_is_followed_whatever_the_budget() {
        let start = Instant::now();
        let sampler = AdaptiveSampler {
            bucket: Arc::new(TokenBucket::new(1.0, start)),
        };
        assert!(sampled(&sampler.decide(None, start)));
        // Budget spent: a sampled parent still gives sampled children.
        for _ in 0..10 {
            assert!(sampled(&sampler.decide(Some(&remote_parent(true)), start)));
        }
        let unsampled = sampler.decide(Some(&remote_parent(false)), start);
        assert_eq!(unsampled.decision, SamplingDecision::Drop);
        // Children did not use the budget up either.
        assert!(sampled(
            &sampler.decide(None, start + Duration::from_secs(1))
        ));
    }

    #[test]
    fn a_fractional_rate_keeps_one_trace_every_few_seconds() {
        let start = Instant::now();
        let sampler = AdaptiveSampler {
            bucket: Arc::new(TokenBucket::new(0.5, start)),
        };
        let kept = (0..=100u64)
            .filter(|i| sampled(&sampler.decide(None, start + Duration::from_millis(100 * i))))
            .count();
        // One saved-up token, then one every 2 s over 10 s.
        assert_eq!(kept, 6);
    }

    #[test]
    fn sampler_settings_are_parsed_and_bad_ones_name_the_variable() {
        for name in [
            "always_on",
            "always_off",
            "traceidratio",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
            "beamline_adaptive",
        ] {
            assert!(parse(name, None).is_ok(), "{name}");
        }
        assert!(parse("traceidratio", Some("0.25".into())).is_ok());
        assert!(parse("beamline_adaptive", Some("0.5".into())).is_ok());
        let err = |name: &str, arg: Option<&str>| {
            parse(name, arg.map(str::to_owned))
                .err()
                .map(|e| e.var)
                .expect("an error")
        };
        assert_eq!(err("sometimes", None), SAMPLER_VAR);
        assert_eq!(err("traceidratio", Some("1.5")), ARG_VAR);
        assert_eq!(err("parentbased_traceidratio", Some("half")), ARG_VAR);
        assert_eq!(err("beamline_adaptive", Some("0")), ARG_VAR);
        assert_eq!(err("beamline_adaptive", Some("-3")), ARG_VAR);
    }
}
