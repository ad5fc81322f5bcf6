//! The journal: every ingested message, durably, in seq order, until the cloud acknowledges it.
//!
//! This is the only crate of the workspace that depends on `sled` (the agent reaches it as
//! `ferry::journal`). Everyone else holds a [`Journal`], a cheap clonable handle.
//!
//! # Where things are
//! This file holds the types, the state and the rules below; `impl Journal` is spread by path:
//! `open.rs` (open, reopen and its repairs, close), `write.rs` (append, freeing segments),
//! `sync.rs` (one sync at a time, never a retried one), `read.rs` (batches, acks, positions),
//! `replay.rs` (the replay window, rewind), `commands.rs` (command results), `dead.rs` (dead
//! letters), `recovery.rs` (positions from disk at open), `budget.rs` (the full journal),
//! `store.rs` (sled's files and compaction); below them `segments.rs` (the record log),
//! `codec.rs`, `mark.rs`, `layout.rs`, `fsync.rs`, `fnv.rs`.
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
//! | `X` seq:u64 | an overlay: a gap (`to_seq`, reason) shown in place of the log's entries `seq..=to_seq` — a dead-lettered record (`rejected`), records dropped for room (`journal_full`), unreadable ones (`journal_lost`), unsent ones too old (`expired`, `budget.rs`) |
//! | `D` seq:u64 | a dead-lettered record: why the cloud refused it, then the record's entry value (`dead.rs`) |
//! | `W` | the redelivery window (`redelivery.rs`): the seq it is complete below, then (seq, MQTT packet id, hash of topic+payload) of the newest QoS1 messages journaled |
//! | `M` name | `next_seq`, `acked`, `backlog_records`, `backlog_bytes`, `dead_bytes` (written together, one snapshot), `durable` (the seq the log was synced through at that snapshot), `retain_from`, `retained_bytes`, all u64 |
//! | `C`, `O` | downlink command results (`commands.rs`) |
//! | `K` boot id | the wall clock of a boot, as an offset from its monotonic clock (`clock.rs`) |
//!
//! An entry value is `[1] postcard(header) payload` for a record (the payload as the raw MQTT
//! bytes, turned into its wire form only at upload), `[3] postcard(header) postcard(monotonic)
//! payload` for a record taken while the wall clock was not trusted ([`Monotonic`]), or
//! `[2] postcard(to_seq, reason)` for a gap.
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
//!   (`replay.rs`). An ack moves the cursor without reading the entries again (their sizes are
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
//! its end): what it does with a failure there is sled's own, unchecked here. Seen once in 1,000
//! power cuts (`make torture`, seed 1796304266092827400): after a failed sync of sled's file and
//! a power cut before the repair, sled refused its database. The journal moves it aside and
//! adopts the log (see *Losing the journal*), so the records survive; what only sled held (dead
//! letters, the gaps laid over the log) does not. A
//! failed `fsync` of a directory is not rewritten: the journal stops and the reopen syncs the
//! directory again. A disk that acknowledges a sync it did not perform (a
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
//! first sync after the log started its fourth new segment since (`SNAPSHOT_SEGMENTS`; written to
//! sled's file then, not synced:
//! sled runs no flusher thread, see `store.rs`), at every sync of sled, and at close. Whatever
//! sled lost of that (a SIGKILL loses its unflushed buffers, a power cut what it had not synced)
//! is rebuilt at open from the frames past it: the head comes from the log, the counters are advanced over the frames past
//! the stored `next_seq`, and the window is completed from the packet id each frame carries,
//! from the seq the stored window is complete below. So a crash leaves open about four segments
//! of the log to read, not everything since sled was last synced. Appends are group committed: the
//! writer appends a batch, syncs once, and only then lets the MQTT thread PUBACK. A crash between
//! the sync and the PUBACK makes the broker redeliver with DUP; the window (rebuilt from the
//! frames if sled lost it) lets the writer recognise the copy. Segments are freed only after a
//! sync of sled, which records the window first, so a mark is never lost with its frame. An ack
//! is written to sled at most every 5 s ([`POSITIONS_EVERY`]) and not synced by itself unless
//! it frees a segment (the cursor is then written and durable before the data goes): a lost ack
//! only means the cloud sees a batch again and deduplicates it. A file or
//! directory survives a power cut only once the directory holding it is synced, so the journal
//! syncs the parents of the `journal.dir` it creates, of the log, and of the database directory
//! that sled fills at open. Every sync goes through `fsync.rs`.
//!
//! # Losing the journal
//! sled 0.34 opens damaged files without complaint more often than it refuses them (measured: a
//! truncated file opened with 7 of 10,000 keys), and a disk may lose synced data. So besides moving
//! an unopenable database aside (`db.corrupt-<unix seconds>`, kept for forensics) and starting a
//! fresh one, the journal adopts a log it finds beside a fresh database: the frames are
//! self-describing, so everything in the log past the cloud's last known cursor (the seq mark's,
//! or below the log's first segment) is sent again and the cloud keeps one copy. Lost with the
//! database: the dead letters, and the gaps laid over the log (rejected and dropped runs), whose
//! records are then sent again as records, beside the gaps the cloud already has. The journal
//! also keeps a seq high-water mark outside sled (`mark.rs`): a lease on seqs, renewed before any
//! seq past it is assigned, and the durable head at the last renewal or clean close. A fresh
//! database and no log where a mark exists, or a head below the mark's, is reported as a
//! `journal_lost` gap up to the lease, and seqs continue
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

