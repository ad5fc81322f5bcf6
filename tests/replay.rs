//! Replay storms: after a long outage the backlog drains at the configured rate, not at full
//! speed, and `/status` says how fast and how long.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::{Duration, Instant};

use util::*;

const DEVICE: &str = "gw-test";

/// A 40,000-record backlog drained with `uplink.max_records_per_sec = 2000` (well under what a
/// debug build drains unlimited): in no stretch of the drain of 2 s or more does the cloud receive
/// more than the token bucket allows, and the drain finishes. The rate it reaches is a figure for `make bench` ("drain limited by ..."), not a
/// pass/fail test on a shared machine.
#[test]
fn a_backlog_drains_at_the_configured_rate() {
    const LIMIT: f64 = 2_000.0;
    const TOTAL: u64 = 40_000;
    const BATCH: u64 = 500;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start(&tmp.path().join("cloud"));
    cloud.stop();
    let dir = tmp.path().join("agent");
    let agent = Agent::standard_edited(
        &dir,
        broker.port,
        &cloud.url(),
        &[
            (
                "batch_max_records = 100",
                "batch_max_records = 500\nmax_records_per_sec = 2000",
            ),
            ("max_bytes = \"64MiB\"", "max_bytes = \"1GiB\""),
        ],
    );
    agent.wait_connected();

    let t = Instant::now();
    publish(broker.port, "sensors/storm", numbered(0..TOTAL));
    wait_until("backlog journaled", Duration::from_secs(120), || {
        agent.status()["head_seq"] == TOTAL
    });
    eprintln!("journaled {TOTAL} in {:?}", t.elapsed());

    cloud.start_again();
    // (before, after, count): the count was read at some moment between the two instants.
    let mut samples: Vec<(Instant, Instant, u64)> = Vec::new();
    let mut saw_eta = false;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let before = Instant::now();
        let n = cloud
            .device(DEVICE)
            .map(|d| d["records"].as_u64().unwrap())
            .unwrap_or(0);
        samples.push((before, Instant::now(), n));
        let st = agent.status();
        if n > 20_000 && n < 80_000 && !saw_eta {
            eprintln!(
                "mid-drain status: eta={} uplink={}",
                st["backlog_eta_s"], st["uplink"]
            );
            let rate = st["uplink"]["drain_records_per_sec"].as_f64().unwrap();
            saw_eta |= st["backlog_eta_s"].as_u64().is_some_and(|eta| eta > 0) && rate > 0.0;
        }
        if n >= TOTAL {
            break;
        }
        assert!(
            Instant::now() < end,
            "the drain stalled: {n} of {TOTAL} after 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every stretch of 2 s or more between two samples: what arrived in it against the limit.
    // The stretch runs from before the first count was read to after the second was, so it
    // holds every record the difference counts.
    let mut worst = 0.0f64;
    for (i, &(t1, _, n1)) in samples.iter().enumerate() {
        for &(_, t2, n2) in &samples[i + 1..] {
            let secs = (t2 - t1).as_secs_f64();
            if secs < 2.0 {
                continue;
            }
            // The token bucket's bound: the rate over the stretch, plus the second's worth it
            // saves up while idle (the drain starts after the outage with a full bucket), plus
            // one batch of overdraft (a batch goes while the balance is not negative) and the
            // batches in flight (two) sent before the stretch and counted in it.
            let allowed = LIMIT * (secs + 1.0) + 3.0 * BATCH as f64;
            worst = worst.max((n2 - n1) as f64 / allowed);
            assert!(
                (n2 - n1) as f64 <= allowed,
                "{} records arrived in {secs:.1} s, over the limit of {LIMIT}/s",
                n2 - n1
            );
        }
    }
    eprintln!("largest share of the allowance used in any stretch: {worst:.2}");
    assert!(
        saw_eta,
        "/status showed the drain rate and an estimate of the time to drain"
    );
    assert_exactly_once(&cloud.records(DEVICE), TOTAL);
}

/// A cloud that protects itself with 429 + `Retry-After`: the agent (with no limit of its own)
/// slows down by itself instead of hammering, honours Retry-After, and delivers everything once.
#[test]
fn pushback_from_the_cloud_slows_the_drain_by_itself() {
    const TOTAL: u64 = 10_000;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut cloud = Cloud::start_with(
        &tmp.path().join("cloud"),
        free_port(),
        &["--max-records-per-sec", "2000"],
    );
    cloud.stop();
    let dir = tmp.path().join("agent");
    let agent = Agent::standard_edited(
        &dir,
        broker.port,
        &cloud.url(),
        &[("batch_max_records = 100", "batch_max_records = 500")],
    );
    agent.wait_connected();
    publish(broker.port, "sensors/storm", numbered(0..TOTAL));
    wait_until("backlog journaled", Duration::from_secs(60), || {
        agent.status()["head_seq"] == TOTAL
    });

    cloud.start_again();
    let mut saw_limit = false;
    wait_until("all delivered", Duration::from_secs(120), || {
        let st = agent.status();
        saw_limit |= st["uplink"]["limit_records_per_sec"].as_f64().is_some();
        st["acked_seq"] == TOTAL
    });
    assert!(saw_limit, "after a 429 the agent set itself a drain limit");
    assert_exactly_once(&cloud.records(DEVICE), TOTAL);
    let stats = cloud.stats();
    let throttled = stats["status"]["429"].as_u64().unwrap_or(0);
    let requests = stats["requests"].as_u64().unwrap();
    eprintln!("requests={requests} throttled={throttled}");
    assert!(throttled >= 1, "the cloud did push back: {stats}");
    assert!(
        throttled * 4 < requests,
        "the agent slowed down instead of hammering: {stats}"
    );
    // Every retry after a 429 waited at least the Retry-After second.
    let log = agent.log_text();
    for line in log.lines().filter(|l| l.contains("status 429")) {
        let Some(wait) = line.split("retry_in=").nth(1) else {
            continue;
        };
        assert!(
            !wait.starts_with("0") && !wait.contains("ms"),
            "retried sooner than Retry-After: {line}"
        );
    }
}
