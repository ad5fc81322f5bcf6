//! `ferry-cloud`: the reference receiver of wire protocol v1 (`docs/PROTOCOL.md`), used by the
//! integration tests and as a worked example for writing a real one.
//!
//! Layout: one `tiny_http::Server` owned by this module and a pool of named worker threads that all
//! take requests from it with `recv_timeout` and check the shutdown flag between requests. Batches
//! are validated by [`batch`] (pure), stored by [`store`] (files in a data directory, or
//! PostgreSQL shared by replicas), and seqs are tracked in [`ranges`]. Durability: `200` is answered
//! only after the new records and gaps are durable (fsynced, or committed), so everything
//! acknowledged survives a crash; dedupe by `(device_id, seq)` makes resends
//! harmless. A stored seq that comes again with different content ([`fingerprints`]) means two
//! gateways share a device id: that batch is answered `409` and stored not at all.
//!
//! Endpoints: `POST /v1/ingest`, `GET /v1/devices` (paged, sorted, filtered: [`fleet`]),
//! `GET /v1/devices/<id>/ledger` (the completeness account: [`ledger`]), `GET /metrics` (fleet
//! totals), `GET /v1/devices/<id>/records`, `GET /v1/stats`;
//! for the downlink ([`commands`], [`ws`]): `POST /v1/devices/<id>/commands` (queue a command,
//! answers its id), `GET /v1/devices/<id>/commands/<cmd id>` (pending or its result),
//! `GET /v1/devices/<id>/downlink` (connection state), and for tests `POST /v1/devices/<id>/raw`
//! (the body sent once as a text frame, or `?binary=1` as a binary frame). Every error answer has a
//! JSON body `{"error": "..."}`. Credentials: uploads and the downlink take the device token,
//! `/v1/devices...` and `/v1/stats` an operator's ([`operators`]); `/metrics` is open.
//!
//! Limits inherited from tiny_http 0.12: sockets have no read timeout, so a client that stops sending
//! mid-body holds its worker until it disconnects; a body the receiver does not read is drained after
//! the answer is written; and a request declaring an absurd body is abandoned unanswered (see
//! [`MAX_DRAINABLE_BYTES`]).
//!
//! Why one file of this length: the receiver's whole HTTP surface (routing, the credentials,
//! ingest's checks, the answers) in one place; the stores, the downlink, the fleet views, the
//! operators and the console's assets are modules of their own. It has outgrown that (over
//! 1,000 lines with the console's routes): the routes and answers are to move to `http/`
//! (routing and credentials, ingest, the operator API), as issue 13's next step.

pub mod batch;
pub mod commands;
pub mod console;
pub mod fingerprints;
pub mod fleet;
pub mod ledger;
pub mod operators;
pub mod ranges;
pub mod store;
pub mod ws;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use flate2::read::MultiGzDecoder;
use log::{Level, debug, error, info, log, warn};
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, StatusCode};

use self::commands::Commands;
use self::store::Store;
use self::store::postgres::commands::PgCommands;

