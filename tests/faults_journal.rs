//! Journal faults with the real binary: a full journal under both policies, a full disk, a journal
//! that will not open or comes back shorter, a slow fsync, a broker that forgets everything.
#![allow(clippy::unwrap_used)]

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::*;

const DEVICE: &str = "gw-test";

fn payloads(range: std::ops::Range<u64>, size: usize) -> Vec<Vec<u8>> {
    range
        .map(|i| {
            let mut p = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
            p.resize(size - 2, b'x');
            p.extend_from_slice(b"\"}");
            p
        })
        .collect()
}

fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(path).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            du(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

fn gaps_total(device: &Value, reason: &str) -> u64 {
    device["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["reason"] == reason)
        .map(|g| g["to_seq"].as_u64().unwrap() - g["from_seq"].as_u64().unwrap() + 1)
        .sum()
}

/// mosquitto, a stopped ferry-cloud, and an agent with a 4 MiB journal and `on_full`, connected.
fn full_journal_setup(tmp: &std::path::Path, on_full: &str) -> (Mosquitto, Cloud, Agent) {
    let broker = Mosquitto::start(&tmp.join("mqtt"));
    let mut cloud = Cloud::start(&tmp.join("cloud"));
    cloud.stop();
    let dir = tmp.join("agent");
    let control = free_port();
    let config = edited(
        agent_config(
            &dir,
            broker.port,
            &cloud.url(),
            control,
            "max_packet_size = \"16KiB\"",
            "",
        ),
        &[(
            "max_bytes = \"64MiB\"",
            &format!("max_bytes = \"4MiB\"\non_full = \"{on_full}\""),
        )],
    );
    let agent = Agent::start(&dir, &config, control);
    agent.wait_connected();
    (broker, cloud, agent)
}

/// `reject_new`: a full journal stops acking, mosquitto queues for ferry's session, and once the
/// cloud drains the journal intake resumes; nothing published is lost.
#[test]
fn reject_new_stops_acking_and_loses_nothing_once_drained() {
    let tmp = tempfile::tempdir().unwrap();
    let (broker, mut cloud, agent) = full_journal_setup(tmp.path(), "reject_new");

    publish(broker.port, "sensors/full", payloads(0..3000, 1000));
    wait_until("the journal to refuse", Duration::from_secs(30), || {
        agent.status()["journal_accepting"] == false
    });
    let st = agent.status();
    let head = st["head_seq"].as_u64().unwrap();
    assert!(
        head < 3000,
        "a 4 MiB journal cannot hold 3 MB of records plus sled's overhead: {st}"
    );
    assert!(agent.log_text().contains("journal is full"));

    cloud.start_again();
    wait_until("all 3000 at the cloud", Duration::from_secs(90), || {
        cloud.device(DEVICE).is_some_and(|d| d["records"] == 3000)
    });
    assert_exactly_once(&cloud.records(DEVICE), 3000);
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["gaps"],
        serde_json::json!([]),
        "reject_new never drops"
    );
    assert!(agent.log_text().contains("journal accepting again"));
}

/// `drop_oldest`: the journal's bytes on disk stay under `journal.max_bytes`, and every dropped
/// record is reported to the cloud as part of an exact `journal_full` gap.
#[test]
fn drop_oldest_stays_under_max_bytes_and_reports_exact_gaps() {
    const MAX: u64 = 4 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let (broker, mut cloud, agent) = full_journal_setup(tmp.path(), "drop_oldest");
    let dir = tmp.path().join("agent");

    let mut peak = 0;
    let mut peak_listing = String::new();
    for chunk in 0..10u64 {
        publish(
            broker.port,
            "sensors/drop",
            payloads(chunk * 1000..(chunk + 1) * 1000, 1000),
        );
        wait_until("chunk journaled", Duration::from_secs(30), || {
            agent.status()["head_seq"].as_u64().unwrap() >= (chunk + 1) * 1000
        });
        let now = du(&dir.join("journal"));
        if now > peak {
            peak = now;
            let out = std::process::Command::new("du")
                .arg("-ab")
                .arg(dir.join("journal"))
                .output()
                .unwrap();
            peak_listing = format!("chunk {chunk}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    eprintln!("peak journal bytes on disk: {peak} (max_bytes {MAX})");
    assert!(
        peak <= MAX,
        "journal on disk {peak} > max_bytes {MAX} at {peak_listing}"
    );
    let dropped = agent.status()["totals"]["dropped"].as_u64().unwrap();
    assert!(dropped > 0, "10 MB cannot fit in 4 MiB without dropping");

    cloud.start_again();
    wait_until("everything accounted for", Duration::from_secs(60), || {
        agent.status()["acked_seq"] == 10_000
    });
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["missing"],
        serde_json::json!([]),
        "every seq is a record or a gap: {device}"
    );
    let records = device["records"].as_u64().unwrap();
    assert_eq!(
        gaps_total(&device, "journal_full"),
        dropped,
        "the gaps are exactly the dropped records"
    );
    assert_eq!(records + dropped, 10_000);
    // What survives is the newest: the last record published is there.
    assert_eq!(
        numbers(&cloud.records(DEVICE)).into_iter().max(),
        Some(9_999)
    );
}

/// A tmpfs of 16 MiB, mounted by the test, holds the journal.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test mounts a tmpfs and needs root (CI runs as root)"
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// ENOSPC: ferry stops acking, says so once at ERROR, keeps serving /status, does not corrupt the
/// journal, and resumes by itself once space returns.
#[test]
fn a_full_disk_stops_acking_logs_once_and_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("disk"));
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    cloud.stop();
    let dir = tmp.path().join("agent");
    let control = free_port();
    let journal = disk.path.join("journal");
    let config = edited(
        agent_config(
            &dir,
            broker.port,
            &cloud.url(),
            control,
            "max_packet_size = \"16KiB\"",
            "",
        ),
        &[(
            &format!("dir = \"{}\"", dir.join("journal").display()),
            &format!("dir = \"{}\"", journal.display()),
        )],
    );
    let agent = Agent::start(&dir, &config, control);
    agent.wait_connected();
    publish(broker.port, "sensors/disk", payloads(0..500, 1000));
    wait_until("500 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 500
    });

    let filler = disk.fill();
    publish(broker.port, "sensors/disk", payloads(500..3000, 1000));
    wait_until("writes to fail", Duration::from_secs(30), || {
        agent.status()["journal_accepting"] == false
    });
    // Still serving /status while failing, and still failing after the writer has tried to
    // reopen the journal three times more (every 2 s).
    let reopens = |agent: &Agent| {
        agent.status()["totals"]["journal_reopens"]
            .as_u64()
            .unwrap()
    };
    let first = reopens(&agent);
    wait_until("three more reopen tries", Duration::from_secs(30), || {
        reopens(&agent) >= first + 3
    });
    assert_eq!(agent.status()["journal_accepting"], false);
    let errors = agent
        .log_text()
        .matches("ERROR ferry::ingest::writer] journal write failed")
        .count();
    assert_eq!(
        errors, 1,
        "the full disk is reported once, not per message or per retry"
    );

    std::fs::remove_file(filler).unwrap();
    cloud.start_again();
    wait_until("all 3000 at the cloud", Duration::from_secs(90), || {
        cloud.device(DEVICE).is_some_and(|d| d["records"] == 3000)
    });
    assert_exactly_once(&cloud.records(DEVICE), 3000);
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["gaps"],
        serde_json::json!([]),
        "nothing was lost to the full disk: {device}"
    );
    assert!(agent.log_text().contains("journal writes recovered"));
}

