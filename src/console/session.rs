//! A console session on a [`Port`]: the PIN gate, the banner, then lines to the [`Shell`] until
//! `exit`; and the two ways sessions are served, the agent's `console` thread on a device
//! ([`spawn`]) and `ferry console` ([`standalone`]).

use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use sha2::{Digest as _, Sha256};

use super::Shell;
use super::line::{Echo, Editor, Event};
use super::tty::{Input, Port};
use crate::backoff::Backoff;
use crate::config::{Config, Secret};
use crate::operator::Operator;
use crate::shutdown::Shutdown;

/// How long one read waits before the loop looks at shutdown again.
const READ_TIMEOUT: Duration = Duration::from_millis(200);
/// Wrong PINs allowed before each further try waits.
const PIN_TRIES: u32 = 3;
const PIN_WAIT_FIRST: Duration = Duration::from_secs(10);
const PIN_WAIT_MAX: Duration = Duration::from_secs(300);

/// The PIN check of a session, with its wait after too many wrong PINs. One per console, so that
/// ending a session does not reset the count.
pub struct PinGate {
    sha256: Option<Secret>,
    wrong: u32,
    /// The wait after each wrong PIN past `PIN_TRIES`: doubling, exact.
    waits: Backoff,
    wait_until: Option<Instant>,
}

impl PinGate {
    pub fn new(sha256: Option<Secret>) -> PinGate {
        PinGate {
            sha256,
            wrong: 0,
            waits: Backoff::exact(PIN_WAIT_FIRST, PIN_WAIT_MAX),
            wait_until: None,
        }
    }

    pub fn required(&self) -> bool {
        self.sha256.is_some()
    }

    /// How long to wait before the next try may be made.
    pub fn wait_left(&self, now: Instant) -> Duration {
        self.wait_until
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Checks `pin`, counting wrong ones.
    pub fn check(&mut self, pin: &str, now: Instant) -> bool {
        let Some(want) = &self.sha256 else {
            return true;
        };
        let got: String = Sha256::digest(pin.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if constant_time_eq(got.as_bytes(), want.expose().as_bytes()) {
            self.wrong = 0;
            self.waits.reset();
            self.wait_until = None;
            return true;
        }
        self.wrong = self.wrong.saturating_add(1);
        if self.wrong >= PIN_TRIES {
            self.wait_until = Some(now + self.waits.next_delay());
        }
        false
    }
}

/// Compares without an early exit, so that the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// `exit` (or the PIN prompt abandoned).
    Exit,
    /// The line is gone: stdin closed, the device unplugged.
    Closed,
    Shutdown,
}

/// One session on `port`: the PIN if one is set, the banner, then commands until `exit`.
pub fn session(
    port: &mut Port,
    path: &Path,
    operator: &Operator,
    gate: &mut PinGate,
    shutdown: &Shutdown,
) -> End {
    let mut io = Session {
        editor: Editor::new(if port.echo { Echo::On } else { Echo::Off }),
        newline: if port.echo { "\r\n" } else { "\n" },
        port,
        pending: Vec::new(),
        pos: 0,
    };
    if gate.required() {
        match io.pin(gate, shutdown) {
            Ok(()) => {}
            Err(end) => return end,
        }
    }
    let mut shell = match Shell::new(path, operator.clone()) {
        Ok(s) => s,
        Err(e) => {
            io.write(&format!("cannot read the configuration: {e}\n"));
            return End::Exit;
        }
    };
    let mut id = shell.device_id();
    io.write(&format!(
        "ferry {} console, device {id}. Type help for commands.\n",
        env!("CARGO_PKG_VERSION")
    ));
    if shell.running.is_none() {
        io.write("the configuration file does not validate: show, set and unset can repair it\n");
    }
    loop {
        io.write(&shell.prompt(&id));
        let line = match io.line(shutdown) {
            Ok(l) => l,
            Err(end) => return end,
        };
        // Test failpoint: a command line kills the thread, as a bug would (the agent's thread watch).
        if crate::failpoint::is_set("console_panic") {
            panic!("failpoint console_panic");
        }
        let r = shell.execute(&line);
        io.write(&r.text);
        if r.exit {
            return End::Exit;
        }
        if line.trim_start().starts_with("save") || line.trim() == "yes" {
            id = shell.device_id();
        }
    }
}

struct Session<'a> {
    port: &'a mut Port,
    editor: Editor,
    newline: &'static str,
    /// Bytes read and not yet fed to the editor, from `pos` on.
    pending: Vec<u8>,
    pos: usize,
}

