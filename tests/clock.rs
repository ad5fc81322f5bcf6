//! Time on the gateway: timestamps that survive a wrong clock, and data that expires on purpose
//! (`journal.max_age`, a cloud that refuses old records). The real agent, under Debian's
//! libfaketime where its wall clock must move (faked through `LD_PRELOAD`, its monotonic clock
//! left alone), a real mosquitto and ferry-cloud.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry::journal::{self, Journal, Monotonic, NewRecord, StoredFormat};
use util::*;

const DEVICE: &str = "gw-test";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Debian's libfaketime, or `None` when the agent runs under qemu-user (a static ARM binary
/// ignores `LD_PRELOAD`: these tests need the host's build).
fn libfaketime() -> Option<PathBuf> {
    if std::env::var("FERRY_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty()) {
        eprintln!("skipped: libfaketime cannot reach an emulated static binary");
        return None;
    }
    let lib = [
        "x86_64-linux-gnu",
        "aarch64-linux-gnu",
        "arm-linux-gnueabihf",
    ]
    .iter()
    .map(|t| PathBuf::from(format!("/usr/lib/{t}/faketime/libfaketime.so.1")))
    .find(|p| p.exists());
    Some(lib.expect("libfaketime is missing: install Debian's faketime (make deps does)"))
}

/// The journal of the agent in `dir`, opened by the test to leave records in it before the agent
/// starts (as an earlier run would have).
fn journal_of(dir: &Path) -> Journal {
    Journal::open(&journal::Options {
        dir: dir.join("journal"),
        max_bytes: 64 << 20,
        on_full: journal::OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: 0,
        fixed_budget: None,
    })
    .unwrap()
}

/// The environment that runs the agent with its wall clock read from the offset in `file`
/// (`-1796000000s`, `+0s`), read again at every call, and the monotonic clock real.
fn faked_env(lib: &Path, file: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// The agent in `dir` with its wall clock faked (see [`faked_env`]).
fn start_faked(dir: &Path, config: &str, control: u16, lib: &Path, offset: &Path) -> Agent {
    let env = faked_env(lib, offset);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start_with_env(dir, config, control, &env)
}

/// Publishes one message `{"n": n}` and returns the real time it was published at (the middle
/// of the publish, which the broker acknowledged).
fn publish_one(port: u16, n: u64) -> u64 {
    let before = now_ms();
    publish(port, "sensors/a", numbered(n..n + 1));
    let after = now_ms();
    (before + after) / 2
}

/// The gateway boots at 1970 with no real-time clock; messages arrive; its clock is then set to
/// the real time (NTP's first sync). Every record reaches the cloud with a `ts_ms` within 1 s of
/// when it was published: the early ones held back until the clock was trusted, then corrected
/// from the monotonic clock and flagged, with the time they were stamped with kept.
#[test]
fn records_taken_before_the_clock_is_set_arrive_with_their_time_corrected() {
    let Some(lib) = libfaketime() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let offset = tmp.path().join("faketime");
    let real_s = now_ms() / 1000;
    std::fs::write(&offset, format!("-{real_s}s\n")).unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    // The harness's require_sync = false: this machine's kernel may say its clock is
    // unsynchronised whatever libfaketime shows; the build-time floor is what distrusts 1970 here.
    let config = agent_config(&dir, broker.port, &cloud.url(), control, "", "");
    let agent = start_faked(&dir, &config, control, &lib, &offset);
    agent.wait_connected();
    assert_eq!(agent.status()["clock"]["trusted"], false);

    let mut published = Vec::new();
    for n in 0..5 {
        published.push(publish_one(broker.port, n));
    }
    wait_until("five journaled", Duration::from_secs(20), || {
        agent.status()["head_seq"] == 5
    });
    wait_until(
        "the uplink waits for the clock",
        Duration::from_secs(20),
        || agent.status()["uplink"]["state"] == "waiting for the clock",
    );
    assert!(
        cloud.records(DEVICE).is_empty(),
        "sent before the clock was set"
    );

    // NTP arrives: the wall clock jumps 56 years forward.
    std::fs::write(&offset, "+0s\n").unwrap();
    wait_until("the clock trusted", Duration::from_secs(20), || {
        agent.status()["clock"]["trusted"] == true
    });
    for n in 5..10 {
        published.push(publish_one(broker.port, n));
    }
    wait_until("all ten at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 10
    });
    let mut records = cloud.records(DEVICE);
    assert_exactly_once(&records, 10);
    records.sort_by_key(|r| r["payload"]["n"].as_u64());
    for (r, at) in records.iter().zip(&published) {
        let ts = r["ts_ms"].as_u64().unwrap();
        assert!(
            ts.abs_diff(*at) <= 1000,
            "record {r}: ts_ms {ts} is {} ms from its publish at {at}",
            ts as i64 - *at as i64
        );
        let n = r["payload"]["n"].as_u64().unwrap();
        if n < 5 {
            assert_eq!(r["clock"], "corrected", "{r}");
            // Stamped in 1970.
            assert!(r["ts_ms_original"].as_u64().unwrap() < 86_400_000, "{r}");
        } else {
            assert!(r.get("clock").is_none(), "{r}");
            assert!(r.get("ts_ms_original").is_none(), "{r}");
        }
    }
    let status = agent.status();
    assert!(status["clock"]["jumps"].as_u64().unwrap() >= 1, "{status}");
    let log = agent.log_text();
    assert!(log.contains("wall clock jumped by +"), "{log}");
}

