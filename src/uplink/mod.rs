//! Uplink: the journal to the cloud over HTTP. The only module that names `ureq` (in `http.rs`).
//!
//! The `uplink` thread reads batches from the journal in seq order and hands them to its post
//! threads (`post.rs`), which encode, compress and POST them; up to [`PIPELINE`] uploads are in
//! flight at once, each on its own connection, but only while the cloud acknowledges: after any
//! failure, and while a refused batch is being split, one at a time. Answers are handled in seq
//! order, so the cursor moves only over a contiguous acknowledged prefix (`Journal::ack` after a
//! 2xx); when an upload fails, those behind it are awaited: the ones the cloud acknowledged are
//! acknowledged in the journal once the cursor reaches them, the others are sent again from the
//! cursor. At shutdown the uploads in flight are awaited (the agent stops waiting after
//! `uplink.shutdown_grace`) and recorded. Every request has a connect timeout and a global deadline;
//! statuses are the agent's to handle (`http_status_as_error(false)`) and every response body is
//! read to its end, bounded, so that connections are reused and never pile up half-closed behind
//! a proxy that answers 502 in a loop. What each status means is in `batch::verdict` and
//! `docs/PROTOCOL.md`; what the uplink does with each answer, in `answer.rs`.

mod answer;
mod batch;
mod http;
mod post;
mod rate;
mod resolve;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info};

pub use batch::{
    Annotator, MAX_RETRY_AFTER, OnRefusal, SplitPlan, Verdict, encode_body, parse_retry_after,
    verdict,
};
pub use http::{
    Answer, LocalError, MAX_RESPONSE_BODY, Upload, describe, http_agent, local_request, post, probe,
};
use http::{snippet, wire_body};
pub use post::PIPELINE;
pub use rate::{Limiter, Meter};

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::config::UplinkConfig;
use crate::config::live::{Live, LiveSettings};
use crate::journal::{Entry, Journal};
use crate::protocol::Held;
use crate::shutdown::Shutdown;
use crate::sparkplug::Aliases;
use crate::stats::Stats;
use crate::tls::Material;
use post::{Job, Posted, Posters};

/// At most one repeated warning or error line per this period while a failure persists.
const REPEAT_LOG: Duration = Duration::from_secs(60);
/// While a backlog exists, one INFO progress line per this period.
const PROGRESS_LOG: Duration = Duration::from_secs(60);

/// What the uplink shares with the rest of the agent.
pub struct Deps {
    /// Rate limits and batch sizes changed at runtime.
    pub live: Live,
    pub journal: Journal,
    /// Whether records wait for a trusted clock, and the time they are sent with.
    pub clock: Clock,
    /// Sparkplug B metric names by alias, from the births the `mqtt` thread saw.
    pub aliases: Aliases,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

/// Starts the `uplink` thread. Rate limits and batch sizes follow `live` from then on.
pub fn spawn(
    cfg: UplinkConfig,
    tls: &Material,
    device_id: String,
    deps: Deps,
) -> std::io::Result<JoinHandle<()>> {
    let agent = http_agent(cfg.connect_timeout, cfg.request_timeout, tls);
    let annotator = Annotator {
        clock: Some(deps.clock.clone()),
        aliases: deps.aliases.clone(),
    };
    let posters = Posters::start(&cfg, &agent, &device_id, &annotator, &deps.shutdown)?;
    thread::Builder::new()
        .name("uplink".into())
        .spawn(move || Uplink::new(cfg, posters, device_id, deps).run())
}

/// An upload handed to a post thread, until its answer is handled.
struct Flight {
    id: u64,
    /// The last seq it carries.
    last: u64,
    /// Its answer and entries, once they came back (answers may come out of order; they are
    /// handled in order).
    posted: Option<(Vec<Entry>, Answer)>,
}

/// An upload the cloud acknowledged while one before it was not: acknowledged in the journal once
/// the cursor reaches it, so that it is not sent again.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    first: u64,
    last: u64,
    records: u64,
    bytes: u64,
}

