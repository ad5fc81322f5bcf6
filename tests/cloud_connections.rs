//! ferry-cloud's HTTP connections against clients that misbehave, through the real binary: a
//! client that goes silent (a gateway whose cellular link died without closing its connection),
//! a process out of file descriptors, more connections than `--max-connections`, a request
//! declaring a terabyte of body, a refused body dribbled a byte at a time. Each of these once
//! stopped the receiver for good, or held one of its threads for ever: the vendored tiny_http's
//! `Limits` and its bounded drain of an unread body (vendor/README.md).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod util;

use util::{Cloud, free_port, wait_until};

/// Deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

/// `GET path` on a new connection (closed after): the body of a `200`, `None` for anything
/// else, including no answer within 2 s.
fn try_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8(answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `ferry_cloud_http_connections` from `/metrics` (the `/metrics` connection included).
fn connections(port: u16) -> Option<u64> {
    try_get(port, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("ferry_cloud_http_connections "))?
        .trim()
        .parse()
        .ok()
}

/// Waits for the server to close `s`: a read that ends (EOF or reset) rather than times out.
/// Returns how long that took.
fn closed_by_server(mut s: TcpStream) -> Duration {
    let started = Instant::now();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue, // a 408 or 400 before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!(
                "the connection was not closed by the server after {:?}: {e}",
                started.elapsed()
            ),
        }
    }
}

/// A connection that sends nothing, and one that stops in the middle of a request's head, are
/// closed after `--idle-timeout`; the count of open connections in `/metrics` goes back down.
/// Without the read timeout each would hold a tiny_http thread for ever.
#[test]
fn connections_that_go_silent_are_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start_with(dir.path(), free_port(), &["--idle-timeout", "5"]);
    let silent = TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    let mut halfway = TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    halfway
        .write_all(b"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        .unwrap();
    // Both counted, with the /metrics connection itself.
    wait_until("three connections open", DEADLINE, || {
        connections(cloud.port) == Some(3)
    });
    let took = closed_by_server(silent);
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    closed_by_server(halfway);
    wait_until("only the /metrics connection open", DEADLINE, || {
        connections(cloud.port) == Some(1)
    });
}

/// Out of file descriptors, `accept` fails (EMFILE). The receiver logs it, pauses and accepts
/// again once descriptors are free; tiny_http's accept thread used to end there (or panic
/// cloning the accepted socket), and the receiver never took another connection.
#[test]
fn out_of_file_descriptors_the_receiver_accepts_again_once_they_are_free() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start(dir.path());
    assert!(try_get(cloud.port, "/metrics").is_some());
    // A limit a few descriptors above what it holds now, lowered on the running process.
    let pid = cloud.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + 6;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit: {status}");
    // More connections than it has descriptors for (two each): the kernel completes them all,
    // ferry-cloud runs out accepting them.
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(TcpStream::connect(("127.0.0.1", cloud.port)).unwrap());
    }
    wait_until("ferry-cloud says accept failed", DEADLINE, || {
        let log = cloud.log_text();
        log.contains("cannot accept a connection") || log.contains("connection dropped")
    });
    drop(held);
    wait_until("a request answered again", DEADLINE, || {
        try_get(cloud.port, "/metrics").is_some()
    });
}

/// At `--max-connections`, the receiver stops accepting and says so; a further connection waits
/// in the backlog and is served once one closes. The count of open connections is exact: the
/// waiting one's `/metrics` counts itself and the other one still open.
#[test]
fn connections_past_max_connections_wait_until_one_closes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start_with(dir.path(), free_port(), &["--max-connections", "2"]);
    let first = TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    let second = TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    // Said once both are accepted, before any third connection.
    wait_until("ferry-cloud says new connections wait", DEADLINE, || {
        cloud
            .log_text()
            .contains("2 connections open, the most allowed")
    });
    // The third waits in the backlog: its request is answered once the first closes.
    let port = cloud.port;
    let third = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).map(|_| answer)
    });
    drop(first);
    let answer = third
        .join()
        .unwrap()
        .expect("the waiting connection is served after one closed");
    let open: u64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("ferry_cloud_http_connections "))
        .expect("the connection count in /metrics")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(open, 2, "the second connection and the third, which asks");
    drop(second);
}