/// A database that will not open is moved aside (kept, named with a timestamp) and a fresh one
/// starts; the record log beside it is adopted, so nothing is lost and nothing reported lost.
#[test]
fn an_unopenable_database_is_moved_aside_and_its_log_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    cloud.stop();
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(0..100));
    wait_until("100 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 100
    });
    agent.stop();

    // Damage: the database (the directory `journal/db` links to) is replaced by garbage.
    let db = std::fs::canonicalize(agent.dir.join("journal/db")).unwrap();
    std::fs::remove_dir_all(&db).unwrap();
    std::fs::write(&db, b"\x00garbage\xff").unwrap();

    agent.start_again();
    assert!(
        agent.log_text().contains("journal would not open"),
        "{}",
        agent.log_text()
    );
    let aside: Vec<_> = std::fs::read_dir(agent.dir.join("journal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("db.corrupt-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the unreadable journal is kept for forensics"
    );
    publish(broker.port, "sensors/a", numbered(100..150));
    cloud.start_again();
    wait_until("every record at the cloud", Duration::from_secs(30), || {
        cloud.device(DEVICE).is_some_and(|d| d["records"] == 150)
    });
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(device["gaps"], serde_json::json!([]), "nothing was lost");
    assert_eq!(device["missing"], serde_json::json!([]));
    assert_exactly_once(&cloud.records(DEVICE), 150);
}

/// sled opens a truncated database without complaint, with its tail gone. The seq mark outside
/// sled notices, reports the loss, and no seq is ever reused.
#[test]
fn a_journal_that_comes_back_shorter_never_reuses_seqs() {
    comes_back_shorter(|journal| truncate_to_a_quarter(&journal.join("db/db")));
}

