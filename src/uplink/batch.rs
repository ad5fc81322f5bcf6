//! The pure half of the uplink: request bodies, what a response means, `Retry-After`, and the split
//! plan that isolates a record the cloud refuses. No sockets here.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::value::RawValue;

use crate::clock::{Clock, WireTime};
use crate::journal::{Entry, Record, StoredFormat};
use crate::protocol::{self, Gap, Payload};
use crate::sparkplug::Aliases;

/// Longest `Retry-After` honoured; a larger value is clamped (a typo on the server must not park
/// the gateway for days).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a record carries on the wire beyond the journal's bytes: its time as the clock corrects
/// it (`Clock::wire_time`; as stamped without a clock), and the decoded form of a Sparkplug B
/// payload, metric names from the latest births (`sparkplug::Aliases`).
#[derive(Clone, Default)]
pub struct Annotator {
    pub clock: Option<Clock>,
    pub aliases: Aliases,
}

impl Annotator {
    fn time(&self, r: &Record) -> WireTime {
        match &self.clock {
            Some(c) => c.wire_time(r),
            None => WireTime::stamped(r),
        }
    }
}

/// Encodes entries as a protocol v1 batch body.
pub fn encode_body(
    device_id: &str,
    entries: &[Entry],
    held: Option<protocol::Held>,
    ann: &Annotator,
) -> Vec<u8> {
    let mut records = Vec::new();
    let mut gaps = Vec::new();
    for e in entries {
        match e {
            Entry::Record(r) => {
                let (payload, mut parse_error) = wire_payload(r.format, &r.payload, r.parse_error);
                let sparkplug = match r.format {
                    StoredFormat::SparkplugB => {
                        match ann.aliases.decode(&r.topic, &r.payload, r.ts_ms) {
                            Ok(v) => Some(v),
                            // It decoded at ingest: the journal's bytes changed. Sent raw, flagged.
                            Err(_) => {
                                parse_error = true;
                                None
                            }
                        }
                    }
                    _ => None,
                };
                let t = ann.time(r);
                records.push(protocol::Record {
                    seq: r.seq,
                    ts_ms: t.ts_ms,
                    clock: t.note,
                    ts_ms_original: t.original,
                    sparkplug,
                    topic: &r.topic,
                    payload,
                    parse_error,
                });
            }
            Entry::Gap {
                from_seq,
                to_seq,
                reason,
            } => gaps.push(Gap {
                from_seq: *from_seq,
                to_seq: *to_seq,
                reason: *reason,
            }),
        }
    }
    let batch = protocol::Batch {
        device_id,
        records,
        gaps,
        held,
    };
    // Serializing strings and validated raw JSON into a Vec cannot fail.
    let mut body = Vec::with_capacity(entries.iter().map(wire_size).sum());
    let _ = serde_json::to_writer(&mut body, &batch);
    body
}

/// About the bytes an entry takes in a body (a little more for a base64 payload).
fn wire_size(e: &Entry) -> usize {
    match e {
        Entry::Record(r) => 64 + r.topic.len() + r.payload.len() * 4 / 3,
        Entry::Gap { .. } => 64,
    }
}

/// The wire form of a stored payload. Bytes that no longer are what ingest decided (a damaged
/// journal) go as flagged base64 rather than as invalid JSON that would poison the whole batch.
fn wire_payload(format: StoredFormat, bytes: &[u8], parse_error: bool) -> (Payload<'_>, bool) {
    let b64 = || Payload::Base64(base64::engine::general_purpose::STANDARD.encode(bytes));
    match format {
        // Checked (not copied): the whole text must be one JSON value, as at ingest.
        StoredFormat::Json => match std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| serde_json::from_str::<&RawValue>(s.trim()).ok())
        {
            Some(raw) => (Payload::Json(raw), parse_error),
            None => (b64(), true),
        },
        StoredFormat::Text => match std::str::from_utf8(bytes) {
            Ok(s) => (Payload::Text(s), parse_error),
            Err(_) => (b64(), true),
        },
        // The raw bytes are the record; the decoded form goes beside them (`encode_body`).
        StoredFormat::Raw | StoredFormat::SparkplugB => (b64(), parse_error),
    }
}

/// What the agent does with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the whole batch, gaps included, is acknowledged.
    Ack,
    /// Try the same batch again after a backoff: 408, 425, 429, 5xx.
    Retry,
    /// The cloud refuses this device (401, 403, 404, 409) or the URL is wrong (3xx): keep the data,
    /// report an error, retry with backoff.
    Refused,
    /// Split the batch: 413, and other 4xx until the refused record is isolated.
    Split,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Ack,
        408 | 425 | 429 | 500..=599 => Verdict::Retry,
        // 409: the cloud saw this device's seqs with other content (a cloned identity).
        401 | 403 | 404 | 409 => Verdict::Refused,
        400..=499 => Verdict::Split,
        // 1xx, 3xx (redirects are not followed), and nonsense: a misconfigured endpoint.
        _ => Verdict::Refused,
    }
}

