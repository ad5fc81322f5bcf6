//! Bad input, fuzzed: property tests that feed every parser of outside bytes random and damaged input.
//!
//! Covered: the config file (TOML, sizes, durations), MQTT payload classification and topic filters,
//! journal values and the seq mark as read from disk, the cloud's answers to an upload (over a real
//! loopback socket, through ureq), the cloud's batch validation, the serial console (line editor,
//! command parser, `set KEY VALUE`) and the downlink's command frames. Each property asserts: no panic,
//! no allocation out of proportion to the input (a counting global allocator records the largest
//! single allocation of the thread under test), `Ok` or an error that says what and where, and
//! encode→decode identity where a codec has both halves.
//!
//! Generators mix fully random bytes with structure-aware damage to valid inputs (a config with one
//! value replaced, an encoded record with bytes flipped, cut or extended, an HTTP response with an odd
//! status line, `Retry-After`, `Content-Length` or body).
//!
//! # Running
//! `make test` runs a short pass (`FERRY_FUZZ_CASES`, default 256 cases for the cheap targets, fewer for
//! the socket and config targets); `make fuzz` runs a long one (`make fuzz CASES=100000`). Each test
//! prints `fuzz seed=N` (shown when it fails, with proptest's minimal failing input); replay a failure
//! with `FERRY_FUZZ_SEED=N cargo test --test fuzz NAME`. Nothing is written to disk on failure: a real
//! bug gets a named regression test beside the code it breaks.
//!
//! # Adding a target
//! Write a `proptest!` block below with `#![proptest_config(config(WEIGHT))]` (weight 1 for pure
//! functions, larger for targets that cost a socket or a file per case), one strategy of random bytes
//! and one of damaged valid input, and wrap the call under test in `bounded(input_len, || ...)`, which
//! fails the case if it allocated more than `ALLOC_BASE + ALLOC_PER_BYTE * input_len` at once. The
//! parser should be a pure public function; if it is buried in I/O, extract it first (as
//! `uplink::post` and `journal::mark::newest` were).
//!
//! Why one file of this length: one test binary, so that `make fuzz` runs every property at once;
//! one section per parser of outside bytes.
#![allow(clippy::unwrap_used)]
// The counting allocator implements `GlobalAlloc`, an unsafe trait: it only forwards to `System` and
// records sizes in a thread-local. Nothing else in this file is unsafe.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};

use ferry::config::{Config, PayloadFormat, units};
use ferry::fuzzing::payload;
use ferry::fuzzing::uplink::{self, Answer, MAX_RESPONSE_BODY, Upload};
use ferry::journal::fuzzing::codec::{self, DeadHeader};
use ferry::journal::fuzzing::mark::{self, Mark, SLOT};
use ferry::journal::{Entry, NewRecord, Record, StoredFormat};
use ferry::protocol::GapReason;
use ferry_cloud::batch as cloud_batch;

// ---- the counting allocator -----------------------------------------------------------------------

struct Counting;

thread_local! {
    /// The largest single allocation (or reallocation) made by this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator also runs while a thread's locals are being torn down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allowance for fixed-size buffers (ureq's 128 KiB I/O buffers, serde's scratch space).
const ALLOC_BASE: usize = 1 << 20;
/// Allowance per input byte: a parsed tree costs a few dozen bytes per input byte, doubled by `Vec`
/// growth. A garbage length prefix would ask for gigabytes, far beyond this.
const ALLOC_PER_BYTE: usize = 64;

/// Runs `f` and fails the case if any single allocation it made on this thread exceeded the bound
/// for an input of `input_len` bytes.
fn bounded<R>(input_len: usize, f: impl FnOnce() -> R) -> Result<R, TestCaseError> {
    LARGEST.with(|l| l.set(0));
    let out = f();
    let largest = LARGEST.with(Cell::get);
    let bound = ALLOC_BASE + ALLOC_PER_BYTE * input_len;
    prop_assert!(
        largest <= bound,
        "largest single allocation {largest} bytes for {input_len} bytes of input (bound {bound})"
    );
    Ok(out)
}

#[test]
fn the_allocation_bound_catches_a_garbage_length() {
    // What a decoder trusting a length prefix of 2^24 would do: the check must fail the case.
    let claimed = std::hint::black_box(16usize << 20);
    let caught = bounded(8, || Vec::<u8>::with_capacity(claimed).capacity());
    assert!(
        caught.is_err(),
        "a 16 MiB allocation for 8 bytes of input passed"
    );
    assert!(bounded(8, || Vec::<u8>::with_capacity(64).capacity()).is_ok());
}

// ---- case counts and seeds ------------------------------------------------------------------------

/// Cases for a target of `weight` (1 = cheap and pure): `FERRY_FUZZ_CASES / weight`, at least 8.
fn config(weight: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let seed = *SEED.get_or_init(|| {
        std::env::var("FERRY_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                t.as_nanos() as u64 ^ u64::from(std::process::id())
            })
    });
    eprintln!("fuzz seed={seed} (replay: FERRY_FUZZ_SEED={seed})");
    ProptestConfig {
        cases: (cases / weight).max(8),
        rng_seed: RngSeed::Fixed(seed),
        // The seed and the minimal failing input are printed; nothing is written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

static SEED: OnceLock<u64> = OnceLock::new();

// ---- shared strategies ----------------------------------------------------------------------------

/// Fully random bytes, mostly short, sometimes up to 64 KiB.
fn random_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..256),
        1 => proptest::collection::vec(any::<u8>(), 0..65_536),
    ]
}

