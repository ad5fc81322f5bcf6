//! The journal's logical budget: how many bytes of records and dead letters it accepts so that its
//! files stay under `journal.max_bytes` (segments are freed only whole and behind the cursor, so
//! the budget adapts to the bytes measured on disk), and, with `on_full = "drop_oldest"`, trimming
//! the oldest unsent records into `journal_full` gaps to make room.

use std::time::Instant;

use log::{debug, warn};

use super::codec::*;
use super::segments::{Flow, Item, Keep, Overlay, Segments, gap_size};
use super::{Entry, Journal, MEASURE_EVERY, Record, Result, State, log_io, log_of};
use ferry_protocol::GapReason;

/// Starting share of `journal.max_bytes` that logical bytes (the backlog and dead letters) may
/// use. The rest is for what the log holds besides the backlog: up to two partly freed segments
/// (a segment is `max_bytes / 16`), the replay window, and sled's small state.
pub(super) const LOGICAL_SHARE: f64 = 0.7;
/// The adaptive budget never goes below this share of `max_bytes`.
const MIN_SHARE: f64 = 0.02;
/// On-disk use above this share of `max_bytes` shrinks the logical budget; below `GROW_BELOW` it
/// may grow back towards `LOGICAL_SHARE`.
const SHRINK_ABOVE: f64 = 0.9;
const GROW_BELOW: f64 = 0.8;

impl Journal {
    /// Keeps the files on disk under `max_bytes`: segments are freed only whole and behind the
    /// cursor, so when the files near the limit the logical budget shrinks (by 20 % per
    /// measurement) until the live data fits in the space already there; with room to spare it
    /// grows back slowly (5 % per measurement).
    pub(super) fn adapt_budget(&self, st: &mut State) {
        if self.inner.fixed_budget.is_some() {
            return;
        }
        st.appends += 1;
        let max = self.inner.max_bytes as f64;
        let near_full = (st.backlog_bytes + st.dead_bytes) as f64 > st.budget as f64 * 0.8;
        if st.appends % MEASURE_EVERY != 0 && !near_full && !st.disk_high {
            return;
        }
        let log = st.log.as_ref().map_or(0, Segments::disk_bytes);
        let disk = (log + self.sled_bytes()) as f64;
        // Once the files are past the point where they may grow out of bounds, measure every time.
        st.disk_high = disk > max * (SHRINK_ABOVE - 0.1);
        let before = st.budget;
        if disk > max * SHRINK_ABOVE {
            st.budget = ((st.budget as f64 * 0.8) as u64).max((max * MIN_SHARE) as u64);
        } else if disk < max * GROW_BELOW {
            st.budget = ((st.budget as f64 * 1.05) as u64).min((max * LOGICAL_SHARE) as u64);
        }
        if st.budget != before {
            debug!(
                "journal budget adapted disk_bytes={} budget_bytes={} (was {})",
                disk as u64, st.budget, before
            );
        }
    }

    /// Replaces the oldest unprotected records by `journal_full` gaps (overlays) until `need`
    /// bytes are freed (or nothing more can be dropped). Changes go into `batch`, applied by the
    /// caller; the segments they free go at the next sync.
    pub(super) fn trim_oldest(
        &self,
        st: &mut State,
        batch: &mut sled::Batch,
        need: u64,
    ) -> Result<u64> {
        let gap_cost = gap_size(u64::MAX, GapReason::JournalFull);
        // Each new run costs a gap frame: count it, or room-making falls short once gaps
        // outweigh what they replace.
        self.cover_oldest(st, batch, GapReason::JournalFull, |_, freed, new_gaps| {
            if freed >= need + new_gaps * gap_cost {
                Cover::Stop
            } else {
                Cover::Take
            }
        })
    }

    /// Replaces the oldest unsent records that `expired` says are too old by `expired` gaps
    /// (`journal.max_age`): from the oldest on, a record it says `Some(true)` of is covered, one it
    /// says `None` of (its age unknown) is kept and passed, and the first `Some(false)` ends the
    /// scan (records come in the order they arrived). Records in an upload right now are not
    /// touched. The gaps are synced before this returns; the segments they free go then too.
    /// Returns how many records expired.
    pub fn expire(&self, mut expired: impl FnMut(&Record) -> Option<bool>) -> Result<u64> {
        let mut st = self.lock();
        let mut batch = sled::Batch::default();
        let n = self.cover_oldest(
            &mut st,
            &mut batch,
            GapReason::Expired,
            |r, _, _| match expired(r) {
                Some(true) => Cover::Take,
                Some(false) => Cover::Stop,
                None => Cover::Pass,
            },
        )?;
        if n == 0 {
            return Ok(0);
        }
        self.apply(batch, "expiring old records")?;
        st.expired += n;
        drop(st);
        self.sync()?;
        Ok(n)
    }

