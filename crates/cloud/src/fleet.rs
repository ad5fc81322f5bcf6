//! The fleet as an operator reads it: `GET /v1/devices` (paged, sorted, filtered by state and id
//! prefix), `GET /v1/devices/<id>/ledger` (one device's account, see [`ledger`](crate::ledger)) and
//! `GET /metrics` (fleet totals in Prometheus text). Pure: the store selects the page
//! ([`select`] for a store that holds every summary in memory; PostgreSQL in SQL, by the same
//! rules) and adds up the [`Totals`]; this module parses the query and writes the answers.
//!
//! A device's states, any of which it may be in at once:
//! - `clash`: another gateway sent its seqs with other content (a cloned image; the files store
//!   counts since its start, PostgreSQL keeps them);
//! - `missing`: its ledger has seqs the gateway was told were stored that are not here (an alarm);
//! - `behind`: its gateway holds seqs not delivered yet (`waiting` > 0);
//! - `silent`: no batch for longer than `--silent-after` (at start, the age of its files counts);
//! - `healthy`: none of these.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::history::RATE_SLOT_MS;
use crate::store::DeviceSummary;

/// Devices per page unless `limit` says otherwise, and the most `limit` may ask for.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;

pub const STATES: [&str; 5] = ["clash", "missing", "behind", "silent", "healthy"];

/// How the list is ordered; ties (and `Id`) by device id, ascending, byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// By device id, ascending.
    Id,
    /// Most seqs waiting on the gateway first.
    Waiting,
    /// Most missing seqs first.
    Missing,
    /// Longest silent first.
    LastSeen,
}

/// A parsed `GET /v1/devices` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// One of [`STATES`].
    pub state: Option<&'static str>,
    /// Only ids starting with this (characters of device ids only).
    pub prefix: Option<String>,
    pub sort: Sort,
    pub offset: usize,
    pub limit: usize,
}

/// One page of the fleet list: the devices `Query` asked for, in its order, and how many matched.
#[derive(Debug)]
pub struct Page {
    pub devices: Vec<DeviceSummary>,
    pub total: u64,
}

/// The fleet's figures for `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub devices: u64,
    /// Devices in each of [`STATES`], in its order (a device may be in several).
    pub by_state: [u64; STATES.len()],
    pub delivered: u64,
    pub gaps: u64,
    pub waiting: u64,
    pub missing: u64,
    pub unbalanced: u64,
    /// The oldest unsent record over the devices with seqs waiting, as reported.
    pub oldest_unsent_ts_ms: Option<u64>,
    /// Devices with seqs waiting, by the age of their oldest unsent record: `[i]` counts ages up
    /// to [`BACKLOG_AGE_S`]`[i]` (and above the one before), the last one those above them all
    /// and those that did not report an age.
    pub backlog_age: [u64; BACKLOG_AGE_S.len() + 1],
}

/// Upper bounds (seconds) of the backlog age buckets of [`Totals::backlog_age`]: a minute, ten
/// minutes, an hour, six hours, a day, a week.
pub const BACKLOG_AGE_S: [u64; 6] = [60, 600, 3_600, 21_600, 86_400, 604_800];

/// The bucket of [`Totals::backlog_age`] for a device whose oldest unsent record was received at
/// `oldest_ts_ms` (`None`: not reported).
pub fn backlog_age_bucket(oldest_ts_ms: Option<u64>, now_ms: u64) -> usize {
    match oldest_ts_ms {
        Some(ts) => {
            let age_s = now_ms.saturating_sub(ts) / 1000;
            BACKLOG_AGE_S
                .iter()
                .position(|&bound| age_s <= bound)
                .unwrap_or(BACKLOG_AGE_S.len())
        }
        None => BACKLOG_AGE_S.len(),
    }
}

