//! The storage rows: durable append throughput, bytes on disk after churn, and open time, for
//! ferry's journal (`ferry::journal::Journal`, called directly), the baselines (a raw file with
//! `fdatasync` per batch, SQLite in WAL mode with `synchronous=FULL`), and the journal-layout
//! experiments (plain sled with a key per record, sled with records grouped into values under the
//! blob threshold, append-only segment files).
//!
//! Every layout makes each batch durable before the next one starts (write, then `fdatasync`), so
//! the numbers are group commits of `batch` records, as the ingest writer does them.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry::journal::OnFull;
use ferry::journal::{Journal, MqttDelivery, NewRecord, Options, StoredFormat};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

/// Payload size of a benchmark record, in bytes (a JSON sensor reading padded out).
pub const PAYLOAD: usize = 250;
pub const TOPIC: &str = "sensors/bench/1";
/// The journal size limit the bench uses: large enough that a 1,000,000-record backlog fits the
/// logical budget and compaction does not start (see `crates/journal/src/budget.rs`, `LOGICAL_SHARE`).
pub const MAX_BYTES: u64 = 8 << 30;
/// The agent's default `journal.cache_bytes`.
pub const CACHE_BYTES: u64 = 16 << 20;
/// Records per sled value in the grouped layout. sled logs whole leaf pages (up to 17 values before
/// a leaf splits) and sends a page over a quarter segment (~256 KiB) to a blob file; 50 records of
/// ~290 bytes keep even a full leaf under that, so no value should go to a blob file.
const GROUP_MAX: usize = 50;
/// Segment file size of the segment layout.
const SEGMENT_BYTES: u64 = 8 << 20;

/// The payload of record `i`: `{"n":i,"t":21.5,"pad":"xxx..."}`, exactly [`PAYLOAD`] bytes.
pub fn payload(i: u64) -> Vec<u8> {
    let mut s = format!("{{\"n\":{i},\"t\":21.5,\"pad\":\"");
    while s.len() < PAYLOAD - 2 {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}

pub fn records(from: u64, n: usize) -> Vec<NewRecord> {
    (from..from + n as u64)
        .map(|i| NewRecord {
            ts_ms: 1_763_700_000_000 + i,
            topic: TOPIC.into(),
            payload: payload(i),
            format: StoredFormat::Json,
            parse_error: false,
            mono: None,
            too_large: None,
            mqtt: None,
        })
        .collect()
}

/// [`records`] as QoS1 deliveries: packet ids 1..=65535 in turn, as mosquitto assigns them.
pub fn records_qos1(from: u64, n: usize) -> Vec<NewRecord> {
    let mut recs = records(from, n);
    for (r, i) in recs.iter_mut().zip(from..) {
        r.mqtt = Some(MqttDelivery {
            pkid: (i % 65_535 + 1) as u16,
            dup: false,
        });
    }
    recs
}

pub fn journal_options(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        max_bytes: MAX_BYTES,
        on_full: OnFull::RejectNew,
        cache_bytes: CACHE_BYTES,
        replay_window: ferry::journal::default_replay_window(MAX_BYTES),
        fixed_budget: None,
    }
}

/// A way of keeping records durably. `append` returns only after the batch is on stable storage.
pub trait Layout {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()>;
    /// Forgets records up to and including `seq` (1-based), durably.
    fn ack(&mut self, seq: u64) -> Result<()>;
    /// Bytes allocated on disk for the layout's files.
    fn disk_bytes(&self) -> u64;
    /// Acknowledged records the layout keeps on purpose (ferry's replay window).
    fn replay_records(&self) -> u64 {
        0
    }
    /// Whether it is given the records as QoS1 deliveries (with MQTT packet ids).
    fn qos1(&self) -> bool {
        false
    }
}

/// The encoded form the experiment layouts store: `ts_ms`, topic length and topic, payload; about
/// what ferry's journal stores (its header is postcard).
fn encode(r: &NewRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.ts_ms.to_le_bytes());
    out.push(r.topic.len() as u8);
    out.extend_from_slice(r.topic.as_bytes());
    out.extend_from_slice(&r.payload);
}

