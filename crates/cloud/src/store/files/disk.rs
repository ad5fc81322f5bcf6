//! The store's file primitives: reading an append-only NDJSON file line by line (cutting off a
//! torn last line), and appending lines, synced or not (cut back on a failed write).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
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

/// The most of a records file a tail read looks through for its lines.
pub(super) const MAX_TAIL_SCAN: u64 = 64 * 1024 * 1024;

/// Where the last `lines` lines of the first `len` bytes of `file` start (`len` ends a line),
/// found by reading backwards in blocks; `None` when they start more than [`MAX_TAIL_SCAN`]
/// bytes before `len`.
pub(super) fn tail_start(file: &mut File, len: u64, lines: u64) -> io::Result<Option<u64>> {
    const BLOCK: u64 = 64 * 1024;
    let mut block = vec![0u8; BLOCK as usize];
    // The newline that ends the file ends the last line; the `lines`-th one before it ends the
    // line before the first wanted.
    let mut seen = 0u64;
    let mut end = len.saturating_sub(1);
    while end > 0 {
        if len - end > MAX_TAIL_SCAN {
            return Ok(None);
        }
        let start = end.saturating_sub(BLOCK);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block[..n])?;
        for i in (0..n).rev() {
            if block[i] == b'\n' {
                seen += 1;
                if seen == lines {
                    return Ok(Some(start + i as u64 + 1));
                }
            }
        }
        end = start;
    }
    Ok(Some(0))
}

#[cfg(test)]
mod tail_tests {
    use super::*;

    #[test]
    fn the_tail_starts_at_the_first_of_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.ndjson");
        // Lines long enough to cross the 64 KiB blocks.
        let lines: Vec<String> = (0..300).map(|i| format!("{i:0>1000}")).collect();
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        let len = std::fs::metadata(&path).expect("metadata").len();
        let mut file = File::open(&path).expect("open");
        for (want, from_line) in [(1, 299), (3, 297), (70, 230), (300, 0), (1000, 0)] {
            let start = tail_start(&mut file, len, want)
                .expect("read")
                .expect("found");
            assert_eq!(start, from_line * 1001, "last {want}");
        }
        assert_eq!(tail_start(&mut file, 0, 5).expect("read"), Some(0));
    }
}
