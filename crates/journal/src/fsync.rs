//! Every `fdatasync` of a journal file and `fsync` of a journal directory goes through here, so
//! that the unit tests can hold a sync in flight or fail it as a failing disk does ([`hook`], test
//! builds only). Nothing else in the journal calls `sync_data` or `sync_all`.
//!
//! What a failure means is decided by the callers, by one rule (Linux's, since 4.13): a failed
//! `fdatasync` reports the writeback error once and may leave the unwritten pages marked clean, so
//! a retried `fdatasync` can return 0 for data that never reached the disk. A caller never retries
//! a failed sync into durability: it rewrites what it needs from data it still holds, into a new
//! file, and syncs that (`Segments::rewrite`, `Journal::compact`).

use std::fs::File;
use std::io;
use std::path::Path;

/// `fdatasync` of `file`, found at `path`.
pub(super) fn data(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    hook::before(path)?;
    let _ = path;
    file.sync_data()
}

/// `fsync` of the directory at `dir`: names created, renamed or removed in it become durable.
pub(super) fn dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    #[cfg(test)]
    hook::before(dir)?;
    d.sync_all()
}

/// `fsync` of a file opened only to sync it (sled's `conf` and blob files).
pub(super) fn path(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    #[cfg(test)]
    hook::before(path)?;
    f.sync_all()
}

/// Test control over the syncs of files under a directory: fail the next ones, or hold them until
/// released, and count them.
#[cfg(test)]
pub(crate) mod hook {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// What the syncs of paths under one directory do.
    pub(crate) struct Rule {
        /// Syncs of paths containing this string are failed (EIO) while `fail` is above 0.
        fail_matching: Mutex<(String, usize)>,
        /// Syncs wait while this is closed.
        open: Mutex<bool>,
        opened: Condvar,
        /// Syncs that reached the hook (including failed and held ones).
        pub entered: AtomicUsize,
        /// Syncs that passed the hook (about to call the real sync), by path.
        pub passed: Mutex<Vec<PathBuf>>,
    }

    impl Rule {
        /// The next `n` syncs of paths containing `pattern` fail with EIO.
        pub(crate) fn fail_next(&self, pattern: &str, n: usize) {
            *self.fail_matching.lock().unwrap_or_else(|e| e.into_inner()) = (pattern.into(), n);
        }

        /// Every sync waits until [`Rule::release`].
        pub(crate) fn hold(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = false;
        }

        /// How many syncs of paths containing `pattern` passed the hook.
        pub(crate) fn passed(&self, pattern: &str) -> usize {
            let passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
            passed
                .iter()
                .filter(|p| p.to_string_lossy().contains(pattern))
                .count()
        }

        pub(crate) fn release(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.opened.notify_all();
        }
    }

    type Rules = Mutex<Vec<(PathBuf, Arc<Rule>)>>;
    static RULES: Rules = Mutex::new(Vec::new());

    /// The rule for syncs of paths under `dir` (tests run in parallel, each in its own dir).
    pub(crate) fn install(dir: &Path) -> Arc<Rule> {
        let rule = Arc::new(Rule {
            fail_matching: Mutex::new((String::new(), 0)),
            open: Mutex::new(true),
            opened: Condvar::new(),
            entered: AtomicUsize::new(0),
            passed: Mutex::new(Vec::new()),
        });
        let mut rules = RULES.lock().unwrap_or_else(|e| e.into_inner());
        rules.retain(|(d, _)| d != dir);
        rules.push((dir.to_path_buf(), Arc::clone(&rule)));
        rule
    }

    pub(super) fn before(path: &Path) -> io::Result<()> {
        let rule = {
            let rules = RULES.lock().unwrap_or_else(|e| e.into_inner());
            rules
                .iter()
                .find(|(d, _)| path.starts_with(d))
                .map(|(_, r)| Arc::clone(r))
        };
        let Some(rule) = rule else { return Ok(()) };
        rule.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = rule.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = rule
                .opened
                .wait_timeout(open, Duration::from_secs(30))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(open);
        let mut fail = rule.fail_matching.lock().unwrap_or_else(|e| e.into_inner());
        if fail.1 > 0 && path.to_string_lossy().contains(fail.0.as_str()) {
            fail.1 -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        drop(fail);
        rule.passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
        Ok(())
    }
}
