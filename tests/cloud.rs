//! Drives the real `ferry-cloud` binary over HTTP: ingest with gzip, dedupe of resends, validation
//! errors, the completeness report, the policy and token refusals, dedupe across a restart, and
//! identity clashes (the same seq with different content) before and after a restart. The tests of
//! the store's promises run twice, on the files store and on a PostgreSQL server of their own.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod util;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

const START_DEADLINE: Duration = Duration::from_secs(20);
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A running `ferry-cloud`; killed on drop, and its stderr printed if the test is failing.
struct Cloud {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
    http: ureq::Agent,
}

/// Where a test's ferry-cloud keeps its data: the files store in a directory, or a PostgreSQL
/// server of the test's own (the same test run against both shows the two stores keep the same
/// promises).
enum Backend {
    Files(PathBuf),
    Postgres(ferry_testkit::Postgres),
}

/// Two tests of one body, taking a [`Backend`]: on the files store, and on PostgreSQL.
macro_rules! on_both_stores {
    ($files:ident, $postgres:ident, $body:ident) => {
        #[test]
        fn $files() {
            let dir = tempfile::tempdir().expect("temp dir");
            $body(&Backend::files(dir.path()));
        }

        #[test]
        fn $postgres() {
            let dir = tempfile::tempdir().expect("temp dir");
            $body(&Backend::postgres(dir.path()));
        }
    };
}

impl Backend {
    fn files(dir: &Path) -> Backend {
        Backend::Files(dir.to_path_buf())
    }

    fn postgres(dir: &Path) -> Backend {
        let pg = ferry_testkit::Postgres::start(&dir.join("pg"), util::free_port())
            .unwrap_or_else(|e| panic!("{e}"));
        Backend::Postgres(pg)
    }

    fn args(&self) -> Vec<OsString> {
        match self {
            Backend::Files(dir) => vec!["--data".into(), dir.into()],
            Backend::Postgres(pg) => vec!["--store".into(), pg.url().into()],
        }
    }
}

impl Cloud {
    fn start(dir: &Path, extra: &[&str]) -> Cloud {
        Cloud::start_on(&Backend::files(dir), extra)
    }

    fn start_on(backend: &Backend, extra: &[&str]) -> Cloud {
        let mut child = util::command(util::ferry_cloud())
            .args(["--listen", "127.0.0.1:0"])
            .args(backend.args())
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry-cloud");

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });

        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(START_DEADLINE);
        let mut cloud = Cloud {
            child,
            base: String::new(),
            stderr,
            http: util::http_client(Duration::from_secs(10)),
        };
        let line = line.expect("ferry-cloud printed its address");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        cloud.base = format!("http://{addr}");
        cloud
    }

    fn post(&self, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/v1/ingest", self.base))
            .header("Content-Type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send(body).expect("post reaches ferry-cloud");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("response body");
        (status, serde_json::from_str(&text).expect("json answer"))
    }

    fn post_gzip(&self, batch: &Value) -> (u16, Value) {
        self.post(&gzip(batch), &[("Content-Encoding", "gzip")])
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = self
            .http
            .get(format!("{}{path}", self.base))
            .call()
            .expect("get reaches ferry-cloud");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().expect("body"))
    }

    /// The ids `GET /v1/devices?<query>` lists, in its order.
    fn device_ids(&self, query: &str) -> Vec<String> {
        let v = self.get_json(&format!("/v1/devices?{query}"));
        v["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["device_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, text) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).expect("json answer")
    }

    /// Sends SIGTERM and waits (polling, with a deadline) for the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
        util::wait_exit(&mut self.child, "ferry-cloud after SIGTERM", STOP_DEADLINE)
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            if let Ok(stderr) = self.stderr.lock() {
                eprintln!("--- ferry-cloud stderr ---\n{stderr}--- end ---");
            }
        }
    }
}

fn gzip(value: &Value) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder
        .write_all(value.to_string().as_bytes())
        .expect("gzip in memory");
    encoder.finish().expect("gzip in memory")
}

fn example_batch() -> Value {
    json!({"device_id": "gw-01",
           "records": [
             {"seq": 5, "ts_ms": 1763700000000u64, "topic": "sensors/t1", "payload": {"t": 21.5}},
             {"seq": 6, "ts_ms": 1763700000012u64, "topic": "sensors/raw", "payload_b64": "AAEC"},
             {"seq": 7, "ts_ms": 1763700000013u64, "topic": "log", "payload_text": "hello"}],
           "gaps": [{"from_seq": 1, "to_seq": 2, "reason": "journal_full"}]})
}

on_both_stores!(
    batches_are_stored_once_and_dedupe_survives_a_restart,
    batches_are_stored_once_and_dedupe_survives_a_restart_on_postgres,
    stored_once_and_deduped_across_a_restart
);

fn stored_once_and_deduped_across_a_restart(backend: &Backend) {
    let mut cloud = Cloud::start_on(backend, &[]);

    let batch = example_batch();
    assert_eq!(
        cloud.post_gzip(&batch),
        (200, json!({"accepted": 3, "duplicates": 0}))
    );
    // A resend after a lost answer.
    assert_eq!(
        cloud.post_gzip(&batch),
        (200, json!({"accepted": 0, "duplicates": 3}))
    );

    let mut invalid = example_batch();
    invalid["records"][1]
        .as_object_mut()
        .map(|r| r.remove("seq"));
    let (status, answer) = cloud.post_gzip(&invalid);
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "records[1].seq: missing");

    let mut devices = cloud.get_json("/v1/devices");
    let seen = devices["devices"][0]
        .as_object_mut()
        .and_then(|d| d.remove("last_seen_ms"));
    assert!(seen.and_then(|s| s.as_u64()).is_some_and(|ms| ms > 0));
    // Without the gateway's account (no `held`), the holes count as waiting on it.
    assert_eq!(
        devices,
        json!({"devices": [{
            "device_id": "gw-01", "downlink_connected": false,
            "records": 3, "highest_seq": 7, "missing": [[3, 4]],
            "gaps": [{"from_seq": 1, "to_seq": 2, "reason": "journal_full"}],
            "clashes": [], "clashes_total": 0, "states": ["behind"],
            "ledger": {"head_seq": 7, "acked_seq": 0, "delivered": 3, "gaps": {"journal_full": 2},
                       "waiting": 2, "missing": 0, "oldest_unsent_ts_ms": null, "reported": false,
                       "upstream_gaps": 0, "backlog_bytes": null}}],
               "total": 1, "offset": 0, "limit": 1000})
    );

    let stats = cloud.get_json("/v1/stats");
    assert_eq!(
        stats,
        json!({"requests": 3, "accepted": 3, "duplicates": 3, "rejected": 1,
               "status": {"200": 2, "400": 1}})
    );

    let (status, text) = cloud.get("/v1/devices/gw-01/records");
    assert_eq!(status, 200);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["payload"], json!({"t": 21.5}));
    assert_eq!(lines[1]["payload_b64"], "AAEC");
    assert_eq!(lines[2]["payload_text"], "hello");

    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);

    let cloud = Cloud::start_on(backend, &[]);
    // Seq 8 is new; seqs 5 to 7 were stored before the restart.
    let mut more = example_batch();
    if let Some(records) = more["records"].as_array_mut() {
        records.push(json!({"seq": 8, "ts_ms": 1, "topic": "t", "payload": null}));
    }
    assert_eq!(
        cloud.post_gzip(&more),
        (200, json!({"accepted": 1, "duplicates": 3}))
    );
    let devices = cloud.get_json("/v1/devices");
    assert_eq!(devices["devices"][0]["records"], 4);
    assert_eq!(devices["devices"][0]["missing"], json!([[3, 4]]));
    assert_eq!(
        devices["devices"][0]["gaps"].as_array().map(Vec::len),
        Some(1)
    );
}