/// A descriptor limit (`ulimit -n`) that cannot hold `--max-connections` connections, two
/// descriptors each, and a reserve is said at start, naming both numbers.
#[test]
fn a_descriptor_limit_too_small_for_max_connections_is_said_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    // prlimit sets the limit, then runs ferry-cloud (behind the ARM runner when there is one).
    let wrapped = util::command(util::ferry_cloud());
    let mut command = std::process::Command::new("prlimit");
    command
        .arg("--nofile=300:300")
        .arg("--")
        .arg(wrapped.get_program())
        .args(wrapped.get_args());
    let log = dir.path().join("cloud.log");
    let mut child = command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "256",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run prlimit (util-linux)");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(DEADLINE).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("listening on"),
        "ferry-cloud said {line:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("--max-connections 256 needs up to 640 file descriptors")
            && text.contains("(300, ulimit -n)"),
        "{text}"
    );
}

/// Reads `s` until the end of an answer's head, waiting `within` at most; its status line.
fn answer_status(s: &mut TcpStream, within: Duration) -> String {
    s.set_read_timeout(Some(within)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "no whole answer: {other:?} after {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    head.lines().next().unwrap_or_default().to_owned()
}

/// Starts `POST /v1/ingest` of `content_type` declaring a 200,000-byte body, and a thread that
/// dribbles the body at 20 bytes a second (the whole of it would take 10,000 s) for `for_at_most`.
/// The thread ends `true` once a write fails (the server closed the connection).
fn dribbled_upload(
    port: u16,
    content_type: &str,
    for_at_most: Duration,
) -> (TcpStream, std::thread::JoinHandle<bool>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: {content_type}\r\nContent-Length: 200000\r\n\r\n"
    )
    .unwrap();
    let mut dribble = s.try_clone().unwrap();
    let dribbler = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < for_at_most {
            if dribble.write_all(b" ").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    (s, dribbler)
}

/// A request declaring a body far beyond what the receiver takes (a terabyte) is answered (413)
/// without its body being read or buffered, and its connection is closed: at once when the client
/// goes on sending, after `--idle-timeout` when it sends nothing more. Each such request was once
/// left unanswered with its connection held for ever, so `--max-connections` of them (here 3, and
/// 8 requests) stopped the receiver from taking any connection.
#[test]
fn requests_declaring_huge_bodies_are_answered_and_their_connections_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start_with(
        dir.path(),
        free_port(),
        &["--max-connections", "3", "--idle-timeout", "2"],
    );
    let port = cloud.port;
    for i in 0..8 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        .unwrap();
        if i % 2 == 0 {
            // The start of a body: what follows the answer is no request, the connection ends.
            s.write_all(br#"{"device_id":"gw-1","records":["#).unwrap();
        }
        let status = answer_status(&mut s, DEADLINE);
        assert!(status.starts_with("HTTP/1.1 413"), "request {i}: {status}");
        closed_by_server(s);
    }
    assert!(
        try_get(port, "/metrics").is_some(),
        "the receiver still takes connections"
    );
}

/// The body of a refused request (here a wrong `Content-Type`) is drained after the answer so
/// that the connection can carry the next request, but for 5 s at most: a client that dribbles
/// it a byte at a time has its connection closed, and the worker that drained it is free again.
/// Until then the drain went on for as long as the client kept sending.
#[test]
fn a_refused_body_dribbled_a_byte_at_a_time_is_drained_for_a_few_seconds_at_most() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start_with(dir.path(), free_port(), &[]);
    let port = cloud.port;
    let (mut s, dribbler) = dribbled_upload(port, "text/plain", 2 * DEADLINE);
    let status = answer_status(&mut s, DEADLINE);
    assert!(status.starts_with("HTTP/1.1 415"), "{status}");
    closed_by_server(s);
    assert!(
        dribbler.join().unwrap(),
        "the dribbling client could still write after the close"
    );
    assert!(try_get(port, "/metrics").is_some());
}

/// An upload whose body comes slower than 500 bytes a second once 20 s have passed is answered
/// `408` (which an agent retries), not read for as long as the client dribbles it: the worker
/// reading it is free again. Until then a body dribbled a byte at a time held its worker for
/// the whole body (here 10,000 s), and a read that waited the idle timeout was answered `400`,
/// which an agent takes for refused content.
#[test]
fn an_upload_dribbled_below_the_minimum_rate_is_answered_408() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cloud = Cloud::start_with(dir.path(), free_port(), &[]);
    let port = cloud.port;
    let (mut s, dribbler) = dribbled_upload(port, "application/json", 4 * DEADLINE);
    // The 20 s of grace, then the answer.
    let status = answer_status(&mut s, 3 * DEADLINE);
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    closed_by_server(s);
    dribbler.join().unwrap();
    assert!(try_get(port, "/metrics").is_some());
}
