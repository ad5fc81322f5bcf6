//! The crash model: an in-memory filesystem that knows, for every file and directory, what a power
//! cut would leave of it. No I/O here, so the rules are unit-tested.
//!
//! - A file has `current` bytes (what reads see) and `durable` bytes (what survives a cut), and the
//!   log of writes and truncations since its last `fsync`/`fdatasync`. A sync applies the log to
//!   `durable` (for a slow sync, only the part of the log that existed when the call started, see
//!   [`SyncPoint`]; syncs that overlap may finish in any order).
//! - A failed sync ([`Model::fail_sync`], Linux after a writeback error, "fsyncgate") discards the
//!   file's log: `durable` is unchanged and nothing written before the failure can become durable
//!   any more, by a later sync or by a cut, while `current` keeps it, so reads still show it until
//!   the next cut. A sync of that file that was already in flight when the failure hit fails too.
//! - Each failure is reported once to every open file description, as Linux (>= 4.16, `errseq_t`)
//!   does: a file counts its writeback errors (`err`) and knows whether a description has reported
//!   the latest one (`seen`). Each open ([`Model::open`]) gets a handle that samples `err`, or,
//!   while the latest error is unseen, the count before it, so that a description opened after an
//!   error nobody has reported yet still reports it (and one opened after it was reported does
//!   not). A sync through a handle whose sample is behind `err` ([`Model::start_sync`]) fails with
//!   EIO and makes nothing durable; that reports the error: the sample catches up and `seen` is
//!   set. The failed sync itself and a sync in flight when it hit report it the same way. A sync
//!   through a handle that is up to date succeeds and makes durable what was written after the
//!   failure. So every description open at the failure gets EIO exactly once, then succeeds.
//! - A directory has `current` and `durable` entries and the log of entry changes since its last
//!   fsync. create, mkdir, symlink, unlink, rmdir and rename are entry changes; a rename within
//!   one directory is one atomic change, a rename across directories is one change in each.
//! - A power cut replaces every file and directory by its durable state, optionally followed by
//!   a random prefix of its log ([`Cut::KeepPrefix`]) or a prefix and then part of the next
//!   write ([`Cut::Tear`]). Each object draws its own prefix: the page cache writes files back in
//!   no particular order. Inodes no longer reachable from the root are then dropped, and so are
//!   the handles (the processes died with the power); no error from before the cut is reported.
//!
//! Metadata (mode, times) is not modelled as volatile: ferry and sled never depend on it.
//!
//! Why one file of this length: one model of what Linux keeps and forgets, and its tests (about
//! 370 lines), which must change with it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

pub const ROOT: u64 = 1;

/// An open file description: a FUSE file handle. 0 is none (directories, and files opened before
/// a cut): a sync through it reports no writeback error.
pub type Fh = u64;

/// An errno value (`libc::E*`).
pub type Errno = i32;
pub type Result<T> = std::result::Result<T, Errno>;

/// What a power cut keeps of the writes that were not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing: every object reverts to its last synced state.
    DiscardAll,
    /// A random prefix of each object's unsynced changes, drawn from this seed.
    KeepPrefix(u64),
    /// Like `KeepPrefix`, and the first write not kept is kept in part (a torn write).
    Tear(u64),
}

#[derive(Debug, Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    Truncate(u64),
}

impl FileOp {
    fn apply(&self, to: &mut Vec<u8>) {
        match self {
            FileOp::Write { offset, data } => write_at(to, *offset, data),
            FileOp::Truncate(len) => to.resize(*len as usize, 0),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            FileOp::Write { data, .. } => data.len() as u64,
            FileOp::Truncate(_) => 0,
        }
    }
}

fn write_at(to: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let offset = offset as usize;
    if to.len() < offset + data.len() {
        to.resize(offset + data.len(), 0);
    }
    to[offset..offset + data.len()].copy_from_slice(data);
}

#[derive(Debug, Clone)]
pub struct File {
    pub current: Vec<u8>,
    durable: Vec<u8>,
    log: Vec<FileOp>,
    /// How many changes left the log before `log[0]` (made durable, dropped by a failed sync, or
    /// settled by a cut): `log[i]` is change number `base + i` of this file.
    base: u64,
    /// Writeback errors (failed syncs) so far: a sync that sees this change while in flight
    /// fails too.
    err: u64,
    /// Some open file description has reported the latest error (or there is none).
    seen: bool,
}

