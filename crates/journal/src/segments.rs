//! The record log: append-only segment files in `journal.dir/log/`, holding every entry (record or
//! gap) in seq order. The small state (cursor, counters, overlays, dead letters, marks) stays in
//! sled (`mod.rs`); this file only knows frames and files.
//!
//! # Format
//! A segment is named after the seq of its first frame, zero-padded to 20 digits (`<seq>.seg`), so
//! the names sort by seq. A frame is `len u32 | crc32 u32 | seq u64 | mark u32 | value`, little
//! endian, where `len` counts everything after the CRC, the CRC (IEEE) covers the same bytes, `mark`
//! is the MQTT packet id + 1 of a QoS1 record (0: none; the redelivery marks of appends the
//! database never recorded are rebuilt from it), and the value is the entry as `codec.rs` encodes
//! it. Frames follow each other with consecutive seqs (a gap frame covers
//! `seq..=to_seq`). A segment is closed once it would pass `cap` bytes (a single larger frame gets
//! a segment of its own); a group commit that does not fit the rest of a segment starts the next
//! one if it fits there, so the segment closed was synced by the previous commit. The one being
//! closed is `fdatasync`ed before the next is created (when it holds frames this process has not
//! synced), and a new segment's name is made durable in its directory at creation, so older
//! segments are always whole: only the newest can hold frames no sync covered.
//!
//! # Syncs
//! Nothing read from the files counts as synced: the frames of a process that crashed are still in
//! the page cache, readable and CRC-valid, and not on disk. The active segment's `synced_len` is
//! what a sync *of this process* covered; it starts at 0 at open, so the first sync after open
//! `fdatasync`s the newest segment and the log directory whatever they hold. A sync is taken in
//! three steps so that the `fdatasync` runs outside the journal's lock: [`Segments::begin_sync`]
//! notes the length written so far, [`SyncJob::run`] syncs, [`Segments::end_sync`] records the
//! outcome (the journal lets one sync run at a time, see `Journal::sync`).
//!
//! A failed `fdatasync` is never retried: Linux may have dropped the unwritten pages and report
//! the error only once. The segment is marked failed, appends and syncs refuse until the journal
//! is reopened, and the reopen first [`rewrite`]s the segment: its readable frames are copied into
//! a new file, which is synced and renamed over the old one. What the copy holds is durable by a
//! sync of a file that never failed; frames the disk had dropped and the page cache no longer
//! shows are simply not there, and their seqs, never handed out, are assigned again.
//!
//! # Damage
//! Reading never panics and never allocates more than the file holds. A frame that is short, fails
//! its CRC, or has an unexpected seq is damage: the reader looks for the next good frame in the
//! following bytes (a frame whose seq is a little past the expected one and whose CRC holds) and
//! reports the seqs in between as [`Item::Lost`]; without one, the rest of the segment is lost.
//! A segment that ends early, or is missing, is reported the same way. Only at open, in the newest
//! segment, is a bad frame with no good frame after it taken for a torn tail (writes that were
//! never synced, so never acknowledged to anyone) and cut off.
//!
//! Why one file of this length: the frame format, its writer, its reader, the damage rules and the
//! rewrite after a failed sync are one on-disk contract that changes as a whole.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};

use super::Entry;
use super::codec::{decode_entry, encode_gap};
use super::fsync;
use ferry_protocol::GapReason;

/// Bytes before a frame's body: `len` and `crc`.
const HEADER: u64 = 8;
/// The seq and the mark at the start of the body.
const SEQ: u64 = 12;
/// A length field above this is damage, whatever the file holds.
const MAX_BODY: u64 = 1 << 31;
/// How far past the expected seq a frame found after damage may start.
const RESYNC_SEQS: u64 = 64;
/// Read buffer of the sequential reader.
const READ_BUF: usize = 64 << 10;

