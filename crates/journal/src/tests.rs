//! Journal tests against real files (sled and the log) in a temp dir, including a model test across
//! restarts and damaged logs.
//!
//! Why one file of this length: the journal's behaviour tests share one set of helpers (`opts`,
//! `rec`, `append_synced`); each test names the rule it checks.
use super::codec::*;
use super::*;

fn opts(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        max_bytes: 64 * 1024 * 1024,
        on_full: OnFull::RejectNew,
        cache_bytes: 4 * 1024 * 1024,
        replay_window: crate::default_replay_window(64 << 20),
        fixed_budget: None,
    }
}

/// A text record on `topic` (shared with the codec's tests).
pub(super) fn rec(topic: &str, payload: &[u8]) -> NewRecord {
    NewRecord {
        ts_ms: 1,
        topic: topic.into(),
        payload: payload.to_vec(),
        format: StoredFormat::Text,
        parse_error: false,
        mono: None,
        too_large: None,
        mqtt: None,
    }
}

fn qos1(pkid: u16, dup: bool, payload: &[u8]) -> NewRecord {
    NewRecord {
        mqtt: Some(MqttDelivery { pkid, dup }),
        ..rec("t", payload)
    }
}

fn append_synced(j: &Journal, recs: &[NewRecord]) -> Appended {
    let a = j.append(recs).unwrap();
    j.sync().unwrap();
    a
}

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(Entry::first_seq).collect()
}

#[test]
fn seqs_start_at_one_and_stay_monotonic_across_reopen_and_acks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let a = append_synced(&j, &[rec("t", b"1"), rec("t", b"2")]);
        assert_eq!((a.first_seq, a.last_seq), (Some(1), Some(2)));
        j.ack(2).unwrap();
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.positions().acked_seq, 2);
    // Everything was acked and removed: the next seq must still not reuse 1 or 2.
    let a = append_synced(&j, &[rec("t", b"3")]);
    assert_eq!(a.first_seq, Some(3));
}

#[test]
fn only_durable_entries_are_read_and_acks_remove_them() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    j.append(&[rec("t", b"a"), rec("t", b"b"), rec("t", b"c")])
        .unwrap();
    assert!(
        j.read_batch(None, 10, 1 << 20).unwrap().is_empty(),
        "unsynced records must not be uploaded"
    );
    j.sync().unwrap();
    let batch = j.read_batch(None, 2, 1 << 20).unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    j.ack(2).unwrap();
    let p = j.positions();
    assert_eq!((p.acked_seq, p.head_seq, p.backlog_records), (2, 3, 1));
    assert_eq!(seqs(&j.read_batch(None, 10, 1 << 20).unwrap()), vec![3]);
    // The cursor never moves backwards.
    j.ack(1).unwrap();
    assert_eq!(j.positions().acked_seq, 2);
}

#[test]
fn batch_respects_byte_limit_but_always_returns_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", &[b'x'; 1000]), rec("t", &[b'y'; 1000])]);
    assert_eq!(j.read_batch(None, 10, 10).unwrap().len(), 1);
    assert_eq!(j.read_batch(None, 10, 1100).unwrap().len(), 1);
    assert_eq!(j.read_batch(None, 10, 4000).unwrap().len(), 2);
}

#[test]
fn a_dup_redelivery_of_a_journaled_message_is_not_journaled_twice() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[qos1(7, false, b"m1")]);
    }
    // Crash between fsync and PUBACK: the broker redelivers with DUP after restart.
    let j = Journal::open(&opts(dir.path())).unwrap();
    let a = append_synced(&j, &[qos1(7, true, b"m1")]);
    assert_eq!(a.redeliveries, 1);
    assert_eq!(a.first_seq, None);
    assert_eq!(j.positions().head_seq, 1);
    // A DUP with different content under the same packet id is a different message.
    let a = append_synced(&j, &[qos1(7, true, b"other")]);
    assert_eq!(a.first_seq, Some(2));
    // A new (non-DUP) message reusing the packet id is always journaled.
    let a = append_synced(&j, &[qos1(7, false, b"other")]);
    assert_eq!(a.first_seq, Some(3));
}

/// In a group that mixes QoS0 records (no mark), QoS1 records, and a redelivery, each mark is
/// of its own record: a redelivery of any of the QoS1 ones is recognised, across a restart too.
#[test]
fn marks_of_a_mixed_group_belong_to_their_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[qos1(1, false, b"a")]);
    let group = [
        rec("t", b"qos0"),
        qos1(1, true, b"a"),
        qos1(2, false, b"b"),
        rec("t", b"qos0 again"),
        qos1(3, false, b"c"),
    ];
    let a = append_synced(&j, &group);
    assert_eq!(
        (a.redeliveries, a.first_seq, a.last_seq),
        (1, Some(2), Some(5))
    );
    for restarted in [false, true] {
        for (pkid, payload) in [(1, b"a"), (2, b"b"), (3, b"c")] {
            let a = append_synced(&j, &[qos1(pkid, true, payload)]);
            assert_eq!(a.redeliveries, 1, "pkid {pkid} restarted={restarted}");
        }
        if !restarted {
            drop(j);
            j = Journal::open(&opts(dir.path())).unwrap();
        }
    }
    assert_eq!(j.positions().head_seq, 5);
}

#[test]
fn reject_new_refuses_appends_over_budget_and_accepts_after_acks() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.fixed_budget = Some(50_000); // room for four 10 kB records
    let j = Journal::open(&o).unwrap();
    let big = vec![b'x'; 10_000];
    for _ in 0..3 {
        append_synced(&j, &[rec("t", &big)]);
    }
    let a = append_synced(&j, &[rec("t", &big), rec("t", &big)]);
    assert_eq!(a.taken, 1, "only the prefix that fits is taken");
    let err = j.append(&[rec("t", &big)]).unwrap_err();
    assert!(err.is_full(), "{err}");
    assert_eq!(j.positions().head_seq, 4, "a refused append assigns no seq");
    j.read_batch(None, 10, 1 << 20).unwrap();
    j.ack(4).unwrap();
    let a = append_synced(&j, &[rec("t", &big), rec("t", &big)]);
    assert_eq!(a.taken, 2);
    assert_eq!(j.positions().head_seq, 6);
}

/// A `drop_oldest` journal with a 40 kB budget holding three synced records of 10 kB (seqs 1..=3).
fn drop_oldest_with_three_records(dir: &Path) -> Journal {
    let mut o = opts(dir);
    o.fixed_budget = Some(40_000);
    o.on_full = OnFull::DropOldest;
    let j = Journal::open(&o).unwrap();
    for _ in 0..3 {
        append_synced(&j, &[rec("t", &[b'x'; 10_000])]);
    }
    j
}

