//! The control endpoint (`control.listen`, loopback by default): `GET /status` (JSON),
//! `GET /metrics` (Prometheus text), `GET /dead-letters`, `POST /dead-letters/<seq>/requeue`,
//! `POST /reload` (re-read the config file; answers what changed and whether the agent restarts),
//! `POST /restart` (the agent replaces itself with a fresh run, e.g. after a new device id).
//! Both ends live here: the `control` thread that serves it, and the small client behind
//! `ferry status`.
//!
//! # Who may call it
//! Every `POST` (each one changes something) needs `Authorization: Bearer <token>`, on loopback
//! too: any local user or process can reach loopback. Beyond loopback every request needs it, and
//! the config refuses such a `control.listen` without `control.token`. The token is
//! `control.token`, or one generated at first start and kept in `journal.dir/control-token`
//! (mode 0600), which the `ferry` CLI on the same machine reads ([`token`]). A missing or wrong
//! token is answered 401, compared in constant time, and logged at WARN (never the token).

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::Serialize;

use crate::config::Config;
use crate::journal::{Journal, Positions};
use crate::shutdown::Shutdown;
use crate::stats::{DownlinkState, Stats, UplinkState};
use crate::uplink::LocalError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error("cannot reach the agent at {addr} (is `ferry run` up?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Connected, but the request or its answer failed or ran out of time: the agent is up but
    /// busy or stuck, which is not the same as not running.
    #[error("the agent at {addr} did not answer")]
    NoAnswer {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad answer from the agent at {addr}: {message}")]
    Answer { addr: SocketAddr, message: String },
    #[error(
        "cannot read the control token {path} (run this as the user the agent runs as, or set control.token)"
    )]
    TokenRead {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot store a new control token in {path}")]
    TokenStore {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The file in `journal.dir` that keeps the generated token.
const TOKEN_FILE: &str = "control-token";

/// Who may call the endpoint: the token, and whether reads need it too (beyond loopback).
#[derive(Clone)]
pub struct Access {
    token: String,
    reads_too: bool,
}

impl Access {
    pub fn new(token: String, listen: SocketAddr) -> Access {
        Access {
            token,
            reads_too: !listen.ip().is_loopback(),
        }
    }

    /// Whether a request with these headers may use `method`.
    fn allows(&self, method: &tiny_http::Method, headers: &[tiny_http::Header]) -> bool {
        if *method != tiny_http::Method::Post && !self.reads_too {
            return true;
        }
        headers.iter().any(|h| {
            h.field.equiv("Authorization")
                && h.value
                    .as_str()
                    .strip_prefix("Bearer ")
                    .is_some_and(|t| same(t.trim().as_bytes(), self.token.as_bytes()))
        })
    }
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token the endpoint requires: `control.token`, else the one kept in
/// `journal.dir/control-token`. With `create` (the agent at start) a missing one is generated and
/// stored (mode 0600); without (the CLI) a missing one is an error.
pub fn token(cfg: &Config, create: bool) -> Result<String, Error> {
    if let Some(t) = &cfg.control.token {
        return Ok(t.expose().to_owned());
    }
    let path = cfg.journal.dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 16 => {
            if create {
                // Someone loosened it: only the agent's user may read it.
                use std::os::unix::fs::PermissionsExt;
                let private = std::fs::Permissions::from_mode(0o600);
                if let Err(e) = std::fs::set_permissions(&path, private) {
                    warn!("cannot make {} private (0600): {}", path.display(), e);
                }
            }
            return Ok(t.trim().to_owned());
        }
        Ok(_) if !create => {
            return Err(Error::TokenRead {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "too short"),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(source) => return Err(Error::TokenRead { path, source }),
    }
    let mut bytes = [0u8; 24];
    let store = |source| Error::TokenStore {
        path: path.clone(),
        source,
    };
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(store)?;
    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::atomic_file::replace_private(&path, format!("{t}\n").as_bytes()).map_err(store)?;
    info!("generated a control token in {}", path.display());
    Ok(t)
}

/// Everything `/status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub device_id: String,
    pub version: &'static str,
    pub uptime_s: u64,
    pub mqtt_connected: bool,
    /// Why the MQTT connection is down (cleared on connect).
    pub mqtt_last_error: Option<String>,
    pub journal_accepting: bool,
    #[serde(flatten)]
    pub positions: Positions,
    pub journal_disk_bytes: u64,
    /// Age in seconds of the oldest record not yet acknowledged by the cloud; `None` when nothing waits.
    pub oldest_unsent_age_s: Option<u64>,
    /// Estimated seconds to drain the backlog at the current drain rate (or the limit when idle);
    /// `None` while nothing drains.
    pub backlog_eta_s: Option<u64>,
    pub uplink: UplinkState,
    /// Absent without a `[downlink]` section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downlink: Option<DownlinkState>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub ingested: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    pub parse_failed: u64,
    pub redeliveries: u64,
    pub qos0_dropped: u64,
    pub left_with_broker: u64,
    pub upload_failures: u64,
    pub journal_reopens: u64,
}

/// What the endpoint reads from; cheap to clone into the thread.
#[derive(Clone)]
pub struct Sources {
    pub device_id: String,
    pub journal: Journal,
    pub stats: Arc<Stats>,
    pub started: Instant,
    pub reloader: crate::reload::Reloader,
}

impl Sources {
    pub fn status(&self) -> Status {
        let s = &self.stats;
        let positions = self.journal.positions();
        let dropped_total = positions.dropped;
        let uplink = s.uplink();
        let rate = if uplink.drain_records_per_sec > 0.0 {
            Some(uplink.drain_records_per_sec)
        } else {
            uplink.limit_records_per_sec
        };
        let backlog_eta_s = match (positions.backlog_records, rate) {
            (0, _) => Some(0),
            (n, Some(r)) if r > 0.0 => Some((n as f64 / r).ceil() as u64),
            _ => None,
        };
        Status {
            device_id: self.device_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            mqtt_connected: s.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed),
            mqtt_last_error: s.mqtt_error(),
            journal_accepting: s
                .journal_accepting
                .load(std::sync::atomic::Ordering::Relaxed),
            positions,
            journal_disk_bytes: self.journal.disk_bytes(),
            oldest_unsent_age_s: match self.journal.oldest_unsent_ts_ms() {
                Ok(Some(ts)) => Some(crate::journal::now_ms().saturating_sub(ts) / 1000),
                _ => None,
            },
            backlog_eta_s,
            uplink,
            downlink: s.downlink(),
            totals: Totals {
                ingested: Stats::get(&s.ingested),
                delivered: Stats::get(&s.delivered),
                dropped: dropped_total,
                dead_lettered: Stats::get(&s.dead_lettered),
                parse_failed: Stats::get(&s.parse_failed),
                redeliveries: Stats::get(&s.redeliveries),
                qos0_dropped: Stats::get(&s.qos0_dropped),
                left_with_broker: Stats::get(&s.left_with_broker),
                upload_failures: Stats::get(&s.upload_failures),
                journal_reopens: Stats::get(&s.journal_reopens),
            },
        }
    }
}

/// Binds `addr` (so a port conflict is a start-up error) and serves it on the `control` thread.
pub fn spawn(
    addr: SocketAddr,
    access: Access,
    sources: Sources,
    shutdown: Shutdown,
) -> Result<JoinHandle<()>, Error> {
    let server = tiny_http::Server::http(addr).map_err(|e| Error::Bind {
        addr,
        message: e.to_string(),
    })?;
    info!("control endpoint listening addr={}", addr);
    thread::Builder::new()
        .name("control".into())
        .spawn(move || serve(server, access, sources, shutdown))
        .map_err(|e| Error::Bind {
            addr,
            message: e.to_string(),
        })
}

fn serve(server: tiny_http::Server, access: Access, sources: Sources, shutdown: Shutdown) {
    while !shutdown.is_set() {
        let req = match server.recv_timeout(Duration::from_millis(250)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                warn!("control endpoint accept failed: {}", e);
                shutdown.sleep(Duration::from_millis(250));
                continue;
            }
        };
        let (code, content_type, body) = if access.allows(req.method(), req.headers()) {
            route(req.method(), req.url(), &sources)
        } else {
            warn!(
                "control {} {} refused: no valid token (from {:?})",
                req.method(),
                req.url(),
                req.remote_addr()
            );
            (
                401,
                "application/json",
                error_json("this needs the control token: Authorization: Bearer <token>"),
            )
        };
        debug!("control {} {} -> {}", req.method(), req.url(), code);
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes());
        let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
        if let Ok(h) = header {
            resp = resp.with_header(h);
        }
        if let Err(e) = req.respond(resp) {
            debug!("control response not delivered: {}", e);
        }
    }
}

