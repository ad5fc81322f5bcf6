//! Validation of an incoming batch: from the decompressed request body to a [`Batch`] or an
//! [`Invalid`] that names the offending field (`records[3].seq: missing`).
//!
//! Pure: no I/O, no state. Two readers, neither of them `protocol::Batch`, because a receiver must
//! tell a device exactly what was wrong, and because key presence matters (`"payload": null` is a
//! JSON payload, a missing `payload` is not):
//! - `usual`: the fast path, for a batch in the shape agents send (borrowed fields, no `Value`
//!   tree); `None` for anything else.
//! - [`parse_general`]: reads the body as a `serde_json::Value`, checks every field and names the
//!   one that is wrong.
//!
//! [`parse`] tries the first and falls back to the second.
//!
//! Also the one definition of a record's content fingerprint ([`Record::fingerprint`]), used both for
//! an incoming record and for a stored line read back at start ([`stored_record`]), so that the two
//! always agree.
//!
//! Why one file of this length: the receiver's reading of a batch (about 490 lines) and its tests;
//! it moves with the receiver into a crate of its own with the center issue.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

use ferry_protocol::{Gap, GapReason, Held};

mod usual;
use usual::parse_usual;

/// Longest device id, in bytes (ids are ASCII).
pub use ferry_protocol::MAX_DEVICE_ID_LEN;

/// A batch that passed validation. Records are in strictly ascending seq order.
#[derive(Debug, PartialEq)]
pub struct Batch {
    pub device_id: String,
    pub records: Vec<Record>,
    pub gaps: Vec<Gap>,
    /// The gateway's account of what it holds (`held`; older agents do not send it).
    pub held: Option<Held>,
}

/// One validated record.
#[derive(Debug, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// The record object as received, serialized as one line of JSON (no newline).
    pub line: String,
    /// Hash of the record's content, see [`fingerprint`]. Equal content gives an equal fingerprint.
    pub fingerprint: u64,
    /// `ts_ms` as sent (corrected, for a gateway whose clock was not trusted).
    pub ts_ms: u64,
    /// On topic [`UPSTREAM_GAP_TOPIC`]: the gateway's report of a gap upstream of it.
    pub upstream_gap: bool,
    payload: PayloadView,
}

/// Topic of the records a gateway journals for a gap upstream of it (a Sparkplug B edge node's
/// lost message): the ledger counts them (`docs/PROTOCOL.md`).
pub const UPSTREAM_GAP_TOPIC: &str = "$ferry/upstream_gap";

fn is_upstream_gap(topic: &str) -> bool {
    topic == UPSTREAM_GAP_TOPIC
}

/// The payload in the form the reject marker is matched against.
#[derive(Debug, PartialEq)]
enum PayloadView {
    /// The JSON text of `payload`: where it is in the record's line.
    Json(std::ops::Range<usize>),
    Text(String),
    /// The decoded bytes of `payload_b64`.
    Bytes(Vec<u8>),
}

impl Record {
    /// Whether the payload (its JSON text, its text, or its bytes read as lossy UTF-8) contains
    /// `marker`.
    pub fn payload_contains(&self, marker: &str) -> bool {
        match &self.payload {
            PayloadView::Json(span) => self
                .line
                .get(span.clone())
                .is_some_and(|text| text.contains(marker)),
            PayloadView::Text(text) => text.contains(marker),
            PayloadView::Bytes(bytes) => String::from_utf8_lossy(bytes).contains(marker),
        }
    }
}

/// Why a body is not a valid batch: `at` names the place (`body`, `device_id`, `records[3].seq`),
/// `problem` what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub at: String,
    pub problem: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.problem)
    }
}

impl std::error::Error for Invalid {}

fn invalid(at: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid {
        at: at.into(),
        problem: problem.into(),
    }
}

pub use ferry_protocol::is_valid_device_id;

/// Validates a decompressed request body.
pub fn parse(body: &[u8]) -> Result<Batch, Invalid> {
    match parse_usual(body) {
        Some(batch) => Ok(batch),
        None => parse_general(body),
    }
}

