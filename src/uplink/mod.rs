//! Uplink: the journal to the cloud over HTTP. The only module that names `ureq`.
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
//! `docs/PROTOCOL.md`.

mod batch;
mod post;
mod rate;
mod resolve;

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};

pub use batch::{
    MAX_RETRY_AFTER, OnRefusal, SplitPlan, Verdict, encode_body, parse_retry_after, verdict,
};
pub use post::PIPELINE;
pub use rate::{Limiter, Meter};

use crate::backoff::Backoff;
use crate::config::live::{Live, LiveSettings};
use crate::config::{Compression, UplinkConfig};
use crate::journal::{Entry, Journal};
use crate::protocol::IDEMPOTENCY_HEADER;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::Material;
use post::{Job, Posted, Posters};

/// Largest response body read; the rest of a larger one is dropped with its connection.
pub const MAX_RESPONSE_BODY: u64 = 64 * 1024;
/// At most one repeated warning or error line per this period while a failure persists.
const REPEAT_LOG: Duration = Duration::from_secs(60);
/// While a backlog exists, one INFO progress line per this period.
const PROGRESS_LOG: Duration = Duration::from_secs(60);

/// How the cloud answered one upload, as the uplink reads it.
#[derive(Debug)]
pub enum Answer {
    /// A complete status line and headers. A body that broke off or ran over
    /// [`MAX_RESPONSE_BODY`] is kept as a note, except after a 2xx, which is then `Failed`.
    Status {
        code: u16,
        /// `Retry-After`, parsed and clamped; `None` when absent or unparseable.
        retry_after: Option<Duration>,
        /// The body as lossy UTF-8, at most [`MAX_RESPONSE_BODY`] bytes of it.
        body: String,
    },
    /// No usable answer: DNS, connect, TLS, timeout, reset, a malformed response, or a 2xx whose
    /// body broke off (the cloud may or may not have stored the batch: resend, never ack).
    Failed(ureq::Error),
}

/// One upload request: where to, as whom, and the encoded (possibly gzipped) body.
#[derive(Debug, Clone, Copy)]
pub struct Upload<'a> {
    pub url: &'a str,
    pub device_id: &'a str,
    /// The first and last seq the body carries, for the idempotency key.
    pub first: u64,
    pub last: u64,
    pub token: Option<&'a str>,
    pub gzip: bool,
    pub body: &'a [u8],
}

/// Starts the `uplink` thread. Rate limits and batch sizes follow `live` from then on.
pub fn spawn(
    cfg: UplinkConfig,
    tls: &Material,
    live: Live,
    device_id: String,
    journal: Journal,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let agent = http_agent(cfg.connect_timeout, cfg.request_timeout, tls);
    let posters = Posters::start(&cfg, &agent, &device_id, &shutdown)?;
    thread::Builder::new()
        .name("uplink".into())
        .spawn(move || Uplink::new(cfg, posters, live, device_id, journal, stats, shutdown).run())
}

/// Builds the HTTP agent with a deadline on every phase. Shared with the console's `test uplink`,
/// so that a test exercises exactly what the uplink uses. TLS comes from `[tls]` (shared with
/// the downlink) and from ferry's one crypto provider.
pub fn http_agent(
    connect_timeout: Duration,
    request_timeout: Duration,
    tls: &Material,
) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let roots = match &tls.roots {
        Some(certs) => RootCerts::new_with_certs(
            &certs
                .iter()
                .map(|c| Certificate::from_der(c).to_owned())
                .collect::<Vec<_>>(),
        ),
        None => RootCerts::WebPki,
    };
    // ureq takes the key as PEM (its key kinds are private); the file was parsed at config load,
    // so failing here is not expected, and would show as a failed handshake, not a panic.
    let client_cert = tls.client.as_ref().and_then(|id| {
        let key = PrivateKey::from_pem(&id.key_pem).ok()?;
        let chain: Vec<_> = id
            .chain
            .iter()
            .map(|c| Certificate::from_der(c).to_owned())
            .collect();
        Some(ClientCert::new_with_certs(&chain, key))
    });
    let tls_config = TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client_cert)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls_config)
        .http_status_as_error(false)
        .timeout_connect(Some(connect_timeout))
        .timeout_global(Some(request_timeout))
        .max_redirects(0)
        .max_idle_connections(4)
        .max_idle_connections_per_host(PIPELINE)
        .max_idle_age(resolve::KEEP)
        .user_agent(format!("ferry/{}", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        resolve::CachingResolver::default(),
    )
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
}

