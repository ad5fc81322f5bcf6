//! `POST /v1/ingest`: the headers checked (device token, encoding, type), the body read within
//! its limits and unzipped, the batch validated ([`crate::batch`]), the receiver's own policies
//! applied (reject marker, record age, records per second), and the batch stored; every refusal
//! is a [`Reply`] with the status the agent acts on (4xx: dead-letter; 409: clash; 429/503:
//! retry).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::PoisonError;

use flate2::read::MultiGzDecoder;
use log::{debug, error, warn};
use serde_json::{Value, json};
use tiny_http::Request;

use super::{Paced, Reply, Shared, header, now_ms};
use crate::store;
use crate::{MAX_BODY_BYTES, MAX_DECOMPRESSED_BYTES, batch};

/// Records accepted in the current one-second window.
#[derive(Debug)]
pub(super) struct RateWindow {
    limit: u64,
    start: std::time::Instant,
    count: u64,
}

impl RateWindow {
    pub(super) fn new(limit: u64) -> RateWindow {
        RateWindow {
            limit,
            start: std::time::Instant::now(),
            count: 0,
        }
    }

    /// Whether `n` more records fit in this second (and counts them if so).
    fn admit(&mut self, n: u64) -> bool {
        if self.start.elapsed() >= std::time::Duration::from_secs(1) {
            self.start = std::time::Instant::now();
            self.count = 0;
        }
        if self.count > 0 && self.count + n > self.limit {
            return false;
        }
        self.count += n;
        true
    }
}

/// Counters of `POST /v1/ingest` answers, for tests that count resends.
#[derive(Debug, Default)]
pub(super) struct Stats {
    requests: u64,
    accepted: u64,
    duplicates: u64,
    /// 4xx answers.
    rejected: u64,
    status: BTreeMap<u16, u64>,
}

impl Shared {
    pub(super) fn count(&self, outcome: &Result<store::Outcome, Reply>) {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.requests += 1;
        let status = match outcome {
            Ok(o) => {
                if o.accepted > 0 {
                    self.history
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .add(now_ms(), o.accepted);
                }
                stats.accepted += o.accepted;
                stats.duplicates += o.duplicates;
                200
            }
            Err(refusal) => refusal.status,
        };
        *stats.status.entry(status).or_default() += 1;
        if (400..500).contains(&status) {
            stats.rejected += 1;
        }
    }
}

