//! A circuit breaker: a pure state machine over `tokio::time::Instant`, so
//! tests drive it with paused time.
//!
//! `closed` → `open` after `failure_threshold` failures within `window`;
//! `open` → `half_open` once `cooldown` has passed (one trial call at a time);
//! `half_open` → `closed` on a success, back to `open` on a failure.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A change of state; `as_str` is the `transition` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self.to {
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Closed => "close",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    /// Failure times inside the window (closed state only).
    failures: VecDeque<Instant>,
    opened_at: Option<Instant>,
    /// A half-open trial call is under way.
    trial: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            failures: VecDeque::new(),
            opened_at: None,
            trial: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// New settings (a reloaded registry); the state is kept.
    pub fn set_config(&mut self, config: BreakerConfig) {
        self.config = config;
    }

    /// Whether calls are refused at `now` without changing anything: open
    /// and still cooling down, or half-open with its trial under way.
    pub fn rejects_at(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => false,
            State::Open => !self.cooled_down(now),
            State::HalfOpen => self.trial,
        }
    }

    fn cooled_down(&self, now: Instant) -> bool {
        self.opened_at
            .is_none_or(|at| now.saturating_duration_since(at) >= self.config.cooldown)
    }

    /// Asks to make a call at `now`. An open breaker whose cool-down is over
    /// turns half-open and lets this one call through as the trial.
    pub fn try_acquire(&mut self, now: Instant) -> (bool, Option<Transition>) {
        match self.state {
            State::Closed => (true, None),
            State::Open if self.cooled_down(now) => {
                let t = self.go(State::HalfOpen, now);
                self.trial = true;
                (true, t)
            }
            State::Open => (false, None),
            State::HalfOpen if self.trial => (false, None),
            State::HalfOpen => {
                self.trial = true;
                (true, None)
            }
        }
    }

    pub fn on_success(&mut self, now: Instant) -> Option<Transition> {
        self.trial = false;
        match self.state {
            State::HalfOpen | State::Open => self.go(State::Closed, now),
            State::Closed => {
                self.prune(now);
                None
            }
        }
    }

    /// Ends a call that says nothing about the callee's health (the request
    /// itself was refused): no success, no failure; a half-open breaker's
    /// trial slot is free again for the next call.
    pub fn release(&mut self) {
        self.trial = false;
    }

    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        self.trial = false;
        match self.state {
            State::HalfOpen => self.go(State::Open, now),
            // A late failure of a call made before the breaker opened.
            State::Open => None,
            State::Closed => {
                self.failures.push_back(now);
                self.prune(now);
                if self.failures.len() >= self.config.failure_threshold as usize {
                    self.go(State::Open, now)
                } else {
                    None
                }
            }
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(first) = self.failures.front() {
            if now.saturating_duration_since(*first) > self.config.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
    }

    fn go(&mut self, to: State, now: Instant) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        match to {
            State::Open => self.opened_at = Some(now),
            State::Closed => {
                self.opened_at = None;
                self.failures.clear();
            }
            State::HalfOpen => {}
        }
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_n_failures_in_the_window() {
        let mut b = Breaker::new(config());
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.on_failure(Instant::now()), None);
        let t = b.on_failure(Instant::now()).expect("transition");
        assert_eq!(
            (t.from, t.to, t.as_str()),
            (State::Closed, State::Open, "open")
        );
        assert!(b.rejects_at(Instant::now()));
        assert_eq!(b.try_acquire(Instant::now()), (false, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_call_counts_neither_way() {
        let mut b = Breaker::new(config());
        for _ in 0..10 {
            assert_eq!(b.try_acquire(Instant::now()), (true, None));
            b.release();
        }
        b.on_failure(Instant::now());
        b.on_failure(Instant::now());
        assert_eq!(b.state(), State::Closed, "releases are not failures");
        b.on_failure(Instant::now());
        advance(Duration::from_secs(5)).await;
        // Half-open: the released trial frees the slot, the state stays.
        let (allowed, t) = b.try_acquire(Instant::now());
        assert!(allowed);
        assert_eq!(t.map(|t| t.to), Some(State::HalfOpen));
        assert!(b.rejects_at(Instant::now()), "trial under way");
        b.release();
        assert_eq!(b.state(), State::HalfOpen);
        assert!(!b.rejects_at(Instant::now()));
        assert_eq!(b.try_acquire(Instant::now()), (true, None));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let mut b = Breaker::new(config());
        b.on_failure(Instant::now());
        b.on_failure(Instant::now());
        advance(Duration::from_secs(11)).await;
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.state(), State::Closed);
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.on_failure(Instant::now()), None);
        let t = b.on_failure(Instant::now()).expect("third in window");
        assert_eq!(t.to, State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_cooldown_then_closes_on_success() {
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.on_failure(Instant::now());
        }
        advance(Duration::from_secs(4)).await;
        assert_eq!(b.try_acquire(Instant::now()), (false, None));
        advance(Duration::from_secs(1)).await;
        assert!(!b.rejects_at(Instant::now()));
        let (ok, t) = b.try_acquire(Instant::now());
        assert!(ok);
        let t = t.expect("to half-open");
        assert_eq!(
            (t.from, t.to, t.as_str()),
            (State::Open, State::HalfOpen, "half_open")
        );
        // One trial at a time.
        assert_eq!(b.try_acquire(Instant::now()), (false, None));
        assert!(b.rejects_at(Instant::now()));
        let t = b.on_success(Instant::now()).expect("closes");
        assert_eq!(
            (t.from, t.to, t.as_str()),
            (State::HalfOpen, State::Closed, "close")
        );
        assert_eq!(b.try_acquire(Instant::now()), (true, None));
        // The failure count started over.
        b.on_failure(Instant::now());
        b.on_failure(Instant::now());
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_for_another_cooldown() {
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.on_failure(Instant::now());
        }
        advance(Duration::from_secs(5)).await;
        assert!(b.try_acquire(Instant::now()).0);
        let t = b.on_failure(Instant::now()).expect("reopens");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        advance(Duration::from_secs(4)).await;
        assert!(b.rejects_at(Instant::now()));
        advance(Duration::from_secs(1)).await;
        assert!(b.try_acquire(Instant::now()).0);
    }

    #[tokio::test(start_paused = true)]
    async fn successes_in_closed_state_change_nothing() {
        let mut b = Breaker::new(config());
        assert_eq!(b.on_success(Instant::now()), None);
        assert_eq!(b.state(), State::Closed);
        assert!(!b.rejects_at(Instant::now()));
    }
}
