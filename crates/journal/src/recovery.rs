//! Recovery at open and reopen: loading the positions from sled, checking them against the record
//! log and the seq mark, and repairing what a crash, a foreign or a damaged journal left behind
//! (always saying so). Also the migration of the older layout (entries in sled) into the log.
//! Everything here runs before the journal is handed out, or under `reopen`.

use log::{error, info, warn};

use super::codec::*;
use super::redelivery::{self, Mark, Marks};
use super::segments::{Flow, Item, Keep, Overlay, Overlays, Segments, frame_size, segment_cap};
use super::{
    Entry, Error, Journal, LOG_DIR, Result, count, log_io, log_of, put_positions, put_snapshot,
    storage,
};
use ferry_protocol::GapReason;

impl Journal {
    /// Checks the journal against the seq mark kept outside it. A fresh journal where a mark exists
    /// (the old one was lost or moved aside), or a head below the mark's (the log came back
    /// shorter), means records were lost: they are reported as `journal_lost` and seqs continue
    /// after the mark's lease, so no seq the cloud may have seen is ever assigned again.
    pub(super) fn reconcile_mark(&self) -> Result<()> {
        let fresh = self.meta(M_INITIALISED)?.is_none();
        // The seq through which the log was synced when sled last recorded it: a log that ends
        // before it lost synced frames (a card that lies, bit rot in the last frames), which
        // the torn-tail cut at open must not hide.
        let stored_synced = self.meta(M_DURABLE)?.unwrap_or(0);
        let mut st = self.lock();
        // At a reopen, also what this process itself synced before.
        let synced_head = stored_synced.max(st.synced_before);
        let mut markf = self.mark();
        let head = st.next_seq - 1;
        if let Some(m) = markf.current {
            let lost = if fresh && m.lease > 0 {
                // Nothing of the old journal is here: the cloud had at least `m.acked`.
                st.acked = st.acked.max(m.acked);
                Some(st.acked + 1)
            } else if head < m.head.max(synced_head) {
                Some(st.next_seq)
            } else {
                None
            };
            if let Some(from) = lost {
                let to = m.lease.max(head);
                if from <= to {
                    error!(
                        "journal lost records: head_seq={} but the seq mark and the database say head_seq>={} (lease {}); \
                         reporting {}..={} as journal_lost and continuing at seq={}",
                        head,
                        m.head.max(synced_head),
                        m.lease,
                        from,
                        to,
                        to + 1
                    );
                    let gap = encode_gap(to, GapReason::JournalLost);
                    st.backlog_records += 1;
                    st.backlog_bytes += frame_size(gap.len());
                    log_of(&mut st.log)?
                        .append(&[(from, None, gap)])
                        .map_err(log_io("recording lost records"))?;
                    st.next_seq = to + 1;
                    st.protected_through = st.acked;
                    st.retain_from = st.retain_from.max(st.acked + 1);
                    let mut batch = sled::Batch::default();
                    put_positions(&st, &mut batch);
                    self.apply(batch, "recording lost records")?;
                }
            }
        }
        self.store()?
            .log
            .insert(M_INITIALISED, &1u64.to_be_bytes()[..])
            .map_err(storage("marking the journal"))?;
        let head = st.next_seq - 1;
        self.renew_lease(&mut st, &mut markf, head)
    }

