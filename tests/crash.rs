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
                | 1
        })
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let kills: u32 = std::env::var("FERRY_TEST_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = seed();
    eprintln!("crash test seed={rng} (FERRY_TEST_SEED to repeat) kills={kills}");
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };

    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard(&tmp.path().join("agent"), broker.port, &cloud.url());
    wait_until("mqtt connected", Duration::from_secs(10), || {
        agent.status()["mqtt_connected"] == true
    });

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
    assert_exactly_once(&records, TOTAL);
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
