//! The PostgreSQL store (`--store postgres://...`): what a fleet's center runs, shared by any
//! number of `ferry-cloud` replicas. Schema and migrations: `docs/CENTER-POSTGRES.md`.
//!
//! Tables (prefixed `ferry_`, so that they can live in a database shared with other things):
//! - `ferry_devices`: one row per device, the owner of its per-device state: the seqs stored (as
//!   ranges, `delivered`), the gateway's last account of what it holds (`held`), when it was
//!   last seen, its clash total, and the ledger's counts computed from those and its gaps
//!   ([`update_device`], in the same transaction), by which the fleet list ([`PgStore::fleet_page`])
//!   and `/metrics` ([`PgStore::fleet_totals`]) filter, sort and add up in SQL. Every change to a device's records, gaps or ledger happens in a
//!   transaction that first locks this row (`SELECT ... FOR UPDATE`), so two batches of one
//!   device, on one replica or on two, are applied one after the other and see each other's
//!   records: no duplicate, no lost record, no false clash.
//! - `ferry_records`: `(device_id, seq)` primary key, the record's JSON line as the device sent it.
//! - `ferry_gaps`: declared gaps, unique by `(device_id, from_seq, to_seq, reason)`.
//! - `ferry_clashes`: the [`MAX_CLASHES`](super::MAX_CLASHES) most recently clashing seqs per device.
//! - `ferry_commands`, `ferry_downlink`, `ferry_sockets`, `ferry_replicas`: the downlink's
//!   commands, connections and the replicas holding them ([`commands`]).
//! - `ferry_schema`: the schema version ([`MIGRATIONS`]).
//!
//! Durability: every connection runs with `synchronous_commit = on`, and [`PgStore::ingest`]
//! returns `Ok` only after its COMMIT was answered. A COMMIT whose answer is lost (the connection
//! broke) is an error: the batch may be stored, the sender resends, and the resend is deduplicated.
//!
//! Clashes: a stored seq's content is compared by re-reading its stored line and fingerprinting it
//! with this build ([`batch::stored_record`]), never by a stored hash, so replicas of different
//! builds agree. Only seqs the device row says are stored are read back: a first delivery costs no
//! read.
//!
//! Deadlines: connecting has `connect_timeout` (5 s unless the connection string says otherwise);
//! every statement has `statement_timeout`, waits for a lock `lock_timeout`, and an idle
//! transaction is ended by the server after `idle_in_transaction_session_timeout`; TCP
//! connections have keepalives and `tcp_user_timeout`, so a dead peer is noticed.
//!
//! TLS: with `sslmode=require` in the connection string, every connection is TLS and the server's
//! certificate is verified ([`tls`]); without it connections are plain.
//!
//! Not done: `/metrics` and the list's `total` scan the
//! device rows (no gap, clash or record rows); every batch rewrites its device's `delivered` ranges
//! (a cost that grows with the device's holes, not its records); `GET .../records` holds up to
//! [`MAX_RECORDS_READ`] per request in memory.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use log::{debug, info};
use postgres::config::{Host, SslMode};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Transaction};

use super::{Clash, DeviceSummary, Error, Outcome, Records, is_reserved, note_clashes};
use crate::batch::{self, Batch};
use crate::fleet;
use crate::ledger::{self, Ledger};
use crate::ranges::RangeSet;
use ferry_protocol::{Gap, GapReason, Held};

pub mod commands;
mod tls;

