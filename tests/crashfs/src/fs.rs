//! The FUSE side of the crash-test filesystem: kernel requests become calls on the [`Model`], under
//! one mutex. While the power is off every request fails with EIO and changes nothing.
//!
//! Locks: sled takes `flock(LOCK_EX|LOCK_NB)` on its `db` file (through `fs2`). This filesystem
//! does not negotiate `FUSE_FLOCK_LOCKS`/`FUSE_POSIX_LOCKS`, so the kernel keeps flock and fcntl
//! locks itself, per inode, as for a local filesystem: they work between processes on this
//! machine and vanish with the process that held them (or with the mount), which is all a
//! single-host power-cut test needs.
//!
//! `sync_file_range` never reaches a FUSE filesystem (the kernel has no request for it): it makes
//! nothing durable here, as it promises nothing against power loss on a real disk either.
//!
//! Every open and create gets its own file handle ([`Model::open`], freed on release): an open file
//! description, which reports each writeback error of its file once, as on Linux >= 4.16 (see the
//! [`model`] docs). Directories keep handle 0: they have no writeback errors.
//!
//! An fsync or fsyncdir decides everything as it starts (if the power is on): whether an armed
//! [`FsyncFault`] fails it (then [`Model::fail_sync`] applies at once, and the call reports the
//! error through its handle), whether its handle has a writeback error to report (then it fails
//! with EIO and makes nothing durable), otherwise the part of the log it will make durable
//! ([`Model::start_sync`]), and its delay (`slow-fsync`). It then sleeps that delay with no lock
//! held, counted in `fsyncs_in_flight` from start to reply, and completes; it fails with EIO if a
//! failure hit the file meanwhile (reported through its handle too), and a cut during the delay
//! makes it fail with EIO, having made nothing durable. `eio_injected` counts the injected
//! failures, `eio_reported` every EIO an fsync returned for a writeback error (the injected call,
//! each other description reporting it, and syncs in flight when it hit).
//!
//! Why one file of this length: the FUSE operations, one method of `fuser::Filesystem` each, over
//! the model in `model.rs`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use log::{info, trace};

use crate::model::{self, Cut, CutReport, Dir, File, Kind, Model, Node, Rng};

/// Attribute and entry cache time. Safe to be long: every change goes through the kernel, and a
/// cut happens only while unmounted, which drops the kernel's caches.
const TTL: Duration = Duration::from_secs(1);

/// An armed `fail-fsync`: of the coming fsync/fdatasync calls on regular files whose path
/// (relative to the mount root) contains `pattern`, the `nth` (1 = the next one) fails with EIO,
/// and so do the `times - 1` matching calls right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsyncFault {
    pub pattern: String,
    pub nth: u64,
    pub times: u64,
}

/// What the control side and the FUSE threads share.
#[derive(Debug, Default)]
pub struct Shared {
    state: Mutex<State>,
    fsyncs_in_flight: AtomicU64,
    max_fsyncs_in_flight: AtomicU64,
    /// fsyncs of each regular file in flight now, by inode, and the most of one file at once
    /// since start, with that file's path: two syncs of one file overlapping.
    per_file: Mutex<PerFile>,
}

#[derive(Debug, Default)]
struct PerFile {
    now: std::collections::HashMap<u64, u64>,
    max: u64,
    max_path: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    model: Model,
    /// The power is off: every request fails until `power_on`.
    off: bool,
    /// Counts cuts; a slow fsync that sees it change while it sleeps does nothing.
    epoch: u64,
    fsyncs: u64,
    fsyncdirs: u64,
    refused: u64,
    ops: BTreeMap<&'static str, u64>,
    last_cut: CutReport,
    /// Every fsync/fsyncdir sleeps this long, or, with `jitter`, a delay in `0..=slow_fsync_ms`
    /// drawn from it.
    slow_fsync_ms: u64,
    jitter: Option<(u64, Rng)>,
    /// Only syncs of paths containing this are slow.
    slow_only: Option<String>,
    faults: Vec<FsyncFault>,
    /// Injected writeback errors.
    eio_injected: u64,
    /// EIOs returned by fsyncs for a writeback error.
    eio_reported: u64,
}

