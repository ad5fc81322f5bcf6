//! Regression tests of ferry's journal under real power cuts: the journal runs in this process on
//! a `ferry-crashfs` mount (needs /dev/fuse and root or fusermount3), the power is cut, the mount
//! comes back with only what was synced, and the journal is opened again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::journal::{Entry, Journal, NewRecord, OnFull, Options, StoredFormat};
use ferry_crashfs::control;

struct CrashFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    sock: PathBuf,
    child: Child,
}

impl CrashFs {
    fn start() -> CrashFs {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&mnt).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry-crashfs"))
            .arg(&mnt)
            .arg("--control")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let fs = CrashFs {
            _dir: dir,
            mnt,
            sock,
            child,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while fs.send("stats").is_err() {
            assert!(Instant::now() < end, "ferry-crashfs did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs
    }

    fn send(&self, line: &str) -> Result<String, String> {
        control::request(&self.sock, line, Duration::from_secs(60))
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        let _ = self.send("quit");
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn opts(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        max_bytes: 64 * 1024 * 1024,
        on_full: OnFull::RejectNew,
        cache_bytes: 1024 * 1024,
        replay_window: ferry::journal::default_replay_window(64 << 20),
        fixed_budget: None,
    }
}

fn rec(i: u32) -> NewRecord {
    NewRecord {
        ts_ms: 1,
        topic: "t".into(),
        payload: format!("record {i}").into_bytes(),
        format: StoredFormat::Text,
        parse_error: false,
        mono: None,
        too_large: None,
        mqtt: None,
    }
}

/// Runs `child` in a copy of this test binary (so that it can be SIGKILLed like a process losing
/// its power), waits for it to print `ready`, and returns it.
fn spawn_child(test: &str, dir: &Path) -> Child {
    spawn_child_as(test, dir, "")
}

/// [`spawn_child`], with the child's part chosen by `role` (see [`child_part`]).
fn spawn_child_as(test: &str, dir: &Path, role: &str) -> Child {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("CRASHFS_CHILD_DIR", dir)
        .env("CRASHFS_CHILD_ROLE", role)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        if line.unwrap().trim_end().ends_with("ready") {
            return child;
        }
    }
    panic!("the child ended before it was ready: {:?}", child.wait());
}

/// The child's part: a brand-new journal in `CRASHFS_CHILD_DIR`, ten records, one sync; then it
/// waits for the power cut. With `CRASHFS_CHILD_ROLE=unsynced` an eleventh record follows,
/// written and never synced (what a process that crashes leaves in the page cache); with
/// `reopen` the child opens the journal that is there and reads it as the uplink would.
/// Returns whether this process is the child.
fn child_part() -> bool {
    let Some(dir) = std::env::var_os("CRASHFS_CHILD_DIR") else {
        return false;
    };
    let role = std::env::var("CRASHFS_CHILD_ROLE").unwrap_or_default();
    let j = Journal::open(&opts(Path::new(&dir))).unwrap();
    if role == "reopen" {
        let entries = j.read_batch(None, 100, u64::MAX).unwrap();
        assert_eq!(entries.len(), 11, "{entries:?}");
    } else {
        j.append(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
        j.sync().unwrap();
        if role == "unsynced" {
            j.append(&[rec(10)]).unwrap();
        }
    }
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
    true
}

/// Cuts the power while the child holds its journal, and checks what comes back.
fn cut_and_check(fs: &CrashFs, test: &str, dir: &Path, cut: &str) {
    let mut child = spawn_child(test, dir);
    fs.send(cut).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    fs.send("remount").unwrap();

    assert_journal_holds(dir, 10, cut);
}

/// Opens the journal in `dir` and checks that it holds `n` records and its head is seq `n`.
fn assert_journal_holds(dir: &Path, n: usize, what: &str) {
    let j = Journal::open(&opts(dir)).unwrap();
    let entries = j.read_batch(None, 100, u64::MAX).unwrap();
    let records = entries
        .iter()
        .filter(|e| matches!(e, Entry::Record(_)))
        .count();
    assert_eq!(
        records, n,
        "{what}: every synced record is back: {entries:?}"
    );
    assert_eq!(j.positions().head_seq, n as u64, "{what}");
}

/// Regression: ferry created `journal.dir` without syncing the directory holding it. A power cut
/// after the first synced (and so PUBACKed) records lost the whole journal, seq mark included:
/// seqs started again at 1, and the cloud refused them as clashes with the old seqs, forever.
#[test]
fn a_new_journal_survives_a_power_cut_right_after_its_first_sync() {
    if child_part() {
        return;
    }
    let fs = CrashFs::start();
    let dir = fs.mnt.join("var/lib/ferry");
    cut_and_check(
        &fs,
        "a_new_journal_survives_a_power_cut_right_after_its_first_sync",
        &dir,
        "cut",
    );
}

/// Regression: sled creates `conf`, `db` and `blobs/` in the database directory (and the layout
/// creates `db-1/` itself) without syncing their directories; with `journal.dir` made durably
/// beforehand (by an installer), a power cut still took sled's files back and every record.
#[test]
fn a_journal_in_a_prepared_directory_survives_a_power_cut_right_after_its_first_sync() {
    if child_part() {
        return;
    }
    let fs = CrashFs::start();
    let dir = fs.mnt.join("journal");
    std::fs::create_dir(&dir).unwrap();
    std::fs::File::open(&fs.mnt).unwrap().sync_all().unwrap();
    std::fs::File::open(&dir).unwrap().sync_all().unwrap();
    cut_and_check(
        &fs,
        "a_journal_in_a_prepared_directory_survives_a_power_cut_right_after_its_first_sync",
        &dir,
        "cut",
    );
}

/// Regression: sled writes its `conf` file (two writes: the settings, then their CRC) and never
/// syncs it. A power cut that kept only part of it made sled refuse the database as corrupt
/// ("Read corrupted data"); ferry moved it aside and reported every unsent record as
/// `journal_lost`. Found by `make torture` (seed 42, a cut during compaction). Each seed keeps
/// a different random prefix of every file's unsynced writes.
#[test]
fn a_journal_survives_power_cuts_that_keep_part_of_the_unsynced_writes() {
    if child_part() {
        return;
    }
    let fs = CrashFs::start();
    for seed in 1..=8 {
        let dir = fs.mnt.join(format!("journal-{seed}"));
        cut_and_check(
            &fs,
            "a_journal_survives_power_cuts_that_keep_part_of_the_unsynced_writes",
            &dir,
            &format!("cut --keep-prefix-seed {seed}"),
        );
    }
}

/// Regression (issue 11, hole 1): a crash leaves the frames written since the last sync in the
/// page cache, readable and CRC-valid but not on disk. A journal opened on them counted them
/// durable without a single `fdatasync` (uploads, PUBACKs of redeliveries), and a power cut
/// later took them, with seqs the cloud had seen. Now the open syncs them first.
#[test]
fn frames_a_crash_left_in_the_page_cache_survive_a_later_power_cut() {
    if child_part() {
        return;
    }
    const TEST: &str = "frames_a_crash_left_in_the_page_cache_survive_a_later_power_cut";
    let fs = CrashFs::start();
    let dir = fs.mnt.join("journal");
    // The crash: SIGKILL with the power on.
    let mut writer = spawn_child_as(TEST, &dir, "unsynced");
    writer.kill().unwrap();
    writer.wait().unwrap();
    // The restarted agent opens the journal and reads all eleven records as durable...
    let mut reader = spawn_child_as(TEST, &dir, "reopen");
    // ...and then the power goes.
    fs.send("cut").unwrap();
    reader.kill().unwrap();
    reader.wait().unwrap();
    fs.send("remount").unwrap();

    assert_journal_holds(&dir, 11, "what was read as durable");
}

/// Regression (CI, `make torture` seed 1796297858908061968: an agent exit at an `eio` cut during a
/// compaction): when the first sync of the new sled generation failed, the compaction returned
/// early and dropped that database; sled's own close then `fsync`ed its file, met the same
/// writeback error on its descriptor and panicked, killing the journal writer. Now the
/// compaction fails as an error, the reopen after it repairs, and the synced records survive a
/// power cut.
#[test]
fn a_failed_sync_of_a_new_sled_generation_is_an_error_not_a_panic() {
    let fs = CrashFs::start();
    let dir = fs.mnt.join("journal");
    let j = Journal::open(&opts(&dir)).unwrap();
    j.append(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
    j.sync().unwrap();
    j.ack(6).unwrap();
    // The cursor goes back (a write to sled that the next sync makes durable); that sync of
    // sled's file fails, and so will the first sync of the generation the reopen compacts into.
    fs.send("fail-fsync journal/db-1/db").unwrap();
    fs.send("fail-fsync journal/db-2/db").unwrap();
    let rewound = j.rewind_to(5);
    assert!(
        rewound.is_err(),
        "the injected EIO is reported: {rewound:?}"
    );
    let failed = j.reopen();
    assert!(
        failed.is_err(),
        "the new generation's failed sync fails the compaction: {failed:?}"
    );
    // Both faults are spent: the next reopen compacts and opens.
    j.reopen().unwrap();
    assert_eq!(j.positions().acked_seq, 4);
    j.sync().unwrap();
    drop(j);
    fs.send("cut").unwrap();
    fs.send("remount").unwrap();

    let j = Journal::open(&opts(&dir)).unwrap();
    let p = j.positions();
    assert_eq!(
        (p.head_seq, p.acked_seq),
        (10, 4),
        "the rewound cursor is durable"
    );
    let seqs: Vec<u64> = j
        .read_batch(None, 100, u64::MAX)
        .unwrap()
        .iter()
        .map(Entry::last_seq)
        .collect();
    assert_eq!(seqs, (5..=10).collect::<Vec<_>>());
}
