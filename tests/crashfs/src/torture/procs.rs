//! The processes of a torture run, each a child with a guard that kills it on drop: the
//! crash-test filesystem, mosquitto, `ferry-cloud` and `ferry`. Every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control;

pub use ferry_testkit::{Mosquitto, Result, poll_until as wait_until};
use ferry_testkit::{port_open, terminate};

/// A binary built next to this one (`target/<profile>/`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("where am I: {e}"))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it first (make torture does)",
            path.display()
        ))
    }
}

pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// GET `path` on 127.0.0.1:`port` with a 10 s deadline; the body of a 200.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    let what = |e: std::io::Error| format!("GET :{port}{path}: {e}");
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .map_err(what)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(what)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(what)?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(what)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(what)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET :{port}{path}: no header end"))?;
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        return Err(format!(
            "GET :{port}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

// ---------------------------------------------------------------- crash-test filesystem

pub struct CrashFsProc {
    pub mountpoint: PathBuf,
    pub sock: PathBuf,
    child: Option<Child>,
}

impl CrashFsProc {
    pub fn start(dir: &Path) -> Result<CrashFsProc> {
        let mountpoint = dir.join("mnt");
        let sock = dir.join("crashfs.sock");
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        let log = std::fs::File::create(dir.join("crashfs.log"))
            .map_err(|e| format!("crashfs.log: {e}"))?;
        let child = Command::new(sibling("ferry-crashfs")?)
            .arg(&mountpoint)
            .arg("--control")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start ferry-crashfs: {e}"))?;
        let mut fs = CrashFsProc {
            mountpoint,
            sock,
            child: Some(child),
        };
        wait_until(
            "ferry-crashfs to mount (see crashfs.log)",
            Duration::from_secs(10),
            || fs.stats().is_ok_and(|s| s["mounted"] == true),
        )?;
        if let Some(Ok(Some(status))) = fs.child.as_mut().map(Child::try_wait) {
            return Err(format!("ferry-crashfs exited: {status}"));
        }
        Ok(fs)
    }

    pub fn send(&self, line: &str) -> Result<serde_json::Value> {
        let answer = control::request(&self.sock, line, Duration::from_secs(60))?;
        serde_json::from_str(&answer).map_err(|e| format!("{line}: bad answer {answer:?}: {e}"))
    }

    pub fn stats(&self) -> Result<serde_json::Value> {
        self.send("stats")
    }

    /// Unmounts and stops.
    pub fn quit(&mut self) -> Result<()> {
        self.send("quit")?;
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(30);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > end {
                    let _ = c.kill();
                    return Err("ferry-crashfs did not exit after quit".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for CrashFsProc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.send("quit");
            std::thread::sleep(Duration::from_millis(200));
            kill(&mut self.child);
            // A killed FUSE server leaves a dead mount behind; detach it.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------- mosquitto

/// mosquitto (see `ferry_testkit::Mosquitto`) on a free port with an in-flight window of
/// `max_inflight`, logging everything (the slow-fsync scenario reads its timeouts).
pub fn mosquitto(dir: &Path, max_inflight: u32) -> Result<Mosquitto> {
    Mosquitto::start(
        dir,
        free_port()?,
        &format!("max_inflight_messages {max_inflight}\nlog_type all"),
    )
}

// ---------------------------------------------------------------- ferry-cloud

pub struct Cloud {
    pub port: u16,
    child: Option<Child>,
}

impl Cloud {
    pub fn start(dir: &Path) -> Result<Cloud> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = free_port()?;
        let log =
            std::fs::File::create(dir.join("cloud.log")).map_err(|e| format!("cloud.log: {e}"))?;
        let mut child = Command::new(sibling("ferry-cloud")?)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start ferry-cloud: {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let cloud = Cloud {
            port,
            child: Some(child),
        };
        if !line.starts_with("listening on") {
            return Err(format!("ferry-cloud said {line:?}"));
        }
        Ok(cloud)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    pub fn device(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let v: serde_json::Value = serde_json::from_str(&http_get(self.port, "/v1/devices")?)
            .map_err(|e| format!("/v1/devices: {e}"))?;
        Ok(v["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["device_id"] == id).cloned()))
    }

    /// The stored records of `id` (deduplicated by seq at the cloud), as (seq, payload `n`).
    pub fn records(&self, id: &str) -> Result<Vec<(u64, Option<u64>)>> {
        let body = http_get(self.port, &format!("/v1/devices/{id}/records"))?;
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| format!("record {l:?}: {e}"))?;
                let seq = v["seq"]
                    .as_u64()
                    .ok_or_else(|| format!("record without seq: {l}"))?;
                Ok((seq, v["payload"]["n"].as_u64()))
            })
            .collect()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = terminate(&mut self.child, "ferry-cloud", Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------- ferry

pub struct Ferry {
    pub control_port: u16,
    pub log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    pub runs: u32,
    /// `FERRY_FAILPOINT` for the next starts (see ferry's `src/failpoint.rs`).
    pub failpoint: Option<String>,
}

impl Ferry {
    pub fn new(dir: &Path, config_text: &str, control_port: u16) -> Result<Ferry> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = dir.join("ferry.toml");
        std::fs::write(&config, config_text).map_err(|e| format!("{}: {e}", config.display()))?;
        Ok(Ferry {
            control_port,
            log: dir.join("ferry.log"),
            config,
            child: None,
            runs: 0,
            failpoint: None,
        })
    }

    /// Starts `ferry run` and waits (20 s at most) for its control endpoint; an exit meanwhile
    /// (a journal that would not open) is an error.
    pub fn start(&mut self) -> Result<()> {
        self.runs += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let _ = writeln!(
            log,
            "----- run {} (failpoint {:?}) -----",
            self.runs, self.failpoint
        );
        let mut cmd = Command::new(sibling("ferry")?);
        match &self.failpoint {
            Some(f) => cmd.env("FERRY_FAILPOINT", f),
            None => cmd.env_remove("FERRY_FAILPOINT"),
        };
        let child = cmd
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_LOG").unwrap_or_else(|_| "info,sled=off".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start ferry: {e}"))?;
        self.child = Some(child);
        let port = self.control_port;
        let end = Instant::now() + Duration::from_secs(20);
        while !port_open(port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "ferry exited at start ({status}); see {}",
                    self.log.display()
                ));
            }
            if Instant::now() > end {
                return Err("ferry's control endpoint did not come up within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&http_get(self.control_port, "/status")?)
            .map_err(|e| format!("/status: {e}"))
    }

    /// SIGKILL, and wait for the process to be gone. Returns how it had ended if it was gone
    /// already (a panic, an exit): the torture counts that, since nothing but the torture may
    /// stop ferry.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let gone = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        kill(&mut self.child);
        gone
    }

    pub fn stop(&mut self) -> Result<()> {
        terminate(&mut self.child, "ferry", Duration::from_secs(15)).map(|_| ())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