/// How a valid input is damaged.
#[derive(Debug, Clone)]
enum Damage {
    /// Overwrite the byte at (index mod len).
    Set(usize, u8),
    /// XOR one bit.
    Flip(usize, u8),
    /// Cut at (index mod len + 1).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Insert a run of 0xff (a huge varint) at (index mod len + 1).
    HugeLength(usize, usize),
    /// Remove the byte at (index mod len).
    Remove(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
        (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Damage::Flip(i, bit)),
        any::<usize>().prop_map(Damage::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Extend),
        (any::<usize>(), 1usize..12).prop_map(|(i, n)| Damage::HugeLength(i, n)),
        any::<usize>().prop_map(Damage::Remove),
    ]
}

fn apply(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        let len = bytes.len();
        match d {
            Damage::Set(i, b) if len > 0 => bytes[i % len] = *b,
            Damage::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
            Damage::Truncate(i) => bytes.truncate(i % (len + 1)),
            Damage::Extend(tail) => bytes.extend_from_slice(tail),
            Damage::HugeLength(i, n) => {
                let at = i % (len + 1);
                bytes.splice(at..at, std::iter::repeat_n(0xff, *n));
            }
            Damage::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            _ => {}
        }
    }
    bytes
}

fn damages() -> impl Strategy<Value = Vec<Damage>> {
    proptest::collection::vec(damage(), 1..4)
}

fn stored_format() -> impl Strategy<Value = StoredFormat> {
    prop_oneof![
        Just(StoredFormat::Json),
        Just(StoredFormat::Text),
        Just(StoredFormat::Raw)
    ]
}

fn gap_reason() -> impl Strategy<Value = GapReason> {
    prop_oneof![
        Just(GapReason::JournalFull),
        Just(GapReason::Rejected),
        Just(GapReason::JournalLost)
    ]
}

fn new_record() -> impl Strategy<Value = NewRecord> {
    (
        any::<u64>(),
        ".{0,40}",
        proptest::collection::vec(any::<u8>(), 0..300),
        stored_format(),
        any::<bool>(),
    )
        .prop_map(|(ts_ms, topic, payload, format, parse_error)| NewRecord {
            ts_ms,
            topic,
            payload,
            format,
            parse_error,
            mono: None,
            too_large: None,
            mqtt: None,
        })
}

// ---- config: sizes, durations, the TOML file ------------------------------------------------------

/// A size or duration as someone might mistype it: digits, maybe a space, a unit-like word.
fn unit_text() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        "[0-9]{1,3}",
        "[0-9]{15,25}",
        Just(String::new()),
        "[-+.0-9_e]{1,6}",
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
    ];
    let space = prop_oneof![Just(""), Just(" "), Just("  "), Just("\t")];
    let unit = prop_oneof![
        Just("".to_string()),
        "(B|KiB|MiB|GiB|TiB|KB|kib|ms|s|m|h|d|us|S)",
        ".{0,4}",
    ];
    (number, space, unit).prop_map(|(n, s, u)| format!("{n}{s}{u}"))
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn sizes_and_durations_parse_or_name_the_text(text in prop_oneof![unit_text(), ".{0,40}"]) {
        let (size, duration) = bounded(text.len(), || {
            (units::parse_size(&text), units::parse_duration(&text))
        })?;
        let quoted = format!("{text:?}");
        match size {
            Ok(v) => prop_assert_eq!(units::parse_size(&units::format_size(v)), Ok(v)),
            Err(e) => prop_assert!(e.to_string().contains(&quoted), "{e}"),
        }
        match duration {
            Ok(v) => prop_assert_eq!(units::parse_duration(&units::format_duration(v)), Ok(v)),
            Err(e) => prop_assert!(e.to_string().contains(&quoted), "{e}"),
        }
    }

    #[test]
    fn every_size_and_duration_prints_and_parses_back(bytes in any::<u64>(), ms in any::<u64>()) {
        prop_assert_eq!(units::parse_size(&units::format_size(bytes)), Ok(bytes));
        let d = Duration::from_millis(ms);
        prop_assert_eq!(units::parse_duration(&units::format_duration(d)), Ok(d));
    }
}

const SOURCE: &str = "/etc/ferry/fuzz.toml";

/// A valid config that sets every key.
const FULL_CONFIG: &str = r#"[device]
id = "gw-01"
[mqtt]
host = "broker.local"
port = 8883
topics = ["sensors/#", "plant/+/status"]
client_id = "ferry-test"
username = "agent"
password = "hunter2"
keep_alive = "45s"
max_packet_size = "1MiB"
max_backoff = "2m"
[[mqtt.parse]]
filter = "sensors/#"
format = "json"
[journal]
dir = "/var/lib/ferry"
max_bytes = "2GiB"
on_full = "drop_oldest"
cache_bytes = 8388608
[uplink]
url = "https://cloud.example.com:8443/v1/ingest"
token = "s3cr3t-token"
batch_max_records = 1000
batch_max_bytes = "1 MiB"
compression = "gzip"
max_backoff = "5m"
connect_timeout = "250ms"
request_timeout = "1m"
shutdown_grace = "0s"
max_records_per_sec = 500
max_bytes_per_sec = "1MiB"
[control]
listen = "[::1]:9200"
"#;

