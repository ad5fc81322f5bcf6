//! What opening a journal costs in resident memory, in a test binary of its own so that no other
//! test's allocations share the process.
#![allow(clippy::unwrap_used)]

mod common;

/// sled 0.34 allocates a static of about forty histograms of 65,536 counters each (21 MiB) the
/// first time a database opens, and with its default build writes every counter: 21 MiB resident
/// that nothing reads (its metrics are compiled out). Built with `miri_optimizations`, the same
/// vectors come zeroed from the allocator and stay untouched, so not resident. A gateway with
/// 512 MiB has better uses for 21 MiB; the bound here is far from both figures.
#[test]
fn opening_a_journal_does_not_make_sleds_unused_metrics_resident() {
    let dir = tempfile::tempdir().unwrap();
    let before = common::proc_self("status", "VmRSS:");
    let j = common::open(dir.path());
    j.append(&common::records(100)).unwrap();
    j.sync().unwrap();
    let grown = common::proc_self("status", "VmRSS:").saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "opening a journal and appending 100 records made {grown} KiB resident"
    );
}
