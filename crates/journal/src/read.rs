//! The read path: batches for the uplink from the cursor, the cursor's moves (acks), and the
//! positions and ages `/status` shows.

use super::*;

impl Journal {
    /// Waits up to `timeout` for durable entries beyond `after`. Returns whether there are some.
    pub fn wait_for_data(&self, after: u64, timeout: Duration) -> bool {
        let st = self.lock();
        if st.durable > after {
            return true;
        }
        let (st, _) = self
            .inner
            .data
            .wait_timeout(st, timeout)
            .unwrap_or_else(|e| e.into_inner());
        st.durable > after
    }

    /// Reads unacknowledged, durable entries in seq order, starting at the oldest and stopping at
    /// `through` (inclusive), after `max_records` entries or once `max_bytes` of entries are read
    /// (always at least one entry). Entries read are protected from `drop_oldest` until the next
    /// call of [`Journal::ack`] of them or of [`Journal::release`]. Seqs the log should hold and
    /// does not (damage) come back as a `journal_lost` gap, recorded so that it is reported once.
    pub fn read_batch(
        &self,
        through: Option<u64>,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Entry>> {
        self.read_after(0, through, max_records, max_bytes)
    }

    /// Like [`Journal::read_batch`], but starting after `after` when that is past the cursor: the
    /// next batch while the batches up to `after` are still in flight (the uplink's pipeline). A
    /// read that starts at the cursor begins a new pipeline: entries read before are forgotten, and
    /// so is a rewind ([`Journal::ack`] ignores acks of batches read before a rewind, until a read
    /// starts at the rewound cursor).
    pub fn read_after(
        &self,
        after: u64,
        through: Option<u64>,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Entry>> {
        let mut st = self.lock();
        let after = after.max(st.acked);
        if after == st.acked {
            st.rewound = false;
            st.inflight.clear();
        } else {
            st.inflight.retain(|e| e.1 <= after);
        }
        let end = through.unwrap_or(u64::MAX).min(st.durable);
        let mut out = Vec::new();
        if end <= after {
            return Ok(out);
        }
        let mut bytes = 0u64;
        let mut lost = Vec::new();
        let mut inflight = Vec::new();
        {
            let from = after + 1;
            let State { log, overlays, .. } = &mut *st;
            log_of(log)?
                .read(from, end, overlays, Keep::End, |item| {
                    let size = item.size();
                    if !out.is_empty() && (out.len() >= max_records || bytes + size > max_bytes) {
                        return Flow::Refuse;
                    }
                    bytes += size;
                    if let Item::Lost(from, to) = item {
                        lost.push((from, to));
                    }
                    inflight.push((item.first_seq(), item.last_seq(), size));
                    out.push(item.entry());
                    if out.len() >= max_records {
                        Flow::Stop
                    } else {
                        Flow::Next
                    }
                })
                .map_err(log_io("reading a batch"))?;
        }
        if !lost.is_empty() {
            let mut batch = sled::Batch::default();
            for (from, to) in lost {
                error!(
                    "journal log is damaged: seqs {}..={} are unreadable; reporting them as journal_lost",
                    from, to
                );
                let gap = encode_gap(to, GapReason::JournalLost);
                batch.insert(&overlay_key(from)[..], gap);
                st.overlay_generation += 1;
                let generation = st.overlay_generation;
                st.overlays.insert(
                    from,
                    Overlay {
                        to,
                        reason: GapReason::JournalLost,
                        generation,
                    },
                );
            }
            self.apply(batch, "recording damaged entries")?;
            st.sled_changed();
        }
        st.inflight.extend(inflight);
        if let Some(last) = out.last() {
            st.protected_through = st.protected_through.max(last.last_seq());
        }
        Ok(out)
    }

    /// Entries read past `seq` are not going to be uploaded now (the uplink held them back):
    /// they lose their protection from `drop_oldest` and expiry, and are read again later.
    pub fn unread_after(&self, seq: u64) {
        let mut st = self.lock();
        st.protected_through = st.protected_through.min(seq).max(st.acked);
        st.inflight.retain(|e| e.1 <= seq);
    }

    /// Drops the protection of entries read for an upload that will not be acknowledged.
    pub fn release(&self) {
        let mut st = self.lock();
        st.protected_through = st.acked;
    }

    /// Records that the cloud acknowledged every entry up to and including `through`: moves the
    /// cursor, without reading the entries again (their sizes are known from the read). sled
    /// records it at most every [`POSITIONS_EVERY`], and unsynced (a lost ack only means the cloud
    /// sees a batch again and deduplicates it), except when it frees a segment: the cursor is
    /// then written and made durable before the data goes. The
    /// cursor never moves backwards (here; see [`Journal::rewind_to`]). The entries are kept for
    /// replay within a small budget. Entries read past `through` stay protected.
    ///
    /// Returns whether the cursor is now at or past `through`: `false` when the cursor was rewound
    /// since the entries were read, and they must be sent again from the new cursor.
    pub fn ack(&self, through: u64) -> Result<bool> {
        let mut st = self.lock();
        if st.rewound {
            // Read before a rewind: these entries are sent again from the new cursor.
            debug!(
                "ack through={} ignored: the cursor was rewound meanwhile",
                through
            );
            return Ok(false);
        }
        if through <= st.acked {
            return Ok(true);
        }
        let through = through.min(st.durable);
        let from = st.acked;
        let covered = st.inflight.first().is_some_and(|e| e.0 == from + 1)
            && st.inflight.iter().any(|e| e.1 == through);
        let (records, bytes) = if covered {
            let done = st.inflight.iter().filter(|e| e.1 <= through);
            (done.clone().count() as u64, done.map(|e| e.2).sum())
        } else {
            let State { log, overlays, .. } = &mut *st;
            count(log_of(log)?, overlays, from + 1, through)?
        };
        st.inflight.retain(|e| e.1 > through);
        let mut batch = sled::Batch::default();
        let overlays_gone = self.retain_acked(&mut st, &mut batch, through, bytes);
        st.acked = through;
        st.protected_through = st.protected_through.max(through);
        st.backlog_records = st.backlog_records.saturating_sub(records);
        st.backlog_bytes = st.backlog_bytes.saturating_sub(bytes);
        if st.acked == st.next_seq - 1 {
            // Nothing left: whatever drift the counters had (damage) ends here.
            st.backlog_records = 0;
            st.backlog_bytes = 0;
        }
        // A segment behind the retention window can go once the cursor is durable.
        let below = st.acked.min(st.retain_from.saturating_sub(1));
        let frees = st.log.as_ref().is_some_and(|log| {
            let mut firsts = log.files_firsts();
            firsts.next();
            firsts.next().is_some_and(|second| second - 1 <= below)
        });
        // The positions go to sled when something depends on them (a segment to free, overlays
        // to drop), and otherwise at most every POSITIONS_EVERY; sled's snapshots at syncs and
        // at close record them too.
        let now = std::time::Instant::now();
        let due = st
            .positions_written
            .is_none_or(|t| now.saturating_duration_since(t) >= POSITIONS_EVERY);
        if frees || overlays_gone > 0 || due {
            put_positions(&st, &mut batch);
            self.apply(batch, "moving the cursor")?;
            st.positions_written = Some(now);
        }
        if frees {
            st.sled_changed();
        }
        drop(st);
        debug!(
            "cursor moved acked_seq={} from={} entries={}",
            through, from, records
        );
        if frees {
            self.sync()?;
        }
        Ok(true)
    }

    pub fn positions(&self) -> Positions {
        let st = self.lock();
        Positions {
            head_seq: st.next_seq - 1,
            acked_seq: st.acked,
            durable_seq: st.durable,
            backlog_records: st.backlog_records,
            backlog_bytes: st.backlog_bytes,
            dead_letters: st.dead_count,
            logical_bytes: st.backlog_bytes + st.dead_bytes,
            budget_bytes: st.budget,
            dropped: st.dropped,
            expired: st.expired,
            replay_oldest_seq: replay::replay_oldest(&st),
        }
    }

    /// Bytes the journal's files take on disk: the segments and sled's files (0 while closed).
    pub fn disk_bytes(&self) -> u64 {
        let log = self.lock().log.as_ref().map_or(0, Segments::disk_bytes);
        log + self.sled_bytes()
    }

    /// The oldest record not yet acknowledged (for when it was received); `None` when nothing is
    /// waiting. Gaps are skipped, and at most 64 entries are looked at. Like
    /// `backlog_records`, it counts records appended and not synced yet (a report, not a promise:
    /// a group commit in progress must not read as "nothing waiting" beside a backlog).
    pub fn oldest_unsent(&self) -> Result<Option<Record>> {
        let mut st = self.lock();
        // The log holds whole frames through `next_seq - 1`: an append writes its group's frames
        // or fails and closes the log (`log_of` then refuses).
        let (from, end) = (st.acked + 1, st.next_seq.saturating_sub(1));
        let mut ts = None;
        let mut seen = 0;
        let State { log, overlays, .. } = &mut *st;
        log_of(log)?
            .read(from, end, overlays, Keep::Start, |item| {
                seen += 1;
                if let Item::Frame(Entry::Record(r), ..) = item {
                    ts = Some(r);
                    return Flow::Stop;
                }
                if seen >= 64 { Flow::Stop } else { Flow::Next }
            })
            .map_err(log_io("reading the oldest entry"))?;
        Ok(ts)
    }

    /// Visits the newest durable records, at most `max_records` seqs back from the last durable
    /// one, in seq order, acknowledged or not (what the log no longer holds, and gaps, are
    /// skipped). One record at a time: nothing is collected. For what the agent rebuilds at start
    /// from what it journaled last (the Sparkplug tracker).
    pub fn visit_recent(&self, max_records: u64, mut visit: impl FnMut(&Record)) -> Result<()> {
        let mut st = self.lock();
        let end = st.durable;
        if end == 0 || max_records == 0 {
            return Ok(());
        }
        let from = end.saturating_sub(max_records - 1).max(1);
        let State { log, overlays, .. } = &mut *st;
        log_of(log)?
            .read(from, end, overlays, Keep::Nothing, |item| {
                if let Item::Frame(Entry::Record(r), ..) = &item {
                    visit(r);
                }
                Flow::Next
            })
            .map_err(log_io("reading the newest records"))
    }
}