    /// Covers runs of the oldest unprotected records with gaps of `reason`, as `decide` says
    /// record by record (given the bytes freed so far and the gaps made). Changes go into `batch`,
    /// applied by the caller. Returns the records covered.
    fn cover_oldest(
        &self,
        st: &mut State,
        batch: &mut sled::Batch,
        reason: GapReason,
        mut decide: impl FnMut(&Record, u64, u64) -> Cover,
    ) -> Result<u64> {
        let start = st.protected_through.max(st.acked) + 1;
        let end = st.next_seq - 1;
        let mut freed = 0u64;
        let mut dropped = 0u64;
        let mut run: Option<(u64, u64)> = None;
        let mut runs = Vec::new();
        {
            let State { log, overlays, .. } = &mut *st;
            log_of(log)?
                .read(start, end, overlays, Keep::Nothing, |item| {
                    match item {
                        Item::Frame(Entry::Record(r), size, _) => {
                            let new_gaps = (runs.len() + usize::from(run.is_some())) as u64;
                            match decide(&r, freed, new_gaps) {
                                Cover::Stop => return Flow::Refuse,
                                Cover::Pass => runs.extend(run.take()),
                                Cover::Take => {
                                    freed += size;
                                    dropped += 1;
                                    run = match run {
                                        Some((from, to)) if to + 1 == r.seq => Some((from, r.seq)),
                                        other => {
                                            runs.extend(other);
                                            Some((r.seq, r.seq))
                                        }
                                    };
                                }
                            }
                        }
                        // An existing gap ends the current run; gaps keep their own reason.
                        _ => runs.extend(run.take()),
                    }
                    Flow::Next
                })
                .map_err(log_io("scanning for the oldest records"))?;
        }
        runs.extend(run);
        let mut new_gaps = 0u64;
        for &(from, to) in &runs {
            // A run right after an earlier gap of the same reason that nothing has read yet
            // extends that gap: a journal that stays full holds one gap, not one per trim.
            let merge_into = st
                .overlays
                .range(..from)
                .next_back()
                .filter(|(f, o)| **f >= start && o.to + 1 == from && o.reason == reason)
                .map(|(f, o)| (*f, o.to));
            let gap_from = match merge_into {
                Some((f, old_to)) => {
                    // The longer gap may take a byte more to encode.
                    let grown = gap_size(to, reason).saturating_sub(gap_size(old_to, reason));
                    freed = freed.saturating_sub(grown);
                    f
                }
                None => {
                    new_gaps += 1;
                    freed = freed.saturating_sub(gap_size(to, reason));
                    from
                }
            };
            batch.insert(&overlay_key(gap_from)[..], encode_gap(to, reason));
            st.overlay_generation += 1;
            st.overlays.insert(
                gap_from,
                Overlay {
                    to,
                    reason,
                    generation: st.overlay_generation,
                },
            );
            if reason == GapReason::JournalFull {
                say_dropped(st, from, to, gap_from, merge_into.is_none());
            } else {
                warn!(
                    "expired records {from}..={to}: unsent and older than journal.max_age \
                     (reported to the cloud as an expired gap from {gap_from})"
                );
            }
        }
        st.backlog_records = st.backlog_records - dropped + new_gaps;
        if reason == GapReason::JournalFull {
            st.dropped += dropped;
        }
        if !runs.is_empty() {
            st.sled_changed();
        }
        st.backlog_bytes = st.backlog_bytes.saturating_sub(freed);
        Ok(dropped)
    }
}

/// What [`Journal::cover_oldest`] does with a record.
enum Cover {
    /// Cover it with the gap.
    Take,
    /// Keep it, and look at the next.
    Pass,
    /// Keep it, and stop.
    Stop,
}

/// A journal that stays full trims on every append: a new `journal_full` gap is said at WARN,
/// its growth once a minute (DEBUG in between).
fn say_dropped(st: &mut State, from: u64, to: u64, gap_from: u64, new_gap: bool) {
    st.drop_unsaid += to - from + 1;
    if new_gap {
        st.drop_log.clear();
    }
    if st.drop_log.is_due("journal_full gap", Instant::now()) {
        warn!(
            "journal full: dropped records {}..={} (reported to the cloud as a journal_full \
             gap from {}; {} records dropped since the last such line)",
            from, to, gap_from, st.drop_unsaid
        );
        st.drop_unsaid = 0;
    } else {
        debug!(
            "journal full: dropped records {}..={} (the journal_full gap from {} grows)",
            from, to, gap_from
        );
    }
}
