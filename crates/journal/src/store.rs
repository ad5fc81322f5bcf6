//! sled's files: opening them (waiting out a lock held by the previous handle, turning sled's
//! panics on damaged files into errors), syncing the blob files sled creates, and compacting the
//! database into a new generation when its file has grown. The rest of the journal holds a
//! [`Store`] only through [`Journal::store`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLockReadGuard};
use std::time::Duration;

use log::info;

use super::{
    Error, Journal, MEASURE_EVERY, Options, Result, fsync, layout, put_positions, storage, sync_dir,
};

/// sled is compacted when its files pass this share of `max_bytes` and have doubled since the
/// last open or compaction (sled 0.34's file grows with the volume written, not the data held).
const COMPACT_ABOVE: f64 = 0.1;
/// sled's segment size. Fixed: sled refuses to open a database with another one, so it must not
/// follow any setting. Values over a quarter of it (~256 KiB) go to sled's blob files, which
/// `Journal::sync` fsyncs as they appear.
const SEGMENT_SIZE: usize = 1 << 20;

/// The sled handles. Replaced as a whole by [`Journal::reopen`]: sled 0.34 refuses every write
/// after one I/O error (a full disk), until the database is opened again. Dropping a `Store`
/// never panics (see [`Quiet`]).
pub(super) struct Store {
    pub(super) dir: PathBuf,
    pub(super) db: Quiet<sled::Db>,
    pub(super) log: Quiet<sled::Tree>,
    pub(super) db_path: PathBuf,
    pub(super) db_file: File,
    pub(super) blob_dir: PathBuf,
    /// Blob files already fsynced (sled never rewrites a blob; it writes new ones).
    pub(super) synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

/// Read access to the open [`Store`].
pub(super) struct StoreGuard<'a>(RwLockReadGuard<'a, Option<Store>>);

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match &*self.0 {
            Some(store) => store,
            // `Journal::store` hands out a guard only when the store is open.
            None => unreachable!("StoreGuard over a closed store"),
        }
    }
}

impl Journal {
    pub(super) fn sled_bytes(&self) -> u64 {
        self.store()
            .ok()
            .and_then(|s| s.db.size_on_disk().ok())
            .unwrap_or(0)
    }

    /// Compacts sled when its files have grown past `COMPACT_ABOVE` of `max_bytes` and to twice
    /// their size after the last open or compaction. sled holds only small state (the records are
    /// in the log), but sled 0.34's file grows with the volume written, not with the data held,
    /// so this is what keeps its share of `journal.max_bytes` bounded. Returns whether it
    /// compacted.
    pub fn maybe_compact(&self) -> Result<bool> {
        let floor = {
            let mut st = self.lock();
            st.compact_checks += 1;
            // sled grows slowly now that appends rarely write to it: a `stat` and a directory
            // listing per group commit would cost more than the check is worth.
            if st.compact_checks % MEASURE_EVERY != 1 {
                return Ok(false);
            }
            st.sled_floor.max(1 << 20)
        };
        let max = self.inner.max_bytes as f64;
        let sled = self.sled_bytes();
        if (sled as f64) < max * COMPACT_ABOVE || sled < 2 * floor {
            return Ok(false);
        }
        self.compact()?;
        Ok(true)
    }

    /// Copies every live key into the next database generation, syncs it, and swaps it in
    /// atomically (see `layout`). Appends and acks wait meanwhile; the copy is of live data only.
    pub(super) fn compact(&self) -> Result<()> {
        let mut st = self.lock();
        let mut guard = self.inner.store.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = guard.as_ref() else {
            return Err(Error::Unavailable);
        };
        let dir = self.inner.opts.dir.clone();
        let layout_err = |source| Error::Layout {
            path: dir.clone(),
            source,
        };
        let (old_dir, before) = (old.dir.clone(), old.db.size_on_disk().unwrap_or(0));
        let new_dir = layout::next(&dir, &old_dir);
        let copied = (|| {
            let _ = std::fs::remove_dir_all(&new_dir);
            let new = open_store(&self.inner.opts, &new_dir)?;
            let mut batch = sled::Batch::default();
            let mut n = 0u64;
            for item in old.log.iter() {
                let (k, v) = item.map_err(storage("compacting"))?;
                batch.insert(k, v);
                n += 1;
                if n % 1000 == 0 {
                    new.log
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(storage("compacting"))?;
                }
            }
            // The positions as they are now: an ack records them in sled only now and then, and
            // the new generation counts as recording everything (`acked_durable` below).
            put_positions(&st, &mut batch);
            new.log.apply_batch(batch).map_err(storage("compacting"))?;
            new.db.flush().map_err(storage("compacting"))?;
            fsync::data(&new.db_file, &new.db_path).map_err(|source| Error::Sync {
                path: new.db_path.clone(),
                source,
            })?;
            sync_blobs(&new.blob_dir, &new.synced_blobs)?;
            sync_dir(&new_dir)?;
            Ok::<_, Error>((new, n))
        })();
        let (new, keys) = match copied {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&new_dir);
                return Err(e);
            }
        };
        // Close the old database before its directory goes; on a failed swap, keep using it.
        drop(guard.take());
        match layout::swap(&dir, &new_dir, &old_dir) {
            Ok(()) => {
                let after = new.db.size_on_disk().unwrap_or(0);
                st.sled_floor = after;
                *guard = Some(new);
                // Everything sled held is durable in files that were never synced before.
                st.sled_synced = st.sled_gen;
                st.acked_durable = st.acked;
                st.overlays_durable = st.overlay_generation;
                info!(
                    "journal compacted disk_bytes={} -> {} keys={} into {}",
                    before,
                    after,
                    keys,
                    new_dir.display()
                );
                Ok(())
            }
            Err(e) => {
                drop(new);
                let _ = std::fs::remove_dir_all(&new_dir);
                *guard = Some(open_store(&self.inner.opts, &old_dir)?);
                Err(layout_err(e))
            }
        }
    }

    /// Read access to the open database, or [`Error::Unavailable`] after a failed reopen.
    pub(super) fn store(&self) -> Result<StoreGuard<'_>> {
        let guard = self.inner.store.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(Error::Unavailable);
        }
        Ok(StoreGuard(guard))
    }
}

