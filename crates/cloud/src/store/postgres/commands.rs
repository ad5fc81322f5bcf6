//! The downlink's commands in PostgreSQL, so that replicas share them: a command posted to any
//! replica is a row of `ferry_commands`; the replica that holds the device's WebSocket sends it;
//! its result, written by that replica, is read by any. `ferry_downlink` counts each device's
//! connections over all replicas.
//!
//! Delivery between replicas: queueing a command sends `NOTIFY ferry_commands, '<device id>'`
//! in the same transaction; every replica's `cloud-pg-listen` thread LISTENs and marks the
//! device to be read again ([`crate::commands::Commands`]), so a command goes out within the
//! connection's poll of being committed. A notification lost while a listener reconnects is
//! covered by marking every device, and connections read their device's commands again at
//! least every [`crate::commands::REFRESH_EVERY`] regardless.
//!
//! Connections: `ferry_sockets` counts each device's open connections per replica instance
//! (drawn at start), and each replica with a downlink beats in `ferry_replicas` every
//! [`HEARTBEAT`], stamped with the database's clock. A device is connected while some replica
//! that beat within [`STALE_AFTER`] counts a connection of it: a replica killed with connections
//! open stops counting once its heartbeat is that old; its rows are deleted after
//! [`FORGET_AFTER`] (not sooner: a replica that only paused, or a database away for a while,
//! must find its open connections still counted when it beats again).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use ferry_util::Repeats;
use log::{debug, info, warn};
use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;
use serde_json::{Value, json};

use super::{Pool, db, to_i64, to_u64};
use crate::store::Error;

/// Results kept per device (oldest dropped), as in memory.
const MAX_RESULTS: i64 = crate::commands::MAX_RESULTS as i64;
/// How long the listener waits for a notification before it looks at the shutdown flag.
const LISTEN_POLL: Duration = Duration::from_millis(200);
/// Wait before connecting again after the listening connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const CHANNEL: &str = "ferry_commands";
/// How often a replica with a downlink says it is alive (`ferry_replicas.seen_ms`).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica not heard of for this long is gone: its connections no longer count.
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// A replica not heard of for this long has its rows deleted. Much longer than
/// [`STALE_AFTER`]: a replica that only paused (a database outage, a stopped process) beats
/// again with its connections still open, and their rows must still be there.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The database's clock in ms since the epoch: heartbeats are written and judged by one clock,
/// whatever the replicas' clocks say.
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::int8";

/// [`STALE_AFTER`] in ms, as a query parameter.
fn stale_ms() -> i64 {
    to_i64(STALE_AFTER.as_millis() as u64)
}

/// The commands' side of the database.
pub struct PgCommands {
    pool: Arc<Pool>,
    /// This replica, as `ferry_sockets` and `ferry_replicas` name it: drawn at start, so that a
    /// replica started again is not taken for the one that died.
    instance: String,
    /// Set once the listener has beaten: from then on opening a connection does not beat too
    /// (a reconnect storm would queue every open on this replica's row).
    beating: Arc<AtomicBool>,
}

impl std::fmt::Debug for PgCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommands").finish()
    }
}

/// A pending command: `(id, frame)`.
pub type Pending = (String, String);

impl PgCommands {
    /// `instance`: this replica's number, drawn at start.
    pub fn new(pool: Arc<Pool>, instance: u64) -> PgCommands {
        PgCommands {
            pool,
            instance: super::instance_name(instance),
            beating: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues `frame` as command `id` of `device` (a command already queued with that id stays
    /// as it is), unless `max_queued` are pending; tells every replica.
    pub fn queue(
        &self,
        device: &str,
        id: &str,
        frame: &str,
        by: &str,
        max_queued: usize,
    ) -> Result<Result<(), String>, Error> {
        self.with(|client| {
            let mut tx = client.transaction().map_err(db("cannot begin"))?;
            // One queue per device at a time, so that the bound holds across replicas.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('ferry_commands/' || $1))",
                &[&device],
            )
            .map_err(db("cannot lock the device's commands"))?;
            let pending = pending_count(&mut tx, device)?;
            if pending >= to_i64(max_queued as u64) {
                return Ok(Err(format!(
                    "{max_queued} commands already queued for this device"
                )));
            }
            tx.execute(
                "INSERT INTO ferry_commands (device_id, id, frame, queued_ms, sent_by)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&device, &id, &frame, &now_ms(), &by],
            )
            .map_err(db("cannot queue the command"))?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &device])
                .map_err(db("cannot notify the replicas"))?;
            tx.commit().map_err(db("cannot commit the command"))?;
            Ok(Ok(()))
        })
    }

