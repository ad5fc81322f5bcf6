//! The peer run (`--peer mosquitto-bridge`): the same kind of power cut, taken by what many
//! operators use instead of an agent, a mosquitto bridge, so that `make torture` says what the
//! peer loses where ferry loses nothing.
//!
//! The edge broker keeps its persistence on the crash-test filesystem (`persistence true`,
//! autosave at its default, QoS1, a bridge with `cleansession false` to a cloud broker on the real
//! disk, where a subscriber with a persistent session counts what arrives). Each cycle is an
//! outage, the case a gateway exists for:
//! 1. the cloud broker stops (the uplink is down);
//! 2. numbered QoS1 messages are published to the edge broker, which PUBACKs them;
//! 3. after a random pause, the power is cut (unsynced data dropped) and the edge broker killed;
//! 4. the edge broker and the cloud broker start again; a marker message published to the edge
//!    after the restart reaches the subscriber once the bridge is through (a positive signal:
//!    everything the edge still held was queued before it);
//! 5. every number the edge PUBACKed and the subscriber never saw is counted lost.
//!
//! A control cycle comes first: the same outage with the edge broker stopped cleanly instead of a
//! cut. It must deliver everything, or the run fails (the harness, not the peer, is wrong then).
//! The run reports; it does not fail `make torture` for the peer's losses in the cut cycles.
//! ferry's own runs are the ones held to zero.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

use super::procs::{CrashFsProc, Mosquitto, free_port, wait_until};
use super::publisher::{Publisher, TOPIC};
use crate::model::Rng;

/// The marker's numbers count down from here, one per cycle; the publisher's count up from 0
/// in every cycle.
const MARKER_BASE: u64 = u64::MAX / 2;

/// What the peer run counted.
#[derive(Debug, Default)]
pub struct PeerTally {
    pub cuts: u64,
    pub acked: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Cycles in which at least one acknowledged message was lost.
    pub cycles_losing: u64,
}

/// A subscriber on the cloud broker with a persistent session, collecting the `n` of every
/// message; it reconnects by itself while the broker is down.
struct Subscriber {
    seen: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    fn start(port: u16) -> Result<Subscriber, String> {
        let mut opts = MqttOptions::new("torture-cloud-sub", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        let (client, mut conn) = Client::new(opts, 100);
        client
            .subscribe("sensors/#", QoS::AtLeastOnce)
            .map_err(|e| format!("subscribe: {e}"))?;
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("cloud-subscriber".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match conn.recv_timeout(Duration::from_millis(200)) {
                        Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                            if let Some(n) = number(&p.payload) {
                                s.lock().unwrap_or_else(|e| e.into_inner()).insert(n);
                            }
                        }
                        // The broker is down: rumqttc reconnects at the next poll.
                        Ok(Err(_)) => std::thread::sleep(Duration::from_millis(200)),
                        _ => {}
                    }
                }
                let _ = client.disconnect();
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Subscriber {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn has(&self, n: u64) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&n)
    }

    /// What arrived since the last call, which forgets it: the publisher numbers every cycle
    /// from 0, and a cycle's messages are all in before its marker.
    fn take(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `n` of a `{"n":..}` payload.
fn number(payload: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v["n"].as_u64()
}

/// The edge broker: persistence on the crash-test filesystem, bridged to the cloud broker.
fn edge(dir: &Path, port: u16, cloud_port: u16) -> Result<Mosquitto, String> {
    Mosquitto::start(
        dir,
        port,
        &format!(
            "max_inflight_messages 100\nconnection cloud\naddress 127.0.0.1:{cloud_port}\n\
             topic sensors/# out 1\ncleansession false\nremote_clientid torture-bridge\n\
             restart_timeout 1\nbridge_protocol_version mqttv311\n"
        ),
    )
}

/// Publishes one marker (QoS1) to the edge broker.
fn publish_marker(port: u16, n: u64) -> Result<(), String> {
    let mut opts = MqttOptions::new(format!("torture-marker-{n}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = Client::new(opts, 10);
    client
        .publish(TOPIC, QoS::AtLeastOnce, false, format!("{{\"n\":{n}}}"))
        .map_err(|e| format!("marker: {e}"))?;
    for _ in 0..100 {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => {
                let _ = client.disconnect();
                return Ok(());
            }
            Ok(Err(e)) => return Err(format!("marker connection: {e}")),
            _ => {}
        }
    }
    Err("the edge broker did not PUBACK the marker within 10 s".into())
}

pub fn run(cycles: u64, seed: u64, rate: u64, work: &Path) -> Result<PeerTally, String> {
    let mut rng = Rng::new(seed);
    let mut tally = PeerTally::default();
    let mut fs = CrashFsProc::start(work)?;
    let mut cloud = Mosquitto::start(&work.join("cloud-mqtt"), free_port()?, "")?;
    let sub = Subscriber::start(cloud.port)?;
    let edge_dir = fs.mountpoint.join("edge");
    let edge_port = free_port()?;
    let mut broker = Some(edge(&edge_dir, edge_port, cloud.port)?);
    // Cycle 0 is the control: the same outage, but the edge broker is stopped cleanly (it saves
    // its persistence) instead of losing power. It must lose nothing, or the harness is wrong.
    for i in 0..=cycles {
        let control = i == 0;
        // The uplink goes down.
        cloud.stop()?;
        let count = 100 + rng.below(400);
        let publisher = Publisher::start(edge_port, rate, Some(count), rng.next_u64())?;
        wait_until("the publisher to finish", Duration::from_secs(60), || {
            publisher.is_done()
        })?;
        let acked = publisher.finish()?.acked;
        std::thread::sleep(Duration::from_millis(rng.below(2000)));
        if control {
            if let Some(mut b) = broker.take() {
                b.stop()?;
            }
        } else {
            fs.send("cut")?;
            drop(broker.take());
            fs.send("remount")?;
            tally.cuts += 1;
        }
        broker = Some(edge(&edge_dir, edge_port, cloud.port)?);
        cloud.restart()?;
        let marker = MARKER_BASE - i;
        publish_marker(edge_port, marker)?;
        wait_until(
            "the marker at the cloud broker",
            Duration::from_secs(60),
            || sub.has(marker),
        )?;
        let seen = sub.take();
        let lost = acked.iter().filter(|n| !seen.contains(n)).count() as u64;
        if control {
            if lost > 0 {
                return Err(format!(
                    "the bridge lost {lost} of {} messages without a power cut: the peer run is broken",
                    acked.len()
                ));
            }
            println!(
                "torture: peer mosquitto-bridge control cycle (a clean restart, no cut): {} acknowledged, all delivered",
                acked.len()
            );
            continue;
        }
        tally.acked += acked.len() as u64;
        tally.lost += lost;
        tally.delivered += acked.len() as u64 - lost;
        if lost > 0 {
            tally.cycles_losing += 1;
        }
        println!(
            "torture: peer mosquitto-bridge cycle {i}: {} acknowledged by the edge broker, {} lost",
            acked.len(),
            lost
        );
    }
    drop(sub);
    drop(broker);
    fs.quit()?;
    Ok(tally)
}
