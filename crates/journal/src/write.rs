//! The write path: appending a group of records (seqs, frames, the budget) and freeing the log
//! segments the cursor has passed.

use super::*;

impl Journal {
    /// Appends a prefix of `records` in order, assigning consecutive seqs, and returns how many it
    /// took (`Appended::taken`): as many as the budget allows, and at least one when the journal is
    /// empty, so that a single record larger than the budget cannot stall ingest. With nothing
    /// taken the error is [`Error::Full`]. The records are not durable until [`Journal::sync`]
    /// returns.
    ///
    /// A record whose MQTT delivery is a DUP of the message last journaled under the same packet id
    /// (same topic and payload) is taken without being journaled again, and counted in
    /// `redeliveries`.
    pub fn append(&self, records: &[NewRecord]) -> Result<Appended> {
        let mut st = self.lock();
        // Appends rarely write to sled, so they would not notice it is closed: a failed reopen
        // (or a failed sync, until the reopen) must stop them as it stops everything else.
        self.ensure_writable(&st)?;
        // The frames of a group are encoded into one buffer kept between appends.
        let mut buf = std::mem::take(&mut st.frames);
        let mut ends = std::mem::take(&mut st.frame_ends);
        buf.clear();
        ends.clear();
        let appended = self.append_group(&mut st, records, &mut buf, &mut ends);
        st.frames = buf;
        st.frame_ends = ends;
        appended
    }

    /// [`Journal::append`] with the buffer the frames are encoded into (`buf`, and each frame's
    /// seq and end offset in `ends`).
    fn append_group(
        &self,
        st: &mut State,
        records: &[NewRecord],
        buf: &mut Vec<u8>,
        ends: &mut Vec<(u64, usize)>,
    ) -> Result<Appended> {
        let mut out = Appended::default();
        self.adapt_budget(st);
        let budget = st.budget;

        // Encode every record that is not a redelivery as a frame, with the seq it gets if taken:
        // the group takes a prefix, so these are the seqs it will have.
        let mut sizes: Vec<Option<u64>> = Vec::with_capacity(records.len());
        // (packet id, content hash) of the QoS1 records encoded, in order.
        let mut group_marks: Vec<(u16, u64)> = Vec::new();
        let mut incoming = 0u64;
        let mut seq = st.next_seq;
        for rec in records {
            if let Some(m) = rec.mqtt {
                let hash = content_hash(&rec.topic, &rec.payload);
                // The newest message under this packet id: earlier in this group, or journaled.
                let seen = match group_marks.iter().rev().find(|(p, _)| *p == m.pkid) {
                    Some((_, h)) => *h == hash,
                    None => st.marks.matches(m.pkid, hash),
                };
                if m.dup && seen {
                    sizes.push(None);
                    continue;
                }
                group_marks.push((m.pkid, hash));
            }
            let pkid = rec.mqtt.map(|m| m.pkid);
            let size = match rec.too_large {
                None => push_frame(buf, seq, pkid, |b| encode_record_into(rec, b)),
                Some(_) => push_frame(buf, seq, pkid, |b| {
                    b.extend_from_slice(&encode_gap(seq, GapReason::Rejected))
                }),
            }
            .map_err(log_io("encoding records"))?;
            ends.push((seq, buf.len()));
            incoming += size;
            sizes.push(Some(size));
            seq += 1;
        }

        let mut batch = sled::Batch::default();
        let held = st.backlog_bytes + st.dead_bytes;
        if held + incoming > budget && self.inner.on_full == OnFull::DropOldest {
            // Make room for the whole group if the unsent records allow it.
            out.dropped = self.trim_oldest(st, &mut batch, held + incoming - budget)?;
        }
        let mut used = st.backlog_bytes + st.dead_bytes;
        let mut next = st.next_seq;
        let mut added_bytes = 0u64;
        let mut added_records = 0u64;
        let mut group_marks = group_marks.into_iter();
        let mut marks = Vec::new();
        for (rec, size) in records.iter().zip(sizes) {
            let Some(size) = size else {
                out.redeliveries += 1;
                out.taken += 1;
                continue;
            };
            let empty = used == 0 && added_records == 0;
            if used + size > budget && !empty {
                break;
            }
            // One commit may add only so much, so that a group stays a small part of the budget.
            if added_records > 0 && added_bytes + size > self.inner.max_bytes / GROUP_SHARE {
                break;
            }
            if let Some(m) = rec.mqtt {
                let hash = group_marks.next().map_or(0, |(_, h)| h);
                marks.push(redelivery::Mark {
                    seq: next,
                    pkid: m.pkid,
                    hash,
                });
            }
            if let Some(bytes) = rec.too_large {
                error!(
                    "message too large topic={} bytes={} (over mqtt.max_packet_size): reported to the cloud as rejected gap seq={}",
                    rec.topic, bytes, next
                );
            }
            used += size;
            added_bytes += size;
            added_records += 1;
            out.taken += 1;
            out.first_seq.get_or_insert(next);
            out.last_seq = Some(next);
            next += 1;
        }
        let taken = (next - st.next_seq) as usize;
        self.write_frames(st, buf, &ends[..taken], batch, out.dropped > 0)?;
        if taken == 0 && out.taken == 0 {
            return Err(Error::Full { used, budget });
        }
        // Only frames written get marks: a mark makes a redelivery count as journaled.
        for m in marks {
            st.marks.push(m);
        }
        st.backlog_records += added_records;
        st.backlog_bytes += added_bytes;
        st.next_seq = next;
        Ok(out)
    }

