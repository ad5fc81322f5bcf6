//! The receiver's data directory and the per-device state rebuilt from it. The only module that
//! touches the files.
//!
//! Layout of `DIR` (one pair of files per device, both newline-delimited JSON, append-only):
//! - `<device_id>.ndjson`: one stored record per line, the record object as the device sent it.
//! - `<device_id>.gaps.ndjson`: one gap per line, `{"from_seq":..,"to_seq":..,"reason":..}`.
//!
//! Because `<id>.gaps.ndjson` would also be the records file of a device called `<id>.gaps`, device
//! ids ending in `.gaps` are refused ([`Error::ReservedDeviceId`]).
//!
//! Durability: [`FilesStore::ingest`] returns only after the new lines are written and `sync_data`'d (and the
//! directory synced when a file was created), so a batch the receiver acknowledged survives a crash.
//! Records are group committed: a request appends its lines under the device's lock, then waits,
//! without the lock, until a `sync_data` that began after its write has ended; one of the waiting
//! requests runs it for all of them. So concurrent requests of a device (the agent keeps two
//! uploads in flight) share a sync, and one request's parsing and writing overlaps another's
//! sync. A request whose records are all already stored still waits for the sync of the write
//! that stored them, so that its `200` also means durable. A failed sync cuts the records file
//! back to its last durable length, rebuilds the device's records from it and fails every request
//! whose lines were not durable (they are sent again). Gaps are rare and synced by the request
//! that writes them, under the lock.
//!
//! Open files: a device's records file is open only while a request of that device waits for a
//! sync; the last one closes it once everything written is durable (not before: a sync through
//! another descriptor may not see an error the writeback of those lines hit). So the files open are bounded by the
//! requests in flight (a records and a gaps file per worker thread at most), not by the fleet: a
//! receiver of 100,000 devices runs under the usual limit of 1,024 descriptors.
//!
//! A crash mid-write can leave a last line without its newline; that line was never acknowledged, so
//! [`FilesStore::open`] drops it (truncating the file) and the device resends it. A failed write is cut
//! back the same way before the error is returned. Any other malformed line stops the start. Those
//! file primitives are in `files`.
//!
//! In memory each device keeps a [`RangeSet`] of stored (durable) seqs, the seqs written but not
//! yet synced, its gaps, the content [`Fingerprints`] of its written records (about 8 bytes per
//! record, see that module), and the identity clashes seen since this start. A device's files are written under that device's mutex (a sync runs outside
//! it); the map of devices has its own mutex, held only to look a device up.
//!
//! Identity clashes: a record whose seq is stored with a different fingerprint was not sent by the
//! gateway that sent the stored one (a seq is never reused), so two gateways share the device id,
//! typically a cloned image. [`FilesStore::ingest`] refuses such a batch as a whole
//! ([`Error::Clash`], stores nothing of it) and remembers the clash for [`FilesStore::devices`]: the
//! [`MAX_CLASHES`] most recently clashing seqs and a total. Clashes are not written to disk; a
//! restart forgets them until the clashing gateway sends again, which it keeps doing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Seek as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info};

use self::disk::{SyncFn, append, append_synced, for_each_line, open_append};
use super::{Clash, DeviceSummary, Error, Outcome, Records, is_listed, is_reserved, note_clashes};
use crate::batch::{self, Batch};
use crate::fingerprints::Fingerprints;
use crate::history;
use crate::ledger::{self, Ledger};
use crate::ranges::RangeSet;
use ferry_protocol::{Gap, Held};

mod disk;

const RECORDS_SUFFIX: &str = ".ndjson";
const GAPS_SUFFIX: &str = ".gaps.ndjson";

/// Owner of the data directory. Shared between worker threads by reference.
pub struct FilesStore {
    dir: PathBuf,
    devices: Mutex<BTreeMap<String, Arc<Slot>>>,
    /// How a records file is made durable: `File::sync_data`, or a test's stand-in.
    sync: SyncFn,
    /// How long a request waits for another request's sync (see [`SYNC_WAIT`]).
    sync_wait: Duration,
}

/// How long a request waits for the sync that makes its lines durable when another request runs
/// it, before it is answered 503 (its lines may still become durable; the resend is then a
/// duplicate). The request that runs a sync waits for the disk: a sync cannot be abandoned.
pub const SYNC_WAIT: Duration = Duration::from_secs(15);

impl std::fmt::Debug for FilesStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesStore")
            .field("dir", &self.dir)
            .finish()
    }
}

/// A device's state and the signal that its records file became durable further.
#[derive(Debug, Default)]
struct Slot {
    device: Mutex<Device>,
    synced: Condvar,
}

