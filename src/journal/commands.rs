//! Durable state of the downlink kept in the journal: the acknowledged entries retained for an
//! audited replay, and the ids and results of the cloud's commands. Additive to the layout in
//! `mod.rs`, in the same tree, so every change is one atomic `sled::Batch`:
//!
//! | key | value |
//! |---|---|
//! | `R` seq:u64 | an acknowledged entry, kept for `replay_from`: the `E` value as it was |
//! | `C` id bytes | a command's result: order:u64, then the result's JSON |
//! | `O` order:u64 | the id of the command remembered `order`-th (for evicting the oldest) |
//! | `M` `command_next` | the next order, u64 |
//!
//! Retention: [`Journal::ack`] moves the acknowledged entries from `E` to `R` in the batch that
//! moves the cursor, and drops the oldest `R` entries past `RETAIN_SHARE` of `journal.max_bytes`.
//! The `R` entries therefore always cover one run of seqs ending at the cursor. [`Journal::rewind_to`]
//! moves a tail of that run back to `E` and the cursor back with it, again in one batch: the one way
//! the cursor ever moves backwards, logged at WARN. An upload in flight across a rewind is not
//! acknowledged (it is sent again, and the cloud deduplicates), so a rewind never skips a seq.
//!
//! Commands: at most [`MAX_COMMANDS`] results are remembered, the oldest evicted first.

use log::{info, warn};

use super::codec::{decode_entry, entry_key, entry_size, key_seq};
use super::{Error, Journal, Result, State, storage};

pub(super) const P_RETAINED: u8 = b'R';
const P_COMMAND: u8 = b'C';
const P_COMMAND_ORDER: u8 = b'O';
const M_COMMAND_NEXT: &[u8] = b"Mcommand_next";

/// Share of `journal.max_bytes` that acknowledged entries may keep for replay.
pub(super) const RETAIN_SHARE: f64 = 0.02;
/// Command results remembered.
pub const MAX_COMMANDS: u64 = 10_000;
/// Longest command id and result stored.
pub const MAX_COMMAND_ID: usize = 128;
pub const MAX_COMMAND_RESULT: usize = 64 * 1024;

pub(super) fn retained_key(seq: u64) -> [u8; 9] {
    let mut k = [P_RETAINED; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn command_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(P_COMMAND);
    k.extend_from_slice(id.as_bytes());
    k
}

fn order_key(order: u64) -> [u8; 9] {
    let mut k = [P_COMMAND_ORDER; 9];
    k[1..].copy_from_slice(&order.to_be_bytes());
    k
}

/// What a rewind did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    /// The cursor before and after.
    pub from: u64,
    pub to: u64,
}

impl Journal {
    /// Keeps acknowledged `entries` (seq, `E` value), oldest first, as `R` entries in `batch`, and
    /// drops the oldest retained entries beyond the retention budget. Called by `ack` with the
    /// state locked.
    pub(super) fn retain_acked(
        &self,
        st: &mut State,
        batch: &mut sled::Batch,
        entries: Vec<(u64, sled::IVec)>,
    ) -> Result<()> {
        let cap = (self.inner.max_bytes as f64 * RETAIN_SHARE) as u64;
        let added: u64 = entries.iter().map(|(_, v)| entry_size(v)).sum();
        let mut total = st.retained_bytes + added;
        if total > cap {
            for item in self.store()?.log.scan_prefix([P_RETAINED]) {
                if total <= cap {
                    break;
                }
                let (k, v) = item.map_err(storage("trimming retained entries"))?;
                total = total.saturating_sub(entry_size(&v));
                batch.remove(k);
            }
        }
        for (seq, v) in entries {
            // The newest entries of a batch larger than the whole budget are the ones kept.
            if total > cap {
                total = total.saturating_sub(entry_size(&v));
                continue;
            }
            batch.insert(&retained_key(seq)[..], v);
        }
        st.retained_bytes = total;
        Ok(())
    }