on_both_stores!(
    the_ledger_tells_waiting_from_missing_and_the_fleet_filters_by_state,
    the_ledger_tells_waiting_from_missing_and_the_fleet_filters_by_state_on_postgres,
    ledger_and_fleet_states
);

/// The completeness ledger through the binary: a gateway behind is `behind` (its seqs waiting),
/// one whose cursor claims seqs the center does not have is `missing` (an alarm), and the
/// fleet list filters, pages and sorts by it; `/metrics` adds it up.
fn ledger_and_fleet_states(backend: &Backend) {
    let cloud = Cloud::start_on(backend, &[]);
    let batch = |device: &str, seqs: std::ops::RangeInclusive<u64>, head: u64, acked: u64| {
        let records: Vec<Value> = seqs
            .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
            .collect();
        json!({"device_id": device, "records": records,
               "held": {"head_seq": head, "acked_seq": acked, "oldest_unsent_ts_ms": 1_000}})
    };
    // gw-lagging: 1..=100 delivered, the gateway holds up to 250.
    assert_eq!(
        cloud.post_gzip(&batch("gw-lagging", 1..=100, 250, 0)).0,
        200
    );
    // gw-done: everything it holds is here.
    assert_eq!(cloud.post_gzip(&batch("gw-done", 1..=50, 50, 0)).0, 200);
    assert_eq!(cloud.post_gzip(&batch("gw-done", 51..=60, 60, 50)).0, 200);
    // gw-hole: its cursor says 1..=40 were stored, but 11..=20 never arrived here.
    assert_eq!(cloud.post_gzip(&batch("gw-hole", 1..=10, 40, 0)).0, 200);
    assert_eq!(cloud.post_gzip(&batch("gw-hole", 21..=40, 40, 40)).0, 200);
    // A resend of an old batch carries an old account: the later one is kept.
    assert_eq!(cloud.post_gzip(&batch("gw-done", 1..=50, 50, 0)).0, 200);

    let ledger = |id: &str| cloud.get_json(&format!("/v1/devices/{id}/ledger"));
    let behind = ledger("gw-lagging");
    assert_eq!(
        (&behind["delivered"], &behind["waiting"], &behind["missing"]),
        (&json!(100), &json!(150), &json!(0)),
        "{behind}"
    );
    assert_eq!(behind["waiting_ranges"], json!([[101, 250]]));
    assert_eq!(behind["states"], json!(["behind"]));
    assert_eq!(behind["oldest_unsent_ts_ms"], 1_000);
    let done = ledger("gw-done");
    assert_eq!(
        (&done["head_seq"], &done["acked_seq"]),
        (&json!(60), &json!(50))
    );
    assert_eq!(done["states"], json!(["healthy"]), "{done}");
    let hole = ledger("gw-hole");
    assert_eq!(hole["missing"], 10, "{hole}");
    assert_eq!(hole["missing_ranges"], json!([[11, 20]]));
    assert_eq!(hole["states"], json!(["missing"]));
    for l in [&behind, &done, &hole] {
        assert_eq!(l["balanced"], true, "{l}");
    }
    let (status, _) = cloud.get("/v1/devices/gw-nobody/ledger");
    assert_eq!(status, 404);

    let ids = |query: &str| cloud.device_ids(query);
    assert_eq!(ids("state=missing"), ["gw-hole"]);
    assert_eq!(ids("state=behind"), ["gw-lagging"]);
    assert_eq!(ids("state=healthy"), ["gw-done"]);
    // Sorted by id the lagging one is last; by waiting (or missing) seqs, first.
    assert_eq!(ids(""), ["gw-done", "gw-hole", "gw-lagging"]);
    assert_eq!(ids("sort=waiting&limit=1"), ["gw-lagging"]);
    assert_eq!(ids("sort=missing&limit=1"), ["gw-hole"]);
    assert_eq!(ids("offset=1&limit=1"), ["gw-hole"]);
    assert_eq!(ids("prefix=gw-h"), ["gw-hole"]);
    // An offset past every row (past PostgreSQL's bigint too) is an empty page.
    assert_eq!(ids("offset=9223372036854775808"), Vec::<String>::new());
    assert_eq!(cloud.get_json("/v1/devices?limit=1")["total"], 3);
    let (status, answer) = cloud.get("/v1/devices?state=lost");
    assert_eq!(status, 400);
    assert!(answer.contains("state: one of"), "{answer}");

    let (status, metrics) = cloud.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "ferry_cloud_devices{state=\"all\"} 3",
        "ferry_cloud_devices{state=\"missing\"} 1",
        "ferry_cloud_devices{state=\"behind\"} 1",
        "ferry_cloud_ledger_delivered_records 190",
        "ferry_cloud_ledger_waiting_records 150",
        "ferry_cloud_ledger_missing_records 10",
        "ferry_cloud_ledger_unbalanced_devices 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

on_both_stores!(
    large_batches_are_stored_once_and_their_overlaps_are_duplicates,
    large_batches_are_stored_once_and_their_overlaps_are_duplicates_on_postgres,
    large_batches_stored_once
);

/// Batches of hundreds of records (on PostgreSQL these go in by `COPY`, smaller ones by
/// `INSERT`, which the server's own statement log shows): each record stored once, a resend and
/// an overlap counted as duplicates, a clash inside one refused whole, and every record read back
/// in order.
fn large_batches_stored_once(backend: &Backend) {
    if let Backend::Postgres(pg) = backend {
        pg.log_statements().unwrap_or_else(|e| panic!("{e}"));
    }
    // What the server ran, on PostgreSQL: whether it took a COPY into the records.
    let copied = || match backend {
        Backend::Postgres(pg) => Some(pg.log_text().contains("COPY ferry_records")),
        Backend::Files(_) => None,
    };
    let cloud = Cloud::start_on(backend, &[]);
    let batch = |seqs: std::ops::RangeInclusive<u64>, salt: &str| {
        let records: Vec<Value> = seqs
            .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": format!("{salt}{s}")}))
            .collect();
        json!({"device_id": "gw-large", "records": records})
    };
    let small = json!({"device_id": "gw-small", "records": [
        {"seq": 1, "ts_ms": 1, "topic": "t", "payload": 1}]});
    assert_eq!(
        cloud.post_gzip(&small),
        (200, json!({"accepted": 1, "duplicates": 0}))
    );
    assert_ne!(copied(), Some(true), "one record went in by COPY");
    assert_eq!(
        cloud.post_gzip(&batch(1..=300, "")),
        (200, json!({"accepted": 300, "duplicates": 0}))
    );
    assert_ne!(copied(), Some(false), "300 records went in without COPY");
    assert_eq!(
        cloud.post_gzip(&batch(1..=300, "")),
        (200, json!({"accepted": 0, "duplicates": 300}))
    );
    assert_eq!(
        cloud.post_gzip(&batch(201..=500, "")),
        (200, json!({"accepted": 200, "duplicates": 100}))
    );
    // A cloned gateway's batch: new seqs, and one stored seq with other content.
    let (status, _) = cloud.post_gzip(&batch(500..=700, "clone-"));
    assert_eq!(status, 409);
    let (status, text) = cloud.get("/v1/devices/gw-large/records");
    assert_eq!(status, 200);
    let seqs: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("ndjson line")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
}

/// Each pooled connection prepares a statement once and runs it by name after (a batch is five
/// round trips, not ten). The server's own statement log shows it: over 30 batches of a device,
/// the statement that updates the device's row runs under at most one name per connection (one
/// per worker), not a new one per batch.
#[test]
fn statements_are_prepared_once_per_pooled_connection_on_postgres() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::postgres(dir.path());
    let Backend::Postgres(pg) = &backend else {
        unreachable!("a PostgreSQL backend")
    };
    pg.log_statements().unwrap_or_else(|e| panic!("{e}"));
    let cloud = Cloud::start_on(&backend, &[]);
    for seq in 1..=30u64 {
        let batch = json!({"device_id": "gw-prepared", "records": [
            {"seq": seq, "ts_ms": 1, "topic": "t", "payload": seq}]});
        assert_eq!(
            cloud.post_gzip(&batch),
            (200, json!({"accepted": 1, "duplicates": 0}))
        );
    }
    // `execute s7: WITH point AS (` (the device row's update with its history point).
    let log = pg.log_text();
    let names: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|line| {
            let (name, sql) = line.split_once("execute ")?.1.split_once(": ")?;
            sql.starts_with("WITH point AS").then_some(name)
        })
        .collect();
    assert!(!names.is_empty(), "no update in the statement log:\n{log}");
    assert!(
        names.len() <= 4,
        "the update ran under {} names over 30 batches: {names:?}",
        names.len()
    );
}