struct Uplink {
    cfg: UplinkConfig,
    device_id: String,
    journal: Journal,
    clock: Clock,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    posters: Posters,
    /// Post threads without an upload in hand.
    idle: Vec<usize>,
    /// Uploads in flight, in seq order.
    flight: VecDeque<Flight>,
    /// Acknowledged uploads beyond the cursor (behind one that failed).
    ahead: Vec<Ahead>,
    next_id: u64,
    /// The last answer was a 2xx: more than one upload may be in flight.
    healthy: bool,
    journal_failing: bool,
    backoff: Backoff,
    plan: SplitPlan,
    failures: u64,
    last_failure_log: Option<Instant>,
    last_progress: Instant,
    limiter: Limiter,
    meter: Meter,
    live: Live,
    /// The generation of `live` last applied.
    live_seen: u64,
    /// `Journal::oldest_unsent_ts_ms` and when it was read: it reads a frame under the journal's
    /// lock, so batches reuse it for up to `OLDEST_UNSENT_EVERY`.
    oldest_unsent: Option<(Instant, Option<u64>)>,
    /// Waiting for a trusted clock to send the next record (said once).
    clock_wait: bool,
}

/// How stale the oldest unsent record's time in a batch's `held` may be.
const OLDEST_UNSENT_EVERY: Duration = Duration::from_secs(1);

impl Uplink {
    fn new(cfg: UplinkConfig, posters: Posters, device_id: String, deps: Deps) -> Uplink {
        let Deps {
            live,
            journal,
            clock,
            stats,
            shutdown,
            ..
        } = deps;
        let backoff = Backoff::new(Duration::from_millis(100), cfg.max_backoff);
        let limiter = Limiter::new(
            cfg.max_records_per_sec,
            cfg.max_bytes_per_sec,
            Instant::now(),
        );
        Uplink {
            cfg,
            device_id,
            journal,
            clock,
            stats,
            shutdown,
            posters,
            idle: (0..PIPELINE).rev().collect(),
            flight: VecDeque::new(),
            ahead: Vec::new(),
            next_id: 0,
            healthy: false,
            journal_failing: false,
            backoff,
            plan: SplitPlan::default(),
            failures: 0,
            last_failure_log: None,
            last_progress: Instant::now(),
            limiter,
            meter: Meter::default(),
            live,
            live_seen: 0,
            oldest_unsent: None,
            clock_wait: false,
        }
    }

    /// Takes up rate limits and batch sizes changed at runtime (`set_config`, console `save`).
    fn follow_live(&mut self) {
        let Some(s) = self.live.changed_since(&mut self.live_seen) else {
            return;
        };
        let LiveSettings {
            max_records_per_sec,
            max_bytes_per_sec,
            batch_max_records,
            batch_max_bytes,
            ..
        } = s;
        if (max_records_per_sec, max_bytes_per_sec)
            != (self.cfg.max_records_per_sec, self.cfg.max_bytes_per_sec)
        {
            self.limiter = Limiter::new(max_records_per_sec, max_bytes_per_sec, Instant::now());
        }
        self.cfg.max_records_per_sec = max_records_per_sec;
        self.cfg.max_bytes_per_sec = max_bytes_per_sec;
        self.cfg.batch_max_records = batch_max_records;
        self.cfg.batch_max_bytes = batch_max_bytes;
    }

    fn run(mut self) {
        info!("uplink started url={}", self.cfg.url);
        self.stats.set_uplink(|u| u.state = "idle");
        self.report_rates();
        while !self.shutdown.is_set() {
            self.follow_live();
            self.log_progress();
            self.report_rates();
            if !self.fill() {
                break;
            }
            if self.flight.is_empty() {
                let acked = self.journal.positions().acked_seq;
                self.journal
                    .wait_for_data(acked, Duration::from_millis(500));
                continue;
            }
            match self.next_answer() {
                Some((entries, answer)) => self.handle(&entries, answer),
                // Shutdown, or a post thread is gone.
                None => break,
            }
        }
        self.finish();
        self.journal.release();
        self.stats.set_uplink(|u| u.state = "stopped");
        info!("uplink stopped");
        self.posters.stop();
    }

