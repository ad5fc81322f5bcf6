#[allow(unused_imports)]
use super::*;

/// What the [`FaultProxy`] does with a connection. Chosen when the connection is accepted; a
/// pass-through connection also closes as soon as the mode moves away from `Pass`, so that a pooled
/// connection cannot carry the agent past a newly set fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards bytes both ways.
    Pass,
    /// A dead link: accepts, reads the request, never answers, never closes.
    Hang,
    /// A half-open link: forwards the request, then the response head and half of its body, then
    /// nothing more; the connection stays open.
    CutResponse,
    /// Reads a few bytes and closes with the rest of the request unread, which makes Linux send
    /// RST instead of FIN (std has no stable SO_LINGER).
    Reset,
    /// Forwards both ways, holding every chunk from upstream for `SLOW_DELAY` (a slow link or a
    /// slow peer: a CONNACK that takes 300 ms).
    Slow,
    /// A link that silently stops forwarding: open connections stay open and carry nothing more
    /// either way (a half-open TCP connection); new ones are accepted and hang.
    Stall,
}

/// How long [`ProxyMode::Slow`] holds each chunk from upstream.
pub const SLOW_DELAY: Duration = Duration::from_millis(300);

impl ProxyMode {
    fn from_u8(v: u8) -> ProxyMode {
        match v {
            1 => ProxyMode::Hang,
            2 => ProxyMode::CutResponse,
            3 => ProxyMode::Reset,
            4 => ProxyMode::Slow,
            5 => ProxyMode::Stall,
            _ => ProxyMode::Pass,
        }
    }
}

struct ProxyShared {
    mode: AtomicU8,
    stop: AtomicBool,
    accepted: AtomicU64,
    active: AtomicUsize,
}

impl ProxyShared {
    fn mode(&self) -> ProxyMode {
        ProxyMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A loopback TCP proxy to `127.0.0.1:upstream` that can play a broken link. One listener thread
/// and one or two threads per connection; every socket read has a short timeout and every loop
/// checks the stop flag, so dropping the proxy joins all of them.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    listener: Option<JoinHandle<()>>,
}

/// How often proxy threads look at the stop flag and the mode.
const PROXY_TICK: Duration = Duration::from_millis(100);

impl FaultProxy {
    pub fn start(upstream: u16, mode: ProxyMode) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            mode: AtomicU8::new(mode as u8),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let listener = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || proxy_accept_loop(listener, upstream, s))
            .unwrap();
        FaultProxy {
            port,
            shared,
            listener: Some(listener),
        }
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/ingest", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
    }
}

fn proxy_accept_loop(listener: TcpListener, upstream: u16, shared: Arc<ProxyShared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopped() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.active.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(&shared);
                let mode = shared.mode();
                conns.retain(|h| !h.is_finished());
                conns.push(std::thread::spawn(move || {
                    proxy_conn(client, upstream, mode, &s);
                    s.active.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn proxy_conn(client: TcpStream, upstream: u16, mode: ProxyMode, shared: &Arc<ProxyShared>) {
    // The accepted socket may have inherited the listener's non-blocking flag on some platforms.
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(PROXY_TICK));
    match mode {
        ProxyMode::Hang | ProxyMode::Stall => drain(&client, shared),
        ProxyMode::Reset => {
            let mut buf = [0u8; 16];
            let end = Instant::now() + Duration::from_secs(2);
            let mut got = 0;
            // Read a little, then wait until more is pending: closing with unread data is an RST.
            while Instant::now() < end && !shared.stopped() {
                let r = if got == 0 {
                    (&client).read(&mut buf)
                } else {
                    client.peek(&mut buf)
                };
                match r {
                    Ok(0) => return,
                    Ok(n) if got == 0 => got = n,
                    Ok(_) => break,
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => return,
                }
            }
            drop(client);
        }
        ProxyMode::Pass | ProxyMode::CutResponse | ProxyMode::Slow => {
            let Ok(up) = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], upstream)),
                Duration::from_secs(1),
            ) else {
                return;
            };
            let _ = up.set_read_timeout(Some(PROXY_TICK));
            let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) else {
                return;
            };
            let s = Arc::clone(shared);
            let watch = mode != ProxyMode::CutResponse;
            let requests = std::thread::spawn(move || {
                pump(&c2, &u2, &s, watch.then_some(mode), Duration::ZERO)
            });
            if watch {
                let delay = if mode == ProxyMode::Slow {
                    SLOW_DELAY
                } else {
                    Duration::ZERO
                };
                pump(&up, &client, shared, Some(mode), delay);
            } else {
                cut_response(&up, &client, shared);
            }
            let _ = requests.join();
        }
    }
}

/// Reads and discards until EOF, an error, or stop.
fn drain(from: &TcpStream, shared: &ProxyShared) {
    let mut buf = [0u8; 8192];
    while !shared.stopped() {
        match (&*from).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Copies `from` to `to`, holding each chunk for `delay`, until either side ends (then closes
/// both), stop, or, with `watch_mode`, the mode changes from the one given.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    shared: &ProxyShared,
    watch_mode: Option<ProxyMode>,
    delay: Duration,
) {
    let mut buf = [0u8; 16384];
    let carry_on = || !shared.stopped() && watch_mode.is_none_or(|m| shared.mode() == m);
    while carry_on() {
        match (&*from).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if (&*to).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    if shared.mode() == ProxyMode::Stall && !shared.stopped() {
        // Keep the connection open and carry nothing: neither side learns anything.
        drain(from, shared);
        return;
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Forwards the response head and half of its body, then holds the connection open without
/// forwarding anything until the agent gives up on it (the request pump then closes both sides).
fn cut_response(up: &TcpStream, client: &TcpStream, shared: &ProxyShared) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut cut = None;
    while !shared.stopped() {
        if cut.is_none() {
            cut = header_end(&got).map(|h| h + content_length(&got[..h]).unwrap_or(0) / 2);
        }
        if let Some(c) = cut {
            if got.len() >= c {
                let _ = (&*client).write_all(&got[..c]);
                break;
            }
        }
        match (&*up).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    drain(up, shared);
    let _ = up.shutdown(std::net::Shutdown::Both);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
