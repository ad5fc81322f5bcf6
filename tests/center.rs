//! The center at fleet scale (issue 12): `ferry-cloud` replicas sharing one real PostgreSQL,
//! behind a real nginx. Any replica takes any batch of any device: one device's batches raced
//! across two replicas are stored once, with no false clash; real agents lose nothing when a
//! replica is killed mid-stream, and when the database is killed and started again (the replicas
//! answer 503 while it is down, and the agents' journals hold the data).
#![allow(clippy::unwrap_used)]

mod util;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ferry_testkit::Postgres;
use serde_json::json;
use util::*;

fn postgres(dir: &Path) -> Postgres {
    Postgres::start(&dir.join("pg"), free_port()).unwrap_or_else(|e| panic!("{e}"))
}

/// POSTs `body` to `port`'s `/v1/ingest` until it is answered other than 503 (the database busy
/// or away), within a deadline; the status and body of that answer.
fn post_batch(http: &ureq::Agent, port: u16, body: &Value) -> (u16, Value) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let mut response = http
            .post(format!("http://127.0.0.1:{port}/v1/ingest"))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .expect("post reaches ferry-cloud");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        if status != 503 || Instant::now() > end {
            return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn http() -> ureq::Agent {
    http_client(Duration::from_secs(30))
}

/// The agent keeps two uploads in flight and retries on any replica; a load balancer may send a
/// device's batches, and a resend of an old one, to different replicas at once. Here every batch
/// of each device goes to both replicas at the same time (one sender in order, the other in
/// reverse): each record must be accepted exactly once in all, every other copy counted a
/// duplicate, never a clash, and both replicas must give the same account.
#[test]
fn one_devices_batches_raced_across_two_replicas_are_stored_once_without_false_clash() {
    const DEVICES: u64 = 3;
    const N: u64 = 600;
    const BATCH: u64 = 20;
    let tmp = tempfile::tempdir().unwrap();
    let pg = postgres(tmp.path());
    let a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &[]);
    let b = Cloud::start_postgres(&tmp.path().join("b"), &pg.url(), &[]);

    let batches = |device: u64| -> Vec<Value> {
        (0..N / BATCH)
            .map(|i| {
                let from = i * BATCH + 1;
                let records: Vec<Value> = (from..from + BATCH)
                    .map(|seq| {
                        json!({"seq": seq, "ts_ms": 1_763_700_000_000u64 + seq,
                               "topic": "site/t", "payload": {"n": seq - 1, "device": device}})
                    })
                    .collect();
                json!({"device_id": format!("gw-{device}"), "records": records,
                       "held": {"head_seq": N, "acked_seq": from - 1}})
            })
            .collect()
    };
    let mut senders = Vec::new();
    for device in 0..DEVICES {
        for (port, reverse) in [(a.port, false), (b.port, true)] {
            let mut list = batches(device);
            if reverse {
                list.reverse();
            }
            senders.push(thread::spawn(move || {
                let http = http();
                let (mut accepted, mut duplicates) = (0, 0);
                for batch in &list {
                    let (status, answer) = post_batch(&http, port, batch);
                    assert_eq!(status, 200, "gw-{device} to {port}: {answer}");
                    accepted += answer["accepted"].as_u64().unwrap();
                    duplicates += answer["duplicates"].as_u64().unwrap();
                }
                (device, accepted, duplicates)
            }));
        }
    }
    let mut accepted = vec![0; DEVICES as usize];
    let mut duplicates = vec![0; DEVICES as usize];
    for sender in senders {
        let (device, a, d) = sender.join().expect("sender thread");
        accepted[device as usize] += a;
        duplicates[device as usize] += d;
    }
    assert_eq!(accepted, vec![N; DEVICES as usize], "accepted once in all");
    assert_eq!(
        duplicates,
        vec![N; DEVICES as usize],
        "every copy a duplicate"
    );

    for device in 0..DEVICES {
        let id = format!("gw-{device}");
        for cloud in [&a, &b] {
            assert_exactly_once(&cloud.records(&id), N);
            let l = cloud.ledger(&id).unwrap();
            assert_eq!(
                (
                    &l["delivered"],
                    &l["waiting"],
                    &l["missing"],
                    &l["balanced"]
                ),
                (&json!(N), &json!(0), &json!(0), &json!(true)),
                "{l}"
            );
            assert_eq!(l["states"], json!(["healthy"]), "{l}");
        }
        let summary = a.device(&id).unwrap();
        assert_eq!(summary["clashes_total"], 0, "{summary}");
    }

    // A true clash is still one, whichever replica stored the original.
    let mut clone = batches(0).remove(0);
    clone["records"][3]["payload"]["n"] = json!(999);
    let (status, answer) = post_batch(&http(), b.port, &clone);
    assert_eq!(status, 409, "{answer}");
    let seen_by_a = a.device("gw-0").unwrap();
    assert_eq!(seen_by_a["clashes_total"], 1, "{seen_by_a}");
    assert_eq!(seen_by_a["clashes"][0]["seq"], 4, "{seen_by_a}");
}