/// Largest request body accepted as sent (compressed or not).
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest request body accepted after gzip decompression.
pub const MAX_DECOMPRESSED_BYTES: u64 = 256 * 1024 * 1024;
/// Largest declared body a refused request may have. tiny_http drains an unread body when the
/// request is dropped, first allocating a buffer of the whole remaining declared length; a
/// `Content-Length` of a terabyte aborts the process. A request declaring more than this is leaked
/// instead, unanswered: one connection and one tiny_http thread, rather than the whole receiver.
const MAX_DRAINABLE_BYTES: usize = 1 << 30;
/// `--silent-after` unless given: an hour without a batch.
pub const DEFAULT_SILENT_AFTER: Duration = Duration::from_secs(3600);
/// How long a worker waits for a request before it looks at the shutdown flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Validated settings of the receiver.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port`; port 0 picks a free port (see [`Cloud::local_addr`]).
    pub listen: String,
    /// Where the records, gaps and ledger are kept.
    pub store: store::Location,
    /// A batch with a record whose payload contains this string is refused with 422.
    pub reject_marker: Option<String>,
    /// When set, `POST /v1/ingest` requires `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// When set, batches that would take the records accepted in the current second past this
    /// are answered 429 with `Retry-After: 1` (a cloud protecting its database).
    pub max_records_per_sec: Option<u64>,
    /// A device that sent no batch for this long is `silent` (see [`fleet`]).
    pub silent_after: Duration,
    /// Refuse records whose `ts_ms` is older than this (422), as clouds that keep a window do.
    pub max_record_age: Option<Duration>,
    pub workers: usize,
    /// `host:port` of the downlink WebSocket endpoint ([`ws`]); `None`: no downlink.
    pub ws_listen: Option<String>,
    /// TLS for the downlink endpoint (wss).
    pub ws_tls: Option<Arc<rustls::ServerConfig>>,
    /// Who may use the operator endpoints ([`operators`]); empty: open (loopback only).
    pub operators: operators::Operators,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its messages name the file (and line) at fault.
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("listening address of {addr} is not an ip socket")]
    NotIp { addr: String },
    #[error("cannot start thread {name}")]
    Spawn { name: String, source: io::Error },
    #[error("thread {name} panicked")]
    Panicked { name: String },
}

/// A running receiver: its address and its worker threads.
#[derive(Debug)]
pub struct Cloud {
    addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    workers: Vec<JoinHandle<()>>,
}

impl Cloud {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The downlink endpoint's address, when it listens.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// Waits for every worker to exit, which they do within about [`POLL_INTERVAL`] after the
    /// shutdown flag is set (plus the time to finish the request in hand).
    pub fn join(self) -> Result<(), Error> {
        let mut result = Ok(());
        for worker in self.workers {
            let name = worker.thread().name().unwrap_or("worker").to_owned();
            if worker.join().is_err() && result.is_ok() {
                result = Err(Error::Panicked { name });
            }
        }
        result
    }
}

