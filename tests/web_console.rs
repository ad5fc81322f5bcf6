//! The operators' console (`/console`) in a real browser: Debian's Chromium, headless, driven
//! over the DevTools protocol (`util/browser.rs`), against the real `ferry-cloud` on a real
//! PostgreSQL, filled with simulated gateways and one real `ferry` agent with its downlink.
//! Screenshots of each view go to `target/tmp/artifacts/console/` (never committed).

mod util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_testkit::Postgres;
use serde_json::json;
use util::*;

const DEVICE_TOKEN: &str = "device-token-0123456789";
const ALICE_TOKEN: &str = "alice-token-0123456789";

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts/console")
}

/// Posts a batch of `seqs` for `device` with its account `held` (head, acked); the status.
fn post(
    port: u16,
    device: &str,
    seqs: std::ops::RangeInclusive<u64>,
    salt: &str,
    held: (u64, u64),
) -> u16 {
    post_with(
        &http_client(Duration::from_secs(30)),
        port,
        device,
        seqs,
        salt,
        held,
    )
}

/// [`post`] on a client of the caller's, whose connections are kept alive between batches.
fn post_with(
    http: &ureq::Agent,
    port: u16,
    device: &str,
    seqs: std::ops::RangeInclusive<u64>,
    salt: &str,
    held: (u64, u64),
) -> u16 {
    let records: Vec<Value> = seqs
        .map(|s| json!({"seq": s, "ts_ms": 1_000 * s, "topic": "t", "payload": format!("{salt}{s}")}))
        .collect();
    // The oldest unsent record was received three hours ago.
    let oldest = ferry_util::epoch_ms(std::time::SystemTime::now()) - 3 * 3_600_000;
    let body = json!({"device_id": device, "records": records,
        "held": {"head_seq": held.0, "acked_seq": held.1, "oldest_unsent_ts_ms": oldest}});
    let mut response = http
        .post(format!("http://127.0.0.1:{port}/v1/ingest"))
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {DEVICE_TOKEN}"))
        .send(body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("a batch of {device} reaches ferry-cloud on {port}: {e}"));
    let _ = response.body_mut().read_to_string();
    response.status().as_u16()
}

