//! Opening the journal, reopening it after a failed write or sync (with the repairs), and its
//! close when the last handle goes.

use super::sync::SyncToken;
use super::*;

impl Drop for Inner {
    fn drop(&mut self) {
        // The store's handles are dropped after this; their drop cannot panic (`store::Quiet`).
        self.close();
    }
}

impl Inner {
    /// The last handle is going away: leave nothing in sled's buffers, and record the exact
    /// head in the seq mark so that any later loss of records is detected. Nothing runs beside
    /// this, so no sync is in flight.
    fn close(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        let Some(store) = store.as_ref() else {
            return;
        };
        if self.sled_failed.load(Ordering::SeqCst)
            || st.log.as_ref().is_none_or(|l| l.failed().is_some())
        {
            // A failed sync was never repaired: the head is not known to be durable, and the
            // next open syncs (and the mark checks) what is there.
            return;
        }
        // The log first: sled's positions and the mark's head then describe durable frames.
        if let Some(log) = st.log.as_mut() {
            let job = match log.begin_sync() {
                Ok(job) => job,
                Err(e) => {
                    error!("journal log sync at close refused: {}", e);
                    return;
                }
            };
            if let Some(job) = job {
                let outcome = job.run();
                log.end_sync(&job, &outcome);
                if let Err((_, e)) = outcome {
                    error!("journal log sync at close failed: {}", e);
                    return;
                }
            }
        }
        // The positions and marks of the appends since the last snapshot, so that the next open
        // reads nothing of the log but its newest segment.
        if st.log.is_some() {
            let mut batch = sled::Batch::default();
            put_snapshot(&st, &mut batch, Some(st.next_seq - 1));
            if let Err(e) = store.log.apply_batch(batch) {
                error!("journal positions at close not recorded: {}", e);
                return;
            }
        }
        if let Err(e) = store.db.flush() {
            error!("journal flush at close failed: {}", e);
            return;
        }
        if let Err(e) = fsync::data(&store.db_file, &store.db_path) {
            error!("journal sync at close failed: {}", e);
            return;
        }
        st.sled_synced = st.sled_gen;
        let mut markf = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        let mark = Mark {
            lease: st.lease.max(st.next_seq - 1),
            head: st.next_seq - 1,
            acked: st.acked,
        };
        if let Err(e) = markf.write(mark) {
            error!("cannot write the seq mark at close: {}", e);
        }
    }
}

