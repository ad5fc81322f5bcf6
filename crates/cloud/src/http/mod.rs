//! The receiver's HTTP surface: the `tiny_http::Server`, its named worker threads, routing, the
//! operators' credentials and the cross-site guard, and writing answers. What each endpoint does
//! is in [`ingest`] (uploads) and [`operator`] (the operators' API); both answer with a [`Reply`].
//!
//! Every worker takes requests with `recv_timeout` ([`POLL_INTERVAL`]) and looks at the shutdown
//! flag between them; a panic while serving one request drops its connection, not the worker.

mod ingest;
mod operator;

use std::io::{self, Read};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::{Level, debug, error, log, warn};
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::commands::Commands;
use crate::store::{self, Store};
use crate::{Config, MAX_BODY_BYTES, batch, console, history, operators};

use self::ingest::{RateWindow, Stats, ingest, stats};
use self::operator::{
    device_history, devices, downlink_route, fleet_overview, ledger, metrics, records,
};

/// How long a worker waits for a request before it looks at the shutdown flag again.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// State shared by the workers.
pub(crate) struct Shared {
    pub(crate) server: tiny_http::Server,
    pub(crate) store: Store,
    pub(crate) reject_marker: Option<String>,
    pub(crate) token: Option<String>,
    operators: operators::Operators,
    rate: Option<Mutex<RateWindow>>,
    stats: Mutex<Stats>,
    /// Records accepted per ten seconds, for the console's chart.
    history: Mutex<history::RateHistory>,
    pub(crate) commands: Arc<Commands>,
    silent_after_ms: u64,
    max_record_age: Option<Duration>,
    db_errors: store::FailureLog,
}

impl Shared {
    pub(crate) fn new(
        server: tiny_http::Server,
        store: Store,
        config: &Config,
        commands: Arc<Commands>,
    ) -> Shared {
        Shared {
            server,
            store,
            reject_marker: config.reject_marker.clone(),
            token: config.token.clone(),
            operators: config.operators.clone(),
            rate: config
                .max_records_per_sec
                .map(|limit| Mutex::new(RateWindow::new(limit))),
            stats: Mutex::new(Stats::default()),
            history: Mutex::new(history::RateHistory::default()),
            commands,
            silent_after_ms: u64::try_from(config.silent_after.as_millis()).unwrap_or(u64::MAX),
            max_record_age: config.max_record_age,
            db_errors: store::FailureLog::default(),
        }
    }
}

pub(crate) fn worker(shared: &Shared, shutdown: &AtomicBool) {
    while !shutdown.load(Ordering::SeqCst) {
        let request = match shared.server.recv_timeout(POLL_INTERVAL) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(e) => {
                warn!("accept failed error={e}");
                continue;
            }
        };
        // A panic while serving one request must not shrink the pool.
        if panic::catch_unwind(AssertUnwindSafe(|| serve(shared, request))).is_err() {
            error!("request handler panicked; the connection is dropped");
        }
    }
    debug!("worker stopped");
}

/// Thread `cloud-rates` (PostgreSQL only): publishes this replica's records per ten seconds every
/// [`history::PUBLISH_EVERY`] while they change, and once more at shutdown (see
/// [`crate::history`]). A publish that fails is said (once a minute) and done again next time.
pub(crate) fn publish_rates(shared: &Shared, shutdown: &AtomicBool) {
    let mut published = Vec::new();
    loop {
        let stopping = crate::sleep_unless(shutdown, history::PUBLISH_EVERY);
        let current = now_ms() / history::RATE_SLOT_MS;
        // The slot before the current one too: its last records came after its last publish.
        let counts = shared
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since(current.saturating_sub(1));
        if counts != published {
            let kept_from = current.saturating_sub(history::RATE_SLOTS);
            match shared
                .store
                .publish_rates(shared.commands.instance(), &counts, kept_from)
            {
                Ok(()) => published = counts,
                Err(e) => shared.db_errors.say("records per second not published", &e),
            }
        }
        if stopping {
            break;
        }
    }
    debug!("rates publisher stopped");
}