/// The operator signs in; the overview counts the simulated fleet's states; the "missing" filter
/// shows exactly the device that lost data; a cloned identity is flagged; on the real agent's
/// page its downlink shows connected, and a `publish` sent from the page (confirmed in a dialog
/// that says what it will do) comes back with its result, logged with the operator's name; with
/// its cloud link cut while it takes 1,000 messages, its row turns "behind" once the link is
/// back, shows its drain rate, and turns "healthy" when the backlog drained.
#[test]
fn an_operator_sees_the_fleet_and_sends_a_command_from_the_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&tmp.path().join("pg"), free_port()).unwrap_or_else(|e| panic!("{e}"));
    let operators = tmp.path().join("operators");
    std::fs::write(&operators, format!("alice {ALICE_TOKEN}\n")).unwrap();
    let ws_port = free_port();
    let ws = format!("127.0.0.1:{ws_port}");
    let ops = operators.display().to_string();
    let cloud = Cloud::start_postgres(
        &tmp.path().join("cloud"),
        &pg.url(),
        &[
            "--token",
            DEVICE_TOKEN,
            "--operators",
            &ops,
            "--ws-listen",
            &ws,
        ],
    );

    // The simulated fleet: healthy, behind, a hole, a clone.
    assert_eq!(post(cloud.port, "gw-done", 1..=50, "", (50, 50)), 200);
    assert_eq!(post(cloud.port, "gw-lagging", 1..=100, "", (250, 100)), 200);
    assert_eq!(post(cloud.port, "gw-hole", 1..=10, "", (40, 0)), 200);
    assert_eq!(post(cloud.port, "gw-hole", 21..=40, "", (40, 40)), 200);
    assert_eq!(post(cloud.port, "gw-clone", 1..=5, "", (5, 5)), 200);
    assert_eq!(post(cloud.port, "gw-clone", 1..=5, "other-", (5, 5)), 409);

    // A real gateway with its downlink.
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let dir = tmp.path().join("agent");
    let control = free_port();
    // Its uplink through a proxy that can cut it; its downlink direct.
    let link = FaultProxy::start(cloud.port, ProxyMode::Pass);
    let config = agent_config(
        &dir,
        broker.port,
        &link.url(),
        control,
        "",
        &downlink_section(&format!("ws://{ws}/v1/downlink")),
    );
    let config = edited(
        config,
        &[(
            "batch_max_records = 100",
            &format!(
                "batch_max_records = 100\ntoken = \"{DEVICE_TOKEN}\"\nmax_records_per_sec = 50"
            ),
        )],
    );
    let agent = Agent::start(&dir, &config, control);
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(0..20));
    wait_until(
        "the gateway's records at the center",
        Duration::from_secs(30),
        || agent.status()["acked_seq"] == 20,
    );

    let mut browser = Browser::start(&tmp.path().join("chromium"));
    let base = format!("http://127.0.0.1:{}", cloud.port);
    browser.open(&format!("{base}/console"));
    let visible = |id: &str| format!("!document.getElementById('{id}').hidden");
    let wait = Duration::from_secs(20);
    assert_eq!(
        browser.wait_for(&visible("login"), &json!(true), wait),
        json!(true),
        "no sign-in asked"
    );
    browser.screenshot(&artifacts().join("sign-in.png"));
    browser.eval(&format!(
        "document.getElementById('token').value = '{ALICE_TOKEN}';
         document.getElementById('login-form').requestSubmit(); true"
    ));
    assert_eq!(
        browser.wait_for(&visible("fleet"), &json!(true), wait),
        json!(true)
    );

    let tile =
        |state: &str| format!("document.querySelector('[data-count=\"{state}\"]').textContent");
    for (state, want) in [
        ("all", "5"),
        ("missing", "1"),
        ("clash", "1"),
        ("behind", "1"),
        ("healthy", "2"),
    ] {
        assert_eq!(
            browser.wait_for(&tile(state), &json!(want), wait),
            json!(want),
            "{state}"
        );
    }
    // The lagging gateway's backlog is three hours old: one device in the "up to 6 h" bar.
    assert_eq!(
        browser.eval("document.getElementById('oldest').textContent"),
        json!("3.0 h old")
    );
    // The histogram's buckets, as PostgreSQL counted them (fleet_totals' SQL buckets).
    let ages = "fetch('/v1/fleet', {headers: {Authorization: 'Bearer ' + \
        sessionStorage.getItem('ferry-operator-token')}}) \
        .then(r => r.json()).then(f => f.backlog_age.devices.join(','))";
    assert_eq!(browser.eval(ages), json!("0,0,0,1,0,0,0"));
    browser.screenshot(&artifacts().join("overview.png"));

    let rows =
        "[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device).join(',')";
    browser.eval(
        "const s = document.getElementById('f-state'); s.value = 'missing';
         s.dispatchEvent(new Event('change')); true",
    );
    assert_eq!(
        browser.wait_for(rows, &json!("gw-hole"), wait),
        json!("gw-hole")
    );
    browser.screenshot(&artifacts().join("filter-missing.png"));
    browser.eval("location.hash = '#/'; true");
    let clash_row = "document.querySelector('tr[data-device=\"gw-clone\"]')?.classList.contains('clash') ?? false";
    assert_eq!(browser.wait_for(clash_row, &json!(true), wait), json!(true));
    let downlink_cell = |id: &str| {
        format!("document.querySelector('tr[data-device=\"{id}\"] td.downlink')?.textContent")
    };
    assert_eq!(
        browser.wait_for(&downlink_cell("gw-test"), &json!("connected"), wait),
        json!("connected")
    );
    assert_eq!(browser.eval(&downlink_cell("gw-done")), json!("-"));

    // The real gateway's page: connected, then a publish sent from it.
    browser.eval("location.hash = '#/device/gw-test'; true");
    let downlink = "document.getElementById('d-downlink').textContent";
    assert_eq!(
        browser.wait_for(downlink, &json!("downlink connected"), wait),
        json!("downlink connected")
    );
    browser.eval(
        "const a = document.getElementById('c-action'); a.value = 'publish';
         a.dispatchEvent(new Event('change'));
         document.getElementById('c-topic').value = 'sensors/from-console';
         document.getElementById('c-payload').value = 'hello from alice';
         document.getElementById('command-form').requestSubmit(); true",
    );
    let result = "document.getElementById('command-result').textContent.includes('\"ok\": true')";
    assert_eq!(
        browser.wait_for(result, &json!(true), Duration::from_secs(30)),
        json!(true)
    );
    browser.screenshot(&artifacts().join("device.png"));
    assert_eq!(browser.dialogs.len(), 1, "{:?}", browser.dialogs);
    assert!(
        browser.dialogs[0]
            .contains("Publish 16 bytes to topic \"sensors/from-console\" on gw-test"),
        "{:?}",
        browser.dialogs
    );
    assert!(
        cloud.log_text().contains("by=alice"),
        "{}",
        cloud.log_text()
    );
    // The message went to the gateway's broker, and (the agent subscribes to sensors/#) back up.
    wait_until(
        "the published message at the center",
        Duration::from_secs(30),
        || {
            cloud_records(&cloud, "gw-test")
                .iter()
                .any(|r| r["payload_text"] == "hello from alice")
        },
    );
    // The page lists it among the gateway's commands, with who sent it and its outcome.
    let command_row = "[...document.querySelectorAll('#d-commands tbody tr')].map(r => \
        [...r.children].slice(1, 4).map(c => c.textContent).join(' ')).join(',')";
    assert_eq!(
        browser.wait_for(command_row, &json!("alice publish done"), wait),
        json!("alice publish done")
    );
    // ... and it is the newest record on the gateway's page.
    let newest = "document.querySelector('#d-records tbody tr td.payload')?.textContent";
    assert_eq!(
        browser.wait_for(newest, &json!("hello from alice"), Duration::from_secs(30)),
        json!("hello from alice")
    );

    // The gateway's cloud link is cut while its devices publish 1,000 messages; when it is back,
    // the first upload tells the center what the gateway holds: its row turns "behind", and
    // "healthy" again once the backlog drained (at 50 records/s).
    wait_until("the gateway drained", Duration::from_secs(30), || {
        let st = agent.status();
        st["backlog_records"] == 0
    });
    let before = agent.status()["head_seq"].as_u64().unwrap();
    link.set_mode(ProxyMode::Reset);
    publish(broker.port, "sensors/a", numbered(100..1100));
    wait_until("1,000 messages journaled", Duration::from_secs(30), || {
        agent.status()["head_seq"] == before + 1000
    });
    browser.eval("location.hash = '#/?prefix=gw-test'; true");
    let row_states = "document.querySelector('tr[data-device=\"gw-test\"]')?.className ?? ''";
    assert_eq!(
        browser.wait_for(row_states, &json!("healthy"), wait),
        json!("healthy")
    );
    link.set_mode(ProxyMode::Pass);
    assert_eq!(
        browser.wait_for(row_states, &json!("behind"), Duration::from_secs(30)),
        json!("behind")
    );
    // Two readings of its backlog give its drain rate and when it will be empty.
    let drain = "document.querySelector('tr[data-device=\"gw-test\"] td.drain')?.textContent.includes('records/s') ?? false";
    assert_eq!(
        browser.wait_for(drain, &json!(true), Duration::from_secs(30)),
        json!(true)
    );
    // And the bytes it holds, as the gateway reported them.
    let bytes = "/^[0-9.]+ (B|KiB|MiB)$/.test(document.querySelector('tr[data-device=\"gw-test\"] td.bytes')?.textContent ?? '')";
    assert_eq!(
        browser.wait_for(bytes, &json!(true), Duration::from_secs(30)),
        json!(true)
    );
    browser.screenshot(&artifacts().join("behind.png"));
    assert_eq!(
        browser.wait_for(row_states, &json!("healthy"), Duration::from_secs(90)),
        json!("healthy")
    );
    assert_eq!(agent.status()["acked_seq"], before + 1000);
}

