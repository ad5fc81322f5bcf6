//! The server side of the control endpoint's HTTP/1.1, only what the endpoint needs: one request
//! per connection (answered with `Connection: close`), served on the `control` thread itself, no
//! other thread. Every step has a deadline: a client gets [`REQUEST_DEADLINE`] to send its request
//! and [`ANSWER_DEADLINE`] to take the answer, so a stuck or hostile client delays the next one
//! by at most those. A request head over [`MAX_HEAD`] bytes or a body over [`MAX_BODY`] is refused
//! (431, 413), a malformed one answered 400; none of it allocates more than those bounds.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body; no endpoint takes one, so this only lets a client's empty JSON through.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client has to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How long a client has to take the whole answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other(String),
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Get => f.write_str("GET"),
            Method::Post => f.write_str("POST"),
            Method::Other(m) => f.write_str(m),
        }
    }
}

/// A request as the endpoint needs it.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The request target as sent (`/status`, `/metrics?x`).
    pub target: String,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum Refusal {
    /// The connection failed or the deadline passed: nothing to answer.
    Io(io::Error),
    /// Answer this status with this message.
    Bad(u16, &'static str),
}

/// Waits up to `wait` for a connection. `None` when none came (the caller checks for shutdown
/// and calls again). The listener carries a receive timeout (see [`listen`]), so this blocks in
/// `accept` rather than polling.
pub fn accept(listener: &TcpListener) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    match listener.accept() {
        Ok(c) => Ok(Some(c)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Answers every connection already waiting in the listener's queue with `code` and `body`,
/// without waiting for more, all before `deadline`: at a stop, so that requests that reached the
/// queue are answered rather than reset when the listener closes. Each request is read first (up
/// to the deadline), since closing a socket with unread data resets it.
pub fn refuse_pending(listener: &TcpListener, code: u16, body: &str, deadline: Instant) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    // Bounded by the listen backlog, and by the deadline.
    while Instant::now() < deadline {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = read_request(&mut stream, deadline);
        let _ = respond_by(&mut stream, code, "application/json", body, deadline);
    }
}

/// Binds `addr` with `accept` returning after `wait` when no client comes. Linux applies a
/// socket's receive timeout (`SO_RCVTIMEO`) to `accept` too; std sets it only through a stream,
/// so the listening socket passes through one to get it.
pub fn listen(addr: SocketAddr, wait: Duration) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    let as_stream = TcpStream::from(std::os::fd::OwnedFd::from(listener));
    as_stream.set_read_timeout(Some(wait))?;
    Ok(TcpListener::from(std::os::fd::OwnedFd::from(as_stream)))
}

/// Reads one request from `stream` before `deadline` (`Instant::now() + REQUEST_DEADLINE` for a
/// client served normally).
pub fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<Request, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::Bad(431, "request head too large"));
        }
        read_some(stream, &mut buf, MAX_HEAD + 4, deadline)?;
    };
    let (request, length) = parse_head(&buf[..head_end])?;
    // The body is read (and dropped) so that closing the connection does not reset it before
    // the client read the answer.
    let whole = head_end + 4 + length;
    while buf.len() < whole {
        read_some(stream, &mut buf, whole, deadline)?;
    }
    Ok(request)
}

