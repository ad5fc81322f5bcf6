//! The downlink end to end: the real `ferry-cloud` queues commands and serves the WebSocket, the
//! real `ferry` executes them against a real mosquitto. Publish round trips, offline queues,
//! dead links, set_config, replay_from, bad frames, wss with a test CA and with mTLS, shutdown.
#![allow(clippy::unwrap_used)]

mod util;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;

const DEVICE: &str = "gw-test";

/// A cloud with the downlink endpoint on `ws_port`.
fn cloud_with_ws(dir: &std::path::Path, ws_port: u16, extra: &[&str]) -> Cloud {
    let ws = format!("127.0.0.1:{ws_port}");
    let mut args = vec!["--ws-listen", ws.as_str()];
    args.extend_from_slice(extra);
    Cloud::start_with(dir, free_port(), &args)
}

/// An agent whose downlink goes to `ws_url`; `extra` is appended to the config.
fn agent(dir: &std::path::Path, mqtt: u16, cloud: &Cloud, ws_url: &str, extra: &str) -> Agent {
    let control = free_port();
    let text = agent_config(
        dir,
        mqtt,
        &cloud.url(),
        control,
        "",
        &format!("{}{extra}", downlink_section(ws_url)),
    );
    Agent::start(&dir.join("agent"), &text, control)
}

fn downlink_state(cloud: &Cloud) -> Value {
    serde_json::from_str(&cloud.get(&format!("/v1/devices/{DEVICE}/downlink"))).unwrap()
}

fn wait_downlink(cloud: &Cloud) {
    wait_until("downlink connected", Duration::from_secs(15), || {
        downlink_state(cloud)["connected"] == true
    });
}