/// A TOML value, valid or not, to put where a config value was.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("99999999999999999999".to_string()),
        Just("-0".to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("inf".to_string()),
        Just("nan".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        unit_text().prop_map(|s| format!("{s:?}")),
        ".{0,30}".prop_map(|s| format!("{s:?}")),
        Just(r#""""#.to_string()),
        Just(r#""\u0000""#.to_string()),
        "[a-z:/.\\[\\]0-9]{0,30}".prop_map(|s| format!("{s:?}")),
        Just("1979-05-27T07:32:00Z".to_string()),
        "[^\n]{0,20}",
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|v| {
                let kv: Vec<String> = v.into_iter().map(|(k, x)| format!("{k} = {x}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// How a valid config file is changed.
#[derive(Debug, Clone)]
enum ConfigEdit {
    /// Replace the value on the (index mod n)-th `key = value` line.
    Value(usize, String),
    DeleteLine(usize),
    DuplicateLine(usize),
    /// Add a line with an unknown or misspelt key.
    AddLine(usize, String),
    /// Cut the text at a byte offset (on a char boundary).
    Truncate(usize),
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    prop_oneof![
        6 => (any::<usize>(), toml_value()).prop_map(|(i, v)| ConfigEdit::Value(i, v)),
        1 => any::<usize>().prop_map(ConfigEdit::DeleteLine),
        1 => any::<usize>().prop_map(ConfigEdit::DuplicateLine),
        1 => (any::<usize>(), "[a-z_.\\[\\]]{1,12} = [^\n]{0,12}").prop_map(|(i, l)| ConfigEdit::AddLine(i, l)),
        1 => any::<usize>().prop_map(ConfigEdit::Truncate),
    ]
}

/// Applies `edit`; returns the text and the key whose line was touched, if any.
fn edit_config(text: &str, edit: &ConfigEdit) -> (String, Option<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let n = lines.len();
    let key_of = |line: &str| line.split_once(" = ").map(|(k, _)| k.trim().to_owned());
    match edit {
        ConfigEdit::Value(i, value) => {
            let assignments: Vec<usize> = (0..n).filter(|&j| lines[j].contains(" = ")).collect();
            let Some(&j) = assignments.get(i % assignments.len().max(1)) else {
                return (text.to_owned(), None); // an earlier edit cut every assignment
            };
            let key = key_of(&lines[j]);
            lines[j] = format!("{} = {value}", key.clone().unwrap_or_default());
            (lines.join("\n"), key)
        }
        ConfigEdit::DeleteLine(_) | ConfigEdit::DuplicateLine(_) if n == 0 => {
            (text.to_owned(), None)
        }
        ConfigEdit::DeleteLine(i) => {
            let key = key_of(&lines[i % n]);
            lines.remove(i % n);
            (lines.join("\n"), key)
        }
        ConfigEdit::DuplicateLine(i) => {
            let key = key_of(&lines[i % n]);
            lines.insert(i % n, lines[i % n].clone());
            (lines.join("\n"), key)
        }
        ConfigEdit::AddLine(i, line) => {
            lines.insert(i % (n + 1), line.clone());
            (lines.join("\n"), None)
        }
        ConfigEdit::Truncate(i) => {
            let mut at = i % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            (text[..at].to_owned(), None)
        }
    }
}

/// Checks one config text: `Ok` prints a TOML that reads back to the same printout; an error names
/// the file and says where (a key, or a line and column).
fn check_config(text: &str, touched: Option<&str>) -> Result<(), TestCaseError> {
    let parsed = bounded(text.len(), || Config::parse_str(text, Path::new(SOURCE)))?;
    match parsed {
        Ok(config) => {
            let printed = config.to_masked_toml();
            let again = Config::parse_str(&printed, Path::new(SOURCE));
            prop_assert!(
                again.is_ok(),
                "printout does not parse back: {:?}\n{printed}",
                again.err()
            );
            prop_assert_eq!(again.unwrap().to_masked_toml(), printed);
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.contains(SOURCE), "error does not name the file: {msg}");
            let after_path = msg.split_once(": ").map_or("", |(_, m)| m);
            prop_assert!(!after_path.trim().is_empty(), "empty message: {msg}");
            if let Some(key) = touched {
                // The leaf name is enough: errors write `uplink.url`, `mqtt.parse[0].format` or `url`.
                let leaf = key.rsplit('.').next().unwrap_or(key);
                prop_assert!(
                    msg.contains(leaf) || msg.contains("line "),
                    "error names neither the key {key} nor a position: {msg}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(4))]

    #[test]
    fn random_config_text_gives_a_config_or_an_error_naming_the_file(text in ".{0,200}") {
        check_config(&text, None)?;
    }

    #[test]
    fn a_damaged_valid_config_gives_a_config_or_an_error_naming_the_key(
        edits in proptest::collection::vec(config_edit(), 1..3)
    ) {
        let mut text = FULL_CONFIG.to_owned();
        let mut touched = None;
        for edit in &edits {
            let (t, key) = edit_config(&text, edit);
            text = t;
            // Several edits blur which key an error is about; check names only for a single edit.
            touched = if edits.len() == 1 { key } else { None };
        }
        check_config(&text, touched.as_deref())?;
    }
}

// ---- MQTT payloads and topic filters --------------------------------------------------------------

fn payload_format() -> impl Strategy<Value = PayloadFormat> {
    prop_oneof![
        Just(PayloadFormat::Auto),
        Just(PayloadFormat::Json),
        Just(PayloadFormat::Text),
        Just(PayloadFormat::Raw),
        Just(PayloadFormat::SparkplugB)
    ]
}

/// Payloads a sensor might send, and ones an attacker might: JSON fragments, deep nesting, bad UTF-8.
fn mqtt_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        random_bytes(),
        r#"[\[\]{}",:0-9a-z \\.eE+-]{0,64}"#.prop_map(String::into_bytes),
        (1usize..20_000, any::<bool>()).prop_map(|(depth, close)| {
            let mut s = "[".repeat(depth);
            if close {
                s.push_str(&"]".repeat(depth));
            }
            s.into_bytes()
        }),
        (".{0,40}", damages())
            .prop_map(|(s, d)| apply(format!("{{\"v\":{s:?}}}").into_bytes(), &d)),
    ]
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn any_payload_is_classified_and_flagged_only_when_it_fails_its_format(
        wanted in payload_format(),
        sparkplug_topic in any::<bool>(),
        bytes in mqtt_payload(),
    ) {
        let topic = if sparkplug_topic { "spBv1.0/g/NDATA/n" } else { "sensors/a" };
        let c = bounded(bytes.len(), || payload::classify(wanted, topic, &bytes))?;
        let json = payload::is_json(&bytes);
        let text = std::str::from_utf8(&bytes).is_ok();
        let sparkplug = payload::is_sparkplug(&bytes);
        match c.format {
            StoredFormat::Json => prop_assert!(json),
            StoredFormat::Text => prop_assert!(text),
            StoredFormat::SparkplugB => prop_assert!(sparkplug),
            StoredFormat::Raw => {}
        }
        let fails = match wanted {
            PayloadFormat::Json => !json,
            PayloadFormat::Text => !text,
            PayloadFormat::SparkplugB => !sparkplug,
            PayloadFormat::Auto | PayloadFormat::Raw => false,
        };
        prop_assert_eq!(c.parse_error, fails);
    }

    #[test]
    fn topic_filters_are_checked_and_matched_without_panics(
        filter in "[a-z/+#$ ]{0,20}",
        topic in "[a-z/+#$ ]{0,20}",
    ) {
        let valid = bounded(filter.len(), || ferry::config::validate_filter(&filter))?;
        let matched = bounded(filter.len() + topic.len(), || payload::topic_matches(&filter, &topic))?;
        if let Err(e) = &valid {
            prop_assert!(!e.is_empty());
        }
        // A valid filter without wildcards matches exactly itself.
        if valid.is_ok() && !filter.contains(['+', '#']) && !topic.starts_with('$') {
            prop_assert_eq!(matched, filter == topic);
        }
    }
}

// ---- journal values and the seq mark, as read from disk -------------------------------------------

fn record_of(seq: u64, r: &NewRecord) -> Record {
    Record {
        seq,
        ts_ms: r.ts_ms,
        topic: r.topic.clone(),
        payload: r.payload.clone(),
        format: r.format,
        parse_error: r.parse_error,
        mono: None,
    }
}

/// An error from a decoder must be `Corrupt` and name the seq it was decoding.
fn check_corrupt(seq: u64, e: &ferry::journal::Error) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(
        matches!(e, ferry::journal::Error::Corrupt { seq: s, .. } if *s == seq),
        "not a corrupt error for seq {seq}: {msg}"
    );
    prop_assert!(msg.contains(&format!("seq={seq}")), "{msg}");
    Ok(())
}

/// A valid `E` value: a record or a gap starting at `seq`.
fn entry_value(seq: u64) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        new_record().prop_map(|r| codec::encode_record(&r)),
        (0u64..1000, gap_reason())
            .prop_map(move |(n, reason)| { codec::encode_gap(seq.saturating_add(n), reason) }),
    ]
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn records_and_gaps_round_trip(seq in any::<u64>(), r in new_record(), n in any::<u64>(), reason in gap_reason()) {
        let value = codec::encode_record(&r);
        prop_assert_eq!(codec::decode_entry(seq, &value).unwrap(), Entry::Record(record_of(seq, &r)));
        let to_seq = seq.saturating_add(n % 10_000);
        prop_assert_eq!(
            codec::decode_entry(seq, &codec::encode_gap(to_seq, reason)).unwrap(),
            Entry::Gap { from_seq: seq, to_seq, reason }
        );
    }

    #[test]
    fn dead_letters_round_trip(seq in any::<u64>(), r in new_record(), status in any::<u16>(), error in ".{0,60}", at_ms in any::<u64>()) {
        let header = DeadHeader { status, error, at_ms };
        let value = codec::encode_dead(&header, &codec::encode_record(&r));
        let (h, rec) = codec::decode_dead(seq, &value).unwrap();
        prop_assert_eq!(h, header);
        prop_assert_eq!(rec, record_of(seq, &r));
    }

    #[test]
    fn random_bytes_never_decode_into_a_panic_or_a_huge_allocation(seq in any::<u64>(), bytes in random_bytes()) {
        if let Err(e) = bounded(bytes.len(), || codec::decode_entry(seq, &bytes))? {
            check_corrupt(seq, &e)?;
        }
        if let Err(e) = bounded(bytes.len(), || codec::decode_dead(seq, &bytes))? {
            check_corrupt(seq, &e)?;
        }
    }

    #[test]
    fn damaged_entries_decode_or_give_a_corrupt_error(
        seq in 0u64..1_000_000,
        value in entry_value(500_000),
        d in damages(),
    ) {
        let bad = apply(value, &d);
        match bounded(bad.len(), || codec::decode_entry(seq, &bad))? {
            Ok(Entry::Gap { from_seq, to_seq, .. }) => prop_assert!(from_seq == seq && to_seq >= seq),
            Ok(Entry::Record(r)) => prop_assert_eq!(r.seq, seq),
            Err(e) => check_corrupt(seq, &e)?,
        }
    }

    #[test]
    fn damaged_dead_letters_decode_or_give_a_corrupt_error(
        seq in any::<u64>(),
        r in new_record(),
        status in any::<u16>(),
        error in ".{0,60}",
        d in damages(),
    ) {
        let header = DeadHeader { status, error, at_ms: 1 };
        let bad = apply(codec::encode_dead(&header, &codec::encode_record(&r)), &d);
        if let Err(e) = bounded(bad.len(), || codec::decode_dead(seq, &bad))? {
            check_corrupt(seq, &e)?;
        }
    }
}

fn a_mark() -> impl Strategy<Value = (u64, Mark)> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(generation, a, b, c)| {
        // The invariant a valid mark keeps: head and acked never above the lease.
        let lease = a.max(b).max(c);
        (
            generation,
            Mark {
                lease,
                head: b,
                acked: c,
            },
        )
    })
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn random_mark_files_read_as_a_valid_mark_or_none(bytes in random_bytes()) {
        let (newest, next) = bounded(bytes.len(), || mark::newest(&bytes))?;
        prop_assert!(next <= 1);
        if let Some((_, m)) = newest {
            prop_assert!(m.head <= m.lease && m.acked <= m.lease);
        }
    }

    #[test]
    fn the_newer_slot_wins_and_any_damaged_slot_falls_back_to_the_other(
        (g0, m0) in a_mark(),
        (g1, m1) in a_mark(),
        slot in 0usize..2,
        byte in 0usize..SLOT,
        bit in 0u8..8,
        tail in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut file = [mark::encode(g0, m0), mark::encode(g1, m1)].concat();
        file.extend_from_slice(&tail); // bytes past the two slots are ignored
        let want = if g1 > g0 { (g1, m1, 0) } else { (g0, m0, 1) };
        prop_assert_eq!(mark::newest(&file), (Some((want.0, want.1)), want.2));
        // A single flipped bit anywhere in a slot (CRC-32 detects them all) discards that slot.
        file[slot * SLOT + byte] ^= 1 << bit;
        let (g, m) = if slot == 0 { (g1, m1) } else { (g0, m0) };
        let next = if slot == 0 { 0 } else { 1 };
        prop_assert_eq!(mark::newest(&file), (Some((g, m)), next));
    }
}

/// Regression: `MarkFile::open` read the whole `seq-mark` file into memory, so a damaged file of
/// gigabytes (a disk error, a mistaken copy) cost as much RAM at every start. Only its two slots are
/// read now.
#[test]
fn a_huge_seq_mark_file_is_not_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("seq-mark")).unwrap();
    file.set_len(1 << 30).unwrap(); // sparse: costs no disk
    let opts = ferry::journal::Options {
        dir: dir.path().to_owned(),
        max_bytes: 64 << 20,
        on_full: ferry::journal::OnFull::RejectNew,
        cache_bytes: 1 << 20,
        replay_window: ferry::journal::default_replay_window(64 << 20),
        fixed_budget: None,
    };
    LARGEST.with(|l| l.set(0));
    let journal = ferry::journal::Journal::open(&opts);
    let largest = LARGEST.with(Cell::get);
    assert!(journal.is_ok(), "{:?}", journal.err());
    assert!(largest < 64 << 20, "largest allocation {largest} bytes");
}

// ---- the cloud's answer to an upload, over a real socket ------------------------------------------

/// One agent for every case, configured exactly as the uplink's.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        uplink::http_agent(
            Duration::from_secs(2),
            Duration::from_secs(5),
            &ferry::tls::Material::default(),
        )
    })
}

