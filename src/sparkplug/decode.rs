//! Sparkplug B payloads (Eclipse Sparkplug 3.0, `sparkplug_b.proto`) decoded to JSON: a small
//! protobuf reader, no generated code. Pure; bytes from the network never panic it and never make
//! it recurse deeper than [`MAX_DEPTH`]. The JSON it builds is larger than the bytes (a few hundred
//! bytes of `Value` per field, 8 elements per byte of a boolean array): it decodes payloads of at
//! most [`MAX_PAYLOAD`] bytes (larger ones are an error: `classify` journals them raw), and an
//! array of more than [`MAX_ARRAY`] elements goes as base64, so one payload decodes to tens of MiB
//! at most, for as long as its upload is encoded.
//!
//! Everything the payload carries is kept: every metric with its name or alias, timestamp,
//! datatype, flags, metadata and properties, values of every datatype (datasets, templates and
//! property sets as nested JSON, arrays as JSON arrays, bytes and files as base64, floats that JSON
//! cannot hold as strings). Fields this reader does not know (extensions) are kept as base64
//! under `"unknown_fields"`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

/// Deepest nesting of templates, datasets and property sets accepted.
pub const MAX_DEPTH: usize = 16;
/// Largest payload decoded.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Most elements of an array value decoded (more: the value goes as `value_b64`).
pub const MAX_ARRAY: usize = 65_536;

/// Why bytes are not a Sparkplug B payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sparkplug B payload: {0}")]
pub struct Invalid(pub String);

fn invalid(what: impl Into<String>) -> Invalid {
    Invalid(what.into())
}

/// One protobuf field as read off the wire.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Reads the fields of one protobuf message in order.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields { rest: bytes }
    }

    fn varint(&mut self) -> Result<u64, Invalid> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .rest
                .split_first()
                .ok_or_else(|| invalid("a varint runs past the end"))?;
            self.rest = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid("a varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if self.rest.len() < n {
            return Err(invalid("a field runs past the end"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), Invalid>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let number =
                u32::try_from(key >> 3).map_err(|_| invalid("a field number too large"))?;
            let wire = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => Wire::Fixed64(u64::from_le_bytes(
                    self.take(8)?.try_into().map_err(|_| invalid("fixed64"))?,
                )),
                2 => {
                    let n = usize::try_from(self.varint()?)
                        .map_err(|_| invalid("a length too large"))?;
                    Wire::Bytes(self.take(n)?)
                }
                5 => Wire::Fixed32(u32::from_le_bytes(
                    self.take(4)?.try_into().map_err(|_| invalid("fixed32"))?,
                )),
                t => return Err(invalid(format!("wire type {t} of field {number}"))),
            };
            if number == 0 {
                return Err(invalid("field number 0"));
            }
            Ok((number, wire))
        })();
        if field.is_err() {
            // Stop after the first error.
            self.rest = &[];
        }
        Some(field)
    }
}

fn uint(w: Wire<'_>, what: &str) -> Result<u64, Invalid> {
    match w {
        Wire::Varint(v) => Ok(v),
        _ => Err(invalid(format!("{what} is not a varint"))),
    }
}

fn bytes<'a>(w: Wire<'a>, what: &str) -> Result<&'a [u8], Invalid> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(invalid(format!("{what} is not length-delimited"))),
    }
}

