//! Durable state of the downlink kept in the journal: the acknowledged entries retained for an
//! audited replay, and the ids and results of the cloud's commands. Additive to the layout in
//! `mod.rs`, in the same sled tree, so every change is one atomic `sled::Batch`:
//!
//! | key | value |
//! |---|---|
//! | `M` `retain_from`, `retained_bytes` | the replay window: acknowledged seqs `retain_from..=acked` |
//! | `C` id bytes | a command's result: order:u64, then the result's JSON |
//! | `O` order:u64 | the id of the command remembered `order`-th (for evicting the oldest) |
//! | `M` `command_next` | the next order, u64 |
//! | `M` `command_bytes` | bytes of the remembered ids and results, u64 (absent: counted once) |
//!
//! Retention: acknowledged entries stay in the log (segments are freed only behind the window);
//! [`Journal::ack`] widens the window by what it acknowledges and moves `retain_from` past the
//! oldest acknowledged chunks beyond `journal.replay_window` (by default [`default_replay_window`]).
//! The window therefore
//! always covers one run of seqs ending at the cursor. [`Journal::rewind_to`] moves the cursor
//! back into that run, in one batch: the one way the cursor ever moves backwards, logged at WARN.
//! An upload in flight across a rewind is not acknowledged (it is sent again, and the cloud
//! deduplicates), so a rewind never skips a seq.
//!
//! Commands: at most [`MAX_COMMANDS`] results and [`MAX_COMMAND_BYTES`] of ids and results are
//! remembered, the oldest evicted first; so at least the last 64 are, however large.

use log::{info, warn};

use super::codec::{M_RETAIN_FROM, M_RETAINED_BYTES, overlay_key};
use super::segments::{Flow, Item};
use super::{Error, Journal, Result, State, log_io, log_of, put_positions, storage};

const P_COMMAND: u8 = b'C';
const P_COMMAND_ORDER: u8 = b'O';
const M_COMMAND_NEXT: &[u8] = b"Mcommand_next";
const M_COMMAND_BYTES: &[u8] = b"Mcommand_bytes";

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
/// Command results remembered.
pub const MAX_COMMANDS: u64 = 10_000;
/// Longest command id and result stored.
pub const MAX_COMMAND_ID: usize = 128;
pub const MAX_COMMAND_RESULT: usize = 64 * 1024;
/// Bytes of remembered command ids and results, at most (sled's share of `journal.max_bytes`
/// stays small): 64 of the largest.
pub const MAX_COMMAND_BYTES: u64 = 64 * (MAX_COMMAND_ID + MAX_COMMAND_RESULT) as u64;

fn command_key(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(P_COMMAND);
    k.extend_from_slice(id);
    k
}