impl State {
    /// Whether an armed fault fails this fsync of the file at `path`; counts the call against
    /// every fault it matches and disarms the spent ones.
    fn take_fault(&mut self, path: &str) -> bool {
        let mut fail = false;
        for f in self.faults.iter_mut().filter(|f| path.contains(&f.pattern)) {
            if f.nth > 1 {
                f.nth -= 1;
            } else {
                fail = true;
                f.times -= 1;
            }
        }
        self.faults.retain(|f| f.times > 0);
        fail
    }

    fn next_delay(&mut self, path: Option<&str>) -> u64 {
        if let Some(only) = &self.slow_only {
            if !path.is_some_and(|p| p.contains(only.as_str())) {
                return 0;
            }
        }
        match &mut self.jitter {
            Some((_, rng)) => rng.below(self.slow_fsync_ms.saturating_add(1)),
            None => self.slow_fsync_ms,
        }
    }
}

/// Counts an fsync in flight until dropped: in all, and per regular file (`file`: its inode and
/// path).
struct InFlight<'a>(&'a Shared, Option<u64>);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared, file: Option<(u64, Option<String>)>) -> InFlight<'a> {
        let now = shared.fsyncs_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared
            .max_fsyncs_in_flight
            .fetch_max(now, Ordering::Relaxed);
        let ino = file.map(|(ino, path)| {
            let mut pf = shared.per_file.lock().unwrap_or_else(|e| e.into_inner());
            let n = {
                let n = pf.now.entry(ino).or_default();
                *n += 1;
                *n
            };
            if n > pf.max {
                pf.max = n;
                pf.max_path = path;
            }
            ino
        });
        InFlight(shared, ino)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fsyncs_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(ino) = self.1 {
            let mut pf = self.0.per_file.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = pf.now.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    pf.now.remove(&ino);
                }
            }
        }
    }
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: from now on every request fails, and the files hold what survives.
    pub fn cut(&self, cut: Cut) -> CutReport {
        let mut st = self.lock();
        st.off = true;
        st.epoch += 1;
        let report = st.model.power_cut(cut);
        st.last_cut = report.clone();
        report
    }

    /// Power back on (call after the filesystem was mounted again).
    pub fn power_on(&self) {
        self.lock().off = false;
    }

    /// Every fsync/fsyncdir from now on (with `only`, of a path containing it) takes `ms` ms,
    /// or with a jitter seed its own delay in `0..=ms`, drawn from a generator seeded with it.
    pub fn set_slow_fsync(&self, ms: u64, jitter_seed: Option<u64>, only: Option<String>) {
        let mut st = self.lock();
        st.slow_fsync_ms = ms;
        st.jitter = jitter_seed.map(|seed| (seed, Rng::new(seed)));
        st.slow_only = only;
    }

    /// Arms a fault (several may be armed at once). `nth` and `times` below 1 count as 1.
    pub fn arm_fsync_fault(&self, fault: FsyncFault) {
        self.lock().faults.push(FsyncFault {
            nth: fault.nth.max(1),
            times: fault.times.max(1),
            ..fault
        });
    }

    /// Disarms every fault; returns how many were armed.
    pub fn clear_fsync_faults(&self) -> usize {
        std::mem::take(&mut self.lock().faults).len()
    }

    pub fn stats_json(&self, mounted: bool) -> String {
        let st = self.lock();
        let per_file = self.per_file.lock().unwrap_or_else(|e| e.into_inner());
        let (unsynced_bytes, unsynced_dir_ops) = st.model.unsynced();
        let ops: serde_json::Map<String, serde_json::Value> = st
            .ops
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).into()))
            .collect();
        serde_json::json!({
            "mounted": mounted,
            "power": !st.off,
            "cuts": st.epoch,
            "fsyncs": st.fsyncs,
            "fsyncdirs": st.fsyncdirs,
            "fsyncs_in_flight": self.fsyncs_in_flight.load(Ordering::Relaxed),
            "max_fsyncs_in_flight": self.max_fsyncs_in_flight.load(Ordering::Relaxed),
            "max_fsyncs_in_flight_one_file": per_file.max,
            "max_fsyncs_in_flight_one_file_path": per_file.max_path,
            "slow_fsync_ms": st.slow_fsync_ms,
            "slow_fsync_jitter_seed": st.jitter.as_ref().map(|(seed, _)| *seed),
            "slow_fsync_only": st.slow_only,
            "eio_injected": st.eio_injected,
            "eio_reported": st.eio_reported,
            "open_handles": st.model.open_handles(),
            "faults_armed": st.faults.len(),
            "unsynced_bytes": unsynced_bytes,
            "unsynced_dir_ops": unsynced_dir_ops,
            "file_bytes": st.model.file_bytes(),
            "refused_while_off": st.refused,
            "last_cut": {
                "unsynced_bytes": st.last_cut.unsynced_bytes,
                "unsynced_dir_ops": st.last_cut.unsynced_dir_ops,
                "kept_bytes": st.last_cut.kept_bytes,
                "kept_dir_ops": st.last_cut.kept_dir_ops,
                "torn_writes": st.last_cut.torn_writes,
            },
            "ops": ops,
        })
        .to_string()
    }

    /// Writes the current tree into `dir` (a real directory), for forensics after a failure.
    pub fn dump(&self, dir: &Path) -> std::io::Result<usize> {
        let entries = self.lock().model.walk();
        for (path, data) in &entries {
            let to = dir.join(path);
            match data {
                None => std::fs::create_dir_all(&to)?,
                Some(bytes) => {
                    if let Some(p) = to.parent() {
                        std::fs::create_dir_all(p)?;
                    }
                    std::fs::write(&to, bytes)?;
                }
            }
        }
        Ok(entries.len())
    }
}

