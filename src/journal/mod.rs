//! The journal: every ingested message, durably, in seq order, until the cloud acknowledges it.
//!
//! This is the only module that names `sled`. Everyone else holds a [`Journal`], a cheap clonable
//! handle.
//!
//! # On-disk layout
//! ```text
//! journal.dir/
//!   log/<first seq, 20 digits>.seg   the record log: every entry, in seq order (segments.rs)
//!   db -> db-<n>/                    sled: the small state (layout.rs)
//!   seq-mark                         the seq high-water mark (mark.rs)
//! ```
//! The log holds the entries: records and gaps, as CRC32-checked frames in append-only segment
//! files (format and damage rules in `segments.rs`). It is never rewritten: a whole segment is
//! deleted once nothing needs it any more. sled holds one tree, `log`, of small keys, each change of
//! state one atomic `sled::Batch`; keys are a one-byte prefix and a big-endian number:
//!
//! | key | value |
//! |---|---|
//! | `X` seq:u64 | an overlay: a gap (`to_seq`, reason) shown in place of the log's entries `seq..=to_seq` — a dead-lettered record (`rejected`), records dropped for room (`journal_full`), unreadable ones (`journal_lost`) |
//! | `D` seq:u64 | a dead-lettered record: why the cloud refused it, then the record's entry value (`dead.rs`) |
//! | `W` | the redelivery window (`redelivery.rs`): the seq it is complete below, then (seq, MQTT packet id, hash of topic+payload) of the newest QoS1 messages journaled |
//! | `M` name | `next_seq`, `acked`, `backlog_records`, `backlog_bytes`, `dead_bytes` (written together, one snapshot), `durable` (the seq the log was synced through at that snapshot), `retain_from`, `retained_bytes`, all u64 |
//! | `C`, `O` | downlink command results (`commands.rs`) |
//!
//! An entry value is `[1] postcard(header) payload` for a record (the payload as the raw MQTT
//! bytes, turned into its wire form only at upload) or `[2] postcard(to_seq, reason)` for a gap.
//! The older layouts are converted at open: every entry an `E` key in sled (moved into the log),
//! a redelivery mark an `I` key per packet id (read into the window, then removed).
//!
//! # Invariants
//! - `seq` starts at 1 and is assigned once, at append. It never goes backwards: on open the head
//!   is the log's last frame, raised past the cursor if the cursor is ahead of it (`recovery.rs`).
//! - The log's entries, with the overlays in place of what they cover, hold every seq of
//!   `acked+1 ..= next_seq-1` exactly once; a seq that cannot be read is reported as a
//!   `journal_lost` gap (recorded as an overlay), never skipped.
//! - The cursor (`M/acked`) only moves forward, and only by [`Journal::ack`] after the cloud answered
//!   2xx, or backwards by [`Journal::rewind_to`], the audited replay the cloud asks for
//!   (`commands.rs`). An ack moves the cursor without reading the entries again (their sizes are
//!   known from the read), and keeps the acknowledged entries for replay within
//!   `Options::replay_window` bytes (`retain_from ..= acked`).
//! - A segment is deleted when each of its seqs is acknowledged durably and before `retain_from`,
//!   or covered by an overlay a sync made durable. The newest segment is never deleted.
//!
//! # Durability and the crash window
//! **Guaranteed.** A record counts as durable (`durable_seq`: handed to the uplink by
//! [`Journal::read_batch`], reported to the writer, which then lets the MQTT thread PUBACK) only
//! after an `fdatasync` that *began after its frame was written* ended without error, in this
//! process. So:
//! - **Power cut.** Everything durable survives. A torn last frame is cut at open: it was never
//!   synced, so never PUBACKed nor uploaded, and the broker sends it again.
//! - **Crash, then later a power cut.** A crash (SIGKILL, OOM kill, the watchdog's abort) leaves
//!   the frames written since the last sync in the page cache: readable, CRC-valid, not on disk.
//!   Nothing read from the files counts as durable until this process synced it: the open ends
//!   with a sync of the newest segment (the only one that can hold unsynced frames, `segments.rs`),
//!   the log directory, sled's files and their directories, before any upload or PUBACK.
//! - **A failed `fdatasync`.** Linux reports a writeback error once and may mark the pages clean,
//!   so a retried sync can return 0 for data that never reached the disk. A failed sync is never
//!   retried: the journal refuses appends and syncs ([`Error::Unavailable`]) and the group is not
//!   PUBACKed; the writer reopens the journal (every 2 s while it fails), and the reopen first
//!   rewrites what the failed sync covered from what this process can still read: the log
//!   segment into a new file synced before it is renamed into place (`segments::rewrite`), sled
//!   into a new generation (`compact`). Records whose frames survive the rewrite become durable
//!   then (the broker's redeliveries of them are recognised and PUBACKed); frames that did not
//!   survive were never handed out, and their seqs are assigned again. The same at open: a failed
//!   first sync of what an earlier process left is followed by the rewrite, not by a retry. sled
//!   runs without its flusher thread, which `fsync`s sled's file every second and only logs a
//!   failure (later writes would then land on top of the dropped pages, unseen): every sync of
//!   sled's file is the journal's own. An EIO that sled returns from a write or a flush counts
//!   the same.
//! - **Two threads syncing at once.** One sync runs at a time ([`Journal::sync`]): a caller that
//!   finds one running waits for it, and returns only if that sync began after the caller's
//!   writes (its target covers them); otherwise it runs a sync of its own.
//! - **Bit rot, a card that lies.** A synced frame that reads back damaged is never skipped: it
//!   is reported as a `journal_lost` gap. A damaged last frame is taken for a torn write only past
//!   the seq the journal knows was synced (sled records it with every snapshot, the seq mark at
//!   every renewal and clean close); below it the loss is reported and seqs continue after the
//!   mark's lease, never reusing one the cloud may have seen.
//!
//! **Not guaranteed.** A process crash between a failed sync and the rewrite (a few system
//! calls): the next process cannot know the sync failed and trusts what it reads once its own
//! sync succeeds. sled still `fsync`s its file itself when it truncates it (freeing segments at
//! its end): what it does with a failure there is sled's own, unchecked here. A failed `fsync` of a directory is not rewritten: the journal stops and the
//! reopen syncs the directory again. A disk that acknowledges a sync it did not perform (a
//! cache without power-loss protection) defeats any software: a last frame lost that way is
//! reported only when the journal knew it was synced.
//!
//! **How.** [`Journal::sync`] `fdatasync`s the active segment (a segment is synced when it is
//! closed, and a new one is made durable in its directory at creation): one `fdatasync` per group
//! commit. sled is flushed and its file and blob files `fdatasync`ed (sled 0.34's own `flush()`
//! ends in `sync_file_range`, not a barrier against power loss) only when it holds a change that
//! must be durable: overlays, dead letters, command results, a rewind, an ack that frees a
//! segment. The positions and redelivery marks of appends need not be, and an append does not
//! write to sled at all: it encodes its frames into one buffer and writes them with one `write`
//! per segment touched. The redelivery window lives in memory; sled records it with the positions
//! (`next_seq` and the counters, as one snapshot) and the seq the log is synced through at the
//! first sync after the log started a new segment (written to sled's file then, not synced:
//! sled runs no flusher thread, see `store.rs`), at every sync of sled, and at close. Whatever
//! sled lost of that (a SIGKILL loses its unflushed buffers, a power cut what it had not synced)
//! is rebuilt at open from the frames past it: the head comes from the log, the counters are advanced over the frames past
//! the stored `next_seq`, and the window is completed from the packet id each frame carries,
//! from the seq the stored window is complete below. So a crash leaves open about a segment of
//! the log to read, not everything since sled was last synced. Appends are group committed: the
//! writer appends a batch, syncs once, and only then lets the MQTT thread PUBACK. A crash between
//! the sync and the PUBACK makes the broker redeliver with DUP; the window (rebuilt from the
//! frames if sled lost it) lets the writer recognise the copy. Segments are freed only after a
//! sync of sled, which records the window first, so a mark is never lost with its frame. An ack
//! is not synced by itself unless it frees a segment (the cursor is durable before the data
//! goes): a lost ack only means the cloud sees a batch again and deduplicates it. A file or
//! directory survives a power cut only once the directory holding it is synced, so the journal
//! syncs the parents of the `journal.dir` it creates, of the log, and of the database directory
//! that sled fills at open. Every sync goes through `fsync.rs`.
//!
//! # Losing the journal
//! sled 0.34 opens damaged files without complaint more often than it refuses them (measured: a
//! truncated file opened with 7 of 10,000 keys), and a disk may lose synced data. So besides moving
//! an unopenable database aside (`db.corrupt-<unix seconds>`, kept for forensics) and starting a
//! fresh one (whose log, belonging to no database, is removed), the journal keeps a seq high-water
//! mark outside sled (`mark.rs`): a lease on seqs, renewed before any seq past it is assigned, and
//! the durable head at the last renewal or clean close. A fresh database where a mark exists, or a
//! head below the mark's, is reported as a `journal_lost` gap up to the lease, and seqs continue
//! after it: `seq` never goes backwards, so the cloud's dedupe never drops a new record.
//!
//! # Full journal
//! The on-disk budget is `journal.max_bytes`, for the segments and sled together. Admission is
//! decided on the logical bytes held (frames of the backlog, and dead letters), against a share of
//! `max_bytes` that leaves room for what the log holds besides the backlog (the replay window,
//! partly freed segments) and adapts to the bytes measured on disk (`budget.rs`).
//! `reject_new` refuses the append (the writer retries; the broker queues); `drop_oldest` covers
//! the oldest unsent records with a `journal_full` overlay, and the segments it covers go at the
//! next sync. sled holds little, but its file grows with the volume written, so it is compacted
//! into a new generation when it has doubled (`maybe_compact` in `store.rs`, `layout.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};

