//! The `journal-writer` thread: appends whatever has queued up as one group, syncs it once (group
//! commit), then publishes the durable watermark the `mqtt` thread PUBACKs up to. While the
//! journal fails (a full disk, an i/o error) it keeps the group, acknowledges nothing, and reopens
//! the journal: at once, then every `REOPEN_EVERY` while it keeps failing.

use super::*;

/// While journal writes fail (a full disk, an i/o error), how often the writer reopens it.
const REOPEN_EVERY: Duration = Duration::from_secs(2);
/// How often a writer waiting to fill its group looks whether the mqtt thread's window is full.
const WINDOW_CHECK: Duration = Duration::from_millis(5);

/// `commit_wait` (`journal.commit_wait`): how long a new group may wait for more messages before
/// it is committed; zero commits what has arrived at once.
pub(super) fn run_writer(rx: Receiver<Delivery>, shared: Shared, commit_wait: Duration) {
    let Shared {
        journal,
        stats,
        shutdown,
        durable,
        queued,
        window_full,
        ..
    } = shared;
    // Test failpoints: `crash_after_sync` aborts right after the first durable append, before any
    // PUBACK (the window the DUP check covers); `slow_sync_ms=N` makes every group commit slower.
    let crash_after_sync = failpoint::is_set("crash_after_sync");
    let slow_sync = failpoint::number("slow_sync_ms").map(Duration::from_millis);
    // The group being committed: records, and the arrival index of each (for the watermark).
    let mut records: Vec<NewRecord> = Vec::new();
    let mut indexes: Vec<u64> = Vec::new();
    let mut full_since: Option<Instant> = None;
    let mut failing = false;
    let mut reopens = Reopens::default();
    loop {
        Stats::add(&stats.writer_beats, 1);
        if records.is_empty() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => {
                    indexes.push(d.index);
                    records.push(d.record);
                    // A new group: wait up to `commit_wait` from its first message for more, but
                    // not while the mqtt thread holds messages back for PUBACKs that only this
                    // commit can release (its window is full): that would only cap throughput.
                    let deadline = Instant::now() + commit_wait;
                    while records.len() < MAX_GROUP {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero()
                            || window_full.load(Ordering::Acquire)
                            || shutdown.is_set()
                        {
                            break;
                        }
                        match rx.recv_timeout(left.min(WINDOW_CHECK)) {
                            Ok(d) => {
                                indexes.push(d.index);
                                records.push(d.record);
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    // A sync that failed elsewhere (an ack, a dead letter) also closes the
                    // journal: reopen it even while no message comes.
                    if journal.needs_reopen() {
                        reopens.run(&journal, &stats);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while records.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(d) => {
                    indexes.push(d.index);
                    records.push(d.record);
                }
                Err(_) => break,
            }
        }
        let result = journal.append(&records).and_then(|a| {
            if let Some(d) = slow_sync {
                thread::sleep(d);
            }
            journal.sync().map(|()| a)
        });
        match result {
            Ok(appended) => {
                if crash_after_sync {
                    // Failpoint for the redelivery test: the journal is durable, no PUBACK went out.
                    log::error!("failpoint crash_after_sync: aborting");
                    std::process::abort();
                }
                let taken = &records[..appended.taken];
                let n = taken.len() as u64 - appended.redeliveries;
                let bytes: usize = taken.iter().map(|r| r.payload.len()).sum();
                Stats::add(&stats.journal_commits, 1);
                Stats::add(&stats.ingested, n);
                // A recognised redelivery counts here too; they are rare.
                Stats::add(&stats.ingested_bytes, bytes as u64);
                Stats::add(&stats.redeliveries, appended.redeliveries);
                Stats::add(
                    &stats.parse_failed,
                    taken.iter().filter(|r| r.parse_error).count() as u64,
                );
                if let Some(last) = indexes.get(appended.taken.wrapping_sub(1)) {
                    durable.store(*last, Ordering::Release);
                }
                queued.fetch_sub(bytes, Ordering::Relaxed);
                if appended.redeliveries > 0 {
                    info!(
                        "skipped {} broker redeliveries already in the journal",
                        appended.redeliveries
                    );
                }
                debug!(
                    "journaled records={} first_seq={:?} last_seq={:?}",
                    n, appended.first_seq, appended.last_seq
                );
                if let Some(since) = full_since.take() {
                    info!("journal accepting again after {:?}", since.elapsed());
                }
                if failing {
                    info!("journal writes recovered");
                    failing = false;
                }
                reopens.worked();
                stats.journal_accepting.store(true, Ordering::Relaxed);
                // What did not fit is offered again on the next round, ahead of newer messages.
                records.drain(..appended.taken);
                indexes.drain(..appended.taken);
                if let Err(e) = journal.maybe_compact() {
                    warn!(
                        "journal compaction failed (will retry): {}",
                        crate::error_chain(&e)
                    );
                }
            }
            Err(e) => {
                stats.journal_accepting.store(false, Ordering::Relaxed);
                if e.is_full() {
                    if full_since.is_none() {
                        warn!("{}; not acking the broker until the uplink frees space", e);
                        full_since = Some(Instant::now());
                    }
                } else {
                    // The append may have been applied before the sync failed: offer the group
                    // again as redeliveries, so records that did land are recognised by their
                    // marks instead of getting second seqs. (QoS0 records carry no mark: a
                    // failure at this point can journal one twice.)
                    for r in records.iter_mut() {
                        if let Some(m) = r.mqtt.as_mut() {
                            m.dup = true;
                        }
                    }
                    if !failing {
                        error!(
                            "journal write failed, not acking the broker until it recovers: {}",
                            crate::error_chain(&e)
                        );
                        failing = true;
                    }
                    // sled refuses every write after one i/o error until it is reopened, and a
                    // failed sync is repaired only by a reopen.
                    reopens.run(&journal, &stats);
                }
                // Keep the group and retry; the broker holds everything not acked.
                if !shutdown.sleep(Duration::from_millis(250)) {
                    break;
                }
            }
        }
    }
    if !records.is_empty() {
        info!(
            "writer stopped with {} messages not journaled; the broker keeps them",
            records.len()
        );
    }
}

/// When the writer reopens the journal after a failed write or sync: at once after a commit that
/// worked (until the rewrite, a power cut finds what a failed sync dropped missing from the disk),
/// then at most every `REOPEN_EVERY` while writes keep failing (a full disk). A reopen that keeps
/// failing is said at WARN once a minute.
struct Reopens {
    last: Option<Instant>,
    failures: Repeats,
}

impl Default for Reopens {
    fn default() -> Self {
        Reopens {
            last: None,
            failures: Repeats::new(Duration::from_secs(60)),
        }
    }
}

impl Reopens {
    fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.saturating_duration_since(t) >= REOPEN_EVERY)
    }

    /// A commit worked: the next failure is repaired at once.
    fn worked(&mut self) {
        self.last = None;
    }

    fn run(&mut self, journal: &Journal, stats: &Stats) {
        let now = Instant::now();
        if !self.due(now) {
            return;
        }
        self.last = Some(now);
        Stats::add(&stats.journal_reopens, 1);
        if let Err(e) = journal.reopen() {
            let msg = crate::error_chain(&e);
            if self.failures.is_due(&msg, Instant::now()) {
                warn!(
                    "journal reopen failed, retrying every {:?}: {}",
                    REOPEN_EVERY, msg
                );
            } else {
                debug!("journal reopen failed: {}", msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_after_a_commit_that_worked_is_repaired_at_once() {
        let mut r = Reopens::default();
        let t0 = Instant::now();
        assert!(r.due(t0), "the first failure");
        r.last = Some(t0);
        let soon = t0 + Duration::from_millis(300);
        assert!(!r.due(soon), "writes keep failing: paced");
        assert!(r.due(t0 + REOPEN_EVERY));
        r.worked();
        assert!(r.due(soon), "a new failure after a commit that worked");
    }
}
