//! Crash safety: SIGKILL the agent at random moments while it ingests and uploads, restart it, and
//! check that every message the broker accepted reaches the cloud, once.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::{Duration, Instant};

use util::*;

const DEVICE: &str = "gw-test";

fn seed() -> u64 {
    std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let kills: u32 = std::env::var("FERRY_TEST_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = seed();
    eprintln!("crash test seed={seed} (FERRY_TEST_SEED to repeat) kills={kills}");
    let mut rng = ferry::rng::Rng::new(seed);
    let mut next = move |n: u64| rng.below(n);

    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();

    // Publish steadily in the background while the agent is killed and restarted.
    const TOTAL: u64 = 4000;
    let port = broker.port;
    let publisher = std::thread::spawn(move || {
        let mut sent = 0;
        for chunk in 0..40u64 {
            sent += publish(
                port,
                "sensors/crash",
                numbered(chunk * 100..(chunk + 1) * 100),
            );
            std::thread::sleep(Duration::from_millis(150));
        }
        sent
    });

    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(50 + next(600)));
        agent.kill();
        agent.start_again();
    }
    let accepted = publisher.join().unwrap() as u64;
    assert_eq!(accepted, TOTAL, "the broker accepted every publish");

    let end = Instant::now() + Duration::from_secs(90);
    while cloud
        .device(DEVICE)
        .map(|d| d["records"].as_u64().unwrap())
        .unwrap_or(0)
        < TOTAL
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = cloud.records(DEVICE);
    if let Err(e) = check_exactly_once(&records, TOTAL) {
        panic!(
            "{e}\nseed={seed} kills={kills}; agent status: {}",
            agent.status()
        );
    }
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["missing"],
        serde_json::json!([]),
        "no seq is unaccounted for: {device}"
    );
    assert_eq!(
        device["gaps"],
        serde_json::json!([]),
        "no seq was given up: {device}"
    );
}

