//! Where the receiver keeps what it was sent, behind one interface: [`Store`] is either
//! - [`files`] (`--data DIR`, the embedded default: NDJSON files per device, state in memory,
//!   one process), or
//! - [`postgres`] (`--store postgres://...`: the records, gaps, ledger and clashes in PostgreSQL,
//!   shared by any number of `ferry-cloud` replicas).
//!
//! Both keep the same promises, which the HTTP layer relies on:
//! - [`Store::ingest`] returns `Ok` only once the batch's new records and gaps are durable (files
//!   synced; a PostgreSQL COMMIT with `synchronous_commit = on`), so a `200` survives a crash.
//! - A record is stored at most once per `(device_id, seq)`: a resend is counted a duplicate.
//! - A seq stored with other content refuses the whole batch ([`Error::Clash`]), storing nothing
//!   of it, and is remembered for [`Store::devices`] ([`MAX_CLASHES`] seqs per device, a total).
//! - The gateway's account of what it holds (`held`) is taken only once the batch is stored, and
//!   the device's summary ([`DeviceSummary`]) balances by construction ([`Ledger::account`]).
//!
//! Where they differ: the files store keeps clashes and `held` in memory (a restart forgets them
//! until the device sends again); the PostgreSQL store keeps them in the database.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_util::Repeats;

use ferry_protocol::{Gap, Held};

use super::batch::Batch;
use super::ledger::Ledger;
use super::ranges::RangeSet;
use super::{fleet, history};

pub mod files;
pub mod postgres;

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
    /// Another request's sync of the file has not ended within [`SYNC_WAIT`]: the batch may be
    /// stored later; the sender retries.
    #[error("{path}: the disk has not finished a sync in {waited:?}")]
    SyncSlow { path: PathBuf, waited: Duration },
    #[error("device id {device_id} ends in .gaps, which names this receiver's gap files")]
    ReservedDeviceId { device_id: String },
    /// The batch was refused: `seq` (its lowest clashing seq) is stored with other content.
    #[error(
        "device_id {device_id}: seq {seq} already stored with different content; two gateways share this device id (cloned image?)"
    )]
    Clash { device_id: String, seq: u64 },
    /// The database could not be reached or answered an error; the batch may or may not be
    /// stored (a COMMIT whose answer was lost), the sender retries and the resend is deduped.
    #[error("database: {what}")]
    Database {
        what: &'static str,
        source: ::postgres::Error,
    },
    /// The database's schema was written by a newer ferry-cloud.
    #[error(
        "database schema is at version {found}, newer than this ferry-cloud knows ({known}); run a newer ferry-cloud"
    )]
    SchemaTooNew { found: i32, known: i32 },
    /// A seq the PostgreSQL store cannot hold (`bigint` is signed).
    #[error(
        "device_id {device_id}: seq {seq} is beyond the largest seq the database holds (2^63 - 1)"
    )]
    SeqTooLarge { device_id: String, seq: u64 },
    #[error("TLS to the database")]
    Tls(#[from] ferry_tls::Error),
    /// `sslmode=require` with a Unix socket, where TLS does not apply.
    #[error(
        "sslmode=require names a Unix socket host: TLS does not apply there; drop sslmode=require or connect over TCP"
    )]
    TlsOnSocket,
    /// `--store-password-file` with a connection string that has a password too.
    #[error(
        "the connection string has a password and --store-password-file gives one: keep the file's, drop the string's"
    )]
    PasswordTwice,
    /// `--store-ca` without `sslmode=require`: the roots would not be used.
    #[error("--store-ca is for TLS to the database: add sslmode=require to the connection string")]
    CaWithoutTls,
    /// A row in the database that this store could not have written.
    #[error("device_id {device_id}: stored seq {seq} cannot be read: {problem}")]
    Corrupt {
        device_id: String,
        seq: u64,
        problem: String,
    },
    /// A batch's records could not be put into `COPY` rows (a record longer than a field can be)
    /// or handed to the connection.
    #[error("device_id {device_id}: cannot send its records to the database: {problem}")]
    CopyRows { device_id: String, problem: String },
    #[error("device_id {device_id}: the database is inconsistent: {what}")]
    Inconsistent { device_id: String, what: String },
    /// More records than one answer of `GET .../records` carries from the database.
    #[error(
        "device_id {device_id}: its records are more than {limit} bytes, too many for one answer"
    )]
    TooManyToRead { device_id: String, limit: u64 },
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
    /// The lowest [`MAX_RANGES`](crate::ledger::MAX_RANGES) ranges of
    /// `1..=max(highest record seq, highest gap seq)` covered by neither a record nor a gap.
    pub missing: Vec<(u64, u64)>,
    pub gaps: Vec<Gap>,
    /// The most recently clashing seqs (at most [`MAX_CLASHES`]), ascending by seq.
    pub clashes: Vec<Clash>,
    /// Clashing records refused (the files store: since its start), including those no longer in
    /// `clashes`.
    pub clashes_total: u64,
    /// The completeness ledger, by the gateway's last account of what it holds.
    pub ledger: Ledger,
    /// When the device last sent a batch (at start: when its files were last written),
    /// milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
    /// Stored records that report a gap upstream of the gateway ([`crate::batch::UPSTREAM_GAP_TOPIC`]).
    pub upstream_gaps: u64,
}

