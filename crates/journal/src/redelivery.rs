//! The redelivery window: the marks of the newest QoS1 messages journaled (MQTT packet id,
//! content hash, seq), by which the writer recognises a broker's redelivery (DUP) of a message it
//! already journaled. Kept in memory; `mod.rs` stores it in sled as one `W` value now and then
//! (with the seq it is complete up to), and recovery completes it from the packet id each frame
//! carries. Pure: no sled, no I/O.
//!
//! The window holds the newest [`MAX_MARKS`] marks, a packet id's newest superseding its older
//! ones. The `W` value is `through u64 | (seq u64, pkid u16, hash u64)*`, big endian.

use std::collections::{HashMap, VecDeque};

/// Redelivery marks kept: the broker only redelivers what was in flight, and ingest keeps the QoS1
/// messages journaled and not yet acknowledged well below this (`ingest::PUBACK_WINDOW`; the
/// broker's own `max_inflight_messages` is not enough, see there). A redelivery beyond the window
/// is journaled again and pushes out a mark of its own, so the copies after it are missed too: the
/// window must never be outrun. It also keeps a mark from matching a *new* message: mosquitto
/// assigns packet ids in sequence up to 65,535, so an id comes back only long after its mark was
/// dropped. (A broker that reuses the lowest free id could, after a reconnect, present a new message
/// byte-identical to one within the window under the same id and with DUP set: it would be taken
/// for a copy. See README.)
pub const MAX_MARKS: usize = 1024;
/// Bytes of one mark in the `W` value.
const MARK: usize = 18;

/// One mark: the message journaled as `seq` under packet id `pkid`, with its content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub seq: u64,
    pub pkid: u16,
    pub hash: u64,
}

#[derive(Debug, Default)]
pub(super) struct Marks {
    /// (seq, pkid) of every mark taken, oldest first; at most `MAX_MARKS`.
    order: VecDeque<(u64, u16)>,
    /// The newest mark of each packet id in `order`: its seq and hash.
    newest: HashMap<u16, (u64, u64)>,
}

impl Marks {
    /// The window of `marks` (in any order; a seq given twice counts once).
    pub fn from_marks(mut marks: Vec<Mark>) -> Marks {
        marks.sort_unstable_by_key(|m| m.seq);
        marks.dedup_by_key(|m| m.seq);
        let mut w = Marks::default();
        for m in marks {
            w.push(m);
        }
        w
    }

    /// Records `m`, newer than every mark held, and drops the oldest beyond `MAX_MARKS`.
    pub fn push(&mut self, m: Mark) {
        self.order.push_back((m.seq, m.pkid));
        self.newest.insert(m.pkid, (m.seq, m.hash));
        while self.order.len() > MAX_MARKS {
            if let Some((seq, pkid)) = self.order.pop_front() {
                if self.newest.get(&pkid).is_some_and(|(s, _)| *s == seq) {
                    self.newest.remove(&pkid);
                }
            }
        }
    }

    /// Whether the newest message journaled under `pkid` had this content hash.
    pub fn matches(&self, pkid: u16, hash: u64) -> bool {
        self.newest.get(&pkid).is_some_and(|(_, h)| *h == hash)
    }

    /// The `W` value: the newest mark of each packet id, oldest first, complete below `through`.
    pub fn encode(&self, through: u64) -> Vec<u8> {
        let mut marks: Vec<(u64, u16, u64)> = self
            .newest
            .iter()
            .map(|(&pkid, &(seq, hash))| (seq, pkid, hash))
            .collect();
        marks.sort_unstable();
        let mut out = Vec::with_capacity(8 + marks.len() * MARK);
        out.extend_from_slice(&through.to_be_bytes());
        for (seq, pkid, hash) in marks {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&pkid.to_be_bytes());
            out.extend_from_slice(&hash.to_be_bytes());
        }
        out
    }
}

/// Decodes a `W` value into the seq it is complete up to (exclusive) and its marks. `None` when the
/// value is damaged (a length that is no whole number of marks). Never panics.
pub(super) fn decode(value: &[u8]) -> Option<(u64, Vec<Mark>)> {
    let (through, rest) = value.split_first_chunk::<8>()?;
    if rest.len() % MARK != 0 {
        return None;
    }
    let marks = rest
        .chunks_exact(MARK)
        .map(|c| {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[i..i + 8]);
                u64::from_be_bytes(b)
            };
            Mark {
                seq: word(0),
                pkid: u16::from_be_bytes([c[8], c[9]]),
                hash: word(10),
            }
        })
        .collect();
    Some((u64::from_be_bytes(*through), marks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64, pkid: u16, hash: u64) -> Mark {
        Mark { seq, pkid, hash }
    }

    #[test]
    fn the_newest_mark_of_a_packet_id_decides() {
        let mut w = Marks::default();
        w.push(m(1, 7, 100));
        w.push(m(2, 7, 200));
        assert!(w.matches(7, 200));
        assert!(!w.matches(7, 100));
        assert!(!w.matches(8, 200));
    }

    #[test]
    fn the_window_keeps_the_newest_marks_only() {
        let mut w = Marks::default();
        for i in 0..(MAX_MARKS as u64 + 10) {
            w.push(m(i + 1, i as u16, i));
        }
        assert_eq!(w.order.len(), MAX_MARKS);
        assert!(!w.matches(0, 0), "the oldest went");
        assert!(w.matches(10, 10), "the oldest kept");
        // A packet id reused inside the window survives its older mark's trimming.
        let mut w = Marks::default();
        w.push(m(1, 5, 1));
        for i in 0..(MAX_MARKS as u64 - 1) {
            w.push(m(i + 2, 1000 + i as u16, 0));
        }
        w.push(m(MAX_MARKS as u64 + 1, 5, 2));
        assert!(w.matches(5, 2));
        assert_eq!(w.newest.len(), MAX_MARKS);
    }

    #[test]
    fn the_stored_value_round_trips_and_damage_reads_as_none() {
        let w = Marks::from_marks(vec![m(9, 3, 33), m(4, 1, 11), m(4, 1, 11), m(6, 3, 22)]);
        let value = w.encode(10);
        let (through, marks) = decode(&value).unwrap();
        assert_eq!(through, 10);
        assert_eq!(marks, vec![m(4, 1, 11), m(9, 3, 33)]);
        assert_eq!(Marks::from_marks(marks).encode(10), value);
        for n in 0..value.len() {
            if n < 8 || (n - 8) % MARK != 0 {
                assert_eq!(decode(&value[..n]), None, "{n} bytes");
            }
        }
    }
}
