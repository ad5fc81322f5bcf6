//! Test harness: real peers on loopback ports. A real mosquitto, the real `ferry-cloud` and the real
//! `ferry` binary, each started in its own temp directory and stopped (or killed) by its guard. On a
//! failed test, the agent's log is printed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
pub const FERRY_CLOUD: &str = env!("CARGO_BIN_EXE_ferry-cloud");

/// A command running one of this crate's binaries. Under `make test-arm` they are ARM executables
/// and the host may have no binfmt_misc registration for them, so `FERRY_TEST_RUNNER` (set by the
/// Makefile to `qemu-aarch64-static` or `qemu-arm-static`, as cargo's target runner is for the test
/// binary itself) goes in front. qemu-user runs the program in its own process: the child's pid,
/// signals and SIGKILL are the program's.
pub fn command(bin: &str) -> Command {
    match std::env::var("FERRY_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut c = Command::new(runner.trim());
            c.arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

/// A port that was free a moment ago and that no other test of this process was given.
///
/// Ports come from 10000-31999, below Linux's ephemeral range (32768-60999), walking from an offset
/// derived from the process id: a port the kernel hands out for `bind(0)` or an outgoing connection
/// elsewhere can never land on an agent's control port between a kill and a restart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (BASE + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    ferry_testkit::poll_every(what, timeout, Duration::from_millis(50), cond)
        .unwrap_or_else(|e| panic!("{e}"));
}

fn signal(child: &Child, sig: &str) {
    signal_pid(child.id(), sig);
}

/// Waits for `child` to exit within `timeout`; returns its exit status, or kills it and panics.
pub fn wait_exit(child: &mut Child, name: &str, timeout: Duration) -> ExitStatus {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- mosquitto

/// A real mosquitto (see `ferry_testkit::Mosquitto`) with the tests' in-flight window of 20.
pub struct Mosquitto {
    pub port: u16,
    inner: ferry_testkit::Mosquitto,
}

impl Mosquitto {
    /// Starts mosquitto with persistence in `dir` on a free port.
    pub fn start(dir: &Path) -> Mosquitto {
        Self::start_on(dir, free_port(), "")
    }

    /// Starts mosquitto on `port`; `extra_conf` goes last and overrides the defaults.
    pub fn start_on(dir: &Path, port: u16, extra_conf: &str) -> Mosquitto {
        let conf = format!("max_inflight_messages 20\n{extra_conf}");
        let inner = ferry_testkit::Mosquitto::start(dir, port, &conf)
            .unwrap_or_else(|e| panic!("{e} (run .ci/run or apt-get install mosquitto)"));
        Mosquitto { port, inner }
    }

    /// Stops it cleanly (it saves its persistence file) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap();
    }

    pub fn stop(&mut self) {
        self.inner.stop().unwrap();
    }
}

// Not every test file uses each of these.
#[allow(unused_imports)]
pub use ferry_testkit::{is_root, mosquitto_bin, port_open, signal_pid};

// ---------------------------------------------------------------- publisher

/// Publishes `n` QoS1 messages and returns once the broker acknowledged every one.
pub fn publish(port: u16, topic: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> usize {
    publish_to(
        port,
        payloads
            .into_iter()
            .map(|p| (topic.to_string(), p))
            .collect(),
    )
}

pub fn publish_to(port: u16, messages: Vec<(String, Vec<u8>)>) -> usize {
    use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
    let id = format!("pub-{}-{}", std::process::id(), free_port());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 24, 1 << 24);
    opts.set_inflight(100);
    let (client, mut conn) = Client::new(opts, 200);
    let n = messages.len();
    let sender = std::thread::spawn(move || {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while acked < n {
        assert!(
            Instant::now() < end,
            "publisher: only {acked} of {n} acked by the broker"
        );
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            _ => {}
        }
    }
    let client = sender.join().unwrap();
    let _ = client.disconnect();
    for _ in 0..10 {
        if matches!(
            conn.recv_timeout(Duration::from_millis(100)),
            Ok(Err(_)) | Err(_)
        ) {
            break;
        }
    }
    acked
}

/// Numbered JSON payloads `{"n": i}` for i in range.
pub fn numbered(range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect()
}

// ---------------------------------------------------------------- ferry-cloud

pub struct Cloud {
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Cloud {
    pub fn start(dir: &Path) -> Cloud {
        Self::start_with(dir, free_port(), &[])
    }

    pub fn start_with(dir: &Path, port: u16, args: &[&str]) -> Cloud {
        let mut c = Cloud {
            port,
            dir: dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let mut child = command(FERRY_CLOUD)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join("cloud.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on"),
            "ferry-cloud said {line:?}"
        );
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            wait_exit(&mut c, "ferry-cloud", Duration::from_secs(10));
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    pub fn get(&self, path: &str) -> String {
        http_get(self.port, path)
    }

    /// The records stored for `device`, in file order.
    pub fn records(&self, device: &str) -> Vec<Value> {
        self.get(&format!("/v1/devices/{device}/records"))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn device(&self, device: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(&self.get("/v1/devices")).unwrap();
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device)
            .cloned()
    }

    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.get("/v1/stats")).unwrap()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal HTTP GET with deadlines; returns the body of a 200.
pub fn http_get(port: u16, path: &str) -> String {
    let (head, body) = http_request(port, "GET", path);
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {head}"
    );
    body
}

/// A minimal HTTP POST without a body, with `Authorization: Bearer <token>` when given; returns
/// the status line and the body, whatever the status.
pub fn http_post(port: u16, path: &str, token: Option<&str>) -> String {
    let (head, body) = http_request_auth(port, "POST", path, token);
    format!("{}\n{body}", head.lines().next().unwrap_or(""))
}

/// A request without a body, with the token when given; returns the status code and the body.
pub fn http_status(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let (head, body) = http_request_auth(port, method, path, token);
    (status_code(&head), body)
}

/// The status code of a response head (0 when there is none).
fn status_code(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn http_request_auth(port: u16, method: &str, path: &str, token: Option<&str>) -> (String, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_request_headers(port, method, path, &auth, b"")
}

/// A POST with a body; returns the status code and the body.
pub fn http_post_body(port: u16, path: &str, body: &[u8]) -> (u16, String) {
    let (head, body) = http_request_body(port, "POST", path, body);
    (status_code(&head), body)
}

fn http_request(port: u16, method: &str, path: &str) -> (String, String) {
    http_request_body(port, method, path, b"")
}

fn http_request_body(port: u16, method: &str, path: &str, body: &[u8]) -> (String, String) {
    http_request_headers(port, method, path, "", body)
}

/// `headers`: extra header lines, each ending in CRLF.
fn http_request_headers(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (String, String) {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

// ---------------------------------------------------------------- ferry agent

/// A `ferry run` child process with its config and journal in `dir`.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub control_port: u16,
    child: Option<Child>,
    log: PathBuf,
    runs: u32,
}

/// The config a test agent runs with; `extra` is appended (extra sections or keys at the end).
pub fn agent_config(
    dir: &Path,
    mqtt_port: u16,
    uplink_url: &str,
    control_port: u16,
    extra_mqtt: &str,
    extra: &str,
) -> String {
    format!(
        r#"[device]
id = "gw-test"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
topics = ["sensors/#"]
max_backoff = "500ms"
{extra_mqtt}

[journal]
dir = "{journal}"
max_bytes = "64MiB"

[uplink]
url = "{uplink_url}"
batch_max_records = 100
max_backoff = "500ms"
connect_timeout = "2s"
request_timeout = "5s"

[control]
listen = "127.0.0.1:{control_port}"
{extra}
"#,
        journal = dir.join("journal").display()
    )
}

/// `text` with each `(from, to)` replaced; panics if a `from` is not there (a silent no-op would
/// leave the test running with the harness defaults, and passing without the setting it is about).
pub fn edited(text: String, edits: &[(&str, &str)]) -> String {
    edits.iter().fold(text, |t, (from, to)| {
        assert!(t.contains(from), "{from:?} not in the config:\n{t}");
        t.replace(from, to)
    })
}

impl Agent {
    pub fn start(dir: &Path, config_text: &str, control_port: u16) -> Agent {
        Self::start_with_env(dir, config_text, control_port, &[])
    }

    /// Starts an agent with extra environment variables (failpoints, systemd's NOTIFY_SOCKET).
    pub fn start_with_env(
        dir: &Path,
        config_text: &str,
        control_port: u16,
        env: &[(&str, &str)],
    ) -> Agent {
        remember_panics();
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("ferry.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut a = Agent {
            dir: dir.to_path_buf(),
            config,
            control_port,
            child: None,
            log: dir.join("ferry.log"),
            runs: 0,
        };
        a.spawn_with_env(env);
        a
    }

    /// A standard agent against `mqtt_port` and `uplink_url`.
    pub fn standard(dir: &Path, mqtt_port: u16, uplink_url: &str) -> Agent {
        let control = free_port();
        Self::start(
            dir,
            &agent_config(dir, mqtt_port, uplink_url, control, "", ""),
            control,
        )
    }

    fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts the agent again with extra environment variables (failpoints).
    pub fn start_again_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        self.spawn_with_env(env);
    }

    /// Waits for the agent to exit by itself; returns whether it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.wait_exit_status(timeout).is_some()
    }

    /// Waits for the agent to exit by itself; returns how it exited, `None` if it did not within
    /// `timeout`.
    pub fn wait_exit_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        self.runs += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(&log, "----- run {} {env:?} -----", self.runs).unwrap();
        let mut cmd = command(FERRY);
        cmd.arg("run").arg("-c").arg(&self.config).env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "info,ferry=debug,sled=off".into()),
        );
        // `(NAME, "")` in `env` removes NAME.
        for (name, value) in env {
            if value.is_empty() {
                cmd.env_remove(name);
            } else {
                cmd.env(name, value);
            }
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let port = self.control_port;
        let log = self.log.clone();
        let end = Instant::now() + Duration::from_secs(20);
        while !port_open(port) {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!(
                        "ferry exited at start ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < end,
                "ferry control endpoint did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (10 s at most) for the agent's MQTT session to be up.
    pub fn wait_connected(&self) {
        wait_until("mqtt connected", Duration::from_secs(10), || {
            self.status()["mqtt_connected"] == true
        });
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&http_get(self.control_port, "/status")).unwrap()
    }

    /// SIGTERM; asserts a clean exit (code 0) within 10 s, and returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let mut c = self.child.take().expect("agent not running");
        let t = Instant::now();
        signal(&c, "TERM");
        let code = wait_exit(&mut c, "ferry", Duration::from_secs(10)).code();
        assert_eq!(code, Some(0), "ferry exit code; log:\n{}", self.log_text());
        t.elapsed()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// How many runs of the agent its log shows: the start banner is written once per run, also
    /// after a restart in place (exec), which keeps the pid.
    pub fn runs_logged(&self) -> usize {
        let banner = format!("ferry {} running", env!("CARGO_PKG_VERSION"));
        self.log_text().matches(&banner).count()
    }

    /// Waits (20 s at most) until the log shows `n` runs: a restart in place has come up.
    pub fn wait_runs(&self, n: usize) {
        wait_until(
            &format!("run {n} of the agent to start"),
            Duration::from_secs(20),
            || self.runs_logged() == n,
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The control token the agent generated in its journal directory (the harness config sets
    /// none).
    pub fn control_token(&self) -> String {
        let path = self.dir.join("journal/control-token");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            // FERRY_TEST_FULL_LOG=1 prints the whole log instead of its tail.
            let keep = if std::env::var("FERRY_TEST_FULL_LOG").is_ok() {
                usize::MAX
            } else {
                150
            };
            let tail: Vec<&str> = log.lines().rev().take(keep).collect();
            eprintln!("----- ferry log (last 150 lines) -----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            // CI shows the end of a failing test's output: say again why it failed.
            if let Some(why) = LAST_PANIC.with(|p| p.borrow_mut().take()) {
                eprintln!("----- end of ferry log; the test failed: {why}");
            }
        }
    }
}

thread_local! {
    /// The message of the last panic on this thread (a failing assertion), for [`Agent`]'s drop.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once per test process) a panic hook that also keeps the panic's message for the
/// thread's [`Agent`] drop, which prints it again after the log tail.
fn remember_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            previous(info);
        }));
    });
}

/// The `n` values of the records at the cloud, in order.
pub fn numbers(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .filter_map(|r| r["payload"]["n"].as_u64())
        .collect()
}

/// Asserts that `records` hold exactly the numbers `0..n`, each once (after dedupe by seq).
pub fn assert_exactly_once(records: &[Value], n: u64) {
    if let Err(e) = check_exactly_once(records, n) {
        panic!("{e}");
    }
}

/// Whether `records` hold exactly the numbers `0..n`, each once (after dedupe by seq); the error
/// says which are stored twice or missing.
pub fn check_exactly_once(records: &[Value], n: u64) -> Result<(), String> {
    let mut seen = std::collections::BTreeMap::new();
    let mut twice = Vec::new();
    for r in records {
        let seq = r["seq"].as_u64().unwrap();
        if let Some(k) = r["payload"]["n"].as_u64() {
            if let Some(first) = seen.insert(k, seq) {
                twice.push(format!("n={k} as seq {first} and seq {seq}"));
            }
        }
    }
    let missing: Vec<u64> = (0..n).filter(|k| !seen.contains_key(k)).collect();
    if !twice.is_empty() || !missing.is_empty() || seen.len() as u64 != n {
        return Err(format!(
            "{} messages stored twice (first: {:?}); {} missing (first: {:?}); {} distinct of {n}",
            twice.len(),
            &twice[..twice.len().min(5)],
            missing.len(),
            &missing[..missing.len().min(20)],
            seen.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- nginx

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

/// A real nginx (master and one worker) on a free port, proxying `/v1/` to `upstream_port` over a
/// keepalive upstream, with everything it writes (pid, logs, temp files) in its own directory.
pub struct Nginx {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Nginx {
    pub fn start(dir: &Path, upstream_port: u16) -> Nginx {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let d = dir.display();
        // As root the workers would otherwise run as `nobody`, which cannot write the temp dir.
        // The access log records nginx's connection serial and its request count on that
        // connection, so a test can see how many connections the agent used.
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format ferry '$connection $connection_requests $status $request_time';\n\
               access_log {d}/access.log ferry;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               client_max_body_size 16m;\n\
               upstream cloud {{\n\
                 server 127.0.0.1:{upstream_port} max_fails=0;\n\
                 keepalive 8;\n\
               }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location /v1/ {{\n\
                   proxy_pass http://cloud;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_connect_timeout 2s;\n\
                   proxy_read_timeout 10s;\n\
                   proxy_next_upstream off;\n\
                 }}\n\
               }}\n\
             }}\n",
            user = if ferry_testkit::is_root() {
                "user root;\n"
            } else {
                ""
            },
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx not installed: run scripts/ensure-deps.sh");
        let mut n = Nginx {
            port,
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !port_open(port) {
            if let Some(status) = n.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nginx exited at start ({status}):\n{}", n.error_log());
            }
            assert!(Instant::now() < end, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The access log: one `connection requests_on_it status request_time` line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL on the master would leave its worker behind, holding the port: TERM first.
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            let end = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

// ---------------------------------------------------------------- process probes

/// What a process holds, read from `/proc`: open descriptors, resident memory, and its TCP
/// sockets stuck in CLOSE_WAIT (the peer closed, the process never did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    pub fds: usize,
    pub rss_kib: u64,
    pub close_wait: usize,
}

impl ProcSample {
    pub fn of(pid: u32) -> ProcSample {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        let inodes: std::collections::HashSet<String> = links
            .iter()
            .filter_map(|l| l.strip_prefix("socket:[")?.strip_suffix(']'))
            .map(str::to_string)
            .collect();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        // /proc/<pid>/net/tcp*: `sl local rem st ... uid timeout inode`; st 08 is CLOSE_WAIT.
        let close_wait = ["tcp", "tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
            .flat_map(|t| {
                t.lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
            .filter(|f| f.len() > 9 && f[3] == "08" && inodes.contains(&f[9]))
            .count();
        ProcSample {
            fds: links.len(),
            rss_kib,
            close_wait,
        }
    }
}

// ---------------------------------------------------------------- fault proxy

/// Where an HTTP head ends (just past the blank line), if it has arrived.
pub fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The `Content-Length` of an HTTP head, if it has one.
pub fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// What the [`FaultProxy`] does with a connection. Chosen when the connection is accepted; a
/// pass-through connection also closes as soon as the mode moves away from `Pass`, so that a pooled
/// connection cannot carry the agent past a newly set fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards bytes both ways.
    Pass,
    /// A dead link: accepts, reads the request, never answers, never closes.
    Hang,
    /// A half-open link: forwards the request, then the response head and half of its body, then
    /// nothing more; the connection stays open.
    CutResponse,
    /// Reads a few bytes and closes with the rest of the request unread, which makes Linux send
    /// RST instead of FIN (std has no stable SO_LINGER).
    Reset,
    /// Forwards both ways, holding every chunk from upstream for `SLOW_DELAY` (a slow link or a
    /// slow peer: a CONNACK that takes 300 ms).
    Slow,
    /// A link that silently stops forwarding: open connections stay open and carry nothing more
    /// either way (a half-open TCP connection); new ones are accepted and hang.
    Stall,
}

/// How long [`ProxyMode::Slow`] holds each chunk from upstream.
pub const SLOW_DELAY: Duration = Duration::from_millis(300);

impl ProxyMode {
    fn from_u8(v: u8) -> ProxyMode {
        match v {
            1 => ProxyMode::Hang,
            2 => ProxyMode::CutResponse,
            3 => ProxyMode::Reset,
            4 => ProxyMode::Slow,
            5 => ProxyMode::Stall,
            _ => ProxyMode::Pass,
        }
    }
}

struct ProxyShared {
    mode: AtomicU8,
    stop: AtomicBool,
    accepted: AtomicU64,
    active: AtomicUsize,
}

impl ProxyShared {
    fn mode(&self) -> ProxyMode {
        ProxyMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A loopback TCP proxy to `127.0.0.1:upstream` that can play a broken link. One listener thread
/// and one or two threads per connection; every socket read has a short timeout and every loop
/// checks the stop flag, so dropping the proxy joins all of them.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    listener: Option<JoinHandle<()>>,
}

/// How often proxy threads look at the stop flag and the mode.
const PROXY_TICK: Duration = Duration::from_millis(100);

impl FaultProxy {
    pub fn start(upstream: u16, mode: ProxyMode) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            mode: AtomicU8::new(mode as u8),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let listener = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || proxy_accept_loop(listener, upstream, s))
            .unwrap();
        FaultProxy {
            port,
            shared,
            listener: Some(listener),
        }
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
    }
}

fn proxy_accept_loop(listener: TcpListener, upstream: u16, shared: Arc<ProxyShared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopped() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.active.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(&shared);
                let mode = shared.mode();
                conns.retain(|h| !h.is_finished());
                conns.push(std::thread::spawn(move || {
                    proxy_conn(client, upstream, mode, &s);
                    s.active.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn proxy_conn(client: TcpStream, upstream: u16, mode: ProxyMode, shared: &Arc<ProxyShared>) {
    // The accepted socket may have inherited the listener's non-blocking flag on some platforms.
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(PROXY_TICK));
    match mode {
        ProxyMode::Hang | ProxyMode::Stall => drain(&client, shared),
        ProxyMode::Reset => {
            let mut buf = [0u8; 16];
            let end = Instant::now() + Duration::from_secs(2);
            let mut got = 0;
            // Read a little, then wait until more is pending: closing with unread data is an RST.
            while Instant::now() < end && !shared.stopped() {
                let r = if got == 0 {
                    (&client).read(&mut buf)
                } else {
                    client.peek(&mut buf)
                };
                match r {
                    Ok(0) => return,
                    Ok(n) if got == 0 => got = n,
                    Ok(_) => break,
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => return,
                }
            }
            drop(client);
        }
        ProxyMode::Pass | ProxyMode::CutResponse | ProxyMode::Slow => {
            let Ok(up) = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], upstream)),
                Duration::from_secs(1),
            ) else {
                return;
            };
            let _ = up.set_read_timeout(Some(PROXY_TICK));
            let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) else {
                return;
            };
            let s = Arc::clone(shared);
            let watch = mode != ProxyMode::CutResponse;
            let requests = std::thread::spawn(move || {
                pump(&c2, &u2, &s, watch.then_some(mode), Duration::ZERO)
            });
            if watch {
                let delay = if mode == ProxyMode::Slow {
                    SLOW_DELAY
                } else {
                    Duration::ZERO
                };
                pump(&up, &client, shared, Some(mode), delay);
            } else {
                cut_response(&up, &client, shared);
            }
            let _ = requests.join();
        }
    }
}

/// Reads and discards until EOF, an error, or stop.
fn drain(from: &TcpStream, shared: &ProxyShared) {
    let mut buf = [0u8; 8192];
    while !shared.stopped() {
        match (&*from).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Copies `from` to `to`, holding each chunk for `delay`, until either side ends (then closes
/// both), stop, or, with `watch_mode`, the mode changes from the one given.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    shared: &ProxyShared,
    watch_mode: Option<ProxyMode>,
    delay: Duration,
) {
    let mut buf = [0u8; 16384];
    let carry_on = || !shared.stopped() && watch_mode.is_none_or(|m| shared.mode() == m);
    while carry_on() {
        match (&*from).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if (&*to).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    if shared.mode() == ProxyMode::Stall && !shared.stopped() {
        // Keep the connection open and carry nothing: neither side learns anything.
        drain(from, shared);
        return;
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Forwards the response head and half of its body, then holds the connection open without
/// forwarding anything until the agent gives up on it (the request pump then closes both sides).
fn cut_response(up: &TcpStream, client: &TcpStream, shared: &ProxyShared) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut cut = None;
    while !shared.stopped() {
        if cut.is_none() {
            cut = header_end(&got).map(|h| h + content_length(&got[..h]).unwrap_or(0) / 2);
        }
        if let Some(c) = cut {
            if got.len() >= c {
                let _ = (&*client).write_all(&got[..c]);
                break;
            }
        }
        match (&*up).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    drain(up, shared);
    let _ = up.shutdown(std::net::Shutdown::Both);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
