//! systemd's service notifications (sd_notify(3)) in plain std, and the watchdog policy of the
//! agent's main loop.
//!
//! Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); with `WatchdogSec=` also `WATCHDOG_USEC` (and `WATCHDOG_PID`). The agent sends
//! `READY=1` once its threads run, `WATCHDOG=1` every half watchdog period while healthy, and
//! `STOPPING=1` when shutdown begins. Without `NOTIFY_SOCKET` nothing is sent.
//!
//! Healthy means: every agent thread is alive (the main loop already shuts down when one dies)
//! and the journal writer is making progress, i.e. its loop, which turns at least every 250 ms
//! when idle, failing or full, went round within the last watchdog period. A writer stuck in an
//! fsync or a sled call for a whole period withholds the pings, and systemd restarts the agent
//! (`Restart=always`); the broker keeps everything not yet acked.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOTIFY_SOCKET={value:?} is not a socket path or an @abstract name")]
    Address {
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a socket for systemd notifications")]
    Socket(#[source] std::io::Error),
    #[error("cannot send {state:?} to NOTIFY_SOCKET={socket:?}")]
    Send {
        state: String,
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for messages.
    name: String,
    watchdog: Option<Duration>,
}

/// How long one notification may block (systemd reads its socket at once; a full queue means it
/// is busy, and the main loop must not stall on it).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

impl Notifier {
    /// The notifier systemd asked for, or `None` when ferry does not run under `Type=notify`.
    pub fn from_env() -> Result<Option<Notifier>, Error> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let name = name.to_string_lossy().into_owned();
        if name.is_empty() {
            return Ok(None);
        }
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        }
        .map_err(|source| Error::Address {
            value: name.clone(),
            source,
        })?;
        let socket = UnixDatagram::unbound().map_err(Error::Socket)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(Error::Socket)?;
        Ok(Some(Notifier {
            socket,
            addr,
            name,
            watchdog: watchdog_from(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
        }))
    }

    /// The watchdog timeout systemd enforces on this process, if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification (`READY=1`, `WATCHDOG=1`, `STATUS=...`; newline-separated
    /// assignments may be combined).
    pub fn send(&self, state: &str) -> Result<(), Error> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| Error::Send {
                state: state.to_string(),
                socket: self.name.clone(),
                source,
            })
    }
}

/// The watchdog timeout from `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another process or the
/// value is not a positive number of microseconds.
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// What the main loop does on one turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Healthy, and half a period has passed since the last ping: send `WATCHDOG=1`.
    Ping,
    /// Nothing to send yet.
    Wait,
    /// The writer has not moved for a whole period (reported once per stall); no pings until it
    /// moves again.
    Stalled(Duration),
    /// The writer moved again after a stall; pinging resumes (this turn pings).
    Recovered,
}

/// The ping schedule and the writer-progress check, free of I/O. `beat` is a counter the journal
/// writer increments on every turn of its loop.
#[derive(Debug)]
pub struct WatchdogPolicy {
    timeout: Duration,
    last_ping: Option<Instant>,
    last_beat: u64,
    beat_moved_at: Instant,
    stalled: bool,
}

impl WatchdogPolicy {
    pub fn new(timeout: Duration, beat: u64, now: Instant) -> WatchdogPolicy {
        WatchdogPolicy {
            timeout,
            last_ping: None,
            last_beat: beat,
            beat_moved_at: now,
            stalled: false,
        }
    }

    pub fn tick(&mut self, beat: u64, now: Instant) -> Tick {
        if beat != self.last_beat {
            self.last_beat = beat;
            self.beat_moved_at = now;
            if self.stalled {
                self.stalled = false;
                self.last_ping = Some(now);
                return Tick::Recovered;
            }
        }
        let still = now.saturating_duration_since(self.beat_moved_at);
        if still >= self.timeout {
            if self.stalled {
                return Tick::Wait;
            }
            self.stalled = true;
            return Tick::Stalled(still);
        }
        let due = self
            .last_ping
            .is_none_or(|t| now.saturating_duration_since(t) >= self.timeout / 2);
        if due {
            self.last_ping = Some(now);
            Tick::Ping
        } else {
            Tick::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn watchdog_timeout_is_read_only_for_this_process() {
        assert_eq!(watchdog_from(Some("3000000"), None, 7), Some(3 * S));
        assert_eq!(watchdog_from(Some("3000000"), Some("7"), 7), Some(3 * S));
        assert_eq!(watchdog_from(Some("3000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
    }

    #[test]
    fn pings_every_half_period_while_the_writer_moves() {
        let t0 = Instant::now();
        let mut p = WatchdogPolicy::new(4 * S, 0, t0);
        assert_eq!(p.tick(1, t0), Tick::Ping);
        assert_eq!(p.tick(2, t0 + S), Tick::Wait);
        assert_eq!(p.tick(3, t0 + 2 * S), Tick::Ping);
        assert_eq!(p.tick(4, t0 + 3 * S), Tick::Wait);
        assert_eq!(p.tick(5, t0 + 4 * S), Tick::Ping);
    }

    #[test]
    fn a_writer_stuck_for_a_period_withholds_pings_until_it_moves() {
        let t0 = Instant::now();
        let mut p = WatchdogPolicy::new(4 * S, 0, t0);
        assert_eq!(p.tick(1, t0), Tick::Ping);
        assert_eq!(p.tick(1, t0 + 2 * S), Tick::Ping);
        assert_eq!(p.tick(1, t0 + 5 * S), Tick::Stalled(5 * S));
        assert_eq!(p.tick(1, t0 + 7 * S), Tick::Wait);
        assert_eq!(p.tick(1, t0 + 30 * S), Tick::Wait);
        assert_eq!(p.tick(2, t0 + 31 * S), Tick::Recovered);
        assert_eq!(p.tick(3, t0 + 32 * S), Tick::Wait);
        assert_eq!(p.tick(4, t0 + 33 * S), Tick::Ping);
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        let name = format!("ferry-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server.set_read_timeout(Some(5 * S)).unwrap();
        let n = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            addr,
            name: format!("@{name}"),
            watchdog: None,
        };
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}
