//! The replay window: acknowledged entries kept for an audited replay, and the one way the
//! cursor moves backwards ([`Journal::rewind_to`], the downlink's `replay_from`). Additive to the
//! layout in `lib.rs`, in the same sled tree, so every change is one atomic `sled::Batch`:
//!
//! | key | value |
//! |---|---|
//! | `M` `retain_from`, `retained_bytes` | the replay window: acknowledged seqs `retain_from..=acked` |
//!
//! Retention: acknowledged entries stay in the log (segments are freed only behind the window);
//! [`Journal::ack`] widens the window by what it acknowledges and moves `retain_from` past the
//! oldest acknowledged chunks beyond `journal.replay_window` (by default [`default_replay_window`]).
//! The window therefore always covers one run of seqs ending at the cursor.
//! [`Journal::rewind_to`] moves the cursor back into that run, in one batch, logged at WARN. An
//! upload in flight across a rewind is not acknowledged (it is sent again, and the cloud
//! deduplicates), so a rewind never skips a seq.

use log::{info, warn};

use super::codec::overlay_key;
use super::segments::{Flow, Item, Keep};
use super::{Error, Journal, Result, State, log_io, log_of, put_positions};

/// Share of `journal.max_bytes` that acknowledged entries keep for replay by default, up to
/// `RETAIN_MAX` (the window is disk the backlog cannot use).
const RETAIN_SHARE: f64 = 0.02;
const RETAIN_MAX: u64 = 4 << 20;

/// `journal.replay_window` when the config does not set it: 2 % of `max_bytes`, at most 4 MiB.
pub fn default_replay_window(max_bytes: u64) -> u64 {
    ((max_bytes as f64 * RETAIN_SHARE) as u64).min(RETAIN_MAX)
}
/// Acknowledged chunks the retention window remembers the bounds of.
const MAX_RETAINED_CHUNKS: usize = 1024;

/// The oldest acknowledged seq a rewind may go back to, if any is retained.
pub(super) fn replay_oldest(st: &State) -> Option<u64> {
    (st.retained_bytes > 0 && st.retain_from <= st.acked).then_some(st.retain_from)
}

/// What a rewind did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    /// The cursor before and after.
    pub from: u64,
    pub to: u64,
}

impl Journal {
    /// Keeps the entries just acknowledged (`..=through`, `bytes` of them) for replay, and moves
    /// the start of the retention window past the oldest acknowledged chunks beyond the budget.
    /// The entries stay in the log; only the window's bounds are state (memory, and sled with the
    /// positions). Called by `ack` with the state locked, before the cursor moves. Returns how many
    /// overlays the window left behind; their removal from sled is in `batch`.
    pub(super) fn retain_acked(
        &self,
        st: &mut State,
        batch: &mut sled::Batch,
        through: u64,
        bytes: u64,
    ) -> usize {
        let cap = self.inner.replay_window;
        if st.retained_bytes == 0 {
            st.retain_from = st.acked + 1;
        }
        st.retained_chunks.push_back((through, bytes));
        st.retained_bytes += bytes;
        // Bounded memory: the two oldest chunks merge (the window gets coarser, never larger).
        while st.retained_chunks.len() > MAX_RETAINED_CHUNKS {
            if let (Some(a), Some(b)) = (
                st.retained_chunks.pop_front(),
                st.retained_chunks.pop_front(),
            ) {
                st.retained_chunks.push_front((b.0, a.1 + b.1));
            }
        }
        while st.retained_bytes > cap {
            let Some((last, b)) = st.retained_chunks.pop_front() else {
                break;
            };
            st.retained_bytes = st.retained_bytes.saturating_sub(b);
            st.retain_from = last + 1;
        }
        if st.retained_chunks.is_empty() {
            st.retained_bytes = 0;
            st.retain_from = through + 1;
        }
        // Overlays wholly before the window are not needed any more.
        let gone: Vec<u64> = st
            .overlays
            .range(..st.retain_from)
            .filter(|(_, o)| o.to < st.retain_from)
            .map(|(f, _)| *f)
            .collect();
        let removed = gone.len();
        for from in gone {
            st.overlays.remove(&from);
            batch.remove(&overlay_key(from)[..]);
        }
        removed
    }

    /// Bytes of retained entries.
    #[cfg(test)]
    pub(super) fn count_retained(&self) -> Result<u64> {
        Ok(self.lock().retained_bytes)
    }