/// A seq that arrived with content other than the stored one (the files store: since its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clash {
    pub seq: u64,
    /// Wall-clock time of the first and the latest refusal, milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// How many times a record with this seq was refused as a clash.
    pub count: u64,
}

/// Says the store's failures: each error at WARN once a minute, at DEBUG in between (a database
/// that is away fails every request of every worker and connection).
#[derive(Debug)]
pub struct FailureLog(Mutex<Repeats>);

impl Default for FailureLog {
    fn default() -> FailureLog {
        FailureLog(Mutex::new(Repeats::new(Duration::from_secs(60))))
    }
}

impl FailureLog {
    pub fn say(&self, what: &str, e: &Error) {
        let error = ferry_util::error_chain(e);
        let due = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_due(&error, Instant::now());
        if due {
            log::warn!("{what} error={error}");
        } else {
            log::debug!("{what} error={error}");
        }
    }
}

/// Which store `ferry-cloud` keeps its data in.
#[derive(Debug, Clone)]
pub enum Location {
    /// A data directory of NDJSON files ([`files`]).
    Files(PathBuf),
    /// A PostgreSQL connection string (URL or `key=value` form, [`postgres`]), and the trust
    /// roots for its certificate with `sslmode=require` (`--store-ca`; the Mozilla roots when
    /// `None`).
    Postgres {
        url: String,
        ca_file: Option<PathBuf>,
        /// The database password, when not in `url` (`--store-password-file`: kept out of the
        /// process list, and out of any `Debug` output).
        password: Option<ferry_util::Secret>,
    },
}

/// The records of one device as `GET /v1/devices/<id>/records` sends them: NDJSON, one stored
/// record per line, `len` bytes.
pub struct Records {
    pub reader: Box<dyn Read + Send>,
    pub len: u64,
}

/// The receiver's store: one of the two kinds, shared by the worker threads by reference.
#[derive(Debug)]
pub enum Store {
    Files(files::FilesStore),
    // Boxed: the pooled connections' configuration is large and read once per request.
    Postgres(Box<postgres::PgStore>),
}

impl std::fmt::Display for Store {
    /// For logs: where the data is (a PostgreSQL target without its password).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Files(s) => write!(f, "files:{}", s.dir().display()),
            Store::Postgres(s) => write!(f, "postgres:{}", s.target()),
        }
    }
}