    /// Opens the log, loads the positions, and repairs what a crash, a foreign or a damaged
    /// journal could leave, saying so. Reads only the newest segment (and, after a crash, the
    /// entries the stored counters do not cover).
    pub(super) fn recover(&self) -> Result<()> {
        let log_dir = self.inner.opts.dir.join(LOG_DIR);
        let (mut log, opened) = Segments::open(&log_dir, segment_cap(self.inner.max_bytes))
            .map_err(|source| Error::Log {
                path: log_dir.clone(),
                source,
            })?;
        let fresh = self.meta(M_INITIALISED)?.is_none();
        let mut opened_head = opened.head;
        let migrated = match self.migrate_entries(&mut log)? {
            Some(head) => {
                opened_head = head;
                true
            }
            None => false,
        };
        // A fresh database beside a log: the old database was moved aside as unreadable, deleted,
        // or lost its files (an EIO on sled's file, then a power cut before the repair). The log is
        // the truth about the records, and its frames are self-describing, so it is adopted, not
        // thrown away: everything in it from the cloud's last known cursor on is sent again (the
        // cloud keeps one copy). What only the database held is gone: the dead letters and the
        // gaps laid over the log (rejected and dropped runs), whose records are then sent again
        // as records; the cloud stores them beside the gaps it already has.
        let adopted = match (fresh && !migrated, opened_head) {
            (true, Some(head)) => {
                let below_log = log.first_seq().map_or(head, |first| first - 1);
                let mark_acked = self.mark().current.map_or(0, |m| m.acked);
                Some(below_log.max(mark_acked))
            }
            _ => None,
        };
        let (meta_next, mut acked) = match adopted {
            Some(acked) => (acked + 1, acked),
            None => (
                self.meta(M_NEXT_SEQ)?.unwrap_or(1).max(1),
                self.meta(M_ACKED)?.unwrap_or(0),
            ),
        };
        // The log is the truth about the head when it is shorter: sled may have kept positions
        // of appends whose frames were never synced (sled also writes on its own).
        let mut next_seq = match opened_head {
            Some(h) => h + 1,
            None => meta_next,
        };
        if let Some(acked) = adopted {
            error!(
                "journal log in {} has no database any more: adopted it (head_seq={}), sending again \
                 everything after acked_seq={}; dead letters and dropped runs the database held are gone",
                log_dir.display(),
                next_seq - 1,
                acked
            );
        }
        let mut overlays = self.load_overlays()?;
        let mut batch = sled::Batch::default();
        let mut repaired = migrated || adopted.is_some();
        if adopted.is_some() {
            // Not fresh any more: `reconcile_mark` checks the adopted log against the seq mark as
            // it checks any log (a log shorter than the mark's head lost synced frames).
            batch.insert(M_INITIALISED, &1u64.to_be_bytes()[..]);
        }
        if next_seq < meta_next {
            info!(
                "journal positions were ahead of the log (next_seq={} in the database, {} in the log): \
                 appends never synced, so never acknowledged to the broker",
                meta_next, next_seq
            );
        }
        // Overlays and marks of seqs the log does not hold any more were never durable.
        for (&from, _) in overlays.range(next_seq..) {
            batch.remove(&overlay_key(from)[..]);
        }
        overlays.retain(|&from, _| from < next_seq);
        let mut pending_gap = None;
        if acked >= next_seq {
            // The cloud acknowledged seqs this journal never assigned (a restored or foreign
            // journal). Never reuse them: report them as lost and continue after them. The cursor
            // is set to the journal's head so that the gap is sent like any other entry.
            warn!(
                "cursor is ahead of the journal: acked_seq={} head_seq={}; reporting {}..={} as journal_lost and continuing at seq={}",
                acked,
                next_seq - 1,
                next_seq,
                acked,
                acked + 1
            );
            pending_gap = Some((next_seq, None, encode_gap(acked, GapReason::JournalLost)));
            let head = next_seq - 1;
            next_seq = acked + 1;
            acked = head;
            repaired = true;
        }
        if let Some(gap) = pending_gap {
            log.append(std::slice::from_ref(&gap))
                .map_err(log_io("recording lost records"))?;
        }
        // The redelivery window as sled holds it, complete below `through`.
        let (through, mut marks) = self.load_marks(meta_next, &mut batch)?;
        // Appends the database never recorded: sled records the positions and marks of appends
        // only at a sync after a few new segments were started, when it is synced for another
        // reason, and at close, so a crash leaves a few segments of frames past them (more when sled
        // lost writes of its own). Their entries are added to the stored counters, and the packet
        // ids they carry complete the window.
        let mut tail = (0u64, 0u64);
        let marks_from = through
            .unwrap_or_else(|| log.first_seq().unwrap_or(next_seq))
            .min(meta_next);
        if migrated || marks_from >= next_seq {
            marks.retain(|m| m.seq < next_seq);
        } else {
            // Marks of seqs from here are read from the frames, which are the truth.
            marks.retain(|m| m.seq < marks_from);
            let mut visit = |item: &Item| {
                if let Item::Frame(Entry::Record(r), _, Some(pkid)) = item {
                    marks.push(Mark {
                        seq: r.seq,
                        pkid: *pkid,
                        hash: content_hash(&r.topic, &r.payload),
                    });
                }
            };
            let count_from = meta_next.max(marks_from);
            if marks_from < count_from {
                let to = (count_from - 1).min(next_seq - 1);
                log.read(marks_from, to, &overlays, Keep::Nothing, |item| {
                    visit(&item);
                    Flow::Next
                })
                .map_err(log_io("reading the log's tail"))?;
            }
            if count_from < next_seq {
                // Counted as `count` does, from the stored `next_seq`.
                log.read(count_from, next_seq - 1, &overlays, Keep::Nothing, |item| {
                    tail.0 += 1;
                    tail.1 += item.size();
                    visit(&item);
                    Flow::Next
                })
                .map_err(log_io("reading the log's tail"))?;
            }
        }
        let counters = (self.meta(M_BACKLOG_RECORDS)?, self.meta(M_BACKLOG_BYTES)?);
        let (backlog_records, backlog_bytes) = match counters {
            (Some(r), Some(b)) if !repaired && meta_next == next_seq => (r, b),
            (Some(r), Some(b)) if !repaired && meta_next < next_seq && meta_next > acked => {
                (r + tail.0, b + tail.1)
            }
            _ => count(&mut log, &overlays, acked + 1, next_seq - 1)?,
        };
        let (dead_count, dead_bytes) = self.count_prefix(P_DEAD, "counting dead letters")?;
        let retain_from = self
            .meta(M_RETAIN_FROM)?
            .unwrap_or(acked + 1)
            .min(acked + 1);
        let retained_bytes = match self.meta(M_RETAINED_BYTES)? {
            Some(b) if retain_from <= acked => b,
            _ => 0,
        };
        let sled_floor = self.sled_bytes();
        let mut st = self.lock();
        st.marks = Marks::from_marks(marks);
        st.snapshot_due = false;
        st.rolls_since_snapshot = 0;
        st.log = Some(log);
        st.overlays = overlays;
        st.retain_from = if retained_bytes > 0 {
            retain_from
        } else {
            acked + 1
        };
        st.retained_bytes = retained_bytes;
        st.retained_chunks = if retained_bytes > 0 {
            [(acked, retained_bytes)].into()
        } else {
            Default::default()
        };
        st.inflight.clear();
        st.rewound = false;
        st.next_seq = next_seq;
        st.acked = acked;
        st.acked_durable = acked;
        st.protected_through = acked;
        // Nothing read from the files is durable until a sync of this process covered it (the
        // frames of a process that crashed may be in the page cache only): at open, `durable`
        // starts at 0 and the sync that ends the open moves it. A reopen keeps what this process
        // synced before: the log still holds it (a rewrite copies it).
        st.synced_before = st.durable;
        st.durable = st.durable.min(next_seq - 1);
        st.backlog_records = backlog_records;
        st.backlog_bytes = backlog_bytes;
        st.dead_bytes = dead_bytes;
        st.dead_count = dead_count;
        st.sled_floor = sled_floor;
        st.sled_changed();
        put_snapshot(&st, &mut batch, None);
        self.apply(batch, "writing positions")?;
        info!(
            "journal opened head_seq={} acked_seq={} backlog_records={} backlog_bytes={} dead_letters={} segments_bytes={}",
            next_seq - 1,
            acked,
            backlog_records,
            backlog_bytes,
            dead_count,
            st.log.as_ref().map_or(0, Segments::disk_bytes)
        );
        Ok(())
    }