fn route(method: &tiny_http::Method, url: &str, sources: &Sources) -> (u16, &'static str, String) {
    use tiny_http::Method::{Get, Post};
    const JSON: &str = "application/json";
    let path = url.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Get, ["status"]) => (200, JSON, to_json(&sources.status())),
        (Get, ["metrics"]) => (200, "text/plain; version=0.0.4", metrics(&sources.status())),
        (Get, ["dead-letters"]) => match sources.journal.dead_letters(1000) {
            Ok(list) => (
                200,
                JSON,
                to_json(&serde_json::json!({ "dead_letters": list })),
            ),
            Err(e) => (500, JSON, error_json(&crate::error_chain(&e))),
        },
        (Post, ["dead-letters", seq, "requeue"]) => match seq.parse::<u64>() {
            Err(_) => (400, JSON, error_json(&format!("not a seq: {seq}"))),
            Ok(seq) => match sources.journal.requeue(seq) {
                Ok(new_seq) => (
                    200,
                    JSON,
                    to_json(&serde_json::json!({ "seq": seq, "new_seq": new_seq })),
                ),
                Err(e @ crate::journal::Error::NoDeadLetter { .. }) => {
                    (404, JSON, error_json(&e.to_string()))
                }
                Err(e) => (500, JSON, error_json(&crate::error_chain(&e))),
            },
        },
        (Post, ["reload"]) => match sources.reloader.reload(Duration::from_secs(5)) {
            Ok(plan) => (200, JSON, to_json(&plan.to_json())),
            Err(e) => (409, JSON, error_json(&e)),
        },
        (Post, ["restart"]) => match sources.reloader.restart(Duration::from_secs(5)) {
            Ok(_) => (200, JSON, to_json(&serde_json::json!({ "restart": true }))),
            Err(e) => (409, JSON, error_json(&e)),
        },
        (_, ["status"] | ["metrics"] | ["dead-letters"] | ["reload"] | ["restart"]) => {
            (405, JSON, error_json("method not allowed"))
        }
        _ => (404, JSON, error_json("not found")),
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| error_json(&e.to_string()))
}

