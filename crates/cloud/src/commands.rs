//! The reference cloud's side of downlink protocol v1: commands queued per device until the device
//! answers them, their results, and the devices' connections. In memory (a reference receiver for
//! tests and demos: queued commands do not survive a restart of `ferry-cloud`). No sockets here:
//! `ws` carries frames, the HTTP workers call [`Commands::queue`] and [`Commands::result`].
//!
//! Delivery: every connection of a device is sent each queued command it has not been sent yet, so
//! a command queued while the device is offline goes out when it connects, and one that was sent
//! on a connection that died unanswered goes out again on the next (the agent answers a repeat from
//! its store without executing it twice). A command leaves the queue when its result arrives.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};

/// Largest command frame queued (the agent's default frame limit is 256 KiB).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Commands queued per device.
pub const MAX_QUEUED: usize = 1000;
/// Raw frames (tests of malformed input, up to 32 MiB each) waiting per device.
pub const MAX_RAW_QUEUED: usize = 16;
/// Results kept per device (oldest dropped).
pub const MAX_RESULTS: usize = 10_000;

#[derive(Debug, Default)]
pub struct Commands {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    devices: HashMap<String, Device>,
}

#[derive(Debug, Default)]
struct Device {
    /// (id, frame), oldest first.
    queue: VecDeque<(String, String)>,
    /// Frames to send once, verbatim (tests of malformed input): (binary, bytes).
    raw: VecDeque<(bool, Vec<u8>)>,
    results: BTreeMap<String, Value>,
    result_order: VecDeque<String>,
    connections: u64,
    connected: u64,
    hello: Option<Value>,
    /// How often each command id was sent; kept while the id is queued or its result is kept.
    sent: HashMap<String, u64>,
}

/// What to send on one connection now.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub commands: Vec<(String, String)>,
    pub raw: Vec<(bool, Vec<u8>)>,
}

impl Commands {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Plain maps: a panic elsewhere cannot leave them half-updated in a harmful way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `body` (a JSON object with at least `action`) for `device`; returns its id (the one in
    /// `body`, or a new one).
    pub fn queue(&self, device: &str, mut body: Value) -> Result<String, String> {
        let Some(obj) = body.as_object_mut() else {
            return Err("a command is a json object".to_owned());
        };
        if !obj.get("action").is_some_and(Value::is_string) {
            return Err("a command needs a string \"action\"".to_owned());
        }
        let mut inner = self.lock();
        let id = match obj.get("id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Some(_) => return Err("\"id\" must be a string of 1 to 128 bytes".to_owned()),
            None => {
                inner.next_id += 1;
                format!("cmd-{}-{}", std::process::id(), inner.next_id)
            }
        };
        obj.insert("id".into(), Value::String(id.clone()));
        obj.insert("type".into(), Value::String("command".into()));
        let frame = body.to_string();
        if frame.len() > MAX_COMMAND_BYTES {
            return Err(format!(
                "command of {} bytes is over {MAX_COMMAND_BYTES}",
                frame.len()
            ));
        }
        let d = inner.devices.entry(device.to_owned()).or_default();
        if d.queue.len() >= MAX_QUEUED {
            return Err(format!(
                "{MAX_QUEUED} commands already queued for this device"
            ));
        }
        if !d.queue.iter().any(|(q, _)| *q == id) {
            d.queue.push_back((id.clone(), frame));
        }
        Ok(id)
    }

    /// Queues a frame to be sent once, verbatim, on the device's next connection round; refused when
    /// [`MAX_RAW_QUEUED`] frames already wait.
    pub fn queue_raw(&self, device: &str, binary: bool, bytes: Vec<u8>) -> Result<(), String> {
        let mut inner = self.lock();
        let raw = &mut inner.devices.entry(device.to_owned()).or_default().raw;
        if raw.len() >= MAX_RAW_QUEUED {
            return Err(format!(
                "{MAX_RAW_QUEUED} raw frames already queued for this device"
            ));
        }
        raw.push_back((binary, bytes));
        Ok(())
    }

    /// The result of command `id`: `{"state":"pending"}`, `{"state":"done","result":..}`, or `None`
    /// when the id is unknown.
    pub fn result(&self, device: &str, id: &str) -> Option<Value> {
        let inner = self.lock();
        let d = inner.devices.get(device)?;
        if let Some(r) = d.results.get(id) {
            return Some(json!({"state": "done", "sent": d.sent.get(id), "result": r}));
        }
        d.queue
            .iter()
            .any(|(q, _)| q == id)
            .then(|| json!({"state": "pending", "sent": d.sent.get(id).copied().unwrap_or(0)}))
    }

    /// The device's downlink state, for `GET /v1/devices/<id>/downlink`.
    pub fn device(&self, device: &str) -> Value {
        let inner = self.lock();
        match inner.devices.get(device) {
            None => json!({"connected": false, "connections": 0, "queued": 0}),
            Some(d) => json!({
                "connected": d.connected > 0,
                "connections": d.connections,
                "queued": d.queue.len(),
                "hello": d.hello,
            }),
        }
    }

    pub fn connected(&self, device: &str, hello: Value) {
        let mut inner = self.lock();
        let d = inner.devices.entry(device.to_owned()).or_default();
        d.connections += 1;
        d.connected += 1;
        d.hello = Some(hello);
    }

    pub fn disconnected(&self, device: &str) {
        if let Some(d) = self.lock().devices.get_mut(device) {
            d.connected = d.connected.saturating_sub(1);
        }
    }

