//! The uplink's HTTP client: the one place that names `ureq`. Builds the agent (a deadline on
//! every phase, ferry's TLS, no redirects, a pool sized for the uploads in flight), POSTs one
//! upload and reads its answer to the end, bounded, and says transport errors and statuses in
//! plain words for logs, `/status` and the console's `test uplink` ([`probe`]). The `ferry` CLI's
//! requests to the agent's control endpoint go through it too ([`local_request`]).

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime};

use super::batch::{Annotator, encode_body, parse_retry_after};
use super::post::PIPELINE;
use super::resolve;
use crate::config::{Compression, UplinkConfig};
use crate::journal::Entry;
use crate::protocol::{Held, IDEMPOTENCY_HEADER};
use crate::tls::Material;

/// Largest response body read; the rest of a larger one is dropped with its connection.
pub const MAX_RESPONSE_BODY: u64 = 64 * 1024;
/// How the cloud answered one upload, as the uplink reads it.
#[derive(Debug)]
pub enum Answer {
    /// A complete status line and headers. A body that broke off or ran over
    /// [`MAX_RESPONSE_BODY`] is kept as a note, except after a 2xx, which is then `Failed`.
    Status {
        code: u16,
        /// `Retry-After`, parsed and clamped; `None` when absent or unparseable.
        retry_after: Option<Duration>,
        /// The body as lossy UTF-8, at most [`MAX_RESPONSE_BODY`] bytes of it.
        body: String,
    },
    /// No usable answer: DNS, connect, TLS, timeout, reset, a malformed response, or a 2xx whose
    /// body broke off (the cloud may or may not have stored the batch: resend, never ack).
    Failed(ureq::Error),
}

/// One upload request: where to, as whom, and the encoded (possibly gzipped) body.
#[derive(Debug, Clone, Copy)]
pub struct Upload<'a> {
    pub url: &'a str,
    pub device_id: &'a str,
    /// The first and last seq the body carries, for the idempotency key.
    pub first: u64,
    pub last: u64,
    pub token: Option<&'a str>,
    pub gzip: bool,
    pub body: &'a [u8],
}

/// Builds the HTTP agent with a deadline on every phase. Shared with the console's `test uplink`,
/// so that a test exercises exactly what the uplink uses. TLS comes from `[tls]` (shared with
/// the downlink) and from ferry's one crypto provider.
pub fn http_agent(
    connect_timeout: Duration,
    request_timeout: Duration,
    tls: &Material,
) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let roots = match &tls.roots {
        Some(certs) => RootCerts::new_with_certs(
            &certs
                .iter()
                .map(|c| Certificate::from_der(c).to_owned())
                .collect::<Vec<_>>(),
        ),
        None => RootCerts::WebPki,
    };
    // ureq takes the key as PEM (its key kinds are private); the file was parsed at config load,
    // so failing here is not expected, and would show as a failed handshake, not a panic.
    let client_cert = tls.client.as_ref().and_then(|id| {
        let key = PrivateKey::from_pem(&id.key_pem).ok()?;
        let chain: Vec<_> = id
            .chain
            .iter()
            .map(|c| Certificate::from_der(c).to_owned())
            .collect();
        Some(ClientCert::new_with_certs(&chain, key))
    });
    let tls_config = TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client_cert)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls_config)
        .http_status_as_error(false)
        .timeout_connect(Some(connect_timeout))
        .timeout_global(Some(request_timeout))
        .max_redirects(0)
        .max_idle_connections(4)
        .max_idle_connections_per_host(PIPELINE)
        .max_idle_age(resolve::KEEP)
        .user_agent(format!("ferry/{}", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        resolve::CachingResolver::default(),
    )
}

