//! Bad input gets a clear error or a flagged record; it never crashes the agent or loses data.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

const DEVICE: &str = "gw-test";

fn check_config(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = command(FERRY)
        .arg("check-config")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&*path.to_string_lossy()) || out.status.success(),
        "error names the file: {stderr}"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const GOOD: &str = r#"
[mqtt]
topics = ["sensors/#"]
username = "ferry"
password = "hunter2"
[journal]
dir = "/tmp/ferry-never-created"
[uplink]
url = "http://127.0.0.1:8080/v1/ingest"
token = "s3cret-token"
"#;

#[test]
fn each_kind_of_config_mistake_exits_2_naming_the_key() {
    let (code, out, _) = check_config(GOOD);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("****") && !out.contains("hunter2") && !out.contains("s3cret"),
        "secrets masked: {out}"
    );

    let cases = [
        ("unknown key", GOOD.replace("token =", "tokn ="), "tokn"),
        (
            "unknown section",
            format!("{GOOD}\n[uplinks]\nx = 1\n"),
            "uplinks",
        ),
        (
            "wrong type",
            format!("{GOOD}batch_max_records = \"many\"\n"),
            "batch_max_records",
        ),
        (
            "out of range",
            format!("{GOOD}batch_max_records = 0\n"),
            "batch_max_records",
        ),
        (
            "bad size",
            GOOD.replace("[journal]", "[journal]\nmax_bytes = \"12XB\""),
            "max_bytes",
        ),
        (
            "bad duration",
            format!("{GOOD}max_backoff = \"soon\"\n"),
            "max_backoff",
        ),
        (
            "missing url",
            GOOD.replace("url = \"http://127.0.0.1:8080/v1/ingest\"", ""),
            "url",
        ),
        (
            "bad url",
            GOOD.replace("http://127.0.0.1:8080", "ftp://x"),
            "url",
        ),
        (
            "bad on_full",
            GOOD.replace("[journal]", "[journal]\non_full = \"panic\""),
            "on_full",
        ),
        (
            "bad filter",
            GOOD.replace("sensors/#", "sensors/#/x"),
            "topics",
        ),
        ("syntax", format!("{GOOD}\n[[[\n"), ""),
    ];
    for (what, text, key) in cases {
        let (code, _, err) = check_config(&text);
        assert_eq!(code, Some(2), "{what}: exit code; stderr: {err}");
        assert!(err.contains(key), "{what}: the error names {key:?}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}

#[test]
fn run_with_a_bad_or_missing_config_exits_2() {
    let out = command(FERRY)
        .args(["run", "-c", "/nonexistent/ferry.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ferry.toml"));
    let out = command(FERRY).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn odd_payloads_and_topics_are_flagged_or_kept_never_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let control = free_port();
    let dir = tmp.path().join("agent");
    let config = agent_config(
        &dir,
        broker.port,
        &cloud.url(),
        control,
        "max_packet_size = \"4KiB\"\n[[mqtt.parse]]\nfilter = \"sensors/json/#\"\nformat = \"json\"\n[[mqtt.parse]]\nfilter = \"sensors/text/#\"\nformat = \"text\"",
        "",
    );
    let agent = Agent::start(&dir, &config, control);
    agent.wait_connected();

    // mosquitto itself refuses control characters in topics, so those never reach ferry.
    let odd_topic = "sensors/ünï/🌡/\u{200b}/a b/\u{202e}ltr/漢字";
    let messages = vec![
        ("sensors/json/a".to_string(), b"not json {".to_vec()),
        ("sensors/json/a".to_string(), br#"{"ok":true}"#.to_vec()),
        ("sensors/text/a".to_string(), vec![0xff, 0xfe, 0x00]),
        (odd_topic.to_string(), b"plain".to_vec()),
        ("sensors/big".to_string(), vec![b'x'; 8 * 1024]),
        ("sensors/after".to_string(), b"{\"n\":1}".to_vec()),
    ];
    publish_to(broker.port, messages);
    wait_until(
        "all 6 seqs accounted for at the cloud",
        Duration::from_secs(30),
        || {
            cloud
                .device(DEVICE)
                .map(|d| d["highest_seq"] == 6 && d["missing"] == serde_json::json!([]))
                .unwrap_or(false)
                && cloud.records(DEVICE).len() == 5
        },
    );
    let r = cloud.records(DEVICE);
    assert_eq!(r[0]["parse_error"], true);
    assert_eq!(r[0]["payload_b64"], "bm90IGpzb24gew==");
    assert_eq!(r[1]["payload"]["ok"], true);
    assert_eq!(r[2]["parse_error"], true);
    assert_eq!(r[2]["payload_b64"], "//4A");
    assert_eq!(r[3]["topic"], odd_topic);
    assert_eq!(r[3]["payload_text"], "plain");
    assert_eq!(
        r[4]["seq"], 6,
        "the message after the oversized one flows on"
    );
    let device = cloud.device(DEVICE).unwrap();
    assert_eq!(
        device["gaps"],
        serde_json::json!([{"from_seq": 5, "to_seq": 5, "reason": "rejected"}])
    );

    let st = agent.status();
    assert_eq!(st["totals"]["parse_failed"], 2);
    assert_eq!(st["mqtt_connected"], true);
    assert!(
        agent
            .log_text()
            .contains("message too large topic=sensors/big bytes=8192")
    );
}
