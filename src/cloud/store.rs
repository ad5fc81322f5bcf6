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
//! Durability: [`Store::ingest`] returns only after the new lines are written and `sync_data`'d (and the
//! directory synced when a file was created), so a batch the receiver acknowledged survives a crash.
//! A crash mid-write can leave a last line without its newline; that line was never acknowledged, so
//! [`Store::open`] drops it (truncating the file) and the device resends it. A failed write is cut
//! back the same way before the error is returned. Any other malformed line stops the start.
//!
//! In memory each device keeps a [`RangeSet`] of stored seqs, its gaps, the content [`Fingerprints`]
//! of its stored records (about 8 bytes per record, see that module), and the identity clashes seen
//! since this start. A device's files are written under that device's mutex; the map of devices has
//! its own mutex, held only to look a device up.
//!
//! Identity clashes: a record whose seq is stored with a different fingerprint was not sent by the
//! gateway that sent the stored one (a seq is never reused), so two gateways share the device id,
//! typically a cloned image. [`Store::ingest`] refuses such a batch as a whole
//! ([`Error::Clash`], stores nothing of it) and remembers the clash for [`Store::devices`]: the
//! [`MAX_CLASHES`] most recently clashing seqs and a total. Clashes are not written to disk; a
//! restart forgets them until the clashing gateway sends again, which it keeps doing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{info, warn};

use super::batch::{self, Batch};
use super::fingerprints::Fingerprints;
use super::ranges::RangeSet;
use crate::protocol::Gap;

const RECORDS_SUFFIX: &str = ".ndjson";
const GAPS_SUFFIX: &str = ".gaps.ndjson";
/// Clashing seqs remembered per device; beyond it the least recently clashing one is forgotten
/// (still counted in [`DeviceSummary::clashes_total`]).
pub const MAX_CLASHES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create data directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot list data directory {path}")]
    ListDir { path: PathBuf, source: io::Error },
    #[error("{path}: file name is not <device id>.ndjson or <device id>.gaps.ndjson")]
    UnexpectedFile { path: PathBuf },
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {problem}")]
    Malformed {
        path: PathBuf,
        line: u64,
        problem: String,
    },
    #[error("cannot truncate the torn last line of {path}")]
    Truncate { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot sync {path}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("device id {device_id} ends in .gaps, which names this receiver's gap files")]
    ReservedDeviceId { device_id: String },
    /// The batch was refused: `seq` (its lowest clashing seq) is stored with other content.
    #[error(
        "device_id {device_id}: seq {seq} already stored with different content; two gateways share this device id (cloned image?)"
    )]
    Clash { device_id: String, seq: u64 },
}

/// Owner of the data directory. Shared between worker threads by reference.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    devices: Mutex<BTreeMap<String, Arc<Mutex<Device>>>>,
}

#[derive(Debug, Default)]
struct Device {
    records: RangeSet,
    /// Of every seq in `records`.
    fingerprints: Fingerprints,
    /// At most [`MAX_CLASHES`], in no particular order.
    clashes: Vec<Clash>,
    /// Clashing records refused since this start, each time one was sent.
    clashes_total: u64,
    /// In the order they were stored.
    gaps: Vec<Gap>,
    /// `(from_seq, to_seq, reason)` of every stored gap, to store each gap once.
    gap_keys: BTreeSet<(u64, u64, &'static str)>,
    gap_seqs: RangeSet,
}

/// What [`Store::ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Records stored by this call.
    pub accepted: u64,
    /// Records that were already stored.
    pub duplicates: u64,
    /// Gaps stored by this call (a gap already stored with the same range and reason is skipped).
    pub new_gaps: u64,
}

/// A device as `GET /v1/devices` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub device_id: String,
    /// Distinct stored records.
    pub records: u64,
    /// Highest stored record seq, 0 when none.
    pub highest_seq: u64,
    /// Ranges of `1..=max(highest record seq, highest gap seq)` covered by neither a record nor a gap.
    pub missing: Vec<(u64, u64)>,
    pub gaps: Vec<Gap>,
    /// The most recently clashing seqs (at most [`MAX_CLASHES`]), ascending by seq.
    pub clashes: Vec<Clash>,
    /// Clashing records refused since this start, including those no longer in `clashes`.
    pub clashes_total: u64,
}

