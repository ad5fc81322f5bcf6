//! `scripts/install.sh` against a temp directory as the target root, with the real `ferry` binary:
//! the layout it creates, that it never overwrites an edited config silently, that it refuses a
//! binary for another CPU; and the board profiles themselves: every `ferry.toml` passes
//! `ferry check-config`, every unit passes `systemd-analyze verify`, every mosquitto snippet loads
//! into Debian's default mosquitto.conf.
#![allow(clippy::unwrap_used)]

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use util::*;

const BOARDS: [&str; 3] = ["rpi4-aarch64", "armv7-generic", "x86_64-dev"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The board whose CPU the binaries under test are built for.
fn native_board() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "rpi4-aarch64"
    } else if cfg!(target_arch = "arm") {
        "armv7-generic"
    } else {
        "x86_64-dev"
    }
}

fn install(board: &str, root: &Path, extra: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args(["--board", board, "--binary", FERRY, "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The journal directory a board's config names.
fn journal_dir(board: &str) -> String {
    let cfg: toml::Value =
        toml::from_str(&read(&repo().join("board").join(board).join("ferry.toml"))).unwrap();
    cfg["journal"]["dir"].as_str().unwrap().to_string()
}

#[test]
fn installs_binary_profile_and_layout_into_an_empty_root() {
    let tmp = tempfile::tempdir().unwrap();
    for board in BOARDS {
        let root = tmp.path().join(board);
        let force: &[&str] = if board == native_board() {
            &[]
        } else {
            &["--force"]
        };
        let out = install(board, &root, force);
        assert!(out.status.success(), "install {board}: {out:?}");

        let bin = root.join("usr/bin/ferry");
        assert_eq!(mode(&bin), 0o755);
        assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(FERRY).unwrap());
        let unit = read(&root.join("usr/lib/systemd/system/ferry.service"));
        for line in [
            "Type=notify",
            "Restart=always",
            "WatchdogSec=",
            "MemoryMax=",
            "User=ferry",
            "ExecStart=/usr/bin/ferry run -c /etc/ferry/ferry.toml",
        ] {
            assert!(unit.contains(line), "{board}: the unit sets {line}");
        }
        let journal = journal_dir(board);
        assert!(
            unit.contains(&format!("ReadWritePaths={journal}")),
            "{board}: the unit may write its journal {journal}"
        );
        assert!(read(&root.join("usr/lib/sysusers.d/ferry.conf")).contains("u ferry "));
        let tmpfiles = read(&root.join("usr/lib/tmpfiles.d/ferry.conf"));
        assert!(
            tmpfiles.contains(&format!("d {journal} 0700 ferry ferry")),
            "{board}: tmpfiles creates the journal dir 0700: {tmpfiles}"
        );
        assert_eq!(mode(&root.join(journal.trim_start_matches('/'))), 0o700);
        assert_eq!(mode(&root.join("etc/ferry")), 0o750);
        let config = root.join("etc/ferry/ferry.toml");
        assert_eq!(mode(&config), 0o640);
        assert_eq!(
            read(&config),
            read(&repo().join("board").join(board).join("ferry.toml"))
        );
        assert!(root.join("etc/mosquitto/conf.d/ferry.conf").is_file());
        assert!(root.join("usr/share/doc/ferry/README.md").is_file());

        // The installed config is one the installed binary accepts.
        let check = command(FERRY)
            .args(["check-config", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(check.status.success(), "{board}: check-config: {check:?}");
    }
}

#[test]
fn a_second_install_never_overwrites_an_edited_config_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let board = native_board();
    let default = read(&repo().join("board").join(board).join("ferry.toml"));
    assert!(install(board, &root, &[]).status.success());
    let config = root.join("etc/ferry/ferry.toml");

    // Unchanged: nothing beside it.
    let out = install(board, &root, &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unchanged /etc/ferry/ferry.toml"));
    assert!(!root.join("etc/ferry/ferry.toml.new").exists());

    // Edited by the technician: kept, the default goes beside it, and the script says so.
    let edited = default.replace("127.0.0.1:9100", "127.0.0.1:9200");
    assert_ne!(edited, default);
    std::fs::write(&config, &edited).unwrap();
    let out = install(board, &root, &[]);
    assert!(out.status.success());
    assert_eq!(read(&config), edited, "the edited config is kept");
    assert_eq!(read(&root.join("etc/ferry/ferry.toml.new")), default);
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept /etc/ferry/ferry.toml"));

    // --replace-config: replaced, with the edited one backed up first.
    let out = install(board, &root, &["--replace-config"]);
    assert!(out.status.success());
    assert_eq!(read(&config), default);
    let backups: Vec<PathBuf> = std::fs::read_dir(root.join("etc/ferry"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("ferry.toml.bak-"))
        .collect();
    assert_eq!(backups.len(), 1, "one backup: {backups:?}");
    assert_eq!(read(&backups[0]), edited);
}

#[test]
fn a_binary_for_another_cpu_is_refused_and_nothing_is_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let other = BOARDS.iter().find(|b| **b != native_board()).unwrap();
    let root = tmp.path().join("root");
    let out = install(other, &root, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(!root.join("usr/bin/ferry").exists());
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for board in BOARDS {
        // verify insists that ExecStart's binary exists: point it at a real executable.
        let unit = read(&repo().join("board").join(board).join("ferry.service"))
            .replace("ExecStart=/usr/bin/ferry", &format!("ExecStart={FERRY}"));
        let path = tmp.path().join("ferry.service");
        std::fs::write(&path, unit).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("ferry.service"),
            "{board}: systemd-analyze verify:\n{err}"
        );
    }
}

#[test]
fn the_mosquitto_snippets_load_into_debians_default_config() {
    let tmp = tempfile::tempdir().unwrap();
    for board in BOARDS {
        let dir = tmp.path().join(board);
        let confd = dir.join("conf.d");
        std::fs::create_dir_all(&confd).unwrap();
        // The snippet verbatim, except its listener on a free port instead of 1883.
        let port = free_port();
        let snippet = read(&repo().join("board").join(board).join("mosquitto.conf"))
            .replace("listener 1883 ", &format!("listener {port} "));
        std::fs::write(confd.join("ferry.conf"), snippet).unwrap();
        // Debian 12's /etc/mosquitto/mosquitto.conf, its paths moved into the temp dir.
        let d = dir.display();
        let main = format!(
            "{user}pid_file {d}/mosquitto.pid\npersistence true\npersistence_location {d}/\n\
             log_dest file {d}/mosquitto.log\ninclude_dir {d}/conf.d\n",
            user = if is_root() { "user root\n" } else { "" }
        );
        std::fs::write(dir.join("mosquitto.conf"), main).unwrap();
        let mut child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !port_open(port) {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{board}: mosquitto refused the snippet ({status}): {}{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < end, "{board}: mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(publish(port, "sensors/board", numbered(0..3)), 3);
        let _ = child.kill();
        let _ = child.wait();
    }
}
