//! The serial console as a technician uses it: the real shell driven through a pseudo-terminal pair
//! made by the test (the test holds the master, ferry opens the slave as its serial device), both
//! stand-alone (`ferry console --device`) and inside the agent (`[console] device`).
#![allow(clippy::unwrap_used)]

mod util;

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use util::*;

/// The technician's end of a serial line.
struct Pty {
    master: File,
    /// The device ferry opens.
    path: PathBuf,
    /// Held open so that the line stays up while ferry closes and reopens it (a restart).
    slave: File,
    /// Everything read and not yet consumed by `expect`.
    seen: String,
}

impl Pty {
    fn open() -> Pty {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let path = PathBuf::from(ptsname(&master, Vec::new()).unwrap().into_string().unwrap());
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(&path)
            .unwrap();
        let master = File::from(master);
        rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK).unwrap();
        Pty {
            master,
            path,
            slave,
            seen: String::new(),
        }
    }

    /// Reads what the shell wrote, waiting up to `wait` for something.
    fn pump(&mut self, wait: Duration) {
        let ts = Timespec::try_from(wait).unwrap();
        let mut fds = [PollFd::new(&self.master, PollFlags::IN)];
        if poll(&mut fds, Some(&ts)).unwrap_or(0) == 0 {
            return;
        }
        let mut buf = [0u8; 65536];
        while let Ok(n) = self.master.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// Types `bytes`, reading the shell's answers meanwhile so that neither side stalls.
    fn send(&mut self, bytes: &[u8]) {
        let end = Instant::now() + Duration::from_secs(60);
        let mut rest = bytes;
        while !rest.is_empty() {
            assert!(Instant::now() < end, "the shell stopped reading");
            match self.master.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.pump(Duration::from_millis(10))
                }
                Err(e) => panic!("write to pty: {e}"),
            }
        }
    }

    fn line(&mut self, text: &str) {
        self.send(format!("{text}\r").as_bytes());
    }

    /// Waits until the shell has written `needle`; returns the output up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self.seen.find(needle) {
                let upto = i + needle.len();
                let out = self.seen[..upto].to_owned();
                self.seen.drain(..upto);
                return out;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {needle:?}; the shell wrote:\n{}",
                self.seen
            );
            self.pump(Duration::from_millis(100));
        }
    }

    /// Waits until the shell has answered everything typed so far, with `prompt` last.
    fn sync(&mut self, prompt: &str) {
        self.line("help exit");
        self.expect("Ends the session.");
        self.expect(prompt);
    }

    /// Types a command and returns what it printed up to the next prompt.
    fn run(&mut self, command: &str, prompt: &str) -> String {
        self.line(command);
        self.expect(prompt)
    }
}

/// `ferry console -c config --device pty` with `env`; stderr (its log) goes to `log`.
/// The config section that serves the agent's console on `pty`.
fn console_on(pty: &Pty) -> String {
    format!("\n[console]\ndevice = \"{}\"\n", pty.path.display())
}

fn console(config: &Path, pty: &Pty, env: &[(&str, &str)], log: &Path) -> Child {
    let mut cmd = command(FERRY);
    cmd.args(["console", "-c"])
        .arg(config)
        .arg("--device")
        .arg(&pty.path)
        .env("FERRY_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    cmd.spawn().unwrap()
}

fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    wait_exit(child, "ferry console", Duration::from_secs(20))
}

