//! The schema: its versions ([`MIGRATIONS`]) and how a starting replica brings the database to
//! the newest one (under an advisory lock, one replica at a time, in one transaction).

use log::{info, warn};
use postgres::Transaction;

use super::{PgStore, Statements, db, held_of, ranges_of, update_device};
use crate::store::Error;

/// Most records migration 9 rebuilds `ferry_records`' primary key over (0.6 s here, well
/// within the statement deadline); a macro, so that the migration's SQL is built from it.
macro_rules! rekey_limit {
    () => {
        1000000
    };
}
pub const REKEY_LIMIT: u64 = rekey_limit!();

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
    // 8: each device's account per minute, and each replica's records per ten seconds
    // (history.rs; `crate::history`).
    "CREATE TABLE ferry_history (
        device_id text NOT NULL,
        minute int8 NOT NULL,
        accepted int8 NOT NULL,
        delivered int8 NOT NULL,
        gaps int8 NOT NULL,
        waiting int8 NOT NULL,
        waiting_max int8 NOT NULL,
        missing int8 NOT NULL,
        backlog_bytes int8,
        PRIMARY KEY (device_id, minute)
    );
    CREATE TABLE ferry_rates (
        instance text NOT NULL,
        slot int8 NOT NULL,
        records int8 NOT NULL,
        PRIMARY KEY (instance, slot)
    );",
    // 9: `ferry_records.device_id` compared byte by byte (`COLLATE "C"`), so that inserting a
    // record does not compare device ids under the database's collation (with ICU, ~20 % of a
    // 100,000-device fleet's steady insert cost: docs/BENCHMARKS.md). Only device ids compare, by
    // equality; no query orders records by them, so only speed changes. The primary key is
    // rebuilt, under a lock that stops every batch: done here only while the table is small
    // enough to rebuild well within the statement deadline; a larger one keeps its collation and
    // every start says so (`check_records_collation`, docs/CENTER-POSTGRES.md).
    concat!(
        "DO $$ BEGIN
            IF (SELECT count(*) FROM (SELECT 1 FROM ferry_records LIMIT ",
        rekey_limit!(),
        " + 1) AS t) <= ",
        rekey_limit!(),
        " THEN
                ALTER TABLE ferry_records ALTER COLUMN device_id TYPE text COLLATE \"C\";
            END IF;
        END $$;"
    ),
];

/// The schema version that added the ledger columns ([`fill_ledger_columns`]).
const LEDGER_COLUMNS: usize = 3;

/// Key of the advisory lock that makes replicas starting at once migrate one at a time.
const MIGRATION_LOCK: i64 = 0x6665_7272_7931; // "ferry1"

impl PgStore {
    /// Brings the schema to the newest version this build knows, one replica at a time.
    pub(super) fn migrate(&self) -> Result<i32, Error> {
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        let mut conn = self.pool.conn()?;
        let mut tx = conn.client.transaction().map_err(db("cannot begin"))?;
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
        check_records_collation(&mut conn.client, self.target())?;
        self.pool.give_back(conn);
        Ok(known)
    }
}

/// Warns when `ferry_records.device_id` is not compared byte by byte: a table too large for
/// migration 9 to rebuild keeps its collation, and every start says so until an operator runs
/// the rebuild (docs/CENTER-POSTGRES.md, "Migrations").
fn check_records_collation(client: &mut postgres::Client, target: &str) -> Result<(), Error> {
    let collation: String = client
        .query_one(
            "SELECT coalesce(c.collname, '') FROM pg_attribute a
             LEFT JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = 'ferry_records'::regclass AND a.attname = 'device_id'",
            &[],
        )
        .map_err(db("cannot read the records' collation"))?
        .get(0);
    if collation != "C" {
        warn!(
            "records keyed under a collation target={target} table=ferry_records \
             column=device_id collation={collation:?}: schema 9 compares device ids byte by \
             byte, but left this table as it was (more than {REKEY_LIMIT} records: rebuilding \
             its primary key stops every batch while it runs). Inserts into a large fleet cost \
             up to a fifth more; docs/CENTER-POSTGRES.md (\"Migrations\") gives the statement \
             to run in a maintenance window"
        );
    }
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
    let mut statements = Statements::default();
    for row in &rows {
        let device_id: &str = row.get(0);
        let delivered = ranges_of(&row.get::<_, Vec<i64>>(1));
        // Every device's gaps are read: the ledger columns being filled are not there to say
        // whether they count.
        update_device(
            tx,
            &mut statements,
            device_id,
            &delivered,
            true,
            held_of(row, 2),
            None,
        )?;
    }
    Ok(rows.len() as u64)
}