/// Appends `[len u32][fnv64 of body][body]`.
fn frame(r: &NewRecord, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(PAYLOAD + 32);
    encode(r, &mut body);
    let mut h = ferry::journal::fnv::Fnv1a::new();
    h.write(&body);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finish().to_le_bytes());
    out.extend_from_slice(&body);
}

pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            total += dir_bytes(&e.path());
        } else if m.is_file() {
            total += m.blocks() * 512;
        }
    }
    total
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------- the layouts

/// Baseline: the payloads appended to one file, `fdatasync` per batch. No framing, no index, no
/// way to forget records: the floor of what durable append costs on this disk.
pub struct RawFile {
    file: File,
    path: PathBuf,
}

impl RawFile {
    pub fn create(dir: &Path) -> Result<RawFile> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("raw.log");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(dir)?;
        Ok(RawFile { file, path })
    }
}

impl Layout for RawFile {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let mut buf = Vec::with_capacity(batch.len() * PAYLOAD);
        for r in batch {
            buf.extend_from_slice(&r.payload);
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        Ok(())
    }
    fn ack(&mut self, _seq: u64) -> Result<()> {
        Ok(())
    }
    fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map_or(0, |m| m.blocks() * 512)
    }
}

/// Baseline: SQLite (Debian's libsqlite3), WAL, `synchronous=FULL`, one transaction per batch.
pub struct Sqlite {
    conn: rusqlite::Connection,
    dir: PathBuf,
    next: i64,
}

impl Sqlite {
    pub fn create(dir: &Path) -> Result<Sqlite> {
        std::fs::create_dir_all(dir)?;
        let conn = rusqlite::Connection::open(dir.join("log.sqlite"))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("sqlite refused WAL mode (got {mode})").into());
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE log (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,
                               topic TEXT NOT NULL, payload BLOB NOT NULL);",
        )?;
        Ok(Sqlite {
            conn,
            dir: dir.to_path_buf(),
            next: 1,
        })
    }

    pub fn version() -> &'static str {
        rusqlite::version()
    }
}

impl Layout for Sqlite {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare("INSERT INTO log VALUES (?1, ?2, ?3, ?4)")?;
            for r in batch {
                st.execute(rusqlite::params![
                    self.next,
                    r.ts_ms as i64,
                    r.topic,
                    r.payload
                ])?;
                self.next += 1;
            }
        }
        tx.commit()?;
        Ok(())
    }
    fn ack(&mut self, seq: u64) -> Result<()> {
        self.conn
            .execute("DELETE FROM log WHERE seq <= ?1", [seq as i64])?;
        Ok(())
    }
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// ferry's journal, as the agent uses it: `append` then `sync`; `ack` (which syncs) then
/// `maybe_compact`, as the writer does after each append.
pub struct Ferry {
    pub journal: Journal,
    dir: PathBuf,
    qos1: bool,
}

impl Ferry {
    pub fn create(dir: &Path) -> Result<Ferry> {
        Ok(Ferry {
            journal: Journal::open(&journal_options(dir))?,
            dir: dir.to_path_buf(),
            qos1: false,
        })
    }

    /// Fed QoS1 deliveries (see [`Layout::qos1`]): the journal keeps their redelivery marks.
    pub fn create_qos1(dir: &Path) -> Result<Ferry> {
        Ok(Ferry {
            qos1: true,
            ..Ferry::create(dir)?
        })
    }

    /// A journal with `journal.replay_window` set to `window` bytes.
    pub fn with_replay_window(dir: &Path, window: u64) -> Result<Ferry> {
        let mut opts = journal_options(dir);
        opts.replay_window = window;
        Ok(Ferry {
            journal: Journal::open(&opts)?,
            dir: dir.to_path_buf(),
            qos1: false,
        })
    }
}