/// Appends one frame to `buf`: the header, then the value `encode` appends, then the length and
/// CRC filled in. Returns the frame's size (its cost in the budget).
pub(super) fn push_frame(
    buf: &mut Vec<u8>,
    seq: u64,
    pkid: Option<u16>,
    encode: impl FnOnce(&mut Vec<u8>),
) -> io::Result<u64> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER as usize]);
    buf.extend_from_slice(&seq.to_le_bytes());
    let mark = pkid.map_or(0u32, |p| u32::from(p) + 1);
    buf.extend_from_slice(&mark.to_le_bytes());
    encode(buf);
    let body = &buf[start + HEADER as usize..];
    let Some(body_len) = u32::try_from(body.len())
        .ok()
        .filter(|&n| u64::from(n) <= MAX_BODY)
    else {
        buf.truncate(start);
        return Err(io::Error::other("record too large for a frame"));
    };
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok((buf.len() - start) as u64)
}

/// Bytes a frame holding a value of `value_len` bytes takes: its cost in the budget.
pub(super) fn frame_size(value_len: usize) -> u64 {
    HEADER + SEQ + value_len as u64
}

/// Bytes a gap `..=to_seq` costs, as a frame or as an overlay standing in for entries.
pub(super) fn gap_size(to_seq: u64, reason: GapReason) -> u64 {
    frame_size(encode_gap(to_seq, reason).len())
}

/// Segment size for a journal of `max_bytes`: a sixteenth, within 256 KiB ..= 1 MiB. Segments
/// are freed whole, so the one partly acknowledged stays on disk: small segments keep the disk
/// close to the backlog (measured in `make bench`, "disk use after churn"), at the cost of one
/// extra `fdatasync` and a directory sync per segment.
pub(super) fn segment_cap(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(256 << 10, 1 << 20)
}

/// An overlay: a gap that stands in for the entries `from..=to` (dead-lettered or dropped
/// records, or a damaged stretch), kept in sled because segments are immutable. `generation`
/// orders overlays against syncs (`Journal::sync` frees segments only behind durable ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overlay {
    pub to: u64,
    pub reason: GapReason,
    pub generation: u64,
}

pub(super) type Overlays = BTreeMap<u64, Overlay>;

/// What the reader yields, in seq order.
#[derive(Debug)]
pub(super) enum Item {
    /// An entry read from a frame, the frame's size, and the MQTT packet id it was delivered under.
    Frame(Entry, u64, Option<u16>),
    /// An overlay standing in for the entries `from..=to`.
    Overlay(u64, Overlay),
    /// Seqs that should be in the log and are not (damage): `from..=to`.
    Lost(u64, u64),
}

impl Item {
    pub fn first_seq(&self) -> u64 {
        match self {
            Item::Frame(e, ..) => e.first_seq(),
            Item::Overlay(from, _) | Item::Lost(from, _) => *from,
        }
    }
    pub fn last_seq(&self) -> u64 {
        match self {
            Item::Frame(e, ..) => e.last_seq(),
            Item::Overlay(_, o) => o.to,
            Item::Lost(_, to) => *to,
        }
    }
    /// The entry the uplink sees.
    pub fn entry(self) -> Entry {
        match self {
            Item::Frame(e, ..) => e,
            Item::Overlay(from, o) => Entry::Gap {
                from_seq: from,
                to_seq: o.to,
                reason: o.reason,
            },
            Item::Lost(from, to) => Entry::Gap {
                from_seq: from,
                to_seq: to,
                reason: GapReason::JournalLost,
            },
        }
    }
    /// What it costs in the backlog.
    pub fn size(&self) -> u64 {
        match self {
            Item::Frame(_, size, _) => *size,
            Item::Overlay(_, o) => gap_size(o.to, o.reason),
            Item::Lost(_, to) => gap_size(*to, GapReason::JournalLost),
        }
    }
}

/// What the visitor of [`Segments::read`] does with an item.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    /// Taken; go on.
    Next,
    /// Taken; stop.
    Stop,
    /// Not taken; stop.
    Refuse,
}

