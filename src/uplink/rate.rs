//! Drain rate control, pure: token buckets for records and bytes per second, slowed down by the
//! cloud's 429/503 answers and recovering gradually, and a meter of the rate actually achieved.
//!
//! After a long outage the backlog must not flatten the cloud: `uplink.max_records_per_sec` and
//! `uplink.max_bytes_per_sec` cap the drain (0 = unlimited). When the cloud answers 429 or 503 the
//! limiter halves the effective rate (of the configured limit, or of the rate measured at that
//! moment when there is none) and then recovers by `RECOVERY_PER_SEC` of it each second of success.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Share of the base rate regained per second without throttling.
const RECOVERY_PER_SEC: f64 = 0.05;
/// The effective rate never drops below this share of its base.
const MIN_FACTOR: f64 = 1.0 / 64.0;
/// Window of the drain-rate meter.
const METER_WINDOW: Duration = Duration::from_secs(10);

/// A token bucket in "debt" form: a batch may go when the balance is not negative, and then takes
/// its whole cost, so batches larger than the burst still average out to the rate.
#[derive(Debug, Clone)]
struct Bucket {
    /// Tokens per second.
    rate: f64,
    balance: f64,
    /// Most tokens that can be saved up (one second's worth): the largest burst after idling.
    cap: f64,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket {
            rate,
            balance: rate,
            cap: rate,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.balance = (self.balance + self.rate * elapsed.as_secs_f64()).min(self.cap);
    }

    /// How long until a batch may go.
    fn wait(&self) -> Duration {
        if self.balance >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.balance / self.rate)
        }
    }

    fn take(&mut self, cost: f64) {
        self.balance -= cost;
    }

    fn set_rate(&mut self, rate: f64) {
        self.rate = rate.max(f64::MIN_POSITIVE);
        self.cap = self.rate;
        self.balance = self.balance.min(self.cap);
    }
}

/// The records and bytes limits, and their adaptation to the cloud's pushback.
#[derive(Debug, Clone)]
pub struct Limiter {
    configured_records: Option<f64>,
    configured_bytes: Option<f64>,
    /// Base rates the factor applies to: the configured ones, or those measured when the cloud
    /// first pushed back (for an unlimited configuration).
    base_records: Option<f64>,
    base_bytes: Option<f64>,
    factor: f64,
    records: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl Limiter {
    /// `0` means unlimited.
    pub fn new(max_records_per_sec: u64, max_bytes_per_sec: u64, now: Instant) -> Limiter {
        let positive = |v: u64| (v > 0).then_some(v as f64);
        let configured_records = positive(max_records_per_sec);
        let configured_bytes = positive(max_bytes_per_sec);
        Limiter {
            configured_records,
            configured_bytes,
            base_records: configured_records,
            base_bytes: configured_bytes,
            factor: 1.0,
            records: configured_records.map(Bucket::new),
            bytes: configured_bytes.map(Bucket::new),
            last: now,
        }
    }

    /// How long to wait before sending the next batch.
    pub fn delay(&mut self, now: Instant) -> Duration {
        self.advance(now);
        let r = self.records.as_ref().map_or(Duration::ZERO, Bucket::wait);
        let b = self.bytes.as_ref().map_or(Duration::ZERO, Bucket::wait);
        r.max(b)
    }

    /// A batch of `records` and `bytes` is being sent now.
    pub fn spend(&mut self, records: u64, bytes: u64, now: Instant) {
        self.advance(now);
        if let Some(b) = &mut self.records {
            b.take(records as f64);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes as f64);
        }
    }

    /// The cloud said 429 or 503: halve the effective rate. Without a configured limit, the rate
    /// measured now (`measured_*`, per second) becomes the base.
    pub fn throttle(&mut self, measured_records: f64, measured_bytes: f64, now: Instant) {
        self.advance(now);
        if self.base_records.is_none() && self.base_bytes.is_none() {
            // Nothing measured yet (the first request was refused): start from a modest rate.
            self.base_records = Some(measured_records.max(10.0));
            self.base_bytes = (measured_bytes > 0.0).then_some(measured_bytes);
            self.factor = 1.0;
        }
        self.factor = (self.factor / 2.0).max(MIN_FACTOR);
        self.apply();
    }

    /// The effective records-per-second limit, if any.
    pub fn records_limit(&self) -> Option<f64> {
        self.records.as_ref().map(|b| b.rate)
    }

    pub fn bytes_limit(&self) -> Option<f64> {
        self.bytes.as_ref().map(|b| b.rate)
    }