    /// Frames for a connection that has already been sent the ids in `sent_here`.
    pub fn outgoing(&self, device: &str, sent_here: &mut HashSet<String>) -> Outgoing {
        let mut inner = self.lock();
        let Some(d) = inner.devices.get_mut(device) else {
            return Outgoing::default();
        };
        let mut out = Outgoing {
            raw: d.raw.drain(..).collect(),
            ..Outgoing::default()
        };
        for (id, frame) in &d.queue {
            if sent_here.insert(id.clone()) {
                *d.sent.entry(id.clone()).or_default() += 1;
                out.commands.push((id.clone(), frame.clone()));
            }
        }
        // `sent_here` now holds every queued id; anything more was answered since and is
        // forgotten, so a long-lived connection's set stays within the queue's bound.
        if sent_here.len() > d.queue.len() {
            let queued: HashSet<&str> = d.queue.iter().map(|(id, _)| id.as_str()).collect();
            sent_here.retain(|id| queued.contains(id.as_str()));
        }
        out
    }

    /// Answers, on the device's behalf, the oldest queued command among `sent` (the ids sent on a
    /// connection the device closed because a frame was too large) with `ok:false` and `error`.
    pub fn refuse_first_unanswered(&self, device: &str, sent: &HashSet<String>, error: &str) {
        let id = self.lock().devices.get(device).and_then(|d| {
            d.queue
                .iter()
                .map(|(id, _)| id)
                .find(|id| sent.contains(*id))
                .cloned()
        });
        if let Some(id) = id {
            log::warn!("downlink: device={device} refused command id={id}: {error}");
            let _ = self.on_result(
                device,
                json!({ "type": "result", "id": id, "ok": false, "error": error }),
            );
        }
    }

    /// Stores a `result` frame from `device`; the command leaves the queue.
    pub fn on_result(&self, device: &str, result: Value) -> Result<(), String> {
        let id = result
            .get("id")
            .and_then(Value::as_str)
            .ok_or("a result needs an \"id\"")?
            .to_owned();
        let mut inner = self.lock();
        let d = inner.devices.entry(device.to_owned()).or_default();
        d.queue.retain(|(q, _)| *q != id);
        if d.results.insert(id.clone(), result).is_none() {
            d.result_order.push_back(id);
            while d.result_order.len() > MAX_RESULTS {
                if let Some(old) = d.result_order.pop_front() {
                    d.results.remove(&old);
                    d.sent.remove(&old);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_sent_once_per_connection_until_answered() {
        let c = Commands::default();
        let id = c.queue("gw", json!({"action": "status"})).unwrap();
        let mut first = HashSet::new();
        assert_eq!(c.outgoing("gw", &mut first).commands.len(), 1);
        assert_eq!(c.outgoing("gw", &mut first).commands.len(), 0);
        // A new connection gets it again while unanswered.
        let mut second = HashSet::new();
        assert_eq!(c.outgoing("gw", &mut second).commands.len(), 1);
        assert_eq!(c.result("gw", &id).unwrap()["state"], "pending");
        c.on_result("gw", json!({"type": "result", "id": id, "ok": true}))
            .unwrap();
        assert_eq!(c.result("gw", &id).unwrap()["state"], "done");
        assert_eq!(c.outgoing("gw", &mut HashSet::new()).commands.len(), 0);
    }

    #[test]
    fn answered_commands_leave_the_connection_set_and_the_send_counts_go_with_their_results() {
        // Regression: a connection's set of sent ids and the per-id send counts only grew, so a
        // long-lived connection or device held every id it was ever sent.
        let c = Commands::default();
        let mut conn = HashSet::new();
        for n in 0..MAX_RESULTS + 10 {
            let id = c.queue("gw", json!({"action": "status"})).unwrap();
            assert_eq!(c.outgoing("gw", &mut conn).commands.len(), 1, "command {n}");
            c.on_result("gw", json!({"type": "result", "id": id, "ok": true}))
                .unwrap();
        }
        c.outgoing("gw", &mut conn);
        assert!(conn.is_empty(), "{} ids left", conn.len());
        let inner = c.lock();
        let d = &inner.devices["gw"];
        assert_eq!(d.results.len(), MAX_RESULTS);
        assert_eq!(d.sent.len(), MAX_RESULTS);
    }

    #[test]
    fn raw_frames_wait_up_to_a_bound() {
        // Regression: raw frames of up to 32 MiB each queued without bound for an offline device.
        let c = Commands::default();
        for _ in 0..MAX_RAW_QUEUED {
            c.queue_raw("gw", true, vec![0; 4]).unwrap();
        }
        assert!(c.queue_raw("gw", true, vec![0; 4]).is_err());
        assert_eq!(
            c.outgoing("gw", &mut HashSet::new()).raw.len(),
            MAX_RAW_QUEUED
        );
        assert!(c.queue_raw("gw", false, b"x".to_vec()).is_ok());
    }

    #[test]
    fn bad_commands_are_refused() {
        let c = Commands::default();
        assert!(c.queue("gw", json!([1])).is_err());
        assert!(c.queue("gw", json!({"x": 1})).is_err());
        let big = "x".repeat(MAX_COMMAND_BYTES);
        assert!(
            c.queue("gw", json!({"action": "publish", "payload_text": big}))
                .is_err()
        );
        assert!(c.result("gw", "nope").is_none());
    }
}