use crate::protocol::GapReason;

/// Disk use is measured every this many appends (a `stat` of sled's files), and sled's size for
/// compaction every this many `maybe_compact` calls.
const MEASURE_EVERY: u64 = 16;
/// The record log's directory in `journal.dir` (`segments.rs`).
const LOG_DIR: &str = "log";
/// A single append takes at most `max_bytes / GROUP_SHARE` bytes of records (at least one record).
const GROUP_SHARE: u64 = 32;
/// errno of a writeback error (`EIO`), as `std::io::Error::raw_os_error` reports it.
const EIO: i32 = 5;

mod budget;
pub mod codec;
mod commands;
mod dead;
mod fsync;
#[cfg(test)]
pub(crate) use fsync::hook as fsync_hook;
mod layout;
pub mod mark;
mod recovery;
mod redelivery;
pub(crate) use redelivery::MAX_MARKS;
mod segments;
mod store;

pub use commands::{MAX_COMMAND_ID, MAX_COMMANDS, Rewind, default_replay_window};

use codec::*;
use mark::{LEASE_STEP, Mark, MarkFile};
use redelivery::Marks;
use segments::{Flow, Item, Overlay, Overlays, Segments, push_frame};
use store::{Store, open_store, sync_blobs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create journal directory {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open journal at {path}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("journal i/o error while {action}")]
    Storage {
        action: &'static str,
        source: sled::Error,
    },
    #[error("journal log error in {path}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot sync journal file {path}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal entry seq={seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
    #[error("journal is full ({used} of {budget} bytes used)")]
    Full { used: u64, budget: u64 },
    #[error("journal at {path} is in use by another process (is another ferry running on it?)")]
    Busy { path: PathBuf },
    #[error("journal at {path} is unreadable (sled panicked while opening it)")]
    Unreadable { path: PathBuf },
    #[error("cannot arrange the journal directory {path}")]
    Layout {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the seq mark {path}")]
    Mark {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal is closed after an i/o error; reopening")]
    Unavailable,
    #[error(
        "dead-letter store full ({count} records, {bytes} bytes): the cloud keeps refusing records; \
         see `ferry dead-letters`, fix the cause, requeue them"
    )]
    DeadLettersFull { count: u64, bytes: u64 },
    #[error("no dead letter with seq={seq}")]
    NoDeadLetter { seq: u64 },
    #[error("seq={seq} is not retained: {reason}")]
    NotRetained { seq: u64, reason: String },
    #[error(
        "command not stored: id of {id_bytes} bytes, result of {result_bytes} bytes (allowed 1..={} and {})",
        commands::MAX_COMMAND_ID,
        commands::MAX_COMMAND_RESULT
    )]
    CommandTooLarge {
        id_bytes: usize,
        result_bytes: usize,
    },
}

