//! Per-node circuit breaker: after `failures` consecutive failed calls a node is left alone for
//! `cooldown`, then one trial call decides whether it closes again.
//!
//! Pure state machine over `Instant`s given by the caller, so it is tested without clocks.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls go through; `failures` consecutive failures so far.
    Closed { failures: u32 },
    /// No calls until `until`.
    Open { until: Instant },
    /// One trial call started at `started`; others wait for its outcome. A trial that never
    /// reports (its caller was cancelled, e.g. a hedge that lost) is given up after a cooldown,
    /// so a lost trial cannot keep the node out forever.
    Trial { started: Instant },
}

/// The breaker of one node.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    state: State,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may be routed to the node now (does not change the state).
    pub(crate) fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::Trial { started } => now >= started + self.cooldown,
        }
    }

    /// A call to the node starts: an open breaker whose cooldown ended turns into a trial.
    pub(crate) fn on_call(&mut self, now: Instant) {
        match self.state {
            State::Open { until } if now >= until => self.state = State::Trial { started: now },
            State::Trial { started } if now >= started + self.cooldown => {
                self.state = State::Trial { started: now }
            }
            _ => {}
        }
    }

    pub(crate) fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// Records a failed call; returns true when this failure opened the breaker.
    pub(crate) fn on_failure(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    self.state = State::Open {
                        until: now + self.cooldown,
                    };
                    true
                } else {
                    self.state = State::Closed { failures };
                    false
                }
            }
            State::Trial { .. } => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            // Calls that started before the breaker opened report late: already open.
            State::Open { .. } => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(1);
        let mut b = Breaker::new(3, cooldown);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        b.on_success(); // a success resets the count
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert!(b.available(t0));
        assert!(b.on_failure(t0), "third consecutive failure opens");
        assert!(b.is_open());
        assert!(!b.available(t0 + Duration::from_millis(999)));
        // Late failures of calls made before it opened do not count as new openings.
        assert!(!b.on_failure(t0 + Duration::from_millis(10)));
        let t1 = t0 + cooldown;
        assert!(b.available(t1));
        b.on_call(t1);
        assert!(!b.available(t1), "one trial at a time");
        b.on_success();
        assert!(!b.is_open());
        assert!(b.available(t1));
    }

    #[test]
    fn a_failed_trial_reopens_and_a_lost_trial_expires() {
        let t0 = Instant::now();
        let cooldown = Duration::from_millis(100);
        let mut b = Breaker::new(1, cooldown);
        assert!(b.on_failure(t0));
        let t1 = t0 + cooldown;
        b.on_call(t1);
        assert!(b.on_failure(t1), "a failed trial opens again");
        assert!(!b.available(t1 + Duration::from_millis(50)));
        let t2 = t1 + cooldown;
        b.on_call(t2);
        // The trial's caller went away without a result: after a cooldown another may try.
        assert!(!b.available(t2 + Duration::from_millis(99)));
        assert!(b.available(t2 + cooldown));
        b.on_call(t2 + cooldown);
        assert!(!b.available(t2 + cooldown));
    }
}
