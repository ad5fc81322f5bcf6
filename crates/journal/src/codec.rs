//! Entry values (the body of a log frame, an overlay, a dead letter's record) and the keys of the
//! journal's sled tree, encoded and decoded. Pure: no sled, no I/O.
//!
//! Decoding bytes from disk never panics and never allocates more than the value's own length:
//! a damaged value is an [`Error::Corrupt`] naming its seq. The value codecs are public so that the
//! fuzz tests (`tests/fuzz.rs`) can feed them damaged bytes; keys and meta names stay private.

use serde::{Deserialize, Serialize};

use super::{Entry, Error, Monotonic, NewRecord, Record, Result, StoredFormat};
use ferry_protocol::GapReason;

pub(super) const P_ENTRY: u8 = b'E';
pub(super) const P_DEAD: u8 = b'D';
/// The older layout's redelivery marks, a key per packet id: read once at open, then removed.
pub(super) const P_INGEST: u8 = b'I';
/// The redelivery window (`redelivery.rs`): a single key.
pub(super) const P_WINDOW: u8 = b'W';
/// A gap standing in for entries of the log (`segments::Overlay`): the value is a gap's entry value.
pub(super) const P_OVERLAY: u8 = b'X';

pub(super) const M_NEXT_SEQ: &[u8] = b"Mnext_seq";
pub(super) const M_ACKED: &[u8] = b"Macked";
pub(super) const M_BACKLOG_RECORDS: &[u8] = b"Mbacklog_records";
pub(super) const M_BACKLOG_BYTES: &[u8] = b"Mbacklog_bytes";
pub(super) const M_DEAD_BYTES: &[u8] = b"Mdead_bytes";
/// The oldest acknowledged seq kept for replay, and the bytes kept (`replay.rs`).
pub(super) const M_RETAIN_FROM: &[u8] = b"Mretain_from";
pub(super) const M_RETAINED_BYTES: &[u8] = b"Mretained_bytes";
/// Present once the journal has been reconciled with the seq mark: its absence means a new database.
pub(super) const M_INITIALISED: &[u8] = b"Minitialised";
/// The seq through which the log was synced when sled last recorded a snapshot.
pub(super) const M_DURABLE: &[u8] = b"Mdurable";

pub(super) const KIND_RECORD: u8 = 1;
pub(super) const KIND_GAP: u8 = 2;
/// A record with its [`Monotonic`] stamp after the header (taken under an untrusted wall clock).
pub(super) const KIND_RECORD_MONO: u8 = 3;

/// A record's header: decoded with an owned topic, encoded from a borrowed one (same bytes).
#[derive(Serialize, Deserialize)]
pub(super) struct RecordHeader<T> {
    pub ts_ms: u64,
    pub topic: T,
    pub format: StoredFormat,
    pub parse_error: bool,
}

#[derive(Serialize, Deserialize)]
pub(super) struct GapBody {
    pub to_seq: u64,
    pub reason: GapReason,
}

/// What a dead letter holds besides the record: why the cloud refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadHeader {
    pub status: u16,
    pub error: String,
    pub at_ms: u64,
}

/// Encodes an entry value holding a record.
pub fn encode_record(rec: &NewRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(rec.topic.len() + rec.payload.len() + 24);
    encode_record_into(rec, &mut out);
    out
}

/// Appends the entry value of a record to `out` (the journal's append encodes every frame of a
/// group commit into one buffer this way).
pub(super) fn encode_record_into(rec: &NewRecord, out: &mut Vec<u8>) {
    let header = RecordHeader {
        ts_ms: rec.ts_ms,
        topic: rec.topic.as_str(),
        format: rec.format,
        parse_error: rec.parse_error,
    };
    // Serializing plain structs into a Vec cannot fail.
    match &rec.mono {
        None => {
            out.push(KIND_RECORD);
            let _ = postcard::to_io(&header, &mut *out);
        }
        Some(mono) => {
            out.push(KIND_RECORD_MONO);
            let _ = postcard::to_io(&header, &mut *out);
            let _ = postcard::to_io(mono, &mut *out);
        }
    }
    out.extend_from_slice(&rec.payload);
}

/// Encodes an entry value holding a gap `seq..=to_seq` (the seq is the frame's or the key's).
pub fn encode_gap(to_seq: u64, reason: GapReason) -> Vec<u8> {
    let mut out = vec![KIND_GAP];
    out.extend_from_slice(&postcard::to_stdvec(&GapBody { to_seq, reason }).unwrap_or_default());
    out
}