#[test]
fn drop_oldest_replaces_unsent_records_with_an_exact_gap() {
    let dir = tempfile::tempdir().unwrap();
    let j = drop_oldest_with_three_records(dir.path());
    let big = vec![b'x'; 10_000];
    // Seq 1 is in flight: protected from trimming.
    assert_eq!(seqs(&j.read_batch(None, 1, 1 << 20).unwrap()), vec![1]);
    let a = append_synced(&j, &[rec("t", &big), rec("t", &big)]);
    assert_eq!(a.dropped, 2);
    assert_eq!((a.first_seq, a.last_seq), (Some(4), Some(5)));
    j.release();
    let all = j.read_batch(None, 100, 1 << 30).unwrap();
    assert_eq!(all[0].first_seq(), 1);
    assert_eq!(
        all[1],
        Entry::Gap {
            from_seq: 2,
            to_seq: 3,
            reason: GapReason::JournalFull
        }
    );
    assert_eq!(seqs(&all[2..]), vec![4, 5]);
    assert!(j.positions().logical_bytes <= j.positions().budget_bytes);
}

/// `journal.max_age`: the oldest unsent records the caller says are too old become `expired`
/// gaps; a record of unknown age is kept and passed, the first young one ends the scan, a record
/// in flight is never touched, and the gaps survive a reopen (they were synced).
#[test]
fn expiry_covers_the_oldest_unsent_records_with_expired_gaps() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let recs: Vec<NewRecord> = (1..=8)
            .map(|ts| NewRecord {
                ts_ms: ts,
                ..rec("t", b"x")
            })
            .collect();
        append_synced(&j, &recs);
        // Seq 1 is in flight; seq 4's age is unknown; seqs 7 and 8 are young; nothing after the
        // first young one is looked at (8 would say "expired").
        assert_eq!(seqs(&j.read_batch(None, 1, 1 << 20).unwrap()), vec![1]);
        let mut asked = Vec::new();
        let n = j
            .expire(|r| {
                asked.push(r.seq);
                match r.ts_ms {
                    4 => None,
                    7 => Some(false),
                    _ => Some(true),
                }
            })
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(asked, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(j.positions().expired, 4);
        assert_eq!(j.positions().dropped, 0);
        j.release();
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    let all = j.read_batch(None, 100, 1 << 30).unwrap();
    let gap = |from_seq, to_seq| Entry::Gap {
        from_seq,
        to_seq,
        reason: GapReason::Expired,
    };
    assert_eq!(seqs(&all[..1]), vec![1]);
    assert_eq!(all[1], gap(2, 3));
    assert_eq!(seqs(&all[2..3]), vec![4]);
    assert_eq!(all[3], gap(5, 6));
    assert_eq!(seqs(&all[4..]), vec![7, 8]);
    assert_eq!(j.positions().backlog_records, 6);
}

/// Entries read and then held back by the uplink (`unread_after`) lose their protection:
/// `drop_oldest` may trim them, while those still in the upload stay protected.
#[test]
fn entries_read_and_held_back_are_no_longer_protected() {
    let dir = tempfile::tempdir().unwrap();
    let j = drop_oldest_with_three_records(dir.path());
    assert_eq!(
        seqs(&j.read_batch(None, 3, 1 << 20).unwrap()),
        vec![1, 2, 3]
    );
    // Only seq 1 goes out; 2 and 3 are held back.
    j.unread_after(1);
    let a = append_synced(&j, &[rec("t", &[b'x'; 10_000]), rec("t", &[b'x'; 10_000])]);
    assert_eq!(a.dropped, 2);
    assert!(j.ack(1).unwrap());
    let rest = j.read_batch(None, 100, 1 << 30).unwrap();
    assert_eq!(
        rest[0],
        Entry::Gap {
            from_seq: 2,
            to_seq: 3,
            reason: GapReason::JournalFull
        }
    );
}

/// The uplink acks the first of two batches in flight: the second stays protected from
/// `drop_oldest` until it is acknowledged or released.
#[test]
fn an_ack_keeps_the_batch_read_behind_it_protected() {
    let dir = tempfile::tempdir().unwrap();
    let j = drop_oldest_with_three_records(dir.path());
    let big = vec![b'x'; 10_000];
    assert_eq!(seqs(&j.read_batch(None, 1, 1 << 20).unwrap()), vec![1]);
    assert_eq!(seqs(&j.read_after(1, None, 1, 1 << 20).unwrap()), vec![2]);
    assert!(j.ack(1).unwrap());
    // Room for two more: only seq 3 may go, seq 2 is in flight.
    let a = append_synced(&j, &[rec("t", &big), rec("t", &big)]);
    assert_eq!(a.dropped, 1);
    assert!(j.ack(2).unwrap());
    let rest = j.read_batch(None, 100, 1 << 30).unwrap();
    assert_eq!(
        rest[0],
        Entry::Gap {
            from_seq: 3,
            to_seq: 3,
            reason: GapReason::JournalFull
        }
    );
    assert_eq!(seqs(&rest[1..]), vec![4, 5]);
}

#[test]
fn dead_letter_leaves_a_rejected_gap_and_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("a", b"1"), rec("b", b"poison"), rec("c", b"3")]);
    j.dead_letter(2, 422, "status 422 bad").unwrap();
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(
        all[1],
        Entry::Gap {
            from_seq: 2,
            to_seq: 2,
            reason: GapReason::Rejected
        }
    );
    let dl = j.dead_letters(10).unwrap();
    assert_eq!(
        (dl[0].seq, dl[0].status, dl[0].topic.as_str()),
        (2, 422, "b")
    );
    let new_seq = j.requeue(2).unwrap();
    assert_eq!(new_seq, 4);
    // The requeued record is the refused one, unchanged, under its new seq.
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    match all.last() {
        Some(Entry::Record(r)) => assert_eq!(
            (r.seq, r.topic.as_str(), r.payload.as_slice()),
            (4, "b", &b"poison"[..])
        ),
        other => panic!("expected the requeued record, got {other:?}"),
    }
    assert!(j.dead_letters(10).unwrap().is_empty());
    assert!(matches!(j.requeue(2), Err(Error::NoDeadLetter { seq: 2 })));
}

/// The segment files of the journal in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Records 1 and 2 in the first segment (256 KiB with these options), 3 in the second.
fn two_segments(j: &Journal) {
    for i in 1..=3 {
        assert_eq!(append_synced(j, &[rec("t", &[i; 100_000])]).taken, 1);
    }
}

