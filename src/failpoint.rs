//! Test failpoints, as sled's `failpoints` feature but read from the environment so that tests can
//! drive the real binary: `FERRY_FAILPOINT` holds a comma-separated list of `name` or
//! `name=value` entries, e.g. `FERRY_FAILPOINT=slow_sync_ms=300,ingest_overflow=50`. Unset in
//! production; each is read once where it is used, never on a hot path.
//!
//! | failpoint | where | effect |
//! |---|---|---|
//! | `crash_after_sync` | ingest | abort after the first durable append, before any PUBACK |
//! | `slow_sync_ms=N` | ingest | every group commit takes N ms longer (a slow SD card) |
//! | `hold_pubacks` | ingest | no PUBACK is ever sent |
//! | `ingest_overflow=N` | ingest | at most N messages wait for the journal writer (not 10,000) |
//! | `console_panic` | console | the console thread panics at the next command line |
//! | `replace_after_backup`, `replace_before_rename`, `replace_after_rename` | atomic_file | abort at that step of replacing a file |

/// The value of failpoint `name`: `Some("")` when it is set without one, `None` when not set.
pub fn value(name: &str) -> Option<String> {
    let list = std::env::var("FERRY_FAILPOINT").ok()?;
    lookup(&list, name).map(str::to_owned)
}

/// Whether failpoint `name` is set.
pub fn is_set(name: &str) -> bool {
    value(name).is_some()
}

/// The numeric value of failpoint `name`; `None` when not set or not a number.
pub fn number(name: &str) -> Option<u64> {
    value(name).and_then(|v| v.parse().ok())
}

fn lookup<'a>(list: &'a str, name: &str) -> Option<&'a str> {
    list.split(',')
        .map(str::trim)
        .find_map(|entry| match entry.split_once('=') {
            Some((n, v)) if n == name => Some(v),
            None if entry == name => Some(""),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn entries_are_found_by_name_with_or_without_a_value() {
        let list = "slow_sync_ms=300, hold_pubacks,ingest_overflow=50";
        assert_eq!(lookup(list, "slow_sync_ms"), Some("300"));
        assert_eq!(lookup(list, "hold_pubacks"), Some(""));
        assert_eq!(lookup(list, "ingest_overflow"), Some("50"));
        assert_eq!(lookup(list, "slow_sync"), None);
        assert_eq!(lookup(list, "crash_after_sync"), None);
        assert_eq!(lookup("", "x"), None);
    }
}