    /// See [`crate::commands::Commands::recent`].
    pub fn recent(&self, device: &str, n: usize) -> Result<Vec<Value>, Error> {
        let limit = to_i64(n as u64);
        self.with(|client| {
            let rows = client
                .query(
                    "SELECT id, frame, queued_ms, sent, result, sent_by FROM ferry_commands
                     WHERE device_id = $1 ORDER BY n DESC LIMIT $2",
                    &[&device, &limit],
                )
                .map_err(db("cannot read the commands"))?;
            Ok(rows
                .iter()
                .map(|row| {
                    let frame: Value =
                        serde_json::from_str(row.get::<_, &str>(1)).unwrap_or(Value::Null);
                    let mut v = json!({
                        "id": row.get::<_, &str>(0),
                        "action": frame["action"],
                        "by": row.get::<_, Option<&str>>(5),
                        "queued_ms": to_u64(row.get(2)),
                        "sent": to_u64(row.get(3)),
                    });
                    match row.get::<_, Option<&str>>(4) {
                        Some(text) => {
                            v["state"] = json!("done");
                            v["result"] = serde_json::from_str(text).unwrap_or(Value::Null);
                        }
                        None => v["state"] = json!("pending"),
                    }
                    v
                })
                .collect())
        })
    }

    /// The device's commands without a result, oldest first.
    pub fn pending(&self, device: &str) -> Result<Vec<Pending>, Error> {
        self.with(|client| {
            let rows = client
                .query(
                    "SELECT id, frame FROM ferry_commands
                     WHERE device_id = $1 AND result IS NULL ORDER BY n",
                    &[&device],
                )
                .map_err(db("cannot read the commands"))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Counts one more send of each of `ids`.
    pub fn sent(&self, device: &str, ids: &[String]) -> Result<(), Error> {
        self.with(|client| {
            client
                .execute(
                    "UPDATE ferry_commands SET sent = sent + 1 WHERE device_id = $1 AND id = ANY($2)",
                    &[&device, &ids],
                )
                .map_err(db("cannot count the send"))?;
            Ok(())
        })
    }

    /// Keeps the first result of command `id`; drops the oldest results past the bound.
    pub fn record_result(&self, device: &str, id: &str, result: &Value) -> Result<(), Error> {
        self.with(|client| {
            let mut tx = client.transaction().map_err(db("cannot begin"))?;
            tx.execute(
                "UPDATE ferry_commands SET result = $3, done_ms = $4
                 WHERE device_id = $1 AND id = $2 AND result IS NULL",
                &[&device, &id, &result.to_string(), &now_ms()],
            )
            .map_err(db("cannot store the result"))?;
            tx.execute(
                "DELETE FROM ferry_commands WHERE device_id = $1 AND result IS NOT NULL AND n <
                     (SELECT n FROM ferry_commands WHERE device_id = $1 AND result IS NOT NULL
                      ORDER BY n DESC OFFSET $2 LIMIT 1)",
                &[&device, &(MAX_RESULTS - 1)],
            )
            .map_err(db("cannot drop old results"))?;
            tx.commit().map_err(db("cannot commit the result"))
        })
    }

    /// `{"state":"pending","sent":..}`, `{"state":"done","sent":..,"result":..}`, or `None`.
    pub fn result(&self, device: &str, id: &str) -> Result<Option<Value>, Error> {
        self.with(|client| {
            let row = client
                .query_opt(
                    "SELECT sent, result FROM ferry_commands WHERE device_id = $1 AND id = $2",
                    &[&device, &id],
                )
                .map_err(db("cannot read the command"))?;
            Ok(row.map(|row| {
                let sent = to_u64(row.get(0));
                match row.get::<_, Option<&str>>(1) {
                    None => json!({"state": "pending", "sent": sent}),
                    Some(text) => {
                        let result: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                        json!({"state": "done", "sent": sent, "result": result})
                    }
                }
            }))
        })
    }

    /// A connection of `device` opened (`Some(hello)`) or closed (`None`) on this replica.
    pub fn connection(&self, device: &str, hello: Option<&Value>) -> Result<(), Error> {
        let instance = self.instance.as_str();
        self.with(|client| {
            let mut tx = client.transaction().map_err(db("cannot begin"))?;
            match hello {
                Some(hello) => {
                    // Counted from the first connection, before the listener's first beat.
                    if !self.beating.load(Ordering::Acquire) {
                        beat(&mut tx, instance)?;
                    }
                    tx.execute(
                        "INSERT INTO ferry_sockets (device_id, instance, open) VALUES ($1, $2, 1)
                         ON CONFLICT (device_id, instance)
                             DO UPDATE SET open = ferry_sockets.open + 1",
                        &[&device, &instance],
                    )
                    .map_err(db("cannot record the connection"))?;
                    tx.execute(
                        "INSERT INTO ferry_downlink (device_id, connections, hello)
                         VALUES ($1, 1, $2)
                         ON CONFLICT (device_id) DO UPDATE SET
                             connections = ferry_downlink.connections + 1, hello = $2",
                        &[&device, &hello.to_string()],
                    )
                    .map_err(db("cannot record the connection"))?;
                }
                None => {
                    tx.execute(
                        "UPDATE ferry_sockets SET open = open - 1
                         WHERE device_id = $1 AND instance = $2",
                        &[&device, &instance],
                    )
                    .map_err(db("cannot record the connection"))?;
                    tx.execute(
                        "DELETE FROM ferry_sockets
                         WHERE device_id = $1 AND instance = $2 AND open <= 0",
                        &[&device, &instance],
                    )
                    .map_err(db("cannot record the connection"))?;
                }
            }
            tx.commit().map_err(db("cannot record the connection"))
        })
    }

    /// Which of `devices` a live replica holds a connection of.
    pub fn connected_of(&self, devices: &[String]) -> Result<HashSet<String>, Error> {
        self.with(|client| {
            Ok(client
                .query(
                    &format!(
                        "SELECT DISTINCT s.device_id FROM ferry_sockets s
                             JOIN ferry_replicas r ON r.instance = s.instance
                             WHERE s.device_id = ANY($1) AND s.open > 0
                                 AND r.seen_ms >= {DB_NOW_MS} - $2"
                    ),
                    &[&devices, &stale_ms()],
                )
                .map_err(db("cannot read the connections"))?
                .iter()
                .map(|row| row.get(0))
                .collect())
        })
    }

    /// The device's downlink state over all replicas, for `GET /v1/devices/<id>/downlink`:
    /// `connected` while a live replica (see the module header) holds a connection of it.
    pub fn downlink(&self, device: &str) -> Result<Value, Error> {
        self.with(|client| {
            let queued = pending_count(client, device)?;
            let connected: bool = client
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM ferry_sockets s
                             JOIN ferry_replicas r ON r.instance = s.instance
                             WHERE s.device_id = $1 AND s.open > 0
                                 AND r.seen_ms >= {DB_NOW_MS} - $2)"
                    ),
                    &[&device, &stale_ms()],
                )
                .map_err(db("cannot read the connections"))?
                .get(0);
            let row = client
                .query_opt(
                    "SELECT connections, hello FROM ferry_downlink WHERE device_id = $1",
                    &[&device],
                )
                .map_err(db("cannot read the connections"))?;
            Ok(match row {
                None => json!({"connected": connected, "connections": 0, "queued": queued}),
                Some(row) => {
                    let hello = row
                        .get::<_, Option<&str>>(1)
                        .and_then(|h| serde_json::from_str::<Value>(h).ok());
                    json!({
                        "connected": connected,
                        "connections": to_u64(row.get(0)),
                        "queued": queued,
                        "hello": hello,
                    })
                }
            })
        })
    }