    /// At shutdown: lets the uploads in flight finish and records those the cloud acknowledged,
    /// in order, up to the first that was not. Each ends within its request's deadline; the agent
    /// stops waiting for this thread after `uplink.shutdown_grace` (an upload still in flight then
    /// is sent again after the restart).
    fn finish(&mut self) {
        if !self.flight.is_empty() {
            info!(
                "uplink stopping with uploads in flight count={}: waiting for their answers",
                self.flight.len()
            );
        }
        while let Some(front) = self.flight.front() {
            if front.posted.is_none() {
                if !self.receive() {
                    break;
                }
                continue;
            }
            let Some((entries, answer)) = self.flight.pop_front().and_then(|f| f.posted) else {
                break;
            };
            if !matches!(answer, Answer::Status { code, .. } if verdict(code) == Verdict::Ack) {
                break;
            }
            self.handle(&entries, answer);
        }
        self.flight.clear();
    }

    /// How many uploads may be in flight: [`PIPELINE`] while the cloud acknowledges, one after a
    /// failure (until the next 2xx) and while a refused batch is split.
    fn depth(&self) -> usize {
        if self.healthy && self.plan.window().is_none() {
            PIPELINE
        } else {
            1
        }
    }

    /// Reads batches and hands them to idle post threads while the pipeline has room and the
    /// journal has entries. Returns `false` when the uplink must stop (shutdown while pacing).
    fn fill(&mut self) -> bool {
        while self.flight.len() < self.depth() {
            let Some(&poster) = self.idle.last() else {
                break;
            };
            let after = match self.flight.back() {
                Some(f) => f.last,
                None => {
                    let mut acked = self.journal.positions().acked_seq;
                    if self.catch_up(acked) {
                        acked = self.journal.positions().acked_seq;
                    }
                    self.plan.skip_acked(acked);
                    acked
                }
            };
            // Up to the split window, and not into an upload acknowledged already.
            let before_ahead = self
                .ahead
                .iter()
                .filter(|a| a.first > after)
                .map(|a| a.first - 1)
                .min();
            let through = match (self.plan.window().map(|(_, to)| to), before_ahead) {
                (Some(w), Some(a)) => Some(w.min(a)),
                (w, a) => w.or(a),
            };
            if through.is_some_and(|t| t <= after) {
                break;
            }
            let read = self.journal.read_after(
                after,
                through,
                self.cfg.batch_max_records,
                self.cfg.batch_max_bytes,
            );
            if read.is_ok() && self.journal_failing {
                info!("journal readable again");
                self.journal_failing = false;
            }
            let mut entries = match read {
                Ok(e) if e.is_empty() => break,
                Ok(e) => e,
                Err(e) => {
                    // The writer reopens a failed journal; say it once, not every second.
                    if !self.journal_failing {
                        error!("cannot read from the journal: {}", crate::error_chain(&e));
                        self.journal_failing = true;
                    }
                    if self.flight.is_empty() {
                        self.shutdown.sleep(Duration::from_secs(1));
                    }
                    break;
                }
            };
            // Records of this boot taken under an untrusted clock wait for it (`clock`).
            if let Some(held) = entries
                .iter()
                .position(|e| matches!(e, Entry::Record(r) if self.clock.holds(r)))
            {
                if held == 0 {
                    if !self.clock_wait {
                        info!(
                            "uplink waiting for a trusted wall clock to send seq={} on (at most \
                             clock.hold after start)",
                            entries[0].first_seq()
                        );
                        self.clock_wait = true;
                        self.stats.set_uplink(|u| u.state = "waiting for the clock");
                    }
                    // Nothing of this read goes out now: it protects nothing from trimming.
                    self.journal.unread_after(after);
                    if self.flight.is_empty() {
                        self.shutdown.sleep(Duration::from_millis(200));
                    }
                    break;
                }
                entries.truncate(held);
                self.journal.unread_after(span(&entries).1);
            }
            self.clock_wait = false;
            if !self.pace(&entries) {
                return false;
            }
            let last = span(&entries).1;
            let id = self.next_id;
            self.next_id += 1;
            let held = self.held();
            if self
                .posters
                .send(poster, Job { id, entries, held })
                .is_err()
            {
                error!("post thread uplink-post-{poster} is gone; stopping the uplink");
                return false;
            }
            self.idle.pop();
            self.flight.push_back(Flight {
                id,
                last,
                posted: None,
            });
            self.stats.set_uplink(|u| u.state = "sending");
        }
        true
    }

