//! systemd integration of the real binary: with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd
//! sets them for `Type=notify` and `WatchdogSec=`, ferry says READY=1, pings the watchdog while
//! healthy, withholds the pings while its journal writer is stuck, and says STOPPING=1 on SIGTERM.
#![allow(clippy::unwrap_used)]

mod util;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use util::*;

/// Collects every datagram that arrived at `sock` within `within`, until `done` holds for the
/// messages so far.
fn receive_until(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    within: Duration,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let end = Instant::now() + within;
    let mut buf = [0u8; 512];
    while !done(got) {
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what}; got {got:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn watchdog_pings_stop_while_the_journal_writer_is_stuck_and_resume_after() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    // A 2 s watchdog: pings every second. Every group commit takes 8 s: the writer is stuck for
    // four watchdog periods once a message arrives.
    let mut agent = Agent::start_with_env(
        &dir,
        &agent_config(&dir, broker.port, &cloud.url(), control, "", ""),
        control,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
            ("FERRY_FAILPOINT", "slow_sync_ms=8000"),
        ],
    );
    let mut got = Vec::new();
    let pings = |m: &[String]| m.iter().filter(|s| s.as_str() == "WATCHDOG=1").count();
    receive_until(&sock, &mut got, Duration::from_secs(20), "two pings", |m| {
        pings(m) >= 2
    });
    assert!(
        got[0].starts_with("READY=1"),
        "READY=1 comes first: {got:?}"
    );
    agent.wait_connected();

    publish(broker.port, "sensors/watchdog", numbered(0..1));
    receive_until(
        &sock,
        &mut got,
        Duration::from_secs(30),
        "the stall to be reported",
        |m| {
            m.iter()
                .any(|s| s.contains("STATUS=journal writer stalled"))
        },
    );
    let stalled_at = got
        .iter()
        .position(|s| s.contains("STATUS=journal writer stalled"))
        .unwrap();
    receive_until(
        &sock,
        &mut got,
        Duration::from_secs(30),
        "pings to resume",
        |m| m[stalled_at..].iter().any(|s| s.starts_with("WATCHDOG=1")),
    );
    let resumed = &got[stalled_at + 1..];
    assert!(
        resumed[0].starts_with("WATCHDOG=1\nSTATUS=running"),
        "no ping between the stall and the recovery: {got:?}"
    );
    assert!(
        agent.log_text().contains("withholding watchdog pings"),
        "the stall is logged"
    );

    agent.stop();
    receive_until(&sock, &mut got, Duration::from_secs(5), "STOPPING=1", |m| {
        m.iter().any(|s| s == "STOPPING=1")
    });
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_agent_runs() {
    // The plain `ferry run` path is every other test; here only an unusable NOTIFY_SOCKET, which
    // must not stop the agent.
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    let missing = tmp.path().join("nobody-listens.sock");
    let mut agent = Agent::start_with_env(
        &dir,
        &agent_config(&dir, broker.port, &cloud.url(), control, "", ""),
        control,
        &[("NOTIFY_SOCKET", missing.to_str().unwrap())],
    );
    agent.wait_connected();
    publish(broker.port, "sensors/plain", numbered(0..5));
    wait_until("5 at the cloud", Duration::from_secs(20), || {
        cloud.records("gw-test").len() >= 5
    });
    assert!(
        agent.log_text().contains("cannot send \"READY=1"),
        "the failed notification is logged: {}",
        agent.log_text()
    );
    agent.stop();
}
