//! Downlink: the cloud's commands to the gateway over a long-lived WebSocket that the gateway opens
//! (it sits behind NAT). The only module that names `tungstenite`.
//!
//! One thread, `downlink`. Each connection: TCP connect with `downlink.connect_timeout`, TLS (rustls
//! over the `TcpStream`, from the shared `[tls]` material) and the WebSocket handshake within one
//! deadline of the same length; then short socket read timeouts (`READ_POLL`) so that the loop sees
//! shutdown, sends a ping every `ping_interval`, and notices within `dead_after` a link that went
//! quiet (a half-open TCP connection on a cellular link sends nothing and reports nothing for many
//! minutes). Any frame from the cloud, pongs included, proves the link alive. Reconnects back off
//! exponentially with jitter; a connection that stayed up `STABLE` resets the backoff.
//!
//! Commands ([`command`]) run one at a time on this thread, in arrival order. Each result is stored
//! in the journal under the command id before it is sent, so a command the cloud sends again after
//! a reconnect is answered from the store and never executed twice. Frames over
//! `downlink.max_message_size` end the connection (tungstenite cannot skip the rest of a frame):
//! closed with 1009 and reopened after the usual backoff.

pub mod command;

use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::config::{DownlinkConfig, Secret};
use crate::journal::Journal;
use crate::logging::Repeats;
use crate::operator::Operator;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::Material;
use command::{Action, Command, Parsed};