impl Layout for Ferry {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let mut rest = batch;
        while !rest.is_empty() {
            let a = self.journal.append(rest)?;
            rest = &rest[a.taken..];
        }
        self.journal.sync()?;
        self.journal.maybe_compact()?;
        Ok(())
    }
    fn ack(&mut self, seq: u64) -> Result<()> {
        self.journal.ack(seq)?;
        Ok(())
    }
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
    fn replay_records(&self) -> u64 {
        let p = self.journal.positions();
        p.replay_oldest_seq.map_or(0, |o| p.acked_seq + 1 - o)
    }
    fn qos1(&self) -> bool {
        self.qos1
    }
}

struct SledFiles {
    db: File,
    blobs: PathBuf,
    synced: std::collections::HashSet<std::ffi::OsString>,
}

fn sled_open(dir: &Path) -> Result<(sled::Db, SledFiles)> {
    // The journal's own sled settings (crates/journal/src/store.rs `open_store_once`).
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .segment_size(1 << 20)
        .flush_every_ms(Some(1000))
        .mode(sled::Mode::LowSpace)
        .open()?;
    let files = SledFiles {
        db: File::open(dir.join("db"))?,
        blobs: dir.join("blobs"),
        synced: Default::default(),
    };
    Ok((db, files))
}

/// sled's flush, then what ferry's `Journal::sync` adds: `fdatasync` of the file and of every new
/// blob file (sled's flush syncs neither for real).
fn sled_sync(db: &sled::Db, files: &mut SledFiles) -> Result<()> {
    db.flush()?;
    files.db.sync_data()?;
    if let Ok(entries) = std::fs::read_dir(&files.blobs) {
        for e in entries.flatten() {
            if files.synced.insert(e.file_name()) {
                File::open(e.path())?.sync_data()?;
            }
        }
    }
    Ok(())
}

/// Blob files in a sled directory.
pub fn blob_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
}

/// Experiment: plain sled, one key per record (ferry's layout without its bookkeeping).
pub struct SledPerRecord {
    db: sled::Db,
    files: SledFiles,
    dir: PathBuf,
    next: u64,
    acked: u64,
}

impl SledPerRecord {
    pub fn create(dir: &Path) -> Result<SledPerRecord> {
        let (db, files) = sled_open(dir)?;
        Ok(SledPerRecord {
            db,
            files,
            dir: dir.to_path_buf(),
            next: 1,
            acked: 0,
        })
    }
}

impl Layout for SledPerRecord {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let mut b = sled::Batch::default();
        let mut v = Vec::with_capacity(PAYLOAD + 32);
        for r in batch {
            v.clear();
            encode(r, &mut v);
            b.insert(&self.next.to_be_bytes()[..], &v[..]);
            self.next += 1;
        }
        b.insert(&b"next"[..], &self.next.to_be_bytes()[..]);
        self.db.apply_batch(b)?;
        sled_sync(&self.db, &mut self.files)
    }
    fn ack(&mut self, seq: u64) -> Result<()> {
        let mut b = sled::Batch::default();
        for s in self.acked + 1..=seq {
            b.remove(&s.to_be_bytes()[..]);
        }
        b.insert(&b"acked"[..], &seq.to_be_bytes()[..]);
        self.db.apply_batch(b)?;
        self.acked = seq;
        sled_sync(&self.db, &mut self.files)
    }
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// Experiment: sled with up to [`GROUP_MAX`] framed records per value, keyed by the group's first
/// seq; a group is removed once all its records are acknowledged, the cursor says how far.
pub struct SledGrouped {
    db: sled::Db,
    files: SledFiles,
    dir: PathBuf,
    next: u64,
    /// (first seq, last seq) of the groups still stored, oldest first.
    groups: std::collections::VecDeque<(u64, u64)>,
}