/// [`parse`] for any body: read as a `Value`, every field checked and a refusal that names it.
/// Public so that tests can check that [`parse`] gives the same.
pub fn parse_general(body: &[u8]) -> Result<Batch, Invalid> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| invalid("body", format!("invalid json: {e}")))?;
    let Value::Object(mut top) = value else {
        return Err(invalid("body", "not a json object"));
    };

    let device_id = match top.remove("device_id") {
        None => return Err(invalid("device_id", "missing")),
        Some(Value::String(id)) if is_valid_device_id(&id) => id,
        Some(Value::String(_)) => {
            return Err(invalid(
                "device_id",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        Some(_) => return Err(invalid("device_id", "not a string")),
    };

    let records = match top.remove("records") {
        None => return Err(invalid("records", "missing")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid("records", "not an array")),
    };
    let mut parsed = Vec::with_capacity(records.len());
    let mut previous: Option<u64> = None;
    for (i, item) in records.into_iter().enumerate() {
        let record = parse_record(i, item)?;
        if previous.is_some_and(|p| record.seq <= p) {
            return Err(invalid(
                format!("records[{i}].seq"),
                "not greater than the previous record's seq (records must be sorted by seq, each seq once)",
            ));
        }
        previous = Some(record.seq);
        parsed.push(record);
    }

    let gaps = match top.remove("gaps") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_gap(i, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(invalid("gaps", "not an array")),
    };

    let held = match top.remove("held") {
        None => None,
        Some(value) => Some(parse_held(value)?),
    };

    Ok(Batch {
        device_id,
        records: parsed,
        gaps,
        held,
    })
}

/// Validates the `held` object: `head_seq` and `acked_seq` (at most `head_seq`), and
/// `oldest_unsent_ts_ms` (a number, `null` or absent). Other keys are ignored (later additions).
pub(crate) fn parse_held(value: Value) -> Result<Held, Invalid> {
    let Value::Object(fields) = value else {
        return Err(invalid("held", "not a json object"));
    };
    let number = |key: &str| match fields.get(key) {
        None => Err(invalid(format!("held.{key}"), "missing")),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| invalid(format!("held.{key}"), "not a non-negative integer")),
    };
    let head_seq = number("head_seq")?;
    let acked_seq = number("acked_seq")?;
    if acked_seq > head_seq {
        return Err(invalid("held.acked_seq", "greater than held.head_seq"));
    }
    let oldest_unsent_ts_ms = match fields.get("oldest_unsent_ts_ms") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            invalid(
                "held.oldest_unsent_ts_ms",
                "not a non-negative integer or null",
            )
        })?),
    };
    let backlog_bytes =
        match fields.get("backlog_bytes") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                invalid("held.backlog_bytes", "not a non-negative integer or null")
            })?),
        };
    Ok(Held {
        head_seq,
        acked_seq,
        oldest_unsent_ts_ms,
        backlog_bytes,
    })
}

fn parse_record(i: usize, item: Value) -> Result<Record, Invalid> {
    let Value::Object(fields) = item else {
        return Err(invalid(format!("records[{i}]"), "not a json object"));
    };
    let place = || format!("records[{i}]");
    let checked = check_record(&place, &fields)?;
    let (line, span) = record_line(&fields);
    let payload = match checked.payload {
        Form::Json => PayloadView::Json(span.clone()),
        Form::Text(text) => PayloadView::Text(text.to_owned()),
        Form::Bytes(bytes) => PayloadView::Bytes(bytes),
    };
    let fingerprint = fingerprint(
        checked.topic,
        checked.stamped_ms,
        &payload_bytes(&payload, &line),
        checked.parse_error,
    );
    Ok(Record {
        seq: checked.seq,
        line,
        fingerprint,
        ts_ms: checked.ts_ms,
        upstream_gap: is_upstream_gap(checked.topic),
        payload,
    })
}

/// A stored record read back: its seq, content fingerprint, and whether it reports an upstream gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub fingerprint: u64,
    pub upstream_gap: bool,
}

