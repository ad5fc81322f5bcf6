//! Tests of the store against real files in a temporary directory.

use super::*;
use crate::store::MAX_CLASHES;
use ferry_protocol::GapReason;

fn batch(device_id: &str, seqs: &[u64], gaps: &[(u64, u64, &str)]) -> Batch {
    let records: Vec<String> = seqs
        .iter()
        .map(|s| format!(r#"{{"seq":{s},"ts_ms":1,"topic":"t","payload_text":"r{s}"}}"#))
        .collect();
    let gaps: Vec<String> = gaps
        .iter()
        .map(|(f, t, r)| format!(r#"{{"from_seq":{f},"to_seq":{t},"reason":"{r}"}}"#))
        .collect();
    let body = format!(
        r#"{{"device_id":"{device_id}","records":[{}],"gaps":[{}]}}"#,
        records.join(","),
        gaps.join(",")
    );
    batch::parse(body.as_bytes()).expect("test batch is valid")
}

/// A batch of `gw-01` with the given record objects and gaps, written as JSON.
fn batch_of(records: &[&str], gaps: &[&str]) -> Batch {
    let body = format!(
        r#"{{"device_id":"gw-01","records":[{}],"gaps":[{}]}}"#,
        records.join(","),
        gaps.join(",")
    );
    batch::parse(body.as_bytes()).expect("test batch is valid")
}

fn clash_seq(result: Result<Outcome, Error>) -> u64 {
    match result {
        Err(Error::Clash { seq, .. }) => seq,
        other => panic!("expected a clash, got {other:?}"),
    }
}

fn outcome(accepted: u64, duplicates: u64, new_gaps: u64) -> Outcome {
    Outcome {
        accepted,
        duplicates,
        new_gaps,
    }
}

#[test]
fn a_resent_batch_is_counted_as_duplicates_and_stored_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    let b = batch("gw-01", &[1, 2, 3], &[]);
    assert_eq!(store.ingest(&b).expect("ingest"), outcome(3, 0, 0));
    assert_eq!(store.ingest(&b).expect("ingest"), outcome(0, 3, 0));
    let text = fs::read_to_string(dir.path().join("gw-01.ndjson")).expect("read");
    assert_eq!(text.lines().count(), 3);
}

#[test]
fn dedupe_survives_reopening_the_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = FilesStore::open(dir.path()).expect("open");
        store
            .ingest(&batch("gw-01", &[1, 2], &[(3, 4, "journal_full")]))
            .expect("ingest");
    }
    let store = FilesStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store
            .ingest(&batch("gw-01", &[2, 5], &[(3, 4, "journal_full")]))
            .expect("ingest"),
        outcome(1, 1, 0)
    );
    let devices = store.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].records, 3);
    assert_eq!(devices[0].highest_seq, 5);
    assert_eq!(devices[0].missing, vec![]);
}

#[test]
fn missing_lists_seqs_covered_by_neither_records_nor_gaps() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    store
        .ingest(&batch("d", &[3, 4, 9], &[(12, 15, "rejected")]))
        .expect("ingest");
    let device = &store.devices()[0];
    assert_eq!(device.missing, vec![(1, 2), (5, 8), (10, 11)]);
    assert_eq!(
        device.gaps,
        vec![Gap {
            from_seq: 12,
            to_seq: 15,
            reason: GapReason::Rejected
        }]
    );
    assert_eq!(device.highest_seq, 9);
}

#[test]
fn a_torn_last_line_is_dropped_and_the_file_truncated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gw-01.ndjson");
    // Seq 1 as `batch` writes it, so that its resend below is a duplicate.
    let good = "{\"payload_text\":\"r1\",\"seq\":1,\"topic\":\"t\",\"ts_ms\":1}\n";
    fs::write(&path, format!("{good}{{\"seq\":2,\"ts_m")).expect("write");

    let store = FilesStore::open(dir.path()).expect("open despite the torn line");
    assert_eq!(fs::read_to_string(&path).expect("read"), good);
    // Seq 2 was never acknowledged, so its resend is stored.
    assert_eq!(
        store.ingest(&batch("gw-01", &[1, 2], &[])).expect("ingest"),
        outcome(1, 1, 0)
    );
    let text = fs::read_to_string(&path).expect("read");
    assert_eq!(text.lines().count(), 2);
    assert!(text.ends_with('\n'));
}

