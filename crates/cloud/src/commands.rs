//! The reference cloud's side of downlink protocol v1: commands queued per device until the device
//! answers them, their results, and the devices' connections. No sockets here: `ws` carries
//! frames, the HTTP workers call [`Commands::queue`] and [`Commands::result`].
//!
//! Where they live: with the files store, in memory (queued commands do not survive a restart of
//! `ferry-cloud`); with PostgreSQL ([`Commands::with_database`]), in the database, so that a
//! command posted to any replica reaches the device on whichever replica holds its connection.
//! Then the in-memory queue of a device is a copy, read again from the database when a replica
//! says a command was queued (LISTEN/NOTIFY, see `store::postgres::commands`) and at least every
//! [`REFRESH_EVERY`]; results and connection counts are written through.
//!
//! Delivery: every connection of a device is sent each queued command it has not been sent yet, so
//! a command queued while the device is offline goes out when it connects, and one that was sent
//! on a connection that died unanswered goes out again on the next (the agent answers a repeat from
//! its store without executing it twice). A command leaves the queue when its result arrives.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::store::FailureLog;
use crate::store::postgres::commands::PgCommands;

/// Largest command frame queued (the agent's default frame limit is 256 KiB).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Commands queued per device.
pub const MAX_QUEUED: usize = 1000;
/// Raw frames (tests of malformed input, up to 32 MiB each) waiting per device.
pub const MAX_RAW_QUEUED: usize = 16;
/// Results kept per device (oldest dropped).
pub const MAX_RESULTS: usize = 10_000;
/// Commands listed per device by [`Commands::recent`], at most.
pub const MAX_RECENT: usize = 100;
/// With the database, how often a connection reads its device's commands again even without
/// a notification (one lost while the listener reconnected).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Commands {
    inner: Mutex<Inner>,
    db: Option<PgCommands>,
    /// Drawn at start: the ids this instance makes up are `cmd-<instance>-<n>`, distinct from
    /// those of other replicas on the same database (a process id is not: containers reuse them).
    instance: u64,
    db_errors: FailureLog,
}

/// How soon a connection tries again to read its device's commands after a failed read.
const READ_RETRY: Duration = Duration::from_secs(1);

impl Default for Commands {
    fn default() -> Commands {
        Commands::new(None, Commands::draw_instance())
    }
}

/// Why a command request was not done: the request's fault, or the database's.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Bad(String),
    Unavailable(String),
}

impl From<crate::store::Error> for Refused {
    fn from(e: crate::store::Error) -> Refused {
        Refused::Unavailable(ferry_util::error_chain(&e))
    }
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
    /// With the database: when `queue` is to be read from it again (`None`: at the next
    /// chance, a command was queued somewhere).
    read_next: Option<Instant>,
    /// With the database: notifications of commands queued for this device, so far (a read
    /// that one overtook is not taken as up to date).
    notified: u64,
    /// Without the database: the last [`MAX_RECENT`] commands queued, oldest first.
    log: VecDeque<Sent>,
}

/// A command as [`Commands::recent`] lists it.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    action: String,
    by: String,
    queued_ms: u64,
}

/// What to send on one connection now.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub commands: Vec<(String, String)>,
    pub raw: Vec<(bool, Vec<u8>)>,
}

impl Commands {
    /// Commands kept in PostgreSQL, shared with other replicas.
    /// `instance`: the number drawn at start that [`PgCommands::new`] was given too.
    pub fn with_database(db: PgCommands, instance: u64) -> Commands {
        Commands::new(Some(db), instance)
    }

    /// This process's instance number (see `instance`), which names it among replicas.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// A draw of an instance number (see `instance`).
    pub fn draw_instance() -> u64 {
        ferry_util::rng::Rng::from_time().next_u64()
    }

    fn new(db: Option<PgCommands>, instance: u64) -> Commands {
        Commands {
            inner: Mutex::default(),
            db,
            instance,
            db_errors: FailureLog::default(),
        }
    }