/// Reads back a line of a records file. The line goes through the same checks and the same
/// [`fingerprint`] as an incoming record, so a resend of a stored record matches it after a
/// restart.
pub fn stored_record(line: &[u8]) -> Result<Stored, Invalid> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| invalid("record", format!("invalid json: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(invalid("record", "not a json object"));
    };
    let checked = check_record(&|| "record".to_owned(), &fields)?;
    let payload = match checked.payload {
        Form::Json => {
            let mut text = Vec::new();
            if let Some(v) = fields.get("payload") {
                write_json(&mut text, v);
            }
            Payload::Bytes(form::JSON, text)
        }
        Form::Text(text) => Payload::Borrowed(form::TEXT, text.as_bytes()),
        Form::Bytes(bytes) => Payload::Bytes(form::BYTES, bytes),
    };
    let fingerprint = fingerprint(
        checked.topic,
        checked.stamped_ms,
        &payload,
        checked.parse_error,
    );
    Ok(Stored {
        seq: checked.seq,
        fingerprint,
        upstream_gap: is_upstream_gap(checked.topic),
    })
}

/// The payload form (`payload`, `payload_text`, `payload_b64`) of a checked record.
enum Form<'a> {
    Json,
    Text(&'a str),
    /// Decoded.
    Bytes(Vec<u8>),
}

/// The fields of a record object that passed the checks.
struct Checked<'a> {
    seq: u64,
    ts_ms: u64,
    /// `ts_ms_original` when present, else `ts_ms`: what the fingerprint covers.
    stamped_ms: u64,
    topic: &'a str,
    parse_error: bool,
    payload: Form<'a>,
}

/// Checks the fields of the record object at `place` (made only for an error message).
fn check_record<'a>(
    place: &dyn Fn() -> String,
    fields: &'a Map<String, Value>,
) -> Result<Checked<'a>, Invalid> {
    let at = |field: &str| format!("{}.{field}", place());
    let seq = require_seq(fields, "seq", &at)?;
    let ts_ms = require_u64(fields, "ts_ms", &at)?;
    // A gateway whose clock was not trusted sends `ts_ms` corrected, and may correct a resend
    // differently than the first send: copies are compared by the time as it was stamped.
    let stamped_ms = match fields.get("ts_ms_original") {
        None => ts_ms,
        Some(_) => require_u64(fields, "ts_ms_original", &at)?,
    };
    match fields.get("clock") {
        None | Some(Value::String(_)) => {}
        Some(_) => return Err(invalid(at("clock"), "not a string")),
    }
    let topic = match fields.get("topic") {
        None => return Err(invalid(at("topic"), "missing")),
        Some(Value::String(topic)) => topic,
        Some(_) => return Err(invalid(at("topic"), "not a string")),
    };
    let parse_error = match fields.get("parse_error") {
        None => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err(invalid(at("parse_error"), "not a boolean")),
    };

    let forms = ["payload", "payload_text", "payload_b64"].map(|key| fields.get(key));
    let payload = match forms {
        [None, None, None] => {
            return Err(invalid(
                place(),
                "none of payload, payload_text, payload_b64",
            ));
        }
        [Some(_), None, None] => Form::Json,
        [None, Some(text), None] => match text {
            Value::String(text) => Form::Text(text),
            _ => return Err(invalid(at("payload_text"), "not a string")),
        },
        [None, None, Some(encoded)] => match encoded {
            Value::String(encoded) => match STANDARD.decode(encoded) {
                Ok(bytes) => Form::Bytes(bytes),
                Err(e) => return Err(invalid(at("payload_b64"), format!("invalid base64: {e}"))),
            },
            _ => return Err(invalid(at("payload_b64"), "not a string")),
        },
        _ => {
            let present: Vec<&str> = ["payload", "payload_text", "payload_b64"]
                .into_iter()
                .zip(forms)
                .filter_map(|(key, v)| v.map(|_| key))
                .collect();
            return Err(invalid(
                place(),
                format!("more than one payload form ({})", present.join(", ")),
            ));
        }
    };
    Ok(Checked {
        seq,
        ts_ms,
        stamped_ms,
        topic,
        parse_error,
        payload,
    })
}

