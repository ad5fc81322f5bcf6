//! One run per work directory: each run starts by removing its work directory, so a second run
//! started while one is going would delete the first's databases and journals under it (seen:
//! the first run's PostgreSQL vanished mid-round and its batches got no final answer). The lock
//! is a file beside the directory holding the running bench's pid, taken with `create_new`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Held for the run; the file is removed when it drops.
#[derive(Debug)]
pub struct WorkLock {
    path: PathBuf,
}

impl WorkLock {
    /// Takes `<work>.lock`. A lock whose pid no longer runs was left by a run that died: it is
    /// taken over. A live one is refused, naming its pid.
    pub fn take(work: &Path) -> Result<WorkLock, String> {
        let path = work.with_extension("lock");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    return Ok(WorkLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|text| text.trim().parse::<u32>().ok());
                    if let Some(pid) =
                        holder.filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
                    {
                        return Err(format!(
                            "another ferry-bench (pid {pid}) is running in {}: a second run would \
                             remove its files and share its cores; wait for it to end (or remove \
                             {} if pid {pid} is not a ferry-bench)",
                            work.display(),
                            path.display()
                        ));
                    }
                    // Left by a run that died: take it over.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Err(format!("{}: cannot take the lock", path.display()))
    }
}

impl Drop for WorkLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_is_refused_while_the_first_holds_the_work_directory() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let work = tmp.path().join("bench-work");
        let first = WorkLock::take(&work).expect("the first run takes the lock");
        let refused = WorkLock::take(&work).expect_err("a second run is refused");
        assert!(
            refused.contains(&format!("pid {}", std::process::id())),
            "{refused}"
        );
        drop(first);
        assert!(!work.with_extension("lock").exists());
        WorkLock::take(&work).expect("free again once the first run ends");
    }

    #[test]
    fn a_lock_left_by_a_run_that_died_is_taken_over() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let work = tmp.path().join("bench-work");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("run true");
        let dead = child.id();
        child.wait().expect("true ends");
        std::fs::write(work.with_extension("lock"), dead.to_string()).expect("write lock");
        let lock = WorkLock::take(&work).expect("a dead run's lock is taken over");
        assert_eq!(
            std::fs::read_to_string(work.with_extension("lock")).expect("read lock"),
            std::process::id().to_string()
        );
        drop(lock);
    }
}
