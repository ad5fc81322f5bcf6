#[allow(unused_imports)]
use super::*;

/// A minimal HTTP GET with deadlines; returns the body of a 200.
pub fn http_get(port: u16, path: &str) -> String {
    let (head, body) = http_request(port, "GET", path);
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {head}"
    );
    body
}

/// A minimal HTTP POST without a body, with `Authorization: Bearer <token>` when given; returns
/// the status line and the body, whatever the status.
pub fn http_post(port: u16, path: &str, token: Option<&str>) -> String {
    let (head, body) = http_request_auth(port, "POST", path, token);
    format!("{}\n{body}", head.lines().next().unwrap_or(""))
}

/// A request without a body, with the token when given; returns the status code and the body.
pub fn http_status(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let (head, body) = http_request_auth(port, method, path, token);
    (status_code(&head), body)
}

/// The status code of a response head (0 when there is none).
fn status_code(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn http_request_auth(port: u16, method: &str, path: &str, token: Option<&str>) -> (String, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_request_headers(port, method, path, &auth, b"")
}

/// A POST with a body; returns the status code and the body.
pub fn http_post_body(port: u16, path: &str, body: &[u8]) -> (u16, String) {
    let (head, body) = http_request_body(port, "POST", path, body);
    (status_code(&head), body)
}

fn http_request(port: u16, method: &str, path: &str) -> (String, String) {
    http_request_body(port, method, path, b"")
}

fn http_request_body(port: u16, method: &str, path: &str, body: &[u8]) -> (String, String) {
    http_request_headers(port, method, path, "", body)
}

/// `headers`: extra header lines, each ending in CRLF.
fn http_request_headers(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (String, String) {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{headers}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        // What ferry-cloud takes on a POST (its operator endpoints refuse the types a web page
        // can send without asking).
        kind = if method == "POST" && !headers.contains("Content-Type") {
            "Content-Type: application/json\r\n"
        } else {
            ""
        }
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// Where an HTTP head ends (just past the blank line), if it has arrived.
pub fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The `Content-Length` of an HTTP head, if it has one.
pub fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// A ureq client for tests: statuses as answers (not errors), and a deadline on every request.
pub fn http_client(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}