impl Session<'_> {
    fn write(&mut self, text: &str) {
        let text = text.replace('\n', self.newline);
        // A line that takes nothing for seconds has no one listening; the next prompt tries again.
        let _ = self.port.write_all(text.as_bytes());
    }

    /// Reads until a line is complete; answers line noise itself. Bytes after a line end stay for
    /// the next call, so nothing typed ahead is lost.
    fn line(&mut self, shutdown: &Shutdown) -> Result<String, End> {
        let mut echo = Vec::new();
        loop {
            while self.pos < self.pending.len() {
                let byte = self.pending[self.pos];
                self.pos += 1;
                let Some(event) = self.editor.feed(byte, &mut echo) else {
                    continue;
                };
                let _ = self.port.write_all(&echo);
                let message = match event {
                    Event::Line(l) => return Ok(l),
                    Event::Interrupt => "",
                    Event::TooLong => "line too long: ignored\n",
                    Event::Garbage => "unreadable characters (line noise?): ignored\n",
                };
                self.write(message);
                return Ok(String::new());
            }
            let _ = self.port.write_all(&echo);
            echo.clear();
            if shutdown.is_set() {
                return Err(End::Shutdown);
            }
            self.pending.resize(512, 0);
            self.pos = 0;
            let n = match self.port.read(&mut self.pending, READ_TIMEOUT) {
                Ok(Input::Bytes(n)) => n,
                Ok(Input::Idle) => 0,
                Ok(Input::Closed) => return Err(End::Closed),
                Err(e) => {
                    warn!("console read failed: {}", e);
                    return Err(End::Closed);
                }
            };
            self.pending.truncate(n);
        }
    }

    fn pin(&mut self, gate: &mut PinGate, shutdown: &Shutdown) -> Result<(), End> {
        loop {
            let left = gate.wait_left(Instant::now());
            if !left.is_zero() {
                self.write(&format!(
                    "too many wrong PINs: wait {} s before the next try\n",
                    left.as_millis().div_ceil(1000)
                ));
                let end = Instant::now() + left;
                while Instant::now() < end {
                    if !shutdown.sleep(READ_TIMEOUT) {
                        return Err(End::Shutdown);
                    }
                }
                self.port.discard_input();
                self.pos = self.pending.len();
            }
            self.write("PIN: ");
            if self.editor_echo() == Echo::On {
                self.editor.set_echo(Echo::Masked);
            }
            let pin = self.line(shutdown);
            if self.editor_echo() == Echo::Masked {
                self.editor.set_echo(Echo::On);
            }
            let pin = pin?;
            if pin.is_empty() {
                continue;
            }
            if gate.check(&pin, Instant::now()) {
                return Ok(());
            }
            warn!("console: wrong PIN");
            self.write("wrong PIN\n");
        }
    }

    fn editor_echo(&self) -> Echo {
        self.editor.echo()
    }
}

/// Starts the agent's `console` thread on `device`. It serves one session after another; when the
/// device cannot be opened (a USB-serial adapter not plugged in yet) it tries again every few
/// seconds.
pub fn spawn(
    device: PathBuf,
    cfg: Config,
    operator: Operator,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("console".into())
        .spawn(move || serve_device(&device, &cfg, &operator, &shutdown))
}

fn serve_device(device: &Path, cfg: &Config, operator: &Operator, shutdown: &Shutdown) {
    let mut gate = PinGate::new(cfg.console.pin_sha256.clone());
    let mut warned = false;
    while !shutdown.is_set() {
        let mut port = match Port::open(device, cfg.console.baud) {
            Ok(p) => p,
            Err(e) => {
                if !warned {
                    warn!(
                        "console device {} cannot be opened: {}; trying again every 5 s",
                        device.display(),
                        e
                    );
                    warned = true;
                }
                shutdown.sleep(Duration::from_secs(5));
                continue;
            }
        };
        warned = false;
        info!(
            "console serving device={} baud={}",
            device.display(),
            cfg.console.baud
        );
        loop {
            match session(&mut port, &cfg.source, operator, &mut gate, shutdown) {
                End::Exit => continue,
                End::Shutdown => return,
                End::Closed => {
                    // Hung up or unplugged: open it again after a pause.
                    shutdown.sleep(Duration::from_secs(1));
                    break;
                }
            }
        }
    }
}

/// `ferry console`: one session on `device`, or on stdin/stdout.
pub fn standalone(config: &Path, device: Option<&Path>) -> Result<(), String> {
    let cfg = Config::load(config).ok();
    let mut port = match device {
        Some(d) => Port::open(d, cfg.as_ref().map_or(115_200, |c| c.console.baud))
            .map_err(|e| format!("cannot open {}: {e}", d.display()))?,
        None => Port::stdio().map_err(|e| format!("cannot set up the terminal: {e}"))?,
    };
    let operator = Operator::remote(
        config,
        cfg.as_ref().map(|c| c.control.listen),
        cfg.as_ref()
            .and_then(|c| crate::control::token(c, false).ok()),
    );
    let mut gate = PinGate::new(cfg.and_then(|c| c.console.pin_sha256));
    // SIGTERM ends the session through the normal path, so the terminal's settings are restored.
    let shutdown = Shutdown::new();
    shutdown
        .install_signal_handlers()
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    session(&mut port, config, &operator, &mut gate, &shutdown);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(pin: &str) -> Secret {
        Secret::new(
            Sha256::digest(pin.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    #[test]
    fn the_pin_waits_after_three_wrong_tries_and_doubles() {
        let mut g = PinGate::new(Some(sha("1234")));
        let t0 = Instant::now();
        assert!(!g.check("1", t0));
        assert!(!g.check("2", t0));
        assert_eq!(g.wait_left(t0), Duration::ZERO);
        assert!(!g.check("3", t0));
        assert_eq!(g.wait_left(t0), PIN_WAIT_FIRST);
        assert!(!g.check("4", t0));
        assert_eq!(g.wait_left(t0), PIN_WAIT_FIRST * 2);
        for _ in 0..20 {
            g.check("x", t0);
        }
        assert_eq!(g.wait_left(t0), PIN_WAIT_MAX);
        assert!(g.check("1234", t0));
        assert_eq!(g.wait_left(t0), Duration::ZERO);
    }

    #[test]
    fn no_pin_configured_lets_anyone_in() {
        let mut g = PinGate::new(None);
        assert!(!g.required());
        assert!(g.check("", Instant::now()));
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