#[test]
fn a_malformed_line_before_the_end_names_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gw-01.ndjson");
    let record = |seq| format!(r#"{{"seq":{seq},"ts_ms":1,"topic":"t","payload":1}}"#);
    fs::write(&path, format!("{}\nnot json\n{}\n", record(1), record(3))).expect("write");
    match FilesStore::open(dir.path()) {
        Err(Error::Malformed { path: p, line, .. }) => {
            assert_eq!(p, path);
            assert_eq!(line, 2);
        }
        other => panic!("expected a malformed-line error, got {other:?}"),
    }
}

#[test]
fn a_stored_line_that_is_not_a_valid_record_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("d.ndjson"),
        "{\"seq\":1,\"ts_ms\":1,\"payload\":1}\n",
    )
    .expect("write");
    let error = FilesStore::open(dir.path()).expect_err("must refuse");
    assert!(
        error
            .to_string()
            .ends_with("d.ndjson:1: record.topic: missing"),
        "{error}"
    );
}

#[test]
fn a_gap_line_with_an_unknown_reason_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("d.gaps.ndjson"),
        "{\"from_seq\":1,\"to_seq\":2,\"reason\":\"eaten\"}\n",
    )
    .expect("write");
    let error = FilesStore::open(dir.path()).expect_err("must refuse");
    assert!(error.to_string().contains("d.gaps.ndjson:1: "), "{error}");
}

#[test]
fn a_file_named_for_no_valid_device_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(dir.path().join("bad name.ndjson"), "").expect("write");
    assert!(matches!(
        FilesStore::open(dir.path()),
        Err(Error::UnexpectedFile { .. })
    ));
}

#[test]
fn other_files_in_the_directory_are_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(dir.path().join("README.txt"), "hello").expect("write");
    let store = FilesStore::open(dir.path()).expect("open");
    assert!(store.devices().is_empty());
}

#[test]
fn gaps_are_stored_once_and_in_their_own_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    let b = batch(
        "d",
        &[10],
        &[
            (1, 4, "journal_full"),
            (5, 9, "journal_lost"),
            (1, 4, "journal_full"),
        ],
    );
    assert_eq!(store.ingest(&b).expect("ingest"), outcome(1, 0, 2));
    assert_eq!(store.ingest(&b).expect("ingest"), outcome(0, 1, 0));
    let text = fs::read_to_string(dir.path().join("d.gaps.ndjson")).expect("read");
    assert_eq!(
        text,
        "{\"from_seq\":1,\"to_seq\":4,\"reason\":\"journal_full\"}\n\
         {\"from_seq\":5,\"to_seq\":9,\"reason\":\"journal_lost\"}\n"
    );
    drop(store);
    let store = FilesStore::open(dir.path()).expect("reopen");
    assert_eq!(store.devices()[0].gaps.len(), 2);
    assert_eq!(store.devices()[0].missing, vec![]);
}

#[test]
fn a_device_id_ending_in_gaps_is_refused_rather_than_sharing_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    assert!(matches!(
        store.ingest(&batch("x.gaps", &[1], &[])),
        Err(Error::ReservedDeviceId { .. })
    ));
}

#[test]
fn the_records_file_length_covers_only_complete_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    assert!(store.records_file("d").expect("lookup").is_none());
    store.ingest(&batch("d", &[1, 2], &[])).expect("ingest");
    let (_, len) = store.records_file("d").expect("lookup").expect("file");
    let text = fs::read_to_string(dir.path().join("d.ndjson")).expect("read");
    assert_eq!(len, text.len() as u64);
}

