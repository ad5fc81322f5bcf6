//! What ferry's integration tests (`tests/util`), the torture runner (`tests/crashfs`) and the
//! benchmarks (`tests/bench`) share: a real mosquitto, PostgreSQL and nginx started the one way
//! all of them need, and the process helpers around them. Errors are strings naming what
//! failed; the integration tests unwrap them, the runners report them.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod nginx;
pub use nginx::Nginx;

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

/// Runs `command` to its end within `timeout` (killed past it: an error naming `what`); its
/// output. For commands that print little: the pipes are read once it has exited.
pub fn output_within(
    command: &mut Command,
    what: &str,
    timeout: Duration,
) -> Result<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child.wait_with_output().map_err(|e| format!("{what}: {e}"));
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {timeout:?}"));
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
        // What it says before its log file is open (a port it cannot bind) goes beside the log.
        let stderr_path = self.log.with_extension("stderr");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!("cannot start mosquitto (scripts/ensure-deps.sh installs it): {e}")
            })?;
        self.child = Some(child);
        let port = self.port;
        poll_until("mosquitto to listen", Duration::from_secs(10), || {
            port_open(port)
        })?;
        // The port answering is not proof that this mosquitto holds it.
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            return Err(format!(
                "mosquitto exited ({status}) as port {port} opened: another process holds it? \
                 its stderr: {}; its log: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ));
        }
        Ok(())
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

/// The newest PostgreSQL server installed the Debian way (`/usr/lib/postgresql/<major>/bin`).
pub fn postgres_bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| {
            format!(
                "{}: {e}; PostgreSQL is not installed (scripts/ensure-deps.sh installs it)",
                root.display()
            )
        })?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no PostgreSQL server under {}", root.display()))
}

/// How long one [`Postgres::psql`] may take (the bench's `COPY` of millions of rows included).
pub const PSQL_DEADLINE: Duration = Duration::from_secs(300);

/// A real PostgreSQL server in its own directory on 127.0.0.1, with fsync on (the default),
/// trusting local connections as user `ferry`, stopped when dropped. PostgreSQL refuses to run
/// as root: as root it runs as Debian's `postgres` user (made by the package), through `setpriv`
/// so that the process the test holds is the server itself.
pub struct Postgres {
    pub port: u16,
    /// Its log file (the server's stderr).
    pub log: PathBuf,
    bin: PathBuf,
    data: PathBuf,
    sockets: PathBuf,
    child: Option<Child>,
}

