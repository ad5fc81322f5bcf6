#[allow(unused_imports)]
use super::*;

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

# Test machines (containers) often have a kernel that says its clock is unsynchronised: without
# this every record would wait clock.hold for a time service (tests/clock.rs tests both ways).
[clock]
require_sync = false
{extra}
"#,
        journal = dir.join("journal").display()
    )
}

/// A `[downlink]` section to `url` with the tests' short timings (pings every 500 ms, dead after
/// 2 s, reconnecting within 500 ms).
pub fn downlink_section(url: &str) -> String {
    format!(
        "\n[downlink]\nurl = \"{url}\"\nping_interval = \"500ms\"\ndead_after = \"2s\"\nconnect_timeout = \"2s\"\nmax_backoff = \"500ms\"\n"
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
        Self::standard_edited(dir, mqtt_port, uplink_url, &[])
    }

    /// A standard agent with `edits` made to its config (see [`edited`]).
    pub fn standard_edited(
        dir: &Path,
        mqtt_port: u16,
        uplink_url: &str,
        edits: &[(&str, &str)],
    ) -> Agent {
        let control = free_port();
        let config = edited(
            agent_config(dir, mqtt_port, uplink_url, control, "", ""),
            edits,
        );
        Self::start(dir, &config, control)
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
            std::env::var("FERRY_LOG")
                .unwrap_or_else(|_| "info,ferry=debug,ferry_journal=debug,sled=off".into()),
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

    /// `/status`, or `None` while the endpoint does not answer 200 (the agent is restarting).
    pub fn try_status(&self) -> Option<Value> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.control_port));
        let body = ferry::control::get(addr, "/status", None, Duration::from_secs(5)).ok()?;
        serde_json::from_str(&body).ok()
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
