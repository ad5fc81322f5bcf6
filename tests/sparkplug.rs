//! Sparkplug B end to end: an edge node built on pysparkplug (PyPI; `tests/sparkplug/edge_node.py`)
//! publishing through a real mosquitto to the real agent, which forwards to ferry-cloud.
#![allow(clippy::unwrap_used)]

mod util;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use util::*;

const DEVICE: &str = "gw-test";

/// The Python with pysparkplug that `make deps` installs (scripts/ensure-deps.sh).
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv/bin/python3");
    assert!(
        venv.exists(),
        "{} is missing: `make deps` installs pysparkplug there",
        venv.display()
    );
    venv
}

/// The edge node process, one command at a time.
struct EdgeNode {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl EdgeNode {
    fn start(mqtt_port: u16) -> EdgeNode {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug/edge_node.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(mqtt_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::Builder::new()
            .name("edge-node-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .unwrap();
        EdgeNode {
            child,
            stdin,
            lines,
        }
    }

    /// Sends `cmd` and waits (30 s at most) for the node to say it is done.
    fn run(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let word = cmd.split_whitespace().next().unwrap();
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("edge node: no answer to {cmd:?}"));
        assert_eq!(line, format!("ok {word}"), "edge node, after {cmd:?}");
    }
}

impl Drop for EdgeNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kind(r: &Value) -> &str {
    r["topic"].as_str().unwrap().split('/').nth(2).unwrap_or("")
}

/// An edge node births with aliased metrics and a device, sends data by alias, loses a message
/// upstream (the test withholds its seq), is asked to rebirth and does, crashes (the broker
/// publishes its will) and comes back with a new bdSeq, loses data while ferry itself is down
/// (the broker drops QoS 0 for ferry's offline session), and finally disconnects cleanly. At the
/// cloud: every Sparkplug message with its decoded form beside the raw bytes, the aliases resolved
/// to names, the upstream gaps (seq, right before the message that revealed each; the one across
/// ferry's restart found because ferry follows the node again from its journal), ferry's rebirth
/// requests, no false gap for the rebirth or the crash; and one bdSeq mismatch, which is
/// pysparkplug's own: its clean disconnect sends an NDEATH with the next session's bdSeq.
#[test]
fn a_sparkplug_edge_node_is_decoded_and_its_lost_message_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let cloud = Cloud::start(&tmp.path().join("cloud"));
    let mut agent = Agent::standard_edited(
        &tmp.path().join("agent"),
        broker.port,
        &cloud.url(),
        &[
            (
                "topics = [\"sensors/#\"]",
                "topics = [\"sensors/#\", \"spBv1.0/#\"]",
            ),
            ("[control]", "[sparkplug]\nrebirth = true\n\n[control]"),
        ],
    );
    agent.wait_connected();
    let mut node = EdgeNode::start(broker.port);
    node.run("connect");
    node.run("data 3");
    node.run("skip");
    node.run("data 1");
    node.run("wait_rebirth 20");
    node.run("data 1");
    node.run("crash");
    node.run("data 1");
    // ferry stops once the last DDATA is at the cloud; the node's next data (QoS 0) then finds
    // ferry's session offline and the broker drops it. ferry follows the node again from its
    // journal's newest records, so the data after its restart shows that loss as a gap of
    // exactly those seqs (not an unknown), and ferry asks for a rebirth.
    wait_until(
        "the data before the restart at the cloud",
        Duration::from_secs(30),
        || {
            cloud
                .records(DEVICE)
                .iter()
                .filter(|r| kind(r) == "DDATA")
                .count()
                == 4
        },
    );
    agent.stop();
    node.run("data 1");
    agent.start_again();
    agent.wait_connected();
    assert!(
        agent
            .log_text()
            .contains("sparkplug: following 1 edge nodes again"),
        "{}",
        agent.log_text()
    );
    node.run("data 1");
    node.run("wait_rebirth 20");
    node.run("quit");

    // The last message: the NDEATH of the last session (the first is the broker's will).
    // Two uploads may be in flight: wait for the cursor too, so that every batch is stored.
    wait_until(
        "the last death at the cloud",
        Duration::from_secs(30),
        || {
            let status = agent.status();
            status["acked_seq"] == status["head_seq"]
                && cloud
                    .records(DEVICE)
                    .iter()
                    .filter(|r| kind(r) == "NDEATH")
                    .count()
                    == 2
        },
    );
    let mut records = cloud.records(DEVICE);
    records.sort_by_key(|r| r["seq"].as_u64());
    let count = |k: &str| records.iter().filter(|r| kind(r) == k).count();
    assert_eq!(
        (
            count("NBIRTH"),
            count("DBIRTH"),
            count("NDATA"),
            count("DDATA")
        ),
        (4, 4, 7, 5),
        "{records:#?}"
    );