/// Decodes an entry value. Corrupt bytes give an error naming the seq, never a panic, and never an
/// allocation larger than the value itself.
pub fn decode_entry(seq: u64, value: &[u8]) -> Result<Entry> {
    let corrupt = |reason: String| Error::Corrupt { seq, reason };
    match value.split_first() {
        Some((&kind @ (KIND_RECORD | KIND_RECORD_MONO), rest)) => {
            let (h, rest): (RecordHeader<String>, &[u8]) = postcard::take_from_bytes(rest)
                .map_err(|e| corrupt(format!("record header: {e}")))?;
            let (mono, payload) = if kind == KIND_RECORD_MONO {
                let (mono, rest): (Monotonic, &[u8]) = postcard::take_from_bytes(rest)
                    .map_err(|e| corrupt(format!("record's monotonic stamp: {e}")))?;
                (Some(mono), rest)
            } else {
                (None, rest)
            };
            Ok(Entry::Record(Record {
                seq,
                ts_ms: h.ts_ms,
                topic: h.topic,
                payload: payload.to_vec(),
                format: h.format,
                parse_error: h.parse_error,
                mono,
            }))
        }
        Some((&KIND_GAP, rest)) => {
            let g: GapBody =
                postcard::from_bytes(rest).map_err(|e| corrupt(format!("gap: {e}")))?;
            if g.to_seq < seq {
                return Err(corrupt(format!(
                    "gap ends at {} before it starts",
                    g.to_seq
                )));
            }
            Ok(Entry::Gap {
                from_seq: seq,
                to_seq: g.to_seq,
                reason: g.reason,
            })
        }
        Some((kind, _)) => Err(corrupt(format!("unknown entry kind {kind}"))),
        None => Err(corrupt("empty value".into())),
    }
}

/// Encodes a `D` value: the header, then the record's entry value as it was.
pub fn encode_dead(header: &DeadHeader, entry_value: &[u8]) -> Vec<u8> {
    // Serializing a plain struct into a Vec cannot fail.
    let mut out = postcard::to_stdvec(header).unwrap_or_default();
    out.extend_from_slice(entry_value);
    out
}

/// Decodes a `D` value. Like [`decode_entry`]: an error naming the seq, never a panic.
pub fn decode_dead(seq: u64, value: &[u8]) -> Result<(DeadHeader, Record)> {
    let (header, rest): (DeadHeader, &[u8]) =
        postcard::take_from_bytes(value).map_err(|e| Error::Corrupt {
            seq,
            reason: format!("dead letter header: {e}"),
        })?;
    match decode_entry(seq, rest)? {
        Entry::Record(r) => Ok((header, r)),
        Entry::Gap { .. } => Err(Error::Corrupt {
            seq,
            reason: "dead letter holds a gap".into(),
        }),
    }
}

/// The key of an entry in the older layout (entries in sled), read only to migrate them.
#[cfg(test)]
pub(super) fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [P_ENTRY; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn dead_key(seq: u64) -> [u8; 9] {
    let mut k = [P_DEAD; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn overlay_key(seq: u64) -> [u8; 9] {
    let mut k = [P_OVERLAY; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn key_seq(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if key.len() == 9 {
        b.copy_from_slice(&key[1..]);
    }
    u64::from_be_bytes(b)
}

/// What a value kept in sled (a dead letter) costs in the budget: key, value and sled's
/// per-item overhead.
pub(super) fn entry_size(value: &[u8]) -> u64 {
    value.len() as u64 + 9 + 32
}

/// FNV-1a over topic, a separator, and payload: stable across builds and versions.
pub(super) fn content_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h = crate::fnv::Fnv1a::new();
    h.write(topic.as_bytes());
    h.write(&[0]);
    h.write(payload);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::rec;

    #[test]
    fn corrupt_entries_give_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![9],
            vec![KIND_RECORD],
            vec![
                KIND_RECORD,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x01,
            ],
            vec![KIND_GAP],
            vec![KIND_GAP, 0x01, 7],
            // A topic length of ~2^63: must not allocate it.
            vec![
                KIND_RECORD,
                1,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f,
            ],
        ];
        for c in cases {
            assert!(decode_entry(5, &c).is_err(), "{c:?}");
        }
        // Every truncation and every single-byte corruption of a valid value decodes or errors.
        let good = encode_record(&rec("sensors/ü", b"{\"t\":1}"));
        for n in 0..good.len() {
            let _ = decode_entry(1, &good[..n]);
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[n] = b;
                let _ = decode_entry(1, &bad);
            }
        }
    }

    /// A record taken under an untrusted clock keeps its monotonic stamp through the codec; its
    /// truncations and corruptions decode or error, never panic.
    #[test]
    fn monotonic_stamps_round_trip() {
        let mut r = rec("sensors/a", b"{\"t\":1}");
        let mono = Monotonic {
            boot: [7; 16],
            ms: 123_456_789,
        };
        r.mono = Some(mono);
        let value = encode_record(&r);
        assert_eq!(value[0], KIND_RECORD_MONO);
        match decode_entry(4, &value).unwrap() {
            Entry::Record(d) => assert_eq!(
                (d.mono, d.payload.as_slice()),
                (Some(mono), &b"{\"t\":1}"[..])
            ),
            other => panic!("{other:?}"),
        }
        for n in 0..value.len() {
            let _ = decode_entry(1, &value[..n]);
        }
        // Without one, the frame is the older kind, byte for byte.
        r.mono = None;
        assert_eq!(encode_record(&r)[0], KIND_RECORD);
    }

    #[test]
    fn values_round_trip() {
        let r = rec("sensors/ü", &[0, 1, 2]);
        match decode_entry(9, &encode_record(&r)).unwrap() {
            Entry::Record(d) => assert_eq!(
                (d.seq, d.topic.as_str(), d.payload.as_slice()),
                (9, "sensors/ü", &[0u8, 1, 2][..])
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_entry(3, &encode_gap(5, GapReason::JournalFull)).unwrap(),
            Entry::Gap {
                from_seq: 3,
                to_seq: 5,
                reason: GapReason::JournalFull
            }
        );
        assert_eq!(key_seq(&entry_key(u64::MAX)), u64::MAX);
    }
}