#[derive(Debug, Default)]
struct Device {
    /// The records file open for appending, while a request of this device waits for a sync of
    /// its lines (it is closed once everything written is durable).
    file: Option<Arc<File>>,
    /// Length of the records file as written, and as known durable (synced, or found at start).
    written: u64,
    durable: u64,
    /// A request is syncing the records file (without the lock).
    syncing: bool,
    /// Counts failed syncs: a request that wrote before one must not wait for a later sync.
    failed_syncs: u64,
    /// Requests waiting for their lines to become durable (for tests).
    waiting: usize,
    /// Durable records: what `GET /v1/devices` counts, so that a count never runs ahead of what
    /// `GET .../records` can read.
    records: RangeSet,
    /// Records written but not yet synced: the file length after each write and its seqs, oldest
    /// first. A sync moves those it covers into `records`.
    unsynced: VecDeque<(u64, Vec<u64>)>,
    /// Of every seq written, durable or not (a resend of an unsynced record is a duplicate).
    fingerprints: Fingerprints,
    /// At most [`MAX_CLASHES`], in no particular order.
    clashes: Vec<Clash>,
    /// Clashing records refused since this start, each time one was sent.
    clashes_total: u64,
    /// Records written that report an upstream gap.
    upstream_gaps: u64,
    /// In the order they were stored.
    gaps: Vec<Gap>,
    /// `(from_seq, to_seq, reason)` of every stored gap, to store each gap once.
    gap_keys: BTreeSet<(u64, u64, &'static str)>,
    /// The gateway's latest account of what it holds (see [`ledger::later`]), since this start.
    held: Option<Held>,
    /// When the device last sent a batch, milliseconds since the Unix epoch; at start, when its
    /// files were last written.
    last_seen_ms: u64,
    /// Its account per minute, since this start ([`history`]).
    history: history::Recent,
}

impl FilesStore {
    /// Opens (creating if needed) the data directory and rebuilds every device's state from it.
    pub fn open(dir: &Path) -> Result<FilesStore, Error> {
        Self::open_with(dir, Arc::new(File::sync_data), SYNC_WAIT)
    }

