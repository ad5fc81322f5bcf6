//! Counters and live state that several threads report into and `/status` reads. Plain atomics: no
//! thread ever waits on another to count.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct Stats {
    /// Records journaled.
    pub ingested: AtomicU64,
    /// Records acknowledged by the cloud.
    pub delivered: AtomicU64,
    /// Records moved to the dead-letter store.
    pub dead_lettered: AtomicU64,
    /// Payloads that failed their topic's parser (journaled as flagged raw).
    pub parse_failed: AtomicU64,
    /// Broker redeliveries recognised and not journaled twice.
    pub redeliveries: AtomicU64,
    /// QoS0 messages dropped because the journal could not keep up (QoS1 is never dropped).
    pub qos0_dropped: AtomicU64,
    /// QoS1 messages left with the broker because the journal could not keep up (taken again
    /// after a reconnect).
    pub left_with_broker: AtomicU64,
    /// Upload attempts that failed.
    pub upload_failures: AtomicU64,
    /// Payload bytes the writer took into the journal (a recognised redelivery, which is rare,
    /// counts too): what the disk writes are compared with.
    pub ingested_bytes: AtomicU64,
    /// Group commits of the journal writer (an append and a sync each).
    pub journal_commits: AtomicU64,
    /// Reopens of the journal after a failed write or sync (each try counts, every 2 s while
    /// the disk keeps failing).
    pub journal_reopens: AtomicU64,
    /// Turns of the journal writer's loop: the agent's watchdog sees the writer make progress.
    pub writer_beats: AtomicU64,
    /// How long QoS1 messages waited for their PUBACK (see [`DelayHistogram`]).
    pub puback_delay: DelayHistogram,
    pub mqtt_connected: AtomicBool,
    pub journal_accepting: AtomicBool,
    uplink: Mutex<UplinkState>,
    mqtt_error: Mutex<Option<String>>,
    /// `None` while no downlink is configured.
    downlink: Mutex<Option<DownlinkState>>,
}

/// Upper bounds (ms) of the [`DelayHistogram`] buckets; one more bucket holds everything above.
pub const DELAY_BUCKETS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000,
];

/// A histogram of delays in fixed buckets ([`DELAY_BUCKETS_MS`]), counted with atomics: the
/// `mqtt` thread observes, `/status` and `/metrics` read. Used for the PUBACK delay: from a QoS1
/// message's arrival to its PUBACK, which waits for the group commit that makes it durable (and
/// for `journal.commit_wait`). The broker holds the message in flight for that long.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    counts: [AtomicU64; DELAY_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

/// A reading of a [`DelayHistogram`]: counts per bucket (not cumulative), the last one above
/// the last bound.
#[derive(Debug, Clone, Serialize)]
pub struct Delays {
    pub le_ms: &'static [u64],
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_ms: f64,
}

impl DelayHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = DELAY_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le as f64)
            .unwrap_or(DELAY_BUCKETS_MS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn read(&self) -> Delays {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        Delays {
            le_ms: &DELAY_BUCKETS_MS,
            count: counts.iter().sum(),
            counts,
            sum_ms: self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

impl Delays {
    /// The bound of the bucket holding the `q` quantile (0..=1): the delay is at most this many
    /// ms. `None` without observations, or when it is above the last bound.
    pub fn quantile_at_most_ms(&self, q: f64) -> Option<u64> {
        crate::status::quantile_at_most(self.le_ms, &self.counts, q)
    }
}

/// What the downlink is doing, for people.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownlinkState {
    /// `connecting`, `connected`, `backoff`, `stopped`.
    pub state: &'static str,
    pub last_error: Option<String>,
    /// Commands executed since start (repeats answered from the store not counted).
    pub commands: u64,
}

/// What the uplink is doing, for people.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkState {
    /// `idle`, `sending`, `throttled` (drain limit), `backoff`, `refused` (401/403/404/409),
    /// `stopped`.
    pub state: &'static str,
    pub last_error: Option<String>,
    pub last_success_ms: Option<u64>,
    pub consecutive_failures: u64,
    /// Acknowledged over the last 10 s.
    pub drain_records_per_sec: f64,
    pub drain_bytes_per_sec: f64,
    /// Effective drain limits (configured, or lowered after 429/503); `None` = unlimited.
    pub limit_records_per_sec: Option<f64>,
    pub limit_bytes_per_sec: Option<f64>,
}

impl Stats {
    pub fn downlink(&self) -> Option<DownlinkState> {
        self.downlink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_downlink(&self, f: impl FnOnce(&mut DownlinkState)) {
        let mut d = self
            .downlink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(d.get_or_insert_with(DownlinkState::default));
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn uplink(&self) -> UplinkState {
        self.uplink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The MQTT connection's last error, cleared on connect.
    pub fn mqtt_error(&self) -> Option<String> {
        self.mqtt_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_mqtt_error(&self, e: Option<String>) {
        *self.mqtt_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    pub fn set_uplink(&self, f: impl FnOnce(&mut UplinkState)) {
        f(&mut self.uplink.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn delays_land_in_their_buckets_and_quantiles_name_the_bound() {
        let h = DelayHistogram::default();
        assert_eq!(h.read().quantile_at_most_ms(0.5), None, "nothing observed");
        for ms in [0, 1, 3, 3, 40, 40, 40, 40, 250, 9000] {
            h.observe(Duration::from_millis(ms));
        }
        let d = h.read();
        assert_eq!(d.count, 10);
        assert_eq!(d.counts[0], 2, "0 and 1 ms are at most 1 ms");
        assert_eq!(d.counts[2], 2, "3 ms: at most 5");
        assert_eq!(d.counts[6], 4, "40 ms: at most 50");
        assert_eq!(*d.counts.last().unwrap(), 1, "9 s: above the last bound");
        assert_eq!(d.quantile_at_most_ms(0.5), Some(50));
        assert_eq!(d.quantile_at_most_ms(0.9), Some(300));
        assert_eq!(d.quantile_at_most_ms(1.0), None, "above the last bound");
        assert!((d.sum_ms - 9417.0).abs() < 1.0, "{}", d.sum_ms);
    }
}