/// Serves one connection on a loopback port: reads the request, writes `response` (ignoring a peer
/// that hangs up early), closes. Returns what `uplink::post` made of it.
fn answer_to(response: &[u8]) -> Result<Answer, TestCaseError> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/ingest", listener.local_addr().unwrap());
    let raw = response.to_vec();
    let server = std::thread::Builder::new()
        .name("fuzz-cloud".into())
        .spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("the uplink never connected: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            read_request(&mut conn);
            let _ = conn.write_all(&raw);
            let _ = conn.shutdown(std::net::Shutdown::Write);
            // Wait for the client to close, so that nothing it sent is left unread (which would
            // reset the connection instead of closing it).
            let _ = std::io::copy(&mut conn, &mut std::io::sink());
        })
        .unwrap();
    let body = br#"{"device_id":"gw-fuzz","records":[]}"#;
    let up = Upload {
        url: &url,
        device_id: "gw-fuzz",
        first: 1,
        last: 2,
        token: Some("t"),
        gzip: false,
        body,
    };
    let answer = bounded(response.len(), || uplink::post(agent(), &up))?;
    server.join().unwrap();
    Ok(answer)
}

/// Reads one request (head and `Content-Length` body) from `conn`.
fn read_request(conn: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An HTTP response as the generator built it, and what it promised.
#[derive(Clone)]
struct Response {
    bytes: Vec<u8>,
    /// The head announced a body of at most `MAX_RESPONSE_BODY` bytes and less was sent, fewer than
    /// `MAX_RESPONSE_BODY`: the uplink reads such a body to its end and must see that it broke off.
    /// (Once `MAX_RESPONSE_BODY` bytes have arrived ureq stops reading, so a longer body, or one cut
    /// at exactly that length, is not read to its end; then the status alone counts.)
    cut_short: bool,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The head as text and the body's length: a failing case must fit on a screen.
        let text = String::from_utf8_lossy(&self.bytes);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        write!(
            f,
            "Response {{ head: {head:?}, total_bytes: {}, cut_short: {} }}",
            self.bytes.len(),
            self.cut_short
        )
    }
}