/// A batch's `COPY` rows go to the server in messages of up to 1 MiB: a batch of 2.4 MB (600
/// records of 4,000 bytes) crosses two message boundaries, and every record is read back as
/// sent, in order, once.
#[test]
fn a_batch_of_several_copy_messages_is_stored_whole_on_postgres() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::postgres(dir.path());
    let cloud = Cloud::start_on(&backend, &[]);
    let payload = |s: u64| format!("{s:04}").repeat(1000);
    let records: Vec<Value> = (1..=600u64)
        .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": payload(s)}))
        .collect();
    let batch = json!({"device_id": "gw-wide", "records": records});
    assert_eq!(
        cloud.post_gzip(&batch),
        (200, json!({"accepted": 600, "duplicates": 0}))
    );
    let (status, text) = cloud.get("/v1/devices/gw-wide/records");
    assert_eq!(status, 200);
    let back: Vec<(u64, String)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("ndjson line");
            let seq = v["seq"].as_u64().expect("seq");
            (seq, v["payload"].as_str().expect("payload").to_owned())
        })
        .collect();
    let sent: Vec<(u64, String)> = (1..=600u64).map(|s| (s, payload(s))).collect();
    assert!(
        back == sent,
        "{} records read back, not the 600 sent",
        back.len()
    );
    assert_eq!(
        cloud.post_gzip(&batch),
        (200, json!({"accepted": 0, "duplicates": 600}))
    );
}

#[test]
fn a_large_batch_over_a_row_the_store_did_not_write_stores_nothing_on_postgres() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::postgres(dir.path());
    let Backend::Postgres(pg) = &backend else {
        unreachable!()
    };
    let cloud = Cloud::start_on(&backend, &[]);
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        let records: Vec<Value> = seqs
            .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
            .collect();
        json!({"device_id": "gw-odd", "records": records})
    };
    assert_eq!(cloud.post_gzip(&batch(1..=10)).0, 200);
    // A row written behind the store's back: seq 150, not in the device's delivered ranges.
    pg.psql("INSERT INTO ferry_records (device_id, seq, line) VALUES ('gw-odd', 150, '{}')")
        .unwrap_or_else(|e| panic!("{e}"));
    // By COPY (190 new records) and by INSERT (21): refused as an inconsistency the operator
    // must look at (500, logged as an error), not as a database away for a while (503).
    for seqs in [11..=200, 140..=160] {
        let (status, answer) = cloud.post_gzip(&batch(seqs.clone()));
        assert_eq!(
            (status, &answer["error"]),
            (500, &json!("cannot store the batch")),
            "{seqs:?}: {answer}"
        );
    }
    let ledger = cloud.get_json("/v1/devices/gw-odd/ledger");
    assert_eq!(ledger["delivered"], 10, "{ledger}");
    // The operator is told which row: the COPY's first one already there, the INSERT's count.
    // The log line is written before the answer, and read from the pipe by a thread of ours.
    for said in [
        "at least 1 (Key (device_id, seq)=(gw-odd, 150) already exists) of 190 new records: \
         already in ferry_records",
        "1 of 21 new records: already in ferry_records",
    ] {
        util::wait_until(
            &format!("the log says {said:?}"),
            Duration::from_secs(10),
            || cloud.stderr.lock().expect("log").contains(said),
        );
    }
}

on_both_stores!(
    a_declared_gap_stays_in_the_fleets_account_after_batches_without_gaps,
    a_declared_gap_stays_in_the_fleets_account_after_batches_without_gaps_on_postgres,
    gap_kept_in_fleet_account
);