impl Error {
    /// Whether the database itself is damaged (as opposed to busy, forbidden or out of space), so
    /// that moving it aside and starting a fresh one is the right answer.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Open { source, .. } | Error::Storage { source, .. } => match source {
                // Garbage where the database should be, or files that end or read wrong.
                sled::Error::Io(io) => matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::NotADirectory
                ),
                sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => true,
                // A configuration sled refuses (another segment size, say): the data is fine, so
                // it is reported, never moved aside.
                sled::Error::Unsupported(_) => false,
                sled::Error::CollectionNotFound(_) => true,
            },
            Error::Unreadable { .. } | Error::Corrupt { .. } => true,
            // sled could not create its files where its directory should be.
            Error::Sync { source, .. } | Error::Log { source, .. } => {
                source.kind() == std::io::ErrorKind::NotADirectory
            }
            _ => false,
        }
    }

    /// Errors that are expected to clear by themselves (space freed by the uplink, disk space back).
    pub fn is_full(&self) -> bool {
        matches!(self, Error::Full { .. })
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// How the payload is represented on the wire, decided at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredFormat {
    Json,
    Text,
    Raw,
}

/// A message to append, as the ingest side hands it over.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub ts_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub format: StoredFormat,
    pub parse_error: bool,
    /// Set (to the payload's size) for a message over `mqtt.max_packet_size`: its seq is reported
    /// to the cloud as a `rejected` gap instead of being stored.
    pub too_large: Option<u64>,
    /// MQTT packet id and DUP flag of a QoS1 delivery, for redelivery detection.
    pub mqtt: Option<MqttDelivery>,
}