fn status_line() -> impl Strategy<Value = String> {
    let code = prop_oneof![
        4 => prop_oneof![Just(200u32), Just(204), Just(400), Just(413), Just(422), Just(429), Just(503), Just(301)].prop_map(|c| c.to_string()),
        2 => (100u32..1000).prop_map(|c| c.to_string()),
        1 => prop_oneof![Just("0"), Just("99"), Just("1000"), Just("65536"), Just("2OO"), Just(""), Just("-200"), Just("200.0")].prop_map(str::to_owned),
    ];
    let version = prop_oneof![
        6 => Just("HTTP/1.1"),
        1 => Just("HTTP/1.0"),
        1 => prop_oneof![Just("HTTP/2"), Just("http/1.1"), Just("HTTP/1.1 "), Just("ICY"), Just("")],
    ];
    let reason = prop_oneof![
        Just("OK".to_string()),
        Just(String::new()),
        "[ -~]{0,30}",
        ".{0,10}"
    ];
    (version, code, reason).prop_map(|(v, c, r)| format!("{v} {c} {r}"))
}

fn retry_after_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        "[0-9]{10,30}",
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("Sun, 06 Nov 1994 08:49:37 GMT".to_string()),
        Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
        (0u64..7200).prop_map(|s| http_date(SystemTime::now() + Duration::from_secs(s))),
        "[ -~]{0,40}",
    ]
}