/// A gap declared once counts in the fleet's figures (the list's states, `/metrics`) through the
/// device's later batches, which declare none: on PostgreSQL those figures are the device row's
/// columns, rewritten by every batch; a gap left out of one rewrite would turn into missing seqs.
/// A gap re-declared over stored records adds nothing.
fn gap_kept_in_fleet_account(backend: &Backend) {
    let cloud = Cloud::start_on(backend, &[]);
    let records = |seqs: std::ops::RangeInclusive<u64>| -> Vec<Value> {
        seqs.map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
            .collect()
    };
    let first = json!({"device_id": "gw-g", "records": records(1..=10),
        "gaps": [{"from_seq": 11, "to_seq": 20, "reason": "expired"}],
        "held": {"head_seq": 30, "acked_seq": 0}});
    assert_eq!(cloud.post_gzip(&first).0, 200);
    for (seqs, acked) in [(21..=25, 25), (26..=30, 30)] {
        let later = json!({"device_id": "gw-g", "records": records(seqs),
            "held": {"head_seq": 30, "acked_seq": acked}});
        assert_eq!(cloud.post_gzip(&later).0, 200);
    }
    let over_stored = json!({"device_id": "gw-g", "records": [],
        "gaps": [{"from_seq": 3, "to_seq": 4, "reason": "rejected"}],
        "held": {"head_seq": 30, "acked_seq": 30}});
    assert_eq!(cloud.post_gzip(&over_stored).0, 200);
    let last = json!({"device_id": "gw-g", "records": records(31..=31),
        "held": {"head_seq": 31, "acked_seq": 31}});
    assert_eq!(cloud.post_gzip(&last).0, 200);

    assert_eq!(cloud.device_ids("state=missing"), Vec::<String>::new());
    assert_eq!(cloud.device_ids("state=healthy"), ["gw-g"]);
    let (status, metrics) = cloud.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "ferry_cloud_ledger_delivered_records 21",
        "ferry_cloud_ledger_gap_records 10",
        "ferry_cloud_ledger_missing_records 0",
        "ferry_cloud_ledger_unbalanced_devices 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

on_both_stores!(
    a_device_that_stops_sending_turns_silent_and_sorts_first_by_last_seen,
    a_device_that_stops_sending_turns_silent_and_sorts_first_by_last_seen_on_postgres,
    silent_and_last_seen
);

/// `--silent-after`: a device that sent nothing for that long is `silent`, and `sort=last_seen`
/// puts the longest silent first. Ids sort byte by byte on both stores (`gw-Z` before `gw-a`;
/// the test's PostgreSQL collates en-US, where it is the other way round).
fn silent_and_last_seen(backend: &Backend) {
    let cloud = Cloud::start_on(backend, &["--silent-after", "2"]);
    let batch = |device: &str| {
        json!({"device_id": device, "records": [{"seq": 1, "ts_ms": 1, "topic": "t", "payload": 1}],
               "held": {"head_seq": 1, "acked_seq": 0}})
    };
    let ids = |query: &str| cloud.device_ids(query);
    assert_eq!(cloud.post_gzip(&batch("gw-a-old")).0, 200);
    assert_eq!(ids("state=silent"), Vec::<String>::new());
    util::wait_until("gw-a-old to turn silent", Duration::from_secs(20), || {
        ids("state=silent") == ["gw-a-old"]
    });
    assert_eq!(cloud.post_gzip(&batch("gw-Z-new")).0, 200);
    assert_eq!(ids(""), ["gw-Z-new", "gw-a-old"]);
    assert_eq!(ids("sort=last_seen"), ["gw-a-old", "gw-Z-new"]);
    assert_eq!(ids("state=silent"), ["gw-a-old"]);
    assert_eq!(ids("state=healthy"), ["gw-Z-new"]);
    let (_, metrics) = cloud.get("/metrics");
    for line in [
        "ferry_cloud_devices{state=\"silent\"} 1",
        "ferry_cloud_devices{state=\"healthy\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

/// Schema version 3 keeps the ledger's counts in the device rows, for the fleet list and
/// `/metrics` to be answered in SQL. A database written at version 2 has rows without them:
/// the migration fills them, so that its devices are listed by state as before the upgrade.
#[test]
fn an_upgraded_database_lists_its_devices_by_their_ledger() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::postgres(dir.path());
    let Backend::Postgres(pg) = &backend else {
        unreachable!()
    };
    let batch = |device: &str, seqs: std::ops::RangeInclusive<u64>, head: u64, acked: u64| {
        let records: Vec<Value> = seqs
            .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
            .collect();
        json!({"device_id": device, "records": records,
               "held": {"head_seq": head, "acked_seq": acked}})
    };
    {
        let cloud = Cloud::start_on(&backend, &[]);
        assert_eq!(cloud.post_gzip(&batch("gw-hole", 1..=10, 40, 0)).0, 200);
        assert_eq!(cloud.post_gzip(&batch("gw-hole", 21..=40, 40, 40)).0, 200);
        assert_eq!(cloud.post_gzip(&batch("gw-lagging", 1..=5, 9, 0)).0, 200);
    }
    // Back to what version 2 wrote: no ledger columns, no indexes on them (version 3), no
    // per-replica connections (version 4), no command senders (version 5), no upstream gap
    // counts (version 6), no backlog bytes (version 7), no history (version 8).
    pg.psql(
        "ALTER TABLE ferry_devices DROP COLUMN listed, DROP COLUMN ledger_delivered,
             DROP COLUMN ledger_gaps, DROP COLUMN ledger_waiting, DROP COLUMN ledger_missing,
             DROP COLUMN ledger_balanced, DROP COLUMN upstream_gaps, DROP COLUMN backlog_bytes;
         DROP TABLE ferry_replicas, ferry_sockets, ferry_history, ferry_rates;
         ALTER TABLE ferry_commands DROP COLUMN sent_by;
         ALTER TABLE ferry_downlink ADD COLUMN connected int8 NOT NULL DEFAULT 0;
         UPDATE ferry_schema SET version = 2;",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cloud = Cloud::start_on(&backend, &[]);
    assert_eq!(cloud.device_ids(""), ["gw-hole", "gw-lagging"]);
    assert_eq!(cloud.device_ids("state=missing"), ["gw-hole"]);
    assert_eq!(cloud.device_ids("state=behind"), ["gw-lagging"]);
    let (_, metrics) = cloud.get("/metrics");
    for line in [
        "ferry_cloud_ledger_missing_records 10",
        "ferry_cloud_ledger_waiting_records 4",
        "ferry_cloud_ledger_delivered_records 35",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    assert_eq!(
        pg.psql("SELECT version FROM ferry_schema").unwrap().trim(),
        ferry_cloud::store::postgres::MIGRATIONS.len().to_string()
    );
}

/// A fleet larger than the receiver's open-file limit. With a records file kept open per device,
/// the 60th or so device of a receiver limited to 64 descriptors was answered 500 ("Too many open
/// files"), and every device after it, for good. Files are now open only while a request waits
/// for its sync.
#[test]
fn a_fleet_larger_than_the_open_file_limit_is_received() {
    const DEVICES: u64 = 300;
    const LIMIT: u64 = 64;
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path(), &[]);
    let pid = cloud.child.id();
    let limited = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={LIMIT}:{LIMIT}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success(), "prlimit: {limited}");

    for round in 0..2u64 {
        for d in 0..DEVICES {
            let seq = round * 3 + 1;
            let batch = json!({"device_id": format!("gw-{d:05}"),
                "records": (seq..seq + 3).map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t",
                "payload": {"n": s}})).collect::<Vec<_>>()});
            assert_eq!(
                cloud.post_gzip(&batch),
                (200, json!({"accepted": 3, "duplicates": 0})),
                "round {round}, device {d}"
            );
        }
    }
    let devices = cloud.get_json("/v1/devices");
    let devices = devices["devices"].as_array().expect("devices");
    assert_eq!(devices.len() as u64, DEVICES);
    assert!(devices.iter().all(|d| d["records"] == 6), "{devices:?}");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(open < LIMIT as usize / 2, "{open} descriptors open");
}

