//! The control endpoint (`control.listen`, loopback by default): `GET /status` (JSON),
//! `GET /metrics` (Prometheus text), `GET /dead-letters`, `POST /dead-letters/<seq>/requeue`,
//! `POST /reload` (re-read the config file; answers what changed and whether the agent restarts),
//! `POST /restart` (the agent replaces itself with a fresh run, e.g. after a new device id).
//! Both ends live here: the `control` thread that serves it (what the requests do is the
//! [`Operator`]'s, what `/status` shows is [`crate::status`]; its HTTP is `http.rs`, one request
//! at a time on that thread, every step under a deadline), and the small client behind
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
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};
use serde::Serialize;

use crate::config::Config;
use crate::operator::Operator;
use crate::shutdown::Shutdown;
use crate::status;
use crate::uplink::LocalError;

mod http;
use http::Method;

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

    /// Whether a request with this `Authorization` header may use `method`.
    fn allows(&self, method: &Method, authorization: Option<&str>) -> bool {
        if *method != Method::Post && !self.reads_too {
            return true;
        }
        authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim().as_bytes(), self.token.as_bytes()))
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

/// Binds `addr` (so a port conflict is a start-up error) and serves it on the `control` thread.
pub fn spawn(
    addr: SocketAddr,
    access: Access,
    status: status::Source,
    operator: Operator,
    shutdown: Shutdown,
) -> Result<JoinHandle<()>, Error> {
    // `accept` returns every 250 ms without a client, to see shutdown.
    let listener = http::listen(addr, Duration::from_millis(250)).map_err(|e| Error::Bind {
        addr,
        message: e.to_string(),
    })?;
    info!("control endpoint listening addr={}", addr);
    thread::Builder::new()
        .name("control".into())
        .spawn(move || serve(listener, access, status, operator, shutdown))
        .map_err(|e| Error::Bind {
            addr,
            message: e.to_string(),
        })
}

fn serve(
    listener: std::net::TcpListener,
    access: Access,
    status: status::Source,
    operator: Operator,
    shutdown: Shutdown,
) {
    while !shutdown.is_set() {
        let (mut stream, peer) = match http::accept(&listener) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                warn!("control endpoint accept failed: {}", e);
                shutdown.sleep(Duration::from_millis(250));
                continue;
            }
        };
        let deadline = std::time::Instant::now() + http::REQUEST_DEADLINE;
        let (code, content_type, body) = match http::read_request(&mut stream, deadline) {
            Ok(req) if access.allows(&req.method, req.authorization.as_deref()) => {
                let answer = route(&req.method, &req.target, &status, &operator);
                debug!("control {} {} -> {}", req.method, req.target, answer.0);
                answer
            }
            Ok(req) => {
                warn!(
                    "control {} {} refused: no valid token (from {})",
                    req.method, req.target, peer
                );
                (
                    401,
                    "application/json",
                    error_json("this needs the control token: Authorization: Bearer <token>"),
                )
            }
            Err(http::Refusal::Bad(code, msg)) => {
                debug!("control request from {} refused: {}", peer, msg);
                (code, "application/json", error_json(msg))
            }
            Err(http::Refusal::Io(e)) => {
                debug!("control request from {} not read: {}", peer, e);
                continue;
            }
        };
        if let Err(e) = http::respond(&mut stream, code, content_type, &body) {
            debug!("control response not delivered: {}", e);
        }
    }
    // Requests that arrived while the agent was stopping (a restart in place, say) are answered
    // 503 rather than reset when the listener closes, all within half a second.
    http::refuse_pending(
        &listener,
        503,
        &error_json("the agent is stopping or restarting; ask again in a moment"),
        std::time::Instant::now() + Duration::from_millis(500),
    );
}

fn route(
    method: &Method,
    url: &str,
    sources: &status::Source,
    operator: &Operator,
) -> (u16, &'static str, String) {
    use Method::{Get, Post};
    const JSON: &str = "application/json";
    let path = url.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Get, ["status"]) => (200, JSON, to_json(&sources.status())),
        (Get, ["metrics"]) => (
            200,
            "text/plain; version=0.0.4",
            status::metrics(&sources.status()),
        ),
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
        (Post, ["reload"]) => match operator.apply() {
            Ok(applied) => (200, JSON, to_json(&applied.to_json())),
            Err(e) => (409, JSON, error_json(&e.to_string())),
        },
        (Post, ["restart"]) => match operator.restart() {
            Ok(()) => (200, JSON, to_json(&serde_json::json!({ "restart": true }))),
            Err(e) => (409, JSON, error_json(&e.to_string())),
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
    use std::time::Instant;

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