/// How the body relates to the `Content-Length` header.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// `Content-Length` matches the body.
    Exact,
    /// `Content-Length` announces `n` more bytes than are sent.
    Short(u64),
    /// `Content-Length` is huge (a garbage length).
    Huge,
    /// No `Content-Length`: the body runs to the close.
    UntilClose,
    /// `Transfer-Encoding: chunked`, valid or cut.
    Chunked { cut: bool },
    /// A header that is not a number.
    Garbage,
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        3 => Just(Framing::Exact),
        1 => (1u64..100_000).prop_map(Framing::Short),
        1 => Just(Framing::Huge),
        1 => Just(Framing::UntilClose),
        1 => any::<bool>().prop_map(|cut| Framing::Chunked { cut }),
        1 => Just(Framing::Garbage),
    ]
}

fn body_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..200,
        1 => Just(MAX_RESPONSE_BODY as usize),
        1 => Just(MAX_RESPONSE_BODY as usize + 1),
        1 => 0usize..(1 << 20),
    ]
}

fn structured_response() -> impl Strategy<Value = Response> {
    (
        status_line(),
        proptest::option::of(retry_after_value()),
        framing(),
        body_len(),
        any::<u8>(),
        proptest::option::of("[ -~]{0,20}: [ -~]{0,100}"),
    )
        .prop_map(|(status, retry_after, framing, len, fill, extra)| {
            let body = vec![fill; len];
            let mut head = format!("{status}\r\n");
            if let Some(v) = retry_after {
                head.push_str(&format!("Retry-After: {v}\r\n"));
            }
            if let Some(h) = extra {
                head.push_str(&h);
                head.push_str("\r\n");
            }
            let mut cut_short = false;
            let mut tail = body.clone();
            match framing {
                Framing::Exact => head.push_str(&format!("Content-Length: {len}\r\n")),
                Framing::Short(n) => {
                    head.push_str(&format!("Content-Length: {}\r\n", len as u64 + n));
                    cut_short = len as u64 + n <= MAX_RESPONSE_BODY;
                }
                Framing::Huge => head.push_str("Content-Length: 18446744073709551615\r\n"),
                Framing::UntilClose => {}
                Framing::Chunked { cut } => {
                    head.push_str("Transfer-Encoding: chunked\r\n");
                    tail = format!("{len:x}\r\n").into_bytes();
                    tail.extend_from_slice(&body);
                    if !cut {
                        tail.extend_from_slice(b"\r\n0\r\n\r\n");
                    }
                    cut_short = cut && (len as u64) < MAX_RESPONSE_BODY;
                }
                Framing::Garbage => head.push_str("Content-Length: lots\r\n"),
            }
            head.push_str("\r\n");
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&tail);
            Response { bytes, cut_short }
        })
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for `t`.
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant), for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn check_answer(answer: &Answer, cut_short: bool) -> Result<(), TestCaseError> {
    match answer {
        Answer::Status {
            code,
            retry_after,
            body,
        } => {
            prop_assert!((100..=999).contains(code), "status {code}");
            prop_assert!(retry_after.is_none_or(|d| d <= uplink::MAX_RETRY_AFTER));
            // Lossy UTF-8 may turn each byte into a 3-byte replacement character.
            prop_assert!(
                body.len() as u64 <= 3 * MAX_RESPONSE_BODY,
                "body of {} bytes kept",
                body.len()
            );
            // A 2xx whose body broke off must never be taken for an acknowledgement. (A 204 and a
            // 205 have no body whatever their headers say, RFC 9110 6.4.1 and 15.3.6: the answer
            // is whole at the end of its head.)
            prop_assert!(
                !(cut_short
                    && !matches!(*code, 204 | 205)
                    && uplink::verdict(*code) == uplink::Verdict::Ack),
                "a cut-short {code} was taken as an ack"
            );
        }
        Answer::Failed(e) => prop_assert!(!uplink::describe(e).trim().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(4))]

    #[test]
    fn any_bytes_from_the_cloud_give_a_status_or_a_failure(bytes in random_bytes()) {
        let answer = answer_to(&bytes)?;
        check_answer(&answer, false)?;
    }

    #[test]
    fn odd_responses_are_read_bounded_and_a_cut_2xx_is_never_an_ack(r in structured_response()) {
        let answer = answer_to(&r.bytes)?;
        check_answer(&answer, r.cut_short)?;
    }

    #[test]
    fn damaged_responses_are_read_bounded(r in structured_response(), d in damages()) {
        let bytes = apply(r.bytes, &d);
        let answer = answer_to(&bytes)?;
        check_answer(&answer, false)?;
    }
}

/// Found by `odd_responses_are_read_bounded_and_a_cut_2xx_is_never_an_ack`: a chunked body in an
/// HTTP/1.0 answer, cut short, was read up to the close and taken for an ack.
#[test]
fn an_http_1_0_answer_with_transfer_encoding_is_never_an_ack() {
    for cut in [true, false] {
        let mut bytes = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n".to_vec();
        bytes.extend_from_slice(&[b'x'; 50]);
        if !cut {
            bytes.extend_from_slice(b"\r\n0\r\n\r\n");
        }
        let answer = answer_to(&bytes).unwrap();
        assert!(matches!(answer, Answer::Failed(_)), "cut={cut}: {answer:?}");
    }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn retry_after_is_clamped_or_ignored(value in prop_oneof![retry_after_value(), ".{0,40}"]) {
        let now = SystemTime::now();
        let parsed = bounded(value.len(), || uplink::parse_retry_after(&value, now))?;
        prop_assert!(parsed.is_none_or(|d| d <= uplink::MAX_RETRY_AFTER));
        let trimmed = value.trim();
        if let Ok(secs) = trimmed.parse::<u64>() {
            if trimmed.len() <= 12 && trimmed.bytes().all(|b| b.is_ascii_digit()) {
                prop_assert_eq!(parsed, Some(Duration::from_secs(secs).min(uplink::MAX_RETRY_AFTER)));
            }
        }
    }

    #[test]
    fn retry_after_dates_give_the_time_until_them(ahead in 0u64..100_000) {
        let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let date = http_date(now + Duration::from_secs(ahead));
        prop_assert_eq!(
            uplink::parse_retry_after(&date, now),
            Some(Duration::from_secs(ahead).min(uplink::MAX_RETRY_AFTER)),
            "{}", date
        );
    }
}

