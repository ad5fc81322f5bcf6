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
//! Limits: a replica killed with connections open leaves `ferry_downlink.connected` counting
//! them until those devices connect again (the count is a hint, not a liveness check).

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

/// The commands' side of the database.
pub struct PgCommands {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for PgCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommands").finish()
    }
}

/// A pending command: `(id, frame)`.
pub type Pending = (String, String);

impl PgCommands {
    pub fn new(pool: Arc<Pool>) -> PgCommands {
        PgCommands { pool }
    }

    /// Queues `frame` as command `id` of `device` (a command already queued with that id stays
    /// as it is), unless `max_queued` are pending; tells every replica.
    pub fn queue(
        &self,
        device: &str,
        id: &str,
        frame: &str,
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
                "INSERT INTO ferry_commands (device_id, id, frame, queued_ms)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&device, &id, &frame, &now_ms()],
            )
            .map_err(db("cannot queue the command"))?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &device])
                .map_err(db("cannot notify the replicas"))?;
            tx.commit().map_err(db("cannot commit the command"))?;
            Ok(Ok(()))
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

    /// A connection of `device` opened (`Some(hello)`) or closed (`None`).
    pub fn connection(&self, device: &str, hello: Option<&Value>) -> Result<(), Error> {
        self.with(|client| {
            match hello {
                Some(hello) => client.execute(
                    "INSERT INTO ferry_downlink (device_id, connected, connections, hello)
                     VALUES ($1, 1, 1, $2)
                     ON CONFLICT (device_id) DO UPDATE SET connected = ferry_downlink.connected + 1,
                         connections = ferry_downlink.connections + 1, hello = $2",
                    &[&device, &hello.to_string()],
                ),
                None => client.execute(
                    "UPDATE ferry_downlink SET connected = GREATEST(connected - 1, 0)
                     WHERE device_id = $1",
                    &[&device],
                ),
            }
            .map_err(db("cannot record the connection"))?;
            Ok(())
        })
    }

    /// The device's downlink state over all replicas, for `GET /v1/devices/<id>/downlink`.
    pub fn downlink(&self, device: &str) -> Result<Value, Error> {
        self.with(|client| {
            let queued = pending_count(client, device)?;
            let row = client
                .query_opt(
                    "SELECT connected, connections, hello FROM ferry_downlink WHERE device_id = $1",
                    &[&device],
                )
                .map_err(db("cannot read the connections"))?;
            Ok(match row {
                None => json!({"connected": false, "connections": 0, "queued": queued}),
                Some(row) => {
                    let hello = row
                        .get::<_, Option<&str>>(2)
                        .and_then(|h| serde_json::from_str::<Value>(h).ok());
                    json!({
                        "connected": row.get::<_, i64>(0) > 0,
                        "connections": to_u64(row.get(1)),
                        "queued": queued,
                        "hello": hello,
                    })
                }
            })
        })
    }

    /// Starts `cloud-pg-listen`: LISTENs for queued commands on a connection of its own and calls
    /// `on_queued(Some(device))` for each, or `on_queued(None)` after (re)connecting, when any
    /// notification may have been missed. Ends when `shutdown` is set.
    pub fn listen(
        &self,
        shutdown: Arc<AtomicBool>,
        on_queued: impl Fn(Option<&str>) + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let pool = Arc::clone(&self.pool);
        thread::Builder::new()
            .name("cloud-pg-listen".into())
            .spawn(move || {
                let mut errors = Repeats::new(Duration::from_secs(60));
                while !shutdown.load(Ordering::SeqCst) {
                    match listen_once(&pool, &shutdown, &on_queued, &mut errors) {
                        Ok(()) => break,
                        Err(e) => {
                            let error = ferry_util::error_chain(&e);
                            if errors.is_due(&error, Instant::now()) {
                                warn!("command notifications lost, listening again error={error}");
                            } else {
                                debug!("command notifications lost, listening again error={error}");
                            }
                            sleep_unless(&shutdown, LISTEN_RETRY);
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
    shutdown: &AtomicBool,
    on_queued: &impl Fn(Option<&str>),
    errors: &mut Repeats,
) -> Result<(), Error> {
    let mut client = pool.client()?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(db("cannot listen"))?;
    info!("listening for commands queued on any replica");
    // Listening again: the next failure is said in full.
    errors.clear();
    on_queued(None);
    while !shutdown.load(Ordering::SeqCst) {
        let mut notifications = client.notifications();
        let mut iter = notifications.timeout_iter(LISTEN_POLL);
        while let Some(n) = iter.next().map_err(db("notification stream"))? {
            on_queued(Some(n.payload()));
        }
    }
    // UNLISTEN before the connection goes back to the pool.
    let _ = client.batch_execute("UNLISTEN *");
    pool.give_back(client);
    Ok(())
}

fn sleep_unless(shutdown: &AtomicBool, total: Duration) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !shutdown.load(Ordering::SeqCst) {
        let nap = left.min(step);
        thread::sleep(nap);
        left -= nap;
    }
}

fn now_ms() -> i64 {
    to_i64(ferry_util::epoch_ms(SystemTime::now()))
}
