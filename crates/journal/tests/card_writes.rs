//! What the journal's small state costs the card, in a test binary of its own so that no other
//! test's writes share the process's count (`/proc/self/io` `write_bytes`).
#![allow(clippy::unwrap_used)]

use ferry_journal::{Journal, NewRecord, OnFull, Options, StoredFormat, default_replay_window};

fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// The uplink acks several times a second. sled 0.34 writes a page for every batch it applies, so
/// a cursor written at every ack cost the card more than the records did (measured at 1,000
/// msg/s: 19 MiB by sled's threads for 12.6 MiB by the writer). Acks now reach sled at most every
/// 5 s unless they free a segment: 200 acks in a row write the cursor once, not 200 times.
#[test]
fn a_run_of_acks_writes_the_cursor_to_sled_about_once() {
    // On the target directory's file system: tmpfs, where some systems keep /tmp, counts no writes.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let j = Journal::open(&Options {
        dir: dir.path().to_path_buf(),
        max_bytes: 64 << 20,
        on_full: OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: default_replay_window(64 << 20),
        fixed_budget: None,
    })
    .unwrap();
    let records: Vec<NewRecord> = (0..200u32)
        .map(|i| NewRecord {
            ts_ms: 1,
            topic: "t".into(),
            payload: i.to_string().into_bytes(),
            format: StoredFormat::Text,
            parse_error: false,
            too_large: None,
            mqtt: None,
        })
        .collect();
    j.append(&records).unwrap();
    j.sync().unwrap();
    let before = written();
    for seq in 1..=200 {
        j.read_batch(None, 1, 1 << 20).unwrap();
        assert!(j.ack(seq).unwrap());
    }
    let grown = written() - before;
    assert!(
        grown <= 32 * 1024,
        "200 acks wrote {grown} bytes (a page per sled batch is 4 KiB)"
    );
    assert_eq!(j.positions().acked_seq, 200);
    // What was not written is written at close, and reopens as it was.
    drop(j);
    let j = Journal::open(&Options {
        dir: dir.path().to_path_buf(),
        max_bytes: 64 << 20,
        on_full: OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: default_replay_window(64 << 20),
        fixed_budget: None,
    })
    .unwrap();
    assert_eq!(j.positions().acked_seq, 200);
    assert_eq!(j.positions().backlog_records, 0);
}