use ferry_protocol::GapReason;

/// Disk use is measured every this many appends (a `stat` of sled's files), and sled's size for
/// compaction every this many `maybe_compact` calls.
const MEASURE_EVERY: u64 = 16;
/// The record log's directory in `journal.dir` (`segments.rs`).
const LOG_DIR: &str = "log";
/// A single append takes at most `max_bytes / GROUP_SHARE` bytes of records (at least one record).
const GROUP_SHARE: u64 = 32;
/// How often an ack writes the positions to sled when nothing else needs them written. Every
/// sled batch costs a page write (sled 0.34 rolls its I/O buffer around each), and the uplink acks
/// several times a second: written at every ack, the cursor cost the card more than the records.
/// An ack sled has not recorded is lost only by a crash, and costs then a batch the cloud
/// already has, sent again (it keeps one copy): at most this long of uploads. Measured at 1,000
/// msg/s of 250-byte payloads: every second, sled wrote 8.8 % of the payload's bytes; every 5 s,
/// under 2.5 % (`make bench`, the card wear rows' per-thread figures).
const POSITIONS_EVERY: Duration = Duration::from_secs(5);

/// After how many new segments a sync records the positions and the redelivery window in sled
/// (unsynced), bounding what recovery reads after a crash to about that many segments (1 MiB
/// each with the defaults). Each record costs about 20 KiB (1,024 marks of 18 bytes, and sled's
/// page): at every segment, at 1,000 msg/s of 250-byte payloads, that was 5.7 % of the payload's
/// bytes; at every fourth, 2.0 % (`make bench`, the card wear rows).
const SNAPSHOT_SEGMENTS: u64 = 4;

/// errno of a writeback error (`EIO`), as `std::io::Error::raw_os_error` reports it.
const EIO: i32 = 5;

mod budget;
mod clock;
mod codec;
mod commands;
mod dead;
pub mod fnv;
mod fsync;
#[cfg(test)]
pub(crate) use fsync::hook as fsync_hook;
mod layout;
mod mark;
mod recovery;
mod redelivery;
mod replay;
pub use redelivery::MAX_MARKS;
mod open;
mod read;
mod segments;
mod store;
mod sync;
mod write;

pub use clock::MAX_ANCHORS;
pub use commands::{MAX_COMMAND_ID, MAX_COMMANDS};
pub use replay::{Rewind, default_replay_window};

use codec::*;
use mark::{LEASE_STEP, Mark, MarkFile};
use redelivery::Marks;
use segments::{Flow, Item, Keep, Overlay, Overlays, Segments, push_frame};
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
    /// A Sparkplug B payload that decoded at ingest (raw bytes; decoded at upload).
    SparkplugB,
}

