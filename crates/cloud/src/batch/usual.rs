//! The fast path of [`parse`](super::parse): a batch in the shape agents send, deserialized
//! straight into borrowed fields and each line written out without building a `Value` tree. Gives
//! exactly what [`parse_general`](super::parse_general) gives for what it accepts, and `None` for
//! anything else, valid or not (a test in `super` compares the two).

use std::borrow::Cow;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::{
    Batch, Form, PayloadView, Record, fingerprint, is_valid_device_id, parse_gap, parse_held,
    payload_bytes, write_json,
};

/// A record in the shape agents send: the known fields only, each at most once. Fields are
/// deserialized straight into these (a string borrowed from the body when it has no escapes), not
/// into a map of `Value`s; the JSON payload is the only `Value`. Anything else goes to
/// [`parse_general`].
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsualRecord<'a> {
    seq: u64,
    ts_ms: u64,
    #[serde(borrow)]
    topic: Cow<'a, str>,
    // `Some` whenever the key is there, `null` too: key presence is what names the form.
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<Json<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload_text: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload_b64: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "present")]
    parse_error: Option<bool>,
}

#[derive(serde::Deserialize)]
struct UsualBatch<'a> {
    #[serde(borrow)]
    device_id: Cow<'a, str>,
    #[serde(borrow)]
    records: Vec<UsualRecord<'a>>,
    #[serde(default, deserialize_with = "present")]
    gaps: Option<Vec<Value>>,
    #[serde(default, deserialize_with = "present")]
    held: Option<Value>,
}

/// A field that is there, whatever its value (`null` included): `Some`; absent: `None` (by
/// `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The fast path of [`parse`] for a batch of the usual shape; `None` for anything else, valid or
/// not, which [`parse_general`] then reads (and explains). For what it accepts it gives exactly
/// what [`parse_general`] gives (a test compares them).
pub(super) fn parse_usual(body: &[u8]) -> Option<Batch> {
    let usual: UsualBatch<'_> = serde_json::from_slice(body).ok()?;
    if !is_valid_device_id(&usual.device_id) {
        return None;
    }
    let mut records = Vec::with_capacity(usual.records.len());
    let mut previous: Option<u64> = None;
    for r in usual.records {
        if r.seq == 0 || previous.is_some_and(|p| r.seq <= p) {
            return None;
        }
        previous = Some(r.seq);
        records.push(usual_record(r)?);
    }
    let gaps = usual
        .gaps
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, item)| parse_gap(i, item).ok())
        .collect::<Option<Vec<_>>>()?;
    let held = match usual.held {
        None => None,
        Some(value) => Some(parse_held(value).ok()?),
    };
    Some(Batch {
        device_id: usual.device_id.into_owned(),
        records,
        gaps,
        held,
    })
}

/// A usual record, its line written in the order serde_json writes the object's keys (sorted:
/// `parse_error`, `payload`, `payload_b64`, `payload_text`, `seq`, `topic`, `ts_ms`).
fn usual_record(mut r: UsualRecord<'_>) -> Option<Record> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    if let Some(flag) = r.parse_error {
        out.extend_from_slice(if flag {
            b"\"parse_error\":true,"
        } else {
            b"\"parse_error\":false,"
        });
    }
    let (form, span) = match (&mut r.payload, &r.payload_b64, &r.payload_text) {
        (Some(value), None, None) => {
            out.extend_from_slice(b"\"payload\":");
            let start = out.len();
            value.write_canonical(&mut out);
            (Form::Json, start..out.len())
        }
        (None, Some(encoded), None) => {
            let bytes = STANDARD.decode(encoded.as_bytes()).ok()?;
            out.extend_from_slice(b"\"payload_b64\":");
            write_json(&mut out, encoded.as_ref());
            (Form::Bytes(bytes), 0..0)
        }
        (None, None, Some(text)) => {
            out.extend_from_slice(b"\"payload_text\":");
            write_json(&mut out, text.as_ref());
            (Form::Text(text), 0..0)
        }
        _ => return None,
    };
    out.extend_from_slice(b",\"seq\":");
    write_json(&mut out, &r.seq);
    out.extend_from_slice(b",\"topic\":");
    write_json(&mut out, r.topic.as_ref());
    out.extend_from_slice(b",\"ts_ms\":");
    write_json(&mut out, &r.ts_ms);
    out.push(b'}');
    let line = String::from_utf8(out).ok()?;
    let payload = match form {
        Form::Json => PayloadView::Json(span),
        Form::Text(text) => PayloadView::Text(text.to_owned()),
        Form::Bytes(bytes) => PayloadView::Bytes(bytes),
    };
    let fingerprint = fingerprint(
        &r.topic,
        r.ts_ms,
        &payload_bytes(&payload, &line),
        r.parse_error.unwrap_or(false),
    );
    Some(Record {
        seq: r.seq,
        line,
        fingerprint,
        ts_ms: r.ts_ms,
        upstream_gap: super::is_upstream_gap(&r.topic),
        payload,
    })
}

/// A JSON value as the fast path reads a payload: strings borrowed from the body where they have
/// no escapes, objects as lists of entries; written out exactly as serde_json writes the `Value`
/// of the same text ([`Json::write_canonical`]), without building that `Value`'s maps and strings.
#[derive(Debug)]
enum Json<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'de> serde::Deserialize<'de> for Json<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        // As serde_json's own `Value`: a number that is not finite is `null`.
        Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            entries.push((key.0, map.next_value()?));
        }
        Ok(Json::Object(entries))
    }
}

/// An object key, borrowed from the body where it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::String(s) => Ok(Key(s)),
            _ => Err(serde::de::Error::custom("an object key is not a string")),
        }
    }
}

impl Json<'_> {
    /// Appends what serde_json writes for the `Value` of this text: compact, object keys sorted
    /// (byte order, as a `BTreeMap<String, _>`), of a repeated key the last value.
    fn write_canonical(&mut self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Number(n) => write_json(out, n),
            Json::String(s) => write_json(out, s.as_ref()),
            Json::Array(items) => {
                out.push(b'[');
                for (n, item) in items.iter_mut().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    item.write_canonical(out);
                }
                out.push(b']');
            }
            Json::Object(entries) => {
                // Stable: of equal keys the last one stays last, and is the one written.
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(b'{');
                let mut first = true;
                let count = entries.len();
                for i in 0..count {
                    if entries
                        .get(i + 1)
                        .is_some_and(|next| next.0 == entries[i].0)
                    {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    let (key, value) = &mut entries[i];
                    write_json(out, key.as_ref());
                    out.push(b':');
                    value.write_canonical(out);
                }
                out.push(b'}');
            }
        }
    }
}
