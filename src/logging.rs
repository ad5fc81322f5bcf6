//! The process logger: env_logger behind a filter that can be replaced at runtime (`log.level`,
//! changed from the console or the cloud without a restart).
//!
//! `FERRY_LOG` (else `RUST_LOG`) set at start wins over the config file for the life of the process,
//! so a person debugging with it is not overridden by a reload.
//!
//! [`Repeats`] (from `ferry-util`) keeps a failure that repeats on every retry from flooding the log.

use std::sync::{OnceLock, PoisonError, RwLock};

use log::{Log, Metadata, Record};

pub use ferry_util::Repeats;

/// sled's own logger repeats an I/O error every second from its flusher thread; the journal reports
/// sled's failures itself, once, so sled is silent unless a filter names it.
const QUIET: &str = "sled=off";

static LOGGER: OnceLock<Reloadable> = OnceLock::new();

struct Reloadable {
    inner: RwLock<env_logger::Logger>,
    from_env: bool,
}

/// Installs the logger with `FERRY_LOG`/`RUST_LOG`, else `default`. Call once, first thing in main.
pub fn init(default: &str) {
    let env = std::env::var("FERRY_LOG").or_else(|_| std::env::var("RUST_LOG"));
    let from_env = env.is_ok();
    let logger = build(&env.unwrap_or_else(|_| default.to_owned()));
    log::set_max_level(logger.filter());
    let installed = LOGGER.get_or_init(|| Reloadable {
        inner: RwLock::new(logger),
        from_env,
    });
    // Fails only if a logger is already installed (a second call): keep the first.
    let _ = log::set_logger(installed);
}

/// Replaces the filter (an env_logger spec already checked by `config::validate_log_filter`).
/// Returns false, changing nothing, when `FERRY_LOG`/`RUST_LOG` fixed the filter at start.
pub fn set_filter(spec: &str) -> bool {
    let Some(l) = LOGGER.get() else {
        return false;
    };
    if l.from_env {
        return false;
    }
    let logger = build(spec);
    log::set_max_level(logger.filter());
    *l.inner.write().unwrap_or_else(PoisonError::into_inner) = logger;
    true
}

fn build(spec: &str) -> env_logger::Logger {
    let spec = if spec.contains("sled") {
        spec.to_owned()
    } else {
        format!("{spec},{QUIET}")
    };
    env_logger::Builder::from_env(env_logger::Env::new().write_style("FERRY_LOG_STYLE"))
        .parse_filters(&spec)
        .format_timestamp_millis()
        .build()
}

impl Log for Reloadable {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.read().enabled(metadata)
    }

    fn log(&self, record: &Record) {
        self.read().log(record)
    }

    fn flush(&self) {
        self.read().flush()
    }
}

impl Reloadable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, env_logger::Logger> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }
}