/// A stored record offered again (a dead letter, a requeue): no MQTT delivery to recognise.
impl From<Record> for NewRecord {
    fn from(r: Record) -> NewRecord {
        NewRecord {
            ts_ms: r.ts_ms,
            topic: r.topic,
            payload: r.payload,
            format: r.format,
            parse_error: r.parse_error,
            too_large: None,
            mqtt: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MqttDelivery {
    pub pkid: u16,
    pub dup: bool,
}

/// A record read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub ts_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub format: StoredFormat,
    pub parse_error: bool,
}

/// One unacknowledged entry, in seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Record(Record),
    Gap {
        from_seq: u64,
        to_seq: u64,
        reason: GapReason,
    },
}

impl Entry {
    pub fn first_seq(&self) -> u64 {
        match self {
            Entry::Record(r) => r.seq,
            Entry::Gap { from_seq, .. } => *from_seq,
        }
    }
    pub fn last_seq(&self) -> u64 {
        match self {
            Entry::Record(r) => r.seq,
            Entry::Gap { to_seq, .. } => *to_seq,
        }
    }
}

/// A record the cloud refused, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub status: u16,
    pub error: String,
    pub at_ms: u64,
    pub topic: String,
    pub payload_bytes: usize,
}

/// What an append did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Seqs assigned, in order (empty when every record was a recognised redelivery).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Redeliveries recognised by their redelivery mark and not journaled again.
    pub redeliveries: u64,
    /// Records replaced by a gap to make room (`drop_oldest`).
    pub dropped: u64,
    /// How many of the given records were taken (journaled, or recognised as redeliveries); the
    /// rest did not fit and must be offered again.
    pub taken: usize,
}

/// A snapshot of the journal's positions and sizes, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Positions {
    pub head_seq: u64,
    pub acked_seq: u64,
    pub durable_seq: u64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub dead_letters: u64,
    pub logical_bytes: u64,
    pub budget_bytes: u64,
    /// Records replaced by `journal_full` gaps since start.
    pub dropped: u64,
    /// The oldest acknowledged seq kept for the downlink's `replay_from` (`journal.replay_window`):
    /// `replay_from` accepts `replay_oldest_seq..=head_seq`. `None` while nothing is retained.
    pub replay_oldest_seq: Option<u64>,
}

/// What a full journal does with a new record (`journal.on_full`): refuse it (the broker keeps it
/// and redelivers), or make room by replacing the oldest unsent records with a `journal_full` gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    RejectNew,
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub on_full: OnFull,
    pub cache_bytes: u64,
    /// Bytes of acknowledged entries kept for `rewind_to` (`journal.replay_window`).
    pub replay_window: u64,
    /// A fixed logical budget instead of the adaptive one (for tests of the full-journal rules).
    pub fixed_budget: Option<u64>,
}

/// Clears `State::syncing` if the sync that set it ends without doing so itself (a panic).
struct SyncToken<'a> {
    journal: &'a Journal,
    armed: bool,
}