/// Opens the store (rebuilding the state from the data directory, or connecting to the database
/// and migrating its schema), binds, and starts the workers. Returns once the
/// receiver is accepting connections. Setting `shutdown` stops it; then call [`Cloud::join`].
pub fn start(config: Config, shutdown: Arc<AtomicBool>) -> Result<Cloud, Error> {
    let store = Store::open(&config.store)?;
    let commands = Arc::new(match &store {
        Store::Postgres(pg) => {
            let instance = Commands::draw_instance();
            Commands::with_database(PgCommands::new(pg.pool(), instance), instance)
        }
        Store::Files(_) => Commands::default(),
    });
    let server = bind_http(&config.listen).map_err(|source| Error::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    let addr = server.server_addr().to_ip().ok_or_else(|| Error::NotIp {
        addr: config.listen.clone(),
    })?;
    let shared = Arc::new(Shared {
        server,
        store,
        reject_marker: config.reject_marker,
        token: config.token,
        operators: config.operators,
        rate: config
            .max_records_per_sec
            .map(|limit| Mutex::new(RateWindow::new(limit))),
        stats: Mutex::new(Stats::default()),
        history: Mutex::new(fleet::RateHistory::default()),
        commands: Arc::clone(&commands),
        silent_after_ms: u64::try_from(config.silent_after.as_millis()).unwrap_or(u64::MAX),
        max_record_age: config.max_record_age,
        db_errors: store::FailureLog::default(),
    });

    let mut workers = Vec::new();
    for i in 0..config.workers.max(1) {
        let name = format!("cloud-worker-{i}");
        let shared = Arc::clone(&shared);
        let flag = Arc::clone(&shutdown);
        let spawned = thread::Builder::new()
            .name(name.clone())
            .spawn(move || worker(&shared, &flag));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(source) => {
                // Stop the workers already running before reporting.
                shutdown.store(true, Ordering::SeqCst);
                for handle in workers {
                    let _ = handle.join();
                }
                return Err(Error::Spawn { name, source });
            }
        }
    }
    let mut ws_addr = None;
    if let Some(listen) = &config.ws_listen {
        let reporting = Arc::clone(&shared);
        let options = ws::Options {
            token: shared.token.clone(),
            tls: config.ws_tls.clone(),
            on_held: Some(Arc::new(move |device_id: &str, held| {
                if let Err(e) = reporting.store.report(device_id, held, now_ms()) {
                    warn!(
                        "hello's account not kept device={device_id} error={}",
                        ferry_util::error_chain(&e)
                    );
                }
            })),
        };
        match ws::start(
            listen,
            options,
            Arc::clone(&shared.commands),
            Arc::clone(&shutdown),
        ) {
            Ok((addr, handle)) => {
                ws_addr = Some(addr);
                workers.push(handle);
            }
            Err(source) => {
                shutdown.store(true, Ordering::SeqCst);
                for handle in workers {
                    let _ = handle.join();
                }
                return Err(Error::Bind {
                    addr: listen.clone(),
                    source: Box::new(source),
                });
            }
        }
    }
    if ws_addr.is_some() {
        match shared.commands.listen(Arc::clone(&shutdown)) {
            None => {}
            Some(Ok(handle)) => workers.push(handle),
            Some(Err(source)) => {
                shutdown.store(true, Ordering::SeqCst);
                for handle in workers {
                    let _ = handle.join();
                }
                return Err(Error::Spawn {
                    name: "cloud-pg-listen".into(),
                    source,
                });
            }
        }
    }
    info!(
        "listening addr={} store={} workers={} token={} reject_marker={}",
        addr,
        shared.store,
        workers.len(),
        shared.token.is_some(),
        shared.reject_marker.is_some()
    );
    Ok(Cloud {
        addr,
        ws_addr,
        workers,
    })
}

/// State shared by the workers.
struct Shared {
    server: tiny_http::Server,
    store: Store,
    reject_marker: Option<String>,
    token: Option<String>,
    operators: operators::Operators,
    rate: Option<Mutex<RateWindow>>,
    stats: Mutex<Stats>,
    /// Records accepted per ten seconds, for the console's chart.
    history: Mutex<fleet::RateHistory>,
    commands: Arc<Commands>,
    silent_after_ms: u64,
    max_record_age: Option<Duration>,
    db_errors: store::FailureLog,
}

/// Records accepted in the current one-second window.
#[derive(Debug)]
struct RateWindow {
    limit: u64,
    start: std::time::Instant,
    count: u64,
}