/// Creates `dir` (and missing parents) and makes the new entries durable: a directory survives a
/// power cut only once the directory holding it is synced. Without that, a cut in the first
/// seconds of a new gateway took the whole journal, seq mark included, and seqs started again
/// at 1, which the cloud refuses as clashes forever (found by `make torture`).
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    for created in missing {
        match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

impl Journal {
    /// Opens (or creates) the journal in `opts.dir`, checks the cursor against the entries and logs
    /// any inconsistency it repairs.
    pub fn open(opts: &Options) -> Result<Journal> {
        create_private_dir(&opts.dir)?;
        let mark = MarkFile::open(&opts.dir).map_err(|source| Error::Mark {
            path: opts.dir.join("seq-mark"),
            source,
        })?;
        let mark = Arc::new(Mutex::new(mark));
        let db_dir = layout::current(&opts.dir).map_err(|source| Error::Layout {
            path: opts.dir.clone(),
            source,
        })?;
        let journal = match Self::open_db(opts, &db_dir, Arc::clone(&mark)) {
            Ok(j) => j,
            // A journal that is busy, unreadable for permissions, or on a full disk is not
            // damaged: moving it aside would lose good data. Report it instead.
            Err(e) if !e.is_damage() => return Err(e),
            Err(e) => {
                // Never crash-loop on a journal that will not open: keep it for forensics, start a
                // fresh one, and let the seq mark account for what was in it.
                let layout_err = |source| Error::Layout {
                    path: opts.dir.clone(),
                    source,
                };
                let aside = layout::quarantine(&opts.dir, now_ms() / 1000).map_err(layout_err)?;
                let db_dir = layout::current(&opts.dir).map_err(layout_err)?;
                error!(
                    "journal would not open ({}); moved it aside to {} and started a fresh one \
                     beside the record log",
                    ferry_util::error_chain(&e),
                    aside.display()
                );
                Self::open_db(opts, &db_dir, mark)?
            }
        };
        sync_dir(&opts.dir)?;
        Ok(journal)
    }

    /// Opens sled in `db_dir`, the log beside it, and recovers the positions. sled 0.34 can panic
    /// on damaged files; a panic is turned into [`Error::Unreadable`].
    fn open_db(opts: &Options, db_dir: &Path, mark: Arc<Mutex<MarkFile>>) -> Result<Journal> {
        let store = open_store(opts, db_dir)?;
        let state = State {
            budget: opts
                .fixed_budget
                .unwrap_or((opts.max_bytes as f64 * budget::LOGICAL_SHARE) as u64),
            appends: 0,
            disk_high: false,
            next_seq: 1,
            acked: 0,
            acked_durable: 0,
            durable: 0,
            synced_before: 0,
            backlog_records: 0,
            backlog_bytes: 0,
            dead_bytes: 0,
            dead_count: 0,
            protected_through: 0,
            lease: 0,
            dropped: 0,
            expired: 0,
            drop_log: ferry_util::Repeats::new(std::time::Duration::from_secs(60)),
            drop_unsaid: 0,
            marks: Marks::default(),
            snapshot_due: false,
            rolls_since_snapshot: 0,
            positions_written: None,
            frames: Vec::new(),
            frame_ends: Vec::new(),
            compact_checks: 0,
            log: None,
            overlays: Overlays::new(),
            overlay_generation: 0,
            retain_from: 1,
            retained_bytes: 0,
            retained_chunks: Default::default(),
            inflight: Vec::new(),
            rewound: false,
            sled_floor: 0,
            sled_gen: 1,
            sled_synced: 0,
            syncing: false,
            sync_waiters: 0,
            overlays_durable: 0,
        };
        let journal = Journal {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(store)),
                opts: opts.clone(),
                on_full: opts.on_full,
                max_bytes: opts.max_bytes,
                replay_window: opts.replay_window,
                fixed_budget: opts.fixed_budget,
                state: Mutex::new(state),
                mark,
                data: Condvar::new(),
                synced: Condvar::new(),
                sled_failed: AtomicBool::new(false),
            }),
        };
        journal.recover()?;
        journal.reconcile_mark()?;
        if let Err(e) = journal.sync() {
            if !journal.needs_reopen() {
                return Err(e);
            }
            // The first sync of what an earlier process left failed: a retry could return 0
            // for pages Linux dropped, so what is readable is rewritten into new files instead.
            journal.reopen()?;
        }
        Ok(journal)
    }

    /// Moves the lease `LEASE_STEP` past `through` and records the durable head and the cursor.
    pub(super) fn renew_lease(
        &self,
        st: &mut State,
        markf: &mut MarkFile,
        through: u64,
    ) -> Result<()> {
        // The durable head, as far as known: `durable` starts at 0 at open, and the mark's own
        // head (checked against the log at open) must not be forgotten meanwhile.
        let known = markf.current.map_or(0, |m| m.head).max(st.durable);
        let mark = Mark {
            lease: through + LEASE_STEP,
            head: known.min(st.next_seq - 1),
            acked: st.acked,
        };
        markf.write(mark).map_err(|source| Error::Mark {
            path: markf.path().to_path_buf(),
            source,
        })?;
        st.lease = mark.lease;
        Ok(())
    }

    pub(super) fn mark(&self) -> MutexGuard<'_, MarkFile> {
        self.inner.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes and reopens the database, then reloads every position from disk. sled 0.34 fails
    /// every write after one I/O error (ENOSPC, EIO) until it is opened again; records appended
    /// but not synced before the error are gone, and were never acknowledged to the broker, which
    /// redelivers them. After a failed sync, what it covered is rewritten first, never trusted to
    /// a retried sync: the log segment it failed on is copied into a new file
    /// (`segments::rewrite`), sled into a new generation (`compact`). On failure the journal stays
    /// closed (`Unavailable`) until the next try.
    pub fn reopen(&self) -> Result<()> {
        // No sync may run on the files being replaced.
        {
            let mut st = self.lock();
            while st.syncing {
                st = self.wait_sync_end(st);
            }
            st.syncing = true;
        }
        let token = SyncToken::new(self);
        let reopened = self.reopen_files();
        token.release(&mut self.lock());
        reopened?;
        self.reconcile_mark()?;
        self.sync()?;
        info!("journal reopened");
        Ok(())
    }

    /// [`Journal::reopen`] while it holds the right to sync: the repairs, sled, the recovery.
    fn reopen_files(&self) -> Result<()> {
        let (failed, sled_failed) = {
            let st = self.lock();
            (
                st.log.as_ref().and_then(Segments::failed),
                self.inner.sled_failed.load(Ordering::SeqCst),
            )
        };
        if let Some(first) = failed {
            let dir = self.log_dir();
            let (kept, dropped) = segments::rewrite(&dir, first)
                .map_err(|source| Error::Log { path: dir, source })?;
            info!(
                "journal segment {} rewritten after its failed sync: kept_bytes={} dropped_bytes={}",
                first, kept, dropped
            );
        }
        if sled_failed {
            // Everything sled holds, written again into new files and synced there.
            self.compact()?;
            self.inner.sled_failed.store(false, Ordering::SeqCst);
        }
        let _st = self.lock();
        let mut guard = self.inner.store.write().unwrap_or_else(|e| e.into_inner());
        // Dropping the old handles releases sled's lock on its files.
        drop(guard.take());
        let db_dir = layout::current(&self.inner.opts.dir).map_err(|source| Error::Layout {
            path: self.inner.opts.dir.clone(),
            source,
        })?;
        *guard = Some(open_store(&self.inner.opts, &db_dir)?);
        drop(guard);
        drop(_st);
        self.recover()
    }

    /// [`Error::Unavailable`] while the database is closed after a failed reopen.
    pub(super) fn ensure_open(&self) -> Result<()> {
        self.store().map(drop)
    }
}