impl<'a> SyncToken<'a> {
    fn new(journal: &'a Journal) -> SyncToken<'a> {
        SyncToken {
            journal,
            armed: true,
        }
    }

    /// Ends the sync under the caller's lock: the next caller may sync.
    fn release(mut self, st: &mut State) {
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
    fn sled_changed(&mut self) {
        self.sled_gen += 1;
    }
}

/// Handle to the journal. Cloning is cheap; all clones share one sled database.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open database; `None` after a failed reopen (then every operation is `Unavailable`).
    store: RwLock<Option<Store>>,
    opts: Options,
    on_full: OnFull,
    max_bytes: u64,
    replay_window: u64,
    fixed_budget: Option<u64>,
    state: Mutex<State>,
    /// The seq mark outside sled. Locked after `state` when both are needed.
    mark: Arc<Mutex<MarkFile>>,
    /// Signalled when the durable head moves, for the uplink.
    data: Condvar,
    /// Signalled when a sync ends, for the syncs waiting for it.
    synced: Condvar,
    /// A write or sync of sled's files failed with EIO: nothing sled wrote since its last good
    /// sync can be trusted, so nothing is appended or synced until the reopen rewrites the
    /// database (`compact`). Not in `State`: `apply` sets it, under the state's lock.
    sled_failed: AtomicBool,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    acked: u64,
    /// The cursor as last made durable in sled (segments are freed only behind it).
    acked_durable: u64,
    /// Highest seq known to be synced to disk.
    durable: u64,
    /// `durable` when the last reopen began: a log that comes back shorter lost synced frames.
    synced_before: u64,
    backlog_records: u64,
    backlog_bytes: u64,
    dead_bytes: u64,
    dead_count: u64,
    /// Entries up to here may be in an upload right now and must not be trimmed.
    protected_through: u64,
    /// Logical bytes admitted, adapted to what the journal really uses on disk.
    budget: u64,
    appends: u64,
    disk_high: bool,
    /// No seq above this is assigned without renewing the mark first.
    lease: u64,
    /// Records replaced by `journal_full` gaps since start.
    dropped: u64,
    /// A `journal_full` gap that keeps growing is said at WARN once a minute (see `budget.rs`),
    /// with the records dropped since the last time.
    drop_log: crate::logging::Repeats,
    drop_unsaid: u64,
    /// The redelivery window (`redelivery.rs`), complete for every seq below `next_seq`.
    marks: Marks,
    /// A segment was started since sled last recorded the positions and marks: the next sync
    /// records them (so that recovery reads at most about a segment of the log's tail).
    snapshot_due: bool,
    /// The buffer a group commit's frames are encoded into, and each frame's (seq, end offset).
    frames: Vec<u8>,
    frame_ends: Vec<(u64, usize)>,
    /// `maybe_compact` calls, to measure sled's files only every `MEASURE_EVERY`.
    compact_checks: u64,
    /// The record log; `None` until the first recovery.
    log: Option<Segments>,
    /// Gaps standing in for entries of the log (the `X` keys), by first seq.
    overlays: Overlays,
    /// Counts overlays made, to tell which ones a sync made durable.
    overlay_generation: u64,
    /// The oldest acknowledged seq retained for replay (`commands.rs`); above `acked` when none.
    retain_from: u64,
    /// Bytes of acknowledged entries retained for replay.
    retained_bytes: u64,
    /// The retained entries in acknowledged chunks (last seq, bytes), oldest first.
    retained_chunks: std::collections::VecDeque<(u64, u64)>,
    /// The entries of the last `read_batch` (first seq, last seq, bytes), so that an ack of them
    /// need not read them again.
    inflight: Vec<(u64, u64, u64)>,
    /// The cursor was rewound since the last `read_batch`: the upload in flight does not ack.
    rewound: bool,
    /// sled's size on disk after the last open or compaction.
    sled_floor: u64,
    /// Changes to sled that a sync must make durable (not the positions and marks of appends:
    /// those are rebuilt from the log), counted; `sled_synced` of them are durable.
    sled_gen: u64,
    sled_synced: u64,
    /// A sync is running (`Journal::sync`): others wait for it rather than sync beside it.
    syncing: bool,
    /// Callers of `Journal::sync` waiting for the one running (for the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    sync_waiters: usize,
    /// Overlays up to this generation are durable in sled.
    overlays_durable: u64,
}

/// The record log inside the state, or [`Error::Unavailable`] when it is not open.
fn log_of(log: &mut Option<Segments>) -> Result<&mut Segments> {
    log.as_mut().ok_or(Error::Unavailable)
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
                    "journal would not open ({}); moved it aside to {} and started a fresh one; \
                     its unsent records are reported to the cloud as journal_lost",
                    crate::error_chain(&e),
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
            drop_log: crate::logging::Repeats::new(std::time::Duration::from_secs(60)),
            drop_unsaid: 0,
            marks: Marks::default(),
            snapshot_due: false,
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
    fn renew_lease(&self, st: &mut State, markf: &mut MarkFile, through: u64) -> Result<()> {
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

    fn mark(&self) -> MutexGuard<'_, MarkFile> {
        self.inner.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a prefix of `records` in order, assigning consecutive seqs, and returns how many it
    /// took (`Appended::taken`): as many as the budget allows, and at least one when the journal is
    /// empty, so that a single record larger than the budget cannot stall ingest. With nothing
    /// taken the error is [`Error::Full`]. The records are not durable until [`Journal::sync`]
    /// returns.
    ///
    /// A record whose MQTT delivery is a DUP of the message last journaled under the same packet id
    /// (same topic and payload) is taken without being journaled again, and counted in
    /// `redeliveries`.
    pub fn append(&self, records: &[NewRecord]) -> Result<Appended> {
        let mut st = self.lock();
        // Appends rarely write to sled, so they would not notice it is closed: a failed reopen
        // (or a failed sync, until the reopen) must stop them as it stops everything else.
        self.ensure_writable(&st)?;
        // The frames of a group are encoded into one buffer kept between appends.
        let mut buf = std::mem::take(&mut st.frames);
        let mut ends = std::mem::take(&mut st.frame_ends);
        buf.clear();
        ends.clear();
        let appended = self.append_group(&mut st, records, &mut buf, &mut ends);
        st.frames = buf;
        st.frame_ends = ends;
        appended
    }

    /// [`Journal::append`] with the buffer the frames are encoded into (`buf`, and each frame's
    /// seq and end offset in `ends`).
    fn append_group(
        &self,
        st: &mut State,
        records: &[NewRecord],
        buf: &mut Vec<u8>,
        ends: &mut Vec<(u64, usize)>,
    ) -> Result<Appended> {
        let mut out = Appended::default();
        self.adapt_budget(st);
        let budget = st.budget;

        // Encode every record that is not a redelivery as a frame, with the seq it gets if taken:
        // the group takes a prefix, so these are the seqs it will have.
        let mut sizes: Vec<Option<u64>> = Vec::with_capacity(records.len());
        // (packet id, content hash) of the QoS1 records encoded, in order.
        let mut group_marks: Vec<(u16, u64)> = Vec::new();
        let mut incoming = 0u64;
        let mut seq = st.next_seq;
        for rec in records {
            if let Some(m) = rec.mqtt {
                let hash = content_hash(&rec.topic, &rec.payload);
                // The newest message under this packet id: earlier in this group, or journaled.
                let seen = match group_marks.iter().rev().find(|(p, _)| *p == m.pkid) {
                    Some((_, h)) => *h == hash,
                    None => st.marks.matches(m.pkid, hash),
                };
                if m.dup && seen {
                    sizes.push(None);
                    continue;
                }
                group_marks.push((m.pkid, hash));
            }
            let pkid = rec.mqtt.map(|m| m.pkid);
            let size = match rec.too_large {
                None => push_frame(buf, seq, pkid, |b| encode_record_into(rec, b)),
                Some(_) => push_frame(buf, seq, pkid, |b| {
                    b.extend_from_slice(&encode_gap(seq, GapReason::Rejected))
                }),
            }
            .map_err(log_io("encoding records"))?;
            ends.push((seq, buf.len()));
            incoming += size;
            sizes.push(Some(size));
            seq += 1;
        }

        let mut batch = sled::Batch::default();
        let held = st.backlog_bytes + st.dead_bytes;
        if held + incoming > budget && self.inner.on_full == OnFull::DropOldest {
            // Make room for the whole group if the unsent records allow it.
            out.dropped = self.trim_oldest(st, &mut batch, held + incoming - budget)?;
        }
        let mut used = st.backlog_bytes + st.dead_bytes;
        let mut next = st.next_seq;
        let mut added_bytes = 0u64;
        let mut added_records = 0u64;
        let mut group_marks = group_marks.into_iter();
        let mut marks = Vec::new();
        for (rec, size) in records.iter().zip(sizes) {
            let Some(size) = size else {
                out.redeliveries += 1;
                out.taken += 1;
                continue;
            };
            let empty = used == 0 && added_records == 0;
            if used + size > budget && !empty {
                break;
            }
            // One commit may add only so much, so that a group stays a small part of the budget.
            if added_records > 0 && added_bytes + size > self.inner.max_bytes / GROUP_SHARE {
                break;
            }
            if let Some(m) = rec.mqtt {
                let hash = group_marks.next().map_or(0, |(_, h)| h);
                marks.push(redelivery::Mark {
                    seq: next,
                    pkid: m.pkid,
                    hash,
                });
            }
            if let Some(bytes) = rec.too_large {
                error!(
                    "message too large topic={} bytes={} (over mqtt.max_packet_size): reported to the cloud as rejected gap seq={}",
                    rec.topic, bytes, next
                );
            }
            used += size;
            added_bytes += size;
            added_records += 1;
            out.taken += 1;
            out.first_seq.get_or_insert(next);
            out.last_seq = Some(next);
            next += 1;
        }
        let taken = (next - st.next_seq) as usize;
        self.write_frames(st, buf, &ends[..taken], batch, out.dropped > 0)?;
        if taken == 0 && out.taken == 0 {
            return Err(Error::Full { used, budget });
        }
        // Only frames written get marks: a mark makes a redelivery count as journaled.
        for m in marks {
            st.marks.push(m);
        }
        st.backlog_records += added_records;
        st.backlog_bytes += added_bytes;
        st.next_seq = next;
        Ok(out)
    }

    /// The writing half of [`Journal::append`]: the lease, then the frames, then sled's `batch`
    /// (a trim's overlays and positions) when `trimmed`. sled's positions may run ahead of the log
    /// (recovery trusts the log and recounts), and usually lag behind it: the positions and marks
    /// of appends are recorded only at a sync after a new segment was started, and rebuilt from
    /// the frames past them at open.
    fn write_frames(
        &self,
        st: &mut State,
        buf: &[u8],
        frames: &[(u64, usize)],
        batch: sled::Batch,
        trimmed: bool,
    ) -> Result<()> {
        if let Some(&(last, _)) = frames.last() {
            if last > st.lease {
                // Durably reserve the seqs before they exist anywhere.
                let mut markf = self.mark();
                self.renew_lease(st, &mut markf, last)?;
            }
            let end = frames.last().map_or(0, |f| f.1);
            let rolled = log_of(&mut st.log)?
                .append_frames(&buf[..end], frames)
                .map_err(log_io("appending records"))?;
            st.snapshot_due |= rolled;
        }
        if trimmed {
            // Keep a trim: the in-memory counters already reflect it.
            let mut batch = batch;
            put_positions(st, &mut batch);
            self.apply(batch, "dropping the oldest records")?;
        }
        Ok(())
    }

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
                crate::error_chain(&e)
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
    fn wait_sync_end<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.inner
            .synced
            .wait_timeout(st, Duration::from_secs(1))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// The part of [`Journal::sync`] after the log is durable through `target`: sled records the
    /// positions and marks of appends (when it is synced anyway, or once a segment was started,
    /// bounding what open reads), and with `flush` sled is made durable.
    fn sync_sled(&self, flush: bool, target: u64) -> Result<()> {
        {
            let mut st = self.lock();
            if flush || st.snapshot_due {
                let mut batch = sled::Batch::default();
                put_snapshot(&st, &mut batch, Some(target));
                self.apply(batch, "recording positions")?;
                st.snapshot_due = false;
                if !flush {
                    // Written to sled's file (not synced), so that a crash leaves open about a
                    // segment of the log to read: sled has no flusher thread of its own.
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
    fn ensure_writable(&self, st: &State) -> Result<()> {
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

    fn log_dir(&self) -> PathBuf {
        self.inner.opts.dir.join(LOG_DIR)
    }

    /// Makes the next [`Journal::sync`] flush sled too.
    pub(super) fn sled_changed(&self) {
        self.lock().sled_changed();
    }

    /// Deletes the segments nothing needs any more: every seq in them is acknowledged durably and
    /// older than the replay window, or covered by an overlay made durable by a sync.
    fn free_segments(&self, st: &mut State) -> Result<()> {
        let below = st.acked_durable.min(st.retain_from.saturating_sub(1));
        let generation = st.overlays_durable;
        let State { log, overlays, .. } = &mut *st;
        let log = log_of(log)?;
        if log
            .first_seq()
            .is_none_or(|f| f > below && overlays.is_empty())
        {
            return Ok(());
        }
        let n = log
            .remove_if(|first, last| {
                let mut s = first;
                while s <= last {
                    if s <= below {
                        s = below + 1;
                        continue;
                    }
                    match overlays.range(..=s).next_back() {
                        Some((_, o)) if o.to >= s && o.generation <= generation => s = o.to + 1,
                        _ => return false,
                    }
                }
                true
            })
            .map_err(log_io("removing segments"))?;
        if n > 0 {
            debug!("journal freed segments={} acked_seq={}", n, below);
        }
        Ok(())
    }

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
                .read(from, end, overlays, true, |item| {
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

    /// Drops the protection of entries read for an upload that will not be acknowledged.
    pub fn release(&self) {
        let mut st = self.lock();
        st.protected_through = st.acked;
    }

    /// Records that the cloud acknowledged every entry up to and including `through`: moves the
    /// cursor in sled, without reading the entries again (their sizes are known from the read).
    /// Not synced by itself (a lost ack only means the cloud sees a batch again and deduplicates
    /// it), except when it frees a segment: the cursor is made durable before the data goes. The
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
        self.retain_acked(&mut st, &mut batch, through, bytes);
        st.acked = through;
        st.protected_through = st.protected_through.max(through);
        st.backlog_records = st.backlog_records.saturating_sub(records);
        st.backlog_bytes = st.backlog_bytes.saturating_sub(bytes);
        if st.acked == st.next_seq - 1 {
            // Nothing left: whatever drift the counters had (damage) ends here.
            st.backlog_records = 0;
            st.backlog_bytes = 0;
        }
        batch.insert(M_ACKED, &through.to_be_bytes()[..]);
        put_positions(&st, &mut batch);
        self.apply(batch, "moving the cursor")?;
        // A segment behind the retention window can go once the cursor is durable.
        let below = st.acked.min(st.retain_from.saturating_sub(1));
        let frees = st.log.as_ref().is_some_and(|log| {
            let mut firsts = log.files_firsts();
            firsts.next();
            firsts.next().is_some_and(|second| second - 1 <= below)
        });
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
            replay_oldest_seq: commands::replay_oldest(&st),
        }
    }

    /// Bytes the journal's files take on disk: the segments and sled's files (0 while closed).
    pub fn disk_bytes(&self) -> u64 {
        let log = self.lock().log.as_ref().map_or(0, Segments::disk_bytes);
        log + self.sled_bytes()
    }

    /// When the oldest record not yet acknowledged was received (ms since the epoch); `None` when
    /// nothing is waiting. Gaps are skipped, and at most 64 entries are looked at.
    pub fn oldest_unsent_ts_ms(&self) -> Result<Option<u64>> {
        let mut st = self.lock();
        let (from, end) = (st.acked + 1, st.durable);
        let mut ts = None;
        let mut seen = 0;
        let State { log, overlays, .. } = &mut *st;
        log_of(log)?
            .read(from, end, overlays, false, |item| {
                seen += 1;
                if let Item::Frame(Entry::Record(r), ..) = item {
                    ts = Some(r.ts_ms);
                    return Flow::Stop;
                }
                if seen >= 64 { Flow::Stop } else { Flow::Next }
            })
            .map_err(log_io("reading the oldest entry"))?;
        Ok(ts)
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
    fn ensure_open(&self) -> Result<()> {
        self.store().map(drop)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only counters behind; they are still usable.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, batch: sled::Batch, action: &'static str) -> Result<()> {
        self.store()?.log.apply_batch(batch).map_err(|source| {
            self.note_sled_error(&source);
            Error::Storage { action, source }
        })
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

    fn meta(&self, key: &[u8]) -> Result<Option<u64>> {
        let v = self
            .store()?
            .log
            .get(key)
            .map_err(storage("reading positions"))?;
        Ok(match v {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                Some(u64::from_be_bytes(b))
            }
            Some(_) => {
                warn!(
                    "journal position {:?} has a bad length; recomputing",
                    String::from_utf8_lossy(key)
                );
                None
            }
            None => None,
        })
    }
}

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

/// The positions as one consistent snapshot: the counters count the entries
/// `acked+1 ..= next_seq-1`, so they are never stored without the two seqs they belong to.
fn put_positions(st: &State, batch: &mut sled::Batch) {
    batch.insert(M_NEXT_SEQ, &st.next_seq.to_be_bytes()[..]);
    batch.insert(M_ACKED, &st.acked.to_be_bytes()[..]);
    batch.insert(M_BACKLOG_RECORDS, &st.backlog_records.to_be_bytes()[..]);
    batch.insert(M_BACKLOG_BYTES, &st.backlog_bytes.to_be_bytes()[..]);
    batch.insert(M_DEAD_BYTES, &st.dead_bytes.to_be_bytes()[..]);
}

/// The positions and the redelivery window, complete up to `next_seq`: what recovery starts from
/// before it reads the log's frames past them. With `durable`, the seq through which the log was
/// just synced: a later open that finds the log ending before it knows the log lost synced frames.
fn put_snapshot(st: &State, batch: &mut sled::Batch, durable: Option<u64>) {
    put_positions(st, batch);
    batch.insert(&[P_WINDOW][..], st.marks.encode(st.next_seq));
    if let Some(d) = durable {
        batch.insert(M_DURABLE, &d.to_be_bytes()[..]);
    }
}

/// Maps an i/o error of the record log to [`Error::Log`].
fn log_io(action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| {
        let source = std::io::Error::new(source.kind(), format!("{action}: {source}"));
        Error::Log {
            path: PathBuf::from(LOG_DIR),
            source,
        }
    }
}

/// Number of entries `from..=through` as the uplink sees them, and their bytes.
fn count(log: &mut Segments, overlays: &Overlays, from: u64, through: u64) -> Result<(u64, u64)> {
    let (mut n, mut bytes) = (0u64, 0u64);
    if from > through {
        return Ok((0, 0));
    }
    log.read(from, through, overlays, false, |item| {
        n += 1;
        bytes += item.size();
        Flow::Next
    })
    .map_err(log_io("counting entries"))?;
    Ok((n, bytes))
}

/// Maps a sled error to [`Error::Storage`] with what the journal was doing.
fn storage(action: &'static str) -> impl FnOnce(sled::Error) -> Error {
    move |source| Error::Storage { action, source }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// fsync of a directory, so that files created or renamed in it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fsync::dir(dir).map_err(|source| Error::Sync {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
