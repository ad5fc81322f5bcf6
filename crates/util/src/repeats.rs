use std::time::{Duration, Instant};

/// Decides when a retry loop's failure is worth its full level (WARN, ERROR): the first time, when
/// the message changes, and once per `period` while the same one repeats; in between the caller
/// logs it at DEBUG.
#[derive(Debug, Clone)]
pub struct Repeats {
    period: Duration,
    last: Option<(String, Instant)>,
}

impl Repeats {
    pub fn new(period: Duration) -> Repeats {
        Repeats { period, last: None }
    }

    /// True when `message` is to be said at its full level at `now` (which then counts as the last
    /// time it was said).
    pub fn is_due(&mut self, message: &str, now: Instant) -> bool {
        let repeated = self
            .last
            .as_ref()
            .is_some_and(|(m, t)| m == message && now.saturating_duration_since(*t) < self.period);
        if !repeated {
            self.last = Some((message.to_owned(), now));
        }
        !repeated
    }

    /// Forgets the last message, after a success: the next failure is said in full.
    pub fn clear(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_failure_is_said_once_per_period_and_a_new_one_at_once() {
        let mut r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(r.is_due("refused", t0));
        assert!(!r.is_due("refused", t0 + Duration::from_secs(59)));
        assert!(r.is_due("timed out", t0 + Duration::from_secs(59)));
        assert!(r.is_due("refused", t0 + Duration::from_secs(60)));
        assert!(!r.is_due("refused", t0 + Duration::from_secs(61)));
        assert!(r.is_due("refused", t0 + Duration::from_secs(120)));
        r.clear();
        assert!(r.is_due("refused", t0 + Duration::from_secs(121)));
    }
}