    /// Starts `cloud-pg-listen`: LISTENs for queued commands on a connection of its own and calls
    /// `on_queued(Some(device))` for each, or `on_queued(None)` after (re)connecting, when any
    /// notification may have been missed; beats this replica's heartbeat on the same connection.
    /// Ends when `shutdown` is set.
    pub fn listen(
        &self,
        shutdown: Arc<AtomicBool>,
        on_queued: impl Fn(Option<&str>) + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let pool = Arc::clone(&self.pool);
        let instance = self.instance.clone();
        let beating = Arc::clone(&self.beating);
        thread::Builder::new()
            .name("cloud-pg-listen".into())
            .spawn(move || {
                let mut errors = Repeats::new(Duration::from_secs(60));
                while !shutdown.load(Ordering::SeqCst) {
                    match listen_once(
                        &pool,
                        &instance,
                        &beating,
                        &shutdown,
                        &on_queued,
                        &mut errors,
                    ) {
                        Ok(()) => break,
                        Err(e) => {
                            let error = ferry_util::error_chain(&e);
                            if errors.is_due(&error, Instant::now()) {
                                warn!("command notifications lost, listening again error={error}");
                            } else {
                                debug!("command notifications lost, listening again error={error}");
                            }
                            crate::sleep_unless(&shutdown, LISTEN_RETRY);
                        }
                    }
                }
            })
    }