/// Where a reader continues: segment, offset, and the seq expected there (a frame starts there).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    segment: u64,
    offset: u64,
    next_seq: u64,
}

/// Which position a [`Segments::read`] keeps, so that the next read near it starts there instead
/// of at its segment's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Neither.
    Nothing,
    /// Where the read stopped, after the last item taken: the uplink reading on.
    End,
    /// The start of the first frame taken: the oldest unacknowledged entry, read again and
    /// again (by every `/status` and upload) while the acknowledgements move it forward.
    Start,
}

/// The log's files and the one open for appending.
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    cap: u64,
    /// First seq of every segment -> its length in bytes.
    files: BTreeMap<u64, u64>,
    /// The newest segment, open for appending (shared with a sync in progress).
    active: Option<(u64, Arc<File>)>,
    /// Bytes of the active segment that a sync of this process made durable (0 after open).
    synced_len: u64,
    /// The log directory was synced by this process since open.
    dir_synced: bool,
    /// An append failed half-way: no more appends until the journal is reopened.
    broken: bool,
    /// The segment (first seq) whose `fdatasync` failed: nothing of it past what was synced before
    /// can be trusted, so no append or sync until the reopen rewrites it ([`rewrite`]).
    failed: Option<u64>,
    /// [`Keep::End`]'s position and [`Keep::Start`]'s.
    cursor: Option<Cursor>,
    start_cursor: Option<Cursor>,
    /// Frames decoded by reads since the last [`Segments::take_decoded`] (for tests).
    #[cfg(test)]
    decoded: u64,
}

/// A sync of the log, taken by [`Segments::begin_sync`] and run outside the journal's lock.
#[derive(Debug)]
pub(super) struct SyncJob {
    /// The segment and the length written when the sync began: what it makes durable.
    first: u64,
    len: u64,
    file: Option<(Arc<File>, PathBuf)>,
    /// The directory too (the first sync after open).
    dir: Option<PathBuf>,
}

impl SyncJob {
    /// `fdatasync` of the segment, then `fsync` of the directory when due. The segment whose
    /// sync failed is named in the error (`Err((first, error))`).
    pub fn run(&self) -> Result<(), (u64, io::Error)> {
        if let Some((file, path)) = &self.file {
            fsync::data(file, path).map_err(|e| (self.first, e))?;
        }
        if let Some(dir) = &self.dir {
            fsync::dir(dir).map_err(|e| (self.first, e))?;
        }
        Ok(())
    }
}

/// What opening found.
#[derive(Debug, Default)]
pub(super) struct Opened {
    /// Last seq held by the log (`None`: no segment at all).
    pub head: Option<u64>,
    /// Bytes of torn tail cut off the newest segment.
    pub truncated: u64,
}