/// An open file description of a file: which file, and the file's error count it has reported up
/// to (`errseq_t`'s sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle {
    ino: u64,
    sample: u64,
}

impl Default for File {
    fn default() -> File {
        File {
            current: Vec::new(),
            durable: Vec::new(),
            log: Vec::new(),
            base: 0,
            err: 0,
            seen: true,
        }
    }
}

/// One atomic change of a directory's entries: names set to an inode, or removed.
type DirOp = Vec<(OsString, Option<u64>)>;

#[derive(Debug, Clone, Default)]
pub struct Dir {
    pub current: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    log: Vec<DirOp>,
    /// As [`File`]'s: `log[i]` is change number `base + i` of this directory.
    base: u64,
}

impl Dir {
    fn change(&mut self, op: DirOp) {
        for (name, ino) in &op {
            match ino {
                Some(ino) => self.current.insert(name.clone(), *ino),
                None => self.current.remove(name),
            };
        }
        self.log.push(op);
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    File(File),
    Dir(Dir),
    Symlink(OsString),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

/// Where a sync started ([`Model::sync_point`], [`Model::start_sync`]): it must make durable the
/// changes numbered below `end`, and it fails if a failed sync hit the file since (`err`
/// changed), which counts as handle `fh` reporting that error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPoint {
    end: u64,
    err: u64,
    fh: Fh,
}

/// Counters for `stats`.
#[derive(Debug, Clone, Default)]
pub struct CutReport {
    /// Unsynced bytes written to files, and unsynced directory changes, before the cut.
    pub unsynced_bytes: u64,
    pub unsynced_dir_ops: u64,
    /// Of those, kept by a prefix.
    pub kept_bytes: u64,
    pub kept_dir_ops: u64,
    pub torn_writes: u64,
}

#[derive(Debug)]
pub struct Model {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    handles: HashMap<Fh, Handle>,
    next_fh: Fh,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Model {
        let root = Node {
            kind: Kind::Dir(Dir::default()),
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
        };
        Model {
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
        }
    }

    pub fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Dir> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(_) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut File> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        node.mtime = SystemTime::now();
        match &mut node.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(libc::EISDIR),
            Kind::Symlink(_) => Err(libc::EINVAL),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .current
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64)>> {
        Ok(self
            .dir(dir)?
            .current
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect())
    }