/// The order an `O` key names (0 for a key too short, which this module never writes).
fn order_of(key: &[u8]) -> u64 {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn order_key(order: u64) -> [u8; 9] {
    let mut k = [P_COMMAND_ORDER; 9];
    k[1..].copy_from_slice(&order.to_be_bytes());
    k
}

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
    /// The entries stay in the log; only the window's bounds are state (sled and memory). Called
    /// by `ack` with the state locked, before the cursor moves.
    pub(super) fn retain_acked(
        &self,
        st: &mut State,
        batch: &mut sled::Batch,
        through: u64,
        bytes: u64,
    ) {
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
        for from in gone {
            st.overlays.remove(&from);
            batch.remove(&overlay_key(from)[..]);
        }
        batch.insert(M_RETAIN_FROM, &st.retain_from.to_be_bytes()[..]);
        batch.insert(M_RETAINED_BYTES, &st.retained_bytes.to_be_bytes()[..]);
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
                .read(from, acked, overlays, false, |item| {
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
        batch.insert(M_RETAIN_FROM, &st.retain_from.to_be_bytes()[..]);
        batch.insert(M_RETAINED_BYTES, &st.retained_bytes.to_be_bytes()[..]);
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

    /// The stored result of command `id`, if it was remembered and not evicted yet.
    pub fn command_result(&self, id: &str) -> Result<Option<String>> {
        let v = self
            .store()?
            .log
            .get(command_key(id.as_bytes()))
            .map_err(storage("reading a command result"))?;
        Ok(v.and_then(|v| {
            v.get(8..)
                .map(|json| String::from_utf8_lossy(json).into_owned())
        }))
    }

    /// Remembers the `result` of command `id`, evicting the oldest beyond [`MAX_COMMANDS`] or
    /// [`MAX_COMMAND_BYTES`]. Synced before returning, so a command answered is never executed
    /// again after a crash.
    pub fn remember_command(&self, id: &str, result: &str) -> Result<()> {
        self.remember_command_within(id, result, MAX_COMMANDS, MAX_COMMAND_BYTES)
    }

    fn remember_command_within(
        &self,
        id: &str,
        result: &str,
        max: u64,
        max_bytes: u64,
    ) -> Result<()> {
        if id.is_empty() || id.len() > MAX_COMMAND_ID || result.len() > MAX_COMMAND_RESULT {
            return Err(Error::CommandTooLarge {
                id_bytes: id.len(),
                result_bytes: result.len(),
            });
        }
        // The state lock serialises writers of the order counter.
        let st = self.lock();
        let store = self.store()?;
        let read = || storage("remembering a command");
        let next = self.meta(M_COMMAND_NEXT)?.unwrap_or(0);
        let mut bytes = match self.meta(M_COMMAND_BYTES)? {
            Some(bytes) => bytes,
            // A journal from before the byte budget: count what it remembers, once.
            None => store
                .log
                .scan_prefix([P_COMMAND])
                .try_fold(0u64, |sum, kv| kv.map(|(k, v)| sum + stored_bytes(&k, &v)))
                .map_err(read())?,
        };
        let mut batch = sled::Batch::default();
        let key = command_key(id.as_bytes());
        // The same id again (not expected: a repeat is answered from here): the new result replaces
        // the old one, whose order entry no longer matches and is dropped when evicted.
        if let Some(old) = store.log.get(&key).map_err(read())? {
            bytes = bytes.saturating_sub(stored_bytes(&key, &old));
        }
        let mut value = next.to_be_bytes().to_vec();
        value.extend_from_slice(result.as_bytes());
        bytes += stored_bytes(&key, &value);
        batch.insert(key, value);
        batch.insert(&order_key(next)[..], id.as_bytes());
        let next = next + 1;
        // The order entries run without a hole from the oldest remembered to the newest, so the
        // first one says how many there are. The oldest are evicted first; the new one (not in the
        // tree yet) never is.
        let mut remembered = 1;
        for (i, kv) in store.log.scan_prefix([P_COMMAND_ORDER]).enumerate() {
            let (k, old_id) = kv.map_err(read())?;
            let order = order_of(&k);
            if i == 0 {
                remembered = next.saturating_sub(order).max(1);
            }
            if remembered <= max && bytes <= max_bytes {
                break;
            }
            remembered -= 1;
            batch.remove(k);
            if old_id.as_ref() == id.as_bytes() {
                continue;
            }
            let k = command_key(&old_id);
            // Only if that id was not remembered again since.
            if let Some(v) = store.log.get(&k).map_err(read())? {
                if v.get(..8) == Some(&order.to_be_bytes()[..]) {
                    bytes = bytes.saturating_sub(stored_bytes(&k, &v));
                    batch.remove(k);
                }
            }
        }
        batch.insert(M_COMMAND_NEXT, &next.to_be_bytes()[..]);
        batch.insert(M_COMMAND_BYTES, &bytes.to_be_bytes()[..]);
        self.apply(batch, "remembering a command")?;
        drop(st);
        self.sled_changed();
        self.sync()
    }
}

/// What a remembered command counts against [`MAX_COMMAND_BYTES`]: its id and its result.
fn stored_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len().saturating_sub(1) + value.len().saturating_sub(8)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OnFull;
    use crate::{Entry, NewRecord, Options, StoredFormat};

    fn open(dir: &std::path::Path) -> Journal {
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

    #[test]
    fn command_results_are_remembered_and_the_oldest_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path());
        j.remember_command("a", "{\"ok\":true}").unwrap();
        assert_eq!(
            j.command_result("a").unwrap().as_deref(),
            Some("{\"ok\":true}")
        );
        assert_eq!(j.command_result("b").unwrap(), None);
        for i in 0..5 {
            j.remember_command_within(&format!("c{i}"), "{}", 5, MAX_COMMAND_BYTES)
                .unwrap();
        }
        assert_eq!(j.command_result("a").unwrap(), None);
        assert!(j.command_result("c1").unwrap().is_some());
        assert!(j.remember_command("", "{}").is_err());
    }

    /// Large results evict by bytes: the budget holds, the newest are kept, and the newest one is
    /// kept even when it alone is over the budget; the count survives a reopen.
    #[test]
    fn command_results_are_evicted_by_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(1000);
        {
            let j = open(dir.path());
            for i in 0..10 {
                // id "kN" (2 bytes) + 1000: three fit in 3,100 bytes.
                j.remember_command_within(&format!("k{i}"), &big, 100, 3100)
                    .unwrap();
            }
            let kept: Vec<bool> = (0..10)
                .map(|i| j.command_result(&format!("k{i}")).unwrap().is_some())
                .collect();
            assert_eq!(kept, [[false; 7].as_slice(), &[true; 3]].concat());
        }
        let j = open(dir.path());
        j.remember_command_within("k10", &big, 100, 3100).unwrap();
        assert_eq!(
            j.command_result("k7").unwrap(),
            None,
            "bytes survived the reopen"
        );
        assert!(j.command_result("k8").unwrap().is_some());
        j.remember_command_within("huge", &"y".repeat(5000), 100, 3100)
            .unwrap();
        assert!(
            j.command_result("huge").unwrap().is_some(),
            "the newest is kept"
        );
        assert_eq!(j.command_result("k10").unwrap(), None);
    }

    /// A journal written before the byte budget has no byte count: it is counted once from what
    /// is stored.
    #[test]
    fn a_journal_without_a_byte_count_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(1000);
        {
            let j = open(dir.path());
            for i in 0..3 {
                j.remember_command_within(&format!("k{i}"), &big, 100, u64::MAX)
                    .unwrap();
            }
            let store = j.store().unwrap();
            store.log.remove(M_COMMAND_BYTES).unwrap();
        }
        let j = open(dir.path());
        j.remember_command_within("k3", &big, 100, 3100).unwrap();
        assert_eq!(j.command_result("k0").unwrap(), None);
        assert!(j.command_result("k1").unwrap().is_some());
        assert!(j.command_result("k3").unwrap().is_some());
    }
}