impl Uplink {
    fn new(
        cfg: UplinkConfig,
        posters: Posters,
        live: Live,
        device_id: String,
        journal: Journal,
        stats: Arc<Stats>,
        shutdown: Shutdown,
    ) -> Uplink {
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
            let entries = match read {
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
            if !self.pace(&entries) {
                return false;
            }
            let last = span(&entries).1;
            let id = self.next_id;
            self.next_id += 1;
            if self.posters.send(poster, Job { id, entries }).is_err() {
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

    /// Acts on the answer to the oldest upload in flight.
    fn handle(&mut self, entries: &[Entry], attempt: Answer) {
        let (first, last) = span(entries);
        let acked = matches!(attempt, Answer::Status { code, .. } if verdict(code) == Verdict::Ack);
        if !acked {
            self.healthy = false;
            self.abandon(true);
        }
        let (code, retry_after, body) = match attempt {
            Answer::Failed(e) => {
                self.journal.release();
                let msg = describe(&e);
                self.fail(&msg, None, false);
                return;
            }
            Answer::Status {
                code,
                retry_after,
                body,
            } => (code, retry_after, body),
        };
        match verdict(code) {
            Verdict::Ack => {
                match self.journal.ack(last) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Rewound by a replay_from meanwhile: everything goes again from there.
                        self.abandon(false);
                        self.ahead.clear();
                        return;
                    }
                    Err(e) => {
                        error!(
                            "cloud acknowledged seqs {}..={} but the cursor could not be saved: {}",
                            first,
                            last,
                            crate::error_chain(&e)
                        );
                        self.abandon(false);
                        self.ahead.clear();
                        self.journal.release();
                        self.shutdown.sleep(Duration::from_secs(1));
                        return;
                    }
                }
                self.healthy = true;
                let (records, bytes) = weigh(entries);
                Stats::add(&self.stats.delivered, records);
                self.meter.record(records, bytes, Instant::now());
                self.catch_up(last);
                self.report_rates();
                if self.failures > 0 {
                    info!("uplink recovered after {} failed attempts", self.failures);
                }
                self.failures = 0;
                self.last_failure_log = None;
                self.backoff.reset();
                self.plan.done();
                let state = if self.flight.is_empty() {
                    "idle"
                } else {
                    "sending"
                };
                self.stats.set_uplink(|u| {
                    u.state = state;
                    u.last_success_ms = Some(crate::journal::now_ms());
                    u.consecutive_failures = 0;
                });
            }
            Verdict::Retry => {
                self.journal.release();
                if code == 429 || code == 503 {
                    let (r, b) = self.meter.rate(Instant::now());
                    self.limiter.throttle(r, b, Instant::now());
                    self.report_rates();
                    warn!(
                        "cloud pushed back with status {}: drain limit now {:.0} records/s",
                        code,
                        self.limiter.records_limit().unwrap_or(0.0)
                    );
                }
                self.fail(
                    &format!("status {} {}", code, snippet(&body)),
                    retry_after,
                    false,
                );
            }
            Verdict::Refused => {
                self.journal.release();
                let why = if code == 409 {
                    format!(
                        "another gateway sends as device_id={} (a cloned image?); give this one its own \
                         identity: stop ferry, delete device-id in the journal directory (or set device.id), \
                         start it; data is kept",
                        self.device_id
                    )
                } else {
                    "the cloud refuses this device or the url is wrong; data is kept".to_string()
                };
                self.fail(
                    &format!("status {} {}: {}", code, snippet(&body), why),
                    retry_after,
                    true,
                );
            }
            Verdict::Split => self.split(entries, code, &body),
        }
    }

    fn split(&mut self, entries: &[Entry], code: u16, body: &str) {
        let (first, last) = span(entries);
        match self.plan.refused(entries) {
            OnRefusal::Retry => {
                info!(
                    "cloud refused batch {}..={} with status {}: splitting to isolate the refused record",
                    first, last, code
                );
                self.journal.release();
            }
            OnRefusal::DeadLetter(seq) => {
                let reason = format!("status {} {}", code, snippet(body));
                match self.journal.dead_letter(seq, code, &reason) {
                    Ok(()) => {
                        warn!(
                            "cloud refused record seq={} ({}): moved to dead letters and reported as a rejected gap",
                            seq, reason
                        );
                        Stats::add(&self.stats.dead_lettered, 1);
                        self.plan.done();
                    }
                    Err(e @ crate::journal::Error::DeadLettersFull { .. }) => {
                        self.journal.release();
                        self.fail(
                            &format!("record seq={seq} refused ({reason}) and {e}"),
                            None,
                            true,
                        );
                    }
                    Err(e) => {
                        self.journal.release();
                        error!("cannot dead-letter seq={}: {}", seq, crate::error_chain(&e));
                        self.shutdown.sleep(Duration::from_secs(1));
                    }
                }
            }
            OnRefusal::Stuck => {
                self.journal.release();
                self.fail(
                    &format!(
                        "status {} {} for a batch holding only a gap {}..={}",
                        code,
                        snippet(body),
                        first,
                        last
                    ),
                    None,
                    true,
                );
            }
        }
    }

    /// Counts a failed attempt, logs it without flooding (the first, then one line a minute), and
    /// sleeps the backoff.
    fn fail(&mut self, msg: &str, retry_after: Option<Duration>, refused: bool) {
        self.failures += 1;
        Stats::add(&self.stats.upload_failures, 1);
        let delay = self.backoff.next_delay_at_least(retry_after);
        let due = self
            .last_failure_log
            .is_none_or(|t| t.elapsed() >= REPEAT_LOG);
        if due {
            self.last_failure_log = Some(Instant::now());
            if refused {
                error!(
                    "upload refused: {} (attempts={} retry_in={:?})",
                    msg, self.failures, delay
                );
            } else {
                warn!(
                    "upload failed: {} (attempts={} retry_in={:?})",
                    msg, self.failures, delay
                );
            }
        } else {
            debug!(
                "upload failed: {} (attempts={} retry_in={:?})",
                msg, self.failures, delay
            );
        }
        let failures = self.failures;
        let msg = msg.to_string();
        self.stats.set_uplink(|u| {
            u.state = if refused { "refused" } else { "backoff" };
            u.last_error = Some(msg);
            u.consecutive_failures = failures;
        });
        self.shutdown.sleep(delay);
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

/// POSTs one upload and reads the answer: the status, `Retry-After`, and the body to its end,
/// bounded by [`MAX_RESPONSE_BODY`], so that the connection goes back to the pool. Whatever bytes
/// the peer sends, this returns (within the agent's deadlines) and never allocates more than the
/// bound plus ureq's buffers.
pub fn post(agent: &ureq::Agent, up: &Upload<'_>) -> Answer {
    let mut req = agent
        .post(up.url)
        .header("Content-Type", "application/json")
        .header(
            IDEMPOTENCY_HEADER,
            format!("{}:{}-{}", up.device_id, up.first, up.last),
        );
    if up.gzip {
        req = req.header("Content-Encoding", "gzip");
    }
    if let Some(token) = up.token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let mut resp = match req.send(up.body) {
        Ok(r) => r,
        Err(e) => return Answer::Failed(e),
    };
    let code = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // A body too large (or broken) closes the connection, which is fine: the status is what counts.
    let body = match resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BODY)
        .read_to_vec()
    {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(ureq::Error::BodyExceedsLimit(_)) => {
            format!("(response body over {} KiB)", MAX_RESPONSE_BODY / 1024)
        }
        Err(e) if (200..300).contains(&code) => {
            // A 2xx whose body broke off: the cloud may or may not have stored the batch.
            // Resending is safe (the cloud deduplicates), acknowledging is not.
            return Answer::Failed(e);
        }
        Err(_) => String::new(),
    };
    Answer::Status {
        code,
        retry_after,
        body,
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

/// Sends an empty batch to `cfg.url` through [`post`], with the uplink's own HTTP agent, headers,
/// compression and deadlines (the console's `test uplink`). Returns the round trip of a 2xx answer, or what went wrong in plain
/// words: DNS failure, connection refused, timed out, TLS certificate problem, HTTP status N and what
/// it means.
pub fn probe(cfg: &UplinkConfig, tls: &Material, device_id: &str) -> Result<Duration, String> {
    let agent = http_agent(cfg.connect_timeout, cfg.request_timeout, tls);
    let body = wire_body(cfg.compression, device_id, &[]);
    let started = Instant::now();
    let answer = post(
        &agent,
        &Upload {
            url: &cfg.url,
            device_id,
            first: 0,
            last: 0,
            token: cfg.token.as_ref().map(|t| t.expose()),
            gzip: cfg.compression == Compression::Gzip,
            body: &body,
        },
    );
    let elapsed = started.elapsed();
    match answer {
        Answer::Failed(e) => Err(describe(&e)),
        Answer::Status { code, .. } if (200..300).contains(&code) => Ok(elapsed),
        Answer::Status { code, body, .. } => {
            let answer = snippet(&body);
            let said = if answer.is_empty() {
                String::new()
            } else {
                format!("; the cloud said: {answer}")
            };
            Err(format!("{}{said}", status_words(code)))
        }
    }
}

/// An HTTP status and what it means for the uplink, in plain words.
pub fn status_words(code: u16) -> String {
    let meaning = match code {
        400 => "bad request: the cloud does not understand ferry's batches at this url",
        401 => "unauthorized: uplink.token is missing or wrong",
        403 => "forbidden: the token is not allowed to send for this device",
        404 => "not found: the url's path is wrong",
        405 => "method not allowed: the url is not an ingest endpoint",
        409 => "conflict: the cloud saw this device id with other data (a cloned identity?)",
        413 => "payload too large",
        429 => "too many requests: the cloud asks to slow down",
        300..=399 => "a redirect, which ferry does not follow: use the final url",
        500..=599 => "the cloud has a server error",
        200..=299 => "ok",
        _ => "unexpected",
    };
    format!("HTTP status {code} ({meaning})")
}

/// A transport error in plain words, for logs, `/status` and the console.
pub fn describe(e: &ureq::Error) -> String {
    if let Some(tls) = tls_cause(e) {
        return match tls {
            rustls::Error::InvalidCertificate(c) => {
                format!("TLS certificate problem: the server's certificate is not accepted ({c:?})")
            }
            other => format!("TLS failure: {other}"),
        };
    }
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "DNS failure: host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".into()
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            "connection reset".into()
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "connection closed mid-response".into()
        }
        other => crate::error_chain(other),
    }
}

/// The TLS error behind `e`, if any, wherever it sits in the chain.
fn tls_cause(e: &ureq::Error) -> Option<&rustls::Error> {
    if let ureq::Error::Rustls(t) = e {
        return Some(t);
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    if let ureq::Error::Io(io) = e {
        cur = io
            .get_ref()
            .map(|r| r as &(dyn std::error::Error + 'static));
    }
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// The start of a response body, on one line, for logs.
fn snippet(body: &str) -> String {
    let one_line: String = body
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.trim().to_string()
}

/// The body of an upload of `entries` as it goes on the wire: the JSON batch, gzipped when
/// `compression` says so.
fn wire_body(compression: Compression, device_id: &str, entries: &[Entry]) -> Vec<u8> {
    let body = encode_body(device_id, entries);
    match compression {
        Compression::None => body,
        Compression::Gzip => gzip(&body),
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_are_said_in_plain_words() {
        let io = |k: std::io::ErrorKind| ureq::Error::Io(k.into());
        assert_eq!(
            describe(&io(std::io::ErrorKind::ConnectionRefused)),
            "connection refused"
        );
        assert_eq!(
            describe(&ureq::Error::HostNotFound),
            "DNS failure: host not found"
        );
        assert!(describe(&ureq::Error::Timeout(ureq::Timeout::Connect)).starts_with("timed out"));
        let cert = ureq::Error::Rustls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(
            describe(&cert).starts_with("TLS certificate problem"),
            "{}",
            describe(&cert)
        );
        // The same error wrapped in an io::Error, as a handshake inside a read reports it.
        let wrapped = ureq::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        ));
        assert!(describe(&wrapped).starts_with("TLS certificate problem"));
    }

    #[test]
    fn statuses_say_what_they_mean() {
        assert!(status_words(401).contains("uplink.token"));
        assert!(status_words(404).starts_with("HTTP status 404 (not found"));
        assert!(status_words(503).contains("server error"));
        assert!(status_words(302).contains("redirect"));
    }

    #[test]
    fn a_probe_of_a_closed_port_says_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = crate::config::Config::parse_str(
            &format!(
                "[journal]\ndir = \"/tmp/j\"\n[mqtt]\ntopics = [\"a/#\"]\n[uplink]\nurl = \"http://127.0.0.1:{port}/v1/ingest\"\n"
            ),
            std::path::Path::new("/tmp/ferry.toml"),
        )
        .unwrap();
        assert_eq!(
            probe(&cfg.uplink, &cfg.tls.material, "gw-1").unwrap_err(),
            "connection refused"
        );
    }
}
