//! Wire protocol v1 between the agent and the cloud (see `docs/PROTOCOL.md`).
//!
//! These types are the single definition of the JSON the agent sends and the answers it reads; the
//! reference receiver (`ferry-cloud`) parses incoming batches more defensively (as raw JSON values),
//! because a receiver must give a clear error for anything a device might send.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest device id (protocol v1, "Identity").
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Whether `id` is a device id: 1..=64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Header that carries the batch's idempotency key: `<device_id>:<first_seq>-<last_seq>`.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// One upload: records and gaps, both sorted by seq, covering a contiguous range of seqs.
/// Serialize only: a receiver parses uploads as raw JSON (see `cloud::batch`). Borrows what it
/// can from the journal's entries, so that encoding a batch copies each payload once, into the
/// body.
#[derive(Debug, Serialize)]
pub struct Batch<'a> {
    pub device_id: &'a str,
    pub records: Vec<Record<'a>>,
    pub gaps: Vec<Gap>,
    /// What the gateway held when it built the batch (additive in v1: older agents omit it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
}

/// The gateway's account of what it holds, for the center's completeness ledger: every seq up
/// to `head_seq` is the gateway's to deliver (or declare a gap), and every seq up to `acked_seq`
/// was answered 2xx by a receiver, so the center must have it (or its gap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Highest seq durable in the gateway's journal.
    pub head_seq: u64,
    /// The gateway's cursor: every seq up to here was acknowledged by a receiver.
    pub acked_seq: u64,
    /// When the gateway received its oldest record not yet acknowledged, milliseconds since the
    /// Unix epoch; absent when it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_ts_ms: Option<u64>,
    /// Bytes of the journal's entries not yet acknowledged (additive in v1: older agents omit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_bytes: Option<u64>,
}

/// One journaled MQTT message. Exactly one of `payload`, `payload_text`, `payload_b64` is set.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub seq: u64,
    /// Time the gateway received the message, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub topic: &'a str,
    #[serde(flatten)]
    pub payload: Payload<'a>,
    /// Set when the payload failed the parser its topic asked for; the payload is then `payload_b64`.
    #[serde(skip_serializing_if = "is_false")]
    pub parse_error: bool,
    /// Set when the gateway's wall clock was not trusted when it took the record (additive in
    /// v1): `ts_ms` is then corrected, or could not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockNote>,
    /// `ts_ms` as the gateway stamped it, when `clock` is set. The same on every send of the
    /// record, unlike a corrected `ts_ms`: a receiver comparing two copies compares this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts_ms_original: Option<u64>,
    /// A Sparkplug B payload decoded (additive in v1): beside `payload_b64`, which stays the
    /// record; a receiver that compares copies ignores it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparkplug: Option<serde_json::Value>,
}

/// How `ts_ms` was arrived at when the gateway's wall clock was not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockNote {
    /// Corrected from the monotonic clock of the boot it was taken in, once that boot's wall
    /// clock was known.
    Corrected,
    /// Not correctable (the gateway rebooted before its clock was synchronised, or waited
    /// `clock.hold` for it in vain): `ts_ms` is as stamped and may be far off.
    Unsynced,
}

#[derive(Debug, Serialize)]
pub enum Payload<'a> {
    /// Parsed JSON, embedded as-is (the agent validated it at ingest).
    #[serde(rename = "payload")]
    Json(&'a RawValue),
    #[serde(rename = "payload_text")]
    Text(&'a str),
    /// Standard base64 with padding.
    #[serde(rename = "payload_b64")]
    Base64(String),
}

/// A range of seqs the device assigned but will never deliver, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub from_seq: u64,
    pub to_seq: u64,
    pub reason: GapReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// Dropped by `journal.on_full = "drop_oldest"`.
    JournalFull,
    /// Refused by the cloud (4xx) and moved to the dead-letter store.
    Rejected,
    /// Lost with a journal that could not be opened or was found inconsistent at start.
    JournalLost,
    /// Older than `journal.max_age` while still unsent: dropped on purpose (additive in v1).
    Expired,
}

impl GapReason {
    /// Every reason, in the order the protocol document lists them.
    pub const ALL: [GapReason; 4] = [
        GapReason::JournalFull,
        GapReason::Rejected,
        GapReason::JournalLost,
        GapReason::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::JournalFull => "journal_full",
            GapReason::Rejected => "rejected",
            GapReason::JournalLost => "journal_lost",
            GapReason::Expired => "expired",
        }
    }

    /// The reason named `name` on the wire.
    pub fn parse(name: &str) -> Option<GapReason> {
        GapReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// The body of a 2xx answer. Agents do not depend on it; it is informative.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: u64,
    pub duplicates: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}