impl Postgres {
    /// `initdb` in `dir/pgdata` and starts the server on `port`; returns once it answers a query.
    pub fn start(dir: &Path, port: u16) -> Result<Postgres> {
        let bin = postgres_bin_dir()?;
        let data = dir.join("pgdata");
        let sockets = dir.join("pgsock");
        for d in [dir, &sockets] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        if is_root() {
            // The server's user must own its directories and reach them.
            let status = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "cannot give {} to the postgres user (is the postgresql package installed?)",
                    dir.display()
                ));
            }
        }
        let pg = Postgres {
            port,
            log: dir.join("postgres.log"),
            bin,
            data,
            sockets,
            child: None,
        };
        let out = output_within(
            pg.as_server_user(&pg.bin.join("initdb"))
                .arg("-D")
                .arg(&pg.data)
                .args(["-U", "ferry", "-A", "trust", "-E", "UTF8", "--no-sync"])
                // A collation like most servers' (not byte order), so that what the tests see
                // of ordering by text is what an operator's database does.
                .args(["--locale-provider=icu", "--icu-locale=en-US"]),
            "initdb",
            Duration::from_secs(60),
        )?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut pg = pg;
        pg.spawn()?;
        Ok(pg)
    }

    /// A command that runs `program` as the server's user.
    fn as_server_user(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--reset-env",
                "--",
            ])
            .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = self
            .as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.sockets)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        self.child = Some(child);
        poll_every(
            "postgres to answer a query",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || self.psql("SELECT 1").is_ok_and(|out| out.trim() == "1"),
        )
        .map_err(|e| format!("{e}; its log:\n{}", self.log_text()))
    }

    /// Adds login role `role` (a superuser, like `ferry`) that must give `password` over TCP
    /// (SCRAM); `ferry` stays trusted. Applied as a reload: returns once a connection as `role`
    /// without a password is refused.
    pub fn add_password_role(&self, role: &str, password: &str) -> Result<()> {
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"
        ))?;
        let hba = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).map_err(|e| format!("{}: {e}", hba.display()))?;
        // The first matching line applies: this one before the trusting ones.
        std::fs::write(
            &hba,
            format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .map_err(|e| format!("{}: {e}", hba.display()))?;
        self.psql("SELECT pg_reload_conf()")?;
        poll_every(
            "postgres to ask for the role's password",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                output_within(
                    Command::new("psql")
                        .args(["-X", "-w", "-At", "-d"])
                        .arg(format!(
                            "host=127.0.0.1 port={} user={role} dbname=postgres connect_timeout=5",
                            self.port
                        ))
                        .args(["-c", "SELECT 1"]),
                    "psql without a password",
                    Duration::from_secs(10),
                )
                .is_ok_and(|out| !out.status.success())
            },
        )
        .map_err(|e| format!("{e}; its log:\n{}", self.log_text()))
    }

    /// Logs every statement the server runs from now on (`log_statement = all`, as a reload), so
    /// that a test can read in [`Postgres::log_text`] what a client made the server do.
    pub fn log_statements(&self) -> Result<()> {
        self.psql("ALTER SYSTEM SET log_statement = 'all'")?;
        self.psql("SELECT pg_reload_conf()")?;
        poll_every(
            "postgres to log statements",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                self.psql("SHOW log_statement")
                    .is_ok_and(|out| out.trim() == "all")
            },
        )
    }

    /// Turns TLS on with this certificate and key (PEM), as a reload, and waits until the
    /// server says so. Plain connections are still accepted.
    pub fn enable_tls(&self, cert: &Path, key: &Path) -> Result<()> {
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = self.data.join(name);
            std::fs::copy(from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
            // The server refuses a key others can read.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", to.display()))?;
            if is_root() {
                let chown = output_within(
                    Command::new("chown").arg("postgres:postgres").arg(&to),
                    "chown",
                    Duration::from_secs(10),
                )?;
                if !chown.status.success() {
                    return Err(format!("cannot give {} to postgres", to.display()));
                }
            }
        }
        self.psql("ALTER SYSTEM SET ssl = on")?;
        self.psql("SELECT pg_reload_conf()")?;
        poll_every(
            "postgres to turn TLS on",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || self.psql("SHOW ssl").is_ok_and(|out| out.trim() == "on"),
        )
        .map_err(|e| format!("{e}; its log:\n{}", self.log_text()))
    }

    /// The connection string of the `postgres` database as user `ferry`.
    pub fn url(&self) -> String {
        format!("postgres://ferry@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql (unaligned, tuples only) within [`PSQL_DEADLINE`]; its output, or
    /// its error.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_within(sql, PSQL_DEADLINE)
    }

    /// [`Postgres::psql`] within `deadline`.
    pub fn psql_within(&self, sql: &str, deadline: Duration) -> Result<String> {
        let out = output_within(
            Command::new("psql")
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(format!("{} connect_timeout=5", self.url_kv()))
                .arg("-c")
                .arg(sql),
            "psql",
            deadline,
        )?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn url_kv(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=ferry dbname=postgres",
            self.port
        )
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (a crash: it recovers from its WAL at the next start), and
    /// the backends it leaves behind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Backends notice their postmaster died and exit; wait for the last one so that the
            // next start finds its shared memory free.
            let data = std::fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
            let _ = poll_until("postgres backends to exit", Duration::from_secs(20), || {
                !runs_in(&data)
            });
        }
    }

    /// Starts it again after [`Postgres::kill`].
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether any process still runs in `dir` (a server's backends run in its data directory, and
/// outlive a killed postmaster for a moment, reparented).
fn runs_in(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok())
        .any(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == dir))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SIGQUIT: immediate shutdown, backends included.
            signal_pid(c.id(), "QUIT");
        }
        let _ = terminate(&mut self.child, "postgres", Duration::from_secs(10));
    }
}