fn string(w: Wire<'_>, what: &str) -> Result<String, Invalid> {
    String::from_utf8(bytes(w, what)?.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn float(w: Wire<'_>, what: &str) -> Result<Value, Invalid> {
    match w {
        Wire::Fixed32(b) => Ok(number(f64::from(f32::from_bits(b)))),
        _ => Err(invalid(format!("{what} is not a fixed32"))),
    }
}

fn double(w: Wire<'_>, what: &str) -> Result<Value, Invalid> {
    match w {
        Wire::Fixed64(b) => Ok(number(f64::from_bits(b))),
        _ => Err(invalid(format!("{what} is not a fixed64"))),
    }
}

/// A float as JSON: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`, which JSON cannot hold.
fn number(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(
        || {
            Value::String(if f.is_nan() {
                "NaN".into()
            } else if f > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            })
        },
        Value::Number,
    )
}

fn b64(b: &[u8]) -> Value {
    Value::String(STANDARD.encode(b))
}

/// Keeps a field this reader does not know, so that nothing is dropped.
fn keep_unknown(obj: &mut Map<String, Value>, number: u32, w: Wire<'_>) {
    let v = match w {
        Wire::Varint(v) | Wire::Fixed64(v) => json!({"field": number, "value": v}),
        Wire::Fixed32(v) => json!({"field": number, "value": v}),
        Wire::Bytes(b) => json!({"field": number, "b64": STANDARD.encode(b)}),
    };
    if let Value::Array(a) = obj
        .entry("unknown_fields")
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        a.push(v);
    }
}

/// The Sparkplug B datatype names, by number (3.0, section 6.4.16).
pub fn datatype_name(t: u64) -> Option<&'static str> {
    const NAMES: [&str; 35] = [
        "Unknown",
        "Int8",
        "Int16",
        "Int32",
        "Int64",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "Float",
        "Double",
        "Boolean",
        "String",
        "DateTime",
        "Text",
        "UUID",
        "DataSet",
        "Bytes",
        "File",
        "Template",
        "PropertySet",
        "PropertySetList",
        "Int8Array",
        "Int16Array",
        "Int32Array",
        "Int64Array",
        "UInt8Array",
        "UInt16Array",
        "UInt32Array",
        "UInt64Array",
        "FloatArray",
        "DoubleArray",
        "BooleanArray",
        "StringArray",
        "DateTimeArray",
    ];
    usize::try_from(t).ok().and_then(|i| NAMES.get(i)).copied()
}

/// An `int_value` (uint32 on the wire) as the signed or unsigned type `datatype` says.
fn int_value(v: u64, datatype: Option<u64>) -> Value {
    let v32 = v as u32;
    match datatype {
        Some(1) => json!(v32 as u8 as i8),
        Some(2) => json!(v32 as u16 as i16),
        Some(3) => json!(v32 as i32),
        _ => json!(v32),
    }
}

/// A `long_value` (uint64 on the wire) as signed for Int64 (and the signed smaller types some
/// implementations put there), unsigned otherwise.
fn long_value(v: u64, datatype: Option<u64>) -> Value {
    match datatype {
        Some(1..=4) => json!(v as i64),
        _ => json!(v),
    }
}

/// An array datatype's `bytes_value` (little-endian packed, Sparkplug 3.0 6.4.17) as a JSON
/// array; `None` when the bytes do not fit the type.
fn array_value(t: u64, b: &[u8]) -> Option<Value> {
    // At most 8 elements per byte (a boolean array).
    if b.len() > MAX_ARRAY / 8 && t == 32 || b.len() > MAX_ARRAY {
        return None;
    }
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> Value) -> Option<Value> {
        if b.len() % N != 0 {
            return None;
        }
        Some(Value::Array(
            b.chunks_exact(N)
                .map(|c| f(c.try_into().unwrap_or([0; N])))
                .collect(),
        ))
    }
    match t {
        22 => each::<1>(b, |c| json!(c[0] as i8)),
        23 => each::<2>(b, |c| json!(i16::from_le_bytes(c))),
        24 => each::<4>(b, |c| json!(i32::from_le_bytes(c))),
        25 => each::<8>(b, |c| json!(i64::from_le_bytes(c))),
        26 => each::<1>(b, |c| json!(c[0])),
        27 => each::<2>(b, |c| json!(u16::from_le_bytes(c))),
        28 => each::<4>(b, |c| json!(u32::from_le_bytes(c))),
        29 => each::<8>(b, |c| json!(u64::from_le_bytes(c))),
        30 => each::<4>(b, |c| number(f64::from(f32::from_le_bytes(c)))),
        31 => each::<8>(b, |c| number(f64::from_le_bytes(c))),
        32 => {
            // A 4-byte count, then the bits, most significant first.
            let count = usize::try_from(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)).ok()?;
            let bits = b.get(4..)?;
            if count > bits.len() * 8 {
                return None;
            }
            Some(Value::Array(
                (0..count)
                    .map(|i| json!(bits[i / 8] & (0x80 >> (i % 8)) != 0))
                    .collect(),
            ))
        }
        33 => {
            // NUL-terminated UTF-8 strings.
            let body = b.strip_suffix(&[0])?;
            body.split(|&c| c == 0)
                .map(|s| std::str::from_utf8(s).ok().map(|s| json!(s)))
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        }
        34 => each::<8>(b, |c| json!(i64::from_le_bytes(c))),
        _ => None,
    }
}