    /// A command was queued for `device` (`None`: maybe for any device) on some replica: read
    /// the queue from the database again before sending.
    pub fn queued_elsewhere(&self, device: Option<&str>) {
        log::debug!(
            "commands queued on a replica device={}",
            device.unwrap_or("(any)")
        );
        let mut inner = self.lock();
        match device {
            Some(d) => {
                if let Some(d) = inner.devices.get_mut(d) {
                    d.read_next = None;
                    d.notified += 1;
                }
            }
            None => inner.devices.values_mut().for_each(|d| {
                d.read_next = None;
                d.notified += 1;
            }),
        }
    }

    /// With the database, starts the thread that hears of commands queued on any replica
    /// (`cloud-pg-listen`); `None` without one.
    pub fn listen(
        self: &Arc<Self>,
        shutdown: Arc<AtomicBool>,
    ) -> Option<std::io::Result<JoinHandle<()>>> {
        let db = self.db.as_ref()?;
        let commands = Arc::downgrade(self);
        Some(db.listen(shutdown, move |device| {
            if let Some(commands) = commands.upgrade() {
                commands.queued_elsewhere(device);
            }
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Plain maps: a panic elsewhere cannot leave them half-updated in a harmful way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `body` (a JSON object with at least `action`) for `device`, sent by operator `by`;
    /// returns its id (the one in `body`, or a new one).
    pub fn queue(&self, device: &str, mut body: Value, by: &str) -> Result<String, Refused> {
        let bad = |m: &str| Err(Refused::Bad(m.to_owned()));
        let Some(obj) = body.as_object_mut() else {
            return bad("a command is a json object");
        };
        if !obj.get("action").is_some_and(Value::is_string) {
            return bad("a command needs a string \"action\"");
        }
        let mut inner = self.lock();
        let id = match obj.get("id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Some(_) => return bad("\"id\" must be a string of 1 to 128 bytes"),
            None => {
                inner.next_id += 1;
                format!("cmd-{:016x}-{}", self.instance, inner.next_id)
            }
        };
        obj.insert("id".into(), Value::String(id.clone()));
        obj.insert("type".into(), Value::String("command".into()));
        let frame = body.to_string();
        if frame.len() > MAX_COMMAND_BYTES {
            return Err(Refused::Bad(format!(
                "command of {} bytes is over {MAX_COMMAND_BYTES}",
                frame.len()
            )));
        }
        if let Some(db) = &self.db {
            drop(inner);
            db.queue(device, &id, &frame, by, MAX_QUEUED)?
                .map_err(Refused::Bad)?;
            return Ok(id);
        }
        let d = inner.devices.entry(device.to_owned()).or_default();
        if d.queue.len() >= MAX_QUEUED {
            return Err(Refused::Bad(format!(
                "{MAX_QUEUED} commands already queued for this device"
            )));
        }
        if !d.queue.iter().any(|(q, _)| *q == id) {
            d.queue.push_back((id.clone(), frame));
            if d.log.len() >= MAX_RECENT {
                d.log.pop_front();
            }
            d.log.push_back(Sent {
                id: id.clone(),
                action: body["action"].as_str().unwrap_or_default().to_owned(),
                by: by.to_owned(),
                queued_ms: ferry_util::epoch_ms(std::time::SystemTime::now()),
            });
        }
        Ok(id)
    }

    /// The device's last `n` commands (at most [`MAX_RECENT`]), newest first: id, action, who
    /// sent it, when it was queued, its state (`pending`, `done` with its result, or `gone`: its
    /// result was dropped), how often it was sent.
    pub fn recent(&self, device: &str, n: usize) -> Result<Vec<Value>, Refused> {
        let n = n.min(MAX_RECENT);
        if let Some(db) = &self.db {
            return Ok(db.recent(device, n)?);
        }
        let inner = self.lock();
        let Some(d) = inner.devices.get(device) else {
            return Ok(Vec::new());
        };
        Ok(d.log
            .iter()
            .rev()
            .take(n)
            .map(|c| {
                let sent = d.sent.get(&c.id).copied().unwrap_or(0);
                let mut v = json!({"id": c.id, "action": c.action, "by": c.by,
                    "queued_ms": c.queued_ms, "sent": sent});
                match d.results.get(&c.id) {
                    Some(r) => {
                        v["state"] = json!("done");
                        v["result"] = r.clone();
                    }
                    None if d.queue.iter().any(|(q, _)| *q == c.id) => {
                        v["state"] = json!("pending")
                    }
                    None => v["state"] = json!("gone"),
                }
                v
            })
            .collect())
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
    pub fn result(&self, device: &str, id: &str) -> Result<Option<Value>, Refused> {
        if let Some(db) = &self.db {
            return Ok(db.result(device, id)?);
        }
        let inner = self.lock();
        let Some(d) = inner.devices.get(device) else {
            return Ok(None);
        };
        if let Some(r) = d.results.get(id) {
            return Ok(Some(
                json!({"state": "done", "sent": d.sent.get(id), "result": r}),
            ));
        }
        Ok(d.queue
            .iter()
            .any(|(q, _)| q == id)
            .then(|| json!({"state": "pending", "sent": d.sent.get(id).copied().unwrap_or(0)})))
    }

    /// The device's downlink state, for `GET /v1/devices/<id>/downlink`.
    pub fn device(&self, device: &str) -> Result<Value, Refused> {
        if let Some(db) = &self.db {
            return Ok(db.downlink(device)?);
        }
        let inner = self.lock();
        Ok(match inner.devices.get(device) {
            None => json!({"connected": false, "connections": 0, "queued": 0}),
            Some(d) => json!({
                "connected": d.connected > 0,
                "connections": d.connections,
                "queued": d.queue.len(),
                "hello": d.hello,
            }),
        })
    }

    /// Which of `devices` have a downlink connection open (on any replica).
    pub fn connected_of(
        &self,
        devices: &[String],
    ) -> Result<std::collections::HashSet<String>, Refused> {
        if let Some(db) = &self.db {
            return Ok(db.connected_of(devices)?);
        }
        let inner = self.lock();
        Ok(devices
            .iter()
            .filter(|d| inner.devices.get(*d).is_some_and(|d| d.connected > 0))
            .cloned()
            .collect())
    }

    pub fn connected(&self, device: &str, hello: Value) {
        if let Some(db) = &self.db {
            if let Err(e) = db.connection(device, Some(&hello)) {
                self.db_errors.say(
                    &format!("downlink: connection of device={device} not counted"),
                    &e,
                );
            }
            // The database counts connections; the copy here would be read by nothing.
            return;
        }
        let mut inner = self.lock();
        let d = inner.devices.entry(device.to_owned()).or_default();
        d.connections += 1;
        d.connected += 1;
        d.hello = Some(hello);
    }

    pub fn disconnected(&self, device: &str) {
        if let Some(db) = &self.db {
            if let Err(e) = db.connection(device, None) {
                let what = format!("downlink: end of a connection of device={device} not counted");
                self.db_errors.say(&what, &e);
            }
            return;
        }
        if let Some(d) = self.lock().devices.get_mut(device) {
            d.connected = d.connected.saturating_sub(1);
        }
    }

    /// Frames for a connection that has already been sent the ids in `sent_here`.
    pub fn outgoing(&self, device: &str, sent_here: &mut HashSet<String>) -> Outgoing {
        self.read_from_database(device);
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
                if self.db.is_none() {
                    // With the database, `sent` is counted there (below).
                    *d.sent.entry(id.clone()).or_default() += 1;
                }
                out.commands.push((id.clone(), frame.clone()));
            }
        }
        // `sent_here` now holds every queued id; anything more was answered since and is
        // forgotten, so a long-lived connection's set stays within the queue's bound.
        if sent_here.len() > d.queue.len() {
            let queued: HashSet<&str> = d.queue.iter().map(|(id, _)| id.as_str()).collect();
            sent_here.retain(|id| queued.contains(id.as_str()));
        }
        drop(inner);
        if let (Some(db), false) = (&self.db, out.commands.is_empty()) {
            let ids: Vec<String> = out.commands.iter().map(|(id, _)| id.clone()).collect();
            if let Err(e) = db.sent(device, &ids) {
                self.db_errors.say(
                    &format!("downlink: sends to device={device} not counted"),
                    &e,
                );
            }
        }
        out
    }

    /// With the database, the device's queue read again when a command was queued or it is
    /// [`REFRESH_EVERY`] old. A failed read keeps the copy and is tried again after
    /// [`READ_RETRY`], not at every poll of every connection.
    fn read_from_database(&self, device: &str) {
        let Some(db) = &self.db else { return };
        let notified = {
            let inner = self.lock();
            let d = inner.devices.get(device);
            if d.and_then(|d| d.read_next)
                .is_some_and(|at| Instant::now() < at)
            {
                return;
            }
            d.map_or(0, |d| d.notified)
        };
        let read = db.pending(device);
        let mut inner = self.lock();
        let d = inner.devices.entry(device.to_owned()).or_default();
        match read {
            Ok(pending) => {
                d.queue = pending.into();
                // A notification that came during the read may not be in it: read again.
                d.read_next = (d.notified == notified).then(|| Instant::now() + REFRESH_EVERY);
            }
            Err(e) => {
                d.read_next = Some(Instant::now() + READ_RETRY);
                drop(inner);
                self.db_errors.say(
                    &format!("downlink: commands of device={device} not read"),
                    &e,
                );
            }
        }
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
        if let Some(db) = &self.db {
            db.record_result(device, &id, &result)
                .map_err(|e| ferry_util::error_chain(&e))?;
            // The result is read from the database; only the copy of the queue changes here.
            if let Some(d) = self.lock().devices.get_mut(device) {
                d.queue.retain(|(q, _)| *q != id);
            }
            return Ok(());
        }
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
        let id = c.queue("gw", json!({"action": "status"}), "test").unwrap();
        let mut first = HashSet::new();
        assert_eq!(c.outgoing("gw", &mut first).commands.len(), 1);
        assert_eq!(c.outgoing("gw", &mut first).commands.len(), 0);
        // A new connection gets it again while unanswered.
        let mut second = HashSet::new();
        assert_eq!(c.outgoing("gw", &mut second).commands.len(), 1);
        assert_eq!(c.result("gw", &id).unwrap().unwrap()["state"], "pending");
        c.on_result("gw", json!({"type": "result", "id": id, "ok": true}))
            .unwrap();
        assert_eq!(c.result("gw", &id).unwrap().unwrap()["state"], "done");
        assert_eq!(c.outgoing("gw", &mut HashSet::new()).commands.len(), 0);
    }

    #[test]
    fn answered_commands_leave_the_connection_set_and_the_send_counts_go_with_their_results() {
        // Regression: a connection's set of sent ids and the per-id send counts only grew, so a
        // long-lived connection or device held every id it was ever sent.
        let c = Commands::default();
        let mut conn = HashSet::new();
        for n in 0..MAX_RESULTS + 10 {
            let id = c.queue("gw", json!({"action": "status"}), "test").unwrap();
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
    fn ids_made_up_by_two_instances_differ() {
        // Regression: ids were `cmd-<process id>-<n>`, and replicas in containers share process
        // ids: a second replica's first command took the first's id, and on the shared database
        // it was dropped as already queued while its poster was told it was queued.
        let (a, b) = (Commands::default(), Commands::default());
        let command = || json!({"action": "status"});
        assert_ne!(
            a.queue("gw", command(), "test").unwrap(),
            b.queue("gw", command(), "test").unwrap()
        );
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
        assert!(c.queue("gw", json!([1]), "test").is_err());
        assert!(c.queue("gw", json!({"x": 1}), "test").is_err());
        let big = "x".repeat(MAX_COMMAND_BYTES);
        assert!(
            c.queue(
                "gw",
                json!({"action": "publish", "payload_text": big}),
                "test"
            )
            .is_err()
        );
        assert!(c.result("gw", "nope").unwrap().is_none());
    }
}