/// Queues a command; returns its id.
fn send(cloud: &Cloud, body: Value) -> String {
    let (code, answer) = http_post_body(
        cloud.port,
        &format!("/v1/devices/{DEVICE}/commands"),
        body.to_string().as_bytes(),
    );
    assert_eq!(code, 202, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// Waits for the result of command `id`.
fn result(cloud: &Cloud, id: &str) -> Value {
    let path = format!("/v1/devices/{DEVICE}/commands/{id}");
    let mut out = Value::Null;
    wait_until(&format!("result of {id}"), Duration::from_secs(20), || {
        let v: Value = serde_json::from_str(&cloud.get(&path)).unwrap();
        if v["state"] == "done" {
            out = v["result"].clone();
            true
        } else {
            false
        }
    });
    out
}

/// Sends a `status` command over the link and asserts that this agent answered it.
fn assert_link_answers(cloud: &Cloud) {
    let r = result(cloud, &send(cloud, serde_json::json!({"action": "status"})));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["device_id"], DEVICE, "{r}");
}

fn raw(cloud: &Cloud, body: &[u8], binary: bool) {
    let q = if binary { "?binary=1" } else { "" };
    let (code, answer) = http_post_body(cloud.port, &format!("/v1/devices/{DEVICE}/raw{q}"), body);
    assert_eq!(code, 202, "{answer}");
}

/// (topic, payload, retain) of a message a device received.
type Received = (String, Vec<u8>, bool);

/// A device on the broker: subscribes to `topic` and collects what arrives.
struct Device {
    got: Arc<Mutex<Vec<Received>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Device {
    fn subscribe(port: u16, topic: &str) -> Device {
        use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
        let mut opts = MqttOptions::new(format!("device-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 10);
        client.subscribe(topic, QoS::AtLeastOnce).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&subscribed));
        let thread = std::thread::spawn(move || {
            let _client = client;
            for event in conn.iter() {
                match event {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => *s.lock().unwrap() = true,
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        g.lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec(), p.retain))
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        wait_until("device subscribed", Duration::from_secs(10), || {
            *subscribed.lock().unwrap()
        });
        Device {
            got,
            _thread: thread,
        }
    }

    fn messages(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

#[test]
fn a_publish_command_reaches_the_device_and_shutdown_is_prompt_while_connected() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let device = Device::subscribe(broker.port, "devices/7/cmd");
    let mut agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "",
    );
    wait_downlink(&cloud);
    let hello = downlink_state(&cloud)["hello"].clone();
    assert_eq!(hello["device_id"], DEVICE);
    assert!(hello["acked_seq"].is_u64(), "{hello}");

    let id = send(
        &cloud,
        serde_json::json!({"action": "publish", "topic": "devices/7/cmd", "payload": {"on": true}}),
    );
    let r = result(&cloud, &id);
    assert_eq!(r["ok"], true, "{r}");
    // `ok` means the broker acknowledged it: the device has it, or gets it promptly.
    wait_until("device got the command", Duration::from_secs(10), || {
        !device.messages().is_empty()
    });
    assert_eq!(
        device.messages(),
        vec![(
            "devices/7/cmd".to_owned(),
            br#"{"on":true}"#.to_vec(),
            false
        )]
    );

    let text_id = send(
        &cloud,
        serde_json::json!({"action": "publish", "topic": "devices/7/cmd", "payload_b64": "AAEC", "qos": 0}),
    );
    assert_eq!(result(&cloud, &text_id)["ok"], true);
    wait_until("binary payload", Duration::from_secs(10), || {
        device.messages().len() == 2
    });
    assert_eq!(device.messages()[1].1, vec![0, 1, 2]);

    let status = result(
        &cloud,
        &send(&cloud, serde_json::json!({"action": "status"})),
    );
    assert_eq!(status["data"]["device_id"], DEVICE, "{status}");
    assert!(status["data"]["head_seq"].is_u64());
    assert_eq!(status["data"]["downlink"]["state"], "connected", "{status}");
    assert_eq!(agent.status()["downlink"]["commands"], 3);
    // The device's commands, newest first, with who sent them (no operators here: "(open)").
    let listed: Value =
        serde_json::from_str(&cloud.get(&format!("/v1/devices/{DEVICE}/commands"))).unwrap();
    let summary: Vec<String> = listed["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}",
                c["action"], c["state"], c["by"], c["result"]["ok"]
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            r#""status" "done" "(open)" true"#,
            r#""publish" "done" "(open)" true"#,
            r#""publish" "done" "(open)" true"#
        ],
        "{listed}"
    );

    let waited = agent.stop();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}

#[test]
fn commands_queued_while_offline_run_once_after_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let device = Device::subscribe(broker.port, "devices/+/cmd");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            send(
                &cloud,
                serde_json::json!({"id": format!("offline-{i}"), "action": "publish", "topic": format!("devices/{i}/cmd"), "payload_text": format!("go {i}")}),
            )
        })
        .collect();
    assert_eq!(downlink_state(&cloud)["queued"], 3);

    let mut agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "",
    );
    for id in &ids {
        assert_eq!(result(&cloud, id)["ok"], true);
    }
    wait_until("three messages", Duration::from_secs(10), || {
        device.messages().len() >= 3
    });

    // The cloud sends an answered command again (as after a connection lost before the result
    // arrived), also across an agent restart: the stored result comes back, nothing runs twice.
    agent.stop();
    agent.start_again();
    wait_downlink(&cloud);
    let again = serde_json::json!({"type": "command", "id": "offline-1", "action": "publish", "topic": "devices/1/cmd", "payload_text": "go 1"});
    raw(&cloud, again.to_string().as_bytes(), false);
    wait_until(
        "repeat answered from the store",
        Duration::from_secs(10),
        || {
            agent
                .log_text()
                .contains("command id=offline-1 seen before")
        },
    );
    // A new command after the repeat, on the same link: commands run in order, so once its
    // message is at the device, a repeat that ran would be there too, before it.
    let next = serde_json::json!({"type": "command", "id": "offline-3", "action": "publish", "topic": "devices/3/cmd", "payload_text": "go 3"});
    raw(&cloud, next.to_string().as_bytes(), false);
    wait_until(
        "the command after the repeat",
        Duration::from_secs(10),
        || device.messages().iter().any(|m| m.0 == "devices/3/cmd"),
    );
    let topics: Vec<String> = device.messages().into_iter().map(|m| m.0).collect();
    let mut before: Vec<&str> = topics[..topics.len() - 1]
        .iter()
        .map(String::as_str)
        .collect();
    before.sort_unstable();
    assert_eq!(
        before,
        ["devices/0/cmd", "devices/1/cmd", "devices/2/cmd"],
        "a repeated command ran twice: {topics:?}"
    );
    assert_eq!(topics.last().map(String::as_str), Some("devices/3/cmd"));
}

#[test]
fn a_link_that_silently_stops_forwarding_is_replaced_within_dead_after() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let proxy = FaultProxy::start(ws_port, ProxyMode::Pass);
    let agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{}/v1/downlink", proxy.port),
        "",
    );
    wait_downlink(&cloud);
    assert_eq!(proxy.accepted(), 1);
    proxy.set_mode(ProxyMode::Stall);
    // dead_after is 2 s; the kernel would take many minutes to notice a half-open connection.
    wait_until("dead link noticed", Duration::from_secs(8), || {
        agent.log_text().contains("no frame from the cloud for 2s")
    });
    wait_until("reconnect attempted", Duration::from_secs(8), || {
        proxy.accepted() >= 2
    });
    proxy.set_mode(ProxyMode::Pass);
    wait_until("reconnected", Duration::from_secs(15), || {
        downlink_state(&cloud)["connections"].as_u64() >= Some(2)
    });
    assert_link_answers(&cloud);
}