/// An answer: status, body, extra headers.
struct Reply {
    status: u16,
    body: Body,
    headers: Vec<(&'static str, String)>,
}

enum Body {
    Json(Value),
    /// Prometheus text exposition.
    Text(String),
    /// NDJSON, or nothing.
    Records(Option<store::Records>),
    /// An embedded console asset.
    Asset(console::Asset),
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: Body::Json(body),
            headers: Vec::new(),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error": message.into() }))
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

fn serve(shared: &Shared, mut request: Request) {
    let (path, query) = {
        let mut parts = request.url().splitn(2, '?');
        let path = parts.next().unwrap_or_default().to_owned();
        (path, parts.next().unwrap_or_default().to_owned())
    };
    let method = request.method().clone();
    let is_get = matches!(method, Method::Get | Method::Head);
    let is_ingest = path == "/v1/ingest" && method == Method::Post;
    // The operator endpoints (see `operators`): who is asking, or the refusal.
    let operator = if path == "/v1/stats" || path == "/v1/fleet" || path.starts_with("/v1/devices")
    {
        if let Some(refusal) = cross_site(shared, &request) {
            warn!(
                "operator endpoint refused remote={} path={path} error={refusal}",
                remote(&request)
            );
            discard_chunked_body(&mut request);
            respond(request, Reply::error(403, refusal));
            return;
        }
        match shared.operators.identify(header(&request, "Authorization")) {
            Ok(name) => Some(name.unwrap_or("(open)").to_owned()),
            Err(refusal) => {
                warn!(
                    "operator endpoint refused remote={} path={path} error={}",
                    remote(&request),
                    refusal.message()
                );
                discard_chunked_body(&mut request);
                let reply =
                    Reply::error(401, refusal.message()).with_header("WWW-Authenticate", "Bearer");
                respond(request, reply);
                return;
            }
        }
    } else {
        None
    };
    let reply = match path.as_str() {
        "/v1/ingest" if is_ingest => {
            let outcome = ingest(shared, &mut request);
            shared.count(&outcome);
            match outcome {
                Ok(o) => Reply::json(
                    200,
                    json!({ "accepted": o.accepted, "duplicates": o.duplicates }),
                ),
                Err(refusal) => refusal,
            }
        }
        "/v1/ingest" => not_allowed("POST"),
        "/v1/devices" if is_get => devices(shared, &query),
        "/v1/stats" if is_get => stats(shared),
        "/v1/fleet" if is_get => fleet_overview(shared),
        "/v1/fleet" => not_allowed("GET, HEAD"),
        _ if path == "/console" || path.starts_with("/console/") => match console::asset(&path) {
            Some(_) if !is_get => not_allowed("GET, HEAD"),
            Some(asset) => {
                let mut reply = Reply {
                    status: 200,
                    body: Body::Asset(asset),
                    headers: Vec::new(),
                };
                for (name, value) in console::SECURITY_HEADERS {
                    reply = reply.with_header(name, value);
                }
                reply
            }
            None => Reply::error(404, format!("no such path {path}")),
        },
        "/metrics" if is_get => metrics(shared),
        "/v1/devices" | "/v1/stats" | "/metrics" => not_allowed("GET, HEAD"),
        _ if device_view(&path).is_some() => match device_view(&path) {
            Some(_) if !is_get => not_allowed("GET, HEAD"),
            Some((_, id)) if !batch::is_valid_device_id(id) => Reply::error(404, "no such device"),
            Some(("/ledger", id)) => ledger(shared, id),
            Some((_, id)) => device_history(shared, id),
            None => Reply::error(404, format!("no such path {path}")),
        },
        _ if path.starts_with("/v1/devices/")
            && !path.ends_with("/records")
            && path.split('/').count() >= 5 =>
        {
            let by = operator.as_deref().unwrap_or_default();
            downlink_route(shared, &mut request, &path, is_get, by)
        }
        _ => match path
            .strip_prefix("/v1/devices/")
            .and_then(|rest| rest.strip_suffix("/records"))
        {
            Some(_) if !is_get => not_allowed("GET, HEAD"),
            Some(id) if batch::is_valid_device_id(id) => records(shared, id, &query),
            Some(_) => Reply::error(404, "no such device"),
            None => Reply::error(404, format!("no such path {path}")),
        },
    };
    // 5xx answers are logged with their cause where they are made. An identity clash needs an
    // operator (give one gateway a new id); other refusals are the device's problem.
    if is_ingest && (400..500).contains(&reply.status) {
        if let Body::Json(body) = &reply.body {
            let level = if reply.status == 409 {
                Level::Error
            } else {
                Level::Warn
            };
            log!(
                level,
                "batch refused status={} remote={} error={}",
                reply.status,
                remote(&request),
                body["error"].as_str().unwrap_or_default()
            );
        }
    }
    discard_chunked_body(&mut request);
    respond(request, reply);
}

/// `/v1/devices/<id>/ledger` and `/v1/devices/<id>/history`: which of the two, and the id.
fn device_view(path: &str) -> Option<(&'static str, &str)> {
    ["/ledger", "/history"].into_iter().find_map(|view| {
        let id = path.strip_prefix("/v1/devices/")?.strip_suffix(view)?;
        Some((view, id))
    })
}

/// Why an operator request may come from a web page rather than an operator: a POST whose
/// type a page can send without asking the server first (none, a form, plain text), or, while the
/// operator endpoints are open (loopback, no `--operators`), a `Host` other than a loopback one
/// (a page whose name was pointed at this host). `None`: it may go on.
fn cross_site(shared: &Shared, request: &Request) -> Option<&'static str> {
    if *request.method() == Method::Post {
        let kind = header(request, "Content-Type")
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        match kind.as_deref() {
            None
            | Some("text/plain")
            | Some("application/x-www-form-urlencoded")
            | Some("multipart/form-data") => {
                return Some("content-type: application/json (or another non-form type) expected");
            }
            Some(_) => {}
        }
    }
    if shared.operators.is_open() {
        let host = header(request, "Host").unwrap_or_default();
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(name, _)| name),
        };
        let loopback = name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Some(
                "host: without --operators the operator endpoints answer loopback names only",
            );
        }
    }
    None
}