    /// Moves the cursor back so that the uplink sends `seq` and everything after it again: the
    /// audited replay of the downlink's `replay_from`. `seq` must still be retained (or not yet
    /// acknowledged, when nothing moves). Logged at WARN with the old and new cursor; synced before
    /// returning.
    pub fn rewind_to(&self, seq: u64) -> Result<Rewind> {
        let mut st = self.lock();
        let head = st.next_seq - 1;
        let acked = st.acked;
        if seq == 0 || seq > head {
            return Err(Error::NotRetained {
                seq,
                reason: format!("seqs run from 1 to the head_seq={head}"),
            });
        }
        if seq > acked {
            info!(
                "replay from seq={} needs no rewind: not yet acknowledged (acked_seq={})",
                seq, acked
            );
            return Ok(Rewind {
                from: acked,
                to: acked,
            });
        }
        let oldest = replay_oldest(&st);
        let not_retained = |oldest: Option<u64>| Error::NotRetained {
            seq,
            reason: match oldest {
                Some(o) => format!("retained are seqs {o}..={acked}"),
                None => "no acknowledged entries are retained".to_owned(),
            },
        };
        let Some(from) = oldest.filter(|o| *o <= seq) else {
            return Err(not_retained(oldest));
        };
        // The retained entry holding `seq` (a gap may cover a range), and what follows it. The
        // run must be whole: a missing seq would be skipped by the replay.
        let mut start = None;
        let (mut records, mut bytes, mut whole) = (0u64, 0u64, true);
        let mut expect = from;
        {
            let State { log, overlays, .. } = &mut *st;
            log_of(log)?
                .read(from, acked, overlays, Keep::Nothing, |item| {
                    if item.first_seq() != expect || matches!(item, Item::Lost(..)) {
                        whole = false;
                        return Flow::Stop;
                    }
                    expect = item.last_seq() + 1;
                    if start.is_none() && item.last_seq() >= seq {
                        start = Some(item.first_seq());
                    }
                    if start.is_some() {
                        records += 1;
                        bytes += item.size();
                    }
                    Flow::Next
                })
                .map_err(log_io("reading retained entries"))?;
        }
        let Some(start) = start.filter(|_| whole && expect == acked + 1) else {
            return Err(not_retained(oldest));
        };
        st.acked = start - 1;
        st.protected_through = st.acked;
        st.rewound = true;
        st.inflight.clear();
        st.backlog_records += records;
        st.backlog_bytes += bytes;
        st.retained_bytes = st.retained_bytes.saturating_sub(bytes);
        st.retained_chunks.clear();
        if st.retained_bytes > 0 && st.retain_from <= st.acked {
            let chunk = (st.acked, st.retained_bytes);
            st.retained_chunks.push_back(chunk);
        } else {
            st.retained_bytes = 0;
            st.retain_from = st.acked + 1;
        }
        let mut batch = sled::Batch::default();
        put_positions(&st, &mut batch);
        self.apply(batch, "rewinding the cursor")?;
        st.sled_changed();
        let rewind = Rewind {
            from: acked,
            to: st.acked,
        };
        self.inner.data.notify_all();
        drop(st);
        warn!(
            "uplink cursor rewound by request acked_seq={} from={} entries={} (replay_from seq={})",
            rewind.to, rewind.from, records, seq
        );
        self.sync()?;
        Ok(rewind)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::OnFull;
    use crate::{Entry, NewRecord, Options, StoredFormat};

    pub(crate) fn open(dir: &std::path::Path) -> Journal {
        open_with_window(dir, default_replay_window(64 << 20))
    }

    fn open_with_window(dir: &std::path::Path, replay_window: u64) -> Journal {
        Journal::open(&Options {
            dir: dir.to_owned(),
            max_bytes: 64 << 20,
            on_full: OnFull::RejectNew,
            cache_bytes: 1 << 20,
            replay_window,
            fixed_budget: None,
        })
        .unwrap()
    }

    #[test]
    fn the_replay_window_is_what_the_config_says() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = open_with_window(dir.path(), 0);
            append(&j, 10);
            j.ack(10).unwrap();
            assert_eq!(j.positions().replay_oldest_seq, None);
            let e = j.rewind_to(5).unwrap_err().to_string();
            assert!(e.contains("no acknowledged entries are retained"), "{e}");
        }
        // Reopened with a window: what is acknowledged from now on is kept, and shown.
        let j = open_with_window(dir.path(), 1 << 20);
        append(&j, 10);
        j.ack(20).unwrap();
        assert_eq!(j.positions().replay_oldest_seq, Some(11));
        assert_eq!(j.rewind_to(11).unwrap(), Rewind { from: 20, to: 10 });
    }

    fn append(j: &Journal, n: usize) {
        let recs: Vec<NewRecord> = (0..n)
            .map(|i| NewRecord {
                ts_ms: 1,
                topic: "t".into(),
                payload: format!("{{\"i\":{i}}}").into_bytes(),
                format: StoredFormat::Json,
                parse_error: false,
                mono: None,
                too_large: None,
                mqtt: None,
            })
            .collect();
        j.append(&recs).unwrap();
        j.sync().unwrap();
    }

    #[test]
    fn rewind_resends_retained_entries_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = open(dir.path());
            append(&j, 10);
            j.ack(10).unwrap();
            let r = j.rewind_to(4).unwrap();
            assert_eq!(r, Rewind { from: 10, to: 3 });
            assert_eq!(j.positions().backlog_records, 7);
            let again = j.read_batch(None, 100, 1 << 20).unwrap();
            assert_eq!(again.first().map(|e| e.first_seq()), Some(4));
            assert_eq!(again.len(), 7);
        }
        let j = open(dir.path());
        assert_eq!(j.positions().acked_seq, 3);
        assert_eq!(j.positions().backlog_records, 7);
        j.ack(10).unwrap();
        // Retained again after the second ack.
        assert_eq!(j.rewind_to(1).unwrap().to, 0);
    }

    #[test]
    fn an_ack_across_a_rewind_does_not_skip_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path());
        append(&j, 10);
        j.ack(5).unwrap();
        let in_flight = j.read_batch(None, 100, 1 << 20).unwrap();
        assert_eq!(in_flight.len(), 5);
        j.rewind_to(2).unwrap();
        // The upload that was in flight comes back 2xx: it must not acknowledge 2..=5.
        j.ack(10).unwrap();
        assert_eq!(j.positions().acked_seq, 1);
    }

    /// The uplink's pipeline: a batch read behind one still in flight must not be acknowledged
    /// across a rewind either, and the next read from the rewound cursor starts over.
    #[test]
    fn acks_of_batches_read_ahead_before_a_rewind_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path());
        append(&j, 12);
        assert!(j.ack(6).unwrap());
        let first = j.read_batch(None, 3, 1 << 20).unwrap();
        let second = j.read_after(9, None, 3, 1 << 20).unwrap();
        assert_eq!(
            (first[0].first_seq(), second[0].first_seq()),
            (7, 10),
            "the second batch continues after the first"
        );
        j.rewind_to(3).unwrap();
        // A read ahead of the rewound cursor does not end the rewind.
        assert_eq!(j.read_after(12, None, 3, 1 << 20).unwrap().len(), 0);
        assert!(!j.ack(9).unwrap(), "first batch read before the rewind");
        assert!(!j.ack(12).unwrap(), "second batch read before the rewind");
        assert_eq!(j.positions().acked_seq, 2);
        let again = j.read_after(2, None, 100, 1 << 20).unwrap();
        assert_eq!(again.first().map(Entry::first_seq), Some(3));
        assert!(j.ack(12).unwrap());
        assert_eq!(j.positions().acked_seq, 12);
    }

    #[test]
    fn a_seq_no_longer_retained_is_refused_with_the_retained_range() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path());
        append(&j, 3);
        let e = j.rewind_to(7).unwrap_err().to_string();
        assert!(e.contains("head_seq=3"), "{e}");
        j.ack(3).unwrap();
        let e = j.rewind_to(0).unwrap_err().to_string();
        assert!(e.contains("seq=0"), "{e}");
        assert_eq!(j.rewind_to(3).unwrap(), Rewind { from: 3, to: 2 });
    }

    #[test]
    fn retention_stays_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&Options {
            dir: dir.path().to_owned(),
            max_bytes: 1 << 20,
            on_full: OnFull::RejectNew,
            cache_bytes: 1 << 20,
            replay_window: crate::default_replay_window(1 << 20),
            fixed_budget: None,
        })
        .unwrap();
        for _ in 0..50 {
            append(&j, 100);
            j.ack(j.positions().head_seq).unwrap();
        }
        let cap = default_replay_window(1 << 20);
        assert!(j.count_retained().unwrap() <= cap);
        let head = j.positions().head_seq;
        assert!(j.rewind_to(head - 10).is_ok());
        let e = j.rewind_to(1).unwrap_err().to_string();
        assert!(e.contains("retained are seqs"), "{e}");
    }
}