    /// The writing half of [`Journal::append`]: the lease, then the frames, then sled's `batch`
    /// (a trim's overlays and positions) when `trimmed`. sled's positions may run ahead of the log
    /// (recovery trusts the log and recounts), and usually lag behind it: the positions and marks
    /// of appends are recorded only at a sync after a few new segments were started
    /// ([`SNAPSHOT_SEGMENTS`]), and rebuilt from the frames past them at open.
    fn write_frames(
        &self,
        st: &mut State,
        buf: &[u8],
        frames: &[(u64, usize)],
        batch: sled::Batch,
        trimmed: bool,
    ) -> Result<()> {
        if let Some(&(last, _)) = frames.last() {
            if last > st.lease {
                // Durably reserve the seqs before they exist anywhere.
                let mut markf = self.mark();
                self.renew_lease(st, &mut markf, last)?;
            }
            let end = frames.last().map_or(0, |f| f.1);
            let rolled = log_of(&mut st.log)?
                .append_frames(&buf[..end], frames)
                .map_err(log_io("appending records"))?;
            if rolled {
                st.rolls_since_snapshot += 1;
                st.snapshot_due |= st.rolls_since_snapshot >= SNAPSHOT_SEGMENTS;
            }
        }
        if trimmed {
            // Keep a trim: the in-memory counters already reflect it.
            let mut batch = batch;
            put_positions(st, &mut batch);
            self.apply(batch, "dropping the oldest records")?;
        }
        Ok(())
    }

    /// Deletes the segments nothing needs any more: every seq in them is acknowledged durably and
    /// older than the replay window, or covered by an overlay made durable by a sync.
    pub(super) fn free_segments(&self, st: &mut State) -> Result<()> {
        let below = st.acked_durable.min(st.retain_from.saturating_sub(1));
        let generation = st.overlays_durable;
        let State { log, overlays, .. } = &mut *st;
        let log = log_of(log)?;
        if log
            .first_seq()
            .is_none_or(|f| f > below && overlays.is_empty())
        {
            return Ok(());
        }
        let n = log
            .remove_if(|first, last| {
                let mut s = first;
                while s <= last {
                    if s <= below {
                        s = below + 1;
                        continue;
                    }
                    match overlays.range(..=s).next_back() {
                        Some((_, o)) if o.to >= s && o.generation <= generation => s = o.to + 1,
                        _ => return false,
                    }
                }
                true
            })
            .map_err(log_io("removing segments"))?;
        if n > 0 {
            debug!("journal freed segments={} acked_seq={}", n, below);
        }
        Ok(())
    }
}