#[test]
fn a_technician_sets_the_uplink_url_saves_and_sees_it_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let old_cloud = Cloud::start(&dir.path().join("old-cloud"));
    let new_cloud = Cloud::start(&dir.path().join("new-cloud"));
    let mut agent = Agent::standard(&dir.path().join("agent"), mq.port, &old_cloud.url());
    agent.wait_connected();
    let pid = agent.pid();

    let mut pty = Pty::open();
    let log = dir.path().join("console.log");
    let mut child = console(&agent.config, &pty, &[], &log);
    pty.expect("gw-test> ");
    // CR, CRLF and LF line ends all work.
    pty.send(b"set uplink.max_records_per_sec 250\r");
    pty.expect("gw-test> ");
    pty.send(format!("set uplink.url {}\r\n", new_cloud.url()).as_bytes());
    pty.expect("gw-test> ");
    pty.send(b"diff\n");
    let diff = pty.expect("gw-test> ");
    assert!(
        diff.contains(&format!(
            "uplink.url \"{}\" -> \"{}\"",
            old_cloud.url(),
            new_cloud.url()
        )),
        "{diff}"
    );
    let saved = pty.run("save", "gw-test> ");
    assert!(
        saved.contains("applied now: uplink.max_records_per_sec 0 -> 250"),
        "{saved}"
    );
    assert!(
        saved.contains("agent restarting to apply: uplink.url"),
        "{saved}"
    );
    // The agent restarts in place and sends to the new cloud.
    agent.wait_runs(2);
    agent.wait_connected();
    assert_eq!(agent.pid(), pid);
    publish(mq.port, "sensors/a", numbered(0..5));
    wait_until("records at the new cloud", Duration::from_secs(20), || {
        new_cloud.records("gw-test").len() == 5
    });
    assert_eq!(agent.status()["uplink"]["limit_records_per_sec"], 250.0);
    assert_eq!(
        pty.run("diff", "gw-test> ").lines().nth(1),
        Some("no pending changes")
    );
    pty.line("exit");
    pty.expect("bye");
    assert!(wait_child(&mut child).success());
    let console_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        console_log.contains(&format!(
            "console changed uplink.url \"{}\" -> \"{}\"",
            old_cloud.url(),
            new_cloud.url()
        )),
        "{console_log}"
    );
    let bak = std::fs::read_to_string(agent.config.with_extension("toml.bak")).unwrap();
    assert!(bak.contains(&old_cloud.url()));
    agent.stop();
}

#[test]
fn a_typo_names_the_key_and_nothing_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    let text = agent_config(
        dir.path(),
        1883,
        "http://127.0.0.1:9/v1/ingest",
        free_port(),
        "",
        "",
    );
    std::fs::write(&config, &text).unwrap();
    let mut pty = Pty::open();
    let mut child = console(&config, &pty, &[], &dir.path().join("console.log"));
    pty.expect("gw-test> ");
    let out = pty.run("set uplink.batch_max_records 10x0", "gw-test> ");
    assert!(out.contains("not set:"), "{out}");
    assert!(out.contains("uplink.batch_max_records"), "{out}");
    assert!(pty.run("save", "gw-test> ").contains("nothing to save"));
    assert!(pty.run("status", "gw-test> ").contains("agent not running"));
    assert!(
        pty.run("journal", "gw-test> ")
            .contains("agent not running")
    );
    pty.line("exit");
    pty.expect("bye");
    assert!(wait_child(&mut child).success());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
    assert!(!dir.path().join("ferry.toml.bak").exists());
}