impl SledGrouped {
    pub fn create(dir: &Path) -> Result<SledGrouped> {
        let (db, files) = sled_open(dir)?;
        Ok(SledGrouped {
            db,
            files,
            dir: dir.to_path_buf(),
            next: 1,
            groups: Default::default(),
        })
    }
}

impl Layout for SledGrouped {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let mut b = sled::Batch::default();
        for chunk in batch.chunks(GROUP_MAX) {
            let mut v = Vec::with_capacity(chunk.len() * (PAYLOAD + 40));
            for r in chunk {
                frame(r, &mut v);
            }
            let first = self.next;
            self.next += chunk.len() as u64;
            b.insert(&first.to_be_bytes()[..], v);
            self.groups.push_back((first, self.next - 1));
        }
        b.insert(&b"next"[..], &self.next.to_be_bytes()[..]);
        self.db.apply_batch(b)?;
        sled_sync(&self.db, &mut self.files)
    }
    fn ack(&mut self, seq: u64) -> Result<()> {
        let mut b = sled::Batch::default();
        while let Some(&(first, last)) = self.groups.front() {
            if last > seq {
                break;
            }
            b.remove(&first.to_be_bytes()[..]);
            self.groups.pop_front();
        }
        b.insert(&b"acked"[..], &seq.to_be_bytes()[..]);
        self.db.apply_batch(b)?;
        sled_sync(&self.db, &mut self.files)
    }
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// Experiment: append-only segment files of framed records (`[len][fnv64][body]`), `fdatasync`
/// per batch, a new segment every [`SEGMENT_BYTES`]; the cursor in its own 8-byte file, rewritten
/// and synced per ack; a segment is deleted once all its records are acknowledged.
///
/// `prealloc`: each segment is written full of zeros and synced when it is created, and records
/// overwrite it in place, so a batch's `fdatasync` has no file size to commit (recovery would find
/// the end at the first zero length or bad checksum).
pub struct Segments {
    dir: PathBuf,
    prealloc: bool,
    current: File,
    current_bytes: u64,
    next: u64,
    /// (segment number, last seq in it) of the closed segments, oldest first.
    closed: std::collections::VecDeque<(u64, u64)>,
    segment_no: u64,
    cursor: File,
}