impl Totals {
    /// The totals of summaries held in memory.
    pub fn of(devices: &[DeviceSummary], now_ms: u64, silent_after_ms: u64) -> Totals {
        let mut t = Totals {
            devices: devices.len() as u64,
            ..Totals::default()
        };
        for d in devices {
            for s in states(d, now_ms, silent_after_ms) {
                if let Some(i) = STATES.iter().position(|x| *x == s) {
                    t.by_state[i] += 1;
                }
            }
            let l = &d.ledger;
            t.delivered += l.delivered;
            t.gaps += l.gap_total();
            t.waiting += l.waiting;
            t.missing += l.missing;
            t.unbalanced += u64::from(!l.balances());
            if let Some(ts) = l.oldest_unsent_ts_ms.filter(|_| l.waiting > 0) {
                t.oldest_unsent_ts_ms = Some(t.oldest_unsent_ts_ms.map_or(ts, |o| o.min(ts)));
            }
            if l.waiting > 0 {
                t.backlog_age[backlog_age_bucket(l.oldest_unsent_ts_ms, now_ms)] += 1;
            }
        }
        t
    }
}

/// Parses `state=..&prefix=..&sort=..&offset=..&limit=..`; a clear error names the parameter.
pub fn parse_query(query: &str) -> Result<Query, String> {
    let mut q = Query {
        state: None,
        prefix: None,
        sort: Sort::Id,
        offset: 0,
        limit: DEFAULT_LIMIT,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |what: &str| {
            value
                .parse::<usize>()
                .map_err(|_| format!("{what}: not a non-negative integer: {value:?}"))
        };
        match key {
            "state" => {
                q.state = Some(
                    STATES
                        .iter()
                        .find(|s| **s == value)
                        .copied()
                        .ok_or_else(|| {
                            format!(
                                "state: one of {} expected, not {value:?}",
                                STATES.join(", ")
                            )
                        })?,
                )
            }
            "prefix" => {
                if !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    return Err(format!(
                        "prefix: only A-Z a-z 0-9 . _ - (as in device ids), not {value:?}"
                    ));
                }
                q.prefix = Some(value.to_owned());
            }
            "sort" => {
                q.sort = match value {
                    "id" => Sort::Id,
                    "waiting" => Sort::Waiting,
                    "missing" => Sort::Missing,
                    "last_seen" => Sort::LastSeen,
                    _ => {
                        return Err(format!(
                            "sort: one of id, waiting, missing, last_seen expected, not {value:?}"
                        ));
                    }
                }
            }
            "offset" => q.offset = number("offset")?,
            "limit" => {
                q.limit = number("limit")?;
                if q.limit == 0 || q.limit > MAX_LIMIT {
                    return Err(format!("limit: 1 to {MAX_LIMIT}, not {}", q.limit));
                }
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(q)
}

/// The states of a device at `now_ms` (see the module header); `healthy` alone when none applies.
pub fn states(d: &DeviceSummary, now_ms: u64, silent_after_ms: u64) -> Vec<&'static str> {
    let mut out = Vec::new();
    if d.clashes_total > 0 {
        out.push("clash");
    }
    if d.ledger.missing > 0 {
        out.push("missing");
    }
    if d.ledger.waiting > 0 {
        out.push("behind");
    }
    if now_ms.saturating_sub(d.last_seen_ms) > silent_after_ms {
        out.push("silent");
    }
    if out.is_empty() {
        out.push("healthy");
    }
    out
}

/// The page of `devices` (ordered by id) that `q` asks for, with the number that matched.
pub fn select(devices: Vec<DeviceSummary>, q: &Query, now_ms: u64, silent_after_ms: u64) -> Page {
    let mut matching: Vec<DeviceSummary> = devices
        .into_iter()
        .filter(|d| q.prefix.as_ref().is_none_or(|p| d.device_id.starts_with(p)))
        .filter(|d| {
            q.state
                .is_none_or(|want| states(d, now_ms, silent_after_ms).contains(&want))
        })
        .collect();
    match q.sort {
        Sort::Id => {}
        Sort::Waiting => matching.sort_by_key(|d| std::cmp::Reverse(d.ledger.waiting)),
        Sort::Missing => matching.sort_by_key(|d| std::cmp::Reverse(d.ledger.missing)),
        Sort::LastSeen => matching.sort_by_key(|d| d.last_seen_ms),
    }
    let total = matching.len() as u64;
    let devices = matching.into_iter().skip(q.offset).take(q.limit).collect();
    Page { devices, total }
}

/// `GET /v1/devices`: a page as JSON; `connected`: the page's devices with a downlink open
/// (`None`: not known, the field is `null`).
pub fn list(
    page: &Page,
    q: &Query,
    now_ms: u64,
    silent_after_ms: u64,
    connected: Option<&std::collections::HashSet<String>>,
) -> Value {
    let devices: Vec<Value> = page
        .devices
        .iter()
        .map(|d| {
            let mut v = device_json(d, &states(d, now_ms, silent_after_ms));
            v["downlink_connected"] = json!(connected.map(|c| c.contains(&d.device_id)));
            v
        })
        .collect();
    json!({ "devices": devices, "total": page.total, "offset": q.offset, "limit": q.limit })
}

/// One device as `GET /v1/devices` lists it.
pub fn device_json(d: &DeviceSummary, states: &[&str]) -> Value {
    json!({
        "device_id": d.device_id,
        "records": d.records,
        "highest_seq": d.highest_seq,
        "missing": ranges(&d.missing),
        "gaps": d.gaps.iter().map(|g| json!({
            "from_seq": g.from_seq, "to_seq": g.to_seq, "reason": g.reason.as_str()
        })).collect::<Vec<_>>(),
        "clashes": d.clashes.iter().map(|c| json!({
            "seq": c.seq, "first_seen_ms": c.first_seen_ms,
            "last_seen_ms": c.last_seen_ms, "count": c.count
        })).collect::<Vec<_>>(),
        "clashes_total": d.clashes_total,
        "states": states,
        "last_seen_ms": d.last_seen_ms,
        "ledger": ledger_summary(d),
    })
}

/// The counts of a device's ledger (`GET /v1/devices`).
fn ledger_summary(d: &DeviceSummary) -> Value {
    let l = &d.ledger;
    json!({
        "head_seq": l.head_seq,
        "acked_seq": l.acked_seq,
        "delivered": l.delivered,
        "gaps": l.gaps,
        "waiting": l.waiting,
        "missing": l.missing,
        "oldest_unsent_ts_ms": l.oldest_unsent_ts_ms,
        "backlog_bytes": l.backlog_bytes,
        "reported": l.reported,
        "upstream_gaps": d.upstream_gaps,
    })
}

/// `GET /v1/devices/<id>/ledger`: the counts, the lowest waiting and missing ranges, the states.
pub fn ledger_json(d: &DeviceSummary, now_ms: u64, silent_after_ms: u64) -> Value {
    let mut v = ledger_summary(d);
    v["device_id"] = json!(d.device_id);
    v["waiting_ranges"] = ranges(&d.ledger.waiting_ranges);
    v["missing_ranges"] = ranges(&d.ledger.missing_ranges);
    v["balanced"] = json!(d.ledger.balances());
    v["states"] = json!(states(d, now_ms, silent_after_ms));
    v["last_seen_ms"] = json!(d.last_seen_ms);
    v
}

fn ranges(r: &[(u64, u64)]) -> Value {
    Value::Array(r.iter().map(|&(a, b)| json!([a, b])).collect())
}

/// Fleet totals in the Prometheus text format.
pub fn metrics(t: &Totals, now_ms: u64) -> String {
    let Totals {
        devices,
        by_state,
        delivered,
        gaps,
        waiting,
        missing,
        unbalanced,
        oldest_unsent_ts_ms: oldest,
        ..
    } = t.clone();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ferry_cloud_devices Devices with stored records or gaps or a reported account, by state (a device may be in several).\n# TYPE ferry_cloud_devices gauge"
    );
    let _ = writeln!(out, "ferry_cloud_devices{{state=\"all\"}} {devices}");
    for (s, n) in STATES.iter().zip(by_state) {
        let _ = writeln!(out, "ferry_cloud_devices{{state=\"{s}\"}} {n}");
    }
    let mut gauge = |name: &str, help: &str, value: u64| gauge(&mut out, name, help, value);
    gauge(
        "ferry_cloud_ledger_delivered_records",
        "Seqs stored, over the fleet.",
        delivered,
    );
    gauge(
        "ferry_cloud_ledger_gap_records",
        "Seqs declared as gaps by the gateways and not stored, over the fleet.",
        gaps,
    );
    gauge(
        "ferry_cloud_ledger_waiting_records",
        "Seqs the gateways hold and have not delivered yet, over the fleet.",
        waiting,
    );
    gauge(
        "ferry_cloud_ledger_missing_records",
        "Seqs the gateways were told were stored that are not here (an alarm), over the fleet.",
        missing,
    );
    gauge(
        "ferry_cloud_ledger_unbalanced_devices",
        "Devices whose account does not balance (a bug: always 0).",
        unbalanced,
    );
    gauge(
        "ferry_cloud_oldest_unsent_age_seconds",
        "Age of the oldest record a gateway holds undelivered, as reported (0 when none).",
        oldest.map_or(0, |ts| now_ms.saturating_sub(ts) / 1000),
    );
    out
}