fn small(dir: &Path) -> Options {
    let mut o = opts(dir);
    o.max_bytes = 4 << 20; // segments of 256 KiB
    o.replay_window = crate::default_replay_window(o.max_bytes);
    o
}

/// `oldest_unsent` (read by every `/status`, upload and downlink hello) finds the record after
/// the last ack as the acks move through a segment and on to the next, while the uplink reads
/// ahead, and it starts where it found the oldest record last time, not at its segment's first
/// frame (a scan of up to a segment under the journal's lock at every `/status`).
#[test]
fn the_oldest_unsent_record_follows_the_acks_and_is_found_where_it_was_last() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&small(dir.path())).unwrap();
    let payload = |seq: u64| format!("{seq:>1000}").into_bytes();
    for first in (1..=1000).step_by(100) {
        let recs: Vec<NewRecord> = (first..first + 100)
            .map(|s| rec("t", &payload(s)))
            .collect();
        append_synced(&j, &recs);
    }
    assert!(
        segments(dir.path()).len() >= 3,
        "{:?}",
        segments(dir.path())
    );
    let mut read_through = 0;
    for acked in [0u64, 1, 2, 150, 151, 260, 600, 601, 999] {
        // The uplink has read (and keeps reading) ahead of the acks.
        while read_through < (acked + 200).min(1000) {
            let batch = j.read_after(read_through, None, 50, 1 << 20).unwrap();
            read_through = batch.last().map_or(read_through, Entry::last_seq);
        }
        if acked > 0 {
            assert!(j.ack(acked).unwrap());
        }
        let oldest = j.oldest_unsent().unwrap().expect("a record waits");
        assert_eq!(
            (oldest.seq, oldest.payload),
            (acked + 1, payload(acked + 1))
        );
        assert_eq!(
            j.lock().log.as_ref().and_then(Segments::start_kept),
            Some(acked + 1),
            "after ack {acked}"
        );
        // Asked again (the next /status): one frame decoded, the record itself.
        j.lock().log.as_mut().map(Segments::take_decoded);
        assert_eq!(j.oldest_unsent().unwrap().map(|r| r.seq), Some(acked + 1));
        assert_eq!(
            j.lock().log.as_mut().map(Segments::take_decoded),
            Some(1),
            "frames decoded to find the oldest record again after ack {acked}"
        );
    }
    j.ack(1000).unwrap();
    assert!(j.oldest_unsent().unwrap().is_none());
}

/// The newest records, acknowledged ones included, in seq order after a reopen; a number past
/// what the journal holds visits everything; nothing at all for an empty journal.
#[test]
fn the_newest_records_are_visited_acknowledged_or_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&small(dir.path())).unwrap();
        let mut seen = Vec::new();
        j.visit_recent(10, |r| seen.push(r.seq)).unwrap();
        assert!(seen.is_empty());
        let recs: Vec<NewRecord> = (1..=30u64).map(|s| rec(&format!("t/{s}"), b"x")).collect();
        append_synced(&j, &recs);
        j.read_batch(None, 100, 1 << 20).unwrap();
        assert!(j.ack(25).unwrap());
    }
    let j = Journal::open(&small(dir.path())).unwrap();
    let mut seen = Vec::new();
    j.visit_recent(10, |r| seen.push((r.seq, r.topic.clone())))
        .unwrap();
    let want: Vec<(u64, String)> = (21..=30).map(|s| (s, format!("t/{s}"))).collect();
    assert_eq!(seen, want);
    let mut all = 0;
    j.visit_recent(1_000, |_| all += 1).unwrap();
    assert_eq!(all, 30);
}

#[test]
fn a_missing_segment_is_reported_as_journal_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&small(dir.path())).unwrap();
        two_segments(&j);
    }
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2, "{segs:?}");
    std::fs::remove_file(&segs[0]).unwrap();
    let j = Journal::open(&small(dir.path())).unwrap();
    let all = j.read_batch(None, 10, 1 << 30).unwrap();
    assert_eq!(
        all[0],
        Entry::Gap {
            from_seq: 1,
            to_seq: 2,
            reason: GapReason::JournalLost
        }
    );
    assert_eq!(seqs(&all), vec![1, 3]);
    // Recorded: after a restart the same gap is reported, not a new one.
    drop(j);
    let j = Journal::open(&small(dir.path())).unwrap();
    assert_eq!(seqs(&j.read_batch(None, 10, 1 << 30).unwrap()), vec![1, 3]);
    j.ack(3).unwrap();
    assert_eq!(j.positions().backlog_records, 0);
}

#[test]
fn a_truncated_older_segment_reports_only_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&small(dir.path())).unwrap();
        two_segments(&j);
    }
    let segs = segments(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[0])
        .unwrap();
    f.set_len(100_500).unwrap(); // record 1 whole, record 2 cut
    let j = Journal::open(&small(dir.path())).unwrap();
    let all = j.read_batch(None, 10, 1 << 30).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert!(matches!(all[0], Entry::Record(_)));
    assert_eq!(
        all[1],
        Entry::Gap {
            from_seq: 2,
            to_seq: 2,
            reason: GapReason::JournalLost
        }
    );
}

#[test]
fn a_bad_frame_in_the_middle_is_reported_and_the_frames_after_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let recs: Vec<NewRecord> = (0..5).map(|i| rec("t", &[b'a' + i; 100])).collect();
        append_synced(&j, &recs);
    }
    let seg = &segments(dir.path())[0];
    let mut bytes = std::fs::read(seg).unwrap();
    let frame = bytes.len() / 5;
    bytes[frame + frame / 2] ^= 0xff; // inside record 2
    std::fs::write(seg, &bytes).unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.positions().head_seq, 5, "not taken for a torn tail");
    let all = j.read_batch(None, 10, 1 << 30).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        all[1],
        Entry::Gap {
            from_seq: 2,
            to_seq: 2,
            reason: GapReason::JournalLost
        }
    );
    assert!(all[2..].iter().all(|e| matches!(e, Entry::Record(_))));
}

#[test]
fn a_torn_tail_is_cut_and_seqs_continue_after_the_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1"), rec("t", b"2")]);
    }
    let seg = &segments(dir.path())[0];
    let synced = std::fs::metadata(seg).unwrap().len();
    // A frame that was being written when the power went: a header and part of its body.
    let mut f = std::fs::OpenOptions::new().append(true).open(seg).unwrap();
    std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3, 4, 3, 0, 0]).unwrap();
    drop(f);
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(
        std::fs::metadata(seg).unwrap().len(),
        synced,
        "the tail is cut"
    );
    assert_eq!(j.positions().head_seq, 2);
    assert_eq!(append_synced(&j, &[rec("t", b"3")]).first_seq, Some(3));
    let all = j.read_batch(None, 10, 1 << 30).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert!(all.iter().all(|e| matches!(e, Entry::Record(_))));
}