on_both_stores!(
    a_record_resent_with_its_time_corrected_is_a_duplicate,
    a_record_resent_with_its_time_corrected_is_a_duplicate_on_postgres,
    resent_with_time_corrected
);

/// A gateway whose clock was not trusted may send a record `unsynced` and, after a crash before
/// the answer, send it again corrected once its clock is: copies are compared by the time as
/// stamped (`ts_ms_original`), so the resend is a duplicate, before and after a restart, while
/// another stamped time is still a clash.
fn resent_with_time_corrected(backend: &Backend) {
    let record = |ts: u64, clock: &str, original: u64| {
        json!({"device_id": "gw-c", "records": [{"seq": 1, "ts_ms": ts, "topic": "t",
            "payload": {"v": 1}, "clock": clock, "ts_ms_original": original}]})
    };
    let mut cloud = Cloud::start_on(backend, &[]);
    let ok = |accepted: u64, duplicates: u64| {
        (200, json!({"accepted": accepted, "duplicates": duplicates}))
    };
    assert_eq!(cloud.post_gzip(&record(5_000, "unsynced", 5_000)), ok(1, 0));
    let corrected = record(1_763_700_000_000, "corrected", 5_000);
    assert_eq!(cloud.post_gzip(&corrected), ok(0, 1));
    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);
    let cloud = Cloud::start_on(backend, &[]);
    assert_eq!(cloud.post_gzip(&corrected), ok(0, 1));
    let other = record(1_763_700_000_000, "corrected", 5_001);
    assert_eq!(cloud.post_gzip(&other).0, 409);
    // The first copy is the one kept.
    let (_, stored) = cloud.get("/v1/devices/gw-c/records");
    assert!(stored.contains("\"clock\":\"unsynced\""), "{stored}");
}

on_both_stores!(
    upstream_gaps_are_counted_in_the_ledger,
    upstream_gaps_are_counted_in_the_ledger_on_postgres,
    upstream_gaps_counted
);

/// A gateway's `$ferry/upstream_gap` records (a Sparkplug B edge node's lost message) are counted
/// in the device's ledger once each: not again for a resend, and the same after a restart.
fn upstream_gaps_counted(backend: &Backend) {
    let batch = json!({"device_id": "gw-u", "records": [
        {"seq": 1, "ts_ms": 1, "topic": "spBv1.0/g/NDATA/n", "payload_b64": "CAE="},
        {"seq": 2, "ts_ms": 2, "topic": "$ferry/upstream_gap",
         "payload": {"kind": "seq", "edge_node": "n", "missing": 1}},
        {"seq": 3, "ts_ms": 3, "topic": "spBv1.0/g/NDATA/n", "payload_b64": "CAM="}]});
    let mut cloud = Cloud::start_on(backend, &[]);
    assert_eq!(cloud.post_gzip(&batch).0, 200);
    assert_eq!(cloud.post_gzip(&batch).0, 200);
    let count = |cloud: &Cloud| cloud.get_json("/v1/devices/gw-u/ledger")["upstream_gaps"].clone();
    assert_eq!(count(&cloud), json!(1));
    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);
    let cloud = Cloud::start_on(backend, &[]);
    assert_eq!(count(&cloud), json!(1));
    let listed = cloud.get_json("/v1/devices");
    assert_eq!(
        listed["devices"][0]["ledger"]["upstream_gaps"], 1,
        "{listed}"
    );
}

on_both_stores!(
    the_backlog_bytes_a_gateway_reports_are_in_its_ledger,
    the_backlog_bytes_a_gateway_reports_are_in_its_ledger_on_postgres,
    backlog_bytes_reported
);

/// `held.backlog_bytes` (newer agents) is kept with the rest of the gateway's report: in the
/// ledger and the device list; PostgreSQL keeps it across a restart (the files store keeps
/// reports since its start). An older agent's report has none: `null`.
fn backlog_bytes_reported(backend: &Backend) {
    let batch = |held: Value| {
        json!({"device_id": "gw-b", "held": held, "records": [
            {"seq": 1, "ts_ms": 1, "topic": "t", "payload": 1}]})
    };
    let mut cloud = Cloud::start_on(backend, &[]);
    let bytes = |cloud: &Cloud| cloud.get_json("/v1/devices/gw-b/ledger")["backlog_bytes"].clone();
    assert_eq!(
        cloud
            .post_gzip(&batch(json!({"head_seq": 3, "acked_seq": 0})))
            .0,
        200
    );
    assert_eq!(bytes(&cloud), Value::Null);
    assert_eq!(
        cloud
            .post_gzip(&batch(
                json!({"head_seq": 3, "acked_seq": 1, "backlog_bytes": 4321})
            ))
            .0,
        200
    );
    assert_eq!(bytes(&cloud), json!(4321));
    let listed = cloud.get_json("/v1/devices");
    assert_eq!(
        listed["devices"][0]["ledger"]["backlog_bytes"], 4321,
        "{listed}"
    );
    assert_eq!(
        cloud
            .post_gzip(&batch(
                json!({"head_seq": 3, "acked_seq": 1, "backlog_bytes": -1})
            ))
            .0,
        400
    );
    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);
    let cloud = Cloud::start_on(backend, &[]);
    let expected = match backend {
        Backend::Files(_) => Value::Null,
        Backend::Postgres(_) => json!(4321),
    };
    assert_eq!(bytes(&cloud), expected);
}

on_both_stores!(
    a_devices_history_shows_its_records_and_backlog_per_minute,
    a_devices_history_shows_its_records_and_backlog_per_minute_on_postgres,
    history_per_minute
);