impl Store {
    pub fn open(location: &Location) -> Result<Store, Error> {
        Ok(match location {
            Location::Files(dir) => Store::Files(files::FilesStore::open(dir)?),
            Location::Postgres {
                url,
                ca_file,
                password,
            } => Store::Postgres(Box::new(postgres::PgStore::open(
                url,
                ca_file.as_deref(),
                password.as_ref(),
            )?)),
        })
    }

    /// Stores what of `batch` is not stored yet; see the module's promises.
    pub fn ingest(&self, batch: &Batch) -> Result<Outcome, Error> {
        match self {
            Store::Files(s) => s.ingest(batch),
            Store::Postgres(s) => s.ingest(batch),
        }
    }

    /// Takes a gateway's account of what it holds from outside a batch (its downlink hello).
    pub fn report(&self, device_id: &str, held: Held, now_ms: u64) -> Result<(), Error> {
        match self {
            Store::Files(s) => {
                s.report(device_id, held, now_ms);
                Ok(())
            }
            Store::Postgres(s) => s.report(device_id, held, now_ms),
        }
    }

    /// The page of the fleet `q` asks for, among the devices that stored records or gaps or
    /// reported what they hold (see [`fleet`] for the states, the order and the paging).
    pub fn fleet_page(
        &self,
        q: &fleet::Query,
        now_ms: u64,
        silent_after_ms: u64,
    ) -> Result<fleet::Page, Error> {
        match self {
            Store::Files(s) => Ok(fleet::select(s.devices(), q, now_ms, silent_after_ms)),
            Store::Postgres(s) => s.fleet_page(q, now_ms, silent_after_ms),
        }
    }

    /// The fleet's totals, over the same devices.
    pub fn fleet_totals(&self, now_ms: u64, silent_after_ms: u64) -> Result<fleet::Totals, Error> {
        match self {
            Store::Files(s) => Ok(fleet::Totals::of(&s.devices(), now_ms, silent_after_ms)),
            Store::Postgres(s) => s.fleet_totals(now_ms, silent_after_ms),
        }
    }

    /// One device, if it stored records or gaps or reported what it holds.
    pub fn device_summary(&self, device_id: &str) -> Result<Option<DeviceSummary>, Error> {
        match self {
            Store::Files(s) => Ok(s.device_summary(device_id)),
            Store::Postgres(s) => s.device_summary(device_id),
        }
    }