#[test]
fn entries_of_the_older_layout_are_moved_into_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        // What the older layout kept: every entry as an `E` key in sled.
        let store = j.store().unwrap();
        store
            .log
            .insert(entry_key(1), encode_record(&rec("t", b"old1")))
            .unwrap();
        store
            .log
            .insert(entry_key(2), encode_gap(4, GapReason::JournalFull))
            .unwrap();
        store
            .log
            .insert(entry_key(5), encode_record(&rec("t", b"old5")))
            .unwrap();
        store
            .log
            .insert(M_NEXT_SEQ, &6u64.to_be_bytes()[..])
            .unwrap();
        drop(store);
        j.sync().unwrap();
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.positions().head_seq, 5);
    assert_eq!(j.positions().backlog_records, 3);
    let all = j.read_batch(None, 10, 1 << 30).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 5]);
    assert_eq!(j.store().unwrap().log.scan_prefix([P_ENTRY]).count(), 0);
    assert_eq!(append_synced(&j, &[rec("t", b"new")]).first_seq, Some(6));
}

#[test]
fn a_cursor_ahead_of_the_journal_never_reuses_seqs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1")]);
    }
    {
        // A cursor from elsewhere (a restored database), written while the journal is closed.
        let db = layout::current(dir.path()).unwrap();
        let store = store::open_store(&opts(dir.path()), &db).unwrap();
        store.log.insert(M_ACKED, &10u64.to_be_bytes()[..]).unwrap();
        store.db.flush().unwrap();
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    let a = append_synced(&j, &[rec("t", b"new")]);
    assert_eq!(a.first_seq, Some(11));
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(
        all[0],
        Entry::Gap {
            from_seq: 2,
            to_seq: 10,
            reason: GapReason::JournalLost
        }
    );
}

#[test]
fn a_record_larger_than_the_whole_budget_is_taken_into_an_empty_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.fixed_budget = Some(1_000);
    let j = Journal::open(&o).unwrap();
    let a = append_synced(&j, &[rec("t", &[0; 5_000]), rec("t", b"next")]);
    assert_eq!(a.taken, 1);
    assert!(j.append(&[rec("t", b"next")]).unwrap_err().is_full());
    j.read_batch(None, 10, 1 << 20).unwrap();
    j.ack(1).unwrap();
    assert_eq!(append_synced(&j, &[rec("t", b"next")]).taken, 1);
}

/// Model test: random appends, acks, syncs and restarts against a BTreeMap of what must be
/// there. Seqs are never reused, acked entries never come back, unacked durable ones never go.
#[test]
fn journal_matches_a_model_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ferry_util::rng::Rng::new(1);
    let mut next = || rng.next_u64();
    let mut model: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    let mut acked = 0u64;
    let mut max_seq = 0u64;
    let mut j = Journal::open(&opts(dir.path())).unwrap();
    for step in 0..400 {
        match next() % 10 {
            0..=4 => {
                let n = (next() % 5 + 1) as usize;
                let recs: Vec<NewRecord> = (0..n)
                    .map(|i| rec("t", format!("{step}-{i}").as_bytes()))
                    .collect();
                let a = append_synced(&j, &recs);
                let first = a.first_seq.unwrap();
                assert_eq!(first, max_seq + 1, "seqs are consecutive and never reused");
                for (i, r) in recs.iter().enumerate() {
                    model.insert(first + i as u64, r.payload.clone());
                }
                max_seq = a.last_seq.unwrap();
            }
            5..=7 => {
                let batch = j
                    .read_batch(None, (next() % 7 + 1) as usize, 1 << 20)
                    .unwrap();
                if let Some(last) = batch.last() {
                    j.ack(last.last_seq()).unwrap();
                    acked = last.last_seq();
                    model.retain(|s, _| *s > acked);
                }
            }
            _ => {
                drop(j);
                j = Journal::open(&opts(dir.path())).unwrap();
            }
        }
        let all = j.read_batch(None, usize::MAX, u64::MAX).unwrap();
        j.release();
        let got: Vec<(u64, Vec<u8>)> = all
            .into_iter()
            .map(|e| match e {
                Entry::Record(r) => (r.seq, r.payload),
                Entry::Gap { .. } => panic!("no gaps expected"),
            })
            .collect();
        let want: Vec<(u64, Vec<u8>)> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
        assert_eq!(got, want, "step {step}");
        let p = j.positions();
        assert_eq!(
            (p.acked_seq, p.head_seq, p.backlog_records),
            (acked, max_seq, model.len() as u64)
        );
    }
}

#[test]
fn a_lost_journal_continues_after_the_seq_mark_and_reports_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1"), rec("t", b"2"), rec("t", b"3")]);
        j.read_batch(None, 1, 1 << 20).unwrap();
        j.ack(1).unwrap();
    }
    // The whole journal is gone but the seq mark: the database (its directory and the link to
    // it) and the log.
    std::fs::remove_dir_all(dir.path().join("db-1")).unwrap();
    std::fs::remove_file(dir.path().join("db")).unwrap();
    std::fs::remove_dir_all(dir.path().join(LOG_DIR)).unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    let Entry::Gap {
        from_seq,
        to_seq,
        reason,
    } = all[0]
    else {
        panic!("{all:?}")
    };
    assert_eq!(
        (from_seq, reason),
        (2, GapReason::JournalLost),
        "the loss starts after the last known ack"
    );
    assert!(
        to_seq >= 3,
        "it covers every seq that may have been assigned"
    );
    let a = append_synced(&j, &[rec("t", b"new")]);
    assert_eq!(a.first_seq, Some(to_seq + 1), "seq never goes backwards");
}

#[test]
fn a_journal_that_comes_back_shorter_is_detected_by_the_mark() {
    comes_back_shorter(|_| {});
}

