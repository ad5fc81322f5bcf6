//! `ferry run`: opens the journal, starts the threads, waits for a signal, and shuts down in the
//! order that keeps the promise: stop intake, make the journal durable, let the in-flight upload
//! finish or abandon it by its deadline, disconnect, join.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::config::Config;
use crate::control::{self, Sources};
use crate::identity;
use crate::ingest;
use crate::journal::{self, Journal};
use crate::notify::{Notifier, Tick, WatchdogPolicy};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::uplink;

/// How long the ingest threads get to ack what is durable and disconnect.
const INGEST_STOP: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Journal(#[from] journal::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error("cannot start thread")]
    Spawn(#[source] std::io::Error),
    #[error("thread {0} stopped unexpectedly")]
    ThreadDied(String),
}

pub fn run(cfg: Config) -> Result<(), Error> {
    // Read before anything can fail, so that a bad NOTIFY_SOCKET is reported and ignored: the agent
    // still runs (systemd then restarts it for a missing READY=1, which the log explains).
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        error!("{}; not notifying systemd", crate::error_chain(&e));
        None
    });
    let shutdown = Shutdown::new();
    shutdown.install_signal_handlers().map_err(Error::Signals)?;
    let journal = Journal::open(&journal::Options {
        dir: cfg.journal.dir.clone(),
        max_bytes: cfg.journal.max_bytes,
        on_full: cfg.journal.on_full,
        cache_bytes: cfg.journal.cache_bytes,
        fixed_budget: None,
    })?;
    let device_id = identity::resolve(cfg.device.id.as_deref(), &cfg.journal.dir)?;
    let client_id = cfg
        .mqtt
        .client_id
        .clone()
        .unwrap_or_else(|| format!("ferry-{device_id}"));
    let stats = Arc::new(Stats::default());
    stats.journal_accepting.store(true, Ordering::Relaxed);

    let sources = Sources {
        device_id: device_id.clone(),
        journal: journal.clone(),
        stats: Arc::clone(&stats),
        started: Instant::now(),
    };
    let control = control::spawn(cfg.control.listen, sources, shutdown.clone())?;
    let ingest = ingest::spawn(
        &cfg.mqtt,
        client_id.clone(),
        journal.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    )
    .map_err(Error::Spawn)?;
    let uplink = uplink::spawn(
        cfg.uplink.clone(),
        device_id.clone(),
        journal.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    )
    .map_err(Error::Spawn)?;
    info!(
        "ferry {} running device_id={} client_id={} journal={}",
        env!("CARGO_PKG_VERSION"),
        device_id,
        client_id,
        cfg.journal.dir.display()
    );

    notify(notifier.as_ref(), "READY=1\nSTATUS=running");
    let mut watchdog = notifier
        .as_ref()
        .and_then(Notifier::watchdog_timeout)
        .map(|t| WatchdogPolicy::new(t, Stats::get(&stats.writer_beats), Instant::now()));

    let threads = [&ingest.mqtt, &ingest.writer, &uplink, &control];
    let mut died = None;
    while !shutdown.is_set() {
        if let Some(t) = threads.iter().find(|t| t.is_finished()) {
            let name = t.thread().name().unwrap_or("?").to_string();
            error!("thread {} stopped unexpectedly; shutting down", name);
            died = Some(name);
            shutdown.trigger();
            break;
        }
        if let Some(w) = watchdog.as_mut() {
            // Every thread is alive (checked above); the policy checks the writer's progress.
            match w.tick(Stats::get(&stats.writer_beats), Instant::now()) {
                Tick::Ping => notify(notifier.as_ref(), "WATCHDOG=1"),
                Tick::Wait => {}
                Tick::Stalled(d) => {
                    error!(
                        "journal writer made no progress for {:?}; withholding watchdog pings so that systemd restarts ferry",
                        d
                    );
                    notify(notifier.as_ref(), "STATUS=journal writer stalled");
                }
                Tick::Recovered => {
                    info!("journal writer moving again; watchdog pings resume");
                    notify(notifier.as_ref(), "WATCHDOG=1\nSTATUS=running");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    notify(notifier.as_ref(), "STOPPING=1");
    info!("shutting down");
    let started = Instant::now();
    join_by(ingest.mqtt, started + INGEST_STOP);
    join_by(ingest.writer, started + INGEST_STOP);
    if let Err(e) = journal.sync() {
        error!("final journal sync failed: {}", crate::error_chain(&e));
    }
    join_by(
        uplink,
        started + cfg.uplink.shutdown_grace.max(Duration::from_millis(500)),
    );
    join_by(control, started + Duration::from_secs(2));
    let p = journal.positions();
    info!(
        "stopped head_seq={} acked_seq={} backlog_records={} in {:?}",
        p.head_seq,
        p.acked_seq,
        p.backlog_records,
        started.elapsed()
    );
    match died {
        Some(name) => Err(Error::ThreadDied(name)),
        None => Ok(()),
    }
}

/// Sends a notification to systemd, if it listens. A failed send is logged, not fatal: a missed
/// watchdog ping is what the watchdog is for.
fn notify(notifier: Option<&Notifier>, state: &str) {
    if let Some(n) = notifier {
        if let Err(e) = n.send(state) {
            warn!("{}", crate::error_chain(&e));
        }
    }
}

/// Joins `handle` if it finishes by `deadline`; otherwise leaves it to end with the process. Used
/// for the uplink, whose in-flight request is abandoned (and later resent) rather than awaited.
fn join_by(handle: JoinHandle<()>, deadline: Instant) {
    let name = handle.thread().name().unwrap_or("?").to_string();
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            warn!(
                "thread {} did not stop in time; abandoning its work (nothing acknowledged is lost)",
                name
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if handle.join().is_err() {
        error!("thread {} panicked", name);
    }
}
