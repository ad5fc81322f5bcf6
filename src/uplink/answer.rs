//! What an answer from the cloud does to the uplink: an acknowledgement moves the cursor, a
//! transient failure backs off and retries, a refusal of the device stops it until the cloud
//! takes it again, and a refusal of a record splits the batch until that record is isolated and
//! dead-lettered (`batch::verdict` sorts the statuses; `docs/PROTOCOL.md` says what each means).

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::{
    Answer, OnRefusal, REPEAT_LOG, Uplink, Verdict, describe, snippet, span, verdict, weigh,
};
use crate::journal::Entry;
use crate::stats::Stats;

/// These lines log as the uplink's, as they did before this file was split from it (operators'
/// alerts match `ferry::uplink] upload refused`).
const TARGET: &str = "ferry::uplink";

impl Uplink {
    /// Acts on the answer to the oldest upload in flight.
    pub(super) fn handle(&mut self, entries: &[Entry], attempt: Answer) {
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
                        target: TARGET,
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
                    info!(
                target: TARGET,"uplink recovered after {} failed attempts", self.failures);
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
                    target: TARGET,
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
                target: TARGET,
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
                        target: TARGET,
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
                        error!(
                target: TARGET,"cannot dead-letter seq={}: {}", seq, crate::error_chain(&e));
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
                target: TARGET,
                    "upload refused: {} (attempts={} retry_in={:?})",
                    msg, self.failures, delay
                );
            } else {
                warn!(
                target: TARGET,
                    "upload failed: {} (attempts={} retry_in={:?})",
                    msg, self.failures, delay
                );
            }
        } else {
            debug!(
                target: TARGET,
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
}