/// Ten records synced in two groups and closed; `damage` runs on the journal's directory, then
/// the log loses its synced tail (a disk that lies about fsync): records 4..=10. Reopened, the
/// loss is reported from seq 4 through at least 10, and no seq of it is ever assigned again.
fn comes_back_shorter(damage: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let recs: Vec<NewRecord> = (0..10)
            .map(|i| rec("t", format!("{i}").as_bytes()))
            .collect();
        append_synced(&j, &recs[..3]);
        append_synced(&j, &recs[3..]);
    }
    damage(dir.path());
    let seg = &segments(dir.path())[0];
    let len = std::fs::metadata(seg).unwrap().len();
    // Frames of records "0".."9" are of equal size: keep three.
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(len / 10 * 3).unwrap();
    drop(f);
    let j = Journal::open(&opts(dir.path())).unwrap();
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(seqs(&all[..3]), vec![1, 2, 3]);
    let Entry::Gap {
        from_seq,
        to_seq,
        reason,
    } = all[3]
    else {
        panic!("{all:?}")
    };
    assert_eq!((from_seq, reason), (4, GapReason::JournalLost));
    assert!(to_seq >= 10);
    assert!(append_synced(&j, &[rec("t", b"new")]).first_seq.unwrap() > 10);
}

#[test]
fn a_journal_that_will_not_open_is_moved_aside_and_its_log_adopted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1"), rec("t", b"2")]);
    }
    // Make the database unopenable: a file where sled needs its directory.
    std::fs::remove_dir_all(dir.path().join("db-1")).unwrap();
    std::fs::write(dir.path().join("db-1"), b"not a database").unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept for forensics: {aside:?}");
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(
        seqs(&all),
        vec![1, 2],
        "the log's records, not a loss: {all:?}"
    );
    assert!(all.iter().all(|e| matches!(e, Entry::Record(_))), "{all:?}");
    assert_eq!(append_synced(&j, &[rec("t", b"new")]).first_seq, Some(3));
}

/// Seen in the 1,000-cut torture: a failed sync of sled's file, then a power cut before the
/// repair, and sled refuses its database. The log beside it holds every synced record: it is
/// adopted from the cloud's last known cursor (the seq mark's), counted, and its packet ids
/// recognise the broker's redeliveries.
#[test]
fn a_database_lost_beside_its_log_adopts_the_log_from_the_last_known_cursor() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let recs: Vec<NewRecord> = (1..=5).map(|i| qos1(i, false, &[i as u8; 10])).collect();
        append_synced(&j, &recs);
        j.read_batch(None, 2, 1 << 20).unwrap();
        j.ack(2).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("db-1")).unwrap();
    std::fs::remove_file(dir.path().join("db")).unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    let p = j.positions();
    assert_eq!((p.acked_seq, p.head_seq, p.backlog_records), (2, 5, 3));
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(seqs(&all), vec![3, 4, 5]);
    assert!(all.iter().all(|e| matches!(e, Entry::Record(_))), "{all:?}");
    // The broker redelivers message 5 (its PUBACK was lost with the cut): recognised.
    let a = append_synced(&j, &[qos1(5, true, &[5; 10])]);
    assert_eq!((a.redeliveries, a.first_seq), (1, None));
    assert_eq!(append_synced(&j, &[rec("t", b"new")]).first_seq, Some(6));
    // Adopted for good: the next open is an ordinary one.
    drop(j);
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.positions().head_seq, 6);
    assert_eq!(
        seqs(&j.read_batch(None, 10, 1 << 20).unwrap()),
        vec![3, 4, 5, 6]
    );
}

/// An adopted log is checked against the seq mark like any other: one that lost synced frames
/// with the database reports them, and never reuses their seqs.
#[test]
fn an_adopted_log_shorter_than_the_mark_reports_the_loss() {
    comes_back_shorter(|dir| {
        std::fs::remove_dir_all(dir.join("db-1")).unwrap();
        std::fs::remove_file(dir.join("db")).unwrap();
    });
}

#[test]
fn an_ordinary_restart_reports_no_loss_and_keeps_seqs_dense() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let j = Journal::open(&opts(dir.path())).unwrap();
        let a = append_synced(&j, &[rec("t", b"x")]);
        assert_eq!(a.first_seq, Some(round + 1));
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert!(
        j.read_batch(None, 10, 1 << 20)
            .unwrap()
            .iter()
            .all(|e| matches!(e, Entry::Record(_)))
    );
}

#[test]
fn compaction_keeps_every_entry_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.max_bytes = 4 << 20;
    o.replay_window = crate::default_replay_window(o.max_bytes);
    let j = Journal::open(&o).unwrap();
    // Churn: append and acknowledge 8 MB, keep 20 records.
    for round in 0..80u64 {
        let recs: Vec<NewRecord> = (0..100)
            .map(|i| rec("t", &vec![(round + i) as u8; 1000]))
            .collect();
        append_synced(&j, &recs);
        let last = j.positions().head_seq - 20;
        j.read_batch(None, usize::MAX, u64::MAX).unwrap();
        j.ack(last).unwrap();
    }
    let before = (
        j.positions(),
        j.read_batch(None, usize::MAX, u64::MAX).unwrap(),
    );
    j.release();
    j.compact().unwrap();
    let after = (
        j.positions(),
        j.read_batch(None, usize::MAX, u64::MAX).unwrap(),
    );
    j.release();
    assert_eq!(before.1, after.1, "same entries");
    assert_eq!(before.0.head_seq, after.0.head_seq);
    assert_eq!(before.0.acked_seq, after.0.acked_seq);
    // It keeps working, and survives a restart on the new generation.
    let a = append_synced(&j, &[rec("t", b"after")]);
    drop(j);
    let j = Journal::open(&o).unwrap();
    assert_eq!(j.positions().head_seq, a.last_seq.unwrap());
    assert!(dir.path().join("db-2").is_dir() && !dir.path().join("db-1").exists());
}

/// Regression: one redelivery mark per MQTT packet id ever seen (up to 65,536) was never removed,
/// was not counted in the budget, and kept compaction running after every commit.
#[test]
fn redelivery_marks_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    for chunk in 0..50u16 {
        let recs: Vec<NewRecord> = (0..100u16)
            .map(|i| qos1(chunk * 100 + i + 1, false, b"m"))
            .collect();
        append_synced(&j, &recs);
    }
    // The newest still catch a redelivery, across a restart.
    drop(j);
    let j = Journal::open(&opts(dir.path())).unwrap();
    let window = j.store().unwrap().log.get([P_WINDOW]).unwrap().unwrap();
    let (through, marks) = redelivery::decode(&window).unwrap();
    assert_eq!(through, 5001);
    assert!(
        marks.len() <= redelivery::MAX_MARKS,
        "{} marks kept",
        marks.len()
    );
    assert_eq!(j.store().unwrap().log.scan_prefix([P_INGEST]).count(), 0);
    assert_eq!(append_synced(&j, &[qos1(5000, true, b"m")]).redeliveries, 1);
}

