//! Syncing: one sync at a time, its outcome recorded before the next may start, and a failed
//! sync never retried (see "Durability and the crash window" in the journal's header).

use super::*;

/// Clears `State::syncing` if the sync that set it ends without doing so itself (a panic).
pub(super) struct SyncToken<'a> {
    journal: &'a Journal,
    armed: bool,
}

impl<'a> SyncToken<'a> {
    pub(super) fn new(journal: &'a Journal) -> SyncToken<'a> {
        SyncToken {
            journal,
            armed: true,
        }
    }

    /// Ends the sync under the caller's lock: the next caller may sync.
    pub(super) fn release(mut self, st: &mut State) {
        st.syncing = false;
        self.journal.inner.synced.notify_all();
        self.armed = false;
    }
}

impl Drop for SyncToken<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.journal.lock().syncing = false;
            self.journal.inner.synced.notify_all();
        }
    }
}

impl State {
    /// sled holds a change the next sync must make durable.
    pub(super) fn sled_changed(&mut self) {
        self.sled_gen += 1;
    }
}

impl Journal {
    /// Makes everything appended and changed so far durable, and returns only once a sync that
    /// began after those writes has ended well: `fdatasync` of the active segment (older ones
    /// were synced when they were closed; after open, the newest segment and the log directory
    /// whatever they hold), then, when sled holds changes that must be durable, sled's flush and
    /// a real `fdatasync` of its file and of any blob files. One sync runs at a time: a caller
    /// that finds one running waits for it, and syncs itself if that one began before its
    /// writes. Segments that are wholly acknowledged (and past the replay window) or wholly
    /// covered by durable overlays are deleted afterwards.
    ///
    /// A failed sync is never retried: the journal refuses appends and syncs
    /// ([`Error::Unavailable`]) until [`Journal::reopen`] has rewritten what the failed sync
    /// covered (see "Durability and the crash window").
    pub fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        let (want_seq, want_sled) = (st.next_seq - 1, st.sled_gen);
        loop {
            self.ensure_writable(&st)?;
            if st.durable >= want_seq && st.sled_synced >= want_sled {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st.sync_waiters += 1;
            st = self.wait_sync_end(st);
            st.sync_waiters -= 1;
        }
        // This caller syncs, for itself and for whoever wrote before it.
        let target = st.next_seq - 1;
        let sled_to = st.sled_gen;
        let flush_sled = sled_to > st.sled_synced;
        let (acked, generation) = (st.acked, st.overlay_generation);
        let job = log_of(&mut st.log)?
            .begin_sync()
            .map_err(log_io("syncing"))?;
        st.syncing = true;
        drop(st);

        // Whatever happens below (sled can panic), the next caller may sync.
        let token = SyncToken::new(self);
        let logged = job.as_ref().map_or(Ok(()), |j| j.run());
        let result = match &logged {
            Ok(()) => self.sync_sled(flush_sled, target),
            Err((first, e)) => Err(Error::Sync {
                path: self.log_dir().join(format!("{first:020}.seg")),
                source: std::io::Error::new(e.kind(), e.to_string()),
            }),
        };

        // The outcome is recorded before the next caller may sync: one that began after a
        // failure must see it.
        let mut st = self.lock();
        if let (Some(job), Some(log)) = (job.as_ref(), st.log.as_mut()) {
            log.end_sync(job, &logged);
        }
        token.release(&mut st);
        let failed_meanwhile = st.log.as_ref().and_then(Segments::failed);
        if let (Ok(()), Some(first)) = (&result, failed_meanwhile) {
            // A segment being closed failed its sync while this one ran (see `end_sync`).
            error!(
                "journal sync of segment {} failed meanwhile; nothing is trusted until it is rewritten",
                first
            );
            return Err(Error::Unavailable);
        }
        if let Err(e) = result {
            // A failed fsync of sled's files (or an EIO sled met writing them): what sled wrote
            // since its last good sync is rewritten at the reopen. sled's other errors (a full
            // disk) are handled by the reopen as before: sled refuses every write after one
            // until it is opened again, and what it could not write never reached the files.
            if logged.is_ok() && matches!(e, Error::Sync { .. }) {
                self.inner.sled_failed.store(true, Ordering::SeqCst);
            }
            error!(
                "journal sync failed; nothing it covered is trusted, and the journal is rewritten \
                 at its reopen: {}",
                ferry_util::error_chain(&e)
            );
            return Err(e);
        }
        if flush_sled {
            st.sled_synced = st.sled_synced.max(sled_to);
            st.acked_durable = st.acked_durable.max(acked.min(st.acked));
            st.overlays_durable = st.overlays_durable.max(generation);
        }
        if target > st.durable {
            st.durable = target;
            self.inner.data.notify_all();
        }
        self.free_segments(&mut st)
    }

