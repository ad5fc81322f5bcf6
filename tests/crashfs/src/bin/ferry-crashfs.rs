//! `ferry-crashfs`: a crash-test filesystem. Mounts an in-memory FUSE filesystem at MOUNTPOINT
//! that forgets, on `cut`, everything not made durable by fsync (see `ferry_crashfs::model` for
//! the exact rules), driven through a control socket (see `ferry_crashfs::control`).
//!
//! ```text
//! ferry-crashfs MOUNTPOINT --control SOCK [--slow-fsync MS [--jitter SEED]]   serve until `quit`
//! ferry-crashfs ctl SOCK COMMAND...       send one command, print the answer
//! ```
//! `--slow-fsync MS [--jitter SEED]` starts as the control command `slow-fsync MS [--jitter SEED]`
//! would.
//! Log: `FERRY_CRASHFS_LOG=trace` prints every request (an strace of what the program under test
//! does to its files).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_crashfs::control::{self, Command};
use ferry_crashfs::fs::{CrashFs, FsyncFault, Shared};
use fuser::{BackgroundSession, MountOption};
use log::{error, info, warn};

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("FERRY_CRASHFS_LOG", "info,fuser=error"),
    )
    .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ctl") if args.len() >= 3 => {
            control::request(Path::new(&args[1]), &args[2..].join(" "), Duration::from_secs(60)).map(|a| println!("{a}"))
        }
        Some(m) if !m.starts_with('-') => serve(Path::new(m), &args[1..]),
        _ => Err("usage: ferry-crashfs MOUNTPOINT --control SOCK [--slow-fsync MS [--jitter SEED]] | ferry-crashfs ctl SOCK COMMAND...".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(mountpoint: &Path, args: &[String]) -> Result<(), String> {
    let mut sock = None;
    let mut slow = None;
    let mut jitter = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--control", Some(p)) => sock = Some(PathBuf::from(p)),
            ("--slow-fsync", Some(ms)) => {
                slow = Some(
                    ms.parse()
                        .map_err(|_| format!("--slow-fsync {ms}: not a number"))?,
                )
            }
            ("--jitter", Some(seed)) => {
                jitter = Some(
                    seed.parse()
                        .map_err(|_| format!("--jitter {seed}: not a number"))?,
                )
            }
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let sock = sock.ok_or("--control SOCK is required")?;
    if jitter.is_some() && slow.is_none() {
        return Err("--jitter SEED needs --slow-fsync MS".into());
    }
    let shared = Shared::new();
    if let Some(ms) = slow {
        shared.set_slow_fsync(ms, jitter, None);
        log_slow_fsync(ms, jitter);
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    let mut session = Some(mount(&shared, mountpoint)?);
    info!(
        "mounted at {} control={}",
        mountpoint.display(),
        sock.display()
    );
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        match handle(conn, &shared, mountpoint, &mut session) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!("control connection: {e}"),
        }
    }
    if let Some(s) = session.take() {
        unmount(s, mountpoint)?;
    }
    let _ = std::fs::remove_file(&sock);
    info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Serves one control connection (one command). Returns whether to quit.
fn handle(
    conn: UnixStream,
    shared: &Arc<Shared>,
    mountpoint: &Path,
    session: &mut Option<BackgroundSession>,
) -> std::io::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut quit = false;
    let answer = match Command::parse(&line) {
        Err(e) => Err(e),
        Ok(Command::Stats) => Ok(shared.stats_json(session.is_some())),
        Ok(Command::Cut(cut)) => {
            let r = shared.cut(cut);
            info!(
                "power cut ({cut:?}): unsynced_bytes={} kept_bytes={} unsynced_dir_ops={} kept_dir_ops={} torn={}",
                r.unsynced_bytes, r.kept_bytes, r.unsynced_dir_ops, r.kept_dir_ops, r.torn_writes
            );
            Ok(shared.stats_json(session.is_some()))
        }
        Ok(Command::Remount) => {
            let r = match session.take() {
                Some(s) => unmount(s, mountpoint),
                None => Ok(()),
            };
            r.and_then(|()| {
                shared.power_on();
                *session = Some(mount(shared, mountpoint)?);
                Ok(shared.stats_json(true))
            })
        }
        Ok(Command::SlowFsync {
            ms,
            jitter_seed,
            only,
        }) => {
            shared.set_slow_fsync(ms, jitter_seed, only);
            log_slow_fsync(ms, jitter_seed);
            Ok(shared.stats_json(session.is_some()))
        }
        Ok(Command::FailFsync(fault)) => {
            let FsyncFault {
                pattern,
                nth,
                times,
            } = &fault;
            info!(
                "armed: fsync #{nth} on files matching {pattern:?} fails with EIO ({times} time(s))"
            );
            shared.arm_fsync_fault(fault);
            Ok(shared.stats_json(session.is_some()))
        }
        Ok(Command::ClearFsyncFaults) => {
            let n = shared.clear_fsync_faults();
            info!("disarmed {n} fsync fault(s)");
            Ok(shared.stats_json(session.is_some()))
        }
        Ok(Command::Dump(dir)) => shared
            .dump(&dir)
            .map(|n| format!("{{\"dumped\":{n}}}"))
            .map_err(|e| format!("dump to {}: {e}", dir.display())),
        Ok(Command::Quit) => {
            quit = true;
            Ok("{}".into())
        }
    };
    let mut conn = conn;
    match answer {
        Ok(a) => writeln!(conn, "{a}")?,
        Err(e) => writeln!(conn, "error: {}", e.replace('\n', " "))?,
    }
    Ok(quit)
}

fn log_slow_fsync(ms: u64, jitter_seed: Option<u64>) {
    match (ms, jitter_seed) {
        (0, _) => info!("fsync takes no extra time"),
        (ms, None) => info!("fsync now takes {ms} ms"),
        (ms, Some(seed)) => info!("fsync now takes 0..={ms} ms each (jitter seed {seed})"),
    }
}

fn mount(shared: &Arc<Shared>, mountpoint: &Path) -> Result<BackgroundSession, String> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![MountOption::FSName("ferry-crashfs".into()), MountOption::RW];
    // Several threads, so that one slow fsync does not stall reads and writes of other files.
    config.n_threads = Some(8);
    fuser::spawn_mount(CrashFs(Arc::clone(shared)), mountpoint, &config)
        .map_err(|e| format!("cannot mount at {}: {e}", mountpoint.display()))
}

/// Unmounts, waiting up to 30 s for the processes that still use the mount to go.
fn unmount(session: BackgroundSession, mountpoint: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            // Not root: the setuid helper may unmount what the user mounted.
            Err(nix::errno::Errno::EPERM) => std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(mountpoint)
                .stderr(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("fusermount3: {e}"))
                .and_then(|s| {
                    if s.success() {
                        Ok(())
                    } else {
                        Err("fusermount3 -u failed (busy?)".into())
                    }
                }),
            Err(e) => Err(format!("umount: {e}")),
            Ok(()) => Ok(()),
        };
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "cannot unmount {} within 30 s: {e}; is a process still using it?",
                    mountpoint.display()
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    // The session threads see the connection go away and end.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fuse-join".into())
        .spawn(move || {
            let _ = tx.send(session.join());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            warn!("fuse session ended with {e}");
            Ok(())
        }
        Err(_) => Err("fuse session did not end within 10 s of the unmount".into()),
    }
}