#[test]
fn a_journal_in_use_is_reported_busy_and_never_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", b"1")]);
    let err = Journal::open(&opts(dir.path())).err().unwrap();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("db.corrupt")),
        "{names:?}"
    );
    assert_eq!(j.positions().head_seq, 1);
}

/// Regression: sled's segment size followed `mqtt.max_packet_size`, sled refuses a changed one,
/// and the refusal was taken for damage: changing the setting threw the journal away.
#[test]
fn large_records_survive_restarts_and_are_synced_as_blobs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        // One at a time: an append takes at most max_bytes/32 unless the record is alone.
        append_synced(&j, &[rec("t", &vec![7u8; 600 * 1024])]);
        append_synced(&j, &[rec("t", &vec![8u8; 5 << 20])]);
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    let all = j.read_batch(None, 10, u64::MAX).unwrap();
    match (&all[0], &all[1]) {
        (Entry::Record(a), Entry::Record(b)) => {
            assert_eq!((a.payload.len(), b.payload.len()), (600 * 1024, 5 << 20));
        }
        other => panic!("{other:?}"),
    }
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("db.corrupt")
    }));
}

/// Regression: dead letters beyond their share used to be deleted. They are kept; the journal
/// refuses further dead-lettering instead, and the record stays in the backlog.
#[test]
fn dead_letters_are_never_deleted_when_their_store_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.max_bytes = 1 << 20; // dead-letter share: 1 MiB * 0.15 * 0.1 = ~15 kB
    o.replay_window = crate::default_replay_window(o.max_bytes);
    let j = Journal::open(&o).unwrap();
    let recs: Vec<NewRecord> = (0..10).map(|_| rec("t", &[b'x'; 4000])).collect();
    append_synced(&j, &recs);
    let mut dead = 0;
    let mut refused = None;
    for seq in 1..=10 {
        match j.dead_letter(seq, 422, "bad") {
            Ok(()) => dead += 1,
            Err(e) => {
                refused = Some((seq, e));
                break;
            }
        }
    }
    let (seq, e) = refused.expect("the store fills up");
    assert!(matches!(e, Error::DeadLettersFull { .. }), "{e}");
    assert_eq!(
        j.dead_letters(100).unwrap().len(),
        dead,
        "every dead letter is kept"
    );
    let all = j.read_batch(None, 100, u64::MAX).unwrap();
    assert!(
        matches!(all[seq as usize - 1], Entry::Record(_)),
        "the refused record stays in the journal"
    );
}

/// Regression (tests/crash.rs): a SIGKILL between an append and its sync kept the frames (the
/// kernel had them) but not sled's unflushed redelivery marks, so the broker's redelivery was
/// journaled a second time. The marks of frames the database never recorded are rebuilt from
/// the frames at open.
#[test]
fn redelivery_marks_of_frames_the_database_never_recorded_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[qos1(1, false, b"a"), qos1(2, false, b"b")]);
        // The frame of an append whose database batch was lost with the process.
        let mut st = j.lock();
        let log = st.log.as_mut().unwrap();
        log.append(&[(3, Some(3), encode_record(&qos1(3, false, b"c")))])
            .unwrap();
    }
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.positions().head_seq, 3);
    assert_eq!(j.positions().backlog_records, 3);
    let a = append_synced(&j, &[qos1(3, true, b"c")]);
    assert_eq!((a.first_seq, a.redeliveries), (None, 1));
    assert_eq!(
        seqs(&j.read_batch(None, 10, 1 << 20).unwrap()),
        vec![1, 2, 3]
    );
}

/// Under `drop_oldest`, one record at a time into a full journal (the cloud down for long): every
/// append is taken, and the dropped records become one growing `journal_full` gap, not one gap per
/// dropped record (which cost a frame each and, once they outweighed a record, made room-making fail).
#[test]
fn drop_oldest_always_makes_room_and_merges_its_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.fixed_budget = Some(40_000);
    o.on_full = OnFull::DropOldest;
    let j = Journal::open(&o).unwrap();
    let big = vec![b'x'; 1_000];
    for i in 0..300 {
        j.append(&[rec("t", &big)])
            .unwrap_or_else(|e| panic!("append {i} refused: {e}"));
        j.sync().unwrap();
    }
    let p = j.positions();
    assert_eq!(p.head_seq, 300);
    assert!(p.dropped > 250, "{p:?}");
    let gaps: Vec<_> = j
        .read_batch(None, 100_000, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e, Entry::Gap { .. }))
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(j.lock().overlays.len(), 1);
}

/// Copies the files of directory `from` (sled's: no subdirectories but `blobs`) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// QoS1 records with packet ids `from..from+n` and 1,000-byte payloads (four segments of the
/// `small` journal per 1,000 of them).
fn qos1_run(from: u16, n: u16) -> Vec<NewRecord> {
    (from..from + n)
        .map(|p| qos1(p, false, &[p as u8; 1_000]))
        .collect()
}

/// sled records the positions and redelivery marks of appends only now and then (a sync after a
/// few new segments were started, a sync of sled for another reason, a close), and loses whatever it had
/// not flushed in a crash. Here it comes back as it was long before the crash, after an ack that
/// stored the positions but not the marks: the head, the counters and the marks of everything
/// appended since are rebuilt from the log, so a redelivery from before and after that point is
/// still recognised and nothing is counted twice.
#[test]
fn sled_losing_everything_since_its_last_flush_loses_no_position_or_mark() {
    let dir = tempfile::tempdir().unwrap();
    let o = small(dir.path());
    let j = Journal::open(&o).unwrap();
    // The first append starts the first segment: sled records the positions and marks.
    append_synced(&j, &qos1_run(1, 10));
    append_synced(&j, &qos1_run(11, 10));
    j.read_batch(None, 5, u64::MAX).unwrap();
    j.ack(5).unwrap();
    // What sled holds durably from here on: the ack's positions (next_seq 21), the marks below 11.
    j.store().unwrap().db.flush().unwrap();
    let db = layout::current(dir.path()).unwrap();
    let backup = dir.path().join("backup");
    copy_dir(&db, &backup);
    for chunk in 0..10 {
        append_synced(&j, &qos1_run(21 + chunk * 100, 100));
    }
    assert!(segments(dir.path()).len() >= 4, "several segments");
    let before = (
        j.positions(),
        j.read_batch(None, usize::MAX, u64::MAX).unwrap(),
    );
    drop(j);
    std::fs::remove_dir_all(&db).unwrap();
    copy_dir(&backup, &db);

    let j = Journal::open(&o).unwrap();
    let p = j.positions();
    assert_eq!(
        (p.head_seq, p.acked_seq, p.backlog_records, p.backlog_bytes),
        (
            before.0.head_seq,
            before.0.acked_seq,
            before.0.backlog_records,
            before.0.backlog_bytes
        )
    );
    assert_eq!(j.read_batch(None, usize::MAX, u64::MAX).unwrap(), before.1);
    j.release();
    // Redeliveries of the newest record, of one appended between the stored marks and the ack,
    // and of one before both (all within the window of the newest marks) are recognised.
    for pkid in [1020u16, 15, 8] {
        let a = append_synced(&j, &[qos1(pkid, true, &[pkid as u8; 1_000])]);
        assert_eq!((a.redeliveries, a.first_seq), (1, None), "pkid {pkid}");
    }
    assert_eq!(j.positions().head_seq, 1020);
}