    /// Waits (up to a second, then the caller checks again) for the running sync to end. No
    /// overall deadline: an `fdatasync` cannot be abandoned, so neither can waiting for one.
    pub(super) fn wait_sync_end<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.inner
            .synced
            .wait_timeout(st, Duration::from_secs(1))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// The part of [`Journal::sync`] after the log is durable through `target`: sled records the
    /// positions and marks of appends (when it is synced anyway, or once a few segments were
    /// started, bounding what open reads), and with `flush` sled is made durable.
    fn sync_sled(&self, flush: bool, target: u64) -> Result<()> {
        {
            let mut st = self.lock();
            if flush || st.snapshot_due {
                let mut batch = sled::Batch::default();
                put_snapshot(&st, &mut batch, Some(target));
                self.apply(batch, "recording positions")?;
                st.snapshot_due = false;
                st.rolls_since_snapshot = 0;
                if !flush {
                    // Written to sled's file (not synced), so that a crash leaves open a few
                    // segments of the log to read: sled has no flusher thread of its own.
                    self.flush_sled(&*self.store()?, "recording positions")?;
                }
            }
        }
        if !flush {
            return Ok(());
        }
        let store = self.store()?;
        self.flush_sled(&store, "flushing")?;
        fsync::data(&store.db_file, &store.db_path).map_err(|source| Error::Sync {
            path: store.db_path.clone(),
            source,
        })?;
        sync_blobs(&store.blob_dir, &store.synced_blobs)
    }

    /// [`Error::Unavailable`] while the database is closed, or after a failed sync or append until
    /// the journal is reopened.
    pub(super) fn ensure_writable(&self, st: &State) -> Result<()> {
        self.ensure_open()?;
        let log_failed = st
            .log
            .as_ref()
            .is_some_and(|l| l.failed().is_some() || l.is_broken());
        if self.inner.sled_failed.load(Ordering::SeqCst) || log_failed {
            return Err(Error::Unavailable);
        }
        Ok(())
    }

    /// Whether a failed sync or append keeps the journal closed until [`Journal::reopen`].
    pub fn needs_reopen(&self) -> bool {
        let st = self.lock();
        self.ensure_writable(&st).is_err()
    }

    /// Makes the next [`Journal::sync`] flush sled too.
    pub(super) fn sled_changed(&self) {
        self.lock().sled_changed();
    }

    /// sled's `flush` (its buffers written, `sync_file_range`: not durable), its errors noted.
    fn flush_sled(&self, store: &Store, action: &'static str) -> Result<()> {
        store.db.flush().map(drop).map_err(|source| {
            self.note_sled_error(&source);
            Error::Storage { action, source }
        })
    }

    /// An EIO from sled (a write, or its own `sync_file_range`/`fsync` of its file) is a
    /// writeback error: sled's files are rewritten at the reopen, never trusted to a retry.
    pub(super) fn note_sled_error(&self, e: &sled::Error) {
        if let sled::Error::Io(io) = e {
            if io.raw_os_error() == Some(EIO) {
                self.inner.sled_failed.store(true, Ordering::SeqCst);
            }
        }
    }
}