    /// Adds a new node under `parent/name` (which must not exist).
    pub fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        if self.dir(parent)?.current.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = Node {
            kind,
            mode,
            uid,
            gid,
            mtime: SystemTime::now(),
        };
        self.nodes.insert(ino, node);
        self.dir_mut(parent)?
            .change(vec![(name.to_os_string(), Some(ino))]);
        Ok(ino)
    }

    /// unlink (`dir == false`) or rmdir (`dir == true`).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let ino = self.lookup(parent, name)?;
        match (&self.node(ino)?.kind, dir) {
            (Kind::Dir(d), true) if !d.current.is_empty() => return Err(libc::ENOTEMPTY),
            (Kind::Dir(_), true) => {}
            (Kind::Dir(_), false) => return Err(libc::EISDIR),
            (_, true) => return Err(libc::ENOTDIR),
            (_, false) => {}
        }
        // The inode stays until the next cut: an open handle may still use it, and an unsynced
        // unlink brings it back.
        self.dir_mut(parent)?
            .change(vec![(name.to_os_string(), None)]);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        let ino = self.lookup(parent, name)?;
        match self.lookup(newparent, newname) {
            Ok(_) if noreplace => return Err(libc::EEXIST),
            Ok(old) if old == ino => return Ok(()),
            Ok(old) => match (&self.node(old)?.kind, &self.node(ino)?.kind) {
                (Kind::Dir(d), Kind::Dir(_)) if !d.current.is_empty() => {
                    return Err(libc::ENOTEMPTY);
                }
                (Kind::Dir(_), Kind::Dir(_)) => {}
                (Kind::Dir(_), _) => return Err(libc::EISDIR),
                (_, Kind::Dir(_)) => return Err(libc::ENOTDIR),
                _ => {}
            },
            Err(_) => {}
        }
        if parent == newparent {
            self.dir_mut(parent)?.change(vec![
                (name.to_os_string(), None),
                (newname.to_os_string(), Some(ino)),
            ]);
        } else {
            self.dir_mut(newparent)?
                .change(vec![(newname.to_os_string(), Some(ino))]);
            self.dir_mut(parent)?
                .change(vec![(name.to_os_string(), None)]);
        }
        Ok(())
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let f = self.file_mut(ino)?;
        write_at(&mut f.current, offset, data);
        f.log.push(FileOp::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(data.len())
    }

    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<()> {
        let f = self.file_mut(ino)?;
        if f.current.len() as u64 != len {
            f.current.resize(len as usize, 0);
            f.log.push(FileOp::Truncate(len));
        }
        Ok(())
    }

    pub fn len(&self, ino: u64) -> Result<u64> {
        match &self.node(ino)?.kind {
            Kind::File(f) => Ok(f.current.len() as u64),
            _ => Err(libc::EINVAL),
        }
    }

    /// chmod/chown: applied at once and never reverted (metadata is not modelled as volatile).
    pub fn set_owner_mode(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let n = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        if let Some(mode) = mode {
            n.mode = mode & 0o7777;
        }
        n.uid = uid.unwrap_or(n.uid);
        n.gid = gid.unwrap_or(n.gid);
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8]> {
        match &self.node(ino)?.kind {
            Kind::File(f) => {
                let start = (offset as usize).min(f.current.len());
                let end = (start + size as usize).min(f.current.len());
                Ok(&f.current[start..end])
            }
            Kind::Dir(_) => Err(libc::EISDIR),
            Kind::Symlink(_) => Err(libc::EINVAL),
        }
    }

    /// Opens a file description of `ino` (open or create): a new handle, never 0, that samples
    /// the file's error count (see the module docs). Any kind of node may be opened; only files
    /// have writeback errors.
    pub fn open(&mut self, ino: u64) -> Result<Fh> {
        let sample = match &self.node(ino)?.kind {
            Kind::File(f) if !f.seen => f.err.saturating_sub(1),
            Kind::File(f) => f.err,
            _ => 0,
        };
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, sample });
        Ok(fh)
    }

    /// Closes handle `fh` (release); false if it was not open.
    pub fn release(&mut self, fh: Fh) -> bool {
        self.handles.remove(&fh).is_some()
    }

    /// Handles open now.
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Reports through handle `fh` the writeback errors of its file it has not reported yet
    /// (`errseq_check_and_advance`): if there are any, its sample catches up, the file's latest
    /// error counts as seen, and the answer is EIO. A handle that is not open (0) has none.
    fn report_errors(&mut self, fh: Fh) -> Result<()> {
        let Some(h) = self.handles.get_mut(&fh) else {
            return Ok(());
        };
        match self.nodes.get_mut(&h.ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) if h.sample < f.err => {
                h.sample = f.err;
                f.seen = true;
                Err(libc::EIO)
            }
            _ => Ok(()),
        }
    }

    /// How far the unsynced log of `ino` reaches now: what an `fsync` starting now must make
    /// durable (see [`Model::sync_through`]). Through no handle: see [`Model::start_sync`].
    pub fn sync_point(&self, ino: u64) -> Result<SyncPoint> {
        Ok(match &self.node(ino)?.kind {
            Kind::File(f) => SyncPoint {
                end: f.base + f.log.len() as u64,
                err: f.err,
                fh: 0,
            },
            Kind::Dir(d) => SyncPoint {
                end: d.base + d.log.len() as u64,
                err: 0,
                fh: 0,
            },
            Kind::Symlink(_) => SyncPoint {
                end: 0,
                err: 0,
                fh: 0,
            },
        })
    }

    /// Starts an fsync/fdatasync of `ino` through handle `fh` (0 for none, as for directories):
    /// EIO if the handle has a writeback error of the file to report, which reports it and makes
    /// nothing durable; otherwise where the sync starts, for [`Model::sync_through`].
    pub fn start_sync(&mut self, ino: u64, fh: Fh) -> Result<SyncPoint> {
        let mut point = self.sync_point(ino)?;
        if self.handles.get(&fh).is_some_and(|h| h.ino == ino) {
            self.report_errors(fh)?;
            point.fh = fh;
        }
        Ok(point)
    }

    /// Completes an fsync of `ino` that started at `point`: makes durable the changes made before
    /// it started and not yet synced (none made since). Fails with EIO, making nothing durable,
    /// if a failed sync ([`Model::fail_sync`]) hit the file meanwhile; that reports the error
    /// through the sync's handle.
    pub fn sync_through(&mut self, ino: u64, point: SyncPoint) -> Result<()> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        match &mut node.kind {
            Kind::File(f) => {
                if f.err != point.err {
                    if let Some(h) = self.handles.get_mut(&point.fh) {
                        h.sample = f.err;
                        f.seen = true;
                    }
                    return Err(libc::EIO);
                }
                let n = (point.end.saturating_sub(f.base) as usize).min(f.log.len());
                f.base += n as u64;
                for op in f.log.drain(..n) {
                    op.apply(&mut f.durable);
                }
            }
            Kind::Dir(d) => {
                let n = (point.end.saturating_sub(d.base) as usize).min(d.log.len());
                d.base += n as u64;
                for op in d.log.drain(..n) {
                    for (name, ino) in op {
                        match ino {
                            Some(ino) => d.durable.insert(name, ino),
                            None => d.durable.remove(&name),
                        };
                    }
                }
            }
            Kind::Symlink(_) => {}
        }
        Ok(())
    }

    /// A whole fsync of `ino` through no handle.
    pub fn fsync(&mut self, ino: u64) -> Result<()> {
        self.fsync_through(ino, 0)
    }

    /// A whole fsync of `ino` through handle `fh`: [`Model::start_sync`], then
    /// [`Model::sync_through`].
    pub fn fsync_through(&mut self, ino: u64, fh: Fh) -> Result<()> {
        let point = self.start_sync(ino, fh)?;
        self.sync_through(ino, point)
    }

    /// A writeback error of file `ino`, as Linux's: the unsynced changes are dropped (the log is
    /// discarded, `durable` unchanged) so that no later sync or cut makes them durable, while
    /// `current` keeps them until the next cut; the error count grows and the error is unseen, so
    /// that every handle open now, and every one opened before some handle reports it, reports it
    /// once ([`Model::start_sync`]); a sync of the file already in flight fails. For the failed
    /// fsync itself, follow with [`Model::start_sync`] through its handle: that reports it. A
    /// sync through a handle that has reported it succeeds and makes durable only what was
    /// written after this call. Returns the unsynced bytes dropped.
    pub fn fail_sync(&mut self, ino: u64) -> Result<u64> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        match &mut node.kind {
            Kind::File(f) => {
                let dropped = f.log.iter().map(FileOp::bytes).sum();
                f.base += f.log.len() as u64;
                f.log.clear();
                f.err += 1;
                f.seen = false;
                Ok(dropped)
            }
            Kind::Dir(_) => Err(libc::EISDIR),
            Kind::Symlink(_) => Err(libc::EINVAL),
        }
    }

    /// The path of `ino` relative to the root through `current` entries (empty for the root), or
    /// `None` when no directory reaches it (an unlinked file still open).
    pub fn path_of(&self, ino: u64) -> Option<std::path::PathBuf> {
        // Visited once each: a cut that keeps part of two cross-directory renames can leave
        // directories that contain each other.
        let mut seen = std::collections::HashSet::from([ROOT]);
        let mut todo = vec![(std::path::PathBuf::new(), ROOT)];
        while let Some((path, at)) = todo.pop() {
            if at == ino {
                return Some(path);
            }
            if let Ok(Kind::Dir(d)) = self.node(at).map(|n| &n.kind) {
                for (name, child) in &d.current {
                    if seen.insert(*child) {
                        todo.push((path.join(name), *child));
                    }
                }
            }
        }
        None
    }

    /// Bytes written to files and not yet synced, and directory changes not yet synced.
    pub fn unsynced(&self) -> (u64, u64) {
        let mut bytes = 0;
        let mut dir_ops = 0;
        for n in self.nodes.values() {
            match &n.kind {
                Kind::File(f) => bytes += f.log.iter().map(FileOp::bytes).sum::<u64>(),
                Kind::Dir(d) => dir_ops += d.log.len() as u64,
                Kind::Symlink(_) => {}
            }
        }
        (bytes, dir_ops)
    }

    /// Total bytes held in files (current contents).
    pub fn file_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match &n.kind {
                Kind::File(f) => f.current.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// The power cut: every object becomes what survives of it (see the module docs).
    pub fn power_cut(&mut self, cut: Cut) -> CutReport {
        let mut report = CutReport::default();
        let (mut rng, tear) = match cut {
            Cut::DiscardAll => (None, false),
            Cut::KeepPrefix(seed) => (Some(Rng::new(seed)), false),
            Cut::Tear(seed) => (Some(Rng::new(seed)), true),
        };
        // Visit in inode order so that a seed reproduces the same cut.
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            match &mut node.kind {
                Kind::File(f) => {
                    let keep = rng
                        .as_mut()
                        .map_or(0, |r| r.below(f.log.len() as u64 + 1) as usize);
                    let mut content = std::mem::take(&mut f.durable);
                    for (i, op) in f.log.iter().enumerate() {
                        report.unsynced_bytes += op.bytes();
                        if i < keep {
                            report.kept_bytes += op.bytes();
                            op.apply(&mut content);
                        } else if i == keep && tear {
                            if let (FileOp::Write { offset, data }, Some(r)) = (op, rng.as_mut()) {
                                let part = r.below(data.len() as u64) as usize;
                                if part > 0 {
                                    write_at(&mut content, *offset, &data[..part]);
                                    report.kept_bytes += part as u64;
                                    report.torn_writes += 1;
                                }
                            }
                        }
                    }
                    f.base += f.log.len() as u64;
                    f.log.clear();
                    f.current = content.clone();
                    f.durable = content;
                    // Nobody is left to report an error from before the cut.
                    f.seen = true;
                }
                Kind::Dir(d) => {
                    let keep = rng
                        .as_mut()
                        .map_or(0, |r| r.below(d.log.len() as u64 + 1) as usize);
                    report.unsynced_dir_ops += d.log.len() as u64;
                    report.kept_dir_ops += keep as u64;
                    d.base += d.log.len() as u64;
                    let mut entries = std::mem::take(&mut d.durable);
                    for op in d.log.drain(..).take(keep) {
                        for (name, ino) in op {
                            match ino {
                                Some(ino) => entries.insert(name, ino),
                                None => entries.remove(&name),
                            };
                        }
                    }
                    d.log.clear();
                    d.current = entries.clone();
                    d.durable = entries;
                }
                Kind::Symlink(_) => {}
            }
        }
        // The processes that held them died with the power; the kernel forgets them on unmount.
        self.handles.clear();
        self.collect_garbage();
        report
    }

    /// Drops every inode that no directory reaches from the root.
    fn collect_garbage(&mut self) {
        let mut reachable = std::collections::HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&ino)
            {
                for child in d.current.values() {
                    if self.nodes.contains_key(child) && reachable.insert(*child) {
                        todo.push(*child);
                    }
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        // Entries whose inode is gone (cannot happen: inodes live until a cut) are dropped too.
        let nodes: std::collections::HashSet<u64> = self.nodes.keys().copied().collect();
        for n in self.nodes.values_mut() {
            if let Kind::Dir(d) = &mut n.kind {
                d.current.retain(|_, i| nodes.contains(i));
                d.durable.retain(|_, i| nodes.contains(i));
            }
        }
    }

    /// Every path and what it holds, for dumps and tests: files as bytes, symlinks as targets.
    pub fn walk(&self) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut todo = vec![(std::path::PathBuf::new(), ROOT)];
        while let Some((path, ino)) = todo.pop() {
            let Ok(node) = self.node(ino) else { continue };
            match &node.kind {
                Kind::Dir(d) => {
                    if ino != ROOT {
                        out.push((path.clone(), None));
                    }
                    for (name, child) in &d.current {
                        todo.push((path.join(name), *child));
                    }
                }
                Kind::File(f) => out.push((path, Some(f.current.clone()))),
                Kind::Symlink(t) => {
                    use std::os::unix::ffi::OsStrExt;
                    let mut v = b"-> ".to_vec();
                    v.extend_from_slice(t.as_bytes());
                    out.push((path, Some(v)));
                }
            }
        }
        out.sort();
        out
    }
}