fn error_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// Prometheus text exposition of the status.
pub fn metrics(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP ferry_{name} {help}\n# TYPE ferry_{name} {kind}\nferry_{name} {value}\n"
        ));
    };
    let p = &s.positions;
    let t = &s.totals;
    metric("head_seq", "gauge", "Highest seq assigned.", p.head_seq);
    metric(
        "acked_seq",
        "gauge",
        "Highest seq acknowledged by the cloud (the cursor).",
        p.acked_seq,
    );
    metric(
        "backlog_records",
        "gauge",
        "Journal entries not yet acknowledged.",
        p.backlog_records,
    );
    metric(
        "backlog_bytes",
        "gauge",
        "Bytes of journal entries not yet acknowledged.",
        p.backlog_bytes,
    );
    metric(
        "dead_letters",
        "gauge",
        "Records in the dead-letter store.",
        p.dead_letters,
    );
    metric(
        "journal_disk_bytes",
        "gauge",
        "Bytes the journal takes on disk.",
        s.journal_disk_bytes,
    );
    metric(
        "mqtt_connected",
        "gauge",
        "1 while connected to the broker.",
        u64::from(s.mqtt_connected),
    );
    metric(
        "journal_accepting",
        "gauge",
        "1 while the journal accepts new records.",
        u64::from(s.journal_accepting),
    );
    metric(
        "ingested_total",
        "counter",
        "Records journaled.",
        t.ingested,
    );
    metric(
        "delivered_total",
        "counter",
        "Records acknowledged by the cloud.",
        t.delivered,
    );
    metric(
        "dropped_total",
        "counter",
        "Records dropped by drop_oldest.",
        t.dropped,
    );
    metric(
        "dead_lettered_total",
        "counter",
        "Records refused by the cloud.",
        t.dead_lettered,
    );
    metric(
        "parse_failed_total",
        "counter",
        "Payloads that failed their parser.",
        t.parse_failed,
    );
    metric(
        "redeliveries_total",
        "counter",
        "Broker redeliveries not journaled twice.",
        t.redeliveries,
    );
    metric(
        "qos0_dropped_total",
        "counter",
        "QoS0 messages dropped under overload.",
        t.qos0_dropped,
    );
    metric(
        "left_with_broker_total",
        "counter",
        "QoS1 messages left with the broker while the journal was behind (taken again later).",
        t.left_with_broker,
    );
    metric(
        "upload_failures_total",
        "counter",
        "Failed upload attempts.",
        t.upload_failures,
    );
    metric(
        "journal_reopens_total",
        "counter",
        "Tries to reopen the journal after a failed write or sync (the disk is failing).",
        t.journal_reopens,
    );
    // The uplink state as an enum-style gauge: one series per state, 1 for the current one.
    out.push_str(
        "# HELP ferry_uplink_state What the uplink is doing.\n# TYPE ferry_uplink_state gauge\n",
    );
    for state in [
        "idle",
        "sending",
        "throttled",
        "backoff",
        "refused",
        "stopped",
    ] {
        let v = u64::from(s.uplink.state == state);
        out.push_str(&format!("ferry_uplink_state{{state=\"{state}\"}} {v}\n"));
    }
    out
}