/// Real agents upload through nginx to two replicas while the center fails around them: one
/// replica is SIGKILLed mid-stream (nginx keeps sending it half the requests: 502s the agents
/// retry), then the database is SIGKILLed (both replicas answer 503 and the agents hold their
/// records) and started again, and the killed replica comes back. Every message arrives exactly
/// once, and the ledger of each gateway balances with nothing missing.
#[test]
fn real_agents_lose_nothing_when_a_replica_dies_and_the_database_restarts() {
    const N: u64 = 1500;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let mut pg = postgres(tmp.path());
    let mut a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &[]);
    let b = Cloud::start_postgres(&tmp.path().join("b"), &pg.url(), &[]);
    let nginx = nginx_many(&tmp.path().join("nginx"), &[a.port, b.port]);

    let devices = ["gw-north", "gw-south"];
    let agents: Vec<Agent> = devices
        .iter()
        .map(|id| {
            let dir = tmp.path().join(id);
            let agent = Agent::standard_edited(
                &dir,
                broker.port,
                &nginx.url(),
                &[
                    ("id = \"gw-test\"", &format!("id = \"{id}\"")),
                    (
                        "topics = [\"sensors/#\"]",
                        &format!("topics = [\"{id}/#\"]"),
                    ),
                    ("batch_max_records = 100", "batch_max_records = 25"),
                ],
            );
            agent.wait_connected();
            agent
        })
        .collect();
    let publish_all = |range: std::ops::Range<u64>| {
        for id in devices {
            publish(broker.port, &format!("{id}/t"), numbered(range.clone()));
        }
    };
    let delivered = |cloud: &Cloud, id: &str| {
        cloud
            .ledger(id)
            .map_or(0, |l| l["delivered"].as_u64().unwrap_or(0))
    };

    publish_all(0..N / 3);
    wait_until(
        "the first records at the center",
        Duration::from_secs(60),
        || devices.iter().all(|id| delivered(&b, id) > 0),
    );
    a.kill();
    publish_all(N / 3..2 * N / 3);
    wait_until(
        "the second third through the surviving replica",
        Duration::from_secs(90),
        || devices.iter().all(|id| delivered(&b, id) >= 2 * N / 3),
    );

    pg.kill();
    // The surviving replica cannot read the database: a 503, not a 500 or a hang.
    let (status, _) = http_status(b.port, "GET", "/v1/devices", None);
    assert_eq!(status, 503);
    publish_all(2 * N / 3..N);
    // The agents hold the last third while the database is away.
    wait_until(
        "the agents to journal the last third",
        Duration::from_secs(60),
        || {
            agents.iter().all(|agent| {
                agent
                    .try_status()
                    .is_some_and(|s| s["head_seq"].as_u64().unwrap_or(0) >= N)
            })
        },
    );
    pg.start_again().unwrap_or_else(|e| panic!("{e}"));
    a.start_again();

    wait_until(
        "every record at the center",
        Duration::from_secs(120),
        || devices.iter().all(|id| delivered(&a, id) >= N),
    );
    for id in devices {
        for cloud in [&a, &b] {
            assert_exactly_once(&cloud.records(id), N);
        }
        wait_until(
            "the gateway's account to catch up",
            Duration::from_secs(30),
            || {
                b.ledger(id)
                    .is_some_and(|l| l["states"] == json!(["healthy"]))
            },
        );
        let l = a.ledger(id).unwrap();
        assert_eq!(
            (&l["delivered"], &l["missing"], &l["balanced"]),
            (&json!(N), &json!(0), &json!(true)),
            "{l}"
        );
    }
    let errors = nginx.access_log();
    assert!(
        errors
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("502")),
        "nginx saw the killed replica: {errors}"
    );
    drop(agents);
}

