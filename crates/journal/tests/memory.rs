//! What opening a journal costs in resident memory, in a test binary of its own so that no other
//! test's allocations share the process.
#![allow(clippy::unwrap_used)]

use ferry_journal::{Journal, NewRecord, OnFull, Options, StoredFormat, default_replay_window};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// sled 0.34 allocates a static of about forty histograms of 65,536 counters each (21 MiB) the
/// first time a database opens, and with its default build writes every counter: 21 MiB resident
/// that nothing reads (its metrics are compiled out). Built with `miri_optimizations`, the same
/// vectors come zeroed from the allocator and stay untouched, so not resident. A gateway with
/// 512 MiB has better uses for 21 MiB; the bound here is far from both figures.
#[test]
fn opening_a_journal_does_not_make_sleds_unused_metrics_resident() {
    let dir = tempfile::tempdir().unwrap();
    let before = rss_kib();
    let j = Journal::open(&Options {
        dir: dir.path().to_path_buf(),
        max_bytes: 64 << 20,
        on_full: OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: default_replay_window(64 << 20),
        fixed_budget: None,
    })
    .unwrap();
    let records: Vec<NewRecord> = (0..100u32)
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
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "opening a journal and appending 100 records made {grown} KiB resident"
    );
}