/// Parses `Retry-After` (delta-seconds or an IMF-fixdate), clamped to [`MAX_RETRY_AFTER`].
/// Anything unparseable is ignored (`None`), never an error.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = v.parse().ok()?;
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = parse_http_date(v)?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// IMF-fixdate only (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires senders to use.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_ascii_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), for dates after 1970.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// The plan for isolating refused records by bisection. Holds the seq ranges still to send in
/// order; the top is sent next. Empty means "send full batches".
///
/// A refused batch is split in two halves by entry count; halves that pass are acknowledged and
/// never sent again; a refused single record is dead-lettered. So a healthy record is re-sent at
/// most once per halving of a batch that contained a refused one (log2 of the batch size).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    stack: Vec<(u64, u64)>,
}

/// What to do after a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnRefusal {
    /// Send the (smaller) window next.
    Retry,
    /// This single record is refused: dead-letter it.
    DeadLetter(u64),
    /// A single gap was refused; nothing can be split further. Retry with backoff.
    Stuck,
}

impl SplitPlan {
    /// The inclusive seq range to send next, when splitting.
    pub fn window(&self) -> Option<(u64, u64)> {
        self.stack.last().copied()
    }

    /// The entries of the current window were acknowledged (or dead-lettered).
    pub fn done(&mut self) {
        self.stack.pop();
    }

    /// Drops windows the cursor has already passed: the cloud acknowledged them as part of an
    /// earlier request (a gap left by a dead letter travels with the window after it). Call before
    /// each read, so the top window always has something to send.
    pub fn skip_acked(&mut self, acked: u64) {
        while self.stack.last().is_some_and(|w| w.1 <= acked) {
            self.stack.pop();
        }
    }