/// POSTs one upload and reads the answer: the status, `Retry-After`, and the body to its end,
/// bounded by [`MAX_RESPONSE_BODY`], so that the connection goes back to the pool. Whatever bytes
/// the peer sends, this returns (within the agent's deadlines) and never allocates more than the
/// bound plus ureq's buffers.
pub fn post(agent: &ureq::Agent, up: &Upload<'_>) -> Answer {
    let mut req = agent
        .post(up.url)
        .header("Content-Type", "application/json")
        .header(
            IDEMPOTENCY_HEADER,
            format!("{}:{}-{}", up.device_id, up.first, up.last),
        );
    if up.gzip {
        req = req.header("Content-Encoding", "gzip");
    }
    if let Some(token) = up.token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let mut resp = match req.send(up.body) {
        Ok(r) => r,
        Err(e) => return Answer::Failed(e),
    };
    let code = resp.status().as_u16();
    if (200..300).contains(&code)
        && resp.version() == ureq::http::Version::HTTP_10
        && resp.headers().contains_key("transfer-encoding")
    {
        // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing. ureq reads
        // such a body up to the connection's close, so a body cut short would look whole. Said
        // before the body is read: nothing in it can change the verdict.
        return Answer::Failed(ureq::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "an HTTP/1.0 answer with Transfer-Encoding (faulty framing, RFC 9112 6.1)",
        )));
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // A body too large (or broken) closes the connection, which is fine: the status is what counts.
    let body = match resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BODY)
        .read_to_vec()
    {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(ureq::Error::BodyExceedsLimit(_)) => {
            format!("(response body over {} KiB)", MAX_RESPONSE_BODY / 1024)
        }
        Err(e) if (200..300).contains(&code) => {
            // A 2xx whose body broke off: the cloud may or may not have stored the batch.
            // Resending is safe (the cloud deduplicates), acknowledging is not.
            return Answer::Failed(e);
        }
        Err(_) => String::new(),
    };
    Answer::Status {
        code,
        retry_after,
        body,
    }
}

/// Sends an empty batch to `cfg.url` through [`post`], with the uplink's own HTTP agent, headers,
/// compression and deadlines (the console's `test uplink`). Returns the round trip of a 2xx answer, or what went wrong in plain
/// words: DNS failure, connection refused, timed out, TLS certificate problem, HTTP status N and what
/// it means.
pub fn probe(cfg: &UplinkConfig, tls: &Material, device_id: &str) -> Result<Duration, String> {
    let agent = http_agent(cfg.connect_timeout, cfg.request_timeout, tls);
    let body = wire_body(cfg.compression, device_id, &[], None, &Annotator::default());
    let started = Instant::now();
    let answer = post(
        &agent,
        &Upload {
            url: &cfg.url,
            device_id,
            first: 0,
            last: 0,
            token: cfg.token.as_ref().map(|t| t.expose()),
            gzip: cfg.compression == Compression::Gzip,
            body: &body,
        },
    );
    let elapsed = started.elapsed();
    match answer {
        Answer::Failed(e) => Err(describe(&e)),
        Answer::Status { code, .. } if (200..300).contains(&code) => Ok(elapsed),
        Answer::Status { code, body, .. } => {
            let answer = snippet(&body);
            let said = if answer.is_empty() {
                String::new()
            } else {
                format!("; the cloud said: {answer}")
            };
            Err(format!("{}{said}", status_words(code)))
        }
    }
}

/// An HTTP status and what it means for the uplink, in plain words.
fn status_words(code: u16) -> String {
    let meaning = match code {
        400 => "bad request: the cloud does not understand ferry's batches at this url",
        401 => "unauthorized: uplink.token is missing or wrong",
        403 => "forbidden: the token is not allowed to send for this device",
        404 => "not found: the url's path is wrong",
        405 => "method not allowed: the url is not an ingest endpoint",
        409 => "conflict: the cloud saw this device id with other data (a cloned identity?)",
        413 => "payload too large",
        429 => "too many requests: the cloud asks to slow down",
        300..=399 => "a redirect, which ferry does not follow: use the final url",
        500..=599 => "the cloud has a server error",
        200..=299 => "ok",
        _ => "unexpected",
    };
    format!("HTTP status {code} ({meaning})")
}

/// A transport error in plain words, for logs, `/status` and the console.
pub fn describe(e: &ureq::Error) -> String {
    if let Some(tls) = tls_cause(e) {
        return match tls {
            rustls::Error::InvalidCertificate(c) => {
                format!("TLS certificate problem: the server's certificate is not accepted ({c:?})")
            }
            other => format!("TLS failure: {other}"),
        };
    }
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "DNS failure: host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".into()
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            "connection reset".into()
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "connection closed mid-response".into()
        }
        other => crate::error_chain(other),
    }
}