/// Schema versions, in order: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
/// Never edit a released entry; add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: records, gaps, devices (the ledger), clashes.
    "CREATE TABLE ferry_devices (
        device_id text PRIMARY KEY,
        delivered int8[] NOT NULL DEFAULT '{}',
        records int8 NOT NULL DEFAULT 0,
        head_seq int8,
        acked_seq int8,
        oldest_unsent_ts_ms int8,
        last_seen_ms int8 NOT NULL DEFAULT 0,
        clashes_total int8 NOT NULL DEFAULT 0
    );
    CREATE TABLE ferry_records (
        device_id text NOT NULL,
        seq int8 NOT NULL,
        line text NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE TABLE ferry_gaps (
        id bigserial PRIMARY KEY,
        device_id text NOT NULL,
        from_seq int8 NOT NULL,
        to_seq int8 NOT NULL,
        reason text NOT NULL,
        UNIQUE (device_id, from_seq, to_seq, reason)
    );
    CREATE TABLE ferry_clashes (
        device_id text NOT NULL,
        seq int8 NOT NULL,
        first_seen_ms int8 NOT NULL,
        last_seen_ms int8 NOT NULL,
        count int8 NOT NULL,
        PRIMARY KEY (device_id, seq)
    );",
    // 2: the downlink's commands and connections, shared by replicas (commands.rs).
    "CREATE TABLE ferry_commands (
        device_id text NOT NULL,
        id text NOT NULL,
        frame text NOT NULL,
        queued_ms int8 NOT NULL,
        sent int8 NOT NULL DEFAULT 0,
        result text,
        done_ms int8,
        n bigserial,
        PRIMARY KEY (device_id, id)
    );
    CREATE INDEX ferry_commands_pending ON ferry_commands (device_id, n) WHERE result IS NULL;
    CREATE TABLE ferry_downlink (
        device_id text PRIMARY KEY,
        connected int8 NOT NULL DEFAULT 0,
        connections int8 NOT NULL DEFAULT 0,
        hello text
    );",
    // 3: the ledger's counts as columns of the device row, kept by every batch and report, so
    // that the fleet list and /metrics are answered in SQL. Filled for the rows already there by
    // the service as it migrates (`fill_ledger_columns`).
    "ALTER TABLE ferry_devices
        ADD COLUMN listed bool NOT NULL DEFAULT false,
        ADD COLUMN ledger_delivered int8 NOT NULL DEFAULT 0,
        ADD COLUMN ledger_gaps int8 NOT NULL DEFAULT 0,
        ADD COLUMN ledger_waiting int8 NOT NULL DEFAULT 0,
        ADD COLUMN ledger_missing int8 NOT NULL DEFAULT 0,
        ADD COLUMN ledger_balanced bool NOT NULL DEFAULT true;
    CREATE INDEX ferry_devices_by_id ON ferry_devices (device_id COLLATE \"C\") WHERE listed;
    CREATE INDEX ferry_devices_by_waiting
        ON ferry_devices (ledger_waiting DESC, device_id COLLATE \"C\") WHERE listed;
    CREATE INDEX ferry_devices_by_missing
        ON ferry_devices (ledger_missing DESC, device_id COLLATE \"C\") WHERE listed;
    CREATE INDEX ferry_devices_by_last_seen
        ON ferry_devices (last_seen_ms, device_id COLLATE \"C\") WHERE listed;",
    // 4: open downlink connections per replica, and each replica's heartbeat, so that the
    // connections of a replica that died are no longer counted (commands.rs).
    "CREATE TABLE ferry_replicas (
        instance text PRIMARY KEY,
        seen_ms int8 NOT NULL
    );
    CREATE TABLE ferry_sockets (
        device_id text NOT NULL,
        instance text NOT NULL,
        open int8 NOT NULL,
        PRIMARY KEY (device_id, instance)
    );
    CREATE INDEX ferry_sockets_by_instance ON ferry_sockets (instance);
    ALTER TABLE ferry_downlink DROP COLUMN connected;",
    // 5: who queued each command (the operator's name; commands.rs).
    "ALTER TABLE ferry_commands ADD COLUMN sent_by text;",
    // 6: records that report a gap upstream of the gateway, per device, counted at insert (no
    // agent sent them before this version: nothing to count in older rows, and a scan of every
    // record would not fit the migration's statement deadline on a large database).
    "ALTER TABLE ferry_devices ADD COLUMN upstream_gaps int8 NOT NULL DEFAULT 0;",
    // 7: the bytes the gateway holds unsent, as it last reported them (newer agents).
    "ALTER TABLE ferry_devices ADD COLUMN backlog_bytes int8;",
];

/// The schema version that added the ledger columns ([`fill_ledger_columns`]).
const LEDGER_COLUMNS: usize = 3;

/// Statement, lock and connect deadlines (see the module's "Deadlines").
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest answer of `GET /v1/devices/<id>/records` read from the database.
pub const MAX_RECORDS_READ: u64 = 256 * 1024 * 1024;
/// Key of the advisory lock that makes replicas starting at once migrate one at a time.
const MIGRATION_LOCK: i64 = 0x6665_7272_7931; // "ferry1"

/// The store.
pub struct PgStore {
    pool: Arc<Pool>,
}

/// Connections to the database, pooled (one per thread that is using one at a time); shared by
/// the store and the downlink's commands ([`commands`]).
pub struct Pool {
    config: Config,
    /// Where the database is, for logs and errors (no password).
    target: String,
    /// With `sslmode=require`: how connections are made TLS.
    tls: Option<tls::RustlsConnect>,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.pool.target)
            .finish()
    }
}

/// The device row as read under its lock.
struct DeviceRow {
    delivered: RangeSet,
    held: Option<Held>,
}