/// Regression for the crash window between the journal's fsync and the PUBACK: the broker
/// redelivers every unacked message with DUP, and those already journaled must not get a second
/// seq (they would reach the cloud as different records).
#[test]
fn a_crash_between_fsync_and_puback_does_not_journal_redeliveries_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    // Let the session exist, then restart the agent with the failpoint armed.
    agent.stop();
    agent.start_again_with_env(&[("FERRY_FAILPOINT", "crash_after_sync")]);
    wait_until(
        "the armed agent to connect",
        Duration::from_secs(10),
        || agent.log_text().matches("mqtt connected").count() >= 2,
    );
    publish(broker.port, "sensors/dup", numbered(0..20));
    assert!(
        agent.wait_exit(Duration::from_secs(10)),
        "the failpoint fired"
    );
    assert!(agent.log_text().contains("failpoint crash_after_sync"));

    agent.start_again();
    wait_until("20 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() >= 20
    });
    // The crashed run may have uploaded all 20 before it aborted: the cloud having them says
    // nothing of the redeliveries, which arrive once the new run is connected.
    wait_until(
        "the broker's redeliveries to reach the agent",
        Duration::from_secs(30),
        || {
            agent.status()["totals"]["redeliveries"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    );
    let st = agent.status();
    assert_exactly_once(&cloud.records(DEVICE), 20);
    assert_eq!(st["head_seq"], 20, "no message got a second seq: {st}");
}

/// A broker with no in-flight limit (as mosquitto 2.0.11 behaves on a resumed session), a cloud,
/// and an agent whose persistent session exists, running again with `env` and connected.
fn unlimited_broker_and_agent(
    tmp: &std::path::Path,
    env: &[(&str, &str)],
) -> (Mosquitto, Cloud, Agent) {
    let broker = Mosquitto::start_on(&tmp.join("mqtt"), free_port(), "max_inflight_messages 0");
    let cloud = Cloud::start(&tmp.join("cloud"));
    let mut agent = Agent::standard(&tmp.join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    agent.stop();
    agent.start_again_with_env(env);
    agent.wait_connected();
    (broker, cloud, agent)
}

/// Regression for a flake of `sigkill_at_random_moments_loses_nothing` under qemu: mosquitto 2.0.11
/// stops holding a resumed session to `max_inflight_messages` once it acks, and sends it everything
/// queued; rumqttc writes one PUBACK per poll, behind the publishes it has read, so thousands of
/// journaled messages could be waiting for their PUBACK when the agent died. The broker redelivered
/// them all with DUP, and those older than the journal's redelivery marks (the newest 1,024) were
/// journaled a second time. Here the broker has no in-flight limit at all and the agent sends no
/// PUBACK (a backlog that never drains); once all 3,000 messages have reached it, it stops, and the
/// next run gets every one of them again, with DUP.
#[test]
fn a_puback_backlog_beyond_the_redelivery_marks_journals_nothing_twice() {
    const N: u64 = 3000;
    let tmp = tempfile::tempdir().unwrap();
    // PUBACKs held and every PUBLISH logged.
    let (broker, cloud, mut agent) = unlimited_broker_and_agent(
        tmp.path(),
        &[
            ("FERRY_FAILPOINT", "hold_pubacks"),
            (
                "FERRY_LOG",
                "info,ferry=debug,ferry_journal=debug,ferry::ingest=trace",
            ),
        ],
    );
    publish(broker.port, "sensors/held", numbered(0..N));
    wait_until(
        "every message delivered to the agent",
        Duration::from_secs(60),
        || {
            agent
                .log_text()
                .matches("mqtt publish topic=sensors/held")
                .count() as u64
                >= N
        },
    );
    // A clean stop: what the journal writer was handed is journaled, nothing is acked.
    agent.stop();

    agent.start_again();
    wait_until(
        "every redelivery to be taken",
        Duration::from_secs(60),
        || {
            let t = &agent.status()["totals"];
            t["ingested"].as_u64().unwrap() + t["redeliveries"].as_u64().unwrap() >= N
        },
    );
    let st = agent.status();
    assert_eq!(st["head_seq"], N, "no message got a second seq: {st}");
    assert!(
        st["totals"]["redeliveries"].as_u64().unwrap() >= 1,
        "the journaled messages came back and were recognised: {st}"
    );
    wait_until("all at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() as u64 >= N
    });
    assert_exactly_once(&cloud.records(DEVICE), N);
}

/// A journal far behind a broker that sends without limit (a slow disk after a resumed session,
/// when mosquitto 2.0.11 stops enforcing its in-flight window): the agent must not buffer without
/// bound. Past its limit (lowered to 100 messages here) it leaves new QoS1 messages with the
/// broker, unacknowledged, catches up, reconnects and takes them back: every message journaled
/// once, in the end, and none lost.
#[test]
fn a_journal_far_behind_leaves_messages_with_the_broker_and_takes_each_back_once() {
    const N: u64 = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let (broker, cloud, agent) = unlimited_broker_and_agent(
        tmp.path(),
        &[("FERRY_FAILPOINT", "slow_sync_ms=100,ingest_overflow=100")],
    );
    publish(broker.port, "sensors/flood", numbered(0..N));
    wait_until("every message journaled", Duration::from_secs(120), || {
        agent.status()["head_seq"].as_u64().unwrap() >= N
    });
    let st = agent.status();
    assert!(
        st["totals"]["left_with_broker"].as_u64().unwrap() > 0,
        "the agent left messages with the broker rather than buffer them all: {st}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("leaving new messages with the broker"),
        "the agent said so at WARN"
    );
    assert!(
        log.matches("mqtt connected session_present=true").count() >= 2,
        "the agent reconnected to take the messages back"
    );
    wait_until("all at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() as u64 >= N
    });
    assert_eq!(agent.status()["head_seq"], N, "no message got a second seq");
    assert_exactly_once(&cloud.records(DEVICE), N);
}