/// The one pseudo-random generator of ferry (`ferry-util`, which links nothing else): seeded,
/// reproducible.
pub use ferry_util::rng::Rng;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(m: &mut Model, parent: u64, name: &str) -> u64 {
        m.add(
            parent,
            OsStr::new(name),
            Kind::File(File::default()),
            0o644,
            0,
            0,
        )
        .unwrap()
    }

    fn content(m: &Model, parent: u64, name: &str) -> Option<Vec<u8>> {
        let ino = m.lookup(parent, OsStr::new(name)).ok()?;
        Some(m.read(ino, 0, u32::MAX).unwrap().to_vec())
    }

    #[test]
    fn a_cut_forgets_a_file_whose_directory_was_never_synced() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.write(f, 0, b"hello").unwrap();
        m.fsync(f).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a"), None);
    }

    #[test]
    fn a_cut_keeps_synced_bytes_and_drops_the_rest() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.fsync(f).unwrap();
        m.write(f, 5, b" world").unwrap();
        m.write(f, 0, b"J").unwrap();
        let r = m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"hello");
        assert_eq!(r.unsynced_bytes, 7);
    }

    #[test]
    fn a_slow_sync_makes_durable_only_what_was_written_before_it_started() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"one").unwrap();
        let point = m.sync_point(f).unwrap();
        m.write(f, 3, b"two").unwrap(); // while the fsync sleeps
        m.sync_through(f, point).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"one");
    }

    #[test]
    fn an_unsynced_rename_reverts_and_an_unsynced_unlink_brings_the_file_back() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.write(a, 0, b"A").unwrap();
        m.fsync(a).unwrap();
        let b = file(&mut m, ROOT, "b");
        m.write(b, 0, b"B").unwrap();
        m.fsync(b).unwrap();
        m.fsync(ROOT).unwrap();
        m.rename(ROOT, OsStr::new("b"), ROOT, OsStr::new("a"), false)
            .unwrap();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"B");
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"A");
        assert_eq!(content(&m, ROOT, "b").unwrap(), b"B");

        m.remove(ROOT, OsStr::new("a"), false).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"A");
    }

    #[test]
    fn a_rename_within_a_directory_is_atomic_under_every_prefix() {
        for seed in 0..64 {
            let mut m = Model::new();
            let a = file(&mut m, ROOT, "tmp");
            m.write(a, 0, b"new").unwrap();
            m.fsync(a).unwrap();
            m.fsync(ROOT).unwrap();
            let old = file(&mut m, ROOT, "old");
            m.remove(ROOT, OsStr::new("old"), false).unwrap();
            let _ = old;
            m.rename(ROOT, OsStr::new("tmp"), ROOT, OsStr::new("cur"), false)
                .unwrap();
            m.power_cut(Cut::KeepPrefix(seed));
            let tmp = content(&m, ROOT, "tmp");
            let cur = content(&m, ROOT, "cur");
            assert!(
                tmp.is_some() != cur.is_some(),
                "seed {seed}: exactly one name holds the file"
            );
        }
    }

    #[test]
    fn keep_prefix_keeps_whole_writes_in_order_and_tear_cuts_one() {
        let mut kept_some = false;
        let mut tore = false;
        for seed in 0..64 {
            let mut m = Model::new();
            let f = file(&mut m, ROOT, "a");
            m.fsync(ROOT).unwrap();
            for i in 0..4u8 {
                m.write(f, u64::from(i) * 4, &[b'a' + i; 4]).unwrap();
            }
            let r = m.power_cut(Cut::Tear(seed));
            let c = content(&m, ROOT, "a").unwrap();
            // Whole writes in order, then at most one partial one.
            let whole = c.len() / 4;
            for (i, chunk) in c.chunks(4).enumerate() {
                assert!(
                    chunk.iter().all(|b| *b == b'a' + i as u8),
                    "seed {seed}: {c:?}"
                );
            }
            kept_some |= whole > 0;
            tore |= r.torn_writes > 0;
        }
        assert!(kept_some && tore);
    }

    #[test]
    fn a_failed_sync_drops_unsynced_writes_from_any_later_cut_while_reads_show_them_until_it() {
        for cut in [Cut::DiscardAll, Cut::KeepPrefix(3), Cut::Tear(5)]
            .into_iter()
            .chain((0..32).map(Cut::Tear))
        {
            let mut m = Model::new();
            let f = file(&mut m, ROOT, "a");
            m.fsync(ROOT).unwrap();
            m.write(f, 0, b"old").unwrap();
            m.fsync(f).unwrap();
            m.write(f, 0, b"new").unwrap();
            m.write(f, 3, b"er").unwrap();
            assert_eq!(m.fail_sync(f).unwrap(), 5, "unsynced bytes dropped");
            assert_eq!(
                content(&m, ROOT, "a").unwrap(),
                b"newer",
                "reads still see them"
            );
            assert_eq!(m.unsynced(), (0, 0));
            let r = m.power_cut(cut);
            assert_eq!(content(&m, ROOT, "a").unwrap(), b"old", "{cut:?}");
            assert_eq!(r.unsynced_bytes, 0);
        }
    }

    #[test]
    fn a_sync_after_a_failed_one_succeeds_and_makes_only_later_writes_durable() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"aaaa").unwrap();
        m.fail_sync(f).unwrap();
        m.write(f, 2, b"bb").unwrap();
        m.fsync(f).unwrap();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"aabb");
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"\0\0bb");
        // Only files fail this way.
        assert_eq!(m.fail_sync(ROOT), Err(libc::EISDIR));
        assert_eq!(m.fail_sync(99), Err(libc::ENOENT));
    }

    #[test]
    fn a_sync_in_flight_when_a_sync_of_the_file_fails_fails_too_and_syncs_nothing() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"one").unwrap();
        let slow = m.sync_point(f).unwrap();
        m.fail_sync(f).unwrap(); // another thread's fsync, decided to fail
        m.write(f, 3, b"two").unwrap();
        assert_eq!(m.sync_through(f, slow), Err(libc::EIO));
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"");
    }

    /// What `ferry-crashfs` does for an fsync through `fh` that a `fail-fsync` fault hits.
    fn injected_failure(m: &mut Model, f: u64, fh: Fh) {
        m.fail_sync(f).unwrap();
        assert_eq!(
            m.start_sync(f, fh),
            Err(libc::EIO),
            "the failed call reports it"
        );
    }

    #[test]
    fn every_description_open_at_a_writeback_error_reports_it_once_then_syncs() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        let (a, b) = (m.open(f).unwrap(), m.open(f).unwrap());
        assert!(a != 0 && b != 0 && a != b);
        m.write(f, 0, b"lost").unwrap();
        injected_failure(&mut m, f, a);
        assert_eq!(m.fsync_through(f, b), Err(libc::EIO), "b reports it too");
        assert_eq!(m.fsync_through(f, b), Ok(()), "once");
        assert_eq!(m.fsync_through(f, a), Ok(()), "a reported it already");
        m.write(f, 4, b"kept").unwrap();
        m.fsync_through(f, b).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"\0\0\0\0kept");
    }

    #[test]
    fn a_description_opened_after_an_unseen_error_reports_it_and_after_a_seen_one_does_not() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fail_sync(f).unwrap(); // background writeback: nobody reported it
        let c = m.open(f).unwrap();
        assert_eq!(m.fsync_through(f, c), Err(libc::EIO));
        let d = m.open(f).unwrap(); // c has reported it
        assert_eq!(m.fsync_through(f, d), Ok(()));
        assert_eq!(m.fsync_through(f, c), Ok(()));

        // Two errors nobody reported: one EIO for a handle open before both.
        m.fail_sync(f).unwrap();
        let e = m.open(f).unwrap();
        m.fail_sync(f).unwrap();
        for h in [c, d, e] {
            assert_eq!(m.fsync_through(f, h), Err(libc::EIO), "handle {h}");
            assert_eq!(m.fsync_through(f, h), Ok(()), "handle {h}");
        }
        // Through no handle (as for directories) nothing is reported.
        m.fail_sync(f).unwrap();
        assert_eq!(m.fsync(f), Ok(()));
        let g = m.open(f).unwrap();
        assert_eq!(m.fsync_through(f, g), Err(libc::EIO), "still unseen");
    }

    #[test]
    fn reporting_an_error_makes_nothing_durable() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        let (a, b) = (m.open(f).unwrap(), m.open(f).unwrap());
        m.write(f, 0, b"old").unwrap();
        m.fsync_through(f, a).unwrap();
        m.write(f, 0, b"new").unwrap();
        injected_failure(&mut m, f, a);
        m.write(f, 3, b"er").unwrap();
        assert_eq!(m.fsync_through(f, b), Err(libc::EIO));
        assert_eq!(
            m.unsynced(),
            (2, 0),
            "the write after the failure is still unsynced"
        );
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"old");
    }

    #[test]
    fn a_sync_in_flight_at_a_failure_reports_it_for_its_handle() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        let (a, b) = (m.open(f).unwrap(), m.open(f).unwrap());
        m.write(f, 0, b"one").unwrap();
        let slow = m.start_sync(f, b).unwrap();
        injected_failure(&mut m, f, a);
        assert_eq!(m.sync_through(f, slow), Err(libc::EIO));
        m.write(f, 3, b"two").unwrap();
        assert_eq!(m.fsync_through(f, b), Ok(()), "b reported it in flight");
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"\0\0\0two");
    }

    #[test]
    fn handles_are_released_and_a_cut_forgets_handles_and_errors() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        let a = m.open(f).unwrap();
        assert_eq!(m.open_handles(), 1);
        assert!(m.release(a));
        assert!(!m.release(a));
        assert_eq!(m.open_handles(), 0);
        assert_eq!(
            m.fsync_through(f, a),
            Ok(()),
            "a released handle reports nothing"
        );

        let b = m.open(f).unwrap();
        m.fail_sync(f).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert_eq!(m.open_handles(), 0);
        assert_eq!(m.fsync_through(f, b), Ok(()));
        let c = m.open(f).unwrap();
        assert!(c > b, "handles are never reused");
        assert_eq!(
            m.fsync_through(f, c),
            Ok(()),
            "the error died with the power"
        );
        // Directories and symlinks may be opened; they have no writeback errors.
        let d = m.open(ROOT).unwrap();
        assert_eq!(m.fsync_through(ROOT, d), Ok(()));
    }

    #[test]
    fn overlapping_syncs_finishing_out_of_order_make_durable_only_what_each_covered() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"1").unwrap();
        let first = m.sync_point(f).unwrap();
        m.write(f, 1, b"2").unwrap();
        let second = m.sync_point(f).unwrap();
        m.write(f, 2, b"3").unwrap();
        m.sync_through(f, second).unwrap();
        m.sync_through(f, first).unwrap(); // finishes last: nothing left of its part
        m.power_cut(Cut::DiscardAll);
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"12");
    }

    #[test]
    fn path_of_follows_current_entries() {
        let mut m = Model::new();
        let d = m
            .add(
                ROOT,
                OsStr::new("d"),
                Kind::Dir(Dir::default()),
                0o700,
                0,
                0,
            )
            .unwrap();
        let f = file(&mut m, d, "fileA");
        assert_eq!(m.path_of(ROOT).unwrap(), std::path::PathBuf::new());
        assert_eq!(m.path_of(f).unwrap(), std::path::Path::new("d/fileA"));
        m.rename(d, OsStr::new("fileA"), ROOT, OsStr::new("b"), false)
            .unwrap();
        assert_eq!(m.path_of(f).unwrap(), std::path::Path::new("b"));
        m.remove(ROOT, OsStr::new("b"), false).unwrap();
        assert_eq!(m.path_of(f), None, "unlinked, still open");
        assert_eq!(m.path_of(99), None);
    }

    #[test]
    fn a_directory_created_and_synced_keeps_only_synced_children() {
        let mut m = Model::new();
        let d = m
            .add(
                ROOT,
                OsStr::new("d"),
                Kind::Dir(Dir::default()),
                0o700,
                0,
                0,
            )
            .unwrap();
        m.fsync(ROOT).unwrap();
        let f = file(&mut m, d, "x");
        m.write(f, 0, b"x").unwrap();
        m.fsync(f).unwrap();
        m.power_cut(Cut::DiscardAll);
        assert!(m.lookup(ROOT, OsStr::new("d")).is_ok());
        assert_eq!(m.entries(d).unwrap(), vec![]);
        assert!(m.node(f).is_err(), "the unreachable file is gone");
    }
}