/// Decodes a whole payload.
pub fn payload(b: &[u8]) -> Result<Value, Invalid> {
    if b.len() > MAX_PAYLOAD {
        return Err(invalid(format!(
            "{} bytes, more than the {MAX_PAYLOAD} decoded",
            b.len()
        )));
    }
    let mut out = Map::new();
    let mut metrics = Vec::new();
    for f in Fields::new(b) {
        let (n, w) = f?;
        match n {
            1 => {
                out.insert("timestamp".into(), json!(uint(w, "timestamp")?));
            }
            2 => metrics.push(metric(bytes(w, "metric")?, 0)?),
            3 => {
                out.insert("seq".into(), json!(uint(w, "seq")?));
            }
            4 => {
                out.insert("uuid".into(), json!(string(w, "uuid")?));
            }
            5 => {
                out.insert("body_b64".into(), b64(bytes(w, "body")?));
            }
            _ => keep_unknown(&mut out, n, w),
        }
    }
    out.insert("metrics".into(), Value::Array(metrics));
    Ok(Value::Object(out))
}

fn deeper(depth: usize) -> Result<usize, Invalid> {
    if depth >= MAX_DEPTH {
        return Err(invalid(format!("nested deeper than {MAX_DEPTH}")));
    }
    Ok(depth + 1)
}

/// One metric (`Payload.Metric`).
fn metric(b: &[u8], depth: usize) -> Result<Value, Invalid> {
    let depth = deeper(depth)?;
    // The datatype decides how a value reads, and may come after it: find it first.
    let mut datatype = None;
    for f in Fields::new(b) {
        if let (4, Wire::Varint(t)) = f? {
            datatype = Some(t);
        }
    }
    let mut out = Map::new();
    for f in Fields::new(b) {
        let (n, w) = f?;
        let value = match n {
            1 => json!(string(w, "metric name")?),
            2 => json!(uint(w, "alias")?),
            3 => json!(uint(w, "metric timestamp")?),
            4 => {
                let t = uint(w, "datatype")?;
                match datatype_name(t) {
                    Some(name) => json!(name),
                    None => json!(t),
                }
            }
            5..=7 => json!(uint(w, "flag")? != 0),
            8 => metadata(bytes(w, "metadata")?)?,
            9 => property_set(bytes(w, "properties")?, depth)?,
            10 => int_value(uint(w, "int_value")?, datatype),
            11 => long_value(uint(w, "long_value")?, datatype),
            12 => float(w, "float_value")?,
            13 => double(w, "double_value")?,
            14 => json!(uint(w, "boolean_value")? != 0),
            15 => json!(string(w, "string_value")?),
            16 => {
                let raw = bytes(w, "bytes_value")?;
                match datatype.and_then(|t| array_value(t, raw)) {
                    Some(array) => array,
                    None => {
                        out.insert("value_b64".into(), b64(raw));
                        continue;
                    }
                }
            }
            17 => dataset(bytes(w, "dataset_value")?)?,
            18 => template(bytes(w, "template_value")?, depth)?,
            _ => {
                keep_unknown(&mut out, n, w);
                continue;
            }
        };
        let key = match n {
            1 => "name",
            2 => "alias",
            3 => "timestamp",
            4 => "datatype",
            5 => "is_historical",
            6 => "is_transient",
            7 => "is_null",
            8 => "metadata",
            9 => "properties",
            _ => "value",
        };
        out.insert(key.into(), value);
    }
    Ok(Value::Object(out))
}

