//! The seq high-water mark, kept outside sled in `journal.dir/seq-mark`, so that `seq` never goes
//! backwards even when the sled database is lost, quarantined, or silently comes back shorter
//! (sled 0.34 opens a truncated file without complaint, with the tail gone).
//!
//! # Format
//! Two 40-byte slots, written alternately in place and each followed by `fdatasync`:
//! `magic u32 | crc32 u32 | generation u64 | lease u64 | head u64 | acked u64`, little endian, the
//! CRC over the 32 bytes after it. A torn write can only damage the slot being written; the reader
//! takes the valid slot with the higher generation.
//!
//! # Meaning
//! - `lease`: no seq above it has been assigned. The journal renews it `LEASE_STEP` ahead before
//!   assigning past it, so the mark costs one small sync per `LEASE_STEP` seqs.
//! - `head`: the journal's head when the mark was written (exact after a clean close). A journal
//!   that opens with a lower head has lost records.
//! - `acked`: the cursor when the mark was written: where a lost range starts, at the latest.
//!
//! [`newest`] and [`encode`] are public so that the fuzz tests (`tests/fuzz.rs`) can reach them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Seqs reserved per renewal.
pub(super) const LEASE_STEP: u64 = 4096;
const MAGIC: u32 = 0x6665_7231; // "fer1"
/// Bytes per slot; the file holds two.
pub const SLOT: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub lease: u64,
    pub head: u64,
    pub acked: u64,
}

/// The open mark file and which slot was written last.
#[derive(Debug)]
pub(super) struct MarkFile {
    path: PathBuf,
    file: File,
    next_slot: u64,
    generation: u64,
    pub current: Option<Mark>,
}

impl MarkFile {
    /// Opens (or creates) the mark file and reads the newest valid mark, if any.
    pub fn open(dir: &Path) -> std::io::Result<MarkFile> {
        let path = dir.join("seq-mark");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // Only the two slots are read: whatever else a damaged file holds is not loaded.
        let mut buf = Vec::with_capacity(2 * SLOT);
        (&file).take(2 * SLOT as u64).read_to_end(&mut buf)?;
        let (newest, next_slot) = newest(&buf);
        Ok(MarkFile {
            path,
            file,
            next_slot,
            generation: newest.map_or(0, |(g, _)| g),
            current: newest.map(|(_, m)| m),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `mark` into the older slot and syncs it. Returns after the mark is on disk.
    pub fn write(&mut self, mark: Mark) -> std::io::Result<()> {
        self.file
            .seek(SeekFrom::Start(self.next_slot * SLOT as u64))?;
        self.file.write_all(&encode(self.generation + 1, mark))?;
        self.generation += 1;
        self.file.sync_data()?;
        self.next_slot = 1 - self.next_slot;
        self.current = Some(mark);
        Ok(())
    }
}

/// The newest valid slot in the bytes of a mark file (its generation and mark), and the slot to
/// write next: the other one, or the damaged one. Pure; never panics, whatever `buf` holds.
pub fn newest(buf: &[u8]) -> (Option<(u64, Mark)>, u64) {
    let slot = |i: usize| buf.get(i * SLOT..(i + 1) * SLOT).and_then(decode);
    match (slot(0), slot(1)) {
        (Some(a), Some(b)) if b.0 > a.0 => (Some(b), 0),
        (Some(a), _) => (Some(a), 1),
        (None, Some(b)) => (Some(b), 0),
        (None, None) => (None, 0),
    }
}

/// One slot holding `m` at `generation`, as [`MarkFile::write`] writes it.
pub fn encode(generation: u64, m: Mark) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    for (i, v) in [generation, m.lease, m.head, m.acked]
        .into_iter()
        .enumerate()
    {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A slot's generation and mark, or `None` when it is empty, torn or not a mark.
fn decode(b: &[u8]) -> Option<(u64, Mark)> {
    let word = |i: usize| {
        b.get(i..i + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let half = |i: usize| {
        b.get(i..i + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    };
    if b.len() != SLOT || half(0)? != MAGIC || half(4)? != crc32(&b[8..]) {
        return None;
    }
    let m = Mark {
        lease: word(16)?,
        head: word(24)?,
        acked: word(32)?,
    };
    (m.head <= m.lease && m.acked <= m.lease).then_some((word(8)?, m))
}

/// CRC-32 (IEEE), the same checksum the record log's frames carry (`crc32fast`).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks written before the checksum moved to `crc32fast` (a bitwise CRC-32 of its own)
    /// must still read: the standard check value of CRC-32/IEEE.
    #[test]
    fn the_checksum_is_crc32_ieee() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let reopen = || MarkFile::open(dir.path()).unwrap().current.unwrap();
        let mut f = MarkFile::open(dir.path()).unwrap();
        assert_eq!(f.current, None);
        f.write(Mark {
            lease: 10,
            head: 1,
            acked: 0,
        })
        .unwrap(); // slot 0
        f.write(Mark {
            lease: 20,
            head: 11,
            acked: 5,
        })
        .unwrap(); // slot 1
        assert_eq!(reopen().lease, 20);
        // Same lease, newer head (a clean close): the generation decides, not the lease.
        let mut f = MarkFile::open(dir.path()).unwrap();
        f.write(Mark {
            lease: 20,
            head: 15,
            acked: 5,
        })
        .unwrap(); // slot 0
        assert_eq!(reopen().head, 15);
        // Tear slot 0: the older slot 1 is still there.
        let path = dir.path().join("seq-mark");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            reopen(),
            Mark {
                lease: 20,
                head: 11,
                acked: 5
            }
        );
        // The next write goes into the damaged slot, not over the good one.
        let mut f = MarkFile::open(dir.path()).unwrap();
        f.write(Mark {
            lease: 30,
            head: 21,
            acked: 9,
        })
        .unwrap();
        assert_eq!(reopen().lease, 30);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode(&bytes[SLOT..]).unwrap().1.lease, 20);
    }

    #[test]
    fn garbage_and_short_files_read_as_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seq-mark"), b"garbage").unwrap();
        assert_eq!(MarkFile::open(dir.path()).unwrap().current, None);
        std::fs::write(dir.path().join("seq-mark"), [0xffu8; 64]).unwrap();
        assert_eq!(MarkFile::open(dir.path()).unwrap().current, None);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