/// The record object as one line of compact JSON, keys in sorted order (exactly what serde_json
/// writes for the object), and where the value of `payload` is in it (empty when absent). The
/// payload's JSON text is written once, for the line, and hashed from there.
fn record_line(fields: &Map<String, Value>) -> (String, std::ops::Range<usize>) {
    let mut out = Vec::with_capacity(256);
    let mut span = 0..0;
    out.push(b'{');
    for (n, (key, value)) in fields.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_json(&mut out, key);
        out.push(b':');
        let start = out.len();
        write_json(&mut out, value);
        if key == "payload" {
            span = start..out.len();
        }
    }
    out.push(b'}');
    // serde_json writes valid UTF-8.
    (String::from_utf8(out).unwrap_or_default(), span)
}

/// Appends the compact JSON text of `value`. Writing into a `Vec` cannot fail, nor can serializing
/// a `Value` (its map keys are strings).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

/// The tags of the payload forms in the canonical form a fingerprint hashes.
mod form {
    pub const JSON: u8 = 0;
    pub const TEXT: u8 = 1;
    pub const BYTES: u8 = 2;
}

/// A payload as the fingerprint hashes it: its form's tag and its bytes.
enum Payload<'a> {
    Borrowed(u8, &'a [u8]),
    Bytes(u8, Vec<u8>),
}

impl Payload<'_> {
    fn parts(&self) -> (u8, &[u8]) {
        match self {
            Payload::Borrowed(form, bytes) => (*form, bytes),
            Payload::Bytes(form, bytes) => (*form, bytes),
        }
    }
}

/// The payload of an incoming record as the fingerprint hashes it (the JSON text from the line).
fn payload_bytes<'a>(payload: &'a PayloadView, line: &'a str) -> Payload<'a> {
    match payload {
        PayloadView::Json(span) => Payload::Borrowed(
            form::JSON,
            line.as_bytes().get(span.clone()).unwrap_or_default(),
        ),
        PayloadView::Text(text) => Payload::Borrowed(form::TEXT, text.as_bytes()),
        PayloadView::Bytes(bytes) => Payload::Borrowed(form::BYTES, bytes),
    }
}

/// The content fingerprint of a record: a 64-bit hash ([`Fingerprint`]) of its canonical form,
/// which is, in order, the topic, the time stamped (`ts_ms_original`, else `ts_ms`), the payload form, the payload and `parse_error`. The
/// payload is the JSON text serde_json writes for the value (object keys sorted), the text, or the
/// decoded bytes, so re-encodings of the same content (key order, whitespace,
/// `"parse_error": false` against no `parse_error`, fields this receiver does not know) hash the
/// same, while a JSON `"5"` and a text `5` do not. Variable-length parts are prefixed with their
/// length, so no two contents share a canonical form.
///
/// Fingerprints are never written to disk (they are recomputed from the stored lines at start), so
/// this form and the hash may change between versions. Two different contents collide with
/// probability about 2^-64 per comparison, which would let a clash pass as a duplicate; equal
/// contents never differ.
fn fingerprint(topic: &str, ts_ms: u64, payload: &Payload<'_>, parse_error: bool) -> u64 {
    let (form, bytes) = payload.parts();
    let mut hash = Fingerprint::new();
    hash.write_u64(topic.len() as u64);
    hash.write(topic.as_bytes());
    hash.write_u64(ts_ms);
    hash.write_u64(u64::from(form));
    hash.write_u64(bytes.len() as u64);
    hash.write(bytes);
    hash.write_u64(u64::from(parse_error));
    hash.finish()
}

/// A fast 64-bit hash for fingerprints: eight bytes per step, each step a 64x64->128-bit multiply
/// folded to 64 bits (the mixing step of wyhash), about five times faster than byte-wise FNV-1a
/// on payloads of a few hundred bytes, which the receiver hashes for every record it takes in.
/// Not for anything written to disk: it is this build's choice.
struct Fingerprint {
    state: u64,
}

impl Fingerprint {
    const SEED: u64 = 0xa076_1d64_78bd_642f;
    const MUL: u64 = 0xe703_7ed1_a0b4_28db;