/// Records left in the journal by earlier boots: one whose clock was trusted later in that boot
/// (its anchor is in the journal) is corrected by it; one that rebooted before its clock was
/// ever trusted is sent flagged `unsynced`, as stamped, and nothing waits for it.
#[test]
fn records_of_earlier_boots_are_corrected_by_their_anchor_or_flagged_unsynced() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let anchored = [8u8; 16];
    let lost = [9u8; 16];
    let anchor = 1_796_000_000_000i64;
    {
        let j = journal_of(&dir);
        let rec = |n: u64, boot: [u8; 16]| NewRecord {
            ts_ms: 1_000 + n,
            topic: "sensors/a".into(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            format: StoredFormat::Json,
            parse_error: false,
            mono: Some(Monotonic {
                boot,
                ms: 60_000 + n,
            }),
            too_large: None,
            mqtt: None,
        };
        j.append(&[rec(1, anchored), rec(2, lost)]).unwrap();
        j.sync().unwrap();
        j.set_clock_anchor(&anchored, anchor).unwrap();
    }
    // Held records of this boot would wait a day: those of other boots never wait.
    let agent = Agent::standard_edited(
        &dir,
        broker.port,
        &cloud.url(),
        &[(
            "require_sync = false",
            "require_sync = true\nhold = \"24h\"",
        )],
    );
    wait_until("both at the cloud", Duration::from_secs(20), || {
        cloud.records(DEVICE).len() == 2
    });
    let mut records = cloud.records(DEVICE);
    records.sort_by_key(|r| r["seq"].as_u64());
    assert_eq!(records[0]["clock"], "corrected");
    assert_eq!(records[0]["ts_ms"], anchor as u64 + 60_001);
    assert_eq!(records[0]["ts_ms_original"], 1_001);
    assert_eq!(records[1]["clock"], "unsynced");
    assert_eq!(records[1]["ts_ms"], 1_002);
    assert_eq!(records[1]["ts_ms_original"], 1_002);
    drop(agent);
}

/// With `clock.require_sync` (the default) the kernel's word decides. On a machine whose kernel
/// says its clock is unsynchronised, records wait `clock.hold` and then go out flagged
/// `unsynced`; where it says synchronised, they go out as stamped. Either way, `/status` shows
/// what the kernel says and nothing waits for good.
#[test]
fn with_require_sync_records_wait_at_most_clock_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let agent = Agent::standard_edited(
        &tmp.path().join("agent"),
        broker.port,
        &cloud.url(),
        &[("require_sync = false", "require_sync = true\nhold = \"3s\"")],
    );
    agent.wait_connected();
    let status = agent.status();
    let synced = status["clock"]["kernel_synced"].as_bool().unwrap();
    assert_eq!(status["clock"]["trusted"], synced, "{status}");
    publish(broker.port, "sensors/a", numbered(0..3));
    wait_until("three at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 3
    });
    for r in cloud.records(DEVICE) {
        if synced {
            assert!(r.get("clock").is_none(), "{r}");
        } else {
            assert_eq!(r["clock"], "unsynced", "{r}");
            assert_eq!(r["ts_ms"], r["ts_ms_original"], "{r}");
        }
    }
    if !synced {
        assert!(
            agent
                .log_text()
                .contains("the kernel says it is not synchronised"),
            "{}",
            agent.log_text()
        );
    }
}