/// A sled handle whose drop cannot panic. sled 0.34's `Drop` ends in an `fsync` of its file whose
/// failure it `unwrap`s. After a writeback error that the journal found on its own descriptor
/// (and repairs by writing sled anew), sled's descriptor still holds the error, so closing the
/// database panicked: the old one at a compaction or reopen (found by `make torture`, seed 99),
/// and a new generation whose first sync failed during a compaction (seed 1796297858908061968,
/// an agent exit in CI). Every `Store` holds its handles this way, so no path that drops one,
/// early returns included, can kill the thread. The files sled failed to sync are the ones the
/// journal replaces; the panic is logged at WARN.
pub(super) struct Quiet<T> {
    handle: Option<T>,
    dir: PathBuf,
}

impl<T> Quiet<T> {
    fn new(handle: T, dir: &Path) -> Quiet<T> {
        Quiet {
            handle: Some(handle),
            dir: dir.to_path_buf(),
        }
    }
}

impl<T> std::ops::Deref for Quiet<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.handle {
            Some(handle) => handle,
            // Taken only by `drop`.
            None => unreachable!("sled handle used while it is dropped"),
        }
    }
}

impl<T> Drop for Quiet<T> {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(handle))).is_err() {
            log::warn!(
                "sled failed to sync {} as it closed (the write error the journal repairs)",
                self.dir.display()
            );
        }
    }
}

/// Opens sled in `db_dir`. sled 0.34 can panic on damaged files; a panic becomes
/// [`Error::Unreadable`].
pub(super) fn open_store(opts: &Options, db_dir: &Path) -> Result<Store> {
    // The previous handle of this process may still be releasing sled's file lock (a reopen, a
    // restart in tests); another process holding it is reported after the wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match open_store_once(opts, db_dir) {
            Err(Error::Open { source, .. })
                if is_lock_conflict(&source) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(Error::Open { source, path }) if is_lock_conflict(&source) => {
                return Err(Error::Busy { path });
            }
            other => return other,
        }
    }
}

/// Whether sled could not take its file lock. sled 0.34 reports it as an `Other` I/O error whose
/// only trace of the `WouldBlock` is its message, so the message is what is checked, here only.
fn is_lock_conflict(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

fn open_store_once(opts: &Options, db_dir: &Path) -> Result<Store> {
    let opened = std::panic::catch_unwind(|| {
        // Held as `Quiet` at once: if `open_tree` fails, its drop must not panic either.
        let db = Quiet::new(
            sled::Config::new()
                .path(db_dir)
                .cache_capacity(opts.cache_bytes)
                .segment_size(SEGMENT_SIZE)
                // No flusher thread: it `fsync`s sled's file every second and only logs a failure,
                // and later writes then land on top of the pages Linux dropped. Every sync of sled's
                // files is the journal's own (`Journal::sync`), which sees the error and rewrites.
                // sled's garbage collection ran in that thread too: its file now grows until
                // `maybe_compact` copies the live keys into a new generation, as before.
                .flush_every_ms(None)
                .mode(sled::Mode::LowSpace)
                .open()?,
            db_dir,
        );
        let log = Quiet::new(db.open_tree("log")?, db_dir);
        Ok::<_, sled::Error>((db, log))
    });
    let (db, log) = match opened {
        Ok(Ok(handles)) => handles,
        Ok(Err(source)) => {
            return Err(Error::Open {
                path: db_dir.to_path_buf(),
                source,
            });
        }
        Err(_) => {
            return Err(Error::Unreadable {
                path: db_dir.to_path_buf(),
            });
        }
    };
    // sled writes its `conf` file without ever syncing it: a power cut can leave it torn, and
    // sled then refuses the whole database as corrupt (found by `make torture`).
    let conf = db_dir.join("conf");
    fsync::path(&conf).map_err(|source| Error::Sync { path: conf, source })?;
    // sled creates its files (`conf`, `db`, `blobs/`) without syncing their directory, and the
    // layout creates the database directory itself: make both durable before anything is
    // appended, or a power cut can take the files back and with them every synced record.
    sync_dir(db_dir)?;
    if let Some(parent) = db_dir.parent() {
        sync_dir(parent)?;
    }
    let db_path = db_dir.join("db");
    let db_file = File::open(&db_path).map_err(|source| Error::Sync {
        path: db_path.clone(),
        source,
    })?;
    Ok(Store {
        dir: db_dir.to_path_buf(),
        db,
        log,
        db_path,
        db_file,
        blob_dir: db_dir.join("blobs"),
        synced_blobs: Mutex::default(),
    })
}

/// fsyncs the blob files that appeared since the last call, then the directory. Names that
/// vanished (sled deletes blobs it no longer needs) are forgotten.
pub(super) fn sync_blobs(
    dir: &Path,
    synced: &Mutex<std::collections::HashSet<std::ffi::OsString>>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut synced = synced.lock().unwrap_or_else(|e| e.into_inner());
    let mut present = std::collections::HashSet::new();
    let mut new = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !synced.contains(&name) {
            let path = entry.path();
            match fsync::path(&path) {
                Ok(()) => new = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::Sync { path, source }),
            }
        }
        present.insert(name);
    }
    *synced = present;
    if new {
        sync_dir(dir)?;
    }
    Ok(())
}
