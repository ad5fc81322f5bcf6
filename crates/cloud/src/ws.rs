//! The reference cloud's downlink endpoint: WebSocket connections from gateways, on a port of their
//! own (`--ws-listen`), served with tungstenite directly on `TcpStream`s.
//!
//! Why not tiny_http's `Request::upgrade`: its upgraded streams have no read timeouts, so a
//! connection thread could neither see shutdown nor send a newly queued command while blocked in a
//! read. Here every socket has a short read timeout (`POLL`): each connection thread alternates
//! between reading the gateway's frames and sending what [`Commands`] has queued for its device,
//! so a command goes out within `POLL` of being queued. TLS (`--tls-cert/--tls-key`, and
//! `--client-ca` for mTLS) is rustls over the same sockets. One thread per connection, at most
//! `MAX_CONNECTIONS`.
//!
//! The path must be `/v1/downlink`; with `--token`, `Authorization: Bearer <token>` is required.

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ferry_protocol::Held;
use log::{debug, info, warn};
use serde_json::Value;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::commands::Commands;
use ferry_tls::Stream;

const POLL: Duration = Duration::from_millis(100);
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;
/// A connection with no frame from the gateway this long is closed (the agent pings every
/// `downlink.ping_interval`, 15 s by default), so half-open connections do not pile up.
const IDLE_CLOSE: Duration = Duration::from_secs(120);
/// Largest frame accepted from a gateway (results of `status` are a few KiB).
const MAX_FROM_GATEWAY: usize = 1 << 20;
pub const PATH: &str = "/v1/downlink";

type ServerStream = Stream<rustls::ServerConnection>;

/// Where the account of what a gateway holds, from its hello, goes (the store's ledger).
pub type OnHeld = Arc<dyn Fn(&str, Held) + Send + Sync>;

/// Settings of the endpoint.
#[derive(Clone)]
pub struct Options {
    pub token: Option<String>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub on_held: Option<OnHeld>,
}

/// Binds `addr` and starts the `cloud-ws` accept thread; returns the bound address.
pub fn start(
    addr: &str,
    options: Options,
    commands: Arc<Commands>,
    shutdown: Arc<AtomicBool>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = thread::Builder::new()
        .name("cloud-ws".into())
        .spawn(move || accept_loop(listener, options, commands, shutdown))?;
    Ok((local, handle))
}

fn accept_loop(
    listener: TcpListener,
    options: Options,
    commands: Arc<Commands>,
    shutdown: Arc<AtomicBool>,
) {
    // The connections' threads: those not finished are the connections open (however a thread
    // ended, a panic included).
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shutdown.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                conns.retain(|h| !h.is_finished());
                if conns.len() >= MAX_CONNECTIONS {
                    warn!("downlink connection refused peer={peer}: {MAX_CONNECTIONS} open");
                    continue;
                }
                let (options, commands, shutdown) = (
                    options.clone(),
                    Arc::clone(&commands),
                    Arc::clone(&shutdown),
                );
                let spawned =
                    thread::Builder::new()
                        .name("cloud-ws-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(tcp, &options, &commands, &shutdown) {
                                info!("downlink connection ended peer={peer}: {e}");
                            }
                        });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => warn!("cannot start a downlink connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => {
                warn!("downlink accept failed: {e}");
                thread::sleep(POLL);
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
    debug!("downlink endpoint stopped");
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn serve(
    tcp: TcpStream,
    options: &Options,
    commands: &Commands,
    shutdown: &AtomicBool,
) -> Result<(), String> {
    tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(POLL))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let stream: ServerStream = match &options.tls {
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(Arc::clone(cfg)).map_err(|e| e.to_string())?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
        None => Stream::Plain(tcp),
    };
    let token = options.token.clone();
    // The error type is tungstenite's callback signature; it is built once per refused handshake.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |code: u16, msg: &str| {
            let mut r = ErrorResponse::new(Some(msg.to_owned()));
            *r.status_mut() = tungstenite::http::StatusCode::from_u16(code)
                .unwrap_or(tungstenite::http::StatusCode::BAD_REQUEST);
            r
        };
        if req.uri().path() != PATH {
            return Err(refuse(404, "no such path"));
        }
        if let Some(t) = &token {
            let want = format!("Bearer {t}");
            let got = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if got != Some(want.as_str()) {
                return Err(refuse(401, "missing or wrong bearer token"));
            }
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FROM_GATEWAY))
        .max_frame_size(Some(MAX_FROM_GATEWAY));
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let mut attempt = tungstenite::accept_hdr_with_config(stream, check, Some(config));
    let mut ws = loop {
        match attempt {
            Ok(ws) => break ws,
            Err(HandshakeError::Interrupted(mid)) => {
                if Instant::now() >= deadline || shutdown.load(Ordering::SeqCst) {
                    return Err("handshake not done in time".into());
                }
                attempt = mid.handshake();
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("handshake failed: {e}")),
        }
    };
    let mut device: Option<String> = None;
    let mut sent_here = HashSet::new();
    let on_held = options.on_held.as_ref();
    let outcome = run(
        &mut ws,
        commands,
        on_held,
        shutdown,
        &mut device,
        &mut sent_here,
    );
    if let Some(d) = &device {
        commands.disconnected(d);
        info!("downlink disconnected device={d}");
    }
    outcome
}

