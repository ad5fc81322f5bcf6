//! Reloading the config of a running agent (`ferry reload`, SIGHUP): runtime keys apply in place,
//! other keys restart the agent in the same process, a broken file changes nothing.
#![allow(clippy::unwrap_used)]

mod util;

use std::time::Duration;

use util::*;

fn reload(agent: &Agent) -> serde_json::Value {
    let out = command(FERRY)
        .args(["reload", "-c"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ferry reload failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap()
}

fn edit(agent: &Agent, from: &str, to: &str) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(text.contains(from), "{from:?} not in config");
    std::fs::write(&agent.config, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_rate_limit_and_the_log_level_change_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let control = free_port();
    let text = agent_config(
        dir.path(),
        mq.port,
        &cloud.url(),
        control,
        "",
        "\n[log]\nlevel = \"info\"\n",
    );
    let mut agent = Agent::start(&dir.path().join("agent"), &text, control);
    agent.kill();
    // Without FERRY_LOG, so that log.level from the file governs.
    agent.start_again_with_env(&[("FERRY_LOG", "")]);
    agent.wait_connected();
    let pid = agent.pid();
    assert!(agent.status()["uplink"]["limit_records_per_sec"].is_null());

    edit(
        &agent,
        "batch_max_records = 100",
        "batch_max_records = 100\nmax_records_per_sec = 250",
    );
    edit(
        &agent,
        "level = \"info\"",
        "level = \"info,ferry::uplink=debug\"",
    );
    let answer = reload(&agent);
    assert_eq!(answer["restart"], false, "{answer}");
    wait_until("new limit in /status", Duration::from_secs(5), || {
        agent.status()["uplink"]["limit_records_per_sec"] == 250.0
    });
    // The new filter lets the uplink's per-batch debug lines through.
    publish(mq.port, "sensors/a", numbered(0..5));
    wait_until(
        "debug lines from the uplink",
        Duration::from_secs(10),
        || {
            agent
                .log_text()
                .lines()
                .any(|l| l.contains("DEBUG ferry::uplink"))
        },
    );
    assert_eq!(agent.pid(), pid);
    let log = agent.log_text();
    assert!(
        log.contains("config changed uplink.max_records_per_sec 0 -> 250"),
        "{log}"
    );
    assert!(!log.contains("restarting"), "{log}");
    assert_eq!(
        agent.status()["uptime_s"].as_u64().map(|s| s < 600),
        Some(true)
    );
}

#[test]
fn a_new_topic_restarts_the_agent_in_place_and_applies() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let mut agent = Agent::standard(&dir.path().join("agent"), mq.port, &cloud.url());
    agent.wait_connected();
    let pid = agent.pid();
    publish(mq.port, "sensors/a", numbered(0..10));
    wait_until("first 10 delivered", Duration::from_secs(20), || {
        cloud.records("gw-test").len() == 10
    });

    edit(
        &agent,
        r#"topics = ["sensors/#"]"#,
        r#"topics = ["sensors/#", "plant/#"]"#,
    );
    signal_pid(pid, "HUP");
    wait_until("restart logged", Duration::from_secs(10), || {
        agent
            .log_text()
            .contains("restarting to apply keys=mqtt.topics")
    });
    // The same process (exec), a new run: wait until it is up and subscribed again.
    agent.wait_runs(2);
    agent.wait_connected();
    assert_eq!(agent.pid(), pid);
    publish(mq.port, "plant/7", numbered(10..20));
    wait_until("plant records delivered", Duration::from_secs(20), || {
        cloud.records("gw-test").len() == 20
    });
    assert_exactly_once(&cloud.records("gw-test"), 20);
    agent.stop();
}

#[test]
fn a_broken_file_is_refused_and_the_agent_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let cloud = Cloud::start(dir.path());
    let mut agent = Agent::standard(&dir.path().join("agent"), mq.port, &cloud.url());
    agent.wait_connected();
    let pid = agent.pid();
    edit(&agent, "batch_max_records = 100", "batch_max_records = -3");
    // `ferry reload` reads the control address from the (now broken) file: ask over HTTP.
    let answer = http_post(agent.control_port, "/reload", Some(&agent.control_token()));
    assert!(answer.contains(" 409 "), "{answer}");
    assert!(answer.contains("uplink.batch_max_records"), "{answer}");
    assert!(
        agent
            .log_text()
            .contains("config reload failed, keeping the running config")
    );
    publish(mq.port, "sensors/a", numbered(0..5));
    wait_until("still delivering", Duration::from_secs(20), || {
        cloud.records("gw-test").len() == 5
    });
    // Kept running: the same process, the same run, no restart to apply anything.
    assert_eq!(agent.pid(), pid);
    let log = agent.log_text();
    assert_eq!(agent.runs_logged(), 1, "{log}");
    assert!(!log.contains("restarting"), "{log}");
    agent.stop();
}