/// A power cut at each step of `save` (temp file, fsync, rename, fsync of the directory, with the
/// previous file copied to `.bak` first) leaves a whole config file, old or new, never a mix.
#[test]
fn power_loss_during_save_leaves_the_old_or_the_new_config() {
    for (failpoint, new_expected) in [
        ("replace_before_rename", false),
        ("replace_after_backup", false),
        ("replace_after_rename", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ferry.toml");
        let old = agent_config(
            dir.path(),
            1883,
            "http://127.0.0.1:9/v1/ingest",
            free_port(),
            "",
            "",
        );
        std::fs::write(&config, &old).unwrap();
        let mut pty = Pty::open();
        let mut child = console(
            &config,
            &pty,
            &[("FERRY_FAILPOINT", failpoint)],
            &dir.path().join("console.log"),
        );
        pty.expect("gw-test> ");
        pty.run("set uplink.batch_max_records 7", "gw-test> ");
        pty.line("save");
        let status = wait_child(&mut child);
        assert!(
            !status.success(),
            "{failpoint}: the process was not stopped"
        );
        let now = std::fs::read_to_string(&config).unwrap();
        let check = command(FERRY)
            .args(["check-config", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(check.status.success(), "{failpoint}: {now}");
        if new_expected {
            assert!(now.contains("batch_max_records = 7"), "{failpoint}: {now}");
        } else {
            assert_eq!(now, old, "{failpoint}");
        }
        if let Ok(bak) = std::fs::read_to_string(dir.path().join("ferry.toml.bak")) {
            assert_eq!(bak, old, "{failpoint}: the backup is the previous file");
        }
    }
}

#[test]
fn the_agents_console_survives_line_noise_and_says_a_stopped_cloud_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let mut cloud = Cloud::start(dir.path());
    let pty = Pty::open();
    let control = free_port();
    let text = agent_config(
        dir.path(),
        mq.port,
        &cloud.url(),
        control,
        "",
        &console_on(&pty),
    );
    let mut agent = Agent::start(&dir.path().join("agent"), &text, control);
    agent.wait_connected();
    let mut pty = pty;
    pty.sync("gw-test> ");

    // Line noise: random bytes, then Ctrl-C and Enter; the shell answers and goes on.
    let mut rng = ferry::rng::Rng::new(1);
    let noise: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
    pty.send(&noise);
    pty.send(b"\x03\r");
    pty.sync("gw-test> ");
    assert!(pty.run("help", "gw-test> ").contains("commands:"));

    // A 1 MiB line is refused, not held.
    pty.send(&vec![b'x'; 1 << 20]);
    pty.send(b"\r");
    pty.expect("line too long");
    pty.sync("gw-test> ");

    // Ctrl-C mid-line drops the line.
    pty.send(b"set uplink.url http://nowhere/\x03");
    pty.expect("^C\r\ngw-test> ");
    assert!(pty.run("diff", "gw-test> ").contains("no pending changes"));

    // The broker answers a probe with its own client id; the agent's session stays.
    let mqtt = pty.run("test mqtt", "gw-test> ");
    assert!(mqtt.contains("mqtt ok"), "{mqtt}");
    assert!(mqtt.contains("ferry-gw-test-probe"), "{mqtt}");
    assert_eq!(agent.status()["mqtt_connected"], true);

    assert!(pty.run("test uplink", "gw-test> ").contains("uplink ok"));
    cloud.stop();
    let uplink = pty.run("test uplink", "gw-test> ");
    assert!(uplink.contains("uplink FAILED"), "{uplink}");
    assert!(uplink.contains("connection refused"), "{uplink}");

    let status = pty.run("status", "gw-test> ");
    assert!(status.contains("mqtt          connected"), "{status}");
    let journal = pty.run("journal", "gw-test> ");
    assert!(journal.contains("backlog        0 records"), "{journal}");
    assert!(journal.contains("nothing waiting"), "{journal}");

    // Nothing in the output is an ANSI escape sequence.
    assert!(!pty.seen.contains('\x1b'));
    assert_eq!(agent.status()["device_id"], "gw-test");
    agent.stop();
}

#[test]
fn the_journal_command_shows_the_age_of_the_oldest_unsent_record() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let pty = Pty::open();
    let control = free_port();
    // No cloud: everything stays in the journal.
    let text = agent_config(
        dir.path(),
        mq.port,
        &format!("http://127.0.0.1:{}/v1/ingest", free_port()),
        control,
        "",
        &console_on(&pty),
    );
    let mut agent = Agent::start(&dir.path().join("agent"), &text, control);
    agent.wait_connected();
    publish(mq.port, "sensors/a", numbered(0..3));
    wait_until("3 journaled", Duration::from_secs(10), || {
        agent.status()["backlog_records"] == 3
    });
    let mut pty = pty;
    pty.sync("gw-test> ");
    let journal = pty.run("journal", "gw-test> ");
    assert!(journal.contains("backlog        3 records"), "{journal}");
    assert!(journal.contains("oldest unsent  received "), "{journal}");
    assert!(agent.status()["oldest_unsent_age_s"].is_u64());
    agent.stop();
}

#[test]
fn a_pin_guards_the_console_and_three_wrong_ones_make_it_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    // printf %s 1234 | sha256sum
    let pin = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4";
    let text = agent_config(
        dir.path(),
        1883,
        "http://127.0.0.1:9/v1/ingest",
        free_port(),
        "",
        &format!("\n[console]\npin_sha256 = \"{pin}\"\n"),
    );
    std::fs::write(&config, &text).unwrap();

    let mut pty = Pty::open();
    let mut child = console(&config, &pty, &[], &dir.path().join("a.log"));
    pty.expect("PIN: ");
    pty.line("1111");
    pty.expect("wrong PIN");
    pty.expect("PIN: ");
    pty.line("1234");
    let echoed = pty.expect("gw-test> ");
    assert!(echoed.contains("****"), "the PIN is not echoed: {echoed}");
    assert!(!echoed.contains("1234"));
    assert!(
        pty.run("show console", "gw-test> ")
            .contains("console.pin_sha256 = ****")
    );
    pty.line("exit");
    assert!(wait_child(&mut child).success());

    let mut pty = Pty::open();
    let mut child = console(&config, &pty, &[], &dir.path().join("b.log"));
    for _ in 0..3 {
        pty.expect("PIN: ");
        pty.line("0000");
        pty.expect("wrong PIN");
    }
    pty.expect("too many wrong PINs: wait 10 s");
    // What is typed during the wait is dropped; after it, the right PIN lets the technician in.
    pty.line("1234");
    pty.expect("PIN: ");
    pty.line("1234");
    pty.expect("gw-test> ");
    pty.line("exit");
    assert!(wait_child(&mut child).success());
}