/// The TLS error behind `e`, if any, wherever it sits in the chain.
fn tls_cause(e: &ureq::Error) -> Option<&rustls::Error> {
    if let ureq::Error::Rustls(t) = e {
        return Some(t);
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    if let ureq::Error::Io(io) = e {
        cur = io
            .get_ref()
            .map(|r| r as &(dyn std::error::Error + 'static));
    }
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// The start of a response body, on one line, for logs.
pub(super) fn snippet(body: &str) -> String {
    let one_line: String = body
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.trim().to_string()
}

/// The body of an upload of `entries` as it goes on the wire: the JSON batch, gzipped when
/// `compression` says so.
pub(super) fn wire_body(
    compression: Compression,
    device_id: &str,
    entries: &[Entry],
    held: Option<Held>,
    ann: &Annotator,
) -> Vec<u8> {
    let body = encode_body(device_id, entries, held, ann);
    match compression {
        Compression::None => body,
        Compression::Gzip => gzip(&body),
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_are_said_in_plain_words() {
        let io = |k: std::io::ErrorKind| ureq::Error::Io(k.into());
        assert_eq!(
            describe(&io(std::io::ErrorKind::ConnectionRefused)),
            "connection refused"
        );
        assert_eq!(
            describe(&ureq::Error::HostNotFound),
            "DNS failure: host not found"
        );
        assert!(describe(&ureq::Error::Timeout(ureq::Timeout::Connect)).starts_with("timed out"));
        let cert = ureq::Error::Rustls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(
            describe(&cert).starts_with("TLS certificate problem"),
            "{}",
            describe(&cert)
        );
        // The same error wrapped in an io::Error, as a handshake inside a read reports it.
        let wrapped = ureq::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        ));
        assert!(describe(&wrapped).starts_with("TLS certificate problem"));
    }

    #[test]
    fn statuses_say_what_they_mean() {
        assert!(status_words(401).contains("uplink.token"));
        assert!(status_words(404).starts_with("HTTP status 404 (not found"));
        assert!(status_words(503).contains("server error"));
        assert!(status_words(302).contains("redirect"));
    }

    #[test]
    fn a_probe_of_a_closed_port_says_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = crate::config::Config::parse_str(
            &format!(
                "[journal]\ndir = \"/tmp/j\"\n[mqtt]\ntopics = [\"a/#\"]\n[uplink]\nurl = \"http://127.0.0.1:{port}/v1/ingest\"\n"
            ),
            std::path::Path::new("/tmp/ferry.toml"),
        )
        .unwrap();
        assert_eq!(
            probe(&cfg.uplink, &cfg.tls.material, "gw-1").unwrap_err(),
            "connection refused"
        );
    }
}

/// How a request to a local endpoint ([`local_request`]) failed.
#[derive(Debug)]
pub enum LocalError {
    /// No connection: nothing listens there.
    NotReached(std::io::Error),
    /// Connected, but the exchange failed or ran out of time: up, but busy or stuck.
    NoAnswer(std::io::Error),
    /// The answer ran over the limit.
    TooLarge,
}

/// One plain-HTTP request to a local endpoint (the `ferry` CLI to the agent's control endpoint):
/// one deadline for the whole exchange (a dripping peer is cut off), no proxy from the
/// environment (loopback, or the operator's own network), no redirects, the body bounded by
/// `limit`. Returns the status and the body, whatever the status.
pub fn local_request(
    url: &str,
    post: bool,
    token: Option<&str>,
    timeout: Duration,
    limit: u64,
) -> Result<(u16, String), LocalError> {
    // The connect deadline is a little shorter than the whole one, so that a connect that times
    // out is told as such (nothing answers there), not as the whole exchange running out.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(timeout.mul_f64(0.9)))
        .timeout_global(Some(timeout))
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(false)
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let sent = if post {
        let req = agent.post(url);
        match &auth {
            Some(a) => req.header("Authorization", a).send_empty(),
            None => req.send_empty(),
        }
    } else {
        let req = agent.get(url);
        match &auth {
            Some(a) => req.header("Authorization", a).call(),
            None => req.call(),
        }
    };
    let mut answer = sent.map_err(local_failure)?;
    let status = answer.status().as_u16();
    let body = answer
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_string()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => LocalError::TooLarge,
            e => local_failure(e),
        })?;
    Ok((status, body))
}

fn local_failure(e: ureq::Error) -> LocalError {
    use std::io::ErrorKind::{
        AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable,
    };
    match e {
        ureq::Error::Io(source)
            if matches!(
                source.kind(),
                ConnectionRefused | NetworkUnreachable | HostUnreachable | AddrNotAvailable
            ) =>
        {
            LocalError::NotReached(source)
        }
        ureq::Error::ConnectionFailed | ureq::Error::Timeout(ureq::Timeout::Connect) => {
            LocalError::NotReached(std::io::Error::other(e))
        }
        ureq::Error::Io(source) => LocalError::NoAnswer(source),
        e => LocalError::NoAnswer(std::io::Error::other(e)),
    }
}