/// Appends one gauge to a Prometheus text exposition: its help, its type and its value.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// `GET /v1/fleet`: the totals as JSON, with the records accepted per second over the last
/// minutes (`rate`, oldest first, one per [`RATE_SLOT_MS`]: see [`crate::history::RateHistory`]).
pub fn fleet_json(t: &Totals, now_ms: u64, rate: &[f64]) -> Value {
    let by_state: serde_json::Map<String, Value> = STATES
        .iter()
        .zip(t.by_state)
        .map(|(s, n)| ((*s).to_owned(), json!(n)))
        .collect();
    json!({
        "devices": t.devices,
        "by_state": by_state,
        "delivered": t.delivered,
        "gaps": t.gaps,
        "waiting": t.waiting,
        "missing": t.missing,
        "unbalanced": t.unbalanced,
        "oldest_unsent_age_s": t.oldest_unsent_ts_ms.map(|ts| now_ms.saturating_sub(ts) / 1000),
        "backlog_age": {"le_s": BACKLOG_AGE_S, "devices": t.backlog_age},
        "rate": rate,
        "rate_slot_s": RATE_SLOT_MS / 1000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_ages_fall_in_their_buckets() {
        let now = 10_000_000_000;
        assert_eq!(backlog_age_bucket(Some(now - 59_000), now), 0);
        assert_eq!(backlog_age_bucket(Some(now - 61_000), now), 1);
        assert_eq!(backlog_age_bucket(Some(now - 700_000_000), now), 6);
        assert_eq!(backlog_age_bucket(None, now), 6);
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        for (query, says) in [
            ("state=lost", "state: one of"),
            ("limit=0", "limit: 1 to"),
            ("limit=20000", "limit: 1 to"),
            ("offset=-1", "offset: not"),
            ("sort=size", "sort: one of"),
            ("prefix=a/b", "prefix: only"),
            ("colour=red", "unknown parameter"),
        ] {
            let e = parse_query(query).expect_err(query);
            assert!(e.contains(says), "{query}: {e}");
        }
        let q = parse_query("state=behind&prefix=gw-1&sort=waiting&offset=5&limit=7").unwrap();
        assert_eq!(
            (q.state, q.prefix.as_deref(), q.sort, q.offset, q.limit),
            (Some("behind"), Some("gw-1"), Sort::Waiting, 5, 7)
        );
    }
}