    fn open_with(dir: &Path, sync: SyncFn, sync_wait: Duration) -> Result<FilesStore, Error> {
        fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let list_error = |source| Error::ListDir {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(list_error)? {
            let path = entry.map_err(list_error)?.path();
            if path.is_file() && path.to_string_lossy().ends_with(RECORDS_SUFFIX) {
                paths.push(path);
            }
        }
        paths.sort();

        let mut devices: BTreeMap<String, Device> = BTreeMap::new();
        for path in paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (device_id, is_gaps) = match name.strip_suffix(GAPS_SUFFIX) {
                Some(id) => (id, true),
                None => (name.strip_suffix(RECORDS_SUFFIX).unwrap_or_default(), false),
            };
            if !batch::is_valid_device_id(device_id) || is_reserved(device_id) {
                return Err(Error::UnexpectedFile { path });
            }
            let device = devices.entry(device_id.to_owned()).or_default();
            device.last_seen_ms = device.last_seen_ms.max(modified_ms(&path));
            if is_gaps {
                for_each_line(&path, |line| {
                    let gap: Gap = serde_json::from_slice(line).map_err(|e| e.to_string())?;
                    if gap.from_seq == 0 || gap.from_seq > gap.to_seq {
                        return Err(format!(
                            "gap {}..={} is not a range of seqs",
                            gap.from_seq, gap.to_seq
                        ));
                    }
                    device.add_gap(gap);
                    Ok(())
                })?;
            } else {
                device.load_records(&path)?;
            }
        }

        let records: u64 = devices.values().map(|d| d.records.len()).sum();
        info!(
            "data loaded dir={} devices={} records={}",
            dir.display(),
            devices.len(),
            records
        );
        Ok(FilesStore {
            dir: dir.to_path_buf(),
            devices: Mutex::new(
                devices
                    .into_iter()
                    .map(|(id, device)| {
                        let slot = Slot {
                            device: Mutex::new(device),
                            synced: Condvar::new(),
                        };
                        (id, Arc::new(slot))
                    })
                    .collect(),
            ),
            sync,
            sync_wait,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the records and gaps of `batch` that are not stored yet. Returns only after they are on
    /// disk; on error nothing of the failed file is left behind, and the records of an earlier file
    /// that did succeed are remembered (a resend counts them as duplicates). A stored seq sent again
    /// with the same content is a duplicate; with other content the whole batch is refused with
    /// [`Error::Clash`] before anything is written.
    pub fn ingest(&self, batch: &Batch) -> Result<Outcome, Error> {
        self.ingest_at(batch, ferry_util::epoch_ms(SystemTime::now()))
    }

    fn ingest_at(&self, batch: &Batch, now_ms: u64) -> Result<Outcome, Error> {
        if is_reserved(&batch.device_id) {
            return Err(Error::ReservedDeviceId {
                device_id: batch.device_id.clone(),
            });
        }
        let slot = self.device(&batch.device_id);
        let mut device = lock(&slot.device);

        let mut lines = String::new();
        let mut new_records = Vec::new();
        let mut clashing = Vec::new();
        for record in &batch.records {
            match device.fingerprints.get(record.seq) {
                None => {
                    lines.push_str(&record.line);
                    lines.push('\n');
                    new_records.push((record.seq, record.fingerprint, record.upstream_gap));
                }
                Some(stored) if stored != record.fingerprint => clashing.push(record.seq),
                Some(_) => {}
            }
        }
        if let Some(&seq) = clashing.first() {
            device.note_clashes(&clashing, now_ms);
            return Err(Error::Clash {
                device_id: batch.device_id.clone(),
                seq,
            });
        }
        let accepted = new_records.len() as u64;
        if !new_records.is_empty() {
            self.write_records(&mut device, &batch.device_id, lines.as_bytes())?;
            let mut seqs = Vec::with_capacity(new_records.len());
            for (seq, fingerprint, upstream_gap) in new_records {
                seqs.push(seq);
                device.fingerprints.insert(seq, fingerprint);
                device.upstream_gaps += u64::from(upstream_gap);
            }
            let end = device.written;
            device.unsynced.push_back((end, seqs));
        }
        // Everything this batch found stored or stored itself is in the file up to here.
        let durable_at = device.written;
        let failed_syncs = device.failed_syncs;

        let mut seen = BTreeSet::new();
        let new_gaps: Vec<Gap> = batch
            .gaps
            .iter()
            .filter(|g| !device.gap_keys.contains(&gap_key(g)) && seen.insert(gap_key(g)))
            .copied()
            .collect();
        if !new_gaps.is_empty() {
            let mut lines = String::new();
            for gap in &new_gaps {
                lines.push_str(&gap_line(gap));
                lines.push('\n');
            }
            append_synced(
                &self.dir,
                &self.gaps_path(&batch.device_id),
                lines.as_bytes(),
            )?;
            for gap in &new_gaps {
                device.add_gap(*gap);
            }
        }
        device.last_seen_ms = device.last_seen_ms.max(now_ms);
        self.wait_durable(&slot, device, &batch.device_id, durable_at, failed_syncs)?;
        let mut device = lock(&slot.device);
        if let Some(held) = batch.held {
            // Only once the batch is stored: a report claims the batch's records delivered.
            device.held = Some(ledger::later(device.held, held));
        }
        device.note_history(now_ms, accepted);

        Ok(Outcome {
            accepted,
            duplicates: batch.records.len() as u64 - accepted,
            new_gaps: new_gaps.len() as u64,
        })
    }

    /// Appends `lines` to the device's records file (opened, or created and its directory synced,
    /// when it is not open: it is closed whenever nothing waits for a sync), without syncing it.
    /// A failed write is cut back.
    fn write_records(
        &self,
        device: &mut Device,
        device_id: &str,
        lines: &[u8],
    ) -> Result<(), Error> {
        let path = self.records_path(device_id);
        let file = match &device.file {
            Some(file) => Arc::clone(file),
            None => {
                let file = Arc::new(open_append(&self.dir, &path)?);
                device.file = Some(Arc::clone(&file));
                file
            }
        };
        append(&path, &file, device.written, lines)?;
        device.written += lines.len() as u64;
        Ok(())
    }

    /// Returns once the device's records file is durable up to `upto` (running the sync when no
    /// other request is), or with an error when a sync failed before it got there.
    fn wait_durable<'a>(
        &self,
        slot: &'a Slot,
        mut device: MutexGuard<'a, Device>,
        device_id: &str,
        upto: u64,
        failed_syncs: u64,
    ) -> Result<(), Error> {
        let path = || self.records_path(device_id);
        let started = Instant::now();
        device.waiting += 1;
        let result = loop {
            if device.failed_syncs != failed_syncs {
                break Err(Error::Sync {
                    path: path(),
                    source: io::Error::other("an earlier sync of this file failed"),
                });
            }
            if device.durable >= upto {
                break Ok(());
            }
            let Some(file) = device
                .file
                .as_ref()
                .map(Arc::clone)
                .filter(|_| !device.syncing)
            else {
                let waited = started.elapsed();
                let Some(left) = self.sync_wait.checked_sub(waited).filter(|l| !l.is_zero()) else {
                    break Err(Error::SyncSlow {
                        path: path(),
                        waited,
                    });
                };
                device = slot
                    .synced
                    .wait_timeout(device, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            };
            // This request syncs for every write so far; the others wait for it.
            device.syncing = true;
            let target = device.written;
            drop(device);
            let synced = (self.sync)(&file);
            device = lock(&slot.device);
            device.syncing = false;
            slot.synced.notify_all();
            match synced {
                Ok(()) => device.synced_to(target),
                Err(source) => {
                    self.after_failed_sync(&mut device, device_id);
                    break Err(Error::Sync {
                        path: path(),
                        source,
                    });
                }
            }
        };
        device.waiting -= 1;
        if device.waiting == 0 && !device.syncing && device.durable == device.written {
            // Nothing of this device waits for a sync: close its records file, so that the files
            // open are bounded by the requests in flight, not by the size of the fleet. The next
            // write opens it again.
            device.file = None;
        }
        result
    }

    /// A sync of the device's records file failed: what was written since the last good sync may
    /// or may not be on disk. Cuts the file back to its durable length and rebuilds the device's
    /// records from the file, so that those records are stored again when they are resent.
    fn after_failed_sync(&self, device: &mut Device, device_id: &str) {
        device.failed_syncs += 1;
        let path = self.records_path(device_id);
        let durable = device.durable;
        error!(
            "sync failed path={} durable_bytes={} written_bytes={}: dropping the lines written since",
            path.display(),
            durable,
            device.written
        );
        if let Some(file) = device.file.take() {
            if let Err(e) = file.set_len(durable) {
                error!("cannot cut back path={} error={e}", path.display());
            }
        }
        device.records = RangeSet::new();
        device.unsynced.clear();
        device.fingerprints = Fingerprints::new();
        device.upstream_gaps = 0;
        device.written = 0;
        device.durable = 0;
        if durable > 0 {
            if let Err(e) = device.load_records(&path) {
                error!(
                    "cannot reload path={} error={}",
                    path.display(),
                    ferry_util::error_chain(&e)
                );
            }
        }
    }

    /// Every device that has stored records or gaps or reported what it holds, ordered by id.
    pub fn devices(&self) -> Vec<DeviceSummary> {
        let handles: Vec<(String, Arc<Slot>)> = lock(&self.devices)
            .iter()
            .map(|(id, d)| (id.clone(), Arc::clone(d)))
            .collect();
        handles
            .into_iter()
            .filter_map(|(device_id, slot)| summarize(device_id, &lock(&slot.device)))
            .collect()
    }

    /// Takes a gateway's account of what it holds from outside a batch (its downlink hello).
    pub fn report(&self, device_id: &str, held: Held, now_ms: u64) {
        if is_reserved(device_id) {
            return;
        }
        let slot = self.device(device_id);
        let mut device = lock(&slot.device);
        device.held = Some(ledger::later(device.held, held));
        device.last_seen_ms = device.last_seen_ms.max(now_ms);
        device.note_history(now_ms, 0);
    }

    /// The device's history since this start, oldest first; `None` if it is not listed.
    pub fn device_history(&self, device_id: &str) -> Option<Vec<history::Point>> {
        let slot = lock(&self.devices).get(device_id).cloned()?;
        let device = lock(&slot.device);
        is_listed(&device.records, &device.gaps, device.held).then(|| device.history.points())
    }

    /// One device, if it stored records or gaps or reported what it holds.
    pub fn device_summary(&self, device_id: &str) -> Option<DeviceSummary> {
        let slot = lock(&self.devices).get(device_id).cloned()?;
        summarize(device_id.to_owned(), &lock(&slot.device))
    }

    /// The device's records file opened for reading and its durable length at the time of the
    /// call (it ends on a line boundary); bytes beyond it may belong to a write in progress or one
    /// not yet synced. `None` if the device stored nothing.
    pub fn records_file(&self, device_id: &str) -> Result<Option<(File, u64)>, Error> {
        let Some(handle) = lock(&self.devices).get(device_id).cloned() else {
            return Ok(None);
        };
        let len = lock(&handle.device).durable;
        let path = self.records_path(device_id);
        match File::open(&path) {
            Ok(file) => Ok(Some((file, len))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Open { path, source }),
        }
    }

    /// The device's records file from the start of its last `last` lines (all with `None`), and
    /// the length to send; `None` if it stored nothing.
    pub fn records_tail(
        &self,
        device_id: &str,
        last: Option<u64>,
    ) -> Result<Option<Records>, Error> {
        let Some((mut file, len)) = self.records_file(device_id)? else {
            return Ok(None);
        };
        let path = self.records_path(device_id);
        let start = match last {
            None => 0,
            Some(n) => disk::tail_start(&mut file, len, n)
                .map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?
                .ok_or_else(|| Error::TooManyToRead {
                    device_id: device_id.to_owned(),
                    limit: disk::MAX_TAIL_SCAN,
                })?,
        };
        file.seek(io::SeekFrom::Start(start))
            .map_err(|source| Error::Read { path, source })?;
        Ok(Some(Records {
            reader: Box::new(io::Read::take(file, len - start)),
            len: len - start,
        }))
    }

    /// Requests of `device_id` waiting for their records to become durable.
    #[cfg(test)]
    fn waiting(&self, device_id: &str) -> usize {
        lock(&self.devices)
            .get(device_id)
            .map_or(0, |slot| lock(&slot.device).waiting)
    }

    fn device(&self, device_id: &str) -> Arc<Slot> {
        Arc::clone(lock(&self.devices).entry(device_id.to_owned()).or_default())
    }

    fn records_path(&self, device_id: &str) -> PathBuf {
        self.dir.join(format!("{device_id}{RECORDS_SUFFIX}"))
    }

    fn gaps_path(&self, device_id: &str) -> PathBuf {
        self.dir.join(format!("{device_id}{GAPS_SUFFIX}"))
    }
}

impl Device {
    /// Reads the records file at `path` (cutting off a torn last line) into the records and
    /// fingerprints; its length is then both written and durable.
    fn load_records(&mut self, path: &Path) -> Result<(), Error> {
        let mut len = 0u64;
        for_each_line(path, |line| {
            let stored = batch::stored_record(line).map_err(|e| e.to_string())?;
            // A repeated seq cannot be written by this store; if one is there anyway the first
            // copy is the stored one, as at ingest.
            if self.records.insert(stored.seq) {
                self.upstream_gaps += u64::from(stored.upstream_gap);
            }
            self.fingerprints.insert(stored.seq, stored.fingerprint);
            len += line.len() as u64 + 1;
            Ok(())
        })?;
        self.written = len;
        self.durable = len;
        Ok(())
    }

    /// The records file is durable up to `len`: the records written up to there are stored.
    fn synced_to(&mut self, len: u64) {
        self.durable = self.durable.max(len);
        while self
            .unsynced
            .front()
            .is_some_and(|(end, _)| *end <= self.durable)
        {
            if let Some((_, seqs)) = self.unsynced.pop_front() {
                for seq in seqs {
                    self.records.insert(seq);
                }
            }
        }
    }

    /// The history's point of a batch that stored `accepted` records (0: a report) at `now_ms`.
    fn note_history(&mut self, now_ms: u64, accepted: u64) {
        let ledger = Ledger::account(&self.records, &self.gaps, self.held);
        self.history
            .note(history::Point::of(now_ms, accepted, &ledger));
    }

    fn add_gap(&mut self, gap: Gap) {
        if self.gap_keys.insert(gap_key(&gap)) {
            self.gaps.push(gap);
        }
    }
    fn note_clashes(&mut self, seqs: &[u64], now_ms: u64) {
        self.clashes_total += note_clashes(&mut self.clashes, seqs, now_ms);
    }
}

/// What `GET /v1/devices` reports of a device; `None` if it stored nothing.
fn summarize(device_id: String, device: &Device) -> Option<DeviceSummary> {
    DeviceSummary::from_parts(
        device_id,
        &device.records,
        device.gaps.clone(),
        device.clashes.clone(),
        device.clashes_total,
        device.held,
        device.last_seen_ms,
    )
    .map(|s| DeviceSummary {
        upstream_gaps: device.upstream_gaps,
        ..s
    })
}

/// When `path` was last written, milliseconds since the Unix epoch (0 if unknown).
fn modified_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .map_or(0, ferry_util::epoch_ms)
}

fn gap_key(gap: &Gap) -> (u64, u64, &'static str) {
    (gap.from_seq, gap.to_seq, gap.reason.as_str())
}

fn gap_line(gap: &Gap) -> String {
    format!(
        r#"{{"from_seq":{},"to_seq":{},"reason":"{}"}}"#,
        gap.from_seq,
        gap.to_seq,
        gap.reason.as_str()
    )
}

/// A poisoned lock means a worker panicked; the state it guards is only changed after the files are
/// written, so it is still consistent with them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