/// The `fuser` filesystem over [`Shared`].
pub struct CrashFs(pub Arc<Shared>);

/// Runs `f` on the model unless the power is off; counts the request under `op`.
fn with<T>(
    shared: &Shared,
    op: &'static str,
    f: impl FnOnce(&mut Model) -> model::Result<T>,
) -> Result<T, Errno> {
    let mut st = shared.lock();
    *st.ops.entry(op).or_default() += 1;
    if st.off {
        st.refused += 1;
        return Err(Errno::EIO);
    }
    f(&mut st.model).map_err(Errno::from_i32)
}

fn to_time(t: SystemTime) -> SystemTime {
    t.max(UNIX_EPOCH)
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let (kind, size, nlink) = match &n.kind {
        Kind::File(f) => (FileType::RegularFile, f.current.len() as u64, 1),
        Kind::Dir(_) => (FileType::Directory, 0, 2),
        Kind::Symlink(t) => (FileType::Symlink, t.len() as u64, 1),
    };
    let t = to_time(n.mtime);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind,
        perm: (n.mode & 0o7777) as u16,
        nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn entry_of(m: &Model, ino: u64) -> model::Result<FileAttr> {
    Ok(attr(ino, m.node(ino)?))
}

fn reply_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl CrashFs {
    fn add(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        op: &'static str,
    ) -> Result<FileAttr, Errno> {
        trace!("{op} parent={} name={:?}", parent.0, name);
        with(&self.0, op, |m| {
            let ino = m.add(parent.0, name, kind, mode, req.uid(), req.gid())?;
            entry_of(m, ino)
        })
    }

    fn fsync_any(&self, ino: INodeNo, fh: FileHandle, op: &'static str, reply: ReplyEmpty) {
        trace!("{op} ino={} fh={}", ino.0, fh.0);
        let shared = &self.0;
        // Everything about the call is decided as it starts (see the module docs).
        let start = {
            let mut st = shared.lock();
            *st.ops.entry(op).or_default() += 1;
            if st.off {
                st.refused += 1;
                None
            } else if let Ok(is_file) = st
                .model
                .node(ino.0)
                .map(|n| matches!(n.kind, Kind::File(_)))
            {
                // The path of a regular file: for the faults, the slow-sync filter and the
                // per-file count of syncs in flight.
                let path = match (op, is_file) {
                    ("fsync", true) => st.model.path_of(ino.0),
                    _ => None,
                };
                let path = path.map(|p| p.to_string_lossy().into_owned());
                let file = (op == "fsync" && is_file).then(|| (ino.0, path.clone()));
                let injected = path.as_deref().is_some_and(|p| st.take_fault(p));
                if injected {
                    let dropped = st.model.fail_sync(ino.0).unwrap_or(0);
                    st.eio_injected += 1;
                    info!(
                        "injected EIO on fsync of {} (unsynced bytes dropped={dropped})",
                        path.as_deref().unwrap_or("?")
                    );
                }
                // The injected call reports the error through its handle like any other.
                let point = match st.model.start_sync(ino.0, fh.0) {
                    Ok(point) if !injected => Some(point),
                    Ok(_) => None, // through no open handle: fails all the same
                    Err(e) => {
                        if !injected {
                            info!(
                                "{op} of ino {} fh {} reports a writeback error: EIO",
                                ino.0, fh.0
                            );
                        }
                        debug_assert_eq!(e, libc::EIO);
                        None
                    }
                };
                if point.is_none() {
                    st.eio_reported += 1;
                }
                let delay = st.next_delay(path.as_deref());
                Some((point, st.epoch, delay, file))
            } else {
                None
            }
        };
        let Some((point, epoch, delay, file)) = start else {
            return reply.error(Errno::EIO);
        };
        let in_flight = InFlight::new(shared, file);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let r = {
            let mut st = shared.lock();
            match point {
                // The write-back failed.
                None => Err(Errno::EIO),
                // The power went while the device was still writing (nothing of it counts).
                Some(_) if st.off || st.epoch != epoch => Err(Errno::EIO),
                Some(point) => match st.model.sync_through(ino.0, point) {
                    Ok(()) => {
                        if op == "fsyncdir" {
                            st.fsyncdirs += 1;
                        } else {
                            st.fsyncs += 1;
                        }
                        Ok(())
                    }
                    Err(e) => {
                        if e == libc::EIO {
                            st.eio_reported += 1;
                            info!("{op} of ino {} overlapped a failed one: EIO", ino.0);
                        }
                        Err(Errno::from_i32(e))
                    }
                },
            }
        };
        drop(in_flight);
        reply_empty(reply, r);
    }
}

impl Filesystem for CrashFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = with(&self.0, "lookup", |m| {
            let ino = m.lookup(parent.0, name)?;
            entry_of(m, ino)
        });
        reply_entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match with(&self.0, "getattr", |m| entry_of(m, ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        trace!("setattr ino={} size={size:?} mode={mode:?}", ino.0);
        let r = with(&self.0, "setattr", |m| {
            if let Some(size) = size {
                m.truncate(ino.0, size)?;
            }
            m.set_owner_mode(ino.0, mode, uid, gid)?;
            entry_of(m, ino.0)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = with(&self.0, "readlink", |m| match &m.node(ino.0)?.kind {
            Kind::Symlink(t) => Ok(t.as_bytes().to_vec()),
            _ => Err(libc::EINVAL),
        });
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let r = self.add(
            req,
            parent,
            name,
            Kind::File(File::default()),
            mode & !umask,
            "mknod",
        );
        reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.add(
            req,
            parent,
            name,
            Kind::Dir(Dir::default()),
            mode & !umask,
            "mkdir",
        );
        reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        trace!("unlink parent={} name={name:?}", parent.0);
        reply_empty(
            reply,
            with(&self.0, "unlink", |m| m.remove(parent.0, name, false)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        trace!("rmdir parent={} name={name:?}", parent.0);
        reply_empty(
            reply,
            with(&self.0, "rmdir", |m| m.remove(parent.0, name, true)),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let kind = Kind::Symlink(target.as_os_str().to_os_string());
        let r = self.add(req, parent, link_name, kind, 0o777, "symlink");
        reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        trace!(
            "rename {}/{name:?} -> {}/{newname:?} flags={flags:?}",
            parent.0, newparent.0
        );
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        reply_empty(
            reply,
            with(&self.0, "rename", |m| {
                m.rename(parent.0, name, newparent.0, newname, noreplace)
            }),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match with(&self.0, "open", |m| m.open(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Even with the power off: the process closed it.
        let mut st = self.0.lock();
        *st.ops.entry("release").or_default() += 1;
        st.model.release(fh.0);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        trace!("read ino={} off={offset} len={size}", ino.0);
        match with(&self.0, "read", |m| {
            m.read(ino.0, offset, size).map(<[u8]>::to_vec)
        }) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        trace!("write ino={} off={offset} len={}", ino.0, data.len());
        match with(&self.0, "write", |m| m.write(ino.0, offset, data)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fdatasync and fsync both make the data and the size durable, which is all modelled.
        self.fsync_any(ino, fh, "fsync", reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = with(&self.0, "readdir", |m| {
            let mut out = vec![
                (OsStr::new(".").to_os_string(), ino.0, FileType::Directory),
                (
                    OsStr::new("..").to_os_string(),
                    model::ROOT,
                    FileType::Directory,
                ),
            ];
            for (name, child) in m.entries(ino.0)? {
                let kind = match m.node(child).map(|n| &n.kind) {
                    Ok(Kind::Dir(_)) => FileType::Directory,
                    Ok(Kind::Symlink(_)) => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                out.push((name, child, kind));
            }
            Ok(out)
        });
        match r {
            Ok(entries) => {
                for (i, (name, child, kind)) in
                    entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_any(ino, fh, "fsyncdir", reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 1 GiB of 4 KiB blocks, mostly free.
        let used = with(&self.0, "statfs", |m| Ok(m.file_bytes() / 4096)).unwrap_or(0);
        let blocks = 1 << 18;
        let free = blocks - used.min(blocks);
        reply.statfs(blocks, free, free, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        trace!("create parent={} name={name:?}", parent.0);
        // The new file and its open description, under one lock.
        let r = with(&self.0, "create", |m| {
            let ino = m.add(
                parent.0,
                name,
                Kind::File(File::default()),
                mode & !umask,
                req.uid(),
                req.gid(),
            )?;
            Ok((entry_of(m, ino)?, m.open(ino)?))
        });
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        trace!(
            "fallocate ino={} off={offset} len={length} mode={mode}",
            ino.0
        );
        if mode != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        // Plain allocation: the file grows to cover the range (zeros), like any size change.
        let r = with(&self.0, "fallocate", |m| {
            let len = m.len(ino.0)?;
            if offset + length > len {
                m.truncate(ino.0, offset + length)?;
            }
            Ok(())
        });
        reply_empty(reply, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fails_the_nth_matching_fsync_and_the_next_times_minus_one() {
        let mut st = State::default();
        let fault = |pattern: &str, nth, times| FsyncFault {
            pattern: pattern.into(),
            nth,
            times,
        };
        st.faults.push(fault("fileA", 2, 2));
        st.faults.push(fault("db", 1, 1));
        let calls = ["fileA", "other", "d/fileA", "db/x", "fileA", "fileA"];
        let failed: Vec<bool> = calls.iter().map(|p| st.take_fault(p)).collect();
        assert_eq!(failed, [false, false, true, true, true, false]);
        assert!(st.faults.is_empty(), "spent faults are disarmed");
    }
}