/// The downlink with replicas: a gateway's WebSocket lands on replica A, a command is posted to
/// replica B, queued in the database, and A sends it (told by B's NOTIFY); the result, written by
/// A, is read through B. When A dies, B stops counting the gateway connected once A's heartbeat
/// is stale. A command posted while A is down waits in the database and goes out when the
/// gateway's connection comes back to A.
#[test]
fn a_command_posted_to_one_replica_reaches_the_gateway_connected_to_another() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let pg = postgres(tmp.path());
    let ws_port = free_port();
    let ws_a = format!("127.0.0.1:{ws_port}");
    let mut a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &["--ws-listen", &ws_a]);
    let b = Cloud::start_postgres(
        &tmp.path().join("b"),
        &pg.url(),
        &["--ws-listen", &format!("127.0.0.1:{}", free_port())],
    );
    let dir = tmp.path().join("agent");
    let control = free_port();
    let config = agent_config(
        &dir,
        broker.port,
        &b.url(),
        control,
        "",
        &downlink_section(&format!("ws://{ws_a}/v1/downlink")),
    );
    let _agent = Agent::start(&dir, &config, control);
    let downlink = |cloud: &Cloud| -> Value {
        serde_json::from_str(&cloud.get("/v1/devices/gw-test/downlink")).unwrap()
    };
    wait_until(
        "B to see the gateway connected to A",
        Duration::from_secs(20),
        || downlink(&b)["connected"] == true,
    );
    assert_eq!(downlink(&b)["hello"]["device_id"], "gw-test");

    let send = |cloud: &Cloud, text: &str| -> String {
        let body =
            json!({"action": "publish", "topic": "sensors/from-center", "payload_text": text});
        let (code, answer) = http_post_body(
            cloud.port,
            "/v1/devices/gw-test/commands",
            body.to_string().as_bytes(),
        );
        assert_eq!(code, 202, "{answer}");
        serde_json::from_str::<Value>(&answer).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let done = |cloud: &Cloud, id: &str| -> Value {
        let path = format!("/v1/devices/gw-test/commands/{id}");
        let mut out = Value::Null;
        wait_until(
            &format!("the result of {id}"),
            Duration::from_secs(30),
            || {
                out = serde_json::from_str(&cloud.get(&path)).unwrap();
                out["state"] == "done"
            },
        );
        out
    };
    let id = send(&b, "one");
    let answer = done(&b, &id);
    assert_eq!(answer["result"]["ok"], true, "{answer}");
    assert_eq!(answer["sent"], 1, "sent once: {answer}");
    // A heard of it from B (NOTIFY), not only from its periodic read.
    assert!(
        a.log_text()
            .contains("commands queued on a replica device=gw-test"),
        "{}",
        a.log_text()
    );

    // A is down: the gateway's connection no longer counts once A's heartbeat is stale (it
    // stayed counted for good before).
    a.kill();
    wait_until(
        "B to see the gateway disconnected with A gone",
        Duration::from_secs(30),
        || downlink(&b)["connected"] == false,
    );
    // The command waits in the database, and B says so.
    let id = send(&b, "two");
    assert_eq!(
        serde_json::from_str::<Value>(&b.get(&format!("/v1/devices/gw-test/commands/{id}")))
            .unwrap()["state"],
        "pending"
    );
    a.start_again();
    let answer = done(&b, &id);
    assert_eq!(answer["result"]["ok"], true, "{answer}");
    assert_eq!(downlink(&b)["connected"], true);

    // The agent subscribes to sensors/#: both published messages came back up as records.
    wait_until(
        "both commands' messages at the center",
        Duration::from_secs(30),
        || {
            let texts: Vec<String> = b
                .records("gw-test")
                .iter()
                .filter_map(|r| r["payload_text"].as_str().map(str::to_owned))
                .collect();
            texts.contains(&"one".to_owned()) && texts.contains(&"two".to_owned())
        },
    );
}