/// Over SSH: no device, the shell runs on the terminal it was started from, puts it in raw mode
/// and gives it back as it was.
#[test]
fn the_console_runs_on_its_own_terminal_and_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    let text = agent_config(
        dir.path(),
        1883,
        "http://127.0.0.1:9/v1/ingest",
        free_port(),
        "",
        "",
    );
    std::fs::write(&config, &text).unwrap();
    let mut pty = Pty::open();
    let before = rustix::termios::tcgetattr(&pty.slave).unwrap();
    let mut child = command(FERRY)
        .args(["console", "-c"])
        .arg(&config)
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(File::create(dir.path().join("console.log")).unwrap())
        .spawn()
        .unwrap();
    pty.expect("gw-test> ");
    // Echo comes from the shell (the terminal's own echo is off), with backspace handled.
    pty.send(b"showx\x7f uplink.url\r");
    let out = pty.expect("gw-test> ");
    assert!(
        out.contains("uplink.url = \"http://127.0.0.1:9/v1/ingest\""),
        "{out}"
    );
    pty.line("exit");
    assert!(wait_child(&mut child).success());
    let after = rustix::termios::tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_modes, before.local_modes);
    assert_eq!(after.input_modes, before.input_modes);
}

#[test]
fn regenerating_the_identity_on_a_cloned_image_restarts_the_agent_with_the_new_id() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let pty = Pty::open();
    let control = free_port();
    let text = edited(
        agent_config(
            dir.path(),
            mq.port,
            &cloud.url(),
            control,
            "",
            &console_on(&pty),
        ),
        &[("id = \"gw-test\"\n", "")],
    );
    let mut agent = Agent::start(&dir.path().join("agent"), &text, control);
    agent.wait_connected();
    let pid = agent.pid();
    let old_id = agent.status()["device_id"].as_str().unwrap().to_owned();
    let mut pty = pty;
    let prompt = format!("{old_id}> ");
    pty.sync(&prompt);
    assert!(pty.run("identity", &prompt).contains("identity regenerate"));
    pty.line("identity regenerate");
    pty.expect("type yes to confirm: ");
    pty.line("yes");
    let out = pty.expect("agent restarting to apply: the new device id");
    let new_id = out
        .split("new device id ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(new_id, old_id);
    wait_until(
        "agent runs with the new id",
        Duration::from_secs(20),
        || {
            agent
                .try_status()
                .is_some_and(|s| s["device_id"] == new_id.as_str())
        },
    );
    // A restart in place: the same process, a second run.
    agent.wait_runs(2);
    assert_eq!(agent.pid(), pid);
    // The console comes back on the same line with the new id.
    pty.line("");
    pty.expect(&format!("{new_id}> "));
    agent.stop();
}

/// Each agent thread runs until shutdown. A console thread that dies (a bug: here a failpoint makes
/// it panic at the first command) must not leave the agent running without its console: the agent
/// says which thread stopped and exits with status 1, shutting down cleanly, so that its supervisor
/// (systemd's `Restart=always`) starts it whole again.
#[test]
fn a_console_thread_that_dies_stops_the_agent_for_its_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let mut pty = Pty::open();
    let control = free_port();
    let text = agent_config(
        dir.path(),
        mq.port,
        &cloud.url(),
        control,
        "",
        &console_on(&pty),
    );
    let mut agent = Agent::start_with_env(
        &dir.path().join("agent"),
        &text,
        control,
        &[("FERRY_FAILPOINT", "console_panic")],
    );
    agent.wait_connected();
    pty.expect("gw-test> ");
    pty.line("status");
    let status = agent
        .wait_exit_status(Duration::from_secs(15))
        .expect("the agent stopped after its console thread died");
    assert_eq!(status.code(), Some(1), "a failure exit for the supervisor");
    let log = agent.log_text();
    assert!(
        log.contains("thread console stopped unexpectedly"),
        "the log names the thread"
    );
    assert!(
        log.contains("stopped head_seq="),
        "the agent shut down cleanly"
    );
}
