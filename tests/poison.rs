//! One bad record must not block the batch or re-deliver its healthy neighbours again and again.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

const DEVICE: &str = "gw-test";

#[test]
fn a_poison_record_is_dead_lettered_and_the_rest_is_delivered_once() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start_with(
        &tmp.path().join("cloud"),
        free_port(),
        &["--reject-marker", "POISON"],
    );
    let mut cloud = cloud;
    // Journal everything first, then let the agent upload full batches of 100.
    cloud.stop();
    let agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    let mut payloads = numbered(0..300);
    payloads[157] = br#"{"n":157,"note":"POISON"}"#.to_vec();
    publish(broker.port, "sensors/p", payloads);
    wait_until("300 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 300
    });
    cloud.start_again();

    wait_until("the rest delivered", Duration::from_secs(60), || {
        agent.status()["acked_seq"] == 300
    });
    // In seq order: two uploads may be in flight, so the cloud may store a batch before the one
    // ahead of it.
    let mut records = cloud.records(DEVICE);
    records.sort_by_key(|r| r["seq"].as_u64());
    let got = numbers(&records);
    let want: Vec<u64> = (0..300).filter(|n| *n != 157).collect();
    assert_eq!(got, want);

    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["gaps"],
        serde_json::json!([{"from_seq": 158, "to_seq": 158, "reason": "rejected"}])
    );
    assert_eq!(device["missing"], serde_json::json!([]));

    let stats = cloud.stats();
    assert_eq!(
        stats["duplicates"], 0,
        "healthy records were accepted exactly once: {stats}"
    );
    // One refused batch of 100 is bisected down to one record: 100 -> 50 -> 25 -> 13 -> 7 -> 4 -> 2 -> 1.
    let refused = stats["rejected"].as_u64().unwrap();
    assert!(
        (1..=8).contains(&refused),
        "refusals needed to isolate one record in 100: {refused}"
    );

    let st = agent.status();
    assert_eq!(st["dead_letters"], 1);
    assert_eq!(st["totals"]["dead_lettered"], 1);
    let dl: Value = serde_json::from_str(&http_get(agent.control_port, "/dead-letters")).unwrap();
    assert_eq!(dl["dead_letters"][0]["seq"], 158);
    assert_eq!(dl["dead_letters"][0]["status"], 422);
}

/// Regression: two adjacent refused records wedged the uplink for good (it stopped at acked 159 of
/// 300, spinning): after the first dead letter, a window the cloud had already acknowledged was
/// left on top of the split plan with nothing in it to send.
#[test]
fn adjacent_poison_records_do_not_wedge_the_uplink() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start_with(
        &tmp.path().join("cloud"),
        free_port(),
        &["--reject-marker", "POISON"],
    );
    cloud.stop();
    let agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    agent.wait_connected();
    let mut payloads = numbered(0..300);
    for n in [156usize, 157, 200] {
        payloads[n] = format!("{{\"n\":{n},\"note\":\"POISON\"}}").into_bytes();
    }
    publish(broker.port, "sensors/p", payloads);
    wait_until("300 journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == 300
    });
    cloud.start_again();
    wait_until("everything accounted for", Duration::from_secs(60), || {
        agent.status()["acked_seq"] == 300
    });
    let want: Vec<u64> = (0..300).filter(|n| ![156, 157, 200].contains(n)).collect();
    let mut records = cloud.records(DEVICE);
    records.sort_by_key(|r| r["seq"].as_u64());
    assert_eq!(numbers(&records), want);
    assert_eq!(agent.status()["dead_letters"], 3);
    assert_eq!(cloud.stats()["duplicates"], 0);
}