#[test]
fn set_config_of_a_rate_limit_applies_now_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let mut agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "",
    );
    wait_downlink(&cloud);
    let pid = agent.pid();
    let r = result(
        &cloud,
        &send(
            &cloud,
            serde_json::json!({"action": "set_config", "key": "uplink.max_records_per_sec", "value": 250}),
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["restart"], false, "{r}");
    wait_until("limit applied", Duration::from_secs(5), || {
        agent.status()["uplink"]["limit_records_per_sec"] == 250.0
    });
    assert_eq!(agent.pid(), pid, "no restart");

    // Keys outside the whitelist and invalid values are refused, the file unchanged.
    let r = result(
        &cloud,
        &send(
            &cloud,
            serde_json::json!({"action": "set_config", "key": "uplink.url", "value": "http://evil/"}),
        ),
    );
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("cannot be set remotely"),
        "{r}"
    );
    let r = result(
        &cloud,
        &send(
            &cloud,
            serde_json::json!({"action": "set_config", "key": "uplink.batch_max_records", "value": 0}),
        ),
    );
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("batch_max_records"),
        "{r}"
    );

    agent.stop();
    agent.start_again();
    wait_until("limit after restart", Duration::from_secs(10), || {
        agent.status()["uplink"]["limit_records_per_sec"] == 250.0
    });
}

#[test]
fn replay_from_redelivers_retained_records_and_is_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "",
    );
    agent.wait_connected();
    wait_downlink(&cloud);
    publish(broker.port, "sensors/a", numbered(0..10));
    wait_until("delivered", Duration::from_secs(20), || {
        agent.status()["acked_seq"] == 10
    });
    let before = cloud.stats()["duplicates"].as_u64().unwrap_or(0);

    let r = result(
        &cloud,
        &send(
            &cloud,
            serde_json::json!({"action": "replay_from", "seq": 4}),
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["acked_seq_before"], 10);
    assert_eq!(r["data"]["acked_seq"], 3);
    wait_until("replayed", Duration::from_secs(20), || {
        agent.status()["acked_seq"] == 10
            && cloud.stats()["duplicates"].as_u64().unwrap_or(0) >= before + 7
    });
    assert!(
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("cursor rewound") && l.contains("from=10")),
        "rewind not logged at WARN"
    );
    assert_exactly_once(&cloud.records(DEVICE), 10);

    let r = result(
        &cloud,
        &send(
            &cloud,
            serde_json::json!({"action": "replay_from", "seq": 999}),
        ),
    );
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("not retained"), "{r}");
}

#[test]
fn malformed_binary_and_oversized_frames_leave_the_link_and_agent_working() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "max_message_size = \"64KiB\"\n",
    );
    wait_downlink(&cloud);
    raw(&cloud, b"{not json", false);
    raw(&cloud, &[0xff, 0, 1], true);
    let r = result(
        &cloud,
        &send(&cloud, serde_json::json!({"action": "reboot"})),
    );
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("unknown action"),
        "{r}"
    );
    wait_until("malformed frames logged", Duration::from_secs(5), || {
        let log = agent.log_text();
        log.contains("ignored a frame: malformed json") && log.contains("ignored a binary frame")
    });
    assert_eq!(downlink_state(&cloud)["connections"], 1);

    // Over max_message_size: the rest of the frame cannot be skipped, so the connection is
    // closed (1009) and opened again.
    let big = format!(
        r#"{{"type":"command","id":"big","action":"publish","topic":"t","payload_text":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    raw(&cloud, big.as_bytes(), false);
    wait_until(
        "reconnected after an oversized frame",
        Duration::from_secs(15),
        || {
            downlink_state(&cloud)["connections"] == 2
                && downlink_state(&cloud)["connected"] == true
        },
    );
    assert!(
        agent
            .log_text()
            .contains("frame over downlink.max_message_size")
    );
    assert_link_answers(&cloud);
}

/// A queued command larger than the device takes: the device closes with 1009, the cloud answers
/// that command as refused instead of sending it again forever, and the commands behind it run.
#[test]
fn a_queued_command_too_large_for_the_device_does_not_block_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let _agent = agent(
        tmp.path(),
        broker.port,
        &cloud,
        &format!("ws://127.0.0.1:{ws_port}/v1/downlink"),
        "max_message_size = \"16KiB\"\n",
    );
    wait_downlink(&cloud);
    let big = send(
        &cloud,
        serde_json::json!({"action": "publish", "topic": "t", "payload_text": "x".repeat(32 * 1024)}),
    );
    let small = send(&cloud, serde_json::json!({"action": "status"}));
    let r = result(&cloud, &big);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("max_message_size"),
        "{r}"
    );
    assert_eq!(result(&cloud, &small)["ok"], true);
}

