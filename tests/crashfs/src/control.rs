//! The control protocol of `ferry-crashfs`: one command per line on a Unix socket, one answer line
//! back (a JSON object, or `error: ...`).
//!
//! | command | effect |
//! |---|---|
//! | `stats` | counters: fsyncs, unsynced bytes, requests by kind, the last cut |
//! | `cut [--keep-prefix-seed N \| --tear-seed N]` | power off now: every request fails with EIO from here on, and the files hold what a power cut leaves |
//! | `remount` | unmount (waiting, up to 30 s, until no process uses the mount), power on, mount again |
//! | `slow-fsync MS` | every fsync/fdatasync from now on takes MS milliseconds |
//! | `dump DIR` | copy the current tree into the real directory DIR (forensics) |
//! | `quit` | unmount and exit |
//!
//! A power cut as the torture runner does it: `cut`, then SIGKILL every process using the mount,
//! then `remount`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::Cut;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Stats,
    Cut(Cut),
    Remount,
    SlowFsync(u64),
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
            ["slow-fsync", ms] => Ok(Command::SlowFsync(num(Some(ms), "slow-fsync")?)),
            ["dump", dir] => Ok(Command::Dump(PathBuf::from(dir))),
            ["quit"] => Ok(Command::Quit),
            _ => Err(format!(
                "unknown command {line:?} (stats | cut [--keep-prefix-seed N | --tear-seed N] | \
                 remount | slow-fsync MS | dump DIR | quit)"
            )),
        }
    }
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
            Command::SlowFsync(2000)
        );
        assert!(
            Command::parse("cut --tear-seed x")
                .unwrap_err()
                .contains("number")
        );
        assert!(Command::parse("explode").unwrap_err().contains("remount"));
    }
}