/// A message to append, as the ingest side hands it over.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub ts_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub format: StoredFormat,
    pub parse_error: bool,
    /// Set when the wall clock was not trusted at ingest (`ts_ms` may be 1970 or a stale save).
    pub mono: Option<Monotonic>,
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
            mono: r.mono,
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
    /// The monotonic clock at ingest, kept when the wall clock was not trusted then.
    pub mono: Option<Monotonic>,
}

/// When a record was taken by the clock that does not jump: milliseconds since boot
/// (`CLOCK_BOOTTIME`) of the boot `boot` (the kernel's boot id). Kept with a record taken while
/// the wall clock was not trusted (a gateway without a real-time clock, before NTP), so that its
/// `ts_ms` can be corrected once the wall clock of that boot is known (the agent's `clock`
/// module, and [`Journal::clock_anchor`]). It costs a record 17 to 27 bytes more on disk; records
/// taken under a trusted clock carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Monotonic {
    pub boot: [u8; 16],
    pub ms: u64,
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
    /// Records replaced by `expired` gaps (`journal.max_age`) since start.
    pub expired: u64,
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
    /// Records replaced by `expired` gaps since start.
    expired: u64,
    /// A `journal_full` gap that keeps growing is said at WARN once a minute (see `budget.rs`),
    /// with the records dropped since the last time.
    drop_log: ferry_util::Repeats,
    drop_unsaid: u64,
    /// The redelivery window (`redelivery.rs`), complete for every seq below `next_seq`.
    marks: Marks,
    /// [`SNAPSHOT_SEGMENTS`] segments were started since sled last recorded the positions and
    /// marks: the next sync records them (so that recovery reads at most that many segments of
    /// the log's tail).
    snapshot_due: bool,
    /// Segments started since sled last recorded the positions and marks.
    rolls_since_snapshot: u64,
    /// When an ack last wrote the positions to sled (see [`POSITIONS_EVERY`]).
    positions_written: Option<std::time::Instant>,
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
    /// The oldest acknowledged seq retained for replay (`replay.rs`); above `acked` when none.
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
    fn log_dir(&self) -> PathBuf {
        self.inner.opts.dir.join(LOG_DIR)
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

/// The positions as one consistent snapshot: the counters count the entries
/// `acked+1 ..= next_seq-1`, so they are never stored without the two seqs they belong to.
/// The replay window's bounds go with them (they are moved by the same acks).
fn put_positions(st: &State, batch: &mut sled::Batch) {
    batch.insert(M_NEXT_SEQ, &st.next_seq.to_be_bytes()[..]);
    batch.insert(M_ACKED, &st.acked.to_be_bytes()[..]);
    batch.insert(M_BACKLOG_RECORDS, &st.backlog_records.to_be_bytes()[..]);
    batch.insert(M_BACKLOG_BYTES, &st.backlog_bytes.to_be_bytes()[..]);
    batch.insert(M_DEAD_BYTES, &st.dead_bytes.to_be_bytes()[..]);
    batch.insert(M_RETAIN_FROM, &st.retain_from.to_be_bytes()[..]);
    batch.insert(M_RETAINED_BYTES, &st.retained_bytes.to_be_bytes()[..]);
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
    log.read(from, through, overlays, Keep::Nothing, |item| {
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

pub fn now_ms() -> u64 {
    ferry_util::epoch_ms(std::time::SystemTime::now())
}

/// fsync of a directory, so that files created or renamed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fsync::dir(dir).map_err(|source| Error::Sync {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;

/// The decoders of bytes read back from disk, for the property tests that feed them garbage
/// (`tests/fuzz.rs` in the agent): the journal's deliberate test surface, not its API.
#[doc(hidden)]
pub mod fuzzing {
    /// The entry values of sled's tree and the record log's frames.
    pub mod codec {
        pub use crate::codec::{
            DeadHeader, decode_dead, decode_entry, encode_dead, encode_gap, encode_record,
        };
    }
    /// The seq mark's slots.
    pub mod mark {
        pub use crate::mark::{Mark, SLOT, encode, newest};
    }
}