#[test]
fn wss_with_a_test_ca_and_with_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let c = |f: &str| certs.join(f).display().to_string();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));

    // Server authentication against the test CA.
    let ws_port = free_port();
    let cloud = cloud_with_ws(
        &tmp.path().join("cloud"),
        ws_port,
        &[
            "--tls-cert",
            &c("server.pem"),
            "--tls-key",
            &c("server.key"),
        ],
    );
    let tls = format!("\n[tls]\nca_file = \"{}\"\n", c("ca.pem"));
    let mut a = agent(
        &tmp.path().join("one"),
        broker.port,
        &cloud,
        &format!("wss://127.0.0.1:{ws_port}/v1/downlink"),
        &tls,
    );
    wait_downlink(&cloud);
    assert_link_answers(&cloud);
    a.stop();
    drop(cloud);

    // mTLS: without a client certificate the handshake fails; with one it works.
    let ws_port = free_port();
    let cloud = cloud_with_ws(
        &tmp.path().join("cloud2"),
        ws_port,
        &[
            "--tls-cert",
            &c("server.pem"),
            "--tls-key",
            &c("server.key"),
            "--client-ca",
            &c("ca.pem"),
        ],
    );
    let url = format!("wss://127.0.0.1:{ws_port}/v1/downlink");
    let anonymous = agent(&tmp.path().join("two"), broker.port, &cloud, &url, &tls);
    wait_until("handshake refused", Duration::from_secs(15), || {
        anonymous
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("downlink:") && l.contains("handshake"))
    });
    assert_eq!(downlink_state(&cloud)["connections"], 0);
    drop(anonymous);
    let mtls = format!(
        "{tls}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        c("client.pem"),
        c("client.key")
    );
    let _b = agent(&tmp.path().join("three"), broker.port, &cloud, &url, &mtls);
    wait_downlink(&cloud);
    assert_link_answers(&cloud);
}

#[test]
fn bad_certificate_files_are_a_config_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("junk.pem"), "no certificate here\n").unwrap();
    let text = agent_config(
        tmp.path(),
        1883,
        "http://127.0.0.1:1/v1/ingest",
        free_port(),
        "",
        &format!(
            "{}\n[tls]\nca_file = \"junk.pem\"\n",
            downlink_section("wss://127.0.0.1:1/v1/downlink")
        ),
    );
    let config = tmp.path().join("ferry.toml");
    std::fs::write(&config, text).unwrap();
    let out = command(FERRY)
        .args(["check-config", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.ca_file") && err.contains("junk.pem"),
        "{err}"
    );
}

/// A gateway whose uplink cannot reach the cloud still gives its account in the downlink hello:
/// the center's ledger shows it behind, with everything it holds waiting on it.
#[test]
fn the_hello_tells_the_center_what_a_gateway_with_a_dead_uplink_holds() {
    const N: u64 = 50;
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let ws_port = free_port();
    let cloud = cloud_with_ws(&tmp.path().join("cloud"), ws_port, &[]);
    let dir = tmp.path().join("agent");
    let control = free_port();
    let dead_uplink = format!("http://127.0.0.1:{}/v1/ingest", free_port());
    let text = agent_config(
        &dir,
        broker.port,
        &dead_uplink,
        control,
        "",
        &downlink_section(&format!("ws://127.0.0.1:{ws_port}/v1/downlink")),
    );
    let mut agent = Agent::start(&dir.join("agent"), &text, control);
    agent.wait_connected();
    let published_ms = now_ms();
    publish(broker.port, "sensors/held", numbered(0..N));
    wait_until("all journaled", Duration::from_secs(10), || {
        agent.status()["head_seq"] == N
    });
    // The hello goes out at each connection: restart so that the next one carries the backlog.
    agent.stop();
    agent.start_again();
    let ledger = || -> Option<Value> {
        serde_json::from_str(&cloud.get(&format!("/v1/devices/{DEVICE}/ledger"))).ok()
    };
    wait_until(
        "the center to know the backlog",
        Duration::from_secs(20),
        || ledger().is_some_and(|l| l["waiting"] == N),
    );
    let l = ledger().unwrap();
    assert_eq!(
        (
            &l["delivered"],
            &l["missing"],
            &l["reported"],
            &l["balanced"]
        ),
        (
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(true),
            &serde_json::json!(true)
        ),
        "{l}"
    );
    assert_eq!(l["states"], serde_json::json!(["behind"]), "{l}");
    // The oldest unsent record is the first one published (times in ms; 1 s of clock slack).
    let oldest = l["oldest_unsent_ts_ms"]
        .as_u64()
        .expect("oldest_unsent_ts_ms");
    assert!(
        oldest + 1000 >= published_ms && oldest <= now_ms(),
        "{oldest} vs published at {published_ms}: {l}"
    );
}

fn now_ms() -> u64 {
    ferry_util::epoch_ms(std::time::SystemTime::now())
}
