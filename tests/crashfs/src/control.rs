//! The control protocol of `ferry-crashfs`: one command per line on a Unix socket, one answer line
//! back (a JSON object, or `error: ...`).
//!
//! | command | effect |
//! |---|---|
//! | `stats` | counters: fsyncs, unsynced bytes, requests by kind, the last cut, fsyncs in flight now (`fsyncs_in_flight`) and at most since start (`max_fsyncs_in_flight`; of one regular file: `max_fsyncs_in_flight_one_file`, and that file's `max_fsyncs_in_flight_one_file_path`), injected writeback errors (`eio_injected`), EIOs fsyncs returned for them (`eio_reported`), open file handles (`open_handles`), armed faults (`faults_armed`) |
//! | `cut [--keep-prefix-seed N \| --tear-seed N]` | power off now: every request fails with EIO from here on, and the files hold what a power cut leaves |
//! | `remount` | unmount (waiting, up to 30 s, until no process uses the mount), power on, mount again |
//! | `slow-fsync MS [--jitter SEED] [--only PATTERN]` | every fsync/fdatasync/fsyncdir from now on takes MS milliseconds; with `--jitter`, each one takes its own delay in 0..=MS drawn from a generator seeded with SEED, so that syncs from several threads overlap and finish out of order; with `--only`, only syncs of files whose path contains PATTERN are slow (the others are not delayed). `slow-fsync 0` ends it |
//! | `fail-fsync PATTERN [--nth N] [--times K]` | arm a fault: of the coming fsync/fdatasync calls on regular files (not fsyncdir) whose path relative to the mount root contains PATTERN, the N-th (default 1: the next one) fails with EIO, and so do the K-1 (default K = 1) matching calls right after it. A failing call is a writeback error of the file, as on Linux: its unsynced changes are dropped (reads still show them until the next cut, but neither a later fsync nor a cut makes them durable), and the error is reported once to every open file description (`errseq_t`, Linux >= 4.16): the failing call gets EIO, so does an fsync of the file already in flight, and so does the next fsync/fdatasync through every other description open at the failure, or opened after it before any description reported it; such a call makes nothing durable. After reporting it, a description's fsyncs succeed and make durable what was written after the failure; one opened after the error was reported never sees it. Decided as the call starts; it still sleeps its `slow-fsync` delay. Several faults may be armed; each counts the calls it matches |
//! | `fail-fsync --clear` | disarm every fault |
//! | `dump DIR` | copy the current tree into the real directory DIR (forensics) |
//! | `quit` | unmount and exit |
//!
//! A power cut as the torture runner does it: `cut`, then SIGKILL every process using the mount,
//! then `remount`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fs::FsyncFault;
use crate::model::Cut;

/// Every command, for error messages.
const USAGE: &str = "stats | cut [--keep-prefix-seed N | --tear-seed N] | remount | \
                     slow-fsync MS [--jitter SEED] [--only PATTERN] | \
                     fail-fsync PATTERN [--nth N] [--times K] | \
                     fail-fsync --clear | dump DIR | quit";
const SLOW_FSYNC_USAGE: &str = "slow-fsync MS [--jitter SEED] [--only PATTERN]";
const FAIL_FSYNC_USAGE: &str = "fail-fsync PATTERN [--nth N] [--times K] | fail-fsync --clear";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Stats,
    Cut(Cut),
    Remount,
    SlowFsync {
        ms: u64,
        jitter_seed: Option<u64>,
        /// Only syncs of paths containing this are slowed.
        only: Option<String>,
    },
    FailFsync(FsyncFault),
    ClearFsyncFaults,
    Dump(PathBuf),
    Quit,
}

impl Command {
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |w: Option<&&str>, what: &str| -> Result<u64, String> {
            w.and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match words.as_slice() {
            ["stats"] => Ok(Command::Stats),
            ["cut"] => Ok(Command::Cut(Cut::DiscardAll)),
            ["cut", "--keep-prefix-seed", n] => Ok(Command::Cut(Cut::KeepPrefix(num(
                Some(n),
                "--keep-prefix-seed",
            )?))),
            ["cut", "--tear-seed", n] => Ok(Command::Cut(Cut::Tear(num(Some(n), "--tear-seed")?))),
            ["remount"] => Ok(Command::Remount),
            ["slow-fsync", rest @ ..] => parse_slow_fsync(rest),
            ["fail-fsync", "--clear"] => Ok(Command::ClearFsyncFaults),
            ["fail-fsync", rest @ ..] => parse_fail_fsync(rest),
            ["dump", dir] => Ok(Command::Dump(PathBuf::from(dir))),
            ["quit"] => Ok(Command::Quit),
            _ => Err(format!("unknown command {line:?} (allowed: {USAGE})")),
        }
    }
}

/// `slow-fsync MS [--jitter SEED] [--only PATTERN]`, after the command word.
fn parse_slow_fsync(words: &[&str]) -> Result<Command, String> {
    let bad = |why: &str| format!("slow-fsync: {why} (allowed: {SLOW_FSYNC_USAGE})");
    let (words, only) = match words {
        [rest @ .., "--only", pattern] if !pattern.starts_with("--") => {
            (rest, Some((*pattern).to_string()))
        }
        _ => (words, None),
    };
    let (ms, jitter) = match words {
        [ms] => (ms, None),
        [ms, "--jitter", seed] => (ms, Some(seed)),
        [] => return Err(bad("MS is required")),
        _ => return Err(bad(&format!("unexpected arguments {:?}", words.join(" ")))),
    };
    let ms = ms.parse().map_err(|_| bad("MS needs a number"))?;
    let jitter_seed = match jitter {
        Some(seed) => Some(seed.parse().map_err(|_| bad("--jitter needs a number"))?),
        None => None,
    };
    Ok(Command::SlowFsync {
        ms,
        jitter_seed,
        only,
    })
}