    /// See [`Pool::run`]: each use here is one transaction or one statement, and runs again
    /// harmlessly, except that a count (`sent`, `connections`) whose answer was lost with its
    /// connection may be counted once more.
    fn with<T>(
        &self,
        f: impl FnMut(&mut postgres::Client) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.pool.run(f)
    }
}

/// Commands of `device` without a result.
fn pending_count(client: &mut impl GenericClient, device: &str) -> Result<i64, Error> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM ferry_commands WHERE device_id = $1 AND result IS NULL",
            &[&device],
        )
        .map_err(db("cannot count the commands"))?
        .get(0))
}

/// One listening connection, until shutdown (`Ok`) or an error.
fn listen_once(
    pool: &Pool,
    instance: &str,
    beating: &AtomicBool,
    shutdown: &AtomicBool,
    on_queued: &impl Fn(Option<&str>),
    errors: &mut Repeats,
) -> Result<(), Error> {
    let mut conn = pool.conn()?;
    let client = &mut conn.client;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(db("cannot listen"))?;
    info!("listening for commands queued on any replica");
    // Listening again: the next failure is said in full.
    errors.clear();
    on_queued(None);
    let mut beaten: Option<Instant> = None;
    while !shutdown.load(Ordering::SeqCst) {
        if beaten.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
            beat(client, instance)?;
            beating.store(true, Ordering::Release);
            forget_gone_replicas(client)?;
            beaten = Some(Instant::now());
        }
        let mut notifications = client.notifications();
        let mut iter = notifications.timeout_iter(LISTEN_POLL);
        // The timeout restarts at each notification: a steady stream of them must not keep
        // the heartbeat (and shutdown) waiting.
        while let Some(n) = iter.next().map_err(db("notification stream"))? {
            on_queued(Some(n.payload()));
            if beaten.is_none_or(|at| at.elapsed() >= HEARTBEAT) || shutdown.load(Ordering::SeqCst)
            {
                break;
            }
        }
    }
    // UNLISTEN before the connection goes back to the pool.
    let _ = client.batch_execute("UNLISTEN *");
    pool.give_back(conn);
    Ok(())
}

/// Says this replica is alive now.
fn beat(client: &mut impl GenericClient, instance: &str) -> Result<(), Error> {
    client
        .execute(
            &format!(
                "INSERT INTO ferry_replicas (instance, seen_ms) VALUES ($1, {DB_NOW_MS})
                 ON CONFLICT (instance) DO UPDATE SET seen_ms = {DB_NOW_MS}"
            ),
            &[&instance],
        )
        .map_err(db("cannot beat the heartbeat"))?;
    Ok(())
}

/// Deletes the connections and the heartbeat of replicas gone for [`FORGET_AFTER`] (they no
/// longer count already; this keeps the tables small).
fn forget_gone_replicas(client: &mut impl GenericClient) -> Result<(), Error> {
    let gone = client
        .execute(
            &format!(
                "WITH gone AS (
                     DELETE FROM ferry_replicas WHERE seen_ms < {DB_NOW_MS} - $1
                     RETURNING instance)
                 DELETE FROM ferry_sockets WHERE instance IN (SELECT instance FROM gone)"
            ),
            &[&to_i64(FORGET_AFTER.as_millis() as u64)],
        )
        .map_err(db("cannot forget gone replicas"))?;
    if gone > 0 {
        info!(
            "downlink connections of replicas gone for {FORGET_AFTER:?} forgotten connections={gone}"
        );
    }
    Ok(())
}

fn now_ms() -> i64 {
    to_i64(ferry_util::epoch_ms(SystemTime::now()))
}