// ---- the cloud's batch validation -----------------------------------------------------------------

/// Entries as the journal hands them to the uplink: seq order, records and gaps.
fn entries() -> impl Strategy<Value = Vec<Entry>> {
    proptest::collection::vec(
        prop_oneof![
            3 => new_record().prop_map(Some),
            1 => Just(None),
        ],
        0..12,
    )
    .prop_flat_map(|items| {
        let n = items.len();
        (
            Just(items),
            proptest::collection::vec((1u64..4, gap_reason()), n),
        )
    })
    .prop_map(|(items, steps)| {
        let mut seq = 1;
        let mut out = Vec::new();
        for (item, (width, reason)) in items.into_iter().zip(steps) {
            match item {
                Some(r) => {
                    out.push(Entry::Record(record_of(seq, &r)));
                    seq += 1;
                }
                None => {
                    out.push(Entry::Gap {
                        from_seq: seq,
                        to_seq: seq + width - 1,
                        reason,
                    });
                    seq += width;
                }
            }
        }
        out
    })
}

const KNOWN_PLACES: [&str; 4] = ["body", "device_id", "records", "gaps"];

fn check_batch(body: &[u8]) -> Result<(), TestCaseError> {
    // The fast path for the usual shape reads every body as the general path does.
    prop_assert_eq!(
        bounded(body.len(), || cloud_batch::parse(body))?,
        bounded(body.len(), || cloud_batch::parse_general(body))?
    );
    match bounded(body.len(), || cloud_batch::parse(body))? {
        Ok(batch) => {
            prop_assert!(ferry::protocol::is_valid_device_id(&batch.device_id));
            for pair in batch.records.windows(2) {
                prop_assert!(pair[0].seq < pair[1].seq);
            }
            // What the cloud stores reads back with the same seq, fingerprint and topic.
            for r in &batch.records {
                prop_assert_eq!(
                    cloud_batch::stored_record(r.line.as_bytes()),
                    Ok(cloud_batch::Stored {
                        seq: r.seq,
                        fingerprint: r.fingerprint,
                        upstream_gap: r.upstream_gap,
                    })
                );
            }
        }
        Err(e) => {
            prop_assert!(!e.problem.is_empty(), "{e}");
            prop_assert!(
                KNOWN_PLACES.iter().any(|p| e.at.starts_with(p)),
                "unknown place: {e}"
            );
        }
    }
    Ok(())
}

/// A JSON value, for putting where a field was.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
        "[A-Za-z0-9+/=]{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces (or removes, for `None`) the value at a random place in `v`, counting in document order.
fn replace_at(
    v: &mut serde_json::Value,
    target: &mut usize,
    with: &Option<serde_json::Value>,
) -> bool {
    use serde_json::Value;
    let children: Vec<String> = match v {
        Value::Object(m) => m.keys().cloned().collect(),
        Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
        _ => return false,
    };
    for key in children {
        if *target == 0 {
            match (v, with) {
                (Value::Object(m), Some(x)) => {
                    m.insert(key, x.clone());
                }
                (Value::Object(m), None) => {
                    m.remove(&key);
                }
                (Value::Array(a), Some(x)) => a[key.parse::<usize>().unwrap()] = x.clone(),
                (Value::Array(a), None) => {
                    a.remove(key.parse::<usize>().unwrap());
                }
                _ => {}
            }
            return true;
        }
        *target -= 1;
        let child = match v {
            Value::Object(m) => m.get_mut(&key),
            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        };
        if child.is_some_and(|c| replace_at(c, target, with)) {
            return true;
        }
    }
    false
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn every_batch_the_agent_sends_is_accepted_as_sent(entries in entries(), id in "[A-Za-z0-9._-]{1,64}") {
        let body = uplink::encode_body(&id, &entries, None, &uplink::Annotator::default());
        let batch = cloud_batch::parse(&body);
        prop_assert!(batch.is_ok(), "refused: {:?}", batch.err());
        let batch = batch.unwrap();
        let sent: Vec<u64> = entries.iter().filter_map(|e| match e {
            Entry::Record(r) => Some(r.seq),
            Entry::Gap { .. } => None,
        }).collect();
        let got: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        prop_assert_eq!(got, sent);
        let gaps = entries.iter().filter(|e| matches!(e, Entry::Gap { .. })).count();
        prop_assert_eq!(batch.gaps.len(), gaps);
        check_batch(&body)?;
    }

    #[test]
    fn random_bodies_are_refused_naming_the_place(bytes in random_bytes()) {
        check_batch(&bytes)?;
    }

    #[test]
    fn a_batch_with_one_field_replaced_is_accepted_or_refused_naming_the_place(
        entries in entries(),
        target in any::<usize>(),
        with in proptest::option::of(json_value()),
    ) {
        let body = uplink::encode_body("gw-fuzz", &entries, None, &uplink::Annotator::default());
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut t = target % 64;
        replace_at(&mut v, &mut t, &with);
        check_batch(v.to_string().as_bytes())?;
    }

    #[test]
    fn a_damaged_batch_body_is_accepted_or_refused_naming_the_place(entries in entries(), d in damages()) {
        let body = apply(uplink::encode_body("gw-fuzz", &entries, None, &uplink::Annotator::default()), &d);
        check_batch(&body)?;
    }
}

// ---- the serial console -------------------------------------------------------------------------

use ferry::config::edit::Draft;
use ferry::console::{line, parse as console_parse};

