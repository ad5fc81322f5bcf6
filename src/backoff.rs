//! Exponential backoff with jitter, shared by every retry loop (MQTT reconnect, uploads). Pure: the
//! caller sleeps.

use std::time::Duration;

use crate::rng::Rng;

/// Doubling delays from `base` up to `max`, each drawn uniformly from the upper half of the current
/// step ("equal jitter"), so that a fleet of gateways that lost the same link does not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// `None`: exact steps (`Backoff::exact`).
    rng: Option<Rng>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base: base.min(max),
            max,
            attempt: 0,
            rng: Some(Rng::from_time()),
        }
    }

    /// Doubling delays without jitter, for a wait a person is told about (the console's PIN
    /// lockout says "wait 20 s", and means it).
    pub fn exact(base: Duration, max: Duration) -> Backoff {
        Backoff {
            rng: None,
            ..Backoff::new(base, max)
        }
    }

    /// The delay before the next attempt; each call makes the following one longer, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .checked_mul(1u32 << self.attempt.min(30))
            .unwrap_or(self.max)
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let Some(rng) = &mut self.rng else {
            return step;
        };
        let half = step / 2;
        let nanos = half.as_nanos() as u64;
        half + Duration::from_nanos(rng.below(nanos + 1))
    }

    /// The delay before the next attempt when the peer asked for at least `at_least` (Retry-After).
    pub fn next_delay_at_least(&mut self, at_least: Option<Duration>) -> Duration {
        let d = self.next_delay();
        match at_least {
            Some(a) => d.max(a),
            None => d,
        }
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_stop_at_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for step in steps {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(step / 2),
                "{d:?} < half of {step}ms"
            );
            assert!(d <= Duration::from_millis(step), "{d:?} > {step}ms");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn retry_after_wins_when_longer() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(
            b.next_delay_at_least(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn many_attempts_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3600));
        for _ in 0..10_000 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
    }
}