/// `GET /v1/devices/<id>/history`: a point per minute with the records stored in it (a resend
/// not counted again) and the account the minute's last batch or report left (waiting, backlog
/// bytes). PostgreSQL keeps it across a restart and drops a device's points older than a day
/// when the device next sends; the files store forgets it at a restart.
fn history_per_minute(backend: &Backend) {
    let batch = |seqs: std::ops::RangeInclusive<u64>, head: u64, acked: u64, bytes: u64| {
        let records: Vec<Value> = seqs
            .map(|s| json!({"seq": s, "ts_ms": 1, "topic": "t", "payload": s}))
            .collect();
        json!({"device_id": "gw-h", "records": records,
               "held": {"head_seq": head, "acked_seq": acked, "backlog_bytes": bytes}})
    };
    let mut cloud = Cloud::start_on(backend, &[]);
    assert_eq!(cloud.get("/v1/devices/gw-h/history").0, 404);
    let first = batch(1..=3, 10, 0, 700);
    assert_eq!(cloud.post_gzip(&first).0, 200);
    let history = cloud.get_json("/v1/devices/gw-h/history");
    let points = history["points"].as_array().expect("points").clone();
    let last = points.last().expect("a point after a batch");
    assert_eq!(
        (&last["waiting"], &last["delivered"], &last["backlog_bytes"]),
        (&json!(7), &json!(3), &json!(700)),
        "{history}"
    );
    assert_eq!(history["slot_s"], 60);
    assert_eq!(cloud.post_gzip(&first).0, 200, "a resend");
    assert_eq!(cloud.post_gzip(&batch(4..=10, 10, 10, 0)).0, 200);
    let history = cloud.get_json("/v1/devices/gw-h/history");
    let points = history["points"].as_array().expect("points").clone();
    let accepted: u64 = points
        .iter()
        .map(|p| p["accepted"].as_u64().expect("a history answer"))
        .sum();
    assert_eq!(accepted, 10, "each record once: {history}");
    let peak = points
        .iter()
        .map(|p| p["waiting_max"].as_u64().expect("a history answer"))
        .max();
    assert_eq!(
        peak,
        Some(7),
        "the backlog of the minute it drained in: {history}"
    );
    let last = points.last().expect("a history answer");
    assert_eq!(
        (&last["waiting"], &last["delivered"], &last["backlog_bytes"]),
        (&json!(0), &json!(10), &json!(0)),
        "{history}"
    );
    let minute = last["t_ms"].as_u64().expect("a history answer") / 60_000;
    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);
    let cloud = Cloud::start_on(backend, &[]);
    let points = cloud.get_json("/v1/devices/gw-h/history")["points"].clone();
    match backend {
        Backend::Files(_) => assert_eq!(points, json!([]), "forgotten at a restart"),
        Backend::Postgres(pg) => {
            assert_eq!(
                points.as_array().expect("a history answer").len(),
                history["points"]
                    .as_array()
                    .expect("a history answer")
                    .len()
            );
            // A point a day and a minute old, and one just inside the day: the next batch drops
            // the first.
            pg.psql(&format!(
                "INSERT INTO ferry_history VALUES
                     ('gw-h', {}, 1, 1, 0, 0, 0, 0, NULL), ('gw-h', {}, 1, 1, 0, 0, 0, 0, NULL)",
                minute - 1441,
                minute - 1438
            ))
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cloud.post_gzip(&batch(11..=11, 11, 11, 0)).0, 200);
            let kept = pg
                .psql("SELECT count(*) FROM ferry_history WHERE device_id = 'gw-h'")
                .unwrap_or_else(|e| panic!("{e}"));
            let fresh = points.as_array().expect("a history answer").len() + 1;
            // The new batch's minute may be the last one's, or the next.
            assert!(
                [fresh, fresh + 1]
                    .contains(&kept.trim().parse::<usize>().expect("a history answer")),
                "the day-old point dropped, the other kept: {kept} rows"
            );
            let oldest = cloud.get_json("/v1/devices/gw-h/history")["points"][0]["t_ms"].clone();
            assert_eq!(oldest, json!((minute - 1438) * 60_000));
        }
    }
}

/// Records `seqs` of `gw-x` as the gateway `name` would send them: two gateways sharing the id send
/// the same seqs with different payloads.
fn batch_from(name: &str, seqs: std::ops::RangeInclusive<u64>) -> Value {
    let records: Vec<Value> = seqs
        .map(|seq| {
            json!({"seq": seq, "ts_ms": 1763700000000u64 + seq, "topic": "sensors/t1",
                          "payload": {"box": name, "n": seq}})
        })
        .collect();
    json!({"device_id": "gw-x", "records": records})
}

on_both_stores!(
    a_seq_resent_with_other_content_is_an_identity_clash_across_restarts,
    a_seq_resent_with_other_content_is_an_identity_clash_across_restarts_on_postgres,
    identity_clash_across_restarts
);

fn identity_clash_across_restarts(backend: &Backend) {
    let mut cloud = Cloud::start_on(backend, &[]);
    let clash_error = json!({"error": "device_id gw-x: seq 2 already stored with different content; \
                                       two gateways share this device id (cloned image?)"});

    let original = batch_from("a", 1..=3);
    assert_eq!(
        cloud.post_gzip(&original),
        (200, json!({"accepted": 3, "duplicates": 0}))
    );
    let (_, stored) = cloud.get("/v1/devices/gw-x/records");

    // A clone of box "a" sends its own seqs 2 to 4: 2 and 3 clash, 4 is new but not stored either.
    let clone = batch_from("b", 2..=4);
    assert_eq!(cloud.post_gzip(&clone), (409, clash_error.clone()));
    assert_eq!(cloud.get("/v1/devices/gw-x/records"), (200, stored.clone()));
    let device = &cloud.get_json("/v1/devices")["devices"][0];
    assert_eq!(
        (&device["records"], &device["highest_seq"]),
        (&json!(3), &json!(3))
    );
    assert_eq!(device["clashes_total"], 2);
    let clashes = device["clashes"].as_array().expect("clashes is an array");
    let seqs: Vec<&Value> = clashes.iter().map(|c| &c["seq"]).collect();
    assert_eq!(seqs, vec![&json!(2), &json!(3)]);
    for clash in clashes {
        assert_eq!(clash["count"], 1);
        assert!(
            clash["first_seen_ms"].as_u64().is_some_and(|t| t > 0),
            "{clash}"
        );
        assert_eq!(clash["first_seen_ms"], clash["last_seen_ms"]);
    }

    // Box "a" resending its own records is a plain duplicate.
    assert_eq!(
        cloud.post_gzip(&original),
        (200, json!({"accepted": 0, "duplicates": 3}))
    );
    let stats = cloud.get_json("/v1/stats");
    assert_eq!(stats["status"], json!({"200": 2, "409": 1}));
    assert_eq!(stats["rejected"], 1);

    assert!(cloud.terminate().success(), "exit status after SIGTERM");
    drop(cloud);

    // The fingerprints are rebuilt from the stored lines: no false clash, and still a clash.
    let cloud = Cloud::start_on(backend, &[]);
    assert_eq!(
        cloud.post_gzip(&original),
        (200, json!({"accepted": 0, "duplicates": 3}))
    );
    assert_eq!(cloud.post_gzip(&clone), (409, clash_error));
    assert_eq!(cloud.get("/v1/devices/gw-x/records"), (200, stored));
    let device = &cloud.get_json("/v1/devices")["devices"][0];
    assert_eq!(device["records"], 3);
    // The files store counts clashes since its start; PostgreSQL keeps them.
    let clashes = match backend {
        Backend::Files(_) => 2,
        Backend::Postgres(_) => 4,
    };
    assert_eq!(device["clashes_total"], clashes, "{device}");
}