    /// The device's history (see [`crate::history`]) over the minutes its store keeps, oldest
    /// first, and how many minutes that is; `None` if the device is not listed.
    pub fn device_history(
        &self,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Option<(Vec<history::Point>, u64)>, Error> {
        let kept = match self {
            Store::Files(_) => history::FILES_KEPT_MINUTES as u64,
            Store::Postgres(_) => history::KEPT_MINUTES,
        };
        let from = (now_ms / history::MINUTE_MS).saturating_sub(kept - 1);
        let points = match self {
            Store::Files(s) => s.device_history(device_id),
            Store::Postgres(s) => s.device_history(device_id, from)?,
        };
        Ok(points.map(|p| (p, kept)))
    }

    /// Publishes this replica's records per ten seconds for the others (PostgreSQL: see
    /// [`crate::history`]); `false` for a store that has no others.
    pub fn shares_rates(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// See [`postgres::PgStore::publish_rates`]; nothing for the files store.
    pub fn publish_rates(
        &self,
        instance: u64,
        counts: &[(u64, u64)],
        kept_from: u64,
    ) -> Result<(), Error> {
        match self {
            Store::Files(_) => Ok(()),
            Store::Postgres(s) => s.publish_rates(instance, counts, kept_from),
        }
    }

    /// See [`postgres::PgStore::other_rates`]; none for the files store (one process).
    pub fn other_rates(&self, instance: u64, from: u64) -> Result<Vec<(u64, u64)>, Error> {
        match self {
            Store::Files(_) => Ok(Vec::new()),
            Store::Postgres(s) => s.other_rates(instance, from),
        }
    }

    /// The device's stored records, in the order they were stored (files) or by seq (PostgreSQL),
    /// or only the last `last` of them; `None` if it stored none.
    pub fn records(&self, device_id: &str, last: Option<u64>) -> Result<Option<Records>, Error> {
        match self {
            Store::Files(s) => s.records_tail(device_id, last),
            Store::Postgres(s) => s.records(device_id, last),
        }
    }
}

impl DeviceSummary {
    /// The summary of a device from what is stored of it; `None` if it stored nothing and reported
    /// nothing. `clashes` in any order.
    fn from_parts(
        device_id: String,
        records: &RangeSet,
        gaps: Vec<Gap>,
        mut clashes: Vec<Clash>,
        clashes_total: u64,
        held: Option<Held>,
        last_seen_ms: u64,
    ) -> Option<DeviceSummary> {
        // A device with clashes has records: a clash is with a stored record.
        if !is_listed(records, &gaps, held) {
            return None;
        }
        let (ledger, covered) = Ledger::account_and_covered(records, &gaps, held);
        let mut missing = covered.complement(1, covered.max().unwrap_or(0));
        missing.truncate(crate::ledger::MAX_RANGES);
        clashes.sort_by_key(|c| c.seq);
        Some(DeviceSummary {
            device_id,
            records: records.len(),
            highest_seq: records.max().unwrap_or(0),
            missing,
            ledger,
            gaps,
            clashes,
            clashes_total,
            last_seen_ms,
            upstream_gaps: 0,
        })
    }
}

/// Records one refusal of each of `seqs` (ascending) at `now_ms` in a device's `clashes`, keeping
/// the [`MAX_CLASHES`] most recently clashing seqs; among seqs refused at the same time the
/// highest are kept. Returns how many refusals to add to the device's total.
fn note_clashes(clashes: &mut Vec<Clash>, seqs: &[u64], now_ms: u64) -> u64 {
    // The lower seqs of a batch with more clashes than the list holds would be pushed out again
    // by the higher ones; skip them. The scans below are linear, fine for a list this short.
    let kept = &seqs[seqs.len().saturating_sub(MAX_CLASHES)..];
    for &seq in kept {
        if let Some(clash) = clashes.iter_mut().find(|c| c.seq == seq) {
            clash.count += 1;
            clash.last_seen_ms = now_ms;
            continue;
        }
        if clashes.len() >= MAX_CLASHES {
            // Forget the least recently clashing seq, the lowest of them on a tie.
            if let Some(oldest) = clashes
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| (c.last_seen_ms, c.seq))
                .map(|(i, _)| i)
            {
                clashes.swap_remove(oldest);
            }
        }
        clashes.push(Clash {
            seq,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            count: 1,
        });
    }
    seqs.len() as u64
}

/// Whether a device is in the fleet: it stored records or gaps, or reported what it holds.
fn is_listed(records: &RangeSet, gaps: &[Gap], held: Option<Held>) -> bool {
    !records.is_empty() || !gaps.is_empty() || held.is_some()
}

/// Device ids this receiver refuses: `<id>.gaps.ndjson` names the files store's gap files, and
/// both stores refuse the same ids, so that a fleet can move from one to the other.
fn is_reserved(device_id: &str) -> bool {
    device_id.ends_with(".gaps")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_with_many_holes_lists_the_lowest_of_them_and_counts_them_all() {
        // Regression: the summary's `missing` listed every uncovered range, without bound.
        let mut records = RangeSet::new();
        for seq in (1..=401).step_by(2) {
            records.insert(seq);
        }
        let summary =
            DeviceSummary::from_parts("gw".into(), &records, Vec::new(), Vec::new(), 0, None, 0)
                .expect("a device with records");
        assert_eq!(summary.missing.len(), crate::ledger::MAX_RANGES);
        assert_eq!(summary.missing[0], (2, 2));
        assert_eq!(summary.ledger.waiting, 200);
        assert!(summary.ledger.balances());
    }
}
