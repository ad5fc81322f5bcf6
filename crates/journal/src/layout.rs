//! The journal directory's layout: which sled database is current, and how it is replaced.
//!
//! ```text
//! journal.dir/
//!   device-id            the device identity (identity.rs)
//!   seq-mark             the seq high-water mark (mark.rs)
//!   log/                 the record log's segments (segments.rs), not part of any generation
//!   db -> db-7           symlink to the current database; replaced atomically by rename(2)
//!   db-7/                the sled database
//!   db.corrupt-<secs>/   a database that would not open, kept for forensics
//! ```
//! Compaction writes `db-<n+1>`, syncs it, and swaps the symlink; a crash at any point leaves
//! either the old or the new database current, and [`current`] removes the other at next start.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use log::{info, warn};

const LINK: &str = "db";
const PREFIX: &str = "db-";

/// The directory of the current database, creating or repairing the layout as needed: a plain
/// `db` directory (older layout) becomes `db-0`; a missing or dangling link points to the newest
/// generation; generations that are not current are leftovers of an interrupted compaction and
/// are removed.
pub(super) fn current(dir: &Path) -> io::Result<PathBuf> {
    let link = dir.join(LINK);
    let meta = fs::symlink_metadata(&link);
    match meta {
        Ok(m) if m.file_type().is_dir() => {
            fs::rename(&link, dir.join(format!("{PREFIX}0")))?;
            point(dir, 0)?;
        }
        Ok(m) if m.file_type().is_symlink() && link.is_dir() => {}
        // The target exists but is no directory: hand it to `open`, which fails and moves it aside.
        Ok(m) if m.file_type().is_symlink() && link.exists() => {
            return Ok(dir.join(fs::read_link(&link)?));
        }
        Ok(m) if m.file_type().is_symlink() => {
            warn!("journal link {} points nowhere; repairing", link.display());
            fs::remove_file(&link)?;
            point(dir, newest(dir)?.unwrap_or(1))?;
        }
        // A file (or anything else) where the link should be: leave it for `open` to fail on,
        // which moves it aside.
        Ok(_) => return Ok(link),
        Err(e) if e.kind() == io::ErrorKind::NotFound => point(dir, newest(dir)?.unwrap_or(1))?,
        Err(e) => return Err(e),
    }
    let target = fs::read_link(&link)?;
    let current = dir.join(&target);
    fs::create_dir_all(&current)?;
    for g in generations(dir)? {
        let path = dir.join(format!("{PREFIX}{g}"));
        if path != current {
            info!("removing leftover journal database {}", path.display());
            fs::remove_dir_all(&path)?;
        }
    }
    Ok(current)
}

/// The directory for the generation after `current`.
pub(super) fn next(dir: &Path, current: &Path) -> PathBuf {
    let g = generation_of(current).unwrap_or(0);
    dir.join(format!("{PREFIX}{}", g + 1))
}

/// Makes `new` (a synced database directory in `dir`) current, atomically, then removes `old`.
pub(super) fn swap(dir: &Path, new: &Path, old: &Path) -> io::Result<()> {
    let g = generation_of(new).ok_or_else(|| io::Error::other("not a journal generation"))?;
    point(dir, g)?;
    if old != new && old.starts_with(dir) {
        fs::remove_dir_all(old)?;
    }
    super::sync_dir(dir).map_err(io::Error::other)
}

/// Moves the current database (the link's target, or whatever stands at `db`) aside as
/// `db.corrupt-<secs>`, and returns where it went.
pub(super) fn quarantine(dir: &Path, secs: u64) -> io::Result<PathBuf> {
    let link = dir.join(LINK);
    let aside = dir.join(format!("db.corrupt-{secs}"));
    match fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            let target = dir.join(fs::read_link(&link)?);
            fs::remove_file(&link)?;
            if target.exists() {
                fs::rename(&target, &aside)?;
            }
        }
        Ok(_) => fs::rename(&link, &aside)?,
        Err(e) => return Err(e),
    }
    super::sync_dir(dir).map_err(io::Error::other)?;
    Ok(aside)
}

/// Points the link at generation `g`: a new link under a temporary name, renamed over the old.
fn point(dir: &Path, g: u64) -> io::Result<()> {
    let tmp = dir.join("db.link-tmp");
    let _ = fs::remove_file(&tmp);
    symlink(format!("{PREFIX}{g}"), &tmp)?;
    fs::rename(&tmp, dir.join(LINK))?;
    super::sync_dir(dir).map_err(io::Error::other)
}

fn newest(dir: &Path) -> io::Result<Option<u64>> {
    Ok(generations(dir)?.into_iter().max())
}

fn generations(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if let Some(g) = generation_of(&e.path()) {
            if e.file_type()?.is_dir() {
                out.push(g);
            }
        }
    }
    Ok(out)
}

fn generation_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_a_link_to_generation_one() {
        let dir = tempfile::tempdir().unwrap();
        let cur = current(dir.path()).unwrap();
        assert_eq!(cur, dir.path().join("db-1"));
        assert_eq!(
            fs::read_link(dir.path().join("db")).unwrap(),
            Path::new("db-1")
        );
    }

    #[test]
    fn a_plain_db_directory_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("db")).unwrap();
        fs::write(dir.path().join("db/conf"), b"x").unwrap();
        let cur = current(dir.path()).unwrap();
        assert_eq!(cur, dir.path().join("db-0"));
        assert!(cur.join("conf").exists());
    }

    #[test]
    fn an_interrupted_compaction_leaves_the_old_generation_current() {
        let dir = tempfile::tempdir().unwrap();
        let cur = current(dir.path()).unwrap();
        let new = next(dir.path(), &cur);
        fs::create_dir(&new).unwrap(); // crashed while copying
        assert_eq!(current(dir.path()).unwrap(), cur);
        assert!(!new.exists(), "the partial copy is removed");
    }

    #[test]
    fn a_swap_makes_the_new_generation_current_and_removes_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let cur = current(dir.path()).unwrap();
        let new = next(dir.path(), &cur);
        fs::create_dir(&new).unwrap();
        swap(dir.path(), &new, &cur).unwrap();
        assert_eq!(current(dir.path()).unwrap(), new);
        assert!(!cur.exists());
    }

    #[test]
    fn a_dangling_link_points_to_the_newest_generation() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("db-3")).unwrap();
        symlink("db-9", dir.path().join("db")).unwrap();
        assert_eq!(current(dir.path()).unwrap(), dir.path().join("db-3"));
    }

    #[test]
    fn quarantine_moves_the_target_not_just_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let cur = current(dir.path()).unwrap();
        fs::write(cur.join("db"), b"data").unwrap();
        let aside = quarantine(dir.path(), 42).unwrap();
        assert!(aside.join("db").exists());
        assert!(!dir.path().join("db").exists());
        assert_eq!(current(dir.path()).unwrap(), dir.path().join("db-1"));
    }
}