    fn new() -> Fingerprint {
        Fingerprint { state: Self::SEED }
    }

    fn mix(a: u64, b: u64) -> u64 {
        let r = u128::from(a) * u128::from(b);
        (r as u64) ^ ((r >> 64) as u64)
    }

    fn write_u64(&mut self, word: u64) {
        self.state = Self::mix(self.state ^ word ^ Self::SEED, Self::MUL);
    }

    /// The bytes in words of eight, the last one padded with zeros (the caller hashes the length
    /// first, so padding cannot make two inputs equal).
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        Self::mix(self.state, Self::SEED ^ Self::MUL)
    }
}

fn parse_gap(i: usize, item: Value) -> Result<Gap, Invalid> {
    let at = |field: &str| format!("gaps[{i}].{field}");
    let Value::Object(fields) = item else {
        return Err(invalid(format!("gaps[{i}]"), "not a json object"));
    };
    let from_seq = require_seq(&fields, "from_seq", &at)?;
    let to_seq = require_seq(&fields, "to_seq", &at)?;
    if from_seq > to_seq {
        return Err(invalid(
            at("to_seq"),
            format!("less than from_seq {from_seq}"),
        ));
    }
    let reason = match fields.get("reason") {
        None => return Err(invalid(at("reason"), "missing")),
        Some(Value::String(reason)) => match GapReason::parse(reason) {
            Some(reason) => reason,
            None => {
                let all: Vec<&str> = GapReason::ALL.iter().map(|r| r.as_str()).collect();
                return Err(invalid(
                    at("reason"),
                    format!("not one of {}", all.join(", ")),
                ));
            }
        },
        Some(_) => return Err(invalid(at("reason"), "not a string")),
    };
    Ok(Gap {
        from_seq,
        to_seq,
        reason,
    })
}

fn require_u64(
    fields: &Map<String, Value>,
    key: &str,
    at: &impl Fn(&str) -> String,
) -> Result<u64, Invalid> {
    match fields.get(key) {
        None => Err(invalid(at(key), "missing")),
        Some(value) => value
            .as_u64()
            .ok_or_else(|| invalid(at(key), "not an unsigned 64-bit integer")),
    }
}