/// `journal.max_age = "1h"`: the cloud is down while five messages are journaled, then the
/// gateway's clock moves two hours on. The five become one `expired` gap within a minute, logged
/// and counted; when the cloud is back it receives the gap and the records taken since, and its
/// ledger shows the five as expired, not missing.
#[test]
fn unsent_records_older_than_max_age_expire_into_a_gap_the_center_shows() {
    let Some(lib) = libfaketime() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "+0s\n").unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    let config = edited(
        agent_config(&dir, broker.port, &cloud.url(), control, "", ""),
        &[(
            "max_bytes = \"64MiB\"",
            "max_bytes = \"64MiB\"\nmax_age = \"1h\"",
        )],
    );
    let agent = start_faked(&dir, &config, control, &lib, &offset);
    agent.wait_connected();
    wait_until("the clock trusted", Duration::from_secs(10), || {
        agent.status()["clock"]["trusted"] == true
    });
    cloud.stop();
    publish(broker.port, "sensors/a", numbered(0..5));
    wait_until("five journaled", Duration::from_secs(20), || {
        agent.status()["head_seq"] == 5
    });
    assert_eq!(agent.status()["expired"], 0);

    std::fs::write(&offset, "+7200s\n").unwrap();
    wait_until("the five expired", Duration::from_secs(60), || {
        agent.status()["expired"] == 5
    });
    let metrics = http_get(control, "/metrics");
    assert!(metrics.contains("ferry_expired_total 5"), "{metrics}");
    assert!(
        agent.log_text().contains("expired records 1..=5"),
        "{}",
        agent.log_text()
    );
    publish(broker.port, "sensors/a", numbered(5..8));
    cloud.start_again();
    wait_until(
        "the three taken since at the cloud",
        Duration::from_secs(30),
        || cloud.records(DEVICE).len() == 3,
    );
    assert_eq!(numbers(&cloud.records(DEVICE)), vec![5, 6, 7]);
    wait_until("the ledger balanced", Duration::from_secs(20), || {
        cloud
            .ledger(DEVICE)
            .is_some_and(|l| l["gaps"]["expired"] == 5 && l["missing"] == 0)
    });
}

/// A cloud that keeps a time window (`ferry-cloud --max-record-age`, as Loki refuses entries
/// older than its window) refuses a record from two days ago with a 422: the agent isolates it
/// into its dead letters after a few refusals, never retries it for good, and delivers the rest.
#[test]
fn a_record_the_cloud_refuses_as_too_old_goes_to_the_dead_letters() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start_with(
        &tmp.path().join("cloud"),
        free_port(),
        &["--max-record-age", "86400"],
    );
    let dir = tmp.path().join("agent");
    {
        // Left by an earlier run that could not upload for two days.
        let j = journal_of(&dir);
        let old = NewRecord {
            ts_ms: now_ms() - 2 * 86_400_000,
            topic: "sensors/a".into(),
            payload: b"{\"n\":0}".to_vec(),
            format: StoredFormat::Json,
            parse_error: false,
            mono: None,
            too_large: None,
            mqtt: None,
        };
        j.append(&[old]).unwrap();
        j.sync().unwrap();
    }
    let agent = Agent::standard(&dir, broker.port, &cloud.url());
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(1..20));
    wait_until(
        "the fresh ones at the cloud",
        Duration::from_secs(30),
        || cloud.records(DEVICE).len() == 19,
    );
    wait_until("the old one dead-lettered", Duration::from_secs(20), || {
        agent.status()["dead_letters"] == 1
    });
    let dl: Value = serde_json::from_str(&http_get(agent.control_port, "/dead-letters")).unwrap();
    assert_eq!(dl["dead_letters"][0]["seq"], 1);
    assert_eq!(dl["dead_letters"][0]["status"], 422);
    assert!(
        dl["dead_letters"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("too old")),
        "{dl}"
    );
    let refused = cloud.stats()["rejected"].as_u64().unwrap();
    assert!((1..=8).contains(&refused), "refused {refused} times");
    wait_until("the ledger balanced", Duration::from_secs(20), || {
        cloud
            .ledger(DEVICE)
            .is_some_and(|l| l["gaps"]["rejected"] == 1 && l["missing"] == 0)
    });
}