    /// Moves the entries of the older layout (every entry an `E` key in sled) into the log, and
    /// drops its retained `R` keys. Idempotent across a crash: the `E` keys go only after the log
    /// holding them is synced, and a log found beside them is a partial copy, written again.
    /// Returns the log's new head (`Some(None)`: empty) when it found the older layout.
    fn migrate_entries(&self, log: &mut Segments) -> Result<Option<Option<u64>>> {
        let acked = self.meta(M_ACKED)?.unwrap_or(0);
        let store = self.store()?;
        if store.log.scan_prefix([P_ENTRY]).next().is_none() {
            return Ok(None);
        }
        log.remove_all().map_err(log_io("migrating entries"))?;
        let (mut moved, mut head) = (0u64, None);
        let mut frames = Vec::new();
        let mut batch = sled::Batch::default();
        for item in store.log.scan_prefix([P_ENTRY]) {
            let (k, v) = item.map_err(storage("migrating entries"))?;
            batch.remove(k.clone());
            let seq = key_seq(&k);
            if seq <= acked {
                continue;
            }
            let entry = decode_entry(seq, &v)?;
            head = Some(entry.last_seq());
            frames.push((seq, None, v.to_vec()));
            moved += 1;
            if frames.len() >= 1000 {
                log.append(&frames).map_err(log_io("migrating entries"))?;
                frames.clear();
            }
        }
        log.append(&frames).map_err(log_io("migrating entries"))?;
        if let Some(job) = log.begin_sync().map_err(log_io("migrating entries"))? {
            let outcome = job.run();
            log.end_sync(&job, &outcome);
            outcome
                .map_err(|(_, e)| e)
                .map_err(log_io("migrating entries"))?;
        }
        for item in store.log.scan_prefix([b'R']) {
            let (k, _) = item.map_err(storage("migrating entries"))?;
            batch.remove(k);
        }
        store
            .log
            .apply_batch(batch)
            .map_err(storage("migrating entries"))?;
        info!(
            "journal entries moved from the database into the log entries={} head_seq={:?}",
            moved, head
        );
        Ok(Some(head))
    }

