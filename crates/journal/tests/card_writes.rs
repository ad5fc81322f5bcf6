//! What the journal's small state costs the card, in a test binary of its own so that no other
//! test's writes share the process's count (`/proc/self/io` `write_bytes`).
#![allow(clippy::unwrap_used)]

mod common;

/// The uplink acks several times a second. sled 0.34 writes a page for every batch it applies, so
/// a cursor written at every ack cost the card more than the records did (measured at 1,000
/// msg/s: 19 MiB by sled's threads for 12.6 MiB by the writer). Acks now reach sled at most every
/// 5 s unless they free a segment: 200 acks in a row write the cursor once, not 200 times.
#[test]
fn a_run_of_acks_writes_the_cursor_to_sled_about_once() {
    // On the target directory's file system: tmpfs, where some systems keep /tmp, counts no writes.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let j = common::open(dir.path());
    j.append(&common::records(200)).unwrap();
    j.sync().unwrap();
    let before = common::proc_self("io", "write_bytes:");
    for seq in 1..=200 {
        j.read_batch(None, 1, 1 << 20).unwrap();
        assert!(j.ack(seq).unwrap());
    }
    let grown = common::proc_self("io", "write_bytes:") - before;
    assert!(
        grown <= 32 * 1024,
        "200 acks wrote {grown} bytes (a page per sled batch is 4 KiB)"
    );
    assert_eq!(j.positions().acked_seq, 200);
    // What was not written is written at close, and reopens as it was.
    drop(j);
    let j = common::open(dir.path());
    assert_eq!(j.positions().acked_seq, 200);
    assert_eq!(j.positions().backlog_records, 0);
}