/// `fail-fsync PATTERN [--nth N] [--times K]`, after the command word.
fn parse_fail_fsync(words: &[&str]) -> Result<Command, String> {
    let bad = |why: &str| format!("fail-fsync: {why} (allowed: {FAIL_FSYNC_USAGE})");
    let [pattern, options @ ..] = words else {
        return Err(bad("PATTERN is required"));
    };
    if *pattern == "--clear" {
        return Err(bad("--clear takes no other argument"));
    }
    if pattern.starts_with("--") {
        return Err(bad(&format!("PATTERN comes first, not {pattern:?}")));
    }
    let (mut nth, mut times) = (None, None);
    let mut it = options.iter();
    while let Some(flag) = it.next() {
        let slot = match *flag {
            "--nth" => &mut nth,
            "--times" => &mut times,
            other => return Err(bad(&format!("unexpected argument {other:?}"))),
        };
        if slot.is_some() {
            return Err(bad(&format!("{flag} given twice")));
        }
        let n = it
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad(&format!("{flag} needs a number >= 1")))?;
        *slot = Some(n);
    }
    Ok(Command::FailFsync(FsyncFault {
        pattern: (*pattern).to_string(),
        nth: nth.unwrap_or(1),
        times: times.unwrap_or(1),
    }))
}

/// Sends one command to the control socket at `sock` and returns the answer line; an `error: `
/// answer becomes an `Err`. `timeout` bounds the whole exchange.
pub fn request(sock: &Path, line: &str, timeout: Duration) -> Result<String, String> {
    let what = |e: std::io::Error| format!("control socket {}: {e}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(what)?;
    s.set_read_timeout(Some(timeout)).map_err(what)?;
    s.set_write_timeout(Some(timeout)).map_err(what)?;
    writeln!(s, "{line}").map_err(what)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(what)?;
    let answer = answer.trim_end().to_string();
    match answer.strip_prefix("error: ") {
        Some(e) => Err(format!("{line}: {e}")),
        None if answer.is_empty() => Err(format!("{line}: no answer")),
        None => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!(
            Command::parse("cut").unwrap(),
            Command::Cut(Cut::DiscardAll)
        );
        assert_eq!(
            Command::parse("cut --keep-prefix-seed 7").unwrap(),
            Command::Cut(Cut::KeepPrefix(7))
        );
        assert_eq!(
            Command::parse(" slow-fsync 2000 ").unwrap(),
            Command::SlowFsync {
                ms: 2000,
                jitter_seed: None,
                only: None,
            }
        );
        assert!(
            Command::parse("cut --tear-seed x")
                .unwrap_err()
                .contains("number")
        );
        assert!(Command::parse("explode").unwrap_err().contains("remount"));
    }

    #[test]
    fn slow_fsync_takes_an_optional_jitter_seed() {
        assert_eq!(
            Command::parse("slow-fsync 300 --jitter 7").unwrap(),
            Command::SlowFsync {
                ms: 300,
                jitter_seed: Some(7),
                only: None,
            }
        );
        assert_eq!(
            Command::parse("slow-fsync 1500 --only journal/log/").unwrap(),
            Command::SlowFsync {
                ms: 1500,
                jitter_seed: None,
                only: Some("journal/log/".into()),
            }
        );
        assert!(Command::parse("slow-fsync 1500 --only").is_err());
        for bad in [
            "slow-fsync",
            "slow-fsync x",
            "slow-fsync 300 --jitter",
            "slow-fsync 300 --jitter x",
            "slow-fsync 300 --jiter 7",
            "slow-fsync 300 --jitter 7 8",
        ] {
            let e = Command::parse(bad).unwrap_err();
            assert!(
                e.starts_with("slow-fsync: ") && e.contains("slow-fsync MS [--jitter SEED]"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn fail_fsync_parses_pattern_nth_times_and_clear() {
        let fault = |pattern: &str, nth, times| {
            Command::FailFsync(FsyncFault {
                pattern: pattern.into(),
                nth,
                times,
            })
        };
        assert_eq!(
            Command::parse("fail-fsync fileA").unwrap(),
            fault("fileA", 1, 1)
        );
        assert_eq!(
            Command::parse("fail-fsync db/conf --nth 3").unwrap(),
            fault("db/conf", 3, 1)
        );
        assert_eq!(
            Command::parse("fail-fsync snap. --times 2 --nth 4").unwrap(),
            fault("snap.", 4, 2)
        );
        assert_eq!(
            Command::parse("fail-fsync --clear").unwrap(),
            Command::ClearFsyncFaults
        );
        for (bad, why) in [
            ("fail-fsync", "PATTERN is required"),
            ("fail-fsync --nth 2", "PATTERN comes first"),
            ("fail-fsync a --nth", "--nth needs a number >= 1"),
            ("fail-fsync a --nth 0", "--nth needs a number >= 1"),
            ("fail-fsync a --times x", "--times needs a number >= 1"),
            ("fail-fsync a --nth 1 --nth 2", "--nth given twice"),
            ("fail-fsync a b", "unexpected argument \"b\""),
            ("fail-fsync --clear a", "--clear takes no other argument"),
        ] {
            let e = Command::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.contains("fail-fsync PATTERN [--nth N] [--times K] | fail-fsync --clear"),
                "{bad}: {e}"
            );
            assert!(e.starts_with("fail-fsync: "), "{bad}: {e}");
        }
        let unknown = Command::parse("fail-sync a").unwrap_err();
        assert!(unknown.contains("fail-fsync --clear") && unknown.contains("--jitter SEED"));
    }
}
