//! Test harness: real peers on loopback ports. A real mosquitto, the real `ferry-cloud` and the real
//! `ferry` binary, each started in its own temp directory and stopped (or killed) by its guard. On a
//! failed test, the agent's log is printed.
//!
//! By peer: `broker.rs` (mosquitto, publishers), `cloud.rs` (ferry-cloud), `agent.rs` (the ferry
//! agent and its config), `nginx.rs`, `proxy.rs` (a fault-injecting TCP proxy), with `http.rs`
//! (a small HTTP client), `procfs.rs` (what a process holds), `certs.rs` (a test CA and
//! certificates), `browser.rs` (headless Chromium over DevTools) and `records.rs` (exactly-once
//! checks). Shared with the torture runner and the benchmarks: `ferry-testkit`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The `ferry-cloud` binary. It is a package of its own (`crates/cloud`), so cargo does not hand
/// its path to these tests: it is the one built beside them, in the same target directory and
/// profile (`make test` and `test-arm.sh` build it first: `cargo build -p ferry-cloud`).
pub fn ferry_cloud() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        // target/<triple>/<profile>/deps/<this test> -> target/<triple>/<profile>/ferry-cloud
        let exe = std::env::current_exe().expect("the test binary's path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary is in a deps directory")
            .join("ferry-cloud");
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p ferry-cloud` (make test does)",
            bin.display()
        );
        // A binary older than its sources would test the code before the change: refuse it
        // rather than pass on it.
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        if let (Some(built), Some((changed, source))) = (built, newest_source(root)) {
            assert!(
                changed <= built,
                "{} is older than {}: build it again with `cargo build -p ferry-cloud` \
                 (make test does)",
                bin.display(),
                source.display()
            );
        }
        bin.to_string_lossy().into_owned()
    })
}

/// The most recently changed source file ferry-cloud is built from (its crate, the crates it
/// shares with the agent, and the vendored crates it is patched with), and when.
fn newest_source(root: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(path: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(changed) = std::fs::metadata(path).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(t, _)| changed > *t) {
                *newest = Some((changed, path.to_owned()));
            }
        }
    }
    let mut newest = None;
    for krate in ["cloud", "protocol", "tls", "util"] {
        walk(&root.join("crates").join(krate).join("src"), &mut newest);
        walk(
            &root.join("crates").join(krate).join("Cargo.toml"),
            &mut newest,
        );
    }
    // Only what cargo rebuilds for: a vendored crate's README changes no binary.
    for krate in std::fs::read_dir(root.join("vendor"))
        .into_iter()
        .flatten()
        .flatten()
    {
        walk(&krate.path().join("src"), &mut newest);
        walk(&krate.path().join("Cargo.toml"), &mut newest);
    }
    newest
}

/// A command running one of this crate's binaries. Under `make test-arm` they are ARM executables
/// and the host may have no binfmt_misc registration for them, so `FERRY_TEST_RUNNER` (set by the
/// Makefile to `qemu-aarch64-static` or `qemu-arm-static`, as cargo's target runner is for the test
/// binary itself) goes in front. qemu-user runs the program in its own process: the child's pid,
/// signals and SIGKILL are the program's.
pub fn command(bin: &str) -> Command {
    match std::env::var("FERRY_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut c = Command::new(runner.trim());
            c.arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

/// A port that was free a moment ago and that no other test of this process was given.
///
/// Ports come from 10000-31999, below Linux's ephemeral range (32768-60999), walking from an offset
/// derived from the process id: a port the kernel hands out for `bind(0)` or an outgoing connection
/// elsewhere can never land on an agent's control port between a kill and a restart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (BASE + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    ferry_testkit::poll_every(what, timeout, Duration::from_millis(50), cond)
        .unwrap_or_else(|e| panic!("{e}"));
}

fn signal(child: &Child, sig: &str) {
    signal_pid(child.id(), sig);
}

/// Waits for `child` to exit within `timeout`; returns its exit status, or kills it and panics.
pub fn wait_exit(child: &mut Child, name: &str, timeout: Duration) -> ExitStatus {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

mod agent;
mod broker;
mod browser;
mod certs;
mod cloud;
mod http;
mod nginx;
mod procfs;
mod proxy;
mod records;
#[allow(unused_imports)]
pub use agent::*;
#[allow(unused_imports)]
pub use broker::*;
#[allow(unused_imports)]
pub use browser::*;
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use cloud::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use nginx::*;
#[allow(unused_imports)]
pub use procfs::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use records::*;