/// A seq: an unsigned integer of at least 1.
fn require_seq(
    fields: &Map<String, Value>,
    key: &str,
    at: &impl Fn(&str) -> String,
) -> Result<u64, Invalid> {
    match require_u64(fields, key, at)? {
        0 => Err(invalid(at(key), "must be at least 1")),
        seq => Ok(seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    fn error_of(value: Value) -> String {
        match parse(&body(value)) {
            Ok(batch) => panic!("accepted {batch:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn example() -> Value {
        json!({"device_id": "gw-01",
               "records": [
                 {"seq": 101, "ts_ms": 1763700000000u64, "topic": "sensors/t1", "payload": {"t": 21.5}},
                 {"seq": 102, "ts_ms": 1763700000012u64, "topic": "sensors/raw", "payload_b64": "AAEC"},
                 {"seq": 103, "ts_ms": 1763700000013u64, "topic": "log", "payload_text": "hello"},
                 {"seq": 104, "ts_ms": 1763700000014u64, "topic": "bad", "payload_b64": "e30=", "parse_error": true}],
               "gaps": [{"from_seq": 40, "to_seq": 99, "reason": "journal_full"}]})
    }

    #[test]
    fn the_protocol_example_is_accepted() {
        let batch = parse(&body(example())).expect("valid batch");
        assert_eq!(batch.device_id, "gw-01");
        let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![101, 102, 103, 104]);
        assert_eq!(
            batch.gaps,
            vec![Gap {
                from_seq: 40,
                to_seq: 99,
                reason: GapReason::JournalFull
            }]
        );
    }

    #[test]
    fn the_stored_line_keeps_the_payload_form_and_all_fields() {
        let batch = parse(&body(example())).expect("valid batch");
        let lines: Vec<Value> = batch
            .records
            .iter()
            .map(|r| serde_json::from_str(&r.line).expect("line is json"))
            .collect();
        assert_eq!(lines[0]["payload"], json!({"t": 21.5}));
        assert_eq!(lines[1]["payload_b64"], json!("AAEC"));
        assert_eq!(lines[2]["payload_text"], json!("hello"));
        assert_eq!(lines[3]["parse_error"], json!(true));
        assert!(batch.records.iter().all(|r| !r.line.contains('\n')));
    }

    /// The line is built field by field (to hash the payload's text from it); it must stay
    /// byte for byte what serde_json writes for the whole object, as stored by earlier versions.
    #[test]
    fn the_stored_line_is_what_serde_json_writes_for_the_record_object() {
        let records = json!([
            {"seq": 1, "ts_ms": 5, "topic": "t/\"q\"\u{7}é", "payload": {"z": [1.50, -0.0, 1e300, "\n\u{2028}"], "a": {"b": null}}},
            {"seq": 2, "ts_ms": 0, "topic": "t", "payload_text": "tab\there ✓", "zz_unknown": {"k": 1}},
            {"seq": 3, "ts_ms": 1, "topic": "t", "payload_b64": "AAEC", "parse_error": true, "_": []},
        ]);
        let batch = parse(&body(json!({"device_id": "d", "records": records.clone()})))
            .expect("valid batch");
        for (record, object) in batch.records.iter().zip(records.as_array().unwrap()) {
            let reparsed: Value = serde_json::from_str(&object.to_string()).unwrap();
            assert_eq!(record.line, reparsed.to_string());
        }
    }

    /// The fast path must take what agents send (or it is dead weight) and give what the general
    /// path gives; the fuzz suite compares the two on random and mutated bodies.
    #[test]
    fn usual_batches_take_the_fast_path_and_read_as_the_general_path_reads_them() {
        let mut bodies = vec![
            body(example()),
            body(
                json!({"device_id": "d", "records": [{"seq": 1, "ts_ms": 0, "topic": "t", "payload": null}]}),
            ),
        ];
        bodies.push(br#"{"device_id":"d","records":[{"seq":1,"ts_ms":0,"topic":"t\u00e9","payload_text":"a\nb","parse_error":false}],"gaps":[],"x":1}"#.to_vec());
        for body in &bodies {
            let fast = parse_usual(body).expect("the fast path takes it");
            assert_eq!(Ok(fast), parse_general(body));
        }
        // Payloads written every way that serde_json's Value writes back differently.
        let payloads = [
            r#"{"b":1,"a":{"d":[1.50,-0.0,1e2,-7,18446744073709551615,1.7976931348623157e308],"c":null},"a":"last wins"}"#,
            r#"{"\u0062":"\u00e9\/\n\u2028","b ":true,"":false}"#,
            r#"[ ]"#,
            r#" "x" "#,
        ];
        for p in payloads {
            let body = format!(
                r#"{{"device_id":"d","records":[{{"seq":1,"ts_ms":0,"topic":"t","payload":{p}}}]}}"#
            );
            let fast = parse_usual(body.as_bytes()).expect("the fast path takes it");
            assert_eq!(Ok(fast), parse_general(body.as_bytes()), "{p}");
        }
        // Not the usual shape: the general path reads (or refuses) them.
        for odd in [
            json!({"device_id": "d", "records": [{"seq": 1, "ts_ms": 0, "topic": "t", "payload": 1, "v2": true}]}),
            json!({"device_id": "d", "records": [{"seq": 1, "ts_ms": 0, "topic": "t", "payload": 1, "payload_text": null}]}),
            json!({"device_id": "d", "records": [{"seq": 1, "ts_ms": 0, "topic": "t", "payload_text": "x", "parse_error": null}]}),
            json!({"device_id": "d", "records": [], "gaps": null}),
        ] {
            let body = body(odd);
            assert!(
                parse_usual(&body).is_none(),
                "{}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(parse(&body), parse_general(&body));
        }
    }

    #[test]
    fn a_null_json_payload_is_a_payload() {
        let batch = parse(&body(json!({"device_id": "d", "records": [
            {"seq": 1, "ts_ms": 0, "topic": "t", "payload": null}]})))
        .expect("valid batch");
        let line: Value = serde_json::from_str(&batch.records[0].line).expect("line is json");
        assert_eq!(
            line,
            json!({"seq": 1, "ts_ms": 0, "topic": "t", "payload": null})
        );
        assert!(line.as_object().is_some_and(|r| r.contains_key("payload")));
    }

    #[test]
    fn gaps_may_be_omitted_and_records_may_be_empty() {
        let batch = parse(br#"{"device_id": "d", "records": []}"#).expect("valid batch");
        assert!(batch.records.is_empty() && batch.gaps.is_empty());
    }

    #[test]
    fn the_error_names_the_field_and_the_record_index() {
        let mut v = example();
        v["records"][3].as_object_mut().map(|r| r.remove("seq"));
        assert_eq!(error_of(v), "records[3].seq: missing");

        let mut v = example();
        v["records"][1]["seq"] = json!(-4);
        assert_eq!(
            error_of(v),
            "records[1].seq: not an unsigned 64-bit integer"
        );

        let mut v = example();
        v["records"][0]["seq"] = json!(0);
        assert_eq!(error_of(v), "records[0].seq: must be at least 1");

        let mut v = example();
        v["records"][2]["ts_ms"] = json!("soon");
        assert_eq!(
            error_of(v),
            "records[2].ts_ms: not an unsigned 64-bit integer"
        );

        let mut v = example();
        v["records"][0]["topic"] = json!(7);
        assert_eq!(error_of(v), "records[0].topic: not a string");

        let mut v = example();
        v["records"][3]["parse_error"] = json!("yes");
        assert_eq!(error_of(v), "records[3].parse_error: not a boolean");
    }

    #[test]
    fn a_record_needs_exactly_one_payload_form() {
        let mut v = example();
        v["records"][0].as_object_mut().map(|r| r.remove("payload"));
        assert_eq!(
            error_of(v),
            "records[0]: none of payload, payload_text, payload_b64"
        );

        let mut v = example();
        v["records"][2]["payload"] = json!(null);
        assert_eq!(
            error_of(v),
            "records[2]: more than one payload form (payload, payload_text)"
        );
    }

    #[test]
    fn base64_that_does_not_decode_is_refused() {
        let mut v = example();
        v["records"][1]["payload_b64"] = json!("not base64!");
        assert!(error_of(v).starts_with("records[1].payload_b64: invalid base64"));

        let mut v = example();
        v["records"][1]["payload_b64"] = json!(12);
        assert_eq!(error_of(v), "records[1].payload_b64: not a string");
    }

    #[test]
    fn unsorted_or_repeated_seqs_are_refused() {
        let mut v = example();
        v["records"][2]["seq"] = json!(102);
        assert!(error_of(v).starts_with("records[2].seq: not greater than the previous"));
    }

    #[test]
    fn device_ids_outside_the_identity_rules_are_refused() {
        for bad in [
            json!(""),
            json!("a b"),
            json!("gw/01"),
            json!("é"),
            json!("x".repeat(65)),
        ] {
            let mut v = example();
            v["device_id"] = bad;
            assert!(error_of(v).starts_with("device_id: must be 1 to 64"));
        }
        let mut v = example();
        v["device_id"] = json!("A.z_0-9".to_owned() + &"x".repeat(57));
        assert!(parse(&body(v)).is_ok());

        let mut v = example();
        v.as_object_mut().map(|o| o.remove("device_id"));
        assert_eq!(error_of(v), "device_id: missing");
    }

    #[test]
    fn gaps_are_checked_for_order_and_reason() {
        let mut v = example();
        v["gaps"][0]["to_seq"] = json!(10);
        assert_eq!(error_of(v), "gaps[0].to_seq: less than from_seq 40");

        let mut v = example();
        v["gaps"][0]["reason"] = json!("lost");
        assert_eq!(
            error_of(v),
            "gaps[0].reason: not one of journal_full, rejected, journal_lost, expired"
        );

        let mut v = example();
        v["gaps"] = json!({});
        assert_eq!(error_of(v), "gaps: not an array");
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused() {
        let error = |bytes: &[u8]| parse(bytes).map(|_| ()).map_err(|e| e.to_string());
        assert!(error(b"{\"device_id\": ").is_err_and(|e| e.starts_with("body: invalid json")));
        assert_eq!(error(b"[1]"), Err("body: not a json object".to_owned()));
        assert_eq!(
            error(br#"{"device_id": "d", "records": {}}"#),
            Err("records: not an array".to_owned())
        );
    }

    fn fingerprint_of(record: Value) -> u64 {
        let batch =
            parse(&body(json!({"device_id": "d", "records": [record]}))).expect("valid batch");
        batch.records[0].fingerprint
    }

    #[test]
    fn the_fingerprint_ignores_how_the_same_content_is_written() {
        let reference = fingerprint_of(json!(
            {"seq": 1, "ts_ms": 5, "topic": "t", "payload": {"a": 1, "b": [1.5, null]}}));
        let rewritten = br#"{"device_id":"d","records":[
            { "payload" : {"b":[1.50, null] , "a":1}, "topic":"t", "ts_ms":5, "seq":1,
              "parse_error": false, "added_in_v1_1": "x" }]}"#;
        let batch = parse(rewritten).expect("valid batch");
        assert_eq!(batch.records[0].fingerprint, reference);
        // The seq is not content: the same content under another seq has the same fingerprint.
        assert_eq!(
            fingerprint_of(json!(
                {"seq": 9, "ts_ms": 5, "topic": "t", "payload": {"b": [1.5, null], "a": 1}})),
            reference
        );
    }

    #[test]
    fn the_fingerprint_tells_every_part_of_the_content_apart() {
        let base = json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload": "5"});
        let variants = [
            json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload_text": "5"}),
            json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload": 5}),
            json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload_b64": "IjUi"}),
            json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload": "5", "parse_error": true}),
            json!({"seq": 1, "ts_ms": 6, "topic": "t", "payload": "5"}),
            json!({"seq": 1, "ts_ms": 5, "topic": "u", "payload": "5"}),
            json!({"seq": 1, "ts_ms": 5, "topic": "t", "payload": "6"}),
        ];
        let mut seen = vec![fingerprint_of(base)];
        for variant in variants {
            let fingerprint = fingerprint_of(variant.clone());
            assert!(
                !seen.contains(&fingerprint),
                "{variant} hashes like another"
            );
            seen.push(fingerprint);
        }
        // Length prefixes keep the boundary between topic and payload.
        assert_ne!(
            fingerprint_of(json!({"seq": 1, "ts_ms": 5, "topic": "ab", "payload_text": "c"})),
            fingerprint_of(json!({"seq": 1, "ts_ms": 5, "topic": "a", "payload_text": "bc"}))
        );
    }

    #[test]
    fn a_stored_line_reads_back_with_the_fingerprint_it_was_received_with() {
        let batch = parse(&body(example())).expect("valid batch");
        for record in &batch.records {
            assert_eq!(
                stored_record(record.line.as_bytes()),
                Ok(Stored {
                    seq: record.seq,
                    fingerprint: record.fingerprint,
                    upstream_gap: false,
                }),
                "{}",
                record.line
            );
        }
        assert_eq!(
            stored_record(b"{\"seq\": 1}").map_err(|e| e.to_string()),
            Err("record.ts_ms: missing".to_owned())
        );
    }

    #[test]
    fn the_reject_marker_is_found_in_every_payload_form() {
        let batch = parse(&body(json!({"device_id": "d", "records": [
            {"seq": 1, "ts_ms": 0, "topic": "t", "payload": {"k": "POISON"}},
            {"seq": 2, "ts_ms": 0, "topic": "t", "payload_text": "a POISON b"},
            {"seq": 3, "ts_ms": 0, "topic": "t", "payload_b64": "UE9JU09O"},
            {"seq": 4, "ts_ms": 0, "topic": "POISON", "payload_text": "clean"}]})))
        .expect("valid batch");
        let hits: Vec<bool> = batch
            .records
            .iter()
            .map(|r| r.payload_contains("POISON"))
            .collect();
        assert_eq!(hits, vec![true, true, true, false]);
    }
}