impl Segments {
    pub fn create(dir: &Path, prealloc: bool) -> Result<Segments> {
        std::fs::create_dir_all(dir)?;
        let current = Self::segment(dir, 0, prealloc)?;
        let cursor = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join("cursor"))?;
        sync_dir(dir)?;
        Ok(Segments {
            dir: dir.to_path_buf(),
            prealloc,
            current,
            current_bytes: 0,
            next: 1,
            closed: Default::default(),
            segment_no: 0,
            cursor,
        })
    }

    fn segment(dir: &Path, n: u64, prealloc: bool) -> Result<File> {
        let path = dir.join(format!("{n:020}.seg"));
        if !prealloc {
            return Ok(OpenOptions::new().create(true).append(true).open(path)?);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SEGMENT_BYTES >> 20 {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
        Ok(f)
    }
}

impl Layout for Segments {
    fn append(&mut self, batch: &[NewRecord]) -> Result<()> {
        let mut buf = Vec::with_capacity(batch.len() * (PAYLOAD + 40));
        for r in batch {
            frame(r, &mut buf);
        }
        if self.prealloc {
            use std::os::unix::fs::FileExt;
            self.current.write_all_at(&buf, self.current_bytes)?;
        } else {
            self.current.write_all(&buf)?;
        }
        self.current.sync_data()?;
        self.current_bytes += buf.len() as u64;
        self.next += batch.len() as u64;
        if self.current_bytes >= SEGMENT_BYTES {
            self.closed.push_back((self.segment_no, self.next - 1));
            self.segment_no += 1;
            self.current = Self::segment(&self.dir, self.segment_no, self.prealloc)?;
            self.current_bytes = 0;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
    fn ack(&mut self, seq: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.cursor.write_all_at(&seq.to_le_bytes(), 0)?;
        self.cursor.sync_data()?;
        let mut removed = false;
        while let Some(&(n, last)) = self.closed.front() {
            if last > seq {
                break;
            }
            std::fs::remove_file(self.dir.join(format!("{n:020}.seg")))?;
            self.closed.pop_front();
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

// ---------------------------------------------------------------- the measurements

/// Appends `recs` (or the same as QoS1 deliveries, `qos1`, to a layout that wants them) to every
/// layout in batches of `batch`, interleaved: `rounds` rounds, in each of which every layout
/// appends its next slice, so that a slow spell of a shared disk hits all of them alike. Returns
/// records per second for each layout, in order.
pub fn append_rates(
    layouts: &mut [Box<dyn Layout>],
    recs: &[NewRecord],
    qos1: &[NewRecord],
    batch: usize,
    rounds: usize,
) -> Result<Vec<f64>> {
    let mut secs = vec![0f64; layouts.len()];
    let per_round = recs.len().div_ceil(rounds).div_ceil(batch) * batch;
    for start in (0..recs.len()).step_by(per_round) {
        let end = (start + per_round).min(recs.len());
        for (layout, s) in layouts.iter_mut().zip(secs.iter_mut()) {
            let input = if layout.qos1() { qos1 } else { recs };
            let t = Instant::now();
            for chunk in input[start..end].chunks(batch) {
                layout.append(chunk)?;
            }
            *s += t.elapsed().as_secs_f64();
        }
    }
    Ok(secs.iter().map(|s| recs.len() as f64 / s).collect())
}

/// Steady churn: appends `total` records in batches of `batch`, acknowledging in steps of `ack_step`
/// (the uplink's default batch) whenever more than `backlog` records are held. Returns the bytes
/// on disk at the end and the payload bytes of the records still held.
/// What a churn run leaves: bytes on disk, payload bytes of the unsent backlog, and payload bytes
/// of acknowledged records the layout keeps on purpose (ferry's replay window).
pub struct Churned {
    pub disk: u64,
    pub backlog_payload: u64,
    pub replay_payload: u64,
}

pub fn churn(
    layout: &mut dyn Layout,
    total: usize,
    batch: usize,
    backlog: usize,
    ack_step: usize,
) -> Result<Churned> {
    let mut appended = 0u64;
    let mut acked = 0u64;
    while appended < total as u64 {
        let n = batch.min(total - appended as usize);
        layout.append(&records(appended + 1, n))?;
        appended += n as u64;
        while appended - acked >= (backlog + ack_step) as u64 {
            acked += ack_step as u64;
            layout.ack(acked)?;
        }
    }
    Ok(Churned {
        disk: layout.disk_bytes(),
        backlog_payload: (appended - acked) * PAYLOAD as u64,
        replay_payload: layout.replay_records() * PAYLOAD as u64,
    })
}

/// Fills a fresh ferry journal in `dir` with `n` records (group commits of 1,000) and closes it.
/// Returns the fill rate in records per second.
pub fn fill_journal(dir: &Path, n: usize) -> Result<f64> {
    let mut j = Ferry::create(dir)?;
    let t = Instant::now();
    let step = 1000;
    let mut done = 0;
    while done < n {
        let k = step.min(n - done);
        j.append(&records(done as u64 + 1, k))?;
        done += k;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(j);
    Ok(rate)
}

/// Opens the journal in `dir` and reads its first batch (what the agent does before it can
/// upload). Returns the seconds it took and the backlog it found.
pub fn open_time(dir: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let j = Journal::open(&journal_options(dir))?;
    let first = j.read_batch(None, 500, 512 << 10)?;
    let secs = t.elapsed().as_secs_f64();
    if first.is_empty() {
        return Err("reopened journal has no backlog".into());
    }
    Ok((secs, j.positions().backlog_records))
}

/// Copies a directory tree (files, directories and symlinks as symlinks).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        let dst = to.join(e.file_name());
        if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &dst)?;
        } else if t.is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)?;
        }
    }
    Ok(())
}