fn not_allowed(allow: &str) -> Reply {
    Reply::error(405, "method not allowed").with_header("Allow", allow)
}

fn remote(request: &Request) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

fn respond(request: Request, reply: Reply) {
    let mut headers: Vec<Header> = reply
        .headers
        .iter()
        .filter_map(|(name, value)| Header::from_bytes(name.as_bytes(), value.as_bytes()).ok())
        .collect();
    let status = StatusCode(reply.status);
    let result = match reply.body {
        Body::Json(value) => {
            let mut bytes = value.to_string().into_bytes();
            bytes.push(b'\n');
            headers.extend(Header::from_bytes("Content-Type", "application/json").ok());
            let len = bytes.len();
            request.respond(Response::new(
                status,
                headers,
                io::Cursor::new(bytes),
                Some(len),
                None,
            ))
        }
        Body::Asset(asset) => {
            headers.extend(Header::from_bytes("Content-Type", asset.content_type).ok());
            headers.extend(Header::from_bytes("Cache-Control", "no-cache").ok());
            request.respond(Response::new(
                status,
                headers,
                asset.body,
                Some(asset.body.len()),
                None,
            ))
        }
        Body::Text(text) => {
            headers.extend(Header::from_bytes("Content-Type", "text/plain; version=0.0.4").ok());
            let len = text.len();
            request.respond(Response::new(
                status,
                headers,
                io::Cursor::new(text.into_bytes()),
                Some(len),
                None,
            ))
        }
        Body::Records(file) => {
            headers.extend(Header::from_bytes("Content-Type", "application/x-ndjson").ok());
            match file {
                Some(store::Records { reader, len }) => {
                    // With a known length tiny_http would still switch to chunked past 32 KiB; a
                    // plain Content-Length is easier on simple clients. (A length past usize, which
                    // cannot occur on 64-bit targets, is sent chunked.)
                    let known = usize::try_from(len).ok();
                    let response = Response::new(status, headers, reader, known, None)
                        .with_chunked_threshold(usize::MAX);
                    request.respond(response)
                }
                None => request.respond(Response::new(status, headers, io::empty(), Some(0), None)),
            }
        }
    };
    if let Err(e) = result {
        debug!("response not delivered error={e}");
    }
}

fn header<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().trim())
}

/// The answer when the store cannot be read: the database may be back in a moment.
fn unreadable(shared: &Shared, what: &str, e: &store::Error) -> Reply {
    match e {
        store::Error::Database { .. } => {
            shared.db_errors.say(&format!("{what} not readable"), e);
            Reply::error(
                503,
                format!("cannot read {what}: the database is unavailable"),
            )
            .with_header("Retry-After", "1")
        }
        _ => {
            error!("{what} not readable error={}", ferry_util::error_chain(e));
            Reply::error(500, format!("cannot read {what}"))
        }
    }
}

/// Reads and drops what is left of a chunked request body, up to the body limit, so the connection
/// can carry the next request. A body with a `Content-Length` is drained by tiny_http itself, after
/// the answer is written.
fn discard_chunked_body(request: &mut Request) {
    if request.body_length().is_none() {
        let _ = io::copy(
            &mut Paced::new(request.as_reader()).take(MAX_BODY_BYTES),
            &mut io::sink(),
        );
    }
}