/// A seq that arrived with content other than the stored one, since this start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clash {
    pub seq: u64,
    /// Wall-clock time of the first and the latest refusal, milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// How many times a record with this seq was refused as a clash.
    pub count: u64,
}

impl Store {
    /// Opens (creating if needed) the data directory and rebuilds every device's state from it.
    pub fn open(dir: &Path) -> Result<Store, Error> {
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
                for_each_line(&path, |line| {
                    let (seq, fingerprint) =
                        batch::stored_record(line).map_err(|e| e.to_string())?;
                    // A repeated seq cannot be written by this store; if one is there anyway the
                    // first copy is the stored one, as at ingest.
                    device.records.insert(seq);
                    device.fingerprints.insert(seq, fingerprint);
                    Ok(())
                })?;
            }
        }

        let records: u64 = devices.values().map(|d| d.records.len()).sum();
        info!(
            "data loaded dir={} devices={} records={}",
            dir.display(),
            devices.len(),
            records
        );
        Ok(Store {
            dir: dir.to_path_buf(),
            devices: Mutex::new(
                devices
                    .into_iter()
                    .map(|(id, d)| (id, Arc::new(Mutex::new(d))))
                    .collect(),
            ),
        })
    }

    /// Stores the records and gaps of `batch` that are not stored yet. Returns only after they are on
    /// disk; on error nothing of the failed file is left behind, and the records of an earlier file
    /// that did succeed are remembered (a resend counts them as duplicates). A stored seq sent again
    /// with the same content is a duplicate; with other content the whole batch is refused with
    /// [`Error::Clash`] before anything is written.
    pub fn ingest(&self, batch: &Batch) -> Result<Outcome, Error> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.ingest_at(batch, now_ms)
    }

    fn ingest_at(&self, batch: &Batch, now_ms: u64) -> Result<Outcome, Error> {
        if is_reserved(&batch.device_id) {
            return Err(Error::ReservedDeviceId {
                device_id: batch.device_id.clone(),
            });
        }
        let handle = self.device(&batch.device_id);
        let mut device = lock(&handle);

        let mut lines = String::new();
        let mut new_records = Vec::new();
        let mut clashing = Vec::new();
        for record in &batch.records {
            match device.fingerprints.get(record.seq) {
                None => {
                    lines.push_str(&record.line);
                    lines.push('\n');
                    new_records.push((record.seq, record.fingerprint));
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
            append_synced(
                &self.dir,
                &self.records_path(&batch.device_id),
                lines.as_bytes(),
            )?;
            for (seq, fingerprint) in new_records {
                device.records.insert(seq);
                device.fingerprints.insert(seq, fingerprint);
            }
        }

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

        Ok(Outcome {
            accepted,
            duplicates: batch.records.len() as u64 - accepted,
            new_gaps: new_gaps.len() as u64,
        })
    }

    /// Every device that has stored records or gaps, ordered by id.
    pub fn devices(&self) -> Vec<DeviceSummary> {
        let handles: Vec<(String, Arc<Mutex<Device>>)> = lock(&self.devices)
            .iter()
            .map(|(id, d)| (id.clone(), Arc::clone(d)))
            .collect();
        handles
            .into_iter()
            .filter_map(|(device_id, handle)| {
                let device = lock(&handle);
                // A device with clashes has records: a clash is with a stored record.
                if device.records.is_empty() && device.gaps.is_empty() {
                    return None;
                }
                let mut covered = device.records.clone();
                covered.extend(&device.gap_seqs);
                let upper = covered.max().unwrap_or(0);
                Some(DeviceSummary {
                    device_id,
                    records: device.records.len(),
                    highest_seq: device.records.max().unwrap_or(0),
                    missing: covered.complement(1, upper),
                    gaps: device.gaps.clone(),
                    clashes: {
                        let mut clashes = device.clashes.clone();
                        clashes.sort_by_key(|c| c.seq);
                        clashes
                    },
                    clashes_total: device.clashes_total,
                })
            })
            .collect()
    }

    /// The device's records file opened for reading and its length at the time of the call; bytes
    /// beyond that length may belong to a write in progress. `None` if the device stored nothing.
    pub fn records_file(&self, device_id: &str) -> Result<Option<(File, u64)>, Error> {
        let Some(handle) = lock(&self.devices).get(device_id).cloned() else {
            return Ok(None);
        };
        // Holding the device lock while taking the length means the length ends on a line boundary.
        let _device = lock(&handle);
        let path = self.records_path(device_id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Open { path, source }),
        };
        let len = file
            .metadata()
            .map_err(|source| Error::Read { path, source })?
            .len();
        Ok(Some((file, len)))
    }

    fn device(&self, device_id: &str) -> Arc<Mutex<Device>> {
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
    fn add_gap(&mut self, gap: Gap) {
        if self.gap_keys.insert(gap_key(&gap)) {
            self.gaps.push(gap);
            self.gap_seqs.insert_range(gap.from_seq, gap.to_seq);
        }
    }

    /// Records one refusal of each of `seqs` (ascending) at `now_ms`, keeping the [`MAX_CLASHES`]
    /// most recently clashing seqs; among seqs refused at the same time the highest are kept.
    fn note_clashes(&mut self, seqs: &[u64], now_ms: u64) {
        self.clashes_total += seqs.len() as u64;
        // The lower seqs of a batch with more clashes than the list holds would be pushed out again
        // by the higher ones; skip them. The scans below are linear, fine for a list this short.
        let kept = &seqs[seqs.len().saturating_sub(MAX_CLASHES)..];
        for &seq in kept {
            if let Some(clash) = self.clashes.iter_mut().find(|c| c.seq == seq) {
                clash.count += 1;
                clash.last_seen_ms = now_ms;
                continue;
            }
            if self.clashes.len() >= MAX_CLASHES {
                // Forget the least recently clashing seq, the lowest of them on a tie.
                if let Some(oldest) = self
                    .clashes
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, c)| (c.last_seen_ms, c.seq))
                    .map(|(i, _)| i)
                {
                    self.clashes.swap_remove(oldest);
                }
            }
            self.clashes.push(Clash {
                seq,
                first_seen_ms: now_ms,
                last_seen_ms: now_ms,
                count: 1,
            });
        }
    }
}

