//! What ferry's integration tests (`tests/util`), the torture runner (`tests/crashfs`) and the
//! benchmarks (`tests/bench`) share: a real mosquitto started the one way all three need, and the
//! process helpers around it. Errors are strings naming what failed; the integration tests unwrap
//! them, the runners report them.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, String>;

/// Whether something listens on 127.0.0.1:`port` (a connect within 200 ms).
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Polls `cond` every 10 ms until it holds (Ok) or `timeout` passes (Err naming `what`).
pub fn poll_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) -> Result<()> {
    poll_every(what, timeout, Duration::from_millis(10), cond)
}

/// Polls `cond` every `every` until it holds (Ok) or `timeout` passes (Err naming `what`).
pub fn poll_every(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

/// Sends signal `sig` (`"HUP"`, `"TERM"`) to `pid`.
pub fn signal_pid(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit; past that kills it and says
/// so. Does nothing when there is no child.
pub fn terminate(
    child: &mut Option<Child>,
    name: &str,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    let Some(mut c) = child.take() else {
        return Ok(None);
    };
    signal_pid(c.id(), "TERM");
    let end = Instant::now() + timeout;
    loop {
        match c.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!("{name} did not exit within {timeout:?} of SIGTERM"));
            }
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Debian's mosquitto is in /usr/sbin, which is not on every user's PATH.
pub fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// A real mosquitto on 127.0.0.1 with persistence in its directory, stopped when dropped.
pub struct Mosquitto {
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts mosquitto on `port` with persistence in `dir`, a queue large enough for any test
    /// (1,000,000 messages), packets up to 16 MiB, and `extra_conf` last (a later line overrides
    /// an earlier one, e.g. `max_inflight_messages`). Returns once it listens.
    ///
    /// Started as root, mosquitto drops to the `mosquitto` user, which cannot write its
    /// persistence file in a temp dir: a session would silently vanish on restart. So as root it
    /// is told to stay root.
    pub fn start(dir: &Path, port: u16, extra_conf: &str) -> Result<Mosquitto> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let user = if is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {d}/\nmax_queued_messages 1000000\n\
                 max_packet_size 16777216\nlog_dest file {log}\n{extra_conf}\n",
                d = dir.display(),
                log = log.display()
            ),
        )
        .map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut m = Mosquitto {
            port,
            log,
            conf,
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start mosquitto (scripts/ensure-deps.sh installs it): {e}")
            })?;
        self.child = Some(child);
        let port = self.port;
        poll_until("mosquitto to listen", Duration::from_secs(10), || {
            port_open(port)
        })
    }

    /// Its process id while it runs (for `/proc/<pid>` figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it cleanly (it saves its persistence file).
    pub fn stop(&mut self) -> Result<()> {
        terminate(&mut self.child, "mosquitto", Duration::from_secs(10)).map(|_| ())
    }

    /// Stops it cleanly and starts it again on the same port with the same config.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
