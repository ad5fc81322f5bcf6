//! What the journal's single-test binaries share (each measures its own process, so each is a
//! binary of its own).
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

use ferry_journal::{Journal, NewRecord, OnFull, Options, StoredFormat, default_replay_window};

/// A 64 MiB journal with a 1 MiB cache in `dir`.
pub fn open(dir: &Path) -> Journal {
    Journal::open(&Options {
        dir: dir.to_path_buf(),
        max_bytes: 64 << 20,
        on_full: OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: default_replay_window(64 << 20),
        fixed_budget: None,
    })
    .unwrap()
}

/// `n` small text records on topic `t`.
pub fn records(n: u32) -> Vec<NewRecord> {
    (0..n)
        .map(|i| NewRecord {
            ts_ms: 1,
            topic: "t".into(),
            payload: i.to_string().into_bytes(),
            format: StoredFormat::Text,
            parse_error: false,
            mono: None,
            too_large: None,
            mqtt: None,
        })
        .collect()
}

/// A field of `/proc/self/<file>` (`VmRSS:` of `status`, `write_bytes:` of `io`) as a number.
pub fn proc_self(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/{file}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}
