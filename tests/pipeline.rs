//! The store-and-forward story end to end: real mosquitto, real ferry-cloud, the real agent.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

const DEVICE: &str = "gw-test";

/// The field report this product exists for: the link drops, messages keep coming, the link comes
/// back. All 2,000 must arrive once and in order.
#[test]
fn outage_loses_nothing_and_delivers_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    let agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());

    wait_until("mqtt connected", Duration::from_secs(10), || {
        agent.status()["mqtt_connected"] == true
    });
    publish(broker.port, "sensors/a", numbered(0..1000));
    wait_until("first 1000 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 1000
    });

    cloud.stop();
    publish(broker.port, "sensors/a", numbered(1000..2000));
    wait_until("all 2000 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 2000
    });
    assert!(agent.status()["backlog_records"].as_u64().unwrap() >= 1000 - 100);

    cloud.start_again();
    wait_until("all 2000 at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() >= 2000
    });
    let records = cloud.records(DEVICE);
    assert_exactly_once(&records, 2000);
    assert_eq!(
        numbers(&records),
        (0..2000).collect::<Vec<_>>(),
        "records arrive in publish order"
    );
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
    wait_until("cursor at head", Duration::from_secs(10), || {
        agent.status()["acked_seq"] == 2000
    });
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(device["missing"], serde_json::json!([]));
}

/// A clean restart with a backlog resumes at the cursor: nothing acknowledged is sent again.
#[test]
fn restart_with_backlog_resumes_at_the_cursor_without_resending() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());

    wait_until("mqtt connected", Duration::from_secs(10), || {
        agent.status()["mqtt_connected"] == true
    });
    publish(broker.port, "sensors/a", numbered(0..500));
    wait_until("500 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() == 500
    });
    wait_until("cursor at 500", Duration::from_secs(10), || {
        agent.status()["acked_seq"] == 500
    });

    cloud.stop();
    publish(broker.port, "sensors/a", numbered(500..1000));
    wait_until("backlog journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 1000
    });
    let stop_took = agent.stop();
    assert!(
        stop_took < Duration::from_secs(10),
        "shutdown took {stop_took:?}"
    );

    cloud.start_again();
    agent.start_again();
    let st = agent.status();
    assert!(
        st["acked_seq"].as_u64().unwrap() >= 500,
        "cursor survived the restart: {st}"
    );
    wait_until("all 1000 at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() >= 1000
    });
    assert_exactly_once(&cloud.records(DEVICE), 1000);
    let stats = cloud.stats();
    assert_eq!(
        stats["duplicates"], 0,
        "no acknowledged record was sent again: {stats}"
    );
    assert!(
        agent
            .log_text()
            .contains("journal opened head_seq=1000 acked_seq=500"),
        "{}",
        agent.log_text()
    );
}

/// The broker restarts (persistent session): the agent reconnects, re-subscribes and loses nothing,
/// including what was published while it was disconnected.
#[test]
fn broker_restart_reconnects_resubscribes_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());

    wait_until("mqtt connected", Duration::from_secs(10), || {
        agent.status()["mqtt_connected"] == true
    });
    publish(broker.port, "sensors/a", numbered(0..300));
    broker.restart();
    wait_until("mqtt reconnected", Duration::from_secs(20), || {
        agent.status()["mqtt_connected"] == true
    });
    publish(broker.port, "sensors/b", numbered(300..600));
    wait_until("600 at the cloud", Duration::from_secs(60), || {
        cloud.records(DEVICE).len() >= 600
    });
    assert_exactly_once(&cloud.records(DEVICE), 600);
}

/// The broker is not there when the agent starts: it waits (with backoff), then connects, and
/// messages queued for its session meanwhile are delivered.
#[test]
fn broker_unreachable_at_start_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let mqtt_port = free_port();
    let agent = Agent::standard(&tmp.path().join("agent"), mqtt_port, &cloud.url());
    wait_until("a failed connect attempt", Duration::from_secs(10), || {
        agent.log_text().contains("mqtt connect failed")
    });
    assert_eq!(agent.status()["mqtt_connected"], false);

    let broker = Mosquitto::start_on(&tmp.path().join("mqtt"), mqtt_port, "");
    wait_until("mqtt connected", Duration::from_secs(20), || {
        agent.status()["mqtt_connected"] == true
    });
    publish(broker.port, "sensors/a", numbered(0..200));
    wait_until("200 at the cloud", Duration::from_secs(30), || {
        cloud.records(DEVICE).len() >= 200
    });
    assert_exactly_once(&cloud.records(DEVICE), 200);
}