/// The record log loses its synced tail (a disk that lied about fsync): the same guarantees.
#[test]
fn a_log_that_comes_back_shorter_never_reuses_seqs() {
    comes_back_shorter(|journal| {
        let mut segments: Vec<_> = std::fs::read_dir(journal.join("log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segments.sort();
        truncate_to_a_quarter(segments.last().unwrap());
    });
}

fn truncate_to_a_quarter(file: &std::path::Path) {
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len / 4)
        .unwrap();
}

fn comes_back_shorter(damage: impl Fn(&std::path::Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(0..50));
    wait_until("50 delivered", Duration::from_secs(30), || {
        agent.status()["acked_seq"] == 50
    });
    cloud.stop();
    publish(broker.port, "sensors/a", numbered(50..2000));
    wait_until("2000 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 2000
    });
    agent.stop();

    damage(&agent.dir.join("journal"));

    agent.start_again();
    cloud.start_again();
    publish(broker.port, "sensors/a", numbered(2000..2010));
    wait_until("the new records", Duration::from_secs(30), || {
        cloud
            .records(DEVICE)
            .iter()
            .any(|r| r["payload"]["n"] == 2009)
    });
    let records = cloud.records(DEVICE);
    let new_seqs: Vec<u64> = records
        .iter()
        .filter(|r| r["payload"]["n"].as_u64().unwrap() >= 2000)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        new_seqs.iter().all(|s| *s > 2000),
        "no seq reused after the loss: {new_seqs:?}"
    );
    // Every message is at the cloud at most once, and every seq is a record or a gap.
    let mut ns = numbers(&records);
    let n = ns.len();
    ns.sort();
    ns.dedup();
    assert_eq!(ns.len(), n, "no message twice");
    wait_until("nothing unaccounted", Duration::from_secs(30), || {
        cloud
            .device(DEVICE)
            .is_some_and(|d| d["missing"] == serde_json::json!([]))
    });
}

/// A slow disk (every group commit takes 12 s, with a 5 s keep-alive) must not stall the MQTT
/// connection: the broker keeps ferry's session and nothing is lost.
#[test]
fn a_slow_fsync_does_not_cost_the_mqtt_session() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    let config = agent_config(
        &dir,
        broker.port,
        &cloud.url(),
        control,
        "keep_alive = \"5s\"",
        "",
    );
    let mut agent = Agent::start(&dir, &config, control);
    agent.wait_connected();
    agent.stop();
    agent.start_again_with_env(&[("FERRY_FAILPOINT", "slow_sync_ms=12000")]);
    agent.wait_connected();

    publish(broker.port, "sensors/slow", numbered(0..20));
    // Two slow commits span more than 4 keep-alive periods.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        assert_eq!(
            agent.status()["mqtt_connected"],
            true,
            "the session held during the slow fsync"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_until("20 at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() >= 20
    });
    assert_exactly_once(&cloud.records(DEVICE), 20);
    let log = agent.log_text();
    assert!(!log.contains("mqtt connection lost"), "{log}");
    let broker_log =
        std::fs::read_to_string(tmp.path().join("mqtt/mosquitto.log")).unwrap_or_default();
    assert!(
        !broker_log.contains("exceeded timeout"),
        "the broker never timed ferry out: {broker_log}"
    );
}

/// mosquitto restarted without persistence forgets ferry's session: ferry re-subscribes on the new
/// CONNACK and everything published after that arrives.
#[test]
fn a_broker_without_persistence_is_resubscribed_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mqtt = tmp.path().join("mqtt");
    let mut broker = Mosquitto::start_on(&mqtt, port, "persistence false");
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let agent = Agent::standard(&tmp.path().join("agent"), port, &cloud.url());
    agent.wait_connected();
    publish(port, "sensors/a", numbered(0..100));
    wait_until("100 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 100
    });
    broker.restart();
    wait_until(
        "reconnected without a session",
        Duration::from_secs(20),
        || {
            agent
                .log_text()
                .contains("mqtt connected session_present=false")
                && agent.status()["mqtt_connected"] == true
        },
    );
    wait_until("re-subscribed", Duration::from_secs(10), || {
        agent
            .log_text()
            .matches("mqtt subscribed filter=sensors/#")
            .count()
            >= 2
    });
    publish(port, "sensors/b", numbered(100..200));
    wait_until("200 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 200
    });
    assert_exactly_once(&cloud.records(DEVICE), 200);
}

/// Regression: sled's segment size used to follow `mqtt.max_packet_size`; sled refuses a changed
/// one, and that was taken for damage, so changing the setting threw away a journal full of
/// unsent records (and values from 4 MiB up could not open at all).
#[test]
fn changing_max_packet_size_keeps_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    cloud.stop();
    let dir = tmp.path().join("agent");
    let control = free_port();
    let config = |size: &str| {
        agent_config(
            &dir,
            broker.port,
            &cloud.url(),
            control,
            &format!("max_packet_size = \"{size}\""),
            "",
        )
    };
    let mut agent = Agent::start(&dir, &config("256KiB"), control);
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(0..100));
    wait_until("100 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 100
    });
    for size in ["1MiB", "16MiB", "64KiB"] {
        agent.stop();
        std::fs::write(&agent.config, config(size)).unwrap();
        agent.start_again();
        let st = agent.status();
        assert_eq!(st["head_seq"], 100, "max_packet_size={size}: {st}");
        assert_eq!(st["backlog_records"], 100, "max_packet_size={size}: {st}");
    }
    cloud.start_again();
    wait_until("100 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 100
    });
    assert_exactly_once(&cloud.records(DEVICE), 100);
    assert!(!agent.log_text().contains("would not open"));
}