#[test]
fn a_stored_seq_with_other_content_refuses_the_whole_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    store
        .ingest(&batch("gw-01", &[1, 2, 3], &[]))
        .expect("ingest");
    let path = dir.path().join("gw-01.ndjson");
    let before = fs::read_to_string(&path).expect("read");

    // Seq 2 is stored as "r2"; 3 is a true duplicate, 4 is new, and there is a new gap.
    let clashing = batch_of(
        &[
            r#"{"seq":2,"ts_ms":1,"topic":"t","payload_text":"other box"}"#,
            r#"{"seq":3,"ts_ms":1,"topic":"t","payload_text":"r3"}"#,
            r#"{"seq":4,"ts_ms":1,"topic":"t","payload_text":"r4"}"#,
        ],
        &[r#"{"from_seq":5,"to_seq":6,"reason":"journal_full"}"#],
    );
    let error = store.ingest(&clashing).expect_err("must refuse");
    assert_eq!(
        error.to_string(),
        "device_id gw-01: seq 2 already stored with different content; \
         two gateways share this device id (cloned image?)"
    );
    assert_eq!(fs::read_to_string(&path).expect("read"), before);
    assert!(!dir.path().join("gw-01.gaps.ndjson").exists());
    let device = &store.devices()[0];
    assert_eq!((device.records, device.highest_seq), (3, 3));
    assert_eq!(device.gaps, vec![]);
    assert_eq!(
        device.clashes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(device.clashes_total, 1);

    // The owner of the id resending its own records is unaffected.
    assert_eq!(
        store
            .ingest(&batch("gw-01", &[2, 3, 4], &[]))
            .expect("ingest"),
        outcome(1, 2, 0)
    );
}

#[test]
fn clashes_are_counted_per_seq_with_first_and_last_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    store.ingest(&batch("gw-01", &[1, 2], &[])).expect("ingest");
    let other = |seqs: &[u64]| {
        let records: Vec<String> = seqs
            .iter()
            .map(|s| format!(r#"{{"seq":{s},"ts_ms":2,"topic":"t","payload_text":"x"}}"#))
            .collect();
        batch_of(&records.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    assert_eq!(clash_seq(store.ingest_at(&other(&[1, 2]), 1000)), 1);
    assert_eq!(clash_seq(store.ingest_at(&other(&[2]), 2000)), 2);
    let device = &store.devices()[0];
    assert_eq!(
        device.clashes,
        vec![
            Clash {
                seq: 1,
                first_seen_ms: 1000,
                last_seen_ms: 1000,
                count: 1
            },
            Clash {
                seq: 2,
                first_seen_ms: 1000,
                last_seen_ms: 2000,
                count: 2
            },
        ]
    );
    assert_eq!(device.clashes_total, 3);
}

#[test]
fn only_the_most_recently_clashing_seqs_are_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FilesStore::open(dir.path()).expect("open");
    let seqs: Vec<u64> = (1..=250).collect();
    store.ingest(&batch("gw-01", &seqs, &[])).expect("ingest");
    let other = |seqs: &[u64]| {
        let records: Vec<String> = seqs
            .iter()
            .map(|s| format!(r#"{{"seq":{s},"ts_ms":2,"topic":"t","payload_text":"x"}}"#))
            .collect();
        batch_of(&records.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    // Seq 7 clashes first; then one batch clashes on 51..=200 at once, keeping 101..=200;
    // then 250 pushes out the lowest of those.
    clash_seq(store.ingest_at(&other(&[7]), 1));
    clash_seq(store.ingest_at(&other(&(51..=200).collect::<Vec<_>>()), 2));
    clash_seq(store.ingest_at(&other(&[250]), 3));
    let device = &store.devices()[0];
    let listed: Vec<u64> = device.clashes.iter().map(|c| c.seq).collect();
    let expected: Vec<u64> = (102..=200).chain([250]).collect();
    assert_eq!(listed, expected);
    assert_eq!(device.clashes.len(), MAX_CLASHES);
    assert_eq!(device.clashes_total, 1 + 150 + 1);
}

/// Regression guard: if the fingerprint read back from a stored line differed from the one
/// computed at ingest, every resend after a restart would be refused as a clash.
#[test]
fn after_a_restart_a_resend_is_a_duplicate_and_other_content_still_clashes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let records = [
        r#"{"seq":1,"ts_ms":1763700000000,"topic":"s/t1","payload":{"t":21.5,"a":[1e-7,null,"é\n"]}}"#,
        r#"{"seq":2,"ts_ms":2,"topic":"s/raw","payload_b64":"AAEC"}"#,
        r#"{"seq":3,"ts_ms":3,"topic":"log","payload_text":"héllo \"q\""}"#,
        r#"{"seq":4,"ts_ms":4,"topic":"bad","payload_b64":"e30=","parse_error":true}"#,
        r#"{"seq":5,"ts_ms":5,"topic":"n","payload":null}"#,
        r#"{"seq":6,"ts_ms":6,"topic":"big","payload":18446744073709551615}"#,
    ];
    let original = batch_of(&records, &[]);
    {
        let store = FilesStore::open(dir.path()).expect("open");
        assert_eq!(store.ingest(&original).expect("ingest"), outcome(6, 0, 0));
    }
    let store = FilesStore::open(dir.path()).expect("reopen");
    assert_eq!(store.ingest(&original).expect("resend"), outcome(0, 6, 0));
    let changed = batch_of(
        &[r#"{"seq":4,"ts_ms":4,"topic":"bad","payload_b64":"e30="}"#],
        &[],
    );
    assert_eq!(clash_seq(store.ingest(&changed)), 4);
}

/// A stand-in for `sync_data` that a test holds and releases: each call is counted and waits until
/// the gate opens, then syncs for real or fails.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    calls: u64,
    open: bool,
    fail: bool,
}

impl Gate {
    fn store(self: &Arc<Self>, dir: &Path) -> FilesStore {
        FilesStore::open_with(dir, self.sync_fn(), SYNC_WAIT).expect("open")
    }

    fn sync_fn(self: &Arc<Self>) -> SyncFn {
        let gate = Arc::clone(self);
        Arc::new(move |file: &File| {
            let mut st = lock(&gate.state);
            st.calls += 1;
            gate.changed.notify_all();
            while !st.open {
                st = gate.changed.wait(st).expect("gate lock");
            }
            if st.fail {
                Err(io::Error::other("test: the disk refuses to sync"))
            } else {
                file.sync_data()
            }
        })
    }

    fn open(&self, fail: bool) {
        let mut st = lock(&self.state);
        st.open = true;
        st.fail = fail;
        self.changed.notify_all();
    }

    fn calls(&self) -> u64 {
        lock(&self.state).calls
    }
}

/// Polls `cond`; panics naming `what` after ten seconds.
fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    ferry_testkit::poll_until(what, std::time::Duration::from_secs(10), cond)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Group commit: a request written while another one's sync runs does not wait for the lock, it
/// waits for the next sync, which it shares with every request that wrote meanwhile; a resend of
/// records that are written but not yet synced is not answered before they are durable; and the
/// device listing counts a record only once it is durable (a reader polling the count then reads
/// the records file and must find every record counted).
#[test]
fn concurrent_requests_share_a_sync_and_are_answered_only_once_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Arc::new(Gate::default());
    let store = Arc::new(gate.store(dir.path()));
    let ingest = |seqs: &'static [u64]| {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.ingest(&batch("gw-01", seqs, &[])))
    };
    let a = ingest(&[1, 2]);
    wait_for("the first sync to start", || gate.calls() == 1);
    let b = ingest(&[3, 4]);
    let resend = ingest(&[1, 2]);
    wait_for("three requests waiting for durability", || {
        store.waiting("gw-01") == 3
    });
    assert!(!a.is_finished() && !b.is_finished() && !resend.is_finished());
    let (_, len) = store.records_file("gw-01").expect("lookup").expect("file");
    assert_eq!(len, 0, "nothing is served before it is durable");
    assert!(
        store.devices().is_empty(),
        "no record is counted before it is durable: {:?}",
        store.devices()
    );

    gate.open(false);
    let answers = [a, b, resend].map(|h| h.join().expect("thread").expect("ingest"));
    assert_eq!(
        answers,
        [outcome(2, 0, 0), outcome(2, 0, 0), outcome(0, 2, 0)]
    );
    assert_eq!(
        gate.calls(),
        2,
        "the writes made during the first sync share the second"
    );
    let text = fs::read_to_string(dir.path().join("gw-01.ndjson")).expect("read");
    assert_eq!(text.lines().count(), 4);
    let (_, len) = store.records_file("gw-01").expect("lookup").expect("file");
    assert_eq!(len, text.len() as u64);
    let device = &store.devices()[0];
    assert_eq!((device.records, device.highest_seq), (4, 4));
}

/// A failed sync: neither the request that wrote the lines nor a resend waiting for them is
/// acknowledged, the file is cut back to what was durable, and the records are stored again when
/// they come again.
#[test]
fn a_failed_sync_refuses_every_request_waiting_for_it_and_the_resend_is_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gw-01.ndjson");
    {
        let store = FilesStore::open(dir.path()).expect("open");
        store.ingest(&batch("gw-01", &[1], &[])).expect("ingest");
    }
    let durable = fs::read_to_string(&path).expect("read");
    let gate = Arc::new(Gate::default());
    let store = Arc::new(gate.store(dir.path()));
    let ingest = |seqs: &'static [u64]| {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.ingest(&batch("gw-01", seqs, &[])))
    };
    let a = ingest(&[2, 3]);
    wait_for("the sync to start", || gate.calls() == 1);
    let resend = ingest(&[2, 3]);
    wait_for("both requests waiting", || store.waiting("gw-01") == 2);

    gate.open(true);
    for h in [a, resend] {
        match h.join().expect("thread") {
            Err(Error::Sync { .. }) => {}
            other => panic!("a request not durable was answered {other:?}"),
        }
    }
    assert_eq!(fs::read_to_string(&path).expect("read"), durable);
    assert_eq!(store.devices()[0].records, 1);

    gate.open(false);
    assert_eq!(
        store
            .ingest(&batch("gw-01", &[1, 2, 3], &[]))
            .expect("ingest"),
        outcome(2, 1, 0)
    );
    assert_eq!(fs::read_to_string(&path).expect("read").lines().count(), 3);
}

/// Upstream-gap records are counted once each: at write, and again from the file after a failed
/// sync reloads the durable ones (not on top of the count before it).
#[test]
fn upstream_gaps_are_counted_once_across_a_failed_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gap = |seq: u64| {
        format!(
            r#"{{"seq":{seq},"ts_ms":1,"topic":"$ferry/upstream_gap","payload":{{"kind":"seq"}}}}"#
        )
    };
    {
        let store = FilesStore::open(dir.path()).expect("open");
        store.ingest(&batch_of(&[&gap(1)], &[])).expect("ingest");
        assert_eq!(store.devices()[0].upstream_gaps, 1);
    }
    let gate = Arc::new(Gate::default());
    let store = Arc::new(gate.store(dir.path()));
    assert_eq!(store.devices()[0].upstream_gaps, 1, "counted at load");
    let failing = {
        let store = Arc::clone(&store);
        let line = gap(2);
        std::thread::spawn(move || store.ingest(&batch_of(&[&line], &[])))
    };
    wait_for("the sync to start", || gate.calls() == 1);
    gate.open(true);
    assert!(matches!(
        failing.join().expect("thread"),
        Err(Error::Sync { .. })
    ));
    assert_eq!(store.devices()[0].upstream_gaps, 1, "after the failed sync");
    gate.open(false);
    store.ingest(&batch_of(&[&gap(2)], &[])).expect("ingest");
    assert_eq!(store.devices()[0].upstream_gaps, 2);
}

/// A sync that does not end (a hung disk) holds the request that runs it, but the others waiting
/// for it are answered within the store's wait with `SyncSlow` (503 to the sender), and their
/// lines are stored once a sync does end.
#[test]
fn requests_waiting_for_a_hung_sync_give_up_at_the_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = Arc::new(Gate::default());
    let sync = gate.sync_fn();
    let store = Arc::new(
        FilesStore::open_with(dir.path(), sync, std::time::Duration::from_millis(200))
            .expect("open"),
    );
    let ingest = |seqs: &'static [u64]| {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.ingest(&batch("gw-01", seqs, &[])))
    };
    let runner = ingest(&[1]);
    wait_for("the sync to start", || gate.calls() == 1);
    let waiter = ingest(&[2]);
    wait_for("the waiting request to give up", || waiter.is_finished());
    match waiter.join().expect("thread") {
        Err(Error::SyncSlow { waited, .. }) => {
            assert!(
                waited >= std::time::Duration::from_millis(200),
                "{waited:?}"
            )
        }
        other => panic!("a request waiting for a hung sync was answered {other:?}"),
    }
    assert!(!runner.is_finished(), "the sync still hangs");
    gate.open(false);
    assert_eq!(
        runner.join().expect("thread").expect("ingest"),
        outcome(1, 0, 0)
    );
    assert_eq!(
        store.ingest(&batch("gw-01", &[2], &[])).expect("resend"),
        outcome(0, 1, 0),
        "the line of the request that gave up was stored"
    );
    assert_eq!(store.devices()[0].records, 2);
}