/// Socket read timeout of an open connection: how quickly the loop sees shutdown and its timers.
const READ_POLL: Duration = Duration::from_millis(200);
/// Deadline of one write (a frame to a peer that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(10);
/// How long a close handshake may take at shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often a connection failure that keeps repeating is logged at WARN.
const REPEAT_LOG: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("invalid downlink url {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot resolve {host}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("websocket handshake failed")]
    Handshake(#[source] tungstenite::Error),
    #[error("websocket handshake not done within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("connection lost")]
    Lost(#[source] tungstenite::Error),
    #[error("no frame from the cloud for {0:?}: taking the link as dead")]
    Dead(Duration),
    #[error("frame over downlink.max_message_size ({0} bytes)")]
    Oversized(String),
}

/// What the downlink needs of the agent.
pub struct Deps {
    pub device_id: String,
    /// The positions in the hello frame, and the command store (a resent command's result).
    pub journal: Journal,
    /// The downlink's state and command count, for `/status`.
    pub stats: Arc<Stats>,
    /// Dates the oldest record waiting, in the hello frame.
    pub clock: Clock,
    /// Carries out the commands.
    pub operator: Operator,
}

/// Starts the `downlink` thread. `token` is `downlink.token`, else the uplink's.
pub fn spawn(
    cfg: DownlinkConfig,
    token: Option<Secret>,
    tls: &Material,
    deps: Deps,
    shutdown: Shutdown,
) -> io::Result<JoinHandle<()>> {
    let tls = tls.client_config().map_err(io::Error::other)?;
    thread::Builder::new()
        .name("downlink".into())
        .spawn(move || {
            Downlink {
                backoff: Backoff::new(Duration::from_millis(500), cfg.max_backoff),
                cfg,
                token,
                tls,
                deps,
                shutdown,
                lookups: crate::dns::Lookups::default(),
                failures: Repeats::new(REPEAT_LOG),
            }
            .run()
        })
}

/// The socket under the WebSocket: plain for `ws://`, rustls for `wss://`.
type Stream = crate::tls::Stream<rustls::ClientConnection>;

struct Downlink {
    cfg: DownlinkConfig,
    token: Option<Secret>,
    tls: Arc<rustls::ClientConfig>,
    deps: Deps,
    shutdown: Shutdown,
    backoff: Backoff,
    /// The cloud's addresses: one lookup in flight, a name kept for `dns::KEEP`.
    lookups: crate::dns::Lookups,
    /// A repeated connection failure is logged at WARN at most once per [`REPEAT_LOG`].
    failures: Repeats,
}

/// True for the errors a socket read timeout produces (`WouldBlock` on Linux, `TimedOut` elsewhere).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Downlink {
    fn run(mut self) {
        info!("downlink started url={}", self.cfg.url);
        while !self.shutdown.is_set() {
            self.set_state("connecting", None);
            let started = Instant::now();
            let outcome = self.connect().and_then(|ws| self.serve(ws));
            if self.shutdown.is_set() {
                break;
            }
            if started.elapsed() >= STABLE {
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay();
            if let Err(e) = outcome {
                self.report(&e, delay);
                self.set_state("backoff", Some(crate::error_chain(&e)));
            }
            self.shutdown.sleep(delay);
        }
        self.set_state("stopped", None);
        info!("downlink stopped");
    }

    fn set_state(&self, state: &'static str, error: Option<String>) {
        self.deps.stats.set_downlink(|d| {
            d.state = state;
            if error.is_some() {
                d.last_error = error;
            }
        });
    }

    fn report(&mut self, e: &Error, delay: Duration) {
        let message = crate::error_chain(e);
        if self.failures.is_due(&message, Instant::now()) {
            warn!("downlink: {}; reconnecting in {:?}", message, delay);
        } else {
            debug!("downlink: {}; reconnecting in {:?}", message, delay);
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        let max = self.cfg.max_message_size as usize;
        WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(max + 64 * 1024)
    }

    /// TCP, TLS and the WebSocket handshake, each bounded by `connect_timeout`.
    fn connect(&self) -> Result<WebSocket<Stream>, Error> {
        let url = &self.cfg.url;
        let bad_url = |message: String| Error::Url {
            url: url.clone(),
            message,
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| bad_url(e.to_string()))?;
        let uri = request.uri().clone();
        let secure = uri.scheme_str() == Some("wss");
        let host = uri
            .host()
            .ok_or_else(|| bad_url("no host".into()))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        if let Some(token) = &self.token {
            let value = format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| bad_url("the token is not a valid header value".into()))?;
            request.headers_mut().insert("Authorization", value);
        }
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let addrs = self
            .lookups
            .resolve(&host, port, self.cfg.connect_timeout)
            .map_err(|source| Error::Resolve {
                host: host.clone(),
                source,
            })?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or(Error::Connect {
            host: host.clone(),
            port,
            source: last,
        })?;
        let io_err = |source| Error::Connect {
            host: host.clone(),
            port,
            source,
        };
        tcp.set_nodelay(true).map_err(io_err)?;
        // Short reads during the handshake too, so that the deadline below is checked.
        tcp.set_read_timeout(Some(READ_POLL)).map_err(io_err)?;
        tcp.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io_err)?;
        let stream = if secure {
            let conn = crate::tls::client_connection(Arc::clone(&self.tls), &host)?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        let mut attempt =
            tungstenite::client::client_with_config(request, stream, Some(self.ws_config()));
        loop {
            match attempt {
                Ok((ws, _response)) => return Ok(ws),
                Err(HandshakeError::Interrupted(mid)) => {
                    if Instant::now() >= deadline || self.shutdown.is_set() {
                        return Err(Error::HandshakeTimeout(self.cfg.connect_timeout));
                    }
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Failure(e)) => return Err(Error::Handshake(e)),
            }
        }
    }

    /// Runs one connection until it fails, goes quiet, or shutdown.
    fn serve(&mut self, mut ws: WebSocket<Stream>) -> Result<(), Error> {
        let p = self.deps.journal.positions();
        let peer = ws
            .get_ref()
            .tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let oldest = self
            .deps
            .journal
            .oldest_unsent()
            .ok()
            .flatten()
            .map(|r| self.deps.clock.taken_at_ms(&r));
        ws.send(Message::text(command::hello(
            &self.deps.device_id,
            &p,
            oldest,
        )))
        .map_err(Error::Lost)?;
        info!("downlink connected url={} peer={}", self.cfg.url, peer);
        self.set_state("connected", None);
        self.failures.clear();
        let mut last_frame = Instant::now();
        let mut last_ping = Instant::now();
        loop {
            if self.shutdown.is_set() {
                close(&mut ws, CloseCode::Away, "agent shutting down");
                return Ok(());
            }
            match ws.read() {
                Ok(msg) => {
                    last_frame = Instant::now();
                    match msg {
                        Message::Text(text) => {
                            let answer = self.handle(text.as_str());
                            if let Some(answer) = answer {
                                ws.send(Message::text(answer)).map_err(Error::Lost)?;
                            }
                        }
                        Message::Binary(b) => {
                            warn!(
                                "downlink: ignored a binary frame of {} bytes (protocol v1 uses json text frames)",
                                b.len()
                            );
                        }
                        Message::Close(frame) => {
                            info!("downlink: the cloud closed the connection {:?}", frame);
                            // tungstenite queued the reply; flush it and end.
                            let _ = ws.flush();
                            return Err(Error::Lost(tungstenite::Error::ConnectionClosed));
                        }
                        // Pings are answered by tungstenite (at the next read or flush).
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                Err(tungstenite::Error::Capacity(e)) => {
                    // The rest of the frame is still in the socket: say why and drop the
                    // connection without reading again (tungstenite's reader is not reusable now).
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "frame too large".into(),
                    }));
                    let _ = ws.flush();
                    return Err(Error::Oversized(e.to_string()));
                }
                Err(e) => return Err(Error::Lost(e)),
            }
            if last_frame.elapsed() >= self.cfg.dead_after {
                return Err(Error::Dead(self.cfg.dead_after));
            }
            if last_ping.elapsed() >= self.cfg.ping_interval {
                last_ping = Instant::now();
                match ws.send(Message::Ping(Vec::new().into())) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                        // The peer stopped reading; `dead_after` decides.
                    }
                    Err(e) => return Err(Error::Lost(e)),
                }
            }
        }
    }

    /// Answers one text frame: the `result` to send, or `None` when no id could be read.
    fn handle(&self, text: &str) -> Option<String> {
        let cmd = match command::parse(text) {
            Parsed::Command(c) => c,
            Parsed::Refused {
                id: Some(id),
                error,
            } => {
                warn!("downlink: refused command id={} error={}", id, error);
                return Some(command::result(&id, &Err(error)));
            }
            Parsed::Refused { id: None, error } => {
                warn!(
                    "downlink: ignored a frame: {} ({} bytes)",
                    error,
                    text.len()
                );
                return None;
            }
        };
        match self.deps.journal.command_result(&cmd.id) {
            Ok(Some(stored)) => {
                info!(
                    "downlink: command id={} seen before; sending its stored result",
                    cmd.id
                );
                return Some(stored);
            }
            Ok(None) => {}
            Err(e) => {
                // Executing without knowing could execute twice: refuse, the cloud may retry.
                let msg = format!("cannot check the command store: {}", crate::error_chain(&e));
                error!("downlink: command id={} {}", cmd.id, msg);
                return Some(command::result(&cmd.id, &Err(msg)));
            }
        }
        let outcome = self.execute(&cmd);
        self.deps.stats.set_downlink(|d| d.commands += 1);
        match &outcome {
            Ok(_) => info!(
                "downlink: command id={} action={} ok",
                cmd.id,
                cmd.action.name()
            ),
            Err(e) => warn!(
                "downlink: command id={} action={} failed: {}",
                cmd.id,
                cmd.action.name(),
                e
            ),
        }
        let answer = command::result(&cmd.id, &outcome);
        if let Err(e) = self.deps.journal.remember_command(&cmd.id, &answer) {
            error!(
                "downlink: cannot remember command id={}: {} (a resend would run it again)",
                cmd.id,
                crate::error_chain(&e)
            );
        }
        Some(answer)
    }

    fn execute(&self, cmd: &Command) -> Result<Value, String> {
        let op = &self.deps.operator;
        let done = match &cmd.action {
            Action::Publish(p) => op.publish(p, &self.shutdown),
            Action::Status => op.status(),
            Action::SetConfig { key, value } => op.set_runtime_key(key, value).map(|a| a.to_json()),
            Action::ReplayFrom { seq } => op
                .replay_from(*seq)
                .map(|r| json!({"acked_seq_before": r.from, "acked_seq": r.to})),
        };
        done.map_err(|e| e.to_string())
    }
}

/// Starts the close handshake and waits briefly for the peer's close.
fn close(ws: &mut WebSocket<Stream>, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    if ws.close(Some(frame)).is_err() {
        return;
    }
    let end = Instant::now() + CLOSE_WAIT;
    while Instant::now() < end {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                let _ = ws.flush();
            }
            Err(_) => return,
        }
    }
}