#[test]
fn policy_and_token_refusals_store_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(
        dir.path(),
        &["--reject-marker", "POISON", "--token", "s3cret"],
    );
    let body = example_batch().to_string();

    let (status, answer) = cloud.post(body.as_bytes(), &[]);
    assert_eq!(status, 401, "{answer}");
    let (status, _) = cloud.post(body.as_bytes(), &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401);

    let auth = [("Authorization", "Bearer s3cret")];
    let mut poisoned = example_batch();
    poisoned["records"][2]["payload_text"] = json!("a POISON pill");
    let (status, answer) = cloud.post(poisoned.to_string().as_bytes(), &auth);
    assert_eq!(
        (status, answer),
        (422, json!({"error": "record seq=7 rejected by policy"}))
    );
    assert_eq!(
        cloud.get_json("/v1/devices"),
        json!({"devices": [], "total": 0, "offset": 0, "limit": 1000})
    );
    assert_eq!(cloud.get("/v1/devices/gw-01/records"), (200, String::new()));

    assert_eq!(
        cloud.post(body.as_bytes(), &auth),
        (200, json!({"accepted": 3, "duplicates": 0}))
    );
    let stats = cloud.get_json("/v1/stats");
    assert_eq!(stats["status"], json!({"200": 1, "401": 2, "422": 1}));
    assert_eq!(stats["rejected"], 3);
}

#[test]
fn unknown_paths_and_methods_get_json_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path(), &[]);

    let (status, text) = cloud.get("/v1/nothing");
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"].is_string()));

    let (status, text) = cloud.get("/v1/ingest");
    assert_eq!(status, 405);
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"].is_string()));

    assert_eq!(cloud.get("/v1/devices/bad%20id/records").0, 404);

    let (status, answer) = cloud.post(b"{\"device_id\": \"gw-01\"", &[]);
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("body: invalid json"))
    );

    let (status, _) = cloud.post(b"not gzip", &[("Content-Encoding", "gzip")]);
    assert_eq!(status, 400);
    let (status, _) = cloud.post(b"{}", &[("Content-Encoding", "br")]);
    assert_eq!(status, 415);
}

#[test]
fn bad_arguments_exit_with_status_2() {
    let output = util::command(util::ferry_cloud())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run ferry-cloud");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("--data DIR or --store postgres://... is required")
    );
}

/// Regression: a refused chunked upload was answered without reading its body, so the rest of the
/// body was parsed as the next request on the keep-alive connection and answered 400.
#[test]
fn a_refused_chunked_upload_leaves_the_connection_usable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path(), &["--token", "s3cret"]);
    let addr = cloud.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let body = "x".repeat(3000);
    write!(
        stream,
        "POST /v1/ingest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n\
         GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        body.len()
    )
    .expect("send two requests");

    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while seen.matches("HTTP/1.1 ").count() < 2 || !seen.contains("\"requests\"") {
        assert!(Instant::now() < deadline, "answers so far: {seen}");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("reading answers: {e}; so far: {seen}"),
        }
    }
    let statuses: Vec<&str> = seen
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    assert_eq!(
        statuses,
        vec!["HTTP/1.1 401 Unauthorized", "HTTP/1.1 200 OK"],
        "{seen}"
    );
}

/// Answers longer than tiny_http's 1 KiB write buffer leave in several segments. On a kept-alive
/// connection, Nagle's algorithm held the last until the client's delayed ACK: every `/metrics`
/// (1.5 KiB) or page of devices took 40 ms or more after the first. The listener now sets
/// `TCP_NODELAY`, which its connections inherit.
#[test]
fn long_answers_on_a_kept_alive_connection_do_not_wait_for_a_delayed_ack() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path(), &[]);
    // One kept-alive connection (the test client's pool holds it between requests). A delayed
    // ACK is at least 40 ms on Linux, so without the fix no answer after the first comes sooner;
    // with it, a loaded machine may make many answers slow, but not all twenty.
    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let (status, text) = cloud.get("/metrics");
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(status, 200);
        assert!(
            text.len() > 1024,
            "{} bytes: not longer than the buffer",
            text.len()
        );
        took.push(ms);
    }
    let fastest = took[1..].iter().cloned().fold(f64::INFINITY, f64::min);
    let shown: Vec<String> = took.iter().map(|ms| format!("{ms:.1}")).collect();
    assert!(fastest < 30.0, "answers took {shown:?} ms");
}

const DEVICE_TOKEN: &str = "device-token-0123456789";
const ALICE_TOKEN: &str = "alice-token-0123456789";

/// An operators file naming alice.
fn operators_file(dir: &Path) -> String {
    let path = dir.join("operators");
    std::fs::write(&path, format!("# on call\nalice {ALICE_TOKEN}\n")).expect("write operators");
    path.display().to_string()
}

/// With `--operators`, the fleet API and the commands need an operator's token: none, a wrong
/// one and the device token are refused with 401; alice's is served, and the command she sends is
/// logged with her name. Uploads still take the device token only; `/metrics` stays open.
#[test]
fn operator_endpoints_need_an_operators_token_and_say_who_sent_a_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ops = operators_file(dir.path());
    let cloud = Cloud::start(
        &dir.path().join("data"),
        &["--token", DEVICE_TOKEN, "--operators", &ops],
    );
    let call = |method: &str, path: &str, token: Option<&str>| -> u16 {
        let url = format!("{}{path}", cloud.base);
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut response = if method == "GET" {
            let mut r = cloud.http.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        } else {
            let mut r = cloud
                .http
                .post(&url)
                .header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            let body = json!({"action": "publish", "topic": "t", "payload_text": "hi"});
            r.send(body.to_string().as_bytes())
        }
        .expect("request reaches ferry-cloud");
        let _ = response.body_mut().read_to_string();
        response.status().as_u16()
    };
    for path in [
        "/v1/devices",
        "/v1/devices/gw-1/ledger",
        "/v1/devices/gw-1/records",
        "/v1/devices/gw-1/downlink",
        "/v1/stats",
    ] {
        assert_eq!(call("GET", path, None), 401, "{path}");
        assert_eq!(call("GET", path, Some(DEVICE_TOKEN)), 401, "{path}");
        assert_eq!(
            call("GET", path, Some("alice-token-012345678X")),
            401,
            "{path}"
        );
    }
    let commands = "/v1/devices/gw-1/commands";
    assert_eq!(call("POST", commands, None), 401);
    assert_eq!(call("POST", commands, Some(DEVICE_TOKEN)), 401);
    assert_eq!(call("GET", "/v1/devices", Some(ALICE_TOKEN)), 200);
    assert_eq!(call("GET", "/metrics", None), 200);
    assert_eq!(call("POST", commands, Some(ALICE_TOKEN)), 202);
    // The log line is written before the answer, and read from the pipe by a thread of ours.
    let log = || cloud.stderr.lock().expect("log").clone();
    util::wait_until(
        "the command logged with alice's name",
        Duration::from_secs(10),
        || {
            log()
                .lines()
                .any(|l| l.contains("command queued device=gw-1") && l.contains("by=alice"))
        },
    );
    assert!(
        !log().contains(ALICE_TOKEN),
        "a token in the log: {}",
        log()
    );

    // Uploads: the device token, not an operator's.
    let batch = gzip(&example_batch());
    let (status, _) = cloud.post(
        &batch,
        &[
            ("Content-Encoding", "gzip"),
            ("Authorization", &format!("Bearer {ALICE_TOKEN}")),
        ],
    );
    assert_eq!(status, 401);
    let (status, _) = cloud.post(
        &batch,
        &[
            ("Content-Encoding", "gzip"),
            ("Authorization", &format!("Bearer {DEVICE_TOKEN}")),
        ],
    );
    assert_eq!(status, 200);
}