/// Line noise as a serial cable delivers it: random bytes, with runs of typing, line ends, erase
/// keys, Ctrl-C/Ctrl-U and escape sequences mixed in.
fn serial_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        4 => "[ -~]{0,80}".prop_map(String::into_bytes),
        2 => prop_oneof![
            Just(b"\r".to_vec()), Just(b"\n".to_vec()), Just(b"\r\n".to_vec()),
            Just(vec![0x7f]), Just(vec![0x08]), Just(vec![0x03]), Just(vec![0x15]),
            Just(b"\x1b[A".to_vec()), Just(b"\x1b[1;5C".to_vec()), Just(b"\x1bO".to_vec()),
            Just(vec![0x1b]),
        ],
        1 => (0usize..3000).prop_map(|n| vec![b'x'; n]),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(1))]

    /// Whatever arrives on the line: no panic, echo without escape codes and bounded per byte (by the
    /// erase of a whole line),
    /// finished lines within `MAX_LINE`, each a command or a clear refusal.
    #[test]
    fn the_console_survives_any_line_noise(bytes in serial_bytes(), masked in any::<bool>()) {
        let echo = if masked { line::Echo::Masked } else { line::Echo::On };
        let mut editor = line::Editor::new(echo);
        let mut events = Vec::new();
        let out = bounded(bytes.len(), || {
            let mut out = Vec::new();
            for &b in &bytes {
                let before = out.len();
                if let Some(ev) = editor.feed(b, &mut out) {
                    events.push(ev);
                }
                // Ctrl-U erases a whole line: three bytes of echo per character at most.
                let echoed = out.len() - before;
                assert!(echoed <= 3 * line::MAX_LINE + 64, "echo of one byte is {echoed} bytes");
            }
            out
        })?;
        prop_assert!(!out.contains(&0x1b), "echo holds an escape code");
        if masked {
            // A PIN shows as stars; the only letter echoed is Ctrl-C's `^C`.
            let shown = String::from_utf8_lossy(&out).replace("^C", "");
            prop_assert!(!shown.chars().any(char::is_alphanumeric), "{shown:?}");
        }
        for ev in events {
            if let line::Event::Line(l) = ev {
                prop_assert!(l.len() <= line::MAX_LINE);
                prop_assert!(!l.chars().any(|c| c.is_control()), "{l:?}");
                match bounded(l.len(), || console_parse::parse(&l))? {
                    Ok(_) => {}
                    Err(e) => prop_assert!(!e.is_empty()),
                }
            }
        }
    }

    /// Any command line: a command or a non-empty message, never a panic.
    #[test]
    fn any_console_line_parses_or_is_refused(text in "[ -~]{0,200}|\\PC{0,60}") {
        if let Err(e) = bounded(text.len(), || console_parse::parse(&text))? {
            prop_assert!(!e.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(config(8))]

    /// `set KEY VALUE` with anything a person (or line noise) types: the draft is changed to a valid
    /// file or left as it was with an error; never a panic.
    #[test]
    fn console_set_keeps_the_draft_valid(key in "[a-z_]{1,12}\\.[a-z_]{1,20}|[ -~]{0,30}", value in "[ -~]{0,60}") {
        let mut draft = Draft::from_text(Path::new(SOURCE), FULL_CONFIG).unwrap();
        let before = draft.text();
        match bounded(key.len() + value.len(), || draft.set(&key, &value))? {
            Ok(()) => prop_assert!(draft.validate().is_ok(), "{}", draft.text()),
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert_eq!(draft.text(), before);
            }
        }
    }
}

// ---- the downlink ------------------------------------------------------------------------------------

use ferry::fuzzing::downlink_command::{self, Parsed};

/// A command frame as the cloud would send it, with any field possibly odd or missing.
fn command_frame() -> impl Strategy<Value = String> {
    let id = prop_oneof![
        "[a-z0-9-]{1,40}".prop_map(serde_json::Value::from),
        "\\PC{0,300}".prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
    ];
    let action = prop_oneof![
        Just("publish"),
        Just("status"),
        Just("set_config"),
        Just("replay_from"),
        Just("reboot"),
        Just(""),
    ];
    let field = prop_oneof![
        "[a-z_]{1,12}".prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        Just(serde_json::json!({"a": [1, {"b": null}]})),
        "\\PC{0,100}".prop_map(serde_json::Value::from),
    ];
    let name = prop_oneof![
        Just("topic"),
        Just("payload"),
        Just("payload_text"),
        Just("payload_b64"),
        Just("qos"),
        Just("retain"),
        Just("key"),
        Just("value"),
        Just("seq"),
        Just("type"),
    ];
    (id, action, proptest::collection::vec((name, field), 0..6)).prop_map(|(id, action, fields)| {
        let mut m = serde_json::Map::new();
        m.insert("type".into(), "command".into());
        m.insert("id".into(), id);
        m.insert("action".into(), action.into());
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        serde_json::Value::Object(m).to_string()
    })
}

proptest! {
    #![proptest_config(config(1))]

    /// Any text frame: a command, or a refusal with a message (and the id when one was readable);
    /// never a panic, never an allocation out of proportion to the frame.
    #[test]
    fn any_downlink_frame_is_a_command_or_a_clear_refusal(
        text in prop_oneof![command_frame(), "\\PC{0,400}", random_bytes().prop_map(|b| String::from_utf8_lossy(&b).into_owned())],
        damage in damages(),
    ) {
        let text = String::from_utf8_lossy(&apply(text.into_bytes(), &damage)).into_owned();
        match bounded(text.len(), || downlink_command::parse(&text))? {
            Parsed::Command(c) => {
                prop_assert!(!c.id.is_empty());
                // The answer to it is one JSON object naming the same id.
                let answer = downlink_command::result(&c.id, &Err("x".into()));
                let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
                prop_assert_eq!(v["id"].as_str(), Some(c.id.as_str()));
            }
            Parsed::Refused { error, .. } => prop_assert!(!error.is_empty()),
        }
    }
}
