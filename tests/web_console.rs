//! The operators' console (`/console`) in a real browser: Debian's Chromium, headless, driven
//! over the DevTools protocol (`util/browser.rs`), against the real `ferry-cloud` on a real
//! PostgreSQL behind two replicas, filled with 100,000 simulated gateways and two real `ferry`
//! agents among them (one with its downlink).
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

/// The console over a fleet of 100,000 gateways in PostgreSQL behind two replicas, filled through
/// the HTTP API by simulated gateways (one batch each, half on each replica: every 10,000th lost
/// a record, every 25,000th is behind, one identity is cloned) with two real `ferry` agents among
/// them. The operator signs in; the overview's counts are right, the "missing" filter lists
/// exactly the ten that lost data, the clone is flagged, paging walks the table. On a real
/// agent's page its downlink shows connected, and a `publish` sent from the page (confirmed in a
/// dialog that says what it will do) comes back with its result, logged with the operator's
/// name. With its cloud link cut while it takes 1,000 messages, its row turns "behind" once the
/// link is back, shows its drain rate and the bytes it holds, and turns "healthy" when the
/// backlog drained; its page's history then shows the backlog it had and the records it stored.
/// The time to the first full render is printed (a figure, not a verdict: the bench times the
/// API behind it).
#[test]
fn an_operator_runs_a_fleet_of_100000_gateways_from_the_browser() {
    const DEVICES: u64 = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&tmp.path().join("pg"), free_port()).unwrap_or_else(|e| panic!("{e}"));
    let operators = tmp.path().join("operators");
    std::fs::write(&operators, format!("alice {ALICE_TOKEN}\n")).unwrap();
    let ops = operators.display().to_string();
    let ws = format!("127.0.0.1:{}", free_port());
    let args = ["--token", DEVICE_TOKEN, "--operators", &ops];
    let with_downlink = [&args[..], &["--ws-listen", &ws]].concat();
    let a = Cloud::start_postgres(&tmp.path().join("a"), &pg.url(), &with_downlink);
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

    // Two real gateways on one broker: gw-test uploads to replica a through a proxy that can cut
    // it (at most 50 records/s, so that a backlog takes a while to drain) and keeps its downlink
    // on a; gw-real-2 uploads to replica b.
    let broker = Mosquitto::start(&tmp.path().join("mqtt"));
    let link = FaultProxy::start(a.port, ProxyMode::Pass);
    let real = |name: &str, url: &str, extra: &str, uplink: &str| {
        let dir = tmp.path().join(name);
        let control = free_port();
        let config = agent_config(&dir, broker.port, url, control, "", extra);
        let config = edited(
            config,
            &[
                ("id = \"gw-test\"", &format!("id = \"{name}\"")),
                ("batch_max_records = 100", uplink),
            ],
        );
        Agent::start(&dir, &config, control)
    };
    let agent = real(
        "gw-test",
        &link.url(),
        &downlink_section(&format!("ws://{ws}/v1/downlink")),
        &format!("batch_max_records = 100\ntoken = \"{DEVICE_TOKEN}\"\nmax_records_per_sec = 50"),
    );
    let second = real(
        "gw-real-2",
        &format!("http://127.0.0.1:{}/v1/ingest", b.port),
        "",
        &format!("batch_max_records = 100\ntoken = \"{DEVICE_TOKEN}\""),
    );
    agent.wait_connected();
    publish(broker.port, "sensors/a", numbered(0..20));
    wait_until(
        "the real gateways' records at the center",
        Duration::from_secs(30),
        || agent.status()["acked_seq"] == 20 && second.status()["acked_seq"] == 20,
    );

    let mut browser = Browser::start(&tmp.path().join("chromium"));
    browser.open(&format!("http://127.0.0.1:{}/console", a.port));
    let visible = |id: &str| format!("!document.getElementById('{id}').hidden");
    let wait = Duration::from_secs(30);
    assert_eq!(
        browser.wait_for(&visible("login"), &json!(true), wait),
        json!(true),
        "no sign-in asked"
    );
    browser.screenshot(&artifacts().join("sign-in.png"));
    let opened = std::time::Instant::now();
    browser.eval(&format!(
        "document.getElementById('token').value = '{ALICE_TOKEN}';
         document.getElementById('login-form').requestSubmit(); true"
    ));
    let rows = "document.querySelectorAll('#devices tbody tr').length";
    assert_eq!(browser.wait_for(rows, &json!(50), wait), json!(50));
    eprintln!("the fleet page rendered in {:?}", opened.elapsed());
    let tile =
        |state: &str| format!("document.querySelector('[data-count=\"{state}\"]').textContent");
    for (state, want) in [
        ("all", "100,002"),
        ("missing", "10"),
        ("behind", "4"),
        ("clash", "1"),
        ("healthy", "99,987"),
    ] {
        assert_eq!(
            browser.wait_for(&tile(state), &json!(want), wait),
            json!(want),
            "{state}"
        );
    }
    // The behind gateways' backlogs were three hours old when sent (the fill takes minutes):
    // four devices in the "up to 6 h" bar.
    let oldest = browser.eval("document.getElementById('oldest').textContent");
    assert!(
        oldest
            .as_str()
            .is_some_and(|t| t.starts_with("3.") && t.ends_with(" h old")),
        "{oldest}"
    );
    // The histogram's buckets, as PostgreSQL counted them (fleet_totals' SQL buckets).
    let ages = "fetch('/v1/fleet', {headers: {Authorization: 'Bearer ' + \
        sessionStorage.getItem('ferry-operator-token')}}) \
        .then(r => r.json()).then(f => f.backlog_age.devices.join(','))";
    assert_eq!(browser.eval(ages), json!("0,0,0,4,0,0,0"));
    browser.screenshot(&artifacts().join("fleet-100000.png"));

    let ids =
        "[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device).join(',')";
    browser.eval(
        "const s = document.getElementById('f-state'); s.value = 'missing';
         s.dispatchEvent(new Event('change')); true",
    );
    let want: Vec<String> = (0..10)
        .map(|i| format!("gw-{:06}", i * 10_000 + 5))
        .collect();
    assert_eq!(
        browser.wait_for(ids, &json!(want.join(",")), wait),
        json!(want.join(","))
    );
    browser.screenshot(&artifacts().join("filter-missing.png"));
    browser.eval("location.hash = '#/?state=clash'; true");
    assert_eq!(
        browser.wait_for(ids, &json!("gw-000042"), wait),
        json!("gw-000042")
    );
    let clash_row = "document.querySelector('tr[data-device=\"gw-000042\"]')?.classList.contains('clash') ?? false";
    assert_eq!(browser.wait_for(clash_row, &json!(true), wait), json!(true));

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
    assert_eq!(browser.eval(info), json!("51-100 of 100,002 devices"));

    // The real gateways among them: the one with a downlink shows it connected.
    browser.eval("location.hash = '#/?prefix=gw-real'; true");
    assert_eq!(
        browser.wait_for(ids, &json!("gw-real-2"), wait),
        json!("gw-real-2")
    );
    browser.eval("location.hash = '#/?prefix=gw-test'; true");
    let downlink_cell = |id: &str| {
        format!("document.querySelector('tr[data-device=\"{id}\"] td.downlink')?.textContent")
    };
    assert_eq!(
        browser.wait_for(&downlink_cell("gw-test"), &json!("connected"), wait),
        json!("connected")
    );

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
    assert_eq!(browser.wait_for(result, &json!(true), wait), json!(true));
    browser.screenshot(&artifacts().join("device.png"));
    assert_eq!(browser.dialogs.len(), 1, "{:?}", browser.dialogs);
    assert!(
        browser.dialogs[0]
            .contains("Publish 16 bytes to topic \"sensors/from-console\" on gw-test"),
        "{:?}",
        browser.dialogs
    );
    assert!(a.log_text().contains("by=alice"), "{}", a.log_text());
    // The message went to the gateway's broker, and (the agents subscribe to sensors/#) back up.
    wait_until(
        "the published message at the center",
        Duration::from_secs(30),
        || {
            cloud_records(&a, "gw-test")
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
        browser.wait_for(newest, &json!("hello from alice"), wait),
        json!("hello from alice")
    );

    // The gateway's cloud link is cut while its devices publish 1,000 messages; when it is back,
    // the first upload tells the center what the gateway holds: its row turns "behind", and
    // "healthy" again once the backlog drained (at 50 records/s).
    wait_until("the gateway drained", Duration::from_secs(30), || {
        agent.status()["backlog_records"] == 0
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
        browser.wait_for(row_states, &json!("behind"), wait),
        json!("behind")
    );
    // Two readings of its backlog give its drain rate and when it will be empty.
    let drain = "document.querySelector('tr[data-device=\"gw-test\"] td.drain')?.textContent.includes('records/s') ?? false";
    assert_eq!(browser.wait_for(drain, &json!(true), wait), json!(true));
    // And the bytes it holds, as the gateway reported them.
    let bytes = "/^[0-9.]+ (B|KiB|MiB)$/.test(document.querySelector('tr[data-device=\"gw-test\"] td.bytes')?.textContent ?? '')";
    assert_eq!(browser.wait_for(bytes, &json!(true), wait), json!(true));
    browser.screenshot(&artifacts().join("behind.png"));
    assert_eq!(
        browser.wait_for(row_states, &json!("healthy"), Duration::from_secs(90)),
        json!("healthy")
    );
    assert_eq!(agent.status()["acked_seq"], before + 1000);

    // Its page's history: the backlog it had (the most waiting in a minute: the first upload
    // after the cut reported about 1,000) and every record it stored.
    browser.eval("location.hash = '#/device/gw-test'; true");
    let peak = "Math.max(0, ...[...document.querySelectorAll('#d-backlog rect')].map(r => +r.dataset.waiting)) > 500";
    assert_eq!(browser.wait_for(peak, &json!(true), wait), json!(true));
    let stored = "[...document.querySelectorAll('#d-throughput rect')].reduce((n, r) => n + +r.dataset.accepted, 0)";
    let want = json!(before + 1000);
    assert_eq!(browser.wait_for(stored, &want, wait), want);
    let shares =
        "document.querySelectorAll('#d-ledger-time rect[data-kind=\"delivered\"]').length > 0";
    assert_eq!(browser.eval(shares), json!(true));
    browser.screenshot(&artifacts().join("device-history.png"));
}
