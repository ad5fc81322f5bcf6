//! The operators' API (credentials are checked before any of these run, in [`super`]): the fleet
//! list, one device's ledger, history and records, the fleet overview and `/metrics`, the
//! receiver's own counters, and the downlink's commands.

use std::sync::PoisonError;

use log::{info, warn};
use serde_json::{Value, json};
use tiny_http::{Method, Request};

use super::{Body, Reply, Shared, not_allowed, now_ms, read_small_body, unreadable};
use crate::{batch, commands, fleet, history};

pub(super) fn devices(shared: &Shared, query: &str) -> Reply {
    let q = match fleet::parse_query(query) {
        Ok(q) => q,
        Err(e) => return Reply::error(400, e),
    };
    let now = now_ms();
    match shared.store.fleet_page(&q, now, shared.silent_after_ms) {
        Ok(page) => {
            let ids: Vec<String> = page.devices.iter().map(|d| d.device_id.clone()).collect();
            // The list stands without it: a downlink state that cannot be read is null.
            let connected = shared.commands.connected_of(&ids).ok();
            Reply::json(
                200,
                fleet::list(&page, &q, now, shared.silent_after_ms, connected.as_ref()),
            )
        }
        Err(e) => unreadable(shared, "the devices", &e),
    }
}

pub(super) fn ledger(shared: &Shared, device_id: &str) -> Reply {
    match shared.store.device_summary(device_id) {
        Ok(Some(d)) => Reply::json(
            200,
            fleet::ledger_json(&d, now_ms(), shared.silent_after_ms),
        ),
        Ok(None) => Reply::error(404, "no such device"),
        Err(e) => unreadable(shared, "the device", &e),
    }
}

pub(super) fn metrics(shared: &Shared) -> Reply {
    let now = now_ms();
    let totals = match shared.store.fleet_totals(now, shared.silent_after_ms) {
        Ok(t) => t,
        Err(e) => return unreadable(shared, "the devices", &e),
    };
    let mut text = fleet::metrics(&totals, now);
    fleet::gauge(
        &mut text,
        "ferry_cloud_http_connections",
        "HTTP connections open to this replica (at most --max-connections).",
        shared.server.num_connections() as u64,
    );
    Reply {
        status: 200,
        body: Body::Text(text),
        headers: Vec::new(),
    }
}

/// Most records `?last=N` asks for.
const MAX_LAST_RECORDS: u64 = 1000;

/// `GET /v1/devices/<id>/records[?last=N]`: all of them, or the last `N` (1 to 1000).
pub(super) fn records(shared: &Shared, device_id: &str, query: &str) -> Reply {
    let last = match query {
        "" => None,
        q => match q.strip_prefix("last=").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) if (1..=MAX_LAST_RECORDS).contains(&n) => Some(n),
            _ => {
                return Reply::error(
                    400,
                    format!("last: 1 to {MAX_LAST_RECORDS} expected, not {q:?}"),
                );
            }
        },
    };
    match shared.store.records(device_id, last) {
        Ok(records) => Reply {
            status: 200,
            body: Body::Records(records),
            headers: Vec::new(),
        },
        Err(e) => unreadable(shared, "the records", &e),
    }
}

/// `GET /v1/fleet`: the fleet's totals and its recent records/s (this replica's, and on
/// PostgreSQL every other one's as published: [`crate::history`]), for the console.
pub(super) fn fleet_overview(shared: &Shared) -> Reply {
    let now = now_ms();
    let totals = match shared.store.fleet_totals(now, shared.silent_after_ms) {
        Ok(totals) => totals,
        Err(e) => return unreadable(shared, "the devices", &e),
    };
    let first = history::RateHistory::first_slot(now);
    let others = match shared.store.other_rates(shared.commands.instance(), first) {
        Ok(others) => others,
        Err(e) => return unreadable(shared, "the records per second", &e),
    };
    let rate = shared
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .per_second(now, &others);
    Reply::json(200, fleet::fleet_json(&totals, now, &rate))
}

/// `GET /v1/devices/<id>/history`: its account per minute ([`crate::history`]).
pub(super) fn device_history(shared: &Shared, device_id: &str) -> Reply {
    match shared.store.device_history(device_id, now_ms()) {
        Ok(Some((points, kept))) => Reply::json(200, history::device_json(&points, kept)),
        Ok(None) => Reply::error(404, "no such device"),
        Err(e) => unreadable(shared, "the history", &e),
    }
}

/// `/v1/devices/<id>/commands[/<cmd id>]`, `/v1/devices/<id>/downlink`, `/v1/devices/<id>/raw`;
/// `by`: the operator asking (logged with what they send).
pub(super) fn downlink_route(
    shared: &Shared,
    request: &mut Request,
    path: &str,
    is_get: bool,
    by: &str,
) -> Reply {
    let rest = path.strip_prefix("/v1/devices/").unwrap_or_default();
    let mut parts = rest.splitn(3, '/');
    let (device, what, cmd) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next(),
    );
    if !batch::is_valid_device_id(device) {
        return Reply::error(404, "no such device");
    }
    let is_post = *request.method() == Method::Post;
    match (what, cmd) {
        ("commands", None) if is_post => {
            let body = match read_small_body(request, commands::MAX_COMMAND_BYTES) {
                Ok(b) => b,
                Err(r) => return r,
            };
            let value: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Reply::error(400, format!("malformed json: {e}")),
            };
            match shared.commands.queue(device, value, by) {
                Ok(id) => {
                    info!("command queued device={device} id={id} by={by}");
                    Reply::json(202, json!({ "id": id }))
                }
                Err(e) => refused(e),
            }
        }
        ("commands", None) if is_get => match shared.commands.recent(device, 20) {
            Ok(list) => Reply::json(200, json!({ "commands": list })),
            Err(e) => refused(e),
        },
        ("commands", None) => not_allowed("GET, HEAD, POST"),
        ("commands", Some(id)) if is_get => match shared.commands.result(device, id) {
            Ok(Some(v)) => Reply::json(200, v),
            Ok(None) => Reply::error(404, "no such command"),
            Err(e) => refused(e),
        },
        ("commands", Some(_)) => not_allowed("GET, HEAD"),
        ("downlink", None) if is_get => match shared.commands.device(device) {
            Ok(v) => Reply::json(200, v),
            Err(e) => refused(e),
        },
        ("downlink", None) => not_allowed("GET, HEAD"),
        ("raw", None) if is_post => {
            let binary = request.url().ends_with("?binary=1");
            match read_small_body(request, 32 << 20) {
                Ok(body) => match shared.commands.queue_raw(device, binary, body) {
                    Ok(()) => {
                        info!("raw frame queued device={device} binary={binary} by={by}");
                        Reply::json(202, json!({}))
                    }
                    Err(e) => Reply::error(400, e),
                },
                Err(r) => r,
            }
        }
        ("raw", None) => not_allowed("POST"),
        _ => Reply::error(404, format!("no such path {path}")),
    }
}

/// The answer to a command request that was not done: 400, or 503 when the database is away.
fn refused(e: commands::Refused) -> Reply {
    match e {
        commands::Refused::Bad(message) => Reply::error(400, message),
        commands::Refused::Unavailable(message) => {
            warn!("downlink request not done: {message}");
            Reply::error(503, "the database is unavailable; try again")
                .with_header("Retry-After", "1")
        }
    }
}
