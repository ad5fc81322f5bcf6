//! The store's file primitives: reading an append-only NDJSON file line by line (cutting off a
//! torn last line), and appending lines, synced or not (cut back on a failed write).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;

use log::warn;

use super::Error;

/// Calls `parse` for every complete line of `path` (without its newline). A last line without a
/// newline is torn: it is logged and cut off the file.
pub(super) fn for_each_line(
    path: &Path,
    mut parse: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    let mut complete_len: u64 = 0;
    let mut number: u64 = 0;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        let Some(content) = line.strip_suffix(b"\n") else {
            warn!(
                "torn last line dropped path={} line={} bytes={}",
                path.display(),
                number,
                read
            );
            let truncate_error = |source| Error::Truncate {
                path: path.to_path_buf(),
                source,
            };
            file.set_len(complete_len).map_err(truncate_error)?;
            file.sync_data().map_err(truncate_error)?;
            return Ok(());
        };
        parse(content).map_err(|problem| Error::Malformed {
            path: path.to_path_buf(),
            line: number,
            problem,
        })?;
        complete_len += read as u64;
    }
}

/// Makes the entries of `dir` durable (a new file's name survives a power cut only then).
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// How the store makes a records file durable: `File::sync_data`, or a test's stand-in.
pub(super) type SyncFn = Arc<dyn Fn(&File) -> io::Result<()> + Send + Sync>;

/// Opens `path` for appending, creating it if needed; a new file is made durable in `dir` (a sync
/// of the directory) before this returns.
pub(super) fn open_append(dir: &Path, path: &Path) -> Result<File, Error> {
    let open_error = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    match OpenOptions::new().append(true).open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(path)
                .map_err(open_error)?;
            sync_dir(dir)?;
            Ok(file)
        }
        Err(e) => Err(open_error(e)),
    }
}

/// Appends `bytes` to `file` (at `path`, `len` bytes long), not synced. On error the file is cut
/// back to `len`, so no partial line stays behind to be followed by later appends.
pub(super) fn append(path: &Path, mut file: &File, len: u64, bytes: &[u8]) -> Result<(), Error> {
    if let Err(source) = file.write_all(bytes) {
        // Best effort: if even this fails, the next start finds the torn line and drops it.
        let _ = file.set_len(len);
        return Err(Error::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Appends `bytes` to `path` and syncs it (and `dir`, when the file is new). On error the file is cut
/// back to its previous length, so no partial line stays behind to be followed by later appends.
pub(super) fn append_synced(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let open_error = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let (mut file, created) = match OpenOptions::new().append(true).open(path) {
        Ok(file) => (file, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(path)
                .map_err(open_error)?,
            true,
        ),
        Err(e) => return Err(open_error(e)),
    };
    let before = file
        .metadata()
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let written = file
        .write_all(bytes)
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|()| {
            file.sync_data().map_err(|source| Error::Sync {
                path: path.to_path_buf(),
                source,
            })
        });
    if let Err(e) = written {
        // Best effort: if even this fails, the next start finds the torn line and drops it.
        let _ = file.set_len(before);
        return Err(e);
    }
    if created {
        sync_dir(dir)?;
    }
    Ok(())
}
