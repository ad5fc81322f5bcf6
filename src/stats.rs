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
    pub mqtt_connected: AtomicBool,
    pub journal_accepting: AtomicBool,
    uplink: Mutex<UplinkState>,
    mqtt_error: Mutex<Option<String>>,
    /// `None` while no downlink is configured.
    downlink: Mutex<Option<DownlinkState>>,
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
