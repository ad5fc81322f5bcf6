//! The process rows: the real release `ferry` and `ferry-cloud` binaries and a real mosquitto,
//! each in its own directory under the bench's work directory, on loopback ports; the null HTTP
//! sink; an MQTT publisher and a plain subscriber. Every child is killed by its guard's `Drop`,
//! every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::store::{BoxError, Result, payload};
pub use ferry_testkit::Mosquitto;
use ferry_testkit::terminate;

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `cond` every `every` until it holds; an error naming `what` after `timeout`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        std::thread::sleep(every);
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &'static str, child: Child) -> Proc {
        Proc {
            name,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then waits up to 10 s for the exit.
    pub fn stop(&mut self) -> Result<()> {
        terminate(&mut self.child, self.name, Duration::from_secs(10))?;
        Ok(())
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Peak and current resident set (KiB) of a process, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 Hz clock.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

// ---------------------------------------------------------------- mosquitto

/// mosquitto (see `ferry_testkit::Mosquitto`) on a free port with an in-flight window of
/// `inflight` QoS1 messages per client.
pub fn mosquitto(dir: &Path, inflight: u32) -> Result<Mosquitto> {
    Ok(Mosquitto::start(
        dir,
        free_port()?,
        &format!("max_inflight_messages {inflight}"),
    )?)
}

// ---------------------------------------------------------------- ferry-cloud

pub struct Cloud {
    pub port: u16,
    pub proc: Proc,
}

impl Cloud {
    pub fn start(bin: &Path, dir: &Path) -> Result<Cloud> {
        Self::start_on(bin, dir, None)
    }

    /// With `store` (a PostgreSQL URL) the data goes there; `dir` holds the log either way.
    pub fn start_on(bin: &Path, dir: &Path, store: Option<&str>) -> Result<Cloud> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut command = Command::new(bin);
        command.arg("--listen").arg(format!("127.0.0.1:{port}"));
        match store {
            Some(url) => command.arg("--store").arg(url),
            None => command.arg("--data").arg(dir),
        };
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("cloud.log"))?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("ferry-cloud has no stdout")?;
        let proc = Proc::new("ferry-cloud", child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("listening on") {
            return Err(format!("ferry-cloud said {line:?}").into());
        }
        Ok(Cloud { port, proc })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }
}

// ---------------------------------------------------------------- the null sink

/// A loopback HTTP/1.1 server that answers every POST with the success body ferry-cloud would give
/// (`{"accepted":N,"duplicates":0}`, N from the `Idempotency-Key` range) without parsing,
/// decompressing or storing anything: the ceiling of the uplink.
pub struct NullSink {
    pub port: u16,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NullSink {
    pub fn start() -> Result<NullSink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = std::thread::Builder::new()
            .name("null-sink".into())
            .spawn(move || {
                let mut conns = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (s, r) = (Arc::clone(&s), Arc::clone(&r));
                            if let Ok(h) = std::thread::Builder::new()
                                .name("null-sink-conn".into())
                                .spawn(move || serve(stream, &s, &r))
                            {
                                conns.push(h);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                for h in conns {
                    let _ = h.join();
                }
            })?;
        Ok(NullSink {
            port,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }
}

impl Drop for NullSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One keep-alive connection: requests until EOF, an error, or shutdown (seen within 200 ms).
fn serve(stream: TcpStream, stop: &AtomicBool, requests: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let mut body = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        // Head: lines until the blank one.
        let mut len = 0usize;
        let mut accepted = 0u64;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && first
                        && line.is_empty() =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            first = false;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("idempotency-key") {
                    // <device>:<first>-<last>
                    accepted = v
                        .rsplit_once(':')
                        .and_then(|(_, range)| range.split_once('-'))
                        .and_then(|(a, b)| {
                            Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)
                        })
                        .unwrap_or(0);
                }
            }
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(body.len());
            if r.read_exact(&mut body[..n]).is_err() {
                return;
            }
            left -= n;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let answer = format!("{{\"accepted\":{accepted},\"duplicates\":0}}");
        // One write: a head and a body in two segments would meet Nagle and delayed ACKs (40 ms).
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- the agent

pub struct Agent {
    pub proc: Proc,
    pub control: SocketAddr,
    log: PathBuf,
}

/// What the agent runs with: `uplink_extra` holds extra `[uplink]` keys (`batch_max_records = ...`).
pub fn agent_config(
    journal: &Path,
    mqtt_port: u16,
    url: &str,
    control: u16,
    uplink_extra: &str,
) -> String {
    agent_config_with(journal, mqtt_port, url, control, "", uplink_extra)
}

/// [`agent_config`] with extra `[journal]` keys too (`commit_wait = ...`).
pub fn agent_config_with(
    journal: &Path,
    mqtt_port: u16,
    url: &str,
    control: u16,
    journal_extra: &str,
    uplink_extra: &str,
) -> String {
    format!(
        "[device]\nid = \"gw-bench\"\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\n\
         topics = [\"bench/#\"]\n\n[journal]\ndir = \"{}\"\nmax_bytes = \"8GiB\"\n{journal_extra}\n\n\
         [uplink]\nurl = \"{url}\"\n{uplink_extra}\n\n[control]\nlisten = \"127.0.0.1:{control}\"\n\n\
         [clock]\nrequire_sync = false\n",
        journal.display()
    )
}

impl Agent {
    /// Starts `ferry run` with `config` in `dir`; returns once its control endpoint answers.
    pub fn start(bin: &Path, dir: &Path, config: &str, control: u16) -> Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("ferry.toml");
        std::fs::write(&conf, config)?;
        let log = dir.join("ferry.log");
        let child = Command::new(bin)
            .arg("run")
            .arg("-c")
            .arg(&conf)
            .env("FERRY_LOG", "info,sled=off")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut a = Agent {
            proc: Proc::new("ferry", child),
            control: addr(control),
            log,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while a.status().is_err() {
            if a.proc.exited() {
                return Err(format!("ferry exited at start:\n{}", a.log_tail()).into());
            }
            if Instant::now() >= end {
                return Err("ferry's control endpoint did not come up within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(a)
    }

    pub fn status(&self) -> Result<Value> {
        let body = ferry::control::get(self.control, "/status", None, Duration::from_secs(5))?;
        Ok(serde_json::from_str(&body)?)
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// How a backlog drain went.
pub struct Drain {
    pub records: u64,
    /// From the control endpoint answering (journal open) to every record acknowledged.
    pub secs: f64,
    pub rss_peak_kib: u64,
    pub rss_open_kib: u64,
    pub agent_cpu: f64,
}

/// Starts `ferry run` on the journal in `journal` (a copy, it is consumed) with the uplink at
/// `url`, and waits until the whole backlog is acknowledged.
pub fn drain(
    ferry: &Path,
    dir: &Path,
    journal: &Path,
    mqtt_port: u16,
    url: &str,
    uplink_extra: &str,
) -> Result<Drain> {
    let control = free_port()?;
    let config = agent_config(journal, mqtt_port, url, control, uplink_extra);
    let mut agent = Agent::start(ferry, dir, &config, control)?;
    let t = Instant::now();
    let pid = agent.proc.pid();
    let (_, rss_open_kib) = rss_kib(pid);
    let first = agent.status()?;
    let head = u(&first["head_seq"]);
    let mut last_acked = 0;
    let result = wait_for(
        "the backlog to drain",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || {
            let s = agent.status()?;
            last_acked = u(&s["acked_seq"]);
            Ok(last_acked >= head)
        },
    );
    let secs = t.elapsed().as_secs_f64();
    let (rss_peak_kib, _) = rss_kib(pid);
    let agent_cpu = cpu_secs(&pid.to_string());
    if let Err(e) = result {
        return Err(format!("{e} (acked {last_acked} of {head}):\n{}", agent.log_tail()).into());
    }
    agent.proc.stop()?;
    Ok(Drain {
        records: head - u(&first["acked_seq"]),
        secs,
        rss_peak_kib,
        rss_open_kib,
        agent_cpu,
    })
}

// ---------------------------------------------------------------- MQTT

pub fn mqtt_client(port: u16, id: &str) -> (rumqttc::Client, rumqttc::Connection) {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    rumqttc::Client::new(opts, 1000)
}

/// Publishes `n` QoS1 messages of [`crate::store::PAYLOAD`] bytes on `bench/t` as fast as the broker acks them;
/// returns the seconds until the last PUBACK.
pub fn publish(port: u16, n: usize) -> Result<f64> {
    use rumqttc::{Event, Incoming, QoS};
    let (client, mut conn) = mqtt_client(port, &format!("bench-pub-{}", free_port()?));
    let t = Instant::now();
    let sender = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            for i in 0..n {
                if client
                    .publish("bench/t", QoS::AtLeastOnce, false, payload(i as u64))
                    .is_err()
                {
                    break;
                }
            }
            client
        })?;
    let mut acked = 0;
    let end = Instant::now() + Duration::from_secs(120);
    while acked < n {
        if Instant::now() >= end {
            return Err(format!("publisher: only {acked} of {n} acked by the broker").into());
        }
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => return Err(format!("publisher connection failed: {e}").into()),
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let client = sender.join().map_err(|_| "publisher thread panicked")?;
    let _ = client.disconnect();
    for _ in 0..10 {
        if matches!(
            conn.recv_timeout(Duration::from_millis(100)),
            Ok(Err(_)) | Err(_)
        ) {
            break;
        }
    }
    Ok(secs)
}

/// A plain QoS1 subscriber on `bench/#`, counting messages on its own thread.
pub struct Subscriber {
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the SUBACK arrived.
    pub fn start(port: u16) -> Result<Subscriber> {
        use rumqttc::{Event, Incoming, QoS};
        let (client, mut conn) = mqtt_client(port, &format!("bench-sub-{}", free_port()?));
        client.subscribe("bench/#", QoS::AtLeastOnce)?;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() >= end {
                return Err("subscriber: no SUBACK within 10 s".into());
            }
            match conn.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => break,
                Ok(Err(e)) => return Err(format!("subscriber connection failed: {e}").into()),
                _ => {}
            }
        }
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("subscriber".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match conn.recv_timeout(Duration::from_millis(200)) {
                        Ok(Ok(Event::Incoming(Incoming::Publish(_)))) => {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => break,
                        _ => {}
                    }
                }
                let _ = client.disconnect();
            })?;
        Ok(Subscriber {
            received,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often `ingest_rate` polls its count: often enough to time a run of seconds to within 1 %,
/// rarely enough that the probe (for ferry, a `/status` request served on the same two cores)
/// takes no measurable share of the CPU the run is measuring.
pub const COUNT_EVERY: Duration = Duration::from_millis(25);

/// Messages per second and the publisher's own rate, for `n` messages from a publisher until the
/// consumer counted them all (`count` polled every `COUNT_EVERY`).
pub fn ingest_rate(port: u16, n: usize, count: impl Fn() -> Result<u64>) -> Result<(f64, f64)> {
    let start = count()?;
    let t = Instant::now();
    let publisher = std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || publish(port, n).map_err(|e| e.to_string()))?;
    wait_for(
        "the consumer to count every message",
        Duration::from_secs(300),
        COUNT_EVERY,
        || Ok(count()? >= start + n as u64),
    )?;
    let secs = t.elapsed().as_secs_f64();
    let pub_secs = publisher
        .join()
        .map_err(|_| "publisher panicked")?
        .map_err(BoxError::from)?;
    Ok((n as f64 / secs, n as f64 / pub_secs))
}