/// The HTTP listener, with `TCP_NODELAY`, which the connections it accepts inherit (Linux).
/// tiny_http writes an answer through a 1 KiB buffer, so a longer one leaves in several
/// segments; on a kept-alive connection Nagle's algorithm held the last of them until the
/// client's delayed ACK, 40 ms later, for every such answer.
///
/// Each connection's reads wait at most `idle_timeout` and its writes [`WRITE_TIMEOUT`], and at
/// most `max_connections` are open (the vendored tiny_http's `Limits`, see vendor/README.md).
pub(crate) fn bind_http(
    addr: &str,
    idle_timeout: Duration,
    max_connections: usize,
) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    let listener = std::net::TcpListener::bind(addr)?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    let limits = tiny_http::Limits {
        read_timeout: Some(idle_timeout),
        write_timeout: Some(WRITE_TIMEOUT),
        max_connections: Some(max_connections),
    };
    tiny_http::Server::from_listener_with_limits(listener, None, limits)
}

/// How long one write of an answer may wait for the client to take some of it: a client that
/// stops reading holds a worker (one of [`crate::Config::workers`]) no longer than this (one that
/// reads a trickle, longer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// File descriptors kept for everything but the HTTP connections: the listeners, the store's
/// files or database connections, the downlink's connections, logs.
const DESCRIPTORS_RESERVED: u64 = 128;

/// Says at start (WARN) when `max_connections` HTTP connections, two descriptors each, and
/// [`DESCRIPTORS_RESERVED`] do not fit under this process's limit (`ulimit -n`): the receiver
/// would run out of descriptors before reaching its bound (it then pauses accepting, see the
/// vendored tiny_http, rather than failing).
pub(crate) fn check_descriptors(max_connections: usize) {
    let needed = 2 * max_connections as u64 + DESCRIPTORS_RESERVED;
    match descriptor_limit() {
        Some(limit) if needed > limit => warn!(
            "--max-connections {max_connections} needs up to {needed} file descriptors, more than \
             this process may open ({limit}, ulimit -n): raise the limit or lower --max-connections"
        ),
        _ => {}
    }
}

/// This process's soft limit of open files (`/proc/self/limits`); `None` if unlimited or unread.
fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    ferry_util::epoch_ms(std::time::SystemTime::now())
}

/// How long a request body may take before it must keep up [`BODY_MIN_RATE`].
const BODY_GRACE: Duration = Duration::from_secs(20);
/// The slowest a request body may arrive, bytes a second, past [`BODY_GRACE`] (4 kbit/s; the
/// defaults of Apache's `mod_reqtimeout`, `body=20,MinRate=500`).
const BODY_MIN_RATE: u64 = 500;

/// A request body that must arrive at [`BODY_MIN_RATE`] after [`BODY_GRACE`]: by `t` seconds a
/// client must have sent `(t - 20) * 500` bytes, or the next read fails (`TimedOut`). Each read
/// still waits at most the idle timeout, so a client that dribbles its body (a byte per read,
/// each within the idle timeout) holds a worker for about its allowance and one idle timeout,
/// not for as long as it keeps dribbling. A gateway on a slow cellular link (GPRS sends 2 to 5
/// KB/s) is never cut.
struct Paced<R> {
    inner: R,
    started: std::time::Instant,
    received: u64,
}

impl<R: Read> Paced<R> {
    fn new(inner: R) -> Paced<R> {
        Paced {
            inner,
            started: std::time::Instant::now(),
            received: 0,
        }
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowed = BODY_GRACE + Duration::from_secs(self.received / BODY_MIN_RATE);
        let taken = self.started.elapsed();
        if taken > allowed {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} bytes in {} s, slower than {BODY_MIN_RATE} bytes a second",
                    self.received,
                    taken.as_secs()
                ),
            ));
        }
        let n = self.inner.read(buf)?;
        self.received += n as u64;
        Ok(n)
    }
}

/// The answer to a body that could not be read: 408 when it came too slowly (or a read waited
/// the idle timeout), 400 otherwise.
fn unreadable_body(e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            Reply::error(408, format!("body: it came too slowly: {e}"))
        }
        _ => Reply::error(400, format!("body: cannot read: {e}")),
    }
}

/// The request body, refused with 413 past `max` bytes.
fn read_small_body(request: &mut Request, max: usize) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    Paced::new(request.as_reader())
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| unreadable_body(&e))?;
    if body.len() > max {
        return Err(Reply::error(413, format!("body over {max} bytes")));
    }
    Ok(body)
}