    /// The overlays (`X` keys): at most the dead letters' and the damaged or dropped runs'.
    fn load_overlays(&self) -> Result<Overlays> {
        let mut out = Overlays::new();
        for item in self.store()?.log.scan_prefix([P_OVERLAY]) {
            let (k, v) = item.map_err(storage("reading overlays"))?;
            let from = key_seq(&k);
            match decode_entry(from, &v)? {
                Entry::Gap { to_seq, reason, .. } => {
                    out.insert(
                        from,
                        Overlay {
                            to: to_seq,
                            reason,
                            generation: 0,
                        },
                    );
                }
                Entry::Record(_) => {
                    return Err(Error::Corrupt {
                        seq: from,
                        reason: "an overlay holds a record".into(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The redelivery window sled holds (`W`), and the seq below which it is complete (`None`
    /// when the value is damaged: then the whole log is read for it). The older layout's marks,
    /// a key per packet id written with every append, are complete below the stored `next_seq`;
    /// they are read here and their keys removed in `batch`.
    fn load_marks(
        &self,
        meta_next: u64,
        batch: &mut sled::Batch,
    ) -> Result<(Option<u64>, Vec<Mark>)> {
        let store = self.store()?;
        let mut marks = Vec::new();
        for item in store.log.scan_prefix([P_INGEST]) {
            let (k, v) = item.map_err(storage("reading ingest marks"))?;
            batch.remove(k.clone());
            // Damaged marks are skipped: a missed match costs at most one duplicate record.
            let word = |b: Option<&[u8]>| b.and_then(|b| <[u8; 8]>::try_from(b).ok());
            let pkid = k.get(1..3).and_then(|b| <[u8; 2]>::try_from(b).ok());
            if let (Some(pkid), Some(hash), Some(seq)) =
                (pkid, word(v.get(..8)), word(v.get(8..16)))
            {
                marks.push(Mark {
                    seq: u64::from_be_bytes(seq),
                    pkid: u16::from_be_bytes(pkid),
                    hash: u64::from_be_bytes(hash),
                });
            }
        }
        let window = store
            .log
            .get([P_WINDOW])
            .map_err(storage("reading ingest marks"))?;
        let Some(value) = window else {
            return Ok((Some(meta_next), marks));
        };
        match redelivery::decode(&value) {
            Some((through, window)) => {
                marks.extend(window);
                Ok((Some(through), marks))
            }
            None => {
                warn!("journal redelivery marks are damaged; rebuilding them from the log");
                Ok((None, marks))
            }
        }
    }

    /// Number and budget size of the values under `prefix`: a full scan, only at open.
    fn count_prefix(&self, prefix: u8, action: &'static str) -> Result<(u64, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for item in self.store()?.log.scan_prefix([prefix]) {
            let (_, v) = item.map_err(storage(action))?;
            n += 1;
            bytes += entry_size(&v);
        }
        Ok((n, bytes))
    }
}