/// Listening beyond loopback with the fleet API or the uploads open is refused at start: both
/// tokens are needed there. With both, it starts.
#[test]
fn listening_beyond_loopback_needs_a_device_token_and_operators() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ops = operators_file(dir.path());
    let data = dir.path().join("data").display().to_string();
    let run = |args: &[&str]| {
        ferry_testkit::output_within(
            util::command(util::ferry_cloud())
                .args(["--data", &data])
                .args(args),
            "ferry-cloud refusing to start",
            Duration::from_secs(20),
        )
        .expect("run ferry-cloud")
    };
    for args in [
        &["--listen", "0.0.0.0:0"][..],
        &["--listen", "0.0.0.0:0", "--token", DEVICE_TOKEN],
        &["--listen", "0.0.0.0:0", "--operators", &ops],
        &[
            "--listen",
            "127.0.0.1:0",
            "--ws-listen",
            "0.0.0.0:0",
            "--operators",
            &ops,
        ],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("reachable beyond this host"),
            "{args:?}: {stderr}"
        );
    }
    // Both given: it serves, and the fleet API wants alice's token.
    let mut child = util::command(util::ferry_cloud())
        .args([
            "--data",
            &data,
            "--listen",
            "0.0.0.0:0",
            "--token",
            DEVICE_TOKEN,
        ])
        .args(["--operators", &ops])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry-cloud");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(START_DEADLINE)
        .expect("ferry-cloud started");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line}");
}

on_both_stores!(
    the_last_records_of_a_device_are_read_alone,
    the_last_records_of_a_device_are_read_alone_on_postgres,
    last_records
);

/// `GET .../records?last=N`: the device's last N records (what the console's device page shows),
/// without the rest; a bad N is a 400 naming it.
fn last_records(backend: &Backend) {
    let cloud = Cloud::start_on(backend, &[]);
    assert_eq!(cloud.post_gzip(&batch_from("tail", 1..=30)).0, 200);
    let seqs = |query: &str| -> Vec<u64> {
        let (status, text) = cloud.get(&format!("/v1/devices/gw-x/records{query}"));
        assert_eq!(status, 200, "{query}: {text}");
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("a record")["seq"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect()
    };
    assert_eq!(seqs("?last=5"), (26..=30).collect::<Vec<_>>());
    assert_eq!(seqs("?last=1000"), (1..=30).collect::<Vec<_>>());
    assert_eq!(seqs("").len(), 30);
    for bad in ["?last=0", "?last=1001", "?last=x", "?first=3"] {
        let (status, text) = cloud.get(&format!("/v1/devices/gw-x/records{bad}"));
        assert_eq!(status, 400, "{bad}");
        assert!(text.contains("last: 1 to 1000"), "{bad}: {text}");
    }
}

/// A web page can make a browser send simple requests to loopback: a POST of a form or plain
/// text, and, with its own name pointed at 127.0.0.1, reads under another `Host`. Without
/// `--operators` those reached the open operator endpoints (a command queued, the fleet read).
/// POSTs of those types are refused, and, while the endpoints are open, hosts other than
/// loopback names.
#[test]
fn the_open_operator_endpoints_refuse_what_a_web_page_can_send() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path(), &[]);
    let addr = cloud.base.trim_start_matches("http://").to_owned();
    let raw = |head: &str, body: &str| -> u16 {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let command = r#"{"action":"status"}"#;
    let post = |kind: &str| {
        raw(
            &format!("POST /v1/devices/gw-1/commands HTTP/1.1\r\nHost: 127.0.0.1\r\n{kind}"),
            command,
        )
    };
    assert_eq!(post(""), 403);
    assert_eq!(post("Content-Type: text/plain\r\n"), 403);
    assert_eq!(
        post("Content-Type: application/x-www-form-urlencoded\r\n"),
        403
    );
    assert_eq!(post("Content-Type: application/json\r\n"), 202);
    let get = |host: &str| raw(&format!("GET /v1/devices HTTP/1.1\r\nHost: {host}\r\n"), "");
    assert_eq!(get("evil.example"), 403);
    assert_eq!(get("evil.example:8080"), 403);
    assert_eq!(get("127.0.0.1"), 200);
    assert_eq!(get("localhost:1234"), 200);
    assert_eq!(get("[::1]:1234"), 200);
}

/// `--token-file`: the device token read from a file (out of the process list), the same as
/// `--token`; a file without a token, or both flags, is refused at start.
#[test]
fn the_device_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{DEVICE_TOKEN}\n")).expect("write the token");
    let path = file.display().to_string();
    let cloud = Cloud::start(&dir.path().join("data"), &["--token-file", &path]);
    let batch = gzip(&example_batch());
    let with = |token: &str| {
        cloud
            .post(
                &batch,
                &[
                    ("Content-Encoding", "gzip"),
                    ("Authorization", &format!("Bearer {token}")),
                ],
            )
            .0
    };
    assert_eq!(with("wrong-token-0123456789"), 401);
    assert_eq!(with(DEVICE_TOKEN), 200);
    drop(cloud);

    std::fs::write(&file, "\n").expect("empty the file");
    let data = dir.path().join("data").display().to_string();
    for args in [
        vec!["--token-file", path.as_str()],
        vec!["--token-file", path.as_str(), "--token", DEVICE_TOKEN],
    ] {
        let out = ferry_testkit::output_within(
            util::command(util::ferry_cloud())
                .args(["--listen", "127.0.0.1:0", "--data", &data])
                .args(&args),
            "ferry-cloud refusing its token",
            Duration::from_secs(20),
        )
        .expect("run ferry-cloud");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--token"), "{args:?}: {stderr}");
    }
}