    /// Refills the buckets and recovers the factor for the time since the last call.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        if self.factor < 1.0 {
            self.factor = (self.factor + RECOVERY_PER_SEC * elapsed.as_secs_f64()).min(1.0);
            if self.factor >= 1.0
                && self.configured_records.is_none()
                && self.configured_bytes.is_none()
            {
                // Fully recovered from pushback with no configured limit: unlimited again.
                self.base_records = None;
                self.base_bytes = None;
            }
            self.apply();
        }
        for b in [&mut self.records, &mut self.bytes].into_iter().flatten() {
            b.refill(elapsed);
        }
    }

    fn apply(&mut self) {
        let f = self.factor;
        Self::set(&mut self.records, self.base_records.map(|r| r * f));
        Self::set(&mut self.bytes, self.base_bytes.map(|r| r * f));
    }

    fn set(bucket: &mut Option<Bucket>, rate: Option<f64>) {
        match (bucket.as_mut(), rate) {
            (Some(b), Some(r)) => b.set_rate(r),
            (None, Some(r)) => *bucket = Some(Bucket::new(r)),
            (_, None) => *bucket = None,
        }
    }
}

/// Records and bytes acknowledged over the last `METER_WINDOW`.
#[derive(Debug, Default, Clone)]
pub struct Meter {
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Meter {
    pub fn record(&mut self, records: u64, bytes: u64, now: Instant) {
        self.samples.push_back((now, records, bytes));
        self.expire(now);
    }

    /// (records per second, bytes per second) over the window.
    pub fn rate(&mut self, now: Instant) -> (f64, f64) {
        self.expire(now);
        let secs = METER_WINDOW.as_secs_f64();
        let (r, b) = self
            .samples
            .iter()
            .fold((0u64, 0u64), |(r, b), s| (r + s.1, b + s.2));
        (r as f64 / secs, b as f64 / secs)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, _, _)) = self.samples.front() {
            if now.saturating_duration_since(*t) > METER_WINDOW {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the limiter with batches of `batch` records for `secs` simulated seconds and returns
    /// the achieved records per second.
    fn simulate(l: &mut Limiter, batch: u64, secs: f64) -> f64 {
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        while now.duration_since(start).as_secs_f64() < secs {
            now += l.delay(now);
            l.spend(batch, batch * 100, now);
            sent += batch;
        }
        sent as f64 / now.duration_since(start).as_secs_f64()
    }

    #[test]
    fn unlimited_never_waits() {
        let now = Instant::now();
        let mut l = Limiter::new(0, 0, now);
        l.spend(1_000_000, 1 << 30, now);
        assert_eq!(l.delay(now), Duration::ZERO);
    }

    #[test]
    fn the_records_limit_holds_within_ten_percent_for_any_batch_size() {
        for batch in [1, 7, 100, 500, 5000] {
            let mut l = Limiter::new(1000, 0, Instant::now());
            let rate = simulate(&mut l, batch, 100.0);
            assert!(
                (rate - 1000.0).abs() / 1000.0 < 0.1,
                "batch {batch}: {rate}/s"
            );
        }
    }

    #[test]
    fn the_bytes_limit_holds_too() {
        let mut l = Limiter::new(0, 50_000, Instant::now());
        // 100 bytes per record in `simulate`: 50 kB/s is 500 records/s.
        let rate = simulate(&mut l, 50, 100.0);
        assert!((rate - 500.0).abs() / 500.0 < 0.1, "{rate}/s");
    }

    #[test]
    fn pushback_halves_the_rate_and_it_recovers_gradually() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1000, 0, t0);
        l.throttle(0.0, 0.0, t0);
        assert_eq!(l.records_limit(), Some(500.0));
        l.throttle(0.0, 0.0, t0);
        assert_eq!(l.records_limit(), Some(250.0));
        l.delay(t0 + Duration::from_secs(2));
        let after_2s = l.records_limit().unwrap();
        assert!((after_2s - 350.0).abs() < 1.0, "{after_2s}");
        l.delay(t0 + Duration::from_secs(60));
        assert_eq!(
            l.records_limit(),
            Some(1000.0),
            "never above the configured limit"
        );
    }

    #[test]
    fn pushback_without_a_limit_starts_from_the_measured_rate_and_lifts_when_recovered() {
        let t0 = Instant::now();
        let mut l = Limiter::new(0, 0, t0);
        l.throttle(4000.0, 0.0, t0);
        assert_eq!(l.records_limit(), Some(2000.0));
        l.delay(t0 + Duration::from_secs(30));
        assert_eq!(l.records_limit(), None);
    }

    #[test]
    fn the_factor_has_a_floor() {
        let t0 = Instant::now();
        let mut l = Limiter::new(6400, 0, t0);
        for _ in 0..100 {
            l.throttle(0.0, 0.0, t0);
        }
        assert_eq!(l.records_limit(), Some(100.0));
    }

    #[test]
    fn the_meter_reports_the_rate_over_its_window() {
        let t0 = Instant::now();
        let mut m = Meter::default();
        for i in 0..20 {
            m.record(100, 1000, t0 + Duration::from_millis(500 * i));
        }
        let (r, b) = m.rate(t0 + Duration::from_millis(9_500));
        assert!(
            (r - 200.0).abs() < 1e-9 && (b - 2000.0).abs() < 1e-9,
            "{r} {b}"
        );
        assert_eq!(m.rate(t0 + Duration::from_secs(60)).0, 0.0);
    }
}