fn is_reserved(device_id: &str) -> bool {
    device_id.ends_with(".gaps")
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

/// Calls `parse` for every complete line of `path` (without its newline). A last line without a
/// newline is torn: it is logged and cut off the file.
fn for_each_line(
    path: &Path,
    mut parse: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    let mut complete_len: u64 = 0;
    let mut number: u64 = 0;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        let Some(content) = line.strip_suffix(b"\n") else {
            warn!(
                "torn last line dropped path={} line={} bytes={}",
                path.display(),
                number,
                read
            );
            let truncate_error = |source| Error::Truncate {
                path: path.to_path_buf(),
                source,
            };
            file.set_len(complete_len).map_err(truncate_error)?;
            file.sync_data().map_err(truncate_error)?;
            return Ok(());
        };
        parse(content).map_err(|problem| Error::Malformed {
            path: path.to_path_buf(),
            line: number,
            problem,
        })?;
        complete_len += read as u64;
    }
}

/// Appends `bytes` to `path` and syncs it (and `dir`, when the file is new). On error the file is cut
/// back to its previous length, so no partial line stays behind to be followed by later appends.
fn append_synced(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let open_error = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let (mut file, created) = match OpenOptions::new().append(true).open(path) {
        Ok(file) => (file, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(path)
                .map_err(open_error)?,
            true,
        ),
        Err(e) => return Err(open_error(e)),
    };
    let before = file
        .metadata()
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let written = file
        .write_all(bytes)
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|()| {
            file.sync_data().map_err(|source| Error::Sync {
                path: path.to_path_buf(),
                source,
            })
        });
    if let Err(e) = written {
        // Best effort: if even this fails, the next start finds the torn line and drops it.
        let _ = file.set_len(before);
        return Err(e);
    }
    if created {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Sync {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::GapReason;

    fn batch(device_id: &str, seqs: &[u64], gaps: &[(u64, u64, &str)]) -> Batch {
        let records: Vec<String> = seqs
            .iter()
            .map(|s| format!(r#"{{"seq":{s},"ts_ms":1,"topic":"t","payload_text":"r{s}"}}"#))
            .collect();
        let gaps: Vec<String> = gaps
            .iter()
            .map(|(f, t, r)| format!(r#"{{"from_seq":{f},"to_seq":{t},"reason":"{r}"}}"#))
            .collect();
        let body = format!(
            r#"{{"device_id":"{device_id}","records":[{}],"gaps":[{}]}}"#,
            records.join(","),
            gaps.join(",")
        );
        batch::parse(body.as_bytes()).expect("test batch is valid")
    }

    /// A batch of `gw-01` with the given record objects and gaps, written as JSON.
    fn batch_of(records: &[&str], gaps: &[&str]) -> Batch {
        let body = format!(
            r#"{{"device_id":"gw-01","records":[{}],"gaps":[{}]}}"#,
            records.join(","),
            gaps.join(",")
        );
        batch::parse(body.as_bytes()).expect("test batch is valid")
    }

    fn clash_seq(result: Result<Outcome, Error>) -> u64 {
        match result {
            Err(Error::Clash { seq, .. }) => seq,
            other => panic!("expected a clash, got {other:?}"),
        }
    }

    fn outcome(accepted: u64, duplicates: u64, new_gaps: u64) -> Outcome {
        Outcome {
            accepted,
            duplicates,
            new_gaps,
        }
    }

    #[test]
    fn a_resent_batch_is_counted_as_duplicates_and_stored_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let b = batch("gw-01", &[1, 2, 3], &[]);
        assert_eq!(store.ingest(&b).expect("ingest"), outcome(3, 0, 0));
        assert_eq!(store.ingest(&b).expect("ingest"), outcome(0, 3, 0));
        let text = fs::read_to_string(dir.path().join("gw-01.ndjson")).expect("read");
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn dedupe_survives_reopening_the_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .ingest(&batch("gw-01", &[1, 2], &[(3, 4, "journal_full")]))
                .expect("ingest");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store
                .ingest(&batch("gw-01", &[2, 5], &[(3, 4, "journal_full")]))
                .expect("ingest"),
            outcome(1, 1, 0)
        );
        let devices = store.devices();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].records, 3);
        assert_eq!(devices[0].highest_seq, 5);
        assert_eq!(devices[0].missing, vec![]);
    }

    #[test]
    fn missing_lists_seqs_covered_by_neither_records_nor_gaps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        store
            .ingest(&batch("d", &[3, 4, 9], &[(12, 15, "rejected")]))
            .expect("ingest");
        let device = &store.devices()[0];
        assert_eq!(device.missing, vec![(1, 2), (5, 8), (10, 11)]);
        assert_eq!(
            device.gaps,
            vec![Gap {
                from_seq: 12,
                to_seq: 15,
                reason: GapReason::Rejected
            }]
        );
        assert_eq!(device.highest_seq, 9);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_file_truncated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gw-01.ndjson");
        // Seq 1 as `batch` writes it, so that its resend below is a duplicate.
        let good = "{\"payload_text\":\"r1\",\"seq\":1,\"topic\":\"t\",\"ts_ms\":1}\n";
        fs::write(&path, format!("{good}{{\"seq\":2,\"ts_m")).expect("write");

        let store = Store::open(dir.path()).expect("open despite the torn line");
        assert_eq!(fs::read_to_string(&path).expect("read"), good);
        // Seq 2 was never acknowledged, so its resend is stored.
        assert_eq!(
            store.ingest(&batch("gw-01", &[1, 2], &[])).expect("ingest"),
            outcome(1, 1, 0)
        );
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_malformed_line_before_the_end_names_file_and_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gw-01.ndjson");
        let record = |seq| format!(r#"{{"seq":{seq},"ts_ms":1,"topic":"t","payload":1}}"#);
        fs::write(&path, format!("{}\nnot json\n{}\n", record(1), record(3))).expect("write");
        match Store::open(dir.path()) {
            Err(Error::Malformed { path: p, line, .. }) => {
                assert_eq!(p, path);
                assert_eq!(line, 2);
            }
            other => panic!("expected a malformed-line error, got {other:?}"),
        }
    }

    #[test]
    fn a_stored_line_that_is_not_a_valid_record_stops_the_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(
            dir.path().join("d.ndjson"),
            "{\"seq\":1,\"ts_ms\":1,\"payload\":1}\n",
        )
        .expect("write");
        let error = Store::open(dir.path()).expect_err("must refuse");
        assert!(
            error
                .to_string()
                .ends_with("d.ndjson:1: record.topic: missing"),
            "{error}"
        );
    }

    #[test]
    fn a_gap_line_with_an_unknown_reason_stops_the_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(
            dir.path().join("d.gaps.ndjson"),
            "{\"from_seq\":1,\"to_seq\":2,\"reason\":\"eaten\"}\n",
        )
        .expect("write");
        let error = Store::open(dir.path()).expect_err("must refuse");
        assert!(error.to_string().contains("d.gaps.ndjson:1: "), "{error}");
    }

    #[test]
    fn a_file_named_for_no_valid_device_stops_the_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("bad name.ndjson"), "").expect("write");
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::UnexpectedFile { .. })
        ));
    }

    #[test]
    fn other_files_in_the_directory_are_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("README.txt"), "hello").expect("write");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.devices().is_empty());
    }

    #[test]
    fn gaps_are_stored_once_and_in_their_own_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let b = batch(
            "d",
            &[10],
            &[
                (1, 4, "journal_full"),
                (5, 9, "journal_lost"),
                (1, 4, "journal_full"),
            ],
        );
        assert_eq!(store.ingest(&b).expect("ingest"), outcome(1, 0, 2));
        assert_eq!(store.ingest(&b).expect("ingest"), outcome(0, 1, 0));
        let text = fs::read_to_string(dir.path().join("d.gaps.ndjson")).expect("read");
        assert_eq!(
            text,
            "{\"from_seq\":1,\"to_seq\":4,\"reason\":\"journal_full\"}\n\
             {\"from_seq\":5,\"to_seq\":9,\"reason\":\"journal_lost\"}\n"
        );
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.devices()[0].gaps.len(), 2);
        assert_eq!(store.devices()[0].missing, vec![]);
    }

    #[test]
    fn a_device_id_ending_in_gaps_is_refused_rather_than_sharing_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        assert!(matches!(
            store.ingest(&batch("x.gaps", &[1], &[])),
            Err(Error::ReservedDeviceId { .. })
        ));
    }

    #[test]
    fn the_records_file_length_covers_only_complete_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.records_file("d").expect("lookup").is_none());
        store.ingest(&batch("d", &[1, 2], &[])).expect("ingest");
        let (_, len) = store.records_file("d").expect("lookup").expect("file");
        let text = fs::read_to_string(dir.path().join("d.ndjson")).expect("read");
        assert_eq!(len, text.len() as u64);
    }

    #[test]
    fn a_stored_seq_with_other_content_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        store
            .ingest(&batch("gw-01", &[1, 2, 3], &[]))
            .expect("ingest");
        let path = dir.path().join("gw-01.ndjson");
        let before = fs::read_to_string(&path).expect("read");

        // Seq 2 is stored as "r2"; 3 is a true duplicate, 4 is new, and there is a new gap.
        let clashing = batch_of(
            &[
                r#"{"seq":2,"ts_ms":1,"topic":"t","payload_text":"other box"}"#,
                r#"{"seq":3,"ts_ms":1,"topic":"t","payload_text":"r3"}"#,
                r#"{"seq":4,"ts_ms":1,"topic":"t","payload_text":"r4"}"#,
            ],
            &[r#"{"from_seq":5,"to_seq":6,"reason":"journal_full"}"#],
        );
        let error = store.ingest(&clashing).expect_err("must refuse");
        assert_eq!(
            error.to_string(),
            "device_id gw-01: seq 2 already stored with different content; \
             two gateways share this device id (cloned image?)"
        );
        assert_eq!(fs::read_to_string(&path).expect("read"), before);
        assert!(!dir.path().join("gw-01.gaps.ndjson").exists());
        let device = &store.devices()[0];
        assert_eq!((device.records, device.highest_seq), (3, 3));
        assert_eq!(device.gaps, vec![]);
        assert_eq!(
            device.clashes.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(device.clashes_total, 1);

        // The owner of the id resending its own records is unaffected.
        assert_eq!(
            store
                .ingest(&batch("gw-01", &[2, 3, 4], &[]))
                .expect("ingest"),
            outcome(1, 2, 0)
        );
    }

    #[test]
    fn clashes_are_counted_per_seq_with_first_and_last_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        store.ingest(&batch("gw-01", &[1, 2], &[])).expect("ingest");
        let other = |seqs: &[u64]| {
            let records: Vec<String> = seqs
                .iter()
                .map(|s| format!(r#"{{"seq":{s},"ts_ms":2,"topic":"t","payload_text":"x"}}"#))
                .collect();
            batch_of(&records.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        };
        assert_eq!(clash_seq(store.ingest_at(&other(&[1, 2]), 1000)), 1);
        assert_eq!(clash_seq(store.ingest_at(&other(&[2]), 2000)), 2);
        let device = &store.devices()[0];
        assert_eq!(
            device.clashes,
            vec![
                Clash {
                    seq: 1,
                    first_seen_ms: 1000,
                    last_seen_ms: 1000,
                    count: 1
                },
                Clash {
                    seq: 2,
                    first_seen_ms: 1000,
                    last_seen_ms: 2000,
                    count: 2
                },
            ]
        );
        assert_eq!(device.clashes_total, 3);
    }

    #[test]
    fn only_the_most_recently_clashing_seqs_are_listed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let seqs: Vec<u64> = (1..=250).collect();
        store.ingest(&batch("gw-01", &seqs, &[])).expect("ingest");
        let other = |seqs: &[u64]| {
            let records: Vec<String> = seqs
                .iter()
                .map(|s| format!(r#"{{"seq":{s},"ts_ms":2,"topic":"t","payload_text":"x"}}"#))
                .collect();
            batch_of(&records.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        };
        // Seq 7 clashes first; then one batch clashes on 51..=200 at once, keeping 101..=200;
        // then 250 pushes out the lowest of those.
        clash_seq(store.ingest_at(&other(&[7]), 1));
        clash_seq(store.ingest_at(&other(&(51..=200).collect::<Vec<_>>()), 2));
        clash_seq(store.ingest_at(&other(&[250]), 3));
        let device = &store.devices()[0];
        let listed: Vec<u64> = device.clashes.iter().map(|c| c.seq).collect();
        let expected: Vec<u64> = (102..=200).chain([250]).collect();
        assert_eq!(listed, expected);
        assert_eq!(device.clashes.len(), MAX_CLASHES);
        assert_eq!(device.clashes_total, 1 + 150 + 1);
    }

    /// Regression guard: if the fingerprint read back from a stored line differed from the one
    /// computed at ingest, every resend after a restart would be refused as a clash.
    #[test]
    fn after_a_restart_a_resend_is_a_duplicate_and_other_content_still_clashes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = [
            r#"{"seq":1,"ts_ms":1763700000000,"topic":"s/t1","payload":{"t":21.5,"a":[1e-7,null,"é\n"]}}"#,
            r#"{"seq":2,"ts_ms":2,"topic":"s/raw","payload_b64":"AAEC"}"#,
            r#"{"seq":3,"ts_ms":3,"topic":"log","payload_text":"héllo \"q\""}"#,
            r#"{"seq":4,"ts_ms":4,"topic":"bad","payload_b64":"e30=","parse_error":true}"#,
            r#"{"seq":5,"ts_ms":5,"topic":"n","payload":null}"#,
            r#"{"seq":6,"ts_ms":6,"topic":"big","payload":18446744073709551615}"#,
        ];
        let original = batch_of(&records, &[]);
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.ingest(&original).expect("ingest"), outcome(6, 0, 0));
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.ingest(&original).expect("resend"), outcome(0, 6, 0));
        let changed = batch_of(
            &[r#"{"seq":4,"ts_ms":4,"topic":"bad","payload_b64":"e30="}"#],
            &[],
        );
        assert_eq!(clash_seq(store.ingest(&changed)), 4);
    }
}