fn run(
    ws: &mut WebSocket<ServerStream>,
    commands: &Commands,
    on_held: Option<&OnHeld>,
    shutdown: &AtomicBool,
    device: &mut Option<String>,
    sent_here: &mut HashSet<String>,
) -> Result<(), String> {
    let mut last_frame = Instant::now();
    loop {
        if last_frame.elapsed() >= IDLE_CLOSE {
            return Err(format!("no frame for {IDLE_CLOSE:?}"));
        }
        if shutdown.load(Ordering::SeqCst) {
            let _ = ws.close(None);
            let _ = ws.flush();
            return Ok(());
        }
        let read = ws.read();
        if read.is_ok() {
            last_frame = Instant::now();
        }
        match read {
            Ok(Message::Text(text)) => on_text(text.as_str(), commands, on_held, device)?,
            Ok(Message::Binary(b)) => warn!("downlink: binary frame of {} bytes ignored", b.len()),
            Ok(Message::Close(frame)) => {
                // 1009: the device could not take a frame; it answers commands in order, so the
                // culprit is the first one sent here and still unanswered. Answer it for the device,
                // or it would be sent again on every connection and hold up the rest.
                if let (Some(d), Some(f)) = (device.as_deref(), frame) {
                    if f.code == tungstenite::protocol::frame::coding::CloseCode::Size {
                        commands.refuse_first_unanswered(
                            d,
                            sent_here,
                            "the command is larger than the device's downlink.max_message_size",
                        );
                    }
                }
                let _ = ws.flush();
                return Ok(());
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Some(d) = device.as_deref() {
            let out = commands.outgoing(d, sent_here);
            for (binary, bytes) in out.raw {
                let msg = if binary {
                    Message::binary(bytes)
                } else {
                    Message::text(String::from_utf8_lossy(&bytes).into_owned())
                };
                ws.send(msg).map_err(|e| e.to_string())?;
            }
            for (id, frame) in out.commands {
                debug!("downlink: command sent device={d} id={id}");
                ws.send(Message::text(frame)).map_err(|e| e.to_string())?;
            }
        }
    }
}

fn on_text(
    text: &str,
    commands: &Commands,
    on_held: Option<&OnHeld>,
    device: &mut Option<String>,
) -> Result<(), String> {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            warn!("downlink: malformed frame from the gateway: {e}");
            return Ok(());
        }
    };
    match v.get("type").and_then(Value::as_str) {
        Some("hello") => {
            // One device per connection: a second hello would count the connection twice and
            // carry this connection's sent commands over to another device.
            if let Some(d) = device.as_deref() {
                return Err(format!("a second hello on the connection of device={d}"));
            }
            let id = v
                .get("device_id")
                .and_then(Value::as_str)
                .filter(|id| super::batch::is_valid_device_id(id))
                .ok_or("hello without a valid device_id")?
                .to_owned();
            info!("downlink connected device={id} hello={v}");
            // An agent before the ledger sends no `held`; a malformed one is said and ignored.
            match v.get("held").cloned().map(super::batch::parse_held) {
                Some(Ok(held)) => {
                    if let Some(report) = on_held {
                        report(&id, held);
                    }
                }
                Some(Err(e)) => warn!("downlink: hello of device={id}: {e}"),
                None => {}
            }
            commands.connected(&id, v);
            *device = Some(id);
        }
        Some("result") => match device.as_deref() {
            Some(d) => {
                info!("downlink: result device={d} id={} ok={}", v["id"], v["ok"]);
                commands.on_result(d, v)?;
            }
            None => warn!("downlink: result before hello ignored"),
        },
        other => warn!("downlink: unknown frame type {other:?} ignored"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_hello_on_one_connection_ends_it_and_leaves_the_first_device_counted_once() {
        // Regression: a second hello switched the connection to another device without
        // disconnecting the first, which then stayed "connected" for good.
        let commands = Commands::default();
        let mut device = None;
        let hello = |id: &str| format!(r#"{{"type":"hello","device_id":"{id}"}}"#);
        on_text(&hello("gw-a"), &commands, None, &mut device).unwrap();
        assert!(on_text(&hello("gw-b"), &commands, None, &mut device).is_err());
        assert_eq!(device.as_deref(), Some("gw-a"));
        assert_eq!(commands.device("gw-b").unwrap()["connected"], false);
        // What `serve` does when the connection ends.
        commands.disconnected("gw-a");
        assert_eq!(commands.device("gw-a").unwrap()["connected"], false);
    }
}