impl Segments {
    /// Opens the log in `dir` (creating it), and cuts a torn tail off the newest segment.
    pub fn open(dir: &Path, cap: u64) -> io::Result<(Segments, Opened)> {
        if !dir.is_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(dir)?;
            if let Some(parent) = dir.parent() {
                fsync::dir(parent)?;
            }
        }
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(".seg.rewrite")) {
                // A rewrite that did not reach its rename: the segment itself is intact.
                std::fs::remove_file(e.path())?;
                continue;
            }
            let Some(seq) = name.to_str().and_then(parse_name) else {
                continue;
            };
            if e.file_type()?.is_file() {
                files.insert(seq, e.metadata()?.len());
            }
        }
        let mut log = Segments {
            dir: dir.to_path_buf(),
            cap,
            files,
            active: None,
            synced_len: 0,
            dir_synced: false,
            broken: false,
            failed: None,
            cursor: None,
            start_cursor: None,
            #[cfg(test)]
            decoded: 0,
        };
        let mut opened = Opened::default();
        if let Some((&first, _)) = log.files.iter().next_back() {
            let path = log.path(first);
            // Appending: every write goes to the end, also after the tail is cut.
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            let (end, head) = scan_tail(&file, &path, first)?;
            let len = file.metadata()?.len();
            if end < len {
                warn!(
                    "journal segment {} has a torn tail: cutting {} bytes never synced (head_seq={})",
                    path.display(),
                    len - end,
                    head
                );
                // The cut is made durable by the first sync, which covers the whole segment.
                file.set_len(end)?;
                opened.truncated = len - end;
            }
            log.files.insert(first, end);
            log.active = Some((first, Arc::new(file)));
            opened.head = Some(head);
        }
        Ok((log, opened))
    }

    fn path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.seg"))
    }

    /// Bytes of all segment files.
    pub fn disk_bytes(&self) -> u64 {
        self.files.values().sum()
    }

    /// First seqs of the segments, oldest first.
    pub fn files_firsts(&self) -> impl Iterator<Item = u64> + '_ {
        self.files.keys().copied()
    }

    /// The seq at [`Keep::Start`]'s kept position, if one is kept.
    #[cfg(test)]
    pub fn start_kept(&self) -> Option<u64> {
        self.start_cursor.map(|c| c.next_seq)
    }

    /// Frames decoded by reads since the last call.
    #[cfg(test)]
    pub fn take_decoded(&mut self) -> u64 {
        std::mem::take(&mut self.decoded)
    }

    /// First seq of the oldest segment.
    pub fn first_seq(&self) -> Option<u64> {
        self.files.keys().next().copied()
    }

    /// Removes every segment file (the partial copy an interrupted migration left).
    pub fn remove_all(&mut self) -> io::Result<usize> {
        self.active = None;
        self.cursor = None;
        self.start_cursor = None;
        let n = self.files.len();
        for first in std::mem::take(&mut self.files).into_keys() {
            std::fs::remove_file(self.path(first))?;
        }
        Ok(n)
    }

    /// Appends entries (seq, MQTT packet id, value), consecutive and following the log's head:
    /// [`Segments::append_frames`] for callers that hold values.
    pub fn append(&mut self, entries: &[(u64, Option<u16>, Vec<u8>)]) -> io::Result<bool> {
        let mut buf = Vec::new();
        let mut frames = Vec::with_capacity(entries.len());
        for (seq, pkid, value) in entries {
            push_frame(&mut buf, *seq, *pkid, |b| b.extend_from_slice(value))?;
            frames.push((*seq, buf.len()));
        }
        self.append_frames(&buf, &frames)
    }

    /// Appends the frames in `buf` (made by [`push_frame`]), consecutive and following the log's
    /// head: `frames` holds each one's seq and end offset in `buf`. One write per segment touched.
    /// Returns whether a new segment was started. Not durable until a sync begun after it
    /// ([`Segments::begin_sync`]) has ended well.
    pub fn append_frames(&mut self, buf: &[u8], frames: &[(u64, usize)]) -> io::Result<bool> {
        self.usable()?;
        let mut rolled = false;
        let mut i = 0;
        let mut start = 0;
        let total = frames.last().map_or(0, |f| f.1);
        while i < frames.len() {
            let (seq, end) = frames[i];
            let used = self
                .active
                .as_ref()
                .and_then(|(first, _)| self.files.get(first))
                .copied();
            let size = (end - start) as u64;
            let rest = (total - start) as u64;
            // A group that does not fit what is left of the segment goes whole into a new one
            // when it fits there: the segment closed is then already synced, and the group
            // needs one `fdatasync`, not two.
            let roll = used.is_none_or(|used| {
                used > 0 && (used + size > self.cap || (used + rest > self.cap && rest <= self.cap))
            });
            if roll {
                self.roll(seq)?;
                rolled = true;
            }
            let Some((first, file)) = self.active.as_ref() else {
                return Err(io::Error::other("no active segment"));
            };
            let mut used = self.files.get(first).copied().unwrap_or(0);
            // The frames that fit this segment (at least one).
            let mut stop = end;
            used += size;
            i += 1;
            while let Some(&(_, end)) = frames.get(i) {
                let size = (end - stop) as u64;
                if used + size > self.cap {
                    break;
                }
                used += size;
                stop = end;
                i += 1;
            }
            if let Err(e) = (&**file).write_all(&buf[start..stop]) {
                self.broken = true;
                return Err(e);
            }
            let first = *first;
            self.files.insert(first, used);
            start = stop;
        }
        Ok(rolled)
    }

    /// An error while an earlier failure keeps the log from being written or synced.
    fn usable(&self) -> io::Result<()> {
        if let Some(first) = self.failed {
            return Err(io::Error::other(format!(
                "an fdatasync of segment {first} failed; the journal must be reopened"
            )));
        }
        if self.broken {
            return Err(io::Error::other(
                "an earlier append failed; the journal must be reopened",
            ));
        }
        Ok(())
    }

    /// Whether an append failed half-way: the reopen reads the tail again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The segment whose `fdatasync` failed, if any: the reopen must [`rewrite`] it.
    pub fn failed(&self) -> Option<u64> {
        self.failed
    }

    /// Closes the active segment (synced first if it holds frames this process has not synced,
    /// so that older segments are always whole) and creates the one starting at `seq`, durably in
    /// the directory. A failed sync leaves the segment active and marked failed.
    fn roll(&mut self, seq: u64) -> io::Result<()> {
        let rolled = self.roll_once(seq);
        if rolled.is_err() && self.failed.is_none() {
            // Part of a group may be in the segment being closed: appending it again after a
            // retry would write its seqs twice.
            self.broken = true;
        }
        rolled
    }

    fn roll_once(&mut self, seq: u64) -> io::Result<()> {
        if let Some((first, file)) = &self.active {
            let len = self.files.get(first).copied().unwrap_or(0);
            if len > self.synced_len {
                if let Err(e) = fsync::data(file, &self.path(*first)) {
                    self.failed = Some(*first);
                    return Err(e);
                }
            }
        }
        let path = self.path(seq);
        // A leftover (an empty newest segment cut at open) is reused.
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        if file.metadata()?.len() > 0 {
            file.set_len(0)?;
        }
        // The name, durably. The file's contents (none yet) become durable with the sync of the
        // frames written to it.
        fsync::dir(&self.dir)?;
        self.files.insert(seq, 0);
        self.active = Some((seq, Arc::new(file)));
        self.synced_len = 0;
        Ok(())
    }

    /// Begins a sync of what was written so far: `None` when a sync of this process already
    /// covers it. Refused after a failed sync or append, until the journal is reopened.
    pub fn begin_sync(&mut self) -> io::Result<Option<SyncJob>> {
        self.usable()?;
        let Some((first, file)) = self.active.as_ref() else {
            return Ok(None);
        };
        let len = self.files.get(first).copied().unwrap_or(0);
        let file = (len > self.synced_len || !self.dir_synced)
            .then(|| (Arc::clone(file), self.path(*first)));
        let dir = (!self.dir_synced).then(|| self.dir.clone());
        if file.is_none() && dir.is_none() {
            return Ok(None);
        }
        Ok(Some(SyncJob {
            first: *first,
            len,
            file,
            dir,
        }))
    }

    /// Records how a [`SyncJob`] ended: on success what it covered counts as synced; on failure
    /// the segment is marked failed (see the module header).
    pub fn end_sync(&mut self, job: &SyncJob, outcome: &Result<(), (u64, io::Error)>) {
        match outcome {
            // A sync of the same file that failed meanwhile (a segment being closed) may have
            // taken the error this one would have seen: nothing counts as synced any more.
            Ok(()) if self.failed.is_some() => {}
            Ok(()) => {
                if self.active.as_ref().is_some_and(|(f, _)| *f == job.first) {
                    self.synced_len = self.synced_len.max(job.len);
                }
                self.dir_synced |= job.dir.is_some();
            }
            Err((first, _)) => self.failed = Some(*first),
        }
    }

    /// Deletes the segments (never the newest) for which `gone(first, last)` holds, where `last`
    /// is the seq before the next segment. Returns how many files went.
    pub fn remove_if(&mut self, mut gone: impl FnMut(u64, u64) -> bool) -> io::Result<usize> {
        let firsts: Vec<u64> = self.files.keys().copied().collect();
        let mut n = 0;
        for w in firsts.windows(2) {
            if !gone(w[0], w[1] - 1) {
                continue;
            }
            match std::fs::remove_file(self.path(w[0])) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.files.remove(&w[0]);
            for cursor in [&mut self.cursor, &mut self.start_cursor] {
                if cursor.is_some_and(|c| c.segment == w[0]) {
                    *cursor = None;
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// Visits the entries `from..=end` in seq order: an overlay in place of the entries it
    /// covers, [`Item::Lost`] for seqs that should be there and are not, frames otherwise. An
    /// entry starting before `from` is skipped. A read starts at the furthest kept position of
    /// its segment at or before `from` (else at the segment's first frame) and keeps the one
    /// `keep` says.
    pub fn read(
        &mut self,
        from: u64,
        end: u64,
        overlays: &Overlays,
        keep: Keep,
        mut visit: impl FnMut(Item) -> Flow,
    ) -> io::Result<()> {
        let mut s = from;
        let mut kept_start = false;
        let mut open: Option<(u64, BufReader<File>, u64, u64)> = None; // segment, reader, offset, expected seq
        let mut pending: Option<(Entry, u64, Option<u16>, u64)> = None; // a frame read ahead, its size, mark and end offset
        // The seq before the next overlay at or after `s`, to cap a lost range.
        let before_overlay = |s: u64| {
            overlays
                .range(s..)
                .next()
                .map_or(u64::MAX, |(f, _)| f.saturating_sub(1))
        };
        while s <= end {
            if let Some((&of, o)) = overlays.range(..=s).next_back() {
                if o.to >= s {
                    if of == s {
                        let flow = visit(Item::Overlay(of, *o));
                        if flow == Flow::Refuse {
                            break;
                        }
                        s = o.to + 1;
                        if flow == Flow::Stop {
                            break;
                        }
                    } else {
                        s = o.to + 1;
                    }
                    continue;
                }
            }
            // The segment that should hold `s`.
            let Some((&seg, _)) = self.files.range(..=s).next_back() else {
                let next = self.files.keys().next().map_or(u64::MAX, |f| f - 1);
                let to = next.min(end).min(before_overlay(s));
                let flow = visit(Item::Lost(s, to));
                s = to + 1;
                if flow != Flow::Next {
                    break;
                }
                continue;
            };
            let seg_last = self
                .files
                .range(seg + 1..)
                .next()
                .map_or(u64::MAX, |(f, _)| f - 1);
            if open.as_ref().is_none_or(|(g, ..)| *g != seg) {
                pending = None;
                let file = File::open(self.path(seg))?;
                let mut r = BufReader::with_capacity(READ_BUF, file);
                let (offset, expected) = [self.cursor, self.start_cursor]
                    .into_iter()
                    .flatten()
                    .filter(|c| c.segment == seg && c.next_seq <= s)
                    .max_by_key(|c| c.next_seq)
                    .map_or((0, seg), |c| (c.offset, c.next_seq));
                r.seek(SeekFrom::Start(offset))?;
                open = Some((seg, r, offset, expected));
            }
            let Some((_, r, offset, expected)) = open.as_mut() else {
                continue;
            };
            let len = self.files.get(&seg).copied().unwrap_or(0);
            let (entry, size, pkid, after) = match pending.take() {
                Some(p) => p,
                None => match read_frame(r, len.saturating_sub(*offset), *expected)? {
                    Frame::Good(entry, size, pkid) => {
                        #[cfg(test)]
                        {
                            self.decoded += 1;
                        }
                        *offset += size;
                        (entry, size, pkid, *offset)
                    }
                    Frame::End | Frame::Bad => {
                        let at = *offset;
                        let found = if at >= len {
                            None
                        } else {
                            resync(&self.path(seg), at, len, *expected)?
                        };
                        match found {
                            Some((off, seq)) => {
                                warn!(
                                    "journal segment {} is damaged at offset {}: seqs {}..={} unreadable",
                                    self.path(seg).display(),
                                    at,
                                    *expected,
                                    seq - 1
                                );
                                r.seek(SeekFrom::Start(off))?;
                                *offset = off;
                                *expected = seq;
                                continue;
                            }
                            None => {
                                // Nothing more in this segment: what it should still hold is lost.
                                let to = seg_last.min(end).min(before_overlay(s));
                                open = None;
                                let flow = visit(Item::Lost(s, to));
                                s = to + 1;
                                if flow != Flow::Next {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                },
            };
            *expected = entry.last_seq() + 1;
            if entry.last_seq() < s || entry.first_seq() < s {
                // Before the start (or inside a gap that began earlier): skip.
                s = s.max(entry.last_seq() + 1);
                continue;
            }
            if entry.first_seq() > s {
                // A hole before this frame.
                let to = (entry.first_seq() - 1).min(end).min(before_overlay(s));
                pending = Some((entry, size, pkid, after));
                let flow = visit(Item::Lost(s, to));
                s = to + 1;
                if flow != Flow::Next {
                    break;
                }
                continue;
            }
            let last = entry.last_seq();
            if keep == Keep::Start && !kept_start {
                kept_start = true;
                self.start_cursor = Some(Cursor {
                    segment: seg,
                    offset: after - size,
                    next_seq: entry.first_seq(),
                });
            }
            let flow = visit(Item::Frame(entry, size, pkid));
            if flow == Flow::Refuse {
                break;
            }
            s = last + 1;
            if keep == Keep::End {
                self.cursor = Some(Cursor {
                    segment: seg,
                    offset: after,
                    next_seq: s,
                });
            }
            if flow == Flow::Stop {
                break;
            }
        }
        Ok(())
    }
}

/// Replaces the segment starting at `first` in `dir` by a copy of its readable frames, synced
/// before it is renamed into place: after a failed `fdatasync` of it nothing past its last good
/// sync can be trusted, whatever a retried sync says (see the module header). Damage in the
/// middle is copied as it is (the reader reports it); a bad tail is left out. Returns the bytes
/// kept and dropped.
pub(super) fn rewrite(dir: &Path, first: u64) -> io::Result<(u64, u64)> {
    let path = dir.join(format!("{first:020}.seg"));
    let tmp = dir.join(format!("{first:020}.seg.rewrite"));
    let file = match File::open(&path) {
        Ok(f) => f,
        // Freed meanwhile: nothing of it is needed any more.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let (end, _) = scan_tail(&file, &path, first)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let mut from = BufReader::with_capacity(READ_BUF, &file);
    from.seek(SeekFrom::Start(0))?;
    let copied = io::copy(&mut (&mut from).take(end), &mut out)?;
    if copied != end {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} changed while it was copied", path.display()),
        ));
    }
    out.flush()?;
    fsync::data(&out, &tmp)?;
    std::fs::rename(&tmp, &path)?;
    fsync::dir(dir)?;
    Ok((end, len - end))
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

enum Frame {
    Good(Entry, u64, Option<u16>),
    /// Short, failing its CRC, undecodable, or not the expected seq.
    Bad,
    /// No bytes left.
    End,
}

/// Reads one frame of at most `remaining` bytes. With `expected` > 0 the frame must start at
/// that seq. Never allocates more than `remaining`.
fn read_frame(r: &mut impl Read, remaining: u64, expected: u64) -> io::Result<Frame> {
    if remaining == 0 {
        return Ok(Frame::End);
    }
    if remaining < HEADER + SEQ {
        return Ok(Frame::Bad);
    }
    let mut h = [0u8; HEADER as usize];
    if !read_full(r, &mut h)? {
        return Ok(Frame::Bad);
    }
    let len = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if !(SEQ..=MAX_BODY).contains(&len) || len > remaining - HEADER {
        return Ok(Frame::Bad);
    }
    let mut body = vec![0u8; len as usize];
    if !read_full(r, &mut body)? {
        return Ok(Frame::Bad);
    }
    Ok(decode_frame(crc, &body, expected)
        .map_or(Frame::Bad, |(e, pkid)| Frame::Good(e, HEADER + len, pkid)))
}

fn decode_frame(crc: u32, body: &[u8], expected: u64) -> Option<(Entry, Option<u16>)> {
    if crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    if expected > 0 && seq != expected {
        return None;
    }
    let mark = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let pkid = match mark {
        0 => None,
        m => Some(u16::try_from(m - 1).ok()?),
    };
    Some((decode_entry(seq, body.get(SEQ as usize..)?).ok()?, pkid))
}

/// `read_exact` that reports a short read as `false` instead of an error.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// After damage at `at` in the segment at `path` (`len` bytes), where seq `expected` should
/// have started: the offset and seq of the first good frame after it whose seq is a little past
/// `expected`, if any.
fn resync(path: &Path, at: u64, len: u64, expected: u64) -> io::Result<Option<(u64, u64)>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(at))?;
    let mut rest = Vec::new();
    f.take(len.saturating_sub(at)).read_to_end(&mut rest)?;
    let want = expected + 1..=expected + RESYNC_SEQS;
    let n = rest.len();
    for p in 1..n.saturating_sub((HEADER + SEQ) as usize - 1) {
        let seq = u64::from_le_bytes(rest[p + 8..p + 16].try_into().unwrap_or_default());
        if !want.contains(&seq) {
            continue;
        }
        let blen = u32::from_le_bytes(rest[p..p + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[p + 4..p + 8].try_into().unwrap_or_default());
        let Some(body) = rest.get(p + 8..p + 8 + blen) else {
            continue;
        };
        if decode_frame(crc, body, seq).is_some() {
            return Ok(Some((at + p as u64, seq)));
        }
    }
    Ok(None)
}

/// Scans the newest segment (first seq `first`) to its last good frame. Returns the length of
/// the good part and the last seq in it (`first - 1` when none). Damage followed by good frames
/// is kept (the reader reports it); a bad frame with nothing good after it ends the good part.
fn scan_tail(file: &File, path: &Path, first: u64) -> io::Result<(u64, u64)> {
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(READ_BUF, file);
    let mut offset = 0u64;
    let mut expected = first;
    loop {
        match read_frame(&mut r, len - offset, expected)? {
            Frame::Good(entry, size, _) => {
                offset += size;
                expected = entry.last_seq() + 1;
            }
            Frame::End => return Ok((offset, expected - 1)),
            Frame::Bad => {
                // Look for a good frame after the damage, in the file itself.
                let found = resync(path, offset, len, expected)?;
                match found {
                    Some((off, seq)) => {
                        info!(
                            "journal segment damaged in the middle (seqs {}..={} unreadable); \
                             they are reported as journal_lost when read",
                            expected,
                            seq - 1
                        );
                        r.seek(SeekFrom::Start(off))?;
                        offset = off;
                        expected = seq;
                    }
                    None => return Ok((offset, expected - 1)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_only_when_exact() {
        assert_eq!(parse_name("00000000000000000042.seg"), Some(42));
        assert_eq!(parse_name("42.seg"), None);
        assert_eq!(parse_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_name("00000000000000000042.tmp"), None);
    }

    #[test]
    fn segment_cap_is_bounded() {
        assert_eq!(segment_cap(1 << 20), 256 << 10);
        assert_eq!(segment_cap(8 << 20), 512 << 10);
        assert_eq!(segment_cap(u64::MAX), 1 << 20);
    }
}