/// `POST /v1/ingest`: checks headers, reads and validates the body, stores the batch. `Err` is the
/// refusal to answer.
pub(super) fn ingest(shared: &Shared, request: &mut Request) -> Result<store::Outcome, Reply> {
    if let Some(refusal) = check_headers(shared, request) {
        return Err(refusal);
    }
    let gzip = header(request, "Content-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip"));

    if request
        .body_length()
        .is_some_and(|n| n as u64 > MAX_BODY_BYTES)
    {
        return Err(too_large(MAX_BODY_BYTES, ""));
    }
    let mut sent = Vec::with_capacity(request.body_length().unwrap_or(0));
    if let Err(e) = Paced::new(request.as_reader())
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut sent)
    {
        return Err(super::unreadable_body(&e));
    }
    if sent.len() as u64 > MAX_BODY_BYTES {
        return Err(too_large(MAX_BODY_BYTES, ""));
    }
    let body = if gzip {
        let mut plain = Vec::new();
        if let Err(e) = MultiGzDecoder::new(sent.as_slice())
            .take(MAX_DECOMPRESSED_BYTES + 1)
            .read_to_end(&mut plain)
        {
            return Err(Reply::error(400, format!("body: invalid gzip: {e}")));
        }
        if plain.len() as u64 > MAX_DECOMPRESSED_BYTES {
            return Err(too_large(MAX_DECOMPRESSED_BYTES, " decompressed"));
        }
        plain
    } else {
        sent
    };

    let batch = batch::parse(&body).map_err(|invalid| Reply::error(400, invalid.to_string()))?;
    if let Some(marker) = &shared.reject_marker {
        if let Some(record) = batch.records.iter().find(|r| r.payload_contains(marker)) {
            let message = format!("record seq={} rejected by policy", record.seq);
            return Err(Reply::error(422, message));
        }
    }
    if let Some(max_age) = shared.max_record_age {
        let oldest =
            now_ms().saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
        if let Some(record) = batch.records.iter().find(|r| r.ts_ms < oldest) {
            let message = format!(
                "record seq={} is too old: ts_ms {} is more than {} s ago (--max-record-age)",
                record.seq,
                record.ts_ms,
                max_age.as_secs()
            );
            return Err(Reply::error(422, message));
        }
    }
    if let Some(rate) = &shared.rate {
        let mut window = rate.lock().unwrap_or_else(|e| e.into_inner());
        if !window.admit(batch.records.len() as u64) {
            return Err(Reply::error(429, "over this cloud's records per second")
                .with_header("Retry-After", "1"));
        }
    }
    match shared.store.ingest(&batch) {
        Ok(outcome) => {
            debug!(
                "batch stored device={} accepted={} duplicates={} gaps={}",
                batch.device_id, outcome.accepted, outcome.duplicates, outcome.new_gaps
            );
            Ok(outcome)
        }
        Err(e @ store::Error::ReservedDeviceId { .. }) => {
            Err(Reply::error(400, format!("device_id: {e}")))
        }
        Err(e @ store::Error::Clash { .. }) => Err(Reply::error(409, e.to_string())),
        Err(e @ store::Error::SyncSlow { .. }) => {
            warn!("batch not acknowledged device={}: {e}", batch.device_id);
            Err(Reply::error(503, "the disk is slow; send the batch again")
                .with_header("Retry-After", "1"))
        }
        Err(e @ store::Error::SeqTooLarge { .. }) => Err(Reply::error(422, e.to_string())),
        Err(e @ store::Error::Database { .. }) => {
            let what = format!("batch not acknowledged device={}", batch.device_id);
            shared.db_errors.say(&what, &e);
            Err(
                Reply::error(503, "the database is unavailable; send the batch again")
                    .with_header("Retry-After", "1"),
            )
        }
        Err(e) => {
            error!(
                "batch not stored device={} error={}",
                batch.device_id,
                ferry_util::error_chain(&e)
            );
            Err(Reply::error(500, "cannot store the batch"))
        }
    }
}

/// Checks authorization, content encoding and content type; `Some` is the refusal.
fn check_headers(shared: &Shared, request: &Request) -> Option<Reply> {
    if let Some(token) = &shared.token {
        let presented = header(request, "Authorization").and_then(|v| {
            let (scheme, credentials) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(credentials.trim())
        });
        let reply = match presented {
            None => Some("authorization: missing bearer token"),
            Some(t) if !crate::operators::same_bytes(t.as_bytes(), token.as_bytes()) => {
                Some("authorization: wrong bearer token")
            }
            Some(_) => None,
        };
        if let Some(message) = reply {
            return Some(Reply::error(401, message).with_header("WWW-Authenticate", "Bearer"));
        }
    }
    match header(request, "Content-Encoding") {
        None => {}
        Some(v) if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("identity") => {}
        Some(v) => {
            return Some(Reply::error(
                415,
                format!("content-encoding: {v} is not gzip or identity"),
            ));
        }
    }
    match header(request, "Content-Type") {
        None => {}
        Some(v)
            if v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) => {}
        Some(v) => {
            return Some(Reply::error(
                415,
                format!("content-type: {v} is not application/json"),
            ));
        }
    }
    None
}

fn too_large(limit: u64, what: &str) -> Reply {
    Reply::error(
        413,
        format!("body: larger than {} MiB{what}", limit / (1024 * 1024)),
    )
}

/// `GET /v1/stats`: the answers to `POST /v1/ingest` since this start (for tests that count resends).
pub(super) fn stats(shared: &Shared) -> Reply {
    let stats = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
    let status: serde_json::Map<String, Value> = stats
        .status
        .iter()
        .map(|(code, n)| (code.to_string(), json!(n)))
        .collect();
    Reply::json(
        200,
        json!({
            "requests": stats.requests,
            "accepted": stats.accepted,
            "duplicates": stats.duplicates,
            "rejected": stats.rejected,
            "status": status,
        }),
    )
}
