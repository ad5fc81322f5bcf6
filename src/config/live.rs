//! The settings that change without a restart: drain rate limits, batch sizes, the log filter.
//!
//! The agent owns the running [`Config`]; when a reload (console `save`, downlink `set_config`,
//! SIGHUP, `POST /reload`) changes only keys listed in [`RUNTIME_KEYS`], it publishes the new values
//! through a [`Live`] handle and the threads that use them pick them up at their next loop. Any other
//! key needs a restart ([`super::edit::plan`] tells which).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::Config;

/// Keys that apply without a restart, in the dotted form of the config file.
pub const RUNTIME_KEYS: [&str; 5] = [
    "uplink.max_records_per_sec",
    "uplink.max_bytes_per_sec",
    "uplink.batch_max_records",
    "uplink.batch_max_bytes",
    "log.level",
];

/// True if `key` is one of [`RUNTIME_KEYS`].
pub fn is_runtime_key(key: &str) -> bool {
    RUNTIME_KEYS.contains(&key)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSettings {
    pub max_records_per_sec: u64,
    pub max_bytes_per_sec: u64,
    pub batch_max_records: usize,
    pub batch_max_bytes: u64,
    pub log_level: String,
}

impl LiveSettings {
    pub fn of(cfg: &Config) -> LiveSettings {
        LiveSettings {
            max_records_per_sec: cfg.uplink.max_records_per_sec,
            max_bytes_per_sec: cfg.uplink.max_bytes_per_sec,
            batch_max_records: cfg.uplink.batch_max_records,
            batch_max_bytes: cfg.uplink.batch_max_bytes,
            log_level: cfg.log.level.clone(),
        }
    }
}

/// Cheap clonable handle on the current [`LiveSettings`] and a generation that counts changes.
#[derive(Debug, Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Mutex<LiveSettings>,
    generation: AtomicU64,
}

impl Live {
    pub fn new(settings: LiveSettings) -> Live {
        Live {
            inner: Arc::new(Inner {
                settings: Mutex::new(settings),
                generation: AtomicU64::new(0),
            }),
        }
    }

    pub fn get(&self) -> LiveSettings {
        self.lock().clone()
    }

    /// Publishes `settings`; readers see them at their next [`Live::changed_since`].
    pub fn set(&self, settings: LiveSettings) {
        *self.lock() = settings;
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The settings if they changed since the generation in `seen`, which is updated. One atomic load
    /// when nothing changed, so a loop can ask every iteration.
    pub fn changed_since(&self, seen: &mut u64) -> Option<LiveSettings> {
        let now = self.inner.generation.load(Ordering::SeqCst);
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(self.get())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveSettings> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.inner
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: u64) -> LiveSettings {
        LiveSettings {
            max_records_per_sec: rate,
            max_bytes_per_sec: 0,
            batch_max_records: 500,
            batch_max_bytes: 1 << 20,
            log_level: "info".into(),
        }
    }

    #[test]
    fn readers_see_each_change_once() {
        let live = Live::new(settings(0));
        let mut seen = 0;
        assert_eq!(live.changed_since(&mut seen), None);
        live.clone().set(settings(10));
        assert_eq!(live.changed_since(&mut seen), Some(settings(10)));
        assert_eq!(live.changed_since(&mut seen), None);
    }
}