impl PgStore {
    /// Parses the connection string, connects, and creates or migrates the schema.
    /// With `sslmode=require`, connections are TLS verified against the roots of `ca_file` (or
    /// the Mozilla roots) by [`tls`]; otherwise they are plain (`prefer`, the default, does not
    /// try TLS).
    pub fn open(url: &str, ca_file: Option<&Path>) -> Result<PgStore, Error> {
        let mut config = Config::from_str(url).map_err(|source| Error::Database {
            what: "cannot read the connection string",
            source,
        })?;
        let tls = match config.get_ssl_mode() {
            SslMode::Require
                if config
                    .get_hosts()
                    .iter()
                    .any(|h| !matches!(h, Host::Tcp(_))) =>
            {
                return Err(Error::TlsOnSocket);
            }
            SslMode::Require => {
                let roots = ferry_tls::Material::roots_only("--store-ca", ca_file)?;
                Some(tls::RustlsConnect::new(roots.client_config()?))
            }
            _ if ca_file.is_some() => return Err(Error::CaWithoutTls),
            _ => None,
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let ms = STATEMENT_TIMEOUT.as_millis();
        config
            .application_name("ferry-cloud")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(TCP_USER_TIMEOUT)
            .options(&format!(
                "-c synchronous_commit=on -c statement_timeout={ms} -c lock_timeout={ms} \
                 -c idle_in_transaction_session_timeout={}",
                2 * ms
            ));
        let store = PgStore {
            pool: Arc::new(Pool {
                target: describe(&config),
                config,
                tls,
                idle: Mutex::new(Vec::new()),
            }),
        };
        let version = store.migrate()?;
        info!("database ready target={} schema={version}", store.target());
        Ok(store)
    }

    /// The connections, for the downlink's commands.
    pub fn pool(&self) -> Arc<Pool> {
        Arc::clone(&self.pool)
    }

    /// Brings the schema to the newest version this build knows, one replica at a time.
    fn migrate(&self) -> Result<i32, Error> {
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        let mut client = self.client()?;
        let mut tx = client.transaction().map_err(db("cannot begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(db("cannot take the migration lock"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS ferry_schema (version int4 NOT NULL)")
            .map_err(db("cannot create ferry_schema"))?;
        let found: i32 = tx
            .query_opt("SELECT max(version) FROM ferry_schema", &[])
            .map_err(db("cannot read the schema version"))?
            .and_then(|row| row.get::<_, Option<i32>>(0))
            .unwrap_or(0);
        if found > known {
            return Err(Error::SchemaTooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.batch_execute(sql)
                .map_err(db("cannot migrate the schema"))?;
            info!("schema migrated target={} version={}", self.target(), i + 1);
        }
        // Once the schema is whole: the fill writes device rows as this build does, every column.
        if found > 0 && (found as usize) < LEDGER_COLUMNS {
            let n = fill_ledger_columns(&mut tx)?;
            info!("ledger columns filled target={} devices={n}", self.target());
        }
        tx.execute("DELETE FROM ferry_schema", &[])
            .map_err(db("cannot record the schema version"))?;
        tx.execute("INSERT INTO ferry_schema (version) VALUES ($1)", &[&known])
            .map_err(db("cannot record the schema version"))?;
        tx.commit().map_err(db("cannot commit the migration"))?;
        self.give_back(client);
        Ok(known)
    }

    /// `user@host:port/dbname`, without the password.
    pub fn target(&self) -> &str {
        &self.pool.target
    }

    /// See [`super::Store::ingest`].
    pub fn ingest(&self, batch: &Batch) -> Result<Outcome, Error> {
        let device_id = &batch.device_id;
        if is_reserved(device_id) {
            return Err(Error::ReservedDeviceId {
                device_id: device_id.clone(),
            });
        }
        let too_large = batch
            .records
            .iter()
            .map(|r| r.seq)
            .chain(batch.gaps.iter().map(|g| g.to_seq))
            .chain(batch.held.map(|h| h.head_seq.max(h.acked_seq)))
            .find(|&seq| i64::try_from(seq).is_err());
        if let Some(seq) = too_large {
            return Err(Error::SeqTooLarge {
                device_id: device_id.clone(),
                seq,
            });
        }
        let now_ms = ferry_util::epoch_ms(SystemTime::now());
        // Run again on a fresh connection after a broken one is safe: a batch whose COMMIT did
        // go through is found stored (duplicates), never stored twice.
        self.pool
            .run(|client| match ingest_in(client, batch, now_ms)? {
                Ok(outcome) => Ok(outcome),
                Err(clashing) => {
                    // The batch's transaction was rolled back; remember the clash in a new one.
                    note_clash_rows(client, device_id, &clashing, now_ms)?;
                    Err(Error::Clash {
                        device_id: device_id.clone(),
                        seq: clashing[0],
                    })
                }
            })
    }

    /// See [`super::Store::report`].
    pub fn report(&self, device_id: &str, held: Held, now_ms: u64) -> Result<(), Error> {
        if is_reserved(device_id) || i64::try_from(held.head_seq.max(held.acked_seq)).is_err() {
            return Ok(());
        }
        self.pool.run(|client| {
            let mut tx = client.transaction().map_err(db("cannot begin"))?;
            let row = lock_device(&mut tx, device_id)?;
            let held = ledger::later(row.held, held);
            update_device(&mut tx, device_id, &row.delivered, Some(held), Some(now_ms))?;
            tx.commit().map_err(db("cannot commit"))
        })
    }

    /// See [`super::Store::fleet_page`]: selected, ordered and paged in SQL by the ledger
    /// columns, then the page's summaries read, all in one snapshot.
    pub fn fleet_page(
        &self,
        q: &fleet::Query,
        now_ms: u64,
        silent_after_ms: u64,
    ) -> Result<fleet::Page, Error> {
        self.pool.run(|client| {
            let mut tx = snapshot(client)?;
            let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
            let mut conditions = vec!["listed".to_owned()];
            if let Some(prefix) = &q.prefix {
                args.push(Box::new(prefix.clone()));
                conditions.push(format!("starts_with(device_id, ${})", args.len()));
            }
            if let Some(state) = q.state {
                // Only `silent` and `healthy` depend on the time (a parameter must be used).
                if matches!(state, "silent" | "healthy") {
                    args.push(Box::new(silent_before(now_ms, silent_after_ms)));
                }
                conditions.push(state_condition(state, args.len()));
            }
            let filter = conditions.join(" AND ");
            let order = match q.sort {
                fleet::Sort::Id => "device_id COLLATE \"C\"",
                fleet::Sort::Waiting => "ledger_waiting DESC, device_id COLLATE \"C\"",
                fleet::Sort::Missing => "ledger_missing DESC, device_id COLLATE \"C\"",
                fleet::Sort::LastSeen => "last_seen_ms, device_id COLLATE \"C\"",
            };
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| &**a as _).collect();
            let total: i64 = tx
                .query_one(
                    &format!("SELECT count(*) FROM ferry_devices WHERE {filter}"),
                    &params,
                )
                .map_err(db("cannot count the devices"))?
                .get(0);
            let ids: Vec<String> = tx
                .query(
                    &format!(
                        "SELECT device_id FROM ferry_devices WHERE {filter} ORDER BY {order}
                         LIMIT {} OFFSET {}",
                        q.limit,
                        // An offset past bigint is past every row too.
                        to_i64(q.offset as u64)
                    ),
                    &params,
                )
                .map_err(db("cannot list the devices"))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut by_id: BTreeMap<String, DeviceSummary> = read_summaries(&mut tx, &ids)?
                .into_iter()
                .map(|d| (d.device_id.clone(), d))
                .collect();
            tx.commit().map_err(db("cannot end the read"))?;
            let devices = ids.iter().filter_map(|id| by_id.remove(id)).collect();
            Ok(fleet::Page {
                devices,
                total: to_u64(total),
            })
        })
    }

    /// See [`super::Store::fleet_totals`]: one aggregate over the device rows.
    pub fn fleet_totals(&self, now_ms: u64, silent_after_ms: u64) -> Result<fleet::Totals, Error> {
        let silent = silent_before(now_ms, silent_after_ms);
        let now = to_i64(now_ms);
        // The backlog age buckets, as fleet::backlog_age_bucket sorts them ($2: now).
        let age = "GREATEST($2 - oldest_unsent_ts_ms, 0) / 1000";
        let mut ages = Vec::new();
        let mut above = None;
        for bound in fleet::BACKLOG_AGE_S {
            let lower = above.map_or(String::new(), |b| format!(" AND {age} > {b}"));
            ages.push(format!(
                "count(*) FILTER (WHERE ledger_waiting > 0 AND oldest_unsent_ts_ms IS NOT NULL
                     AND {age} <= {bound}{lower})"
            ));
            above = Some(bound);
        }
        ages.push(format!(
            "count(*) FILTER (WHERE ledger_waiting > 0
                 AND (oldest_unsent_ts_ms IS NULL OR {age} > {}))",
            above.unwrap_or(0)
        ));
        let row = self.pool.run(|client| {
            client
                .query_one(
                    &format!(
                        "SELECT count(*),
                             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}),
                             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}),
                             count(*) FILTER (WHERE {}),
                             COALESCE(sum(ledger_delivered), 0)::int8,
                             COALESCE(sum(ledger_gaps), 0)::int8,
                             COALESCE(sum(ledger_waiting), 0)::int8,
                             COALESCE(sum(ledger_missing), 0)::int8,
                             count(*) FILTER (WHERE NOT ledger_balanced),
                             min(oldest_unsent_ts_ms) FILTER (WHERE ledger_waiting > 0),
                             {}
                         FROM ferry_devices WHERE listed",
                        state_condition(fleet::STATES[0], 1),
                        state_condition(fleet::STATES[1], 1),
                        state_condition(fleet::STATES[2], 1),
                        state_condition(fleet::STATES[3], 1),
                        state_condition(fleet::STATES[4], 1),
                        ages.join(", "),
                    ),
                    &[&silent, &now],
                )
                .map_err(db("cannot add up the devices"))
        })?;
        let n = |i: usize| to_u64(row.get(i));
        let mut backlog_age = [0; fleet::BACKLOG_AGE_S.len() + 1];
        for (i, bucket) in backlog_age.iter_mut().enumerate() {
            *bucket = n(12 + i);
        }
        Ok(fleet::Totals {
            devices: n(0),
            by_state: [n(1), n(2), n(3), n(4), n(5)],
            delivered: n(6),
            gaps: n(7),
            waiting: n(8),
            missing: n(9),
            unbalanced: n(10),
            oldest_unsent_ts_ms: row.get::<_, Option<i64>>(11).map(to_u64),
            backlog_age,
        })
    }

    /// See [`super::Store::device_summary`].
    pub fn device_summary(&self, device_id: &str) -> Result<Option<DeviceSummary>, Error> {
        let ids = [device_id.to_owned()];
        self.pool.run(|client| {
            let mut tx = snapshot(client)?;
            let found = read_summaries(&mut tx, &ids)?.pop();
            tx.commit().map_err(db("cannot end the read"))?;
            Ok(found)
        })
    }

    /// See [`super::Store::records`]: by seq, at most [`MAX_RECORDS_READ`] bytes.
    pub fn records(&self, device_id: &str, last: Option<u64>) -> Result<Option<Records>, Error> {
        let mut client = self.client()?;
        let mut body = Vec::new();
        {
            let limit = last.map_or(i64::MAX, to_i64);
            let mut rows = client
                .query_raw(
                    "SELECT line FROM (SELECT seq, line FROM ferry_records WHERE device_id = $1
                         ORDER BY seq DESC LIMIT $2) AS t ORDER BY seq",
                    [&device_id as &(dyn ToSql + Sync), &limit],
                )
                .map_err(db("cannot read the records"))?;
            while let Some(row) = rows.next().map_err(db("cannot read the records"))? {
                let line: &str = row.get(0);
                if body.len() as u64 + line.len() as u64 + 1 > MAX_RECORDS_READ {
                    // Dropping the iterator mid-way leaves the connection in the middle of an
                    // answer: do not pool it.
                    drop(rows);
                    drop(client);
                    return Err(Error::TooManyToRead {
                        device_id: device_id.to_owned(),
                        limit: MAX_RECORDS_READ,
                    });
                }
                body.extend_from_slice(line.as_bytes());
                body.push(b'\n');
            }
        }
        self.give_back(client);
        if body.is_empty() {
            return Ok(None);
        }
        let len = body.len() as u64;
        Ok(Some(Records {
            reader: Box::new(Cursor::new(body)),
            len,
        }))
    }

    fn client(&self) -> Result<Client, Error> {
        self.pool.client()
    }

    fn give_back(&self, client: Client) {
        self.pool.give_back(client);
    }
}