/// The device's records through the operator API.
fn cloud_records(cloud: &Cloud, device: &str) -> Vec<Value> {
    let mut response = http_client(Duration::from_secs(10))
        .get(format!(
            "http://127.0.0.1:{}/v1/devices/{device}/records",
            cloud.port
        ))
        .header("Authorization", format!("Bearer {ALICE_TOKEN}"))
        .call()
        .expect("records");
    response
        .body_mut()
        .read_to_string()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The console over a fleet of 100,000 gateways in PostgreSQL, filled through the HTTP API by
/// simulated gateways on two replicas (one batch each): every 10,000th lost a record (`missing`),
/// every 25,000th is behind, one identity is cloned. The overview's counts are right, the
/// "missing" filter lists exactly the ten that lost data, the clone is flagged, and paging walks
/// the table. The time to the first full render is printed (a figure, not a verdict: the bench
/// times the API behind it).
#[test]
fn the_console_shows_a_fleet_of_100000_gateways() {
    const DEVICES: u64 = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&tmp.path().join("pg"), free_port()).unwrap_or_else(|e| panic!("{e}"));
    let operators = tmp.path().join("operators");
    std::fs::write(&operators, format!("alice {ALICE_TOKEN}\n")).unwrap();
    let ops = operators.display().to_string();
    let args = ["--token", DEVICE_TOKEN, "--operators", &ops];
    let a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &args);
    let b = Cloud::start_postgres(&tmp.path().join("b"), &pg.url(), &args);

    let started = std::time::Instant::now();
    let ports = [a.port, b.port];
    let fillers: Vec<_> = (0..16u64)
        .map(|t| {
            std::thread::Builder::new()
                .name(format!("fill-{t}"))
                .spawn(move || {
                    let http = http_client(Duration::from_secs(30));
                    for n in (t..DEVICES).step_by(16) {
                        let id = format!("gw-{n:06}");
                        let port = ports[(n % 2) as usize];
                        let batches: &[(std::ops::RangeInclusive<u64>, (u64, u64))] =
                            if n % 10_000 == 5 {
                                // Told seq 4 was stored (acked 5); it never arrived.
                                &[(1..=3, (5, 5)), (5..=5, (5, 5))]
                            } else if n % 25_000 == 7 {
                                &[(1..=2, (9, 2))]
                            } else {
                                &[(1..=1, (1, 1))]
                            };
                        for (seqs, held) in batches {
                            let status = post_with(&http, port, &id, seqs.clone(), "", *held);
                            assert_eq!(status, 200, "{id}");
                        }
                    }
                })
                .expect("spawn a filler")
        })
        .collect();
    for f in fillers {
        f.join().expect("a filler");
    }
    assert_eq!(post(a.port, "gw-000042", 1..=1, "cloned-", (1, 1)), 409);
    eprintln!("{DEVICES} gateways filled in {:?}", started.elapsed());

    let mut browser = Browser::start(&tmp.path().join("chromium"));
    browser.open(&format!("http://127.0.0.1:{}/console", a.port));
    let wait = Duration::from_secs(30);
    browser.eval(&format!(
        "sessionStorage.setItem('ferry-operator-token', '{ALICE_TOKEN}'); true"
    ));
    let opened = std::time::Instant::now();
    browser.reload();
    let tile =
        |state: &str| format!("document.querySelector('[data-count=\"{state}\"]').textContent");
    let rows = "document.querySelectorAll('#devices tbody tr').length";
    assert_eq!(browser.wait_for(rows, &json!(50), wait), json!(50));
    eprintln!("the fleet page rendered in {:?}", opened.elapsed());
    for (state, want) in [
        ("all", "100,000"),
        ("missing", "10"),
        ("behind", "4"),
        ("clash", "1"),
        ("healthy", "99,985"),
    ] {
        assert_eq!(
            browser.wait_for(&tile(state), &json!(want), wait),
            json!(want),
            "{state}"
        );
    }
    browser.screenshot(&artifacts().join("fleet-100000.png"));

    browser.eval("location.hash = '#/?state=missing'; true");
    let ids =
        "[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device).join(',')";
    let want: Vec<String> = (0..10)
        .map(|i| format!("gw-{:06}", i * 10_000 + 5))
        .collect();
    assert_eq!(
        browser.wait_for(ids, &json!(want.join(",")), wait),
        json!(want.join(","))
    );
    browser.eval("location.hash = '#/?state=clash'; true");
    assert_eq!(
        browser.wait_for(ids, &json!("gw-000042"), wait),
        json!("gw-000042")
    );

    // Paging: the second page of the whole fleet starts at the 51st id.
    browser.eval("location.hash = '#/'; true");
    assert_eq!(browser.wait_for(rows, &json!(50), wait), json!(50));
    browser.eval("document.getElementById('next').click(); true");
    let first = "document.querySelector('#devices tbody tr')?.dataset.device";
    assert_eq!(
        browser.wait_for(first, &json!("gw-000050"), wait),
        json!("gw-000050")
    );
    let info = "document.getElementById('page-info').textContent";
    assert_eq!(browser.eval(info), json!("51-100 of 100,000 devices"));
}