    // Every alias resolved, the data after ferry's restart too: the births it needs were among
    // the journal's newest records that ferry followed again.
    for r in records
        .iter()
        .filter(|r| kind(r) != "NCMD" && !r["topic"].as_str().unwrap().starts_with("$ferry/"))
    {
        assert!(r["payload_b64"].is_string(), "{r}");
        let sp = &r["sparkplug"];
        assert!(sp["metrics"].is_array(), "{r}");
        for m in sp["metrics"].as_array().unwrap() {
            assert!(m["name"].is_string(), "every alias resolved: {r}");
        }
    }
    let ndata = records.iter().find(|r| kind(r) == "NDATA").unwrap();
    let m = &ndata["sparkplug"]["metrics"][0];
    assert_eq!(
        (&m["name"], &m["alias"]),
        (&json!("Temperature"), &json!(1)),
        "{ndata}"
    );
    assert!(m["value"].is_f64(), "{ndata}");
    let ddata = records.iter().find(|r| kind(r) == "DDATA").unwrap();
    assert_eq!(ddata["sparkplug"]["metrics"][0]["name"], "Speed", "{ddata}");
    let births: Vec<&Value> = records.iter().filter(|r| kind(r) == "NBIRTH").collect();
    let bd_seq = |r: &Value| {
        r["sparkplug"]["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "bdSeq")
            .map(|m| m["value"].clone())
            .unwrap()
    };
    assert_eq!(
        bd_seq(births[0]),
        bd_seq(births[1]),
        "a rebirth keeps bdSeq"
    );
    assert_ne!(
        bd_seq(births[1]),
        bd_seq(births[2]),
        "a new session takes a new bdSeq"
    );
    let deaths: Vec<&Value> = records.iter().filter(|r| kind(r) == "NDEATH").collect();
    assert_eq!(
        bd_seq(deaths[0]),
        bd_seq(births[1]),
        "the will ends the first session"
    );

    // The upstream gaps, each right before the message that revealed it.
    let gaps: Vec<&Value> = records
        .iter()
        .filter(|r| r["topic"] == "$ferry/upstream_gap")
        .collect();
    assert_eq!(gaps.len(), 3, "{gaps:#?}");
    let mismatch = &gaps[2]["payload"];
    assert_eq!(mismatch["kind"], "bd_seq_mismatch", "{mismatch}");
    assert_eq!(mismatch["birth_bd_seq"], bd_seq(births[2]), "{mismatch}");
    assert_ne!(mismatch["death_bd_seq"], bd_seq(births[2]), "{mismatch}");
    assert_eq!(
        records
            .iter()
            .find(|r| r["seq"].as_u64() == gaps[2]["seq"].as_u64().map(|s| s + 1))
            .map(kind),
        Some("NDEATH")
    );
    // The loss while ferry was down: one NDATA and one DDATA, found by the first data after.
    let lost = &gaps[1]["payload"];
    assert_eq!(
        (&lost["kind"], &lost["missing"]),
        (&json!("seq"), &json!(2)),
        "{lost}"
    );
    let gap = &gaps[0]["payload"];
    assert_eq!(
        (
            &gap["kind"],
            &gap["edge_node"],
            &gap["group"],
            &gap["missing"]
        ),
        (&json!("seq"), &json!("edge1"), &json!("plant"), &json!(1)),
        "{gap}"
    );
    let after = records
        .iter()
        .find(|r| r["seq"].as_u64() == gaps[0]["seq"].as_u64().map(|s| s + 1))
        .unwrap();
    assert_eq!(kind(after), "NDATA");
    assert_eq!(after["sparkplug"]["seq"], gap["received_seq"]);

    // Nothing ferry could not tell: it knew the node across its restart.
    assert!(
        !records
            .iter()
            .any(|r| r["topic"] == "$ferry/upstream_unknown"),
        "{records:#?}"
    );
    let ledger = cloud.ledger(DEVICE).unwrap();
    assert_eq!(ledger["upstream_gaps"], 3, "{ledger}");

    // ferry asked for the rebirths (the node answered them: "ok wait_rebirth" above).
    assert_eq!(records.iter().filter(|r| kind(r) == "NCMD").count(), 2);
    let ncmd = records.iter().find(|r| kind(r) == "NCMD").unwrap();
    assert_eq!(
        ncmd["sparkplug"]["metrics"][0]["name"], "Node Control/Rebirth",
        "{ncmd}"
    );
    assert!(
        agent
            .log_text()
            .contains("asked spBv1.0/plant/NCMD/edge1 for a rebirth"),
        "{}",
        agent.log_text()
    );
}

use serde_json::json;
