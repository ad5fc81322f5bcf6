//! The console's terminal: a serial device set to raw 8N1 at the configured speed without flow
//! control, or the process's stdin/stdout (`ferry console` over SSH). The only module that names
//! `rustix`'s termios. Every read waits at most the given timeout (poll), so the console thread sees
//! shutdown; every write has a deadline, so a stalled line never blocks the shell.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::termios::{
    ControlModes, InputModes, OptionalActions, SpecialCodeIndex, Termios, isatty, tcgetattr,
    tcsetattr,
};

/// How long a write may wait for a stalled line before its bytes are dropped.
const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// What a read brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Bytes(usize),
    /// Nothing within the timeout.
    Idle,
    /// The other end is gone: stdin closed, the device unplugged or hung up.
    Closed,
}

pub struct Port {
    input: File,
    output: File,
    /// Terminal settings to restore on drop (stdin of an interactive `ferry console`).
    restore: Option<(OwnedFd, Termios)>,
    /// Whether the shell should echo what is typed (a terminal in raw mode) or not (a pipe).
    pub echo: bool,
}

impl Port {
    /// Opens a serial device and sets it to raw 8N1 at `baud`, no flow control.
    pub fn open(path: &Path, baud: u32) -> io::Result<Port> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // No controlling terminal; do not wait for a carrier.
            .custom_flags((rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(path)?;
        let mut t = tcgetattr(&file)?;
        t.make_raw();
        t.set_speed(baud)?;
        t.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
        t.control_modes -= ControlModes::CRTSCTS | ControlModes::CSTOPB | ControlModes::PARENB;
        t.input_modes -= InputModes::IXON | InputModes::IXOFF | InputModes::IXANY;
        t.special_codes[SpecialCodeIndex::VMIN] = 0;
        t.special_codes[SpecialCodeIndex::VTIME] = 0;
        tcsetattr(&file, OptionalActions::Now, &t)?;
        let output = file.try_clone()?;
        Ok(Port {
            input: file,
            output,
            restore: None,
            echo: true,
        })
    }

    /// The process's stdin and stdout. A terminal on stdin is put in raw mode (restored on drop)
    /// and echoed by the shell; a pipe is read as it comes, without echo.
    pub fn stdio() -> io::Result<Port> {
        let input = File::from(rustix::io::dup(io::stdin().as_fd())?);
        let output = File::from(rustix::io::dup(io::stdout().as_fd())?);
        let mut restore = None;
        if isatty(&input) {
            let saved = tcgetattr(&input)?;
            let mut raw = saved.clone();
            raw.make_raw();
            tcsetattr(&input, OptionalActions::Now, &raw)?;
            restore = Some((rustix::io::dup(&input)?, saved));
        }
        let echo = restore.is_some();
        Ok(Port {
            input,
            output,
            restore,
            echo,
        })
    }

    /// Reads what is there, waiting at most `timeout` for something.
    pub fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Input> {
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(&self.input, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(Input::Idle),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Input::Idle),
            Err(e) => return Err(e.into()),
        }
        let revents = fds[0].revents();
        if !revents.contains(PollFlags::IN)
            && revents.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
        {
            return Ok(Input::Closed);
        }
        match self.input.read(buf) {
            Ok(0) => Ok(Input::Closed),
            Ok(n) => Ok(Input::Bytes(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Input::Idle)
            }
            // A pty whose other end closed, a USB-serial adapter pulled out.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                Ok(Input::Closed)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes all of `bytes`, waiting for a stalled line at most [`WRITE_DEADLINE`]; what cannot be
    /// written by then is dropped (an error).
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        while !bytes.is_empty() {
            match self.output.write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    let ts = Timespec::try_from(left.min(Duration::from_millis(200)))
                        .unwrap_or_default();
                    let mut fds = [PollFd::new(&self.output, PollFlags::OUT)];
                    let _ = poll(&mut fds, Some(&ts));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Drops input that arrived but was not read (e.g. typed during a PIN wait).
    pub fn discard_input(&mut self) {
        let mut buf = [0u8; 256];
        // Bounded: a line that never stops talking must not hold the shell here.
        for _ in 0..64 {
            if !matches!(self.read(&mut buf, Duration::ZERO), Ok(Input::Bytes(_))) {
                break;
            }
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Some((fd, saved)) = &self.restore {
            let _ = tcsetattr(fd, OptionalActions::Now, saved);
        }
    }
}