    /// The cloud refused a request carrying `entries` (the current window, or a full batch).
    pub fn refused(&mut self, entries: &[Entry]) -> OnRefusal {
        match entries {
            [] => OnRefusal::Stuck,
            [Entry::Record(r)] => OnRefusal::DeadLetter(r.seq),
            [Entry::Gap { .. }] => OnRefusal::Stuck,
            _ => {
                let mid = entries.len() / 2;
                let first = (entries[0].first_seq(), entries[mid - 1].last_seq());
                let second = (
                    entries[mid].first_seq(),
                    entries[entries.len() - 1].last_seq(),
                );
                // While splitting, every request is for the top window: it is replaced by its two
                // halves. (The entries may start before the window: a gap left by a dead letter.)
                self.stack.pop();
                self.stack.push(second);
                self.stack.push(first);
                OnRefusal::Retry
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Record;
    use crate::protocol::GapReason;

    fn rec(seq: u64, format: StoredFormat, payload: &[u8]) -> Entry {
        Entry::Record(Record {
            seq,
            ts_ms: 1,
            topic: "t".into(),
            payload: payload.to_vec(),
            format,
            parse_error: false,
            mono: None,
        })
    }

    fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        seqs.map(|s| rec(s, StoredFormat::Text, b"x")).collect()
    }

    #[test]
    fn body_has_each_payload_form_and_gaps_in_seq_order() {
        let entries = vec![
            Entry::Gap {
                from_seq: 1,
                to_seq: 3,
                reason: GapReason::JournalFull,
            },
            rec(4, StoredFormat::Json, br#" {"t": 21.5} "#),
            rec(5, StoredFormat::Text, "héllo".as_bytes()),
            rec(6, StoredFormat::Raw, &[0, 1, 2]),
            rec(7, StoredFormat::Json, b"null"),
        ];
        let v: serde_json::Value =
            serde_json::from_slice(&encode_body("gw-1", &entries, None, &Annotator::default()))
                .unwrap();
        assert_eq!(v["device_id"], "gw-1");
        assert_eq!(v["gaps"][0]["reason"], "journal_full");
        assert_eq!(v["gaps"][0]["to_seq"], 3);
        assert_eq!(v["records"][0]["payload"]["t"], 21.5);
        assert_eq!(v["records"][1]["payload_text"], "héllo");
        assert_eq!(v["records"][2]["payload_b64"], "AAEC");
        assert!(v["records"][3].as_object().unwrap().contains_key("payload"));
        assert!(v["records"][3]["payload"].is_null());
        assert!(v["records"][0].get("parse_error").is_none());
    }

    #[test]
    fn damaged_json_is_sent_as_flagged_base64() {
        let body = encode_body(
            "gw",
            &[rec(1, StoredFormat::Json, b"{broken")],
            None,
            &Annotator::default(),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["records"][0]["parse_error"], true);
        assert!(v["records"][0]["payload_b64"].is_string());
    }

    #[test]
    fn statuses_map_to_the_documented_verdicts() {
        assert_eq!(verdict(200), Verdict::Ack);
        assert_eq!(verdict(204), Verdict::Ack);
        for s in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(verdict(s), Verdict::Retry, "{s}");
        }
        for s in [401, 403, 404, 409, 301, 302, 100, 0, 999] {
            assert_eq!(verdict(s), Verdict::Refused, "{s}");
        }
        for s in [400, 413, 422, 418, 451] {
            assert_eq!(verdict(s), Verdict::Split, "{s}");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates_and_ignores_garbage() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "99999999999999999999999",
            "Sun, 06 Foo 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk}");
        }
    }

    #[test]
    fn bisection_isolates_one_refused_record_and_sends_healthy_halves_once() {
        // 8 records, seq 6 is poison. Simulate the uplink against the plan.
        let poison = 6;
        let mut acked = 0u64;
        let mut dead = Vec::new();
        let mut sends: std::collections::HashMap<u64, u32> = Default::default();
        let mut plan = SplitPlan::default();
        let all = records(1..=8);
        for _ in 0..100 {
            if acked == 8 {
                break;
            }
            let window: Vec<Entry> = all
                .iter()
                .filter(|e| {
                    e.first_seq() > acked && plan.window().is_none_or(|(_, to)| e.last_seq() <= to)
                })
                .filter(|e| !dead.contains(&e.first_seq()))
                .cloned()
                .collect();
            for e in &window {
                *sends.entry(e.first_seq()).or_default() += 1;
            }
            if window.iter().any(|e| e.first_seq() == poison) {
                match plan.refused(&window) {
                    OnRefusal::DeadLetter(s) => {
                        dead.push(s);
                        acked = s;
                        plan.done();
                    }
                    OnRefusal::Retry => {}
                    OnRefusal::Stuck => panic!("stuck"),
                }
            } else {
                acked = window.last().unwrap().last_seq();
                plan.done();
            }
        }
        assert_eq!(acked, 8);
        assert_eq!(dead, vec![6]);
        assert_eq!(plan.window(), None, "the split is over");
        // 1..4 pass in the first half and are sent twice (the full batch, then the half).
        for s in 1..=8u64 {
            assert!(sends[&s] <= 4, "seq {s} sent {} times", sends[&s]);
        }
        assert_eq!(sends[&1], 2);
    }

    /// Model of the uplink against a cloud that refuses any batch holding a poison record: reads
    /// from the cursor up to the window's end (or `max` entries), dead-letters turn records into
    /// gaps, acks remove entries. For random poison sets and batch sizes it must terminate, deliver
    /// every healthy record exactly once, and dead-letter each poison record once.
    #[test]
    fn bisection_terminates_and_delivers_for_any_poison_set() {
        let mut rng = crate::rng::Rng::new(1);
        let mut next = move |n: u64| rng.below(n);
        for case in 0..2000 {
            let n = next(40) + 1;
            let max = next(10) as usize + 1;
            let poison: Vec<u64> = (1..=n).filter(|_| next(4) == 0).collect();
            // seq -> Some(is_poison) for records, None for gaps
            let mut journal: std::collections::BTreeMap<u64, Option<bool>> =
                (1..=n).map(|s| (s, Some(poison.contains(&s)))).collect();
            let (mut acked, mut plan) = (0u64, SplitPlan::default());
            let (mut delivered, mut dead) = (Vec::new(), Vec::new());
            let mut requests = 0;
            while acked < n {
                requests += 1;
                assert!(
                    requests < 10_000,
                    "case {case}: wedged at acked={acked} plan={plan:?}"
                );
                plan.skip_acked(acked);
                let through = plan.window().map_or(u64::MAX, |w| w.1);
                let batch: Vec<Entry> = journal
                    .range(acked + 1..=through)
                    .take(max)
                    .map(|(s, e)| match e {
                        Some(_) => rec(*s, StoredFormat::Text, b"x"),
                        None => Entry::Gap {
                            from_seq: *s,
                            to_seq: *s,
                            reason: GapReason::Rejected,
                        },
                    })
                    .collect();
                assert!(
                    !batch.is_empty(),
                    "case {case}: nothing to send at acked={acked} plan={plan:?}"
                );
                let refused = batch
                    .iter()
                    .any(|e| matches!(e, Entry::Record(r) if poison.contains(&r.seq)));
                if refused {
                    match plan.refused(&batch) {
                        OnRefusal::Retry => {}
                        OnRefusal::DeadLetter(s) => {
                            journal.insert(s, None);
                            dead.push(s);
                            plan.done();
                        }
                        OnRefusal::Stuck => panic!("case {case}: stuck"),
                    }
                } else {
                    for e in &batch {
                        if let Entry::Record(r) = e {
                            delivered.push(r.seq);
                        }
                    }
                    acked = batch.last().unwrap().last_seq();
                    plan.done();
                }
            }
            let healthy: Vec<u64> = (1..=n).filter(|s| !poison.contains(s)).collect();
            assert_eq!(
                delivered, healthy,
                "case {case}: each healthy record once, in order"
            );
            assert_eq!(
                dead, poison,
                "case {case}: each poison record dead-lettered once"
            );
        }
    }

    #[test]
    fn a_refused_single_gap_is_stuck_not_split() {
        let mut plan = SplitPlan::default();
        let gap = Entry::Gap {
            from_seq: 1,
            to_seq: 2,
            reason: GapReason::Rejected,
        };
        assert_eq!(plan.refused(&[gap]), OnRefusal::Stuck);
    }
}