fn metadata(b: &[u8]) -> Result<Value, Invalid> {
    let mut out = Map::new();
    for f in Fields::new(b) {
        let (n, w) = f?;
        let (key, value) = match n {
            1 => ("is_multi_part", json!(uint(w, "is_multi_part")? != 0)),
            2 => ("content_type", json!(string(w, "content_type")?)),
            3 => ("size", json!(uint(w, "size")?)),
            4 => ("seq", json!(uint(w, "metadata seq")?)),
            5 => ("file_name", json!(string(w, "file_name")?)),
            6 => ("file_type", json!(string(w, "file_type")?)),
            7 => ("md5", json!(string(w, "md5")?)),
            8 => ("description", json!(string(w, "description")?)),
            _ => {
                keep_unknown(&mut out, n, w);
                continue;
            }
        };
        out.insert(key.into(), value);
    }
    Ok(Value::Object(out))
}

/// A `PropertySet` as an object of `{key: {type, value}}`, in order.
fn property_set(b: &[u8], depth: usize) -> Result<Value, Invalid> {
    let depth = deeper(depth)?;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut out = Map::new();
    for f in Fields::new(b) {
        match f? {
            (1, w) => keys.push(string(w, "property key")?),
            (2, w) => values.push(property_value(bytes(w, "property value")?, depth)?),
            (n, w) => keep_unknown(&mut out, n, w),
        }
    }
    if keys.len() != values.len() {
        return Err(invalid(format!(
            "a property set with {} keys and {} values",
            keys.len(),
            values.len()
        )));
    }
    for (k, v) in keys.into_iter().zip(values) {
        out.insert(k, v);
    }
    Ok(Value::Object(out))
}

fn property_value(b: &[u8], depth: usize) -> Result<Value, Invalid> {
    let depth = deeper(depth)?;
    let mut datatype = None;
    for f in Fields::new(b) {
        if let (1, Wire::Varint(t)) = f? {
            datatype = Some(t);
        }
    }
    let mut out = Map::new();
    for f in Fields::new(b) {
        let (n, w) = f?;
        let value = match n {
            1 => {
                let t = uint(w, "property type")?;
                out.insert(
                    "type".into(),
                    datatype_name(t).map_or_else(|| json!(t), |name| json!(name)),
                );
                continue;
            }
            2 => {
                out.insert("is_null".into(), json!(uint(w, "is_null")? != 0));
                continue;
            }
            3 => int_value(uint(w, "int_value")?, datatype),
            4 => long_value(uint(w, "long_value")?, datatype),
            5 => float(w, "float_value")?,
            6 => double(w, "double_value")?,
            7 => json!(uint(w, "boolean_value")? != 0),
            8 => json!(string(w, "string_value")?),
            9 => property_set(bytes(w, "propertyset_value")?, depth)?,
            10 => {
                let mut sets = Vec::new();
                for f in Fields::new(bytes(w, "propertysets_value")?) {
                    match f? {
                        (1, w) => sets.push(property_set(bytes(w, "property set")?, depth)?),
                        (n, w) => keep_unknown(&mut out, n, w),
                    }
                }
                Value::Array(sets)
            }
            _ => {
                keep_unknown(&mut out, n, w);
                continue;
            }
        };
        out.insert("value".into(), value);
    }
    Ok(Value::Object(out))
}

