//! A real browser for the console's tests: Debian's `chromium`, headless, driven over the Chrome
//! DevTools protocol (one WebSocket to the page, JSON commands and events), which every Chromium
//! speaks; no driver binary in between. Started with a profile of its own in the test's temp
//! directory and killed when dropped. JavaScript dialogs (`confirm`) are accepted and their
//! messages kept ([`Browser::dialogs`]).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long one DevTools command may take.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Messages of the `confirm` dialogs the page opened, in order (each was accepted).
    pub dialogs: Vec<String>,
    /// `Page.loadEventFired` seen since the last navigation.
    loaded: bool,
}

/// The Chromium binary (`scripts/ensure-deps.sh` installs Debian's).
pub fn chromium() -> &'static str {
    if Path::new("/usr/bin/chromium").exists() {
        "/usr/bin/chromium"
    } else {
        "chromium"
    }
}

impl Browser {
    /// Starts a headless Chromium with its profile in `profile`, and opens its first page.
    pub fn start(profile: &Path) -> Browser {
        std::fs::create_dir_all(profile).expect("profile dir");
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium (scripts/ensure-deps.sh installs it)");
        // It says where its DevTools endpoint listens on stderr.
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("chromium-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
            })
            .expect("spawn a thread");
        let browser_url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not say where DevTools listens within 60 s");
            }
        };
        // ws://127.0.0.1:PORT/devtools/browser/<id> -> the page target from /json/list.
        let host = browser_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("a ws:// DevTools address")
            .to_owned();
        let http = super::http_client(Duration::from_secs(10));
        let page_target = || -> Option<String> {
            let text = http
                .get(format!("http://{host}/json/list"))
                .call()
                .ok()?
                .body_mut()
                .read_to_string()
                .ok()?;
            let targets: Value = serde_json::from_str(&text).ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_owned)
        };
        let mut page_url = None;
        super::wait_until("chromium's page target", Duration::from_secs(30), || {
            page_url = page_target();
            page_url.is_some()
        });
        let page_url = page_url.unwrap_or_default();
        // Connected and shaken hands with deadlines, then read in short slices.
        let addr: std::net::SocketAddr = host.parse().expect("an ip:port DevTools address");
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        tcp.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        let (page, _) = tungstenite::client(page_url.as_str(), MaybeTlsStream::Plain(tcp))
            .expect("the page's WebSocket handshake");
        if let MaybeTlsStream::Plain(tcp) = page.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("read timeout");
        }
        let mut browser = Browser {
            child,
            page,
            next_id: 1,
            dialogs: Vec::new(),
            loaded: false,
        };
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser
    }

    /// Sends a DevTools command and returns its `result`; panics on an error answer or after
    /// [`CALL_DEADLINE`]. Events that arrive meanwhile are handled (dialogs accepted).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(id, method, params);
        let end = Instant::now() + CALL_DEADLINE;
        loop {
            assert!(
                Instant::now() < end,
                "{method}: no answer within {CALL_DEADLINE:?}"
            );
            let Some(message) = self.read() else { continue };
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method}: {error}");
                }
                return message["result"].clone();
            }
        }
    }

    fn send(&mut self, id: u64, method: &str, params: Value) {
        let text = json!({"id": id, "method": method, "params": params}).to_string();
        self.page
            .send(Message::Text(text.into()))
            .expect("send to the page");
    }

    /// One message, if one came within the read timeout; handles the events it is.
    fn read(&mut self) -> Option<Value> {
        match self.page.read() {
            Ok(Message::Text(text)) => {
                let message: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                match message["method"].as_str() {
                    Some("Page.javascriptDialogOpening") => {
                        self.dialogs.push(
                            message["params"]["message"]
                                .as_str()
                                .unwrap_or("")
                                .to_owned(),
                        );
                        let id = self.next_id;
                        self.next_id += 1;
                        self.send(id, "Page.handleJavaScriptDialog", json!({"accept": true}));
                    }
                    Some("Page.loadEventFired") => self.loaded = true,
                    _ => {}
                }
                Some(message)
            }
            Ok(_) => None,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("the page's DevTools connection failed: {e}"),
        }
    }

    /// Opens `url` and waits for its load event.
    pub fn open(&mut self, url: &str) {
        self.loaded = false;
        self.call("Page.navigate", json!({"url": url}));
        self.wait_loaded(url);
    }

    /// Loads the page again and waits for its load event.
    pub fn reload(&mut self) {
        self.loaded = false;
        self.call("Page.reload", json!({}));
        self.wait_loaded("the page");
    }

    fn wait_loaded(&mut self, what: &str) {
        let end = Instant::now() + CALL_DEADLINE;
        while !self.loaded {
            assert!(
                Instant::now() < end,
                "{what} did not load within {CALL_DEADLINE:?}"
            );
            self.read();
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is `want` in the page, polling, within `deadline`; returns its
    /// last value either way for the assertion.
    pub fn wait_for(&mut self, expression: &str, want: &Value, deadline: Duration) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let value = self.eval(expression);
            if &value == want || Instant::now() >= end {
                return value;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the page as it is, written to `path` (a test artefact, never committed).
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artefact dir");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
