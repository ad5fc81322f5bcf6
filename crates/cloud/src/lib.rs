//! `ferry-cloud`: the reference receiver of wire protocol v1 (`docs/PROTOCOL.md`), used by the
//! integration tests and as a worked example for writing a real one.
//!
//! Layout, by who owns what:
//! - [`http`] owns the `tiny_http::Server` and a pool of named worker threads (`cloud-worker-N`)
//!   that take requests from it with `recv_timeout` and check the shutdown flag between requests;
//!   it routes, checks credentials and answers. `http::ingest` takes batches (`POST /v1/ingest`),
//!   `http::operator` answers the operators' API and the console's JSON.
//! - [`batch`] validates a batch (pure); [`store`] keeps what was sent (files in a data directory,
//!   or PostgreSQL shared by replicas); [`ranges`] tracks seqs; [`fingerprints`] tells a resend
//!   from a clash; [`ledger`] makes each device's completeness account; [`history`] keeps what
//!   changes over time (each device's account per minute, the fleet's records/s).
//! - [`fleet`] reads the fleet (paging, states, totals); [`operators`] says who may use it;
//!   [`console`] embeds the operators' web page.
//! - [`commands`] and [`ws`] are the downlink: commands queued (in memory, or in PostgreSQL for
//!   replicas) and delivered over each device's WebSocket.
//!
//! Durability: `200` is answered only after the new records and gaps are durable (fsynced, or
//! committed), so everything acknowledged survives a crash; dedupe by `(device_id, seq)` makes
//! resends harmless. A stored seq that comes again with different content means two gateways
//! share a device id: that batch is answered `409` and stored not at all.
//!
//! Endpoints: `POST /v1/ingest`, `GET /v1/devices` (paged, sorted, filtered: [`fleet`]),
//! `GET /v1/devices/<id>/ledger` (the completeness account: [`ledger`]),
//! `GET /v1/devices/<id>/history` (its account per minute: [`history`]), `GET /v1/fleet` (the
//! console's overview), `GET /metrics` (fleet totals), `GET /v1/devices/<id>/records`,
//! `GET /v1/stats`; for the downlink ([`commands`], [`ws`]): `POST /v1/devices/<id>/commands`
//! (queue a command, answers its id), `GET /v1/devices/<id>/commands/<cmd id>` (pending or its
//! result), `GET /v1/devices/<id>/downlink` (connection state), and for tests
//! `POST /v1/devices/<id>/raw` (the body sent once as a text frame, or `?binary=1` as a binary
//! frame). Every error answer has a JSON body `{"error": "..."}`. Credentials: uploads and the
//! downlink take the device token, `/v1/devices...`, `/v1/fleet` and `/v1/stats` an operator's
//! ([`operators`]); `/metrics` is open.
//!
//! Connections (the vendored tiny_http 0.12, `vendor/README.md`): each read waits at most
//! [`Config::idle_timeout`] and each write 30 s, at most [`Config::max_connections`] are open
//! (more wait to be accepted), and a failed accept is retried. A body must also come at 500
//! bytes a second once 20 s have passed, or it is answered `408` (`http::Paced`): a client that
//! dribbles a body a byte at a time holds its worker for about that allowance and one idle
//! timeout, not for as long as it keeps sending. A `Content-Length` body the receiver does not read (a refused
//! request's) is drained after the answer is written, up to 1 MiB within 5 s, so that the
//! connection can carry the next request; past either, the connection is closed (the vendored
//! tiny_http's `EqualReader`).

pub mod batch;
pub mod commands;
pub mod console;
pub mod fingerprints;
pub mod fleet;
pub mod history;
mod http;
pub mod ledger;
pub mod operators;
pub mod ranges;
pub mod store;
pub mod ws;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};

use self::commands::Commands;
use self::http::{Shared, bind_http, now_ms, publish_rates, worker};
use self::store::Store;
use self::store::postgres::commands::PgCommands;

/// Largest request body accepted as sent (compressed or not).
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest request body accepted after gzip decompression.
pub const MAX_DECOMPRESSED_BYTES: u64 = 256 * 1024 * 1024;
/// `--silent-after` unless given: an hour without a batch.
pub const DEFAULT_SILENT_AFTER: Duration = Duration::from_secs(3600);
/// [`Config::idle_timeout`] unless told: longer than the agent's connection pool keeps an idle
/// connection (30 s), so that the agent, not the receiver, closes a kept-alive one.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// [`Config::max_connections`] unless told: tiny_http holds two file descriptors per connection,
/// so 512 of the usual limit of 1,024, leaving the rest to the store, the database connections
/// and the downlink (see [`http::check_descriptors`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

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
    /// An HTTP connection that sends nothing for this long is closed (tiny_http's read timeout).
    pub idle_timeout: Duration,
    /// At most this many HTTP connections are open (each holds a thread).
    pub max_connections: usize,
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

    /// Waits for every worker to exit, which they do within about `http::POLL_INTERVAL` after the
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
    let server = bind_http(&config.listen, config.idle_timeout, config.max_connections).map_err(
        |source| Error::Bind {
            addr: config.listen.clone(),
            source,
        },
    )?;
    let addr = server.server_addr().to_ip().ok_or_else(|| Error::NotIp {
        addr: config.listen.clone(),
    })?;
    http::check_descriptors(config.max_connections);
    let shared = Arc::new(Shared::new(server, store, &config, Arc::clone(&commands)));

    let mut workers = Vec::new();
    for i in 0..config.workers.max(1) {
        let shared = Arc::clone(&shared);
        let flag = Arc::clone(&shutdown);
        spawn_or_stop(
            &mut workers,
            &shutdown,
            format!("cloud-worker-{i}"),
            move || worker(&shared, &flag),
        )?;
    }
    if shared.store.shares_rates() {
        let publishing = Arc::clone(&shared);
        let flag = Arc::clone(&shutdown);
        spawn_or_stop(&mut workers, &shutdown, "cloud-rates".into(), move || {
            publish_rates(&publishing, &flag)
        })?;
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
                stop_all(&mut workers, &shutdown);
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
                stop_all(&mut workers, &shutdown);
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

/// Starts thread `name` running `f` and keeps its handle; if it cannot start, stops the threads
/// already started ([`stop_all`]) and says why.
fn spawn_or_stop(
    workers: &mut Vec<JoinHandle<()>>,
    shutdown: &AtomicBool,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), Error> {
    match thread::Builder::new().name(name.clone()).spawn(f) {
        Ok(handle) => {
            workers.push(handle);
            Ok(())
        }
        Err(source) => {
            stop_all(workers, shutdown);
            Err(Error::Spawn { name, source })
        }
    }
}

/// Sets `shutdown` and waits for the threads started so far: a start that fails leaves nothing
/// running.
fn stop_all(workers: &mut Vec<JoinHandle<()>>, shutdown: &AtomicBool) {
    shutdown.store(true, Ordering::SeqCst);
    for handle in workers.drain(..) {
        let _ = handle.join();
    }
}

/// Sleeps `period` in steps of at most 50 ms; `true` as soon as `shutdown` is set (a thread's
/// wait between rounds that still stops promptly).
pub(crate) fn sleep_unless(shutdown: &AtomicBool, period: Duration) -> bool {
    let deadline = std::time::Instant::now() + period;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}