/// After the database restarts, a replica's pooled connections are all broken. The first request
/// on each was answered 503 (the agent retried); each request now runs again, once, on a new
/// connection: the first batch after the restart is stored at once, and so is the first read.
#[test]
fn the_first_requests_after_a_database_restart_are_served_not_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pg = postgres(tmp.path());
    let cloud = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &[]);
    let batch = |seq: u64| {
        json!({"device_id": "gw-1", "records": [
            {"seq": seq, "ts_ms": 1, "topic": "t", "payload": {"n": seq - 1}}]})
    };
    // Several requests at once, so that the pool holds several connections.
    let posts: Vec<_> = (1..=4)
        .map(|seq| {
            let (port, body) = (cloud.port, batch(seq));
            thread::spawn(move || post_batch(&http(), port, &body).0)
        })
        .collect();
    for post in posts {
        assert_eq!(post.join().unwrap(), 200);
    }
    pg.kill();
    pg.start_again().unwrap_or_else(|e| panic!("{e}"));

    let body = batch(5).to_string();
    let (status, answer) = http_post_body(cloud.port, "/v1/ingest", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = http_status(cloud.port, "GET", "/v1/devices", None);
    assert_eq!(status, 200, "{answer}");
    assert_exactly_once(&cloud.records("gw-1"), 5);
}

/// The schema is the service's: replicas started at once on an empty database migrate it once
/// (under an advisory lock) and all serve; a database migrated by a newer `ferry-cloud` is
/// refused at start with a message that says so, and nothing is written to it.
#[test]
fn replicas_starting_at_once_migrate_once_and_a_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = postgres(tmp.path());
    let starting: Vec<_> = (0..3)
        .map(|i| {
            let (dir, url) = (tmp.path().join(format!("r{i}")), pg.url());
            thread::spawn(move || Cloud::start_postgres(&dir, &url, &[]))
        })
        .collect();
    let replicas: Vec<Cloud> = starting.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        pg.psql("SELECT version FROM ferry_schema").unwrap().trim(),
        ferry_cloud::store::postgres::MIGRATIONS.len().to_string()
    );
    for cloud in &replicas {
        assert!(cloud.get("/v1/devices").contains("\"total\":0"));
    }
    drop(replicas);

    pg.psql("UPDATE ferry_schema SET version = 99").unwrap();
    let out = ferry_testkit::output_within(
        command(ferry_cloud()).args(["--listen", "127.0.0.1:0", "--store", &pg.url()]),
        "ferry-cloud on a newer schema",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "database schema is at version 99, newer than this ferry-cloud knows ({})",
            ferry_cloud::store::postgres::MIGRATIONS.len()
        )),
        "{stderr}"
    );
    assert_eq!(
        pg.psql("SELECT version FROM ferry_schema").unwrap().trim(),
        "99"
    );
}