/// A `DataSet` as `{num_of_columns, columns, types, rows: [[value...]...]}`.
fn dataset(b: &[u8]) -> Result<Value, Invalid> {
    let mut out = Map::new();
    let mut columns = Vec::new();
    let mut types: Vec<u64> = Vec::new();
    let mut rows = Vec::new();
    // Rows read after the types (they may come in any order): keep them raw first.
    let mut raw_rows = Vec::new();
    for f in Fields::new(b) {
        match f? {
            (1, w) => {
                out.insert("num_of_columns".into(), json!(uint(w, "num_of_columns")?));
            }
            (2, w) => columns.push(json!(string(w, "column")?)),
            (3, Wire::Varint(t)) => types.push(t),
            // Packed repeated uint32.
            (3, Wire::Bytes(packed)) => {
                let mut p = Fields::new(packed);
                while !p.rest.is_empty() {
                    types.push(p.varint()?);
                }
            }
            (4, w) => raw_rows.push(bytes(w, "row")?),
            (n, w) => keep_unknown(&mut out, n, w),
        }
    }
    for row in raw_rows {
        let mut elements = Vec::new();
        for f in Fields::new(row) {
            match f? {
                (1, w) => {
                    let t = types.get(elements.len()).copied();
                    elements.push(dataset_value(bytes(w, "dataset value")?, t)?);
                }
                (n, w) => keep_unknown(&mut out, n, w),
            }
        }
        rows.push(Value::Array(elements));
    }
    out.insert("columns".into(), Value::Array(columns));
    out.insert(
        "types".into(),
        Value::Array(
            types
                .iter()
                .map(|&t| datatype_name(t).map_or_else(|| json!(t), |name| json!(name)))
                .collect(),
        ),
    );
    out.insert("rows".into(), Value::Array(rows));
    Ok(Value::Object(out))
}

fn dataset_value(b: &[u8], datatype: Option<u64>) -> Result<Value, Invalid> {
    let mut value = Value::Null;
    for f in Fields::new(b) {
        let (n, w) = f?;
        value = match n {
            1 => int_value(uint(w, "int_value")?, datatype),
            2 => long_value(uint(w, "long_value")?, datatype),
            3 => float(w, "float_value")?,
            4 => double(w, "double_value")?,
            5 => json!(uint(w, "boolean_value")? != 0),
            6 => json!(string(w, "string_value")?),
            _ => {
                let mut unknown = Map::new();
                keep_unknown(&mut unknown, n, w);
                Value::Object(unknown)
            }
        };
    }
    Ok(value)
}

/// A `Template`: `{version, template_ref, is_definition, metrics, parameters}`.
fn template(b: &[u8], depth: usize) -> Result<Value, Invalid> {
    let depth = deeper(depth)?;
    let mut out = Map::new();
    let mut metrics = Vec::new();
    let mut parameters = Vec::new();
    for f in Fields::new(b) {
        match f? {
            (1, w) => {
                out.insert("version".into(), json!(string(w, "version")?));
            }
            (2, w) => metrics.push(metric(bytes(w, "template metric")?, depth)?),
            (3, w) => parameters.push(parameter(bytes(w, "parameter")?)?),
            (4, w) => {
                out.insert("template_ref".into(), json!(string(w, "template_ref")?));
            }
            (5, w) => {
                out.insert(
                    "is_definition".into(),
                    json!(uint(w, "is_definition")? != 0),
                );
            }
            (n, w) => keep_unknown(&mut out, n, w),
        }
    }
    out.insert("metrics".into(), Value::Array(metrics));
    out.insert("parameters".into(), Value::Array(parameters));
    Ok(Value::Object(out))
}

fn parameter(b: &[u8]) -> Result<Value, Invalid> {
    let mut datatype = None;
    for f in Fields::new(b) {
        if let (2, Wire::Varint(t)) = f? {
            datatype = Some(t);
        }
    }
    let mut out = Map::new();
    for f in Fields::new(b) {
        let (n, w) = f?;
        let (key, value) = match n {
            1 => ("name", json!(string(w, "parameter name")?)),
            2 => {
                let t = uint(w, "parameter type")?;
                (
                    "type",
                    datatype_name(t).map_or_else(|| json!(t), |name| json!(name)),
                )
            }
            3 => ("value", int_value(uint(w, "int_value")?, datatype)),
            4 => ("value", long_value(uint(w, "long_value")?, datatype)),
            5 => ("value", float(w, "float_value")?),
            6 => ("value", double(w, "double_value")?),
            7 => ("value", json!(uint(w, "boolean_value")? != 0)),
            8 => ("value", json!(string(w, "string_value")?)),
            _ => {
                keep_unknown(&mut out, n, w);
                continue;
            }
        };
        out.insert(key.into(), value);
    }
    Ok(Value::Object(out))
}
