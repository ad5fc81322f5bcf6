//! The publisher: numbered QoS1 messages `{"n":..,"pad":".."}` to mosquitto, recording which
//! numbers the broker PUBACKed. Those, and only those, must reach the cloud.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order the messages were handed to the client,
//! so a FIFO of numbers maps each packet id to its number; the PUBACK of that packet id then marks
//! the number as accepted. The broker never restarts during a run, so the connection (and the
//! mapping) lives for the whole run; a lost connection fails the run.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::{Client, Event, Incoming, MqttOptions, Outgoing, QoS};

use crate::model::Rng;

pub const TOPIC: &str = "sensors/torture";

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    sent: AtomicU64,
    acked: Mutex<BTreeSet<u64>>,
    queued: Mutex<VecDeque<u64>>,
    error: Mutex<Option<String>>,
}

pub struct Publisher {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

/// What the publisher did.
pub struct Published {
    pub sent: u64,
    pub acked: BTreeSet<u64>,
}

impl Publisher {
    /// Publishes about `per_sec` messages a second until [`Publisher::finish`], or `limit`
    /// messages if given.
    pub fn start(
        port: u16,
        per_sec: u64,
        limit: Option<u64>,
        seed: u64,
    ) -> Result<Publisher, String> {
        let mut opts = MqttOptions::new(
            format!("torture-pub-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(100);
        let (client, mut conn) = Client::new(opts, 100);
        let shared = Arc::new(Shared::default());

        let s = Arc::clone(&shared);
        let receiver = std::thread::Builder::new()
            .name("publisher-acks".into())
            .spawn(move || {
                let mut pkids: HashMap<u16, u64> = HashMap::new();
                loop {
                    match conn.recv_timeout(Duration::from_millis(200)) {
                        Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                            let n = s
                                .queued
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .pop_front();
                            if let Some(n) = n {
                                pkids.insert(pkid, n);
                            }
                        }
                        Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                            if let Some(n) = pkids.remove(&ack.pkid) {
                                s.acked.lock().unwrap_or_else(|e| e.into_inner()).insert(n);
                            }
                        }
                        Ok(Ok(_)) => {}
                        // The disconnect at the end ends the connection too.
                        Ok(Err(_)) if s.stop.load(Ordering::Relaxed) => return,
                        Ok(Err(e)) => {
                            *s.error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("publisher connection failed: {e}"));
                            return;
                        }
                        Err(_) => {
                            // Nothing within the timeout: done once everything sent was answered.
                            if s.stop.load(Ordering::Relaxed) && pkids.is_empty() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;

        let s = Arc::clone(&shared);
        let sender = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let mut rng = Rng::new(seed);
                let pause = Duration::from_micros(1_000_000 / per_sec.max(1));
                let mut n = 0u64;
                while !s.stop.load(Ordering::Relaxed) && limit.is_none_or(|l| n < l) {
                    let pad = ".".repeat(rng.below(400) as usize);
                    let payload = format!("{{\"n\":{n},\"pad\":\"{pad}\"}}");
                    s.queued
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(n);
                    if let Err(e) = client.publish(TOPIC, QoS::AtLeastOnce, false, payload) {
                        *s.error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("publish failed: {e}"));
                        break;
                    }
                    n += 1;
                    s.sent.store(n, Ordering::Relaxed);
                    std::thread::sleep(pause);
                }
                s.stop.store(true, Ordering::Relaxed);
                // Let the last PUBACKs arrive before the receiver stops.
                std::thread::sleep(Duration::from_millis(500));
                let _ = client.disconnect();
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Publisher {
            shared,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    pub fn acked(&self) -> u64 {
        self.shared
            .acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len() as u64
    }

    pub fn error(&self) -> Option<String> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_done(&self) -> bool {
        self.sender.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops publishing, waits for outstanding PUBACKs, and returns what was acked.
    pub fn finish(mut self) -> Result<Published, String> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            h.join()
                .map_err(|_| "publisher thread panicked".to_string())?;
        }
        if let Some(e) = self.error() {
            return Err(e);
        }
        let acked =
            std::mem::take(&mut *self.shared.acked.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(Published {
            sent: self.sent(),
            acked,
        })
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}