impl RateWindow {
    fn new(limit: u64) -> RateWindow {
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
struct Stats {
    requests: u64,
    accepted: u64,
    duplicates: u64,
    /// 4xx answers.
    rejected: u64,
    status: BTreeMap<u16, u64>,
}

fn worker(shared: &Shared, shutdown: &AtomicBool) {
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
    if request
        .body_length()
        .is_some_and(|n| n > MAX_DRAINABLE_BYTES)
    {
        warn!(
            "connection abandoned remote={} content_length={:?} reason=declared body too large to drain",
            remote(&request),
            request.body_length()
        );
        std::mem::forget(request);
        return;
    }
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
        _ if path.starts_with("/v1/devices/") && path.ends_with("/ledger") => {
            match path
                .strip_prefix("/v1/devices/")
                .and_then(|rest| rest.strip_suffix("/ledger"))
            {
                Some(_) if !is_get => not_allowed("GET, HEAD"),
                Some(id) if batch::is_valid_device_id(id) => ledger(shared, id),
                _ => Reply::error(404, "no such device"),
            }
        }
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

impl Shared {
    fn count(&self, outcome: &Result<store::Outcome, Reply>) {
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

fn header<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().trim())
}

/// `POST /v1/ingest`: checks headers, reads and validates the body, stores the batch. `Err` is the
/// refusal to answer.
fn ingest(shared: &Shared, request: &mut Request) -> Result<store::Outcome, Reply> {
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
    if let Err(e) = request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut sent)
    {
        return Err(Reply::error(400, format!("body: cannot read: {e}")));
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
            Some(t) if !same_bytes(t.as_bytes(), token.as_bytes()) => {
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

/// Reads and drops what is left of a chunked request body, up to the body limit, so the connection
/// can carry the next request. A body with a `Content-Length` is drained by tiny_http itself, after
/// the answer is written.
fn discard_chunked_body(request: &mut Request) {
    if request.body_length().is_none() {
        let _ = io::copy(
            &mut request.as_reader().take(MAX_BODY_BYTES),
            &mut io::sink(),
        );
    }
}

fn too_large(limit: u64, what: &str) -> Reply {
    Reply::error(
        413,
        format!("body: larger than {} MiB{what}", limit / (1024 * 1024)),
    )
}

/// Compares without stopping at the first difference, so the time taken does not reveal how much of
/// a guessed token was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn devices(shared: &Shared, query: &str) -> Reply {
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

fn ledger(shared: &Shared, device_id: &str) -> Reply {
    match shared.store.device_summary(device_id) {
        Ok(Some(d)) => Reply::json(
            200,
            fleet::ledger_json(&d, now_ms(), shared.silent_after_ms),
        ),
        Ok(None) => Reply::error(404, "no such device"),
        Err(e) => unreadable(shared, "the device", &e),
    }
}

fn metrics(shared: &Shared) -> Reply {
    let now = now_ms();
    let totals = match shared.store.fleet_totals(now, shared.silent_after_ms) {
        Ok(t) => t,
        Err(e) => return unreadable(shared, "the devices", &e),
    };
    Reply {
        status: 200,
        body: Body::Text(fleet::metrics(&totals, now)),
        headers: Vec::new(),
    }
}

/// The HTTP listener, with `TCP_NODELAY`, which the connections it accepts inherit (Linux).
/// tiny_http writes an answer through a 1 KiB buffer, so a longer one leaves in several
/// segments; on a kept-alive connection Nagle's algorithm held the last of them until the
/// client's delayed ACK, 40 ms later, for every such answer.
fn bind_http(addr: &str) -> Result<tiny_http::Server, Box<dyn std::error::Error + Send + Sync>> {
    let listener = std::net::TcpListener::bind(addr)?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    tiny_http::Server::from_listener(listener, None)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    ferry_util::epoch_ms(std::time::SystemTime::now())
}

/// Most records `?last=N` asks for.
const MAX_LAST_RECORDS: u64 = 1000;

/// `GET /v1/devices/<id>/records[?last=N]`: all of them, or the last `N` (1 to 1000).
fn records(shared: &Shared, device_id: &str, query: &str) -> Reply {
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

/// `GET /v1/fleet`: the fleet's totals and this replica's recent records/s, for the console.
fn fleet_overview(shared: &Shared) -> Reply {
    let now = now_ms();
    match shared.store.fleet_totals(now, shared.silent_after_ms) {
        Ok(totals) => {
            let history = shared
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Reply::json(200, fleet::fleet_json(&totals, now, &history))
        }
        Err(e) => unreadable(shared, "the devices", &e),
    }
}

fn stats(shared: &Shared) -> Reply {
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

/// `/v1/devices/<id>/commands[/<cmd id>]`, `/v1/devices/<id>/downlink`, `/v1/devices/<id>/raw`;
/// `by`: the operator asking (logged with what they send).
fn downlink_route(
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

/// The request body, refused with 413 past `max` bytes.
fn read_small_body(request: &mut Request, max: usize) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Reply::error(400, format!("cannot read the body: {e}")))?;
    if body.len() > max {
        return Err(Reply::error(413, format!("body over {max} bytes")));
    }
    Ok(body)
}