/// The `/status` JSON rendered for a person (`ferry status`).
pub fn status_text(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return format!("{json}\n");
    };
    let n = |path: &[&str]| {
        let mut cur = &v;
        for p in path {
            cur = &cur[*p];
        }
        match cur {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    let downlink = if v["downlink"].is_object() {
        format!(
            "downlink      {} (commands: {}, last error: {})\n",
            n(&["downlink", "state"]),
            n(&["downlink", "commands"]),
            n(&["downlink", "last_error"])
        )
    } else {
        String::new()
    };
    format!(
        "device        {}\nversion       {} (up {} s)\nmqtt          {}\njournal       head_seq={} acked_seq={} backlog={} records / {} bytes, {} bytes on disk{}\nuplink        {} (last error: {})\n{}dead letters  {}\ntotals        ingested={} delivered={} dropped={} dead_lettered={} parse_failed={} redeliveries={}\n",
        n(&["device_id"]),
        n(&["version"]),
        n(&["uptime_s"]),
        if v["mqtt_connected"] == true {
            "connected"
        } else {
            "disconnected"
        },
        n(&["head_seq"]),
        n(&["acked_seq"]),
        n(&["backlog_records"]),
        n(&["backlog_bytes"]),
        n(&["journal_disk_bytes"]),
        if v["journal_accepting"] == false {
            ", NOT ACCEPTING (full or failing)"
        } else {
            ""
        },
        n(&["uplink", "state"]),
        n(&["uplink", "last_error"]),
        downlink,
        n(&["dead_letters"]),
        n(&["totals", "ingested"]),
        n(&["totals", "delivered"]),
        n(&["totals", "dropped"]),
        n(&["totals", "dead_lettered"]),
        n(&["totals", "parse_failed"]),
        n(&["totals", "redeliveries"]),
    )
}

/// `GET path` on the agent's control endpoint, with a deadline on every step, and the token when
/// one is given. Returns the body of a 200 answer.
pub fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<String, Error> {
    request(addr, "GET", path, token, timeout)
}

/// `POST path` (no body) on the agent's control endpoint, with the token.
pub fn post(addr: SocketAddr, path: &str, token: &str, timeout: Duration) -> Result<String, Error> {
    request(addr, "POST", path, Some(token), timeout)
}

/// Largest answer `ferry status` reads from the agent.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<String, Error> {
    let url = format!("http://{addr}{path}");
    let post = method == "POST";
    let (status, body) =
        crate::uplink::local_request(&url, post, token, timeout, MAX_ANSWER as u64).map_err(
            |e| match e {
                LocalError::NotReached(source) => Error::Connect { addr, source },
                LocalError::NoAnswer(source) => Error::NoAnswer { addr, source },
                LocalError::TooLarge => Error::Answer {
                    addr,
                    message: format!("answer over {MAX_ANSWER} bytes"),
                },
            },
        )?;
    if status != 200 {
        return Err(Error::Answer {
            addr,
            message: format!("status {status}: {}", body.trim()),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// A peer that answers one byte every 100 ms must not hold `ferry status` past its deadline:
    /// per-read timeouts alone never fire against it.
    #[test]
    fn a_dripping_peer_is_cut_off_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // A valid head, then the body one byte at a time.
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n");
            for _ in 0..50 {
                if conn.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let err = get(addr, "/status", None, Duration::from_millis(500)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // Connected but silent: busy or stuck, not "not running".
        assert!(matches!(err, Error::NoAnswer { .. }), "{err}");
        peer.join().unwrap();
    }
}