impl Pool {
    /// An idle pooled connection, or a new one.
    pub fn client(&self) -> Result<Client, Error> {
        self.take().map(|(client, _)| client)
    }

    /// An idle pooled connection (`true`), or a new one (`false`).
    fn take(&self) -> Result<(Client, bool), Error> {
        loop {
            let idle = lock(&self.idle).pop();
            match idle {
                Some(client) if client.is_closed() => {}
                Some(client) => return Ok((client, true)),
                None => return Ok((self.connect()?, false)),
            }
        }
    }

    fn connect(&self) -> Result<Client, Error> {
        // The callers say the error (each at its own rate); this is for a closer look.
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        connected.map_err(|source| {
            debug!(
                "cannot connect to the database target={} error={}",
                self.target,
                ferry_util::error_chain(&source)
            );
            Error::Database {
                what: "cannot connect",
                source,
            }
        })
    }

    /// Runs `f` on a pooled connection. A pooled connection can have been broken while idle (the
    /// database restarted): when `f` fails on one found closed, it runs once more on a new
    /// connection. So `f` must be safe to run twice (each of its transactions commits whole
    /// or not at all, and running it again after a commit changes nothing).
    pub fn run<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T, Error>) -> Result<T, Error> {
        let (mut client, pooled) = self.take()?;
        let result = f(&mut client);
        if pooled && client.is_closed() && matches!(result, Err(Error::Database { .. })) {
            debug!("a pooled connection was broken; running again on a new one");
            client = self.connect()?;
            let again = f(&mut client);
            self.give_back(client);
            return again;
        }
        self.give_back(client);
        result
    }

    /// Returns a connection to the pool after a use that ended cleanly (an error that broke the
    /// connection leaves it closed, and it is dropped at the next take).
    pub fn give_back(&self, client: Client) {
        lock(&self.idle).push(client);
    }
}

