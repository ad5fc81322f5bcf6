//! Replacing a small file so that a power cut at any instant leaves either the old contents or the
//! new, never a mix: temp file, fsync, rename, fsync the directory. Used for the config file, the
//! device identity and the downlink's remembered state.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically. With `backup`, an existing `path` is first copied to
/// `path.bak` the same way, so the previous version survives the replacement.
///
/// Test failpoints (`FERRY_FAILPOINT`): `replace_after_backup`, `replace_before_rename` and
/// `replace_after_rename` abort the process at that step, as a power cut would stop it.
/// The replacement keeps the permissions of the file it replaces (a config file holding secrets
/// stays 0600); a new file gets 0666 less the umask.
pub fn replace(path: &Path, contents: &[u8], backup: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path).map_or(0o666, |m| m.permissions().mode() & 0o7777);
    replace_with_mode(path, contents, backup, mode)
}

/// [`replace`] for a file only its owner may read or write (mode 0600 before the umask): a
/// secret is never visible to others, not even in its temp file.
pub fn replace_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace_with_mode(path, contents, false, 0o600)
}

fn replace_with_mode(path: &Path, contents: &[u8], backup: bool, mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    if backup {
        match fs::read(path) {
            Ok(old) => {
                write_and_rename(&with_suffix(path, ".bak"), &old, &dir, mode)?;
                failpoint("replace_after_backup");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    write_and_rename(path, contents, &dir, mode)?;
    failpoint("replace_after_rename");
    Ok(())
}

/// `path` with `suffix` appended to its file name (`ferry.toml` → `ferry.toml.bak`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn write_and_rename(path: &Path, contents: &[u8], dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = with_suffix(path, &format!(".tmp-{}", std::process::id()));
    // A leftover keeps the mode it was created with: start from a new file.
    let _ = fs::remove_file(&tmp);
    let created = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp);
    let written = created.and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    failpoint("replace_before_rename");
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

fn failpoint(name: &str) {
    if crate::failpoint::is_set(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file holding secrets, made 0600 by its owner, must not become world-readable
    /// when the console saves it (nor its backup).
    #[test]
    fn a_replacement_keeps_the_mode_of_the_file_it_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        replace(&path, b"new", true).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".bak")), 0o600);
        replace_private(&dir.path().join("secret"), b"s").unwrap();
        assert_eq!(mode(&dir.path().join("secret")), 0o600);
    }

    #[test]
    fn replaces_and_keeps_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ferry.toml");
        replace(&p, b"one", true).unwrap();
        assert!(!with_suffix(&p, ".bak").exists());
        replace(&p, b"two", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(with_suffix(&p, ".bak")).unwrap(), b"one");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no temp files left behind");
    }
}