/// Starts ferry-cloud with `args` (after `--listen`), which must make it refuse to start with
/// exit status 1 (a database it will not use); its stderr.
fn refused_start(args: &[&str]) -> String {
    let out = ferry_testkit::output_within(
        command(ferry_cloud())
            .args(["--listen", "127.0.0.1:0"])
            .args(args),
        "ferry-cloud refusing its database",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sslmode=require`: every connection to the database is TLS, its certificate verified against
/// `--store-ca` by the address the connection string names. A certificate the roots do not know
/// refuses the start, saying why; `--store-ca` without `sslmode=require` is refused too (the
/// roots would not be used).
#[test]
fn tls_to_the_database_is_verified_against_the_given_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let pg = postgres(tmp.path());
    pg.enable_tls(&certs.join("server.pem"), &certs.join("server.key"))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("{}?sslmode=require", pg.url());
    let ca = certs.join("ca.pem").display().to_string();

    let cloud = Cloud::start_postgres(&tmp.path().join("a"), &url, &["--store-ca", &ca]);
    let batch = json!({"device_id": "gw-tls", "records": [
        {"seq": 1, "ts_ms": 1, "topic": "t", "payload": {"n": 1}}]});
    assert_eq!(post_batch(&http(), cloud.port, &batch).0, 200);
    // The server sees ferry-cloud's connections, every one of them TLS.
    let tls = pg
        .psql(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'ferry-cloud'",
        )
        .unwrap();
    let (count, all_tls) = tls.trim().split_once('|').unwrap();
    assert!(count.parse::<u32>().unwrap() >= 1, "{tls}");
    assert_eq!(all_tls, "t", "{tls}");
    drop(cloud);

    // The Mozilla roots do not know the test CA.
    let stderr = refused_start(&["--store", &url]);
    assert!(stderr.contains("certificate"), "{stderr}");
    let stderr = refused_start(&["--store", &pg.url(), "--store-ca", &ca]);
    assert!(stderr.contains("add sslmode=require"), "{stderr}");
    // TLS does not apply to a Unix socket: said at start, not a failure at each connect.
    let stderr = refused_start(&["--store", "host=/run/postgresql user=ferry sslmode=require"]);
    assert!(stderr.contains("Unix socket host"), "{stderr}");
}

/// A database that asks for a password: `--store-password-file` gives it, so it never shows in
/// the process list; without it the start is refused saying authentication failed, and a
/// password both in the connection string and in the file is refused as ambiguous.
#[test]
fn the_database_password_comes_from_a_file_not_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = postgres(tmp.path());
    const PASSWORD: &str = "s3cret with spaces";
    pg.add_password_role("ferry_pw", PASSWORD)
        .unwrap_or_else(|e| panic!("{e}"));
    let file = tmp.path().join("db-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.display().to_string();
    let url = format!("postgres://ferry_pw@127.0.0.1:{}/postgres", pg.port);

    let cloud = Cloud::start_postgres(
        &tmp.path().join("a"),
        &url,
        &["--store-password-file", &file],
    );
    let batch = json!({"device_id": "gw-pw", "records": [
        {"seq": 1, "ts_ms": 1, "topic": "t", "payload": {"n": 1}}]});
    assert_eq!(post_batch(&http(), cloud.port, &batch).0, 200);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", cloud.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("s3cret"),
        "the password is in the process list"
    );
    assert!(
        !cloud.log_text().contains("s3cret"),
        "the password is logged"
    );
    drop(cloud);

    let stderr = refused_start(&["--store", &url]);
    assert!(stderr.contains("password"), "{stderr}");
    let with_password = format!("postgres://ferry_pw:other@127.0.0.1:{}/postgres", pg.port);
    let stderr = refused_start(&["--store", &with_password, "--store-password-file", &file]);
    assert!(stderr.contains("keep the file's"), "{stderr}");
}

/// The console's records/s chart shows the fleet whichever replica answers: each replica
/// publishes what it accepted, and `/v1/fleet` adds every other replica's counts to its own.
/// Here every record goes to replica b; replica a's chart shows them.
#[test]
fn the_fleet_rate_on_any_replica_counts_what_every_replica_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = postgres(tmp.path());
    let a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &[]);
    let b = Cloud::start_postgres(&tmp.path().join("b"), &pg.url(), &[]);
    let records: Vec<Value> = (1..=500)
        .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
        .collect();
    let body = json!({"device_id": "gw-r", "records": records});
    assert_eq!(post_batch(&http(), b.port, &body).0, 200);
    // Records per 10-s slot, times 10: at least the records counted (the current slot's rate is
    // over the part of it gone by).
    let seen = |cloud: &Cloud| -> f64 {
        let fleet: Value = serde_json::from_str(&cloud.get("/v1/fleet")).unwrap();
        let slot_s = fleet["rate_slot_s"].as_f64().unwrap();
        fleet["rate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap() * slot_s)
            .sum()
    };
    assert!(seen(&b) >= 500.0, "b counts its own at once");
    ferry_testkit::poll_until(
        "replica a's chart counts b's records",
        Duration::from_secs(30),
        || seen(&a) >= 500.0,
    )
    .unwrap_or_else(|e| panic!("{e}; a sees {}", seen(&a)));
}

/// Records are keyed by device id compared byte by byte (schema 9): with the database's collation
/// (ICU here, as on most servers) a 100,000-device fleet's steady inserts cost about a fifth
/// more (docs/BENCHMARKS.md). Rebuilding the key stops every batch while it runs, so a database
/// written by version 8 is rebuilt at start only while its records are few; a larger one keeps
/// its collation, every start says so, and its records are served as before.
#[test]
fn records_are_keyed_byte_by_byte_unless_too_many_to_rebuild_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = postgres(tmp.path());
    let collation = || {
        pg.psql(
            "SELECT coalesce(c.collname, '-') FROM pg_attribute a
             LEFT JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = 'ferry_records'::regclass AND a.attname = 'device_id'",
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    let as_version_8 = || {
        pg.psql(
            "ALTER TABLE ferry_records ALTER COLUMN device_id TYPE text COLLATE \"default\";
             UPDATE ferry_schema SET version = 8",
        )
        .unwrap();
        assert_eq!(collation(), "default");
    };
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        json!({"device_id": "gw-a", "records": seqs.map(|s| json!({"seq": s, "ts_ms": 1,
            "topic": "t", "payload": s})).collect::<Vec<_>>()})
    };
    const WARNING: &str = "records keyed under a collation";

    let mut cloud = Cloud::start_postgres(&tmp.path().join("r"), &pg.url(), &[]);
    assert_eq!(collation(), "C", "a new database");
    let (status, answer) = post_batch(&http(), cloud.port, &batch(1..=3));
    assert_eq!((status, &answer["accepted"]), (200, &json!(3)), "{answer}");
    cloud.stop();

    as_version_8();
    cloud.start_again();
    assert_eq!(
        collation(),
        "C",
        "a small database written by version 8 is rebuilt"
    );
    assert!(!cloud.log_text().contains(WARNING), "{}", cloud.log_text());
    assert_eq!(cloud.records("gw-a").len(), 3);
    cloud.stop();

    as_version_8();
    pg.psql(&format!(
        "INSERT INTO ferry_records (device_id, seq, line)
         SELECT 'gw-big', s, '{{}}' FROM generate_series(1, {}) AS s",
        ferry_cloud::store::postgres::REKEY_LIMIT
    ))
    .unwrap();
    cloud.start_again();
    assert_eq!(collation(), "default", "a larger one is left as it was");
    let log = cloud.log_text();
    assert!(
        log.contains(WARNING) && log.contains("collation=\"default\""),
        "{log}"
    );
    assert_eq!(
        pg.psql("SELECT version FROM ferry_schema").unwrap().trim(),
        ferry_cloud::store::postgres::MIGRATIONS.len().to_string()
    );
    let (status, answer) = post_batch(&http(), cloud.port, &batch(2..=5));
    assert_eq!(
        (status, &answer["accepted"], &answer["duplicates"]),
        (200, &json!(2), &json!(2)),
        "{answer}"
    );
    assert_eq!(cloud.records("gw-a").len(), 5);
}
