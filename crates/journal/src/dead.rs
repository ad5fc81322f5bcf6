//! Dead letters: records the cloud refused for good, moved out of the log into sled (`D` keys)
//! with why, a `rejected` gap left in their place so the records around them flow on; listed for
//! `/dead-letters` and requeued as new records on request.

use log::info;

use super::codec::*;
use super::segments::{Flow, Item, Keep, Overlay, frame_size};
use super::{
    DeadLetter, Entry, Error, Journal, NewRecord, Result, State, log_io, log_of, now_ms,
    put_positions, storage, truncate,
};
use ferry_protocol::GapReason;

/// Dead letters (kept in sled) may use at most this share of `max_bytes`; beyond it the uplink
/// stops isolating records (and backs off) rather than delete any.
const DEAD_SHARE: f64 = 0.015;

impl Journal {
    /// Moves the record `seq` to the dead-letter store and leaves a `rejected` gap in its place
    /// (an overlay), so the cloud is told and the records around it flow on. Synced before
    /// returning.
    pub fn dead_letter(&self, seq: u64, status: u16, reason: &str) -> Result<()> {
        let mut st = self.lock();
        let mut found = None;
        if seq > st.acked && seq < st.next_seq {
            let State { log, overlays, .. } = &mut *st;
            log_of(log)?
                .read(seq, seq, overlays, Keep::Nothing, |item| {
                    found = Some(item);
                    Flow::Stop
                })
                .map_err(log_io("reading a record to dead-letter"))?;
        }
        let (record, size) = match found {
            Some(Item::Frame(Entry::Record(r), size, _)) if r.seq == seq => (r, size),
            Some(Item::Frame(..) | Item::Overlay(..) | Item::Lost(..)) => {
                return Err(Error::Corrupt {
                    seq,
                    reason: "only records can be dead-lettered".into(),
                });
            }
            _ => return Err(Error::NoDeadLetter { seq }),
        };
        let value = encode_record(&NewRecord::from(record));
        let header = DeadHeader {
            status,
            error: truncate(reason, 512).to_string(),
            at_ms: now_ms(),
        };
        let dead = encode_dead(&header, &value);
        // Dead letters are kept until an operator requeues them; when their share is used up, the
        // record stays in the journal and the uplink backs off as for a refusing cloud.
        let cap = (self.inner.max_bytes as f64 * DEAD_SHARE) as u64;
        if st.dead_count > 0 && st.dead_bytes + entry_size(&dead) > cap {
            return Err(Error::DeadLettersFull {
                count: st.dead_count,
                bytes: st.dead_bytes,
            });
        }
        let gap = encode_gap(seq, GapReason::Rejected);
        st.backlog_bytes = st.backlog_bytes.saturating_sub(size) + frame_size(gap.len());
        st.dead_bytes += entry_size(&dead);
        st.dead_count += 1;
        st.overlay_generation += 1;
        let generation = st.overlay_generation;
        st.overlays.insert(
            seq,
            Overlay {
                to: seq,
                reason: GapReason::Rejected,
                generation,
            },
        );
        if let Some(e) = st.inflight.iter_mut().find(|e| e.0 == seq) {
            e.2 = frame_size(gap.len());
        }
        let mut batch = sled::Batch::default();
        batch.insert(&overlay_key(seq)[..], gap);
        batch.insert(&dead_key(seq)[..], dead);
        put_positions(&st, &mut batch);
        self.apply(batch, "dead-lettering")?;
        st.sled_changed();
        drop(st);
        self.sync()
    }

    /// Lists dead letters, oldest first, at most `limit`.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        for item in self.store()?.log.scan_prefix([P_DEAD]).take(limit) {
            let (k, v) = item.map_err(storage("listing dead letters"))?;
            let seq = key_seq(&k);
            let (header, record) = decode_dead(seq, &v)?;
            out.push(DeadLetter {
                seq,
                status: header.status,
                error: header.error,
                at_ms: header.at_ms,
                topic: record.topic,
                payload_bytes: record.payload.len(),
            });
        }
        Ok(out)
    }

    /// Appends the dead letter `seq` again as a new record (with a new seq; the old seq stays
    /// reported as `rejected`) and removes it from the dead-letter store. Returns the new seq.
    pub fn requeue(&self, seq: u64) -> Result<u64> {
        let value = self
            .store()?
            .log
            .get(dead_key(seq))
            .map_err(storage("reading a dead letter"))?
            .ok_or(Error::NoDeadLetter { seq })?;
        let (_, record) = decode_dead(seq, &value)?;
        let appended = self.append(&[NewRecord::from(record)])?;
        let mut st = self.lock();
        st.dead_bytes = st.dead_bytes.saturating_sub(entry_size(&value));
        st.dead_count = st.dead_count.saturating_sub(1);
        let mut batch = sled::Batch::default();
        batch.remove(&dead_key(seq)[..]);
        put_positions(&st, &mut batch);
        self.apply(batch, "removing a requeued dead letter")?;
        st.sled_changed();
        drop(st);
        self.sync()?;
        let new_seq = appended.first_seq.unwrap_or(0);
        info!("dead letter requeued seq={} new_seq={}", seq, new_seq);
        Ok(new_seq)
    }
}
