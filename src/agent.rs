//! `ferry run`: opens the journal, starts the threads, waits for a signal, and shuts down in the
//! order that keeps the promise: stop intake, make the journal durable, let the in-flight upload
//! finish or abandon it by its deadline, disconnect, join.
//!
//! The main loop also owns the running configuration: on SIGHUP or a [`reload::Reloader`] request it re-reads
//! the file, applies runtime keys at once ([`Live`]) and restarts the agent for the rest
//! ([`Exit::Restart`]: `main` replaces the process with a fresh `ferry run`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::clock::Clock;
use crate::config::Config;
use crate::config::edit::{self, Plan};
use crate::config::live::{Live, LiveSettings};
use crate::console;
use crate::control;
use crate::downlink;
use crate::identity;
use crate::ingest;
use crate::journal::{self, Journal};
use crate::notify::{Notifier, Tick, WatchdogPolicy};
use crate::operator::{self, Operator};
use crate::reload;
use crate::shutdown::Shutdown;
use crate::sparkplug::{Aliases, Tracker};
use crate::stats::Stats;
use crate::status;
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

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Stopped,
    /// A reload changed keys that only apply at start.
    Restart,
}

pub fn run(mut cfg: Config) -> Result<Exit, Error> {
    // Read before anything can fail, so that a bad NOTIFY_SOCKET is reported and ignored: the agent
    // still runs (systemd then restarts it for a missing READY=1, which the log explains).
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        error!("{}; not notifying systemd", crate::error_chain(&e));
        None
    });
    let shutdown = Shutdown::new();
    shutdown.install_signal_handlers().map_err(Error::Signals)?;
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .map_err(Error::Signals)?;
    if crate::logging::set_filter(&cfg.log.level) {
        log::debug!("log filter from the config file: {}", cfg.log.level);
    }
    let live = Live::new(LiveSettings::of(&cfg));
    let (reloader, requests) = reload::channel();
    let journal = Journal::open(&journal::Options {
        dir: cfg.journal.dir.clone(),
        max_bytes: cfg.journal.max_bytes,
        on_full: cfg.journal.on_full,
        cache_bytes: cfg.journal.cache_bytes,
        replay_window: cfg.journal.replay_window,
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
    let clock = Clock::new(cfg.clock.clone(), journal.clone());
    let aliases = Aliases::default();
    let clock_thread = clock
        .spawn(cfg.journal.max_age, shutdown.clone())
        .map_err(Error::Spawn)?;

    let status = status::Source {
        device_id: device_id.clone(),
        journal: journal.clone(),
        clock: clock.clone(),
        stats: Arc::clone(&stats),
        started: Instant::now(),
        written_at_start: status::written_bytes(),
    };
    // One executor of operator commands for the control endpoint, the console and the downlink.
    let operator = Operator::in_agent(
        &cfg.source,
        operator::Agent {
            status: status.clone(),
            reloader: reloader.clone(),
            publisher: ingest::CommandPublisher::new(&cfg.mqtt, &client_id),
        },
    );
    let access = control::Access::new(control::token(&cfg, true)?, cfg.control.listen);
    let control = control::spawn(
        cfg.control.listen,
        access,
        status,
        operator.clone(),
        shutdown.clone(),
    )?;
    let console = match &cfg.console.device {
        Some(device) => Some(
            console::spawn(
                device.clone(),
                cfg.clone(),
                operator.clone(),
                shutdown.clone(),
            )
            .map_err(Error::Spawn)?,
        ),
        None => None,
    };
    let ingest = ingest::spawn(
        &cfg.mqtt,
        cfg.journal.commit_wait,
        client_id.clone(),
        resumed_tracker(
            &journal,
            Tracker::new(
                aliases.clone(),
                cfg.sparkplug
                    .rebirth
                    .then_some(cfg.sparkplug.rebirth_period),
            ),
        ),
        ingest::Parts {
            journal: journal.clone(),
            clock: clock.clone(),
            stats: Arc::clone(&stats),
            shutdown: shutdown.clone(),
        },
    )
    .map_err(Error::Spawn)?;
    let uplink = uplink::spawn(
        cfg.uplink.clone(),
        &cfg.tls.material,
        device_id.clone(),
        uplink::Deps {
            live: live.clone(),
            journal: journal.clone(),
            clock: clock.clone(),
            aliases,
            stats: Arc::clone(&stats),
            shutdown: shutdown.clone(),
        },
    )
    .map_err(Error::Spawn)?;
    // Without a [downlink] section the agent runs uplink-only.
    let downlink = match &cfg.downlink {
        Some(d) => Some(
            downlink::spawn(
                d.clone(),
                d.token.clone().or_else(|| cfg.uplink.token.clone()),
                &cfg.tls.material,
                downlink::Deps {
                    device_id: device_id.clone(),
                    journal: journal.clone(),
                    stats: Arc::clone(&stats),
                    clock: clock.clone(),
                    operator,
                },
                shutdown.clone(),
            )
            .map_err(Error::Spawn)?,
        ),
        None => None,
    };
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

    // Each of these runs until shutdown (the console reopens its device after a hang-up): one that
    // ends early has panicked, and the agent stops so that its supervisor starts it whole again.
    let mut threads = vec![&ingest.mqtt, &ingest.writer, &uplink, &control];
    threads.extend(downlink.as_ref());
    threads.extend(console.as_ref());
    let mut died = None;
    let mut exit = Exit::Stopped;
    while !shutdown.is_set() {
        if let Some(t) = threads.iter().find(|t| t.is_finished()) {
            let name = t.thread().name().unwrap_or("?").to_string();
            error!("thread {} stopped unexpectedly; shutting down", name);
            died = Some(name);
            shutdown.trigger();
            break;
        }
        keep_watchdog(watchdog.as_mut(), notifier.as_ref(), &stats);
        let request = requests.next(Duration::from_millis(100));
        let asked = request.is_some() || hangup.swap(false, Ordering::SeqCst);
        if asked && answer_reload(request, &mut cfg, &live) {
            exit = Exit::Restart;
            shutdown.trigger();
        }
    }
    // Nobody answers reloads from here on: a console save or a downlink set_config waiting for
    // one (or still queued) fails now instead of at its 10 s timeout, past its thread's join deadline.
    drop(requests);
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
    join_by(clock_thread, started + Duration::from_secs(2));
    if let Some(console) = console {
        join_by(console, started + Duration::from_secs(2));
    }
    if let Some(downlink) = downlink {
        // A command in progress ends within a second of shutdown (a publish watches it, a reload
        // is refused once the main loop stopped); then the close handshake, bounded by its own wait.
        join_by(downlink, started + Duration::from_secs(8));
    }
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
        None => Ok(exit),
    }
}