    /// Bytes of retained entries, counted at open.
    pub(super) fn count_retained(&self) -> Result<u64> {
        Ok(self
            .count_prefix(P_RETAINED, "counting retained entries")?
            .1)
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
        let store = self.store()?;
        let oldest = store
            .log
            .scan_prefix([P_RETAINED])
            .next()
            .transpose()
            .map_err(storage("reading retained entries"))?
            .map(|(k, _)| key_seq(&k));
        let not_retained = |oldest: Option<u64>| Error::NotRetained {
            seq,
            reason: match oldest {
                Some(o) => format!("retained are seqs {o}..={acked}"),
                None => "no acknowledged entries are retained".to_owned(),
            },
        };
        // The retained entry holding `seq` (a gap may cover a range).
        let (start, _) = store
            .log
            .range(retained_key(0)..=retained_key(seq))
            .next_back()
            .transpose()
            .map_err(storage("reading retained entries"))?
            .ok_or_else(|| not_retained(oldest))?;
        let start = key_seq(&start);
        let mut batch = sled::Batch::default();
        let mut expect = start;
        let (mut records, mut bytes) = (0u64, 0u64);
        for item in store.log.range(retained_key(start)..=retained_key(acked)) {
            let (k, v) = item.map_err(storage("reading retained entries"))?;
            let entry = decode_entry(key_seq(&k), &v)?;
            // The run must be whole: a missing seq would be skipped by the replay.
            if entry.first_seq() != expect {
                return Err(not_retained(oldest));
            }
            expect = entry.last_seq() + 1;
            records += 1;
            bytes += entry_size(&v);
            batch.remove(k);
            batch.insert(&entry_key(entry.first_seq())[..], v);
        }
        if expect != acked + 1 {
            return Err(not_retained(oldest));
        }
        drop(store);
        st.acked = start - 1;
        st.protected_through = st.acked;
        st.rewound = true;
        st.backlog_records += records;
        st.backlog_bytes += bytes;
        st.retained_bytes = st.retained_bytes.saturating_sub(bytes);
        batch.insert(super::codec::M_ACKED, &st.acked.to_be_bytes()[..]);
        self.put_counters(&st, &mut batch);
        self.apply(batch, "rewinding the cursor")?;
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
            .get(command_key(id))
            .map_err(storage("reading a command result"))?;
        Ok(v.and_then(|v| {
            v.get(8..)
                .map(|json| String::from_utf8_lossy(json).into_owned())
        }))
    }

    /// Remembers the `result` of command `id`, evicting the oldest beyond [`MAX_COMMANDS`]. Synced
    /// before returning, so a command answered is never executed again after a crash.
    pub fn remember_command(&self, id: &str, result: &str) -> Result<()> {
        self.remember_command_within(id, result, MAX_COMMANDS)
    }

    fn remember_command_within(&self, id: &str, result: &str, max: u64) -> Result<()> {
        if id.is_empty() || id.len() > MAX_COMMAND_ID || result.len() > MAX_COMMAND_RESULT {
            return Err(Error::CommandTooLarge {
                id_bytes: id.len(),
                result_bytes: result.len(),
            });
        }
        // The state lock serialises writers of the order counter.
        let st = self.lock();
        let order = self.meta(M_COMMAND_NEXT)?.unwrap_or(0);
        let mut batch = sled::Batch::default();
        let mut value = order.to_be_bytes().to_vec();
        value.extend_from_slice(result.as_bytes());
        batch.insert(command_key(id), value);
        batch.insert(&order_key(order)[..], id.as_bytes());
        batch.insert(M_COMMAND_NEXT, &(order + 1).to_be_bytes()[..]);
        if order >= max {
            let old = order - max;
            let store = self.store()?;
            if let Some(old_id) = store
                .log
                .get(order_key(old))
                .map_err(storage("evicting a command"))?
            {
                batch.remove(&order_key(old)[..]);
                let mut k = vec![P_COMMAND];
                k.extend_from_slice(&old_id);
                // Only if that id was not remembered again since.
                let same = store
                    .log
                    .get(&k)
                    .map_err(storage("evicting a command"))?
                    .is_some_and(|v| v.get(..8) == Some(&old.to_be_bytes()[..]));
                if same && old_id.as_ref() != id.as_bytes() {
                    batch.remove(k);
                }
            }
        }
        self.apply(batch, "remembering a command")?;
        drop(st);
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnFull;
    use crate::journal::{NewRecord, Options, StoredFormat};

    fn open(dir: &std::path::Path) -> Journal {
        Journal::open(&Options {
            dir: dir.to_owned(),
            max_bytes: 64 << 20,
            on_full: OnFull::RejectNew,
            cache_bytes: 1 << 20,
            fixed_budget: None,
        })
        .unwrap()
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
            fixed_budget: None,
        })
        .unwrap();
        for _ in 0..50 {
            append(&j, 100);
            j.ack(j.positions().head_seq).unwrap();
        }
        let cap = ((1u64 << 20) as f64 * RETAIN_SHARE) as u64;
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
            j.remember_command_within(&format!("c{i}"), "{}", 5)
                .unwrap();
        }
        assert_eq!(j.command_result("a").unwrap(), None);
        assert!(j.command_result("c1").unwrap().is_some());
        assert!(j.remember_command("", "{}").is_err());
    }
}