/// Once the log has started `SNAPSHOT_SEGMENTS` new segments, the next sync records the positions
/// and the redelivery marks in sled (not synced): a crash then leaves open at most about that many
/// segments of the log to read, however long the journal ran without sled being synced, and the
/// card is not written a window of marks at every segment.
#[test]
fn positions_and_marks_are_recorded_in_sled_every_few_segments() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&small(dir.path())).unwrap();
    // The first segment is started by the first append: one of SNAPSHOT_SEGMENTS.
    append_synced(&j, &qos1_run(1, 100));
    assert_eq!(j.meta(M_NEXT_SEQ).unwrap(), Some(1), "not at every segment");
    let mut next = 101u16;
    while segments(dir.path()).len() < 2 * SNAPSHOT_SEGMENTS as usize + 1 {
        assert!(next < 60_000, "the log never started new segments");
        append_synced(&j, &qos1_run(next, 100));
        next += 100;
    }
    let firsts: Vec<u64> = j.lock().log.as_ref().unwrap().files_firsts().collect();
    let stored = j.meta(M_NEXT_SEQ).unwrap().unwrap();
    let bound = firsts[firsts.len() - SNAPSHOT_SEGMENTS as usize];
    assert!(
        stored >= bound,
        "recorded through {stored}, more than {SNAPSHOT_SEGMENTS} segments behind ({firsts:?})"
    );
    assert!(stored > 1, "recorded at least once");
    let window = j.store().unwrap().log.get([P_WINDOW]).unwrap().unwrap();
    let (through, marks) = redelivery::decode(&window).unwrap();
    assert_eq!(through, stored);
    assert_eq!(marks.last().map(|m| m.seq), Some(stored - 1));
    assert_eq!(j.meta(M_BACKLOG_RECORDS).unwrap(), Some(stored - 1));
}

// ---- durability against failing and concurrent syncs (fsync::hook) ----

fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

/// Polls `done` every millisecond for up to 10 s.
fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Hole 1: after a crash the frames written since the last sync are still readable (the page
/// cache), but not on disk. The open must sync them before anything counts them durable; here
/// that first sync fails, and the frames must then be rewritten, not trusted to a retry.
#[test]
fn frames_a_crash_left_unsynced_are_synced_at_open_before_they_count() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1")]);
    }
    // What a process that crashed after its write and before its sync leaves behind.
    let seg = segments(dir.path())[0].clone();
    let mut buf = Vec::new();
    push_frame(&mut buf, 2, None, |b| {
        encode_record_into(&rec("t", b"2"), b)
    })
    .unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &buf).unwrap();
    drop(f);

    let rule = fsync_hook::install(&dir.path().join(LOG_DIR));
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert!(
        rule.passed(".seg") >= 1,
        "the open synced the newest segment"
    );
    assert_eq!(seqs(&j.read_batch(None, 10, 1 << 20).unwrap()), vec![1, 2]);
    drop(j);

    // The same, with the open's first sync of the segment failing: it is rewritten.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    buf.clear();
    push_frame(&mut buf, 3, None, |b| {
        encode_record_into(&rec("t", b"3"), b)
    })
    .unwrap();
    std::io::Write::write_all(&mut f, &buf).unwrap();
    drop(f);
    let before = inode(&seg);
    rule.fail_next(".seg", 1);
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_ne!(
        inode(&seg),
        before,
        "the segment was rewritten into a new file"
    );
    let p = j.positions();
    assert_eq!((p.head_seq, p.durable_seq), (3, 3));
    assert_eq!(
        seqs(&j.read_batch(None, 10, 1 << 20).unwrap()),
        vec![1, 2, 3]
    );
}

/// Hole 2: Linux reports a writeback error once and may mark the pages clean, so a retried
/// `fdatasync` returns 0 for data that never reached the disk. After a failed sync the journal
/// must refuse to sync again until the reopen has rewritten the segment into a new file.
#[test]
fn a_failed_fdatasync_is_never_retried_into_durability() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", b"1")]);
    let rule = fsync_hook::install(&dir.path().join(LOG_DIR));
    rule.fail_next(".seg", 1);
    j.append(&[rec("t", b"2")]).unwrap();
    assert!(j.sync().is_err());
    assert_eq!(j.positions().durable_seq, 1);
    assert_eq!(seqs(&j.read_batch(None, 10, 1 << 20).unwrap()), vec![1]);
    // The retry is refused, not trusted; so are appends.
    assert!(
        matches!(j.sync(), Err(Error::Unavailable)),
        "{:?}",
        j.sync()
    );
    assert!(j.needs_reopen());
    assert!(j.append(&[rec("t", b"3")]).is_err());
    assert_eq!(j.positions().durable_seq, 1);

    let seg = segments(dir.path())[0].clone();
    let before = inode(&seg);
    j.reopen().unwrap();
    assert_ne!(
        inode(&seg),
        before,
        "the segment was rewritten into a new file"
    );
    assert!(!j.needs_reopen());
    assert_eq!(j.positions().durable_seq, 2);
    assert_eq!(append_synced(&j, &[rec("t", b"3")]).first_seq, Some(3));
    assert_eq!(
        seqs(&j.read_batch(None, 10, 1 << 20).unwrap()),
        vec![1, 2, 3]
    );
}