/// The request line and the headers the endpoint reads; the body's length.
fn parse_head(head: &[u8]) -> Result<(Request, usize), Refusal> {
    let head =
        std::str::from_utf8(head).map_err(|_| Refusal::Bad(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Bad(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Refusal::Bad(400, "malformed request line"));
    }
    let mut authorization = None;
    let mut length = 0usize;
    for header in lines {
        let Some((name, value)) = header.split_once(':') else {
            return Err(Refusal::Bad(400, "malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| Refusal::Bad(400, "malformed Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::Bad(
                411,
                "send a Content-Length, not a chunked body",
            ));
        }
    }
    if length > MAX_BODY {
        return Err(Refusal::Bad(413, "request body too large"));
    }
    let request = Request {
        method: match method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            other => Method::Other(other.chars().take(16).collect()),
        },
        target: target.to_owned(),
        authorization,
    };
    Ok((request, length))
}

/// Reads what is there into `buf`, up to `cap` bytes in all, before `deadline`.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
    deadline: Instant,
) -> Result<(), Refusal> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Refusal::Io(io::ErrorKind::TimedOut.into()));
    }
    stream.set_read_timeout(Some(left)).map_err(Refusal::Io)?;
    let mut chunk = [0u8; 4096];
    let want = chunk.len().min(cap.saturating_sub(buf.len()).max(1));
    match stream.read(&mut chunk[..want]) {
        Ok(0) => Err(Refusal::Io(io::ErrorKind::UnexpectedEof.into())),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(Refusal::Io(e)),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes the answer and closes, within [`ANSWER_DEADLINE`].
pub fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    respond_by(
        stream,
        code,
        content_type,
        body,
        Instant::now() + ANSWER_DEADLINE,
    )
}

/// [`respond`] before `deadline`: a client taking the answer a byte at a time is cut off.
fn respond_by(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
    deadline: Instant,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    for part in [head.as_bytes(), body.as_bytes()] {
        let mut rest = part;
        while !rest.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            stream.set_write_timeout(Some(left))?;
            match stream.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    stream.flush()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on a free port reading one request; the test's client writes `bytes`.
    fn read_from(bytes: &[u8]) -> Result<Request, Refusal> {
        let listener = listen("127.0.0.1:0".parse().unwrap(), Duration::from_secs(5)).unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes = bytes.to_vec();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let _ = c.write_all(&bytes);
            // Held open until the server is done reading.
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        });
        let (mut s, _) = accept(&listener).unwrap().unwrap();
        let r = read_request(&mut s, Instant::now() + REQUEST_DEADLINE);
        drop(s);
        client.join().unwrap();
        r
    }

    #[test]
    fn a_request_is_read_with_its_token() {
        let r = read_from(
            b"POST /reload HTTP/1.1\r\nHost: x\r\nauthorization:  Bearer abc \r\nContent-Length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.target, "/reload");
        assert_eq!(r.authorization.as_deref(), Some("Bearer abc"));
    }

    #[test]
    fn bad_requests_are_refused_with_a_status() {
        let status = |bytes: &[u8]| match read_from(bytes) {
            Err(Refusal::Bad(code, _)) => Some(code),
            _ => None,
        };
        assert_eq!(status(b"GET\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET status HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"GET /status HTTP/1.1\r\nno colon\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"GET /status HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"POST /reload HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(411)
        );
        let mut huge = b"GET /status HTTP/1.1\r\n".to_vec();
        while huge.len() <= MAX_HEAD + 100 {
            huge.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(status(&huge), Some(431));
    }

    /// A client that sends half a request and waits is cut off at the deadline, answered nothing.
    #[test]
    fn a_silent_client_is_cut_off_at_the_deadline() {
        let started = Instant::now();
        let r = read_from(b"GET /status HTTP/1.1\r\n");
        assert!(matches!(r, Err(Refusal::Io(_))), "{r:?}");
        let took = started.elapsed();
        assert!(
            took >= REQUEST_DEADLINE && took < REQUEST_DEADLINE * 3,
            "{took:?}"
        );
    }

    /// At a stop, a request already in the listener's queue gets an answer, not a reset.
    #[test]
    fn requests_waiting_in_the_queue_are_answered_at_a_stop() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), Duration::from_secs(5)).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
                c
            })
            .collect();
        let started = Instant::now();
        refuse_pending(
            &listener,
            503,
            "{}",
            Instant::now() + Duration::from_secs(10),
        );
        // Once the queue is empty it returns, without waiting for the deadline.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        for c in &mut clients {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        }
    }

    #[test]
    fn accept_returns_when_no_client_comes() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), Duration::from_millis(50)).unwrap();
        assert!(accept(&listener).unwrap().is_none());
    }
}
