//! Who may use the control endpoint: nothing that changes state without the token, on loopback
//! too; beyond loopback nothing at all without it (issue 16, "Security first").
#![allow(clippy::unwrap_used)]

mod util;

use std::os::unix::fs::PermissionsExt;

use util::*;

/// Every endpoint that changes something.
const CHANGES: [&str; 3] = ["/reload", "/restart", "/dead-letters/1/requeue"];

#[test]
fn changes_need_the_token_on_loopback_and_reads_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let mut agent = Agent::standard(&dir.path().join("agent"), mq.port, &cloud.url());
    agent.wait_connected();
    let port = agent.control_port;

    // Generated at first start, readable by its owner only.
    let path = agent.dir.join("journal/control-token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    let token = agent.control_token();
    assert!(token.len() >= 32, "{token:?}");

    let wrong = format!("{}x", &token[..token.len() - 1]);
    for path in CHANGES {
        for (what, t) in [("no token", None), ("a wrong token", Some(wrong.as_str()))] {
            let (code, body) = http_status(port, "POST", path, t);
            assert_eq!(code, 401, "POST {path} with {what}: {body}");
            assert!(!body.contains(&token), "the answer never shows the token");
        }
    }
    // Reads on loopback need none.
    assert_eq!(http_status(port, "GET", "/status", None).0, 200);
    assert_eq!(http_status(port, "GET", "/metrics", None).0, 200);
    // With the token the changes are carried out (no dead letter 1 here: 404, not 401).
    let (code, body) = http_status(port, "POST", "/dead-letters/1/requeue", Some(&token));
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_status(port, "POST", "/reload", Some(&token));
    assert_eq!(code, 200, "{body}");
    // The refusals were logged, without the token.
    let log = agent.log_text();
    assert!(log.contains("refused: no valid token"), "{log}");
    assert!(!log.contains(&token));
    // Nothing refused changed anything: the same run, never restarted.
    assert_eq!(agent.runs_logged(), 1);
    agent.stop();
}

#[test]
fn beyond_loopback_every_request_needs_the_configured_token() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let port = free_port();
    let token = "a-token-of-the-operators-own-0123";
    let text = edited(
        agent_config(
            &dir.path().join("agent"),
            mq.port,
            &cloud.url(),
            port,
            "",
            "",
        ),
        &[(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"0.0.0.0:{port}\"\ntoken = \"{token}\""),
        )],
    );
    let mut agent = Agent::start(&dir.path().join("agent"), &text, port);
    // The test talks to it over loopback; the agent sees a listener beyond it.
    for path in ["/status", "/metrics", "/dead-letters"] {
        let (code, body) = http_status(port, "GET", path, None);
        assert_eq!(code, 401, "GET {path} without the token: {body}");
        assert_eq!(http_status(port, "GET", path, Some(token)).0, 200, "{path}");
    }
    for path in CHANGES {
        assert_eq!(
            http_status(port, "POST", path, Some("wrong-token-0123456789")).0,
            401
        );
    }
    // The effective config masks it.
    let out = command(FERRY)
        .args(["check-config", "-c"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains(token), "{shown}");
    agent.stop();
}

#[test]
fn a_listener_beyond_loopback_without_a_token_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = edited(
        agent_config(dir.path(), 1, "http://127.0.0.1:9/x", port, "", ""),
        &[(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"0.0.0.0:{port}\""),
        )],
    );
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, text).unwrap();
    let out = command(FERRY)
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("control.token"), "{err}");
}
