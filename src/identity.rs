//! The device identity: configured (`device.id`), or generated once and kept in the journal
//! directory. Never derived from an IP address, a host name or a PID, which cloned images and
//! containers share.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::protocol::is_valid_device_id;

const FILE: &str = "device-id";
/// Bytes of the id file read at most (an id has at most 64).
const MAX_FILE: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read random bytes for a device id")]
    Random(#[source] std::io::Error),
    #[error("cannot store the device id in {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configured id, else the one stored in `dir`, else a new random one, stored durably.
pub fn resolve(configured: Option<&str>, dir: &Path) -> Result<String, Error> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = dir.join(FILE);
    if let Some(id) = read(&path) {
        if is_valid_device_id(&id) {
            return Ok(id);
        }
        warn!(
            "stored device id in {} is invalid; generating a new one",
            path.display()
        );
    }
    let id = generate()?;
    store(&path, &id)?;
    info!("generated device id={} stored in {}", id, path.display());
    Ok(id)
}

/// The id generated earlier and stored in `dir`, if there is a valid one. Creates nothing.
pub fn stored(dir: &Path) -> Option<String> {
    read(&dir.join(FILE)).filter(|id| is_valid_device_id(id))
}

/// The trimmed text of the id file at `path`, valid or not; `None` when it cannot be read. Reads
/// at most `MAX_FILE` bytes: a valid id is far shorter, and a damaged file must not be loaded whole.
fn read(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_FILE).read_to_string(&mut text))
        .ok()?;
    Some(text.trim().to_string())
}

/// Replaces the stored id in `dir` with a new random one, atomically (for a cloned image, whose
/// copies would otherwise share one id). The agent takes it up at its next start.
pub fn regenerate(dir: &Path) -> Result<String, Error> {
    let id = generate()?;
    store(&dir.join(FILE), &id)?;
    info!("regenerated device id={} stored in {}", id, dir.display());
    Ok(id)
}

/// Where the generated id is kept.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

fn generate() -> Result<String, Error> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("gw-{hex}"))
}

/// A power cut leaves the old file or the new one.
fn store(path: &Path, id: &str) -> Result<(), Error> {
    crate::atomic_file::replace(path, format!("{id}\n").as_bytes(), false).map_err(|source| {
        Error::Store {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_id_is_stored_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = resolve(None, dir.path()).unwrap();
        assert!(is_valid_device_id(&a) && a.starts_with("gw-"));
        assert_eq!(resolve(None, dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(resolve(None, other.path()).unwrap(), a);
    }

    #[test]
    fn regenerating_replaces_the_stored_id() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored(dir.path()), None);
        let a = resolve(None, dir.path()).unwrap();
        assert_eq!(stored(dir.path()), Some(a.clone()));
        let b = regenerate(dir.path()).unwrap();
        assert_ne!(a, b);
        assert_eq!(resolve(None, dir.path()).unwrap(), b);
    }

    #[test]
    fn a_configured_id_wins() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(Some("gw-01"), dir.path()).unwrap(), "gw-01");
    }

    #[test]
    fn validity_follows_the_protocol() {
        assert!(is_valid_device_id("gw-01.a_b"));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id("a b"));
        assert!(!is_valid_device_id(&"x".repeat(65)));
        assert!(!is_valid_device_id("gw/1"));
    }
}