/// Sends a watchdog ping while the journal writer makes progress, and withholds it (saying why)
/// while it does not, so that systemd restarts a stuck agent.
fn keep_watchdog(
    watchdog: Option<&mut WatchdogPolicy>,
    notifier: Option<&Notifier>,
    stats: &Stats,
) {
    let Some(w) = watchdog else {
        return;
    };
    // Every thread is alive (checked by the caller); the policy checks the writer's progress.
    match w.tick(Stats::get(&stats.writer_beats), Instant::now()) {
        Tick::Ping => notify(notifier, "WATCHDOG=1"),
        Tick::Wait => {}
        Tick::Stalled(d) => {
            error!(
                "journal writer made no progress for {:?}; withholding watchdog pings so that systemd restarts ferry",
                d
            );
            notify(notifier, "STATUS=journal writer stalled");
        }
        Tick::Recovered => {
            info!("journal writer moving again; watchdog pings resume");
            notify(notifier, "WATCHDOG=1\nSTATUS=running");
        }
    }
}

/// Handles one reload or restart request (`None`: SIGHUP) and answers it; true if the agent must
/// restart to apply the outcome.
fn answer_reload(
    request: Option<(reload::Request, std::sync::mpsc::Sender<reload::Outcome>)>,
    cfg: &mut Config,
    live: &Live,
) -> bool {
    let outcome = match request.as_ref().map(|(r, _)| *r) {
        Some(reload::Request::Restart) => {
            info!("restarting on request");
            Ok(Plan {
                changes: Vec::new(),
                restart_keys: vec!["(restart requested)".to_owned()],
            })
        }
        _ => reload_config(cfg, live),
    };
    let restart = matches!(&outcome, Ok(plan) if plan.needs_restart());
    if let Some((_, reply)) = request {
        let _ = reply.send(outcome);
    }
    restart
}

/// Re-reads the config file: runtime keys apply now, a change to any other key asks for a restart.
/// A file that does not validate changes nothing.
fn reload_config(cfg: &mut Config, live: &Live) -> reload::Outcome {
    let new = match Config::load(&cfg.source) {
        Ok(new) => new,
        Err(e) => {
            let msg = crate::error_chain(&e);
            error!("config reload failed, keeping the running config: {}", msg);
            return Err(msg);
        }
    };
    let plan: Plan = edit::plan(cfg, &new);
    for change in &plan.changes {
        info!("config changed {}", change);
    }
    if plan.changes.is_empty() {
        info!("config reloaded, nothing changed");
    }
    if new.log.level != cfg.log.level && !crate::logging::set_filter(&new.log.level) {
        warn!("log.level not applied: FERRY_LOG or RUST_LOG fixes the log filter of this process");
    }
    live.set(LiveSettings::of(&new));
    if plan.needs_restart() {
        info!("restarting to apply keys={}", plan.restart_keys.join(","));
    }
    *cfg = new;
    Ok(plan)
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

/// Records the Sparkplug tracker follows again at start, the newest of the journal.
const SPARKPLUG_RESUME_RECORDS: u64 = 10_000;

/// `tracker` after the journal's newest records ([`SPARKPLUG_RESUME_RECORDS`]): the edge nodes
/// as ferry left them (their `seq`, `bdSeq` and births), so that a message lost while ferry was
/// down is a gap, not an unknown. A journal that cannot be read leaves it empty (said at WARN).
fn resumed_tracker(journal: &Journal, mut tracker: Tracker) -> Tracker {
    let mut replayed = 0u64;
    let read = journal.visit_recent(SPARKPLUG_RESUME_RECORDS, |r| {
        if crate::sparkplug::is_sparkplug_topic(&r.topic) {
            tracker.replay(&r.topic, &r.payload, r.ts_ms);
            replayed += 1;
        }
    });
    match read {
        Ok(()) if replayed > 0 => info!(
            "sparkplug: following {} edge nodes again from the journal's newest {} messages",
            tracker.nodes(),
            replayed
        ),
        Ok(()) => {}
        Err(e) => warn!(
            "sparkplug: the journal's newest records cannot be read ({}): each edge node's first \
             message is reported as unknown, as after a first start",
            crate::error_chain(&e)
        ),
    }
    tracker
}