    /// Waits for the answer to the oldest upload in flight, keeping answers to later ones until
    /// their turn. `None` when shutdown came first or a post thread is gone.
    fn next_answer(&mut self) -> Option<(Vec<Entry>, Answer)> {
        loop {
            if self.flight.front().is_some_and(|f| f.posted.is_some()) {
                return self.flight.pop_front().and_then(|f| f.posted);
            }
            if self.shutdown.is_set() || !self.receive() {
                return None;
            }
        }
    }

    /// Takes one answer from the post threads, waiting up to a slice of time. Returns `false` when
    /// a post thread with an upload in hand ended without answering (it panicked): the uplink
    /// then stops, and the agent with it, to be restarted.
    fn receive(&mut self) -> bool {
        let posted = match self
            .posters
            .answers
            .recv_timeout(Duration::from_millis(200))
        {
            Ok(posted) => posted,
            Err(RecvTimeoutError::Timeout) => {
                let busy = (0..PIPELINE).filter(|n| !self.idle.contains(n));
                let lost = busy.into_iter().find(|n| self.posters.stopped(*n));
                let Some(n) = lost else {
                    return true;
                };
                // It may have answered just before it ended.
                match self.posters.answers.try_recv() {
                    Ok(posted) => posted,
                    Err(_) => {
                        error!("post thread uplink-post-{n} ended without an answer");
                        return false;
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return false,
        };
        let Posted {
            id,
            poster,
            entries,
            answer,
        } = posted;
        self.idle.push(poster);
        if let Some(f) = self.flight.iter_mut().find(|f| f.id == id) {
            f.posted = Some((entries, answer));
        }
        true
    }

    /// Gives up the uploads still in flight (after the one before them was not acknowledged):
    /// waits for their answers, so that no post thread is busy when the next batch goes. With
    /// `keep`, those the cloud acknowledged are remembered ([`Uplink::catch_up`]); the others are
    /// sent again from the cursor.
    fn abandon(&mut self, keep: bool) {
        while self.flight.iter().any(|f| f.posted.is_none()) {
            if !self.receive() {
                break;
            }
        }
        for f in self.flight.drain(..) {
            let Some((entries, Answer::Status { code, .. })) = f.posted else {
                continue;
            };
            if keep && verdict(code) == Verdict::Ack {
                let (first, last) = span(&entries);
                let (records, bytes) = weigh(&entries);
                debug!(
                    "upload acknowledged behind a failed one first_seq={} last_seq={}",
                    first, last
                );
                self.ahead.push(Ahead {
                    first,
                    last,
                    records,
                    bytes,
                });
            }
        }
    }

    /// Acknowledges in the journal the uploads the cloud acknowledged behind a failed one, as the
    /// cursor (`acked`) reaches them. Returns whether the cursor moved.
    fn catch_up(&mut self, mut acked: u64) -> bool {
        let mut moved = false;
        while let Some(i) = self.ahead.iter().position(|a| a.first == acked + 1) {
            let a = self.ahead.swap_remove(i);
            match self.journal.ack(a.last) {
                Ok(true) => {
                    Stats::add(&self.stats.delivered, a.records);
                    self.meter.record(a.records, a.bytes, Instant::now());
                    acked = a.last;
                    moved = true;
                }
                // Rewound meanwhile: sent again from the new cursor.
                Ok(false) => self.ahead.clear(),
                Err(e) => {
                    error!(
                        "cloud acknowledged seqs {}..={} but the cursor could not be saved: {}",
                        a.first,
                        a.last,
                        crate::error_chain(&e)
                    );
                    self.ahead.clear();
                }
            }
        }
        self.ahead.retain(|a| a.first > acked);
        moved
    }

    /// Waits until the drain limits allow `entries` to go, then charges them. Returns `false` when
    /// shutdown came first.
    fn pace(&mut self, entries: &[Entry]) -> bool {
        let wait = self.limiter.delay(Instant::now());
        if !wait.is_zero() {
            debug!("drain limit: waiting {:?}", wait);
            self.stats.set_uplink(|u| u.state = "throttled");
            if !self.shutdown.sleep(wait) {
                self.journal.release();
                return false;
            }
        }
        let (records, bytes) = weigh(entries);
        self.limiter.spend(records, bytes, Instant::now());
        true
    }

    /// Publishes the drain rate and limits for `/status`.
    fn report_rates(&mut self) {
        let (r, b) = self.meter.rate(Instant::now());
        let (lr, lb) = (self.limiter.records_limit(), self.limiter.bytes_limit());
        self.stats.set_uplink(|u| {
            u.drain_records_per_sec = r;
            u.drain_bytes_per_sec = b;
            u.limit_records_per_sec = lr;
            u.limit_bytes_per_sec = lb;
        });
    }

    /// What the journal holds now, as the batches report it to the center; the oldest unsent
    /// record's time as of at most `OLDEST_UNSENT_EVERY` ago, none when nothing is unsent.
    fn held(&mut self) -> Held {
        let p = self.journal.positions();
        if p.acked_seq >= p.durable_seq {
            return held(&p, None);
        }
        let now = Instant::now();
        let oldest = match self.oldest_unsent {
            Some((at, ts)) if now.duration_since(at) < OLDEST_UNSENT_EVERY => ts,
            _ => {
                // Unknown when the journal cannot be read: the center keeps its last report.
                let ts = self
                    .journal
                    .oldest_unsent()
                    .ok()
                    .flatten()
                    .map(|r| self.clock.taken_at_ms(&r));
                self.oldest_unsent = Some((now, ts));
                ts
            }
        };
        held(&p, oldest)
    }

    fn log_progress(&mut self) {
        if self.last_progress.elapsed() < PROGRESS_LOG {
            return;
        }
        self.last_progress = Instant::now();
        let p = self.journal.positions();
        if p.backlog_records > 0 {
            info!(
                "progress acked_seq={} head_seq={} backlog_records={} backlog_bytes={}",
                p.acked_seq, p.head_seq, p.backlog_records, p.backlog_bytes
            );
        }
    }
}

/// The account of what the gateway holds that uploads and the downlink hello carry (protocol
/// `held`): every durable seq is the gateway's to deliver, every seq up to the cursor was
/// acknowledged.
pub(crate) fn held(p: &crate::journal::Positions, oldest_unsent_ts_ms: Option<u64>) -> Held {
    Held {
        head_seq: p.durable_seq,
        acked_seq: p.acked_seq,
        oldest_unsent_ts_ms,
        backlog_bytes: Some(p.backlog_bytes),
    }
}

/// Records and payload bytes in `entries` (what the drain limits count).
fn weigh(entries: &[Entry]) -> (u64, u64) {
    entries.iter().fold((0, 0), |(n, b), e| match e {
        Entry::Record(r) => (n + 1, b + r.payload.len() as u64),
        Entry::Gap { .. } => (n, b),
    })
}

fn span(entries: &[Entry]) -> (u64, u64) {
    let first = entries.first().map(Entry::first_seq).unwrap_or(0);
    let last = entries.last().map(Entry::last_seq).unwrap_or(0);
    (first, last)
}