/// A segment being closed is synced first; when that sync fails it stays the active one (and
/// failed), instead of being set aside with frames no sync will ever cover.
#[test]
fn a_failed_sync_of_a_closing_segment_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&small(dir.path())).unwrap();
    append_synced(&j, &[rec("t", &[1; 50_000])]);
    j.append(&[rec("t", &[2; 50_000])]).unwrap();
    let rule = fsync_hook::install(&dir.path().join(LOG_DIR));
    rule.fail_next(".seg", 1);
    // Does not fit the 256 KiB segment: the first is closed, and its sync fails.
    assert!(j.append(&[rec("t", &[3; 200_000])]).is_err());
    assert!(matches!(j.sync(), Err(Error::Unavailable)));
    assert_eq!(j.positions().durable_seq, 1);
    j.reopen().unwrap();
    assert_eq!(j.positions().durable_seq, 2);
    assert_eq!(
        append_synced(&j, &[rec("t", &[3; 200_000])]).first_seq,
        Some(3)
    );
    assert_eq!(segments(dir.path()).len(), 2);
    assert_eq!(
        seqs(&j.read_batch(None, 10, 1 << 30).unwrap()),
        vec![1, 2, 3]
    );
}

/// Hole 3: a caller that finds a sync running must not return before a sync that began after
/// its writes has ended, even when it has nothing new to write itself.
#[test]
fn a_sync_never_returns_before_a_sync_that_began_after_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", b"1")]);
    let rule = fsync_hook::install(&dir.path().join(LOG_DIR));
    let waiters = |j: &Journal| j.lock().sync_waiters;

    // The writer's sync of record 2 is held in its fdatasync.
    rule.hold();
    j.append(&[rec("t", b"2")]).unwrap();
    let writer = std::thread::spawn({
        let j = j.clone();
        move || j.sync()
    });
    poll("the writer's fdatasync", || {
        rule.entered.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    // Another thread (an ack, a dead letter) syncs with nothing new to write: it waits.
    let other = std::thread::spawn({
        let j = j.clone();
        move || j.sync().map(|()| j.positions().durable_seq)
    });
    poll("the second sync to wait or return", || {
        other.is_finished() || waiters(&j) == 1
    });
    assert!(
        !other.is_finished(),
        "a sync returned while the fdatasync covering its data was still running"
    );
    assert_eq!(j.positions().durable_seq, 1);
    rule.release();
    writer.join().unwrap().unwrap();
    assert_eq!(other.join().unwrap().unwrap(), 2);
    assert_eq!(rule.passed(".seg"), 1, "the writer's sync covered both");

    // Written while a sync runs: the waiter needs a sync of its own, after that one.
    rule.hold();
    j.append(&[rec("t", b"3")]).unwrap();
    let first = std::thread::spawn({
        let j = j.clone();
        move || j.sync()
    });
    poll("the first fdatasync", || {
        rule.entered.load(std::sync::atomic::Ordering::SeqCst) == 2
    });
    j.append(&[rec("t", b"4")]).unwrap();
    let second = std::thread::spawn({
        let j = j.clone();
        move || j.sync().map(|()| j.positions().durable_seq)
    });
    poll("the second sync to wait", || {
        second.is_finished() || waiters(&j) == 1
    });
    assert!(!second.is_finished());
    rule.release();
    first.join().unwrap().unwrap();
    assert_eq!(second.join().unwrap().unwrap(), 4);
    assert_eq!(rule.passed(".seg"), 3, "record 4 needed a sync of its own");
}

/// The same rule for sled: after a failed sync of its file nothing sled wrote since its last
/// good sync is trusted; the reopen writes the whole database again into a new generation.
#[test]
fn a_failed_sync_of_the_database_is_repaired_by_writing_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", b"1")]);
    let generation = std::fs::read_link(dir.path().join("db")).unwrap();
    let rule = fsync_hook::install(dir.path());
    rule.fail_next(&format!("{}/db", generation.display()), 1);
    assert!(j.remember_command("c1", "done").is_err());
    assert!(matches!(j.sync(), Err(Error::Unavailable)));
    assert!(j.append(&[rec("t", b"2")]).is_err());
    j.reopen().unwrap();
    assert_ne!(
        std::fs::read_link(dir.path().join("db")).unwrap(),
        generation,
        "the database was written again into a new generation"
    );
    assert_eq!(j.command_result("c1").unwrap().as_deref(), Some("done"));
    assert_eq!(append_synced(&j, &[rec("t", b"2")]).first_seq, Some(2));
    drop(j);
    let j = Journal::open(&opts(dir.path())).unwrap();
    assert_eq!(j.command_result("c1").unwrap().as_deref(), Some("done"));
    assert_eq!(j.positions().head_seq, 2);
}

/// A last frame that fails its CRC is a torn write only if it was never synced. One the journal
/// knows was synced (sled recorded the log durable through it) is damage: reported as
/// `journal_lost`, and its seq is never assigned again.
#[test]
fn a_synced_last_frame_that_goes_bad_is_reported_not_cut_silently() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(&opts(dir.path())).unwrap();
        append_synced(&j, &[rec("t", b"1"), rec("t", b"2"), rec("t", b"3")]);
    }
    // The seq mark was renewed long ago (its head is 0): only sled knows seq 3 was synced.
    let mark = dir.path().join("seq-mark");
    let old = mark::Mark {
        lease: LEASE_STEP,
        head: 0,
        acked: 0,
    };
    let mut slots = mark::encode(1000, old).to_vec();
    slots.extend_from_slice(&mark::encode(1001, old));
    std::fs::write(&mark, slots).unwrap();
    // Bit rot in the last frame's payload.
    let seg = segments(dir.path())[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();

    let j = Journal::open(&opts(dir.path())).unwrap();
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert!(
        matches!(
            all[2],
            Entry::Gap {
                from_seq: 3,
                reason: GapReason::JournalLost,
                ..
            }
        ),
        "{all:?}"
    );
    let next = append_synced(&j, &[rec("t", b"4")]).first_seq.unwrap();
    assert!(next > 3, "seq 3 is never assigned again (got {next})");
}

/// A reopen (after an i/o error) that finds the log shorter than what this process synced has
/// lost synced frames: reported, and their seqs never assigned again.
#[test]
fn a_reopen_that_finds_synced_frames_gone_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&opts(dir.path())).unwrap();
    append_synced(&j, &[rec("t", b"1"), rec("t", b"2")]);
    let seg = segments(dir.path())[0].clone();
    let two = std::fs::metadata(&seg).unwrap().len();
    append_synced(&j, &[rec("t", b"3")]);
    // The card loses the synced last frame.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(two)
        .unwrap();
    j.reopen().unwrap();
    let all = j.read_batch(None, 10, 1 << 20).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert!(
        matches!(
            all[2],
            Entry::Gap {
                from_seq: 3,
                reason: GapReason::JournalLost,
                ..
            }
        ),
        "{all:?}"
    );
    let next = append_synced(&j, &[rec("t", b"4")]).first_seq.unwrap();
    assert!(next > 3, "seq 3 is never assigned again (got {next})");
}