/// A read-only transaction that sees one snapshot, so that a batch committed during a read of
/// several tables is seen in all of them or in none.
fn snapshot(client: &mut Client) -> Result<Transaction<'_>, Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(db("cannot begin"))
}

/// The summaries of the devices `ids` that stored records or gaps or reported what they hold,
/// in no particular order.
fn read_summaries(tx: &mut Transaction<'_>, ids: &[String]) -> Result<Vec<DeviceSummary>, Error> {
    let filter = "device_id = ANY($1)";
    let mut gaps: BTreeMap<String, Vec<Gap>> = BTreeMap::new();
    for row in tx
        .query(
            &format!(
                "SELECT device_id, from_seq, to_seq, reason FROM ferry_gaps
                     WHERE {filter} ORDER BY id"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the gaps"))?
    {
        let device_id: String = row.get(0);
        let gap = gap_of(&device_id, &row, 1)?;
        gaps.entry(device_id).or_default().push(gap);
    }
    let mut clashes: BTreeMap<String, Vec<Clash>> = BTreeMap::new();
    for row in tx
        .query(
            &format!(
                "SELECT device_id, seq, first_seen_ms, last_seen_ms, count FROM ferry_clashes
                     WHERE {filter}"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the clashes"))?
    {
        clashes
            .entry(row.get(0))
            .or_default()
            .push(clash_of(&row, 1));
    }
    let rows = tx
        .query(
            &format!(
                "SELECT device_id, delivered, head_seq, acked_seq, oldest_unsent_ts_ms,
                         backlog_bytes, last_seen_ms, clashes_total, upstream_gaps
                     FROM ferry_devices WHERE {filter}"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the devices"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let device_id: String = row.get(0);
        let summary = DeviceSummary::from_parts(
            device_id.clone(),
            &ranges_of(&row.get::<_, Vec<i64>>(1)),
            gaps.remove(&device_id).unwrap_or_default(),
            clashes.remove(&device_id).unwrap_or_default(),
            to_u64(row.get(7)),
            held_of(&row, 2),
            to_u64(row.get(6)),
        )
        .map(|s| DeviceSummary {
            upstream_gaps: to_u64(row.get(8)),
            ..s
        });
        out.extend(summary);
    }
    Ok(out)
}

/// The device's declared gaps, in the order stored.
fn device_gaps(tx: &mut Transaction<'_>, device_id: &str) -> Result<Vec<Gap>, Error> {
    tx.query(
        "SELECT from_seq, to_seq, reason FROM ferry_gaps WHERE device_id = $1 ORDER BY id",
        &[&device_id],
    )
    .map_err(db("cannot read the gaps"))?
    .iter()
    .map(|row| gap_of(device_id, row, 0))
    .collect()
}

/// Writes a locked device's row: its stored seqs, the gateway's account, when it was last seen
/// (`now_ms`, if it was), and the ledger's counts from those and its gaps (the columns the fleet
/// list filters and sorts by; see the module header).
fn update_device(
    tx: &mut Transaction<'_>,
    device_id: &str,
    delivered: &RangeSet,
    held: Option<Held>,
    now_ms: Option<u64>,
) -> Result<(), Error> {
    let gaps = device_gaps(tx, device_id)?;
    let ledger = Ledger::account(delivered, &gaps, held);
    let listed = !delivered.is_empty() || !gaps.is_empty() || held.is_some();
    tx.execute(
        "UPDATE ferry_devices SET delivered = $2, records = $3, head_seq = $4, acked_seq = $5,
             oldest_unsent_ts_ms = $6, last_seen_ms = GREATEST(last_seen_ms, $7),
             listed = $8, ledger_delivered = $9, ledger_gaps = $10, ledger_waiting = $11,
             ledger_missing = $12, ledger_balanced = $13, backlog_bytes = $14
         WHERE device_id = $1",
        &[
            &device_id,
            &flat_ranges(delivered),
            &to_i64(delivered.len()),
            &held.map(|h| to_i64(h.head_seq)),
            &held.map(|h| to_i64(h.acked_seq)),
            &held.and_then(|h| h.oldest_unsent_ts_ms).map(to_i64),
            &to_i64(now_ms.unwrap_or(0)),
            &listed,
            &to_i64(ledger.delivered),
            &to_i64(ledger.gap_total()),
            &to_i64(ledger.waiting),
            &to_i64(ledger.missing),
            &ledger.balances(),
            &held.and_then(|h| h.backlog_bytes).map(to_i64),
        ],
    )
    .map_err(db("cannot update the device"))?;
    Ok(())
}

/// Fills the ledger columns of every device row (schema version 3 on a database written by an
/// older version), inside the migration's transaction. Returns the rows filled.
fn fill_ledger_columns(tx: &mut Transaction<'_>) -> Result<u64, Error> {
    let rows = tx
        .query(
            "SELECT device_id, delivered, head_seq, acked_seq, oldest_unsent_ts_ms, backlog_bytes
             FROM ferry_devices",
            &[],
        )
        .map_err(db("cannot read the devices"))?;
    for row in &rows {
        let device_id: &str = row.get(0);
        let delivered = ranges_of(&row.get::<_, Vec<i64>>(1));
        update_device(tx, device_id, &delivered, held_of(row, 2), None)?;
    }
    Ok(rows.len() as u64)
}

/// The SQL condition of a device being in `state` (one of [`fleet::STATES`], as
/// [`fleet::states`] decides it), with `$silent` the parameter of [`silent_before`].
fn state_condition(state: &str, silent: usize) -> String {
    let silent = format!("last_seen_ms < ${silent}");
    match state {
        "clash" => "clashes_total > 0".to_owned(),
        "missing" => "ledger_missing > 0".to_owned(),
        "behind" => "ledger_waiting > 0".to_owned(),
        "silent" => silent,
        _ => format!(
            "NOT (clashes_total > 0 OR ledger_missing > 0 OR ledger_waiting > 0 OR {silent})"
        ),
    }
}

/// A device last seen before this (ms since the epoch) is silent: `now - last_seen > after`.
fn silent_before(now_ms: u64, silent_after_ms: u64) -> i64 {
    to_i64(now_ms).saturating_sub(i64::try_from(silent_after_ms).unwrap_or(i64::MAX))
}

/// The batch's transaction: lock the device, check clashes, insert, update the ledger, commit.
/// `Ok(Err(seqs))`: the batch clashes at `seqs` (ascending, at least one) and was rolled back.
fn ingest_in(
    client: &mut Client,
    batch: &Batch,
    now_ms: u64,
) -> Result<Result<Outcome, Vec<u64>>, Error> {
    let device_id = batch.device_id.as_str();
    let mut tx = client.transaction().map_err(db("cannot begin"))?;
    let row = lock_device(&mut tx, device_id)?;

    // Seqs the device row says are stored: read their lines back and compare content.
    let maybe_stored: Vec<i64> = batch
        .records
        .iter()
        .filter(|r| row.delivered.contains(r.seq))
        .map(|r| to_i64(r.seq))
        .collect();
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    if !maybe_stored.is_empty() {
        for found in tx
            .query(
                "SELECT seq, line FROM ferry_records WHERE device_id = $1 AND seq = ANY($2)",
                &[&device_id, &maybe_stored],
            )
            .map_err(db("cannot read stored records"))?
        {
            let line: &str = found.get(1);
            let record =
                batch::stored_record(line.as_bytes()).map_err(|invalid| Error::Corrupt {
                    device_id: device_id.to_owned(),
                    seq: to_u64(found.get(0)),
                    problem: invalid.to_string(),
                })?;
            stored.insert(record.seq, record.fingerprint);
        }
    }
    let clashing: Vec<u64> = batch
        .records
        .iter()
        .filter(|r| stored.get(&r.seq).is_some_and(|&f| f != r.fingerprint))
        .map(|r| r.seq)
        .collect();
    if !clashing.is_empty() {
        // Rolled back when `tx` drops; the caller notes the clash.
        return Ok(Err(clashing));
    }
    let mut seqs = Vec::new();
    let mut lines = Vec::new();
    let mut delivered = row.delivered;
    let mut upstream_gaps = 0i64;
    for record in &batch.records {
        // Not stored before, and not a repeat within this batch.
        if !delivered.contains(record.seq) {
            seqs.push(to_i64(record.seq));
            lines.push(record.line.as_str());
            delivered.insert(record.seq);
            upstream_gaps += i64::from(record.upstream_gap);
        }
    }
    if upstream_gaps > 0 {
        tx.execute(
            "UPDATE ferry_devices SET upstream_gaps = upstream_gaps + $2 WHERE device_id = $1",
            &[&device_id, &upstream_gaps],
        )
        .map_err(db("cannot count the upstream gaps"))?;
    }
    if !seqs.is_empty() {
        let inserted = tx
            .execute(
                "INSERT INTO ferry_records (device_id, seq, line)
                 SELECT $1, s, l FROM unnest($2::int8[], $3::text[]) AS t(s, l)
                 ON CONFLICT DO NOTHING",
                &[&device_id, &seqs, &lines],
            )
            .map_err(db("cannot insert the records"))?;
        if inserted != seqs.len() as u64 {
            // The device row said they were not stored; a row there anyway was not written by
            // this store's rules. Store nothing and say so.
            return Err(Error::Inconsistent {
                device_id: device_id.to_owned(),
                what: format!(
                    "{} of {} new records were already in ferry_records but not in the device's delivered ranges",
                    seqs.len() as u64 - inserted,
                    seqs.len()
                ),
            });
        }
    }
    let mut new_gaps = 0;
    if !batch.gaps.is_empty() {
        let from: Vec<i64> = batch.gaps.iter().map(|g| to_i64(g.from_seq)).collect();
        let to: Vec<i64> = batch.gaps.iter().map(|g| to_i64(g.to_seq)).collect();
        let reason: Vec<&str> = batch.gaps.iter().map(|g| g.reason.as_str()).collect();
        new_gaps = tx
            .execute(
                "INSERT INTO ferry_gaps (device_id, from_seq, to_seq, reason)
                 SELECT $1, f, t, r FROM unnest($2::int8[], $3::int8[], $4::text[])
                     WITH ORDINALITY AS g(f, t, r, n)
                 ORDER BY n
                 ON CONFLICT DO NOTHING",
                &[&device_id, &from, &to, &reason],
            )
            .map_err(db("cannot insert the gaps"))?;
    }
    let held = match batch.held {
        Some(new) => Some(ledger::later(row.held, new)),
        None => row.held,
    };
    update_device(&mut tx, device_id, &delivered, held, Some(now_ms))?;
    tx.commit().map_err(db("cannot commit the batch"))?;
    let accepted = seqs.len() as u64;
    Ok(Ok(Outcome {
        accepted,
        duplicates: batch.records.len() as u64 - accepted,
        new_gaps,
    }))
}

/// Creates the device's row if it has none and locks it until the transaction ends.
fn lock_device(tx: &mut Transaction<'_>, device_id: &str) -> Result<DeviceRow, Error> {
    tx.execute(
        "INSERT INTO ferry_devices (device_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&device_id],
    )
    .map_err(db("cannot add the device"))?;
    let row = tx
        .query_one(
            "SELECT delivered, head_seq, acked_seq, oldest_unsent_ts_ms, backlog_bytes FROM ferry_devices
             WHERE device_id = $1 FOR UPDATE",
            &[&device_id],
        )
        .map_err(db("cannot lock the device"))?;
    Ok(DeviceRow {
        delivered: ranges_of(&row.get::<_, Vec<i64>>(0)),
        held: held_of(&row, 1),
    })
}

/// Adds one refusal of each of `seqs` to the device's clashes, keeping the most recent ones.
fn note_clash_rows(
    client: &mut Client,
    device_id: &str,
    seqs: &[u64],
    now_ms: u64,
) -> Result<(), Error> {
    if seqs.is_empty() {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(db("cannot begin"))?;
    lock_device(&mut tx, device_id)?;
    let mut clashes: Vec<Clash> = tx
        .query(
            "SELECT seq, first_seen_ms, last_seen_ms, count FROM ferry_clashes WHERE device_id = $1",
            &[&device_id],
        )
        .map_err(db("cannot read the clashes"))?
        .iter()
        .map(|row| clash_of(row, 0))
        .collect();
    let added = note_clashes(&mut clashes, seqs, now_ms);
    tx.execute(
        "DELETE FROM ferry_clashes WHERE device_id = $1",
        &[&device_id],
    )
    .map_err(db("cannot write the clashes"))?;
    let column = |f: fn(&Clash) -> u64| clashes.iter().map(|c| to_i64(f(c))).collect::<Vec<_>>();
    tx.execute(
        "INSERT INTO ferry_clashes (device_id, seq, first_seen_ms, last_seen_ms, count)
         SELECT $1, s, f, l, c FROM unnest($2::int8[], $3::int8[], $4::int8[], $5::int8[])
             AS t(s, f, l, c)",
        &[
            &device_id,
            &column(|c| c.seq),
            &column(|c| c.first_seen_ms),
            &column(|c| c.last_seen_ms),
            &column(|c| c.count),
        ],
    )
    .map_err(db("cannot write the clashes"))?;
    tx.execute(
        "UPDATE ferry_devices SET clashes_total = clashes_total + $2 WHERE device_id = $1",
        &[&device_id, &to_i64(added)],
    )
    .map_err(db("cannot write the clashes"))?;
    tx.commit().map_err(db("cannot commit the clashes"))
}

fn clash_of(row: &postgres::Row, at: usize) -> Clash {
    Clash {
        seq: to_u64(row.get(at)),
        first_seen_ms: to_u64(row.get(at + 1)),
        last_seen_ms: to_u64(row.get(at + 2)),
        count: to_u64(row.get(at + 3)),
    }
}

/// `held` from the columns `head_seq, acked_seq, oldest_unsent_ts_ms, backlog_bytes` starting
/// at `at`.
fn held_of(row: &postgres::Row, at: usize) -> Option<Held> {
    let head: Option<i64> = row.get(at);
    let acked: Option<i64> = row.get(at + 1);
    let oldest: Option<i64> = row.get(at + 2);
    let bytes: Option<i64> = row.get(at + 3);
    Some(Held {
        head_seq: to_u64(head?),
        acked_seq: to_u64(acked?),
        oldest_unsent_ts_ms: oldest.map(to_u64),
        backlog_bytes: bytes.map(to_u64),
    })
}

/// `[from1, to1, from2, to2, ...]` as stored in `ferry_devices.delivered`.
fn flat_ranges(set: &RangeSet) -> Vec<i64> {
    set.iter()
        .flat_map(|(from, to)| [to_i64(from), to_i64(to)])
        .collect()
}

fn ranges_of(flat: &[i64]) -> RangeSet {
    let mut set = RangeSet::new();
    for pair in flat.chunks_exact(2) {
        let (from, to) = (to_u64(pair[0]), to_u64(pair[1]));
        if from >= 1 && from <= to {
            set.insert_range(from, to);
        }
    }
    set
}

/// A gap from the columns `from_seq, to_seq, reason` starting at `at`.
fn gap_of(device_id: &str, row: &postgres::Row, at: usize) -> Result<Gap, Error> {
    Ok(Gap {
        from_seq: to_u64(row.get(at)),
        to_seq: to_u64(row.get(at + 1)),
        reason: gap_reason(device_id, row.get(at + 2))?,
    })
}

fn gap_reason(device_id: &str, text: &str) -> Result<GapReason, Error> {
    GapReason::parse(text).ok_or_else(|| Error::Inconsistent {
        device_id: device_id.to_owned(),
        what: format!("ferry_gaps has a gap of reason {text:?}, which no agent sends"),
    })
}

/// Seqs and times are checked below 2^63 before they are written; a negative value read back
/// (written by something else) counts as 0.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn db(what: &'static str) -> impl Fn(postgres::Error) -> Error {
    move |source| Error::Database { what, source }
}

/// `user@host:port/dbname`: where the database is, without the password.
fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("-"),
        config.get_dbname().unwrap_or("-")
    )
}

/// The pool holds only idle connections: a poisoned lock cannot leave it inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
