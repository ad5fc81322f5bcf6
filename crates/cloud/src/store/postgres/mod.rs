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
//! - `ferry_records`: `(device_id, seq)` primary key (device ids compared byte by byte, unless
//!   the table was too large for schema 9 to rebuild: [`REKEY_LIMIT`]), the record's JSON line as
//!   the device sent it.
//! - `ferry_gaps`: declared gaps, unique by `(device_id, from_seq, to_seq, reason)`.
//! - `ferry_clashes`: the [`MAX_CLASHES`](super::MAX_CLASHES) most recently clashing seqs per device.
//! - `ferry_commands`, `ferry_downlink`, `ferry_sockets`, `ferry_replicas`: the downlink's
//!   commands, connections and the replicas holding them ([`commands`]).
//! - `ferry_history`: each device's account per minute, a day of it, written by
//!   [`update_device`] in the batch's transaction; `ferry_rates`: each replica's records per ten
//!   seconds, ten minutes of it ([`history`], [`crate::history`]).
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use log::info;
use postgres::config::{Host, SslMode};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Config, Transaction};

use super::{Clash, Error, Outcome, Records, is_listed, is_reserved, note_clashes};
use crate::batch::{self, Batch};
use crate::history::{KEPT_MINUTES, MINUTE_MS};
use crate::ledger::{self, Ledger};
use crate::ranges::RangeSet;
use ferry_protocol::{Gap, GapReason, Held};

pub mod commands;
mod fleet;
mod history;
mod pool;
mod schema;
mod tls;

pub use self::pool::Pool;
use self::pool::{Conn, Statements, describe};
pub use self::schema::{MIGRATIONS, REKEY_LIMIT};

/// Statement, lock and connect deadlines (see the module's "Deadlines").
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest answer of `GET /v1/devices/<id>/records` read from the database.
pub const MAX_RECORDS_READ: u64 = 256 * 1024 * 1024;

/// The store.
pub struct PgStore {
    pool: Arc<Pool>,
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
    /// Its gaps add seqs to the ledger (`ledger_gaps > 0`). When they add none, every gap of the
    /// device lies within its delivered seqs, which only grow: its gaps cannot change the
    /// account, and [`update_device`] need not read them (unless the batch declares new ones).
    gaps_matter: bool,
}

impl PgStore {
    /// Parses the connection string (with `password` when given apart), connects, and creates or
    /// migrates the schema.
    /// With `sslmode=require`, connections are TLS verified against the roots of `ca_file` (or
    /// the Mozilla roots) by [`tls`]; otherwise they are plain (`prefer`, the default, does not
    /// try TLS).
    pub fn open(
        url: &str,
        ca_file: Option<&Path>,
        password: Option<&ferry_util::Secret>,
    ) -> Result<PgStore, Error> {
        let mut config = Config::from_str(url).map_err(|source| Error::Database {
            what: "cannot read the connection string",
            source,
        })?;
        if let Some(password) = password {
            if config.get_password().is_some() {
                return Err(Error::PasswordTwice);
            }
            config.password(password.expose());
        }
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
            .run_conn(|conn| match ingest_in(conn, batch, now_ms)? {
                Ok(outcome) => Ok(outcome),
                Err(clashing) => {
                    // The batch's transaction was rolled back; remember the clash in a new one.
                    note_clash_rows(conn, device_id, &clashing, now_ms)?;
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
        self.pool.run_conn(|conn| {
            let st = &mut conn.statements;
            let mut tx = conn.client.transaction().map_err(db("cannot begin"))?;
            let row = lock_device(&mut tx, st, device_id)?;
            let held = ledger::later(row.held, held);
            update_device(
                &mut tx,
                st,
                device_id,
                &row.delivered,
                row.gaps_matter,
                Some(held),
                Some(Seen {
                    now_ms,
                    accepted: 0,
                }),
            )?;
            tx.commit().map_err(db("cannot commit"))
        })
    }

    /// See [`super::Store::records`]: by seq, at most [`MAX_RECORDS_READ`] bytes.
    pub fn records(&self, device_id: &str, last: Option<u64>) -> Result<Option<Records>, Error> {
        let mut conn = self.pool.conn()?;
        let mut body = Vec::new();
        {
            let limit = last.map_or(i64::MAX, to_i64);
            let mut rows = conn
                .client
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
                    drop(conn);
                    return Err(Error::TooManyToRead {
                        device_id: device_id.to_owned(),
                        limit: MAX_RECORDS_READ,
                    });
                }
                body.extend_from_slice(line.as_bytes());
                body.push(b'\n');
            }
        }
        self.pool.give_back(conn);
        if body.is_empty() {
            return Ok(None);
        }
        let len = body.len() as u64;
        Ok(Some(Records {
            reader: Box::new(Cursor::new(body)),
            len,
        }))
    }
}

/// The device's declared gaps, in the order stored.
fn device_gaps(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    device_id: &str,
) -> Result<Vec<Gap>, Error> {
    st.query(
        tx,
        "cannot read the gaps",
        "SELECT from_seq, to_seq, reason FROM ferry_gaps WHERE device_id = $1 ORDER BY id",
        &[&device_id],
    )?
    .iter()
    .map(|row| gap_of(device_id, row, 0))
    .collect()
}

/// A batch or report that updates a device's row: when (ms since the epoch), and the records it
/// stored.
#[derive(Debug, Clone, Copy)]
struct Seen {
    now_ms: u64,
    accepted: u64,
}

/// The statement that writes a device's row, for [`update_device`] (a macro, so that
/// [`UPDATE_SEEN`] can be built from it at compile time).
macro_rules! update_sql {
    () => {
        "UPDATE ferry_devices SET delivered = $2, records = $3, head_seq = $4,
             acked_seq = $5, oldest_unsent_ts_ms = $6, last_seen_ms = GREATEST(last_seen_ms, $7),
             listed = $8, ledger_delivered = $9, ledger_gaps = $10, ledger_waiting = $11,
             ledger_missing = $12, ledger_balanced = $13, backlog_bytes = $14
         WHERE device_id = $1"
    };
}

/// [`update_sql`] with the device's history point of the minute and the pruning of its old
/// points. Data-modifying CTEs run to completion whether or not the UPDATE reads them.
const UPDATE_SEEN: &str = concat!(
    "WITH point AS (
         INSERT INTO ferry_history
             (device_id, minute, accepted, delivered, gaps, waiting, waiting_max, missing,
              backlog_bytes)
         VALUES ($1, $15, $16, $9, $10, $11, $11, $12, $14)
         ON CONFLICT (device_id, minute) DO UPDATE SET
             accepted = ferry_history.accepted + EXCLUDED.accepted,
             delivered = EXCLUDED.delivered, gaps = EXCLUDED.gaps,
             waiting = EXCLUDED.waiting,
             waiting_max = GREATEST(ferry_history.waiting_max, EXCLUDED.waiting_max),
             missing = EXCLUDED.missing,
             backlog_bytes = EXCLUDED.backlog_bytes
     ), expired AS (
         DELETE FROM ferry_history WHERE device_id = $1 AND minute < $17
     ) ",
    update_sql!()
);

/// Writes a locked device's row: its stored seqs, the gateway's account, and the ledger's counts
/// from those and its gaps (the columns the fleet list filters and sorts by; see the module
/// header). When `seen` (a batch or a report, not a migration), also when it was last seen, and
/// its history's point of this minute (added up with the minute's earlier batches), dropping
/// its points older than [`KEPT_MINUTES`]: all in one statement. `gaps_matter`: the device's gaps
/// may change its account, so they are read (see [`DeviceRow::gaps_matter`]).
fn update_device(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    device_id: &str,
    delivered: &RangeSet,
    gaps_matter: bool,
    held: Option<Held>,
    seen: Option<Seen>,
) -> Result<(), Error> {
    let gaps = if gaps_matter {
        device_gaps(tx, st, device_id)?
    } else {
        Vec::new()
    };
    let ledger = Ledger::account(delivered, &gaps, held);
    let listed = is_listed(delivered, &gaps, held);
    let now_ms = seen.map_or(0, |s| s.now_ms);
    let minute = to_i64(now_ms / MINUTE_MS);
    let accepted = to_i64(seen.map_or(0, |s| s.accepted));
    let kept_from = minute.saturating_sub(to_i64(KEPT_MINUTES) - 1);
    let columns: [&(dyn ToSql + Sync); 14] = [
        &device_id,
        &flat_ranges(delivered),
        &to_i64(delivered.len()),
        &held.map(|h| to_i64(h.head_seq)),
        &held.map(|h| to_i64(h.acked_seq)),
        &held.and_then(|h| h.oldest_unsent_ts_ms).map(to_i64),
        &to_i64(now_ms),
        &listed,
        &to_i64(ledger.delivered),
        &to_i64(ledger.gap_total()),
        &to_i64(ledger.waiting),
        &to_i64(ledger.missing),
        &ledger.balances(),
        &held.and_then(|h| h.backlog_bytes).map(to_i64),
    ];
    const WHAT: &str = "cannot update the device";
    if seen.is_some() {
        let mut params = columns.to_vec();
        params.extend([&minute as &(dyn ToSql + Sync), &accepted, &kept_from]);
        st.execute(tx, WHAT, UPDATE_SEEN, &params)?;
    } else {
        st.execute(tx, WHAT, update_sql!(), &columns)?;
    }
    Ok(())
}

/// The batch's transaction: lock the device, check clashes, insert, update the ledger, commit.
/// `Ok(Err(seqs))`: the batch clashes at `seqs` (ascending, at least one) and was rolled back.
fn ingest_in(
    conn: &mut Conn,
    batch: &Batch,
    now_ms: u64,
) -> Result<Result<Outcome, Vec<u64>>, Error> {
    let device_id = batch.device_id.as_str();
    let st = &mut conn.statements;
    let mut tx = conn.client.transaction().map_err(db("cannot begin"))?;
    let row = lock_device(&mut tx, st, device_id)?;

    // Seqs the device row says are stored: read their lines back and compare content.
    let maybe_stored: Vec<i64> = batch
        .records
        .iter()
        .filter(|r| row.delivered.contains(r.seq))
        .map(|r| to_i64(r.seq))
        .collect();
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    if !maybe_stored.is_empty() {
        for found in st.query(
            &mut tx,
            "cannot read stored records",
            "SELECT seq, line FROM ferry_records WHERE device_id = $1 AND seq = ANY($2)",
            &[&device_id, &maybe_stored],
        )? {
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
        st.execute(
            &mut tx,
            "cannot count the upstream gaps",
            "UPDATE ferry_devices SET upstream_gaps = upstream_gaps + $2 WHERE device_id = $1",
            &[&device_id, &upstream_gaps],
        )?;
    }
    if !seqs.is_empty() {
        insert_records(&mut tx, st, device_id, &seqs, &lines)?;
    }
    let mut new_gaps = 0;
    if !batch.gaps.is_empty() {
        let from: Vec<i64> = batch.gaps.iter().map(|g| to_i64(g.from_seq)).collect();
        let to: Vec<i64> = batch.gaps.iter().map(|g| to_i64(g.to_seq)).collect();
        let reason: Vec<&str> = batch.gaps.iter().map(|g| g.reason.as_str()).collect();
        new_gaps = st.execute(
            &mut tx,
            "cannot insert the gaps",
            "INSERT INTO ferry_gaps (device_id, from_seq, to_seq, reason)
             SELECT $1, f, t, r FROM unnest($2::int8[], $3::int8[], $4::text[])
                 WITH ORDINALITY AS g(f, t, r, n)
             ORDER BY n
             ON CONFLICT DO NOTHING",
            &[&device_id, &from, &to, &reason],
        )?;
    }
    let held = match batch.held {
        Some(new) => Some(ledger::later(row.held, new)),
        None => row.held,
    };
    let accepted = seqs.len() as u64;
    update_device(
        &mut tx,
        st,
        device_id,
        &delivered,
        row.gaps_matter || !batch.gaps.is_empty(),
        held,
        Some(Seen { now_ms, accepted }),
    )?;
    tx.commit().map_err(db("cannot commit the batch"))?;
    Ok(Ok(Outcome {
        accepted,
        duplicates: batch.records.len() as u64 - accepted,
        new_gaps,
    }))
}

/// From this many new records on, a batch's records go in by `COPY`.
const COPY_FROM: usize = 64;

/// Inserts the device's new records: seqs the device row says are not stored. A row there
/// anyway was not written by this store's rules: then nothing is stored and the batch fails
/// with [`Error::Inconsistent`]. Small batches are one `INSERT ... ON CONFLICT DO NOTHING`;
/// from [`COPY_FROM`] records on, a binary `COPY` ([`write_copy_rows`]), which PostgreSQL writes
/// a page of rows at a time (one WAL record per page, not per row) at the cost of a second
/// round trip. `COPY` cannot skip a row already there: the unique violation aborts the
/// transaction.
fn insert_records(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    device_id: &str,
    seqs: &[i64],
    lines: &[&str],
) -> Result<(), Error> {
    let inconsistent = |already: String| Error::Inconsistent {
        device_id: device_id.to_owned(),
        what: format!(
            "{already} of {} new records: already in ferry_records but not in the device's \
             delivered ranges",
            seqs.len()
        ),
    };
    const WHAT: &str = "cannot insert the records";
    if seqs.len() < COPY_FROM {
        let inserted = st.execute(
            tx,
            WHAT,
            "INSERT INTO ferry_records (device_id, seq, line)
             SELECT $1, s, l FROM unnest($2::int8[], $3::text[]) AS t(s, l)
             ON CONFLICT DO NOTHING",
            &[&device_id, &seqs, &lines],
        )?;
        return match seqs.len() as u64 - inserted {
            0 => Ok(()),
            already => Err(inconsistent(already.to_string())),
        };
    }
    let copy = st.get(
        tx,
        WHAT,
        "COPY ferry_records (device_id, seq, line) FROM STDIN (FORMAT binary)",
    )?;
    let mut writer = tx.copy_in(&copy).map_err(db(WHAT))?;
    let copied = match write_copy_rows(&mut writer, device_id, seqs, lines) {
        Ok(()) => writer.finish(),
        Err(CopyFailed::Database(e)) => Err(e),
        Err(CopyFailed::Other(problem)) => {
            // Dropping the writer aborts the COPY, and with it the transaction.
            return Err(Error::CopyRows {
                device_id: device_id.to_owned(),
                problem,
            });
        }
    };
    match copied {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            // `COPY` stops at the first row already there; the server names it (`Key (device_id,
            // seq)=(gw-1, 150) already exists.`).
            let first = e
                .as_db_error()
                .and_then(|d| d.detail())
                .map_or_else(String::new, |detail| {
                    format!(" ({})", detail.trim_end_matches('.'))
                });
            Err(inconsistent(format!("at least 1{first}")))
        }
        Err(e) => Err(db(WHAT)(e)),
    }
}

/// A batch's `COPY` rows go to the server in messages of about this many bytes: a usual batch
/// (a few hundred records, tens of KiB) in one message, so that the server's backend wakes once
/// for it, not once per 4 KiB as `postgres`' row-by-row writer sends them (with a runtime entry
/// per row); a batch of the largest body a device may send goes without a whole second copy of
/// it in memory. Measured: ferry-cloud's CPU 7-13 % lower (docs/BENCHMARKS.md).
const COPY_MESSAGE: usize = 1 << 20;

/// Why [`write_copy_rows`] failed.
enum CopyFailed {
    /// The server or the connection.
    Database(postgres::Error),
    Other(String),
}

/// Writes `(device_id, seq, line)` rows in PostgreSQL's binary `COPY` format (its header, each
/// row as a field count and length-prefixed fields, the trailer) in messages of
/// [`COPY_MESSAGE`] bytes; the caller's `finish` sends the last one.
fn write_copy_rows(
    writer: &mut postgres::CopyInWriter<'_>,
    device_id: &str,
    seqs: &[i64],
    lines: &[&str],
) -> Result<(), CopyFailed> {
    let field_len = |len: usize| {
        i32::try_from(len).map_err(|_| {
            CopyFailed::Other(format!(
                "a field of {len} bytes is longer than a COPY field can be"
            ))
        })
    };
    let id_len = field_len(device_id.len())?.to_be_bytes();
    // The header (19 bytes), each row's field count and three lengths (14) and its fields, the
    // trailer (2).
    let whole = 21 + (lines.iter().map(|l| 14 + device_id.len() + 8 + l.len())).sum::<usize>();
    let mut out = Vec::with_capacity(whole.min(COPY_MESSAGE));
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for (seq, line) in seqs.iter().zip(lines) {
        out.extend_from_slice(&3i16.to_be_bytes());
        out.extend_from_slice(&id_len);
        out.extend_from_slice(device_id.as_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&field_len(line.len())?.to_be_bytes());
        out.extend_from_slice(line.as_bytes());
        if out.len() >= COPY_MESSAGE {
            send_copy(writer, &out)?;
            out.clear();
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    send_copy(writer, &out)
}

/// Hands `bytes` to the writer, which sends what it held before them (a write sends the
/// writer's buffer once it holds over 4 KiB, then buffers the new bytes whole).
fn send_copy(writer: &mut postgres::CopyInWriter<'_>, bytes: &[u8]) -> Result<(), CopyFailed> {
    use std::io::Write as _;
    writer.write_all(bytes).map_err(|e| {
        let text = e.to_string();
        match e
            .into_inner()
            .map(|inner| inner.downcast::<postgres::Error>())
        {
            Some(Ok(db)) => CopyFailed::Database(*db),
            _ => CopyFailed::Other(text),
        }
    })
}

/// Locks the device's row until the transaction ends, creating it first if it has none (one
/// statement for a device already known).
fn lock_device(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    device_id: &str,
) -> Result<DeviceRow, Error> {
    const LOCK: &str = "SELECT delivered, head_seq, acked_seq, oldest_unsent_ts_ms, backlog_bytes,
             ledger_gaps > 0
         FROM ferry_devices WHERE device_id = $1 FOR UPDATE";
    const LOCKING: &str = "cannot lock the device";
    let mut rows = st.query(tx, LOCKING, LOCK, &[&device_id])?;
    if rows.is_empty() {
        // Another transaction adding it at once waits here for the other's commit; then both
        // lock the one row.
        st.execute(
            tx,
            "cannot add the device",
            "INSERT INTO ferry_devices (device_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&device_id],
        )?;
        rows = st.query(tx, LOCKING, LOCK, &[&device_id])?;
    }
    let Some(row) = rows.pop() else {
        return Err(Error::Inconsistent {
            device_id: device_id.to_owned(),
            what: "its row is not there after it was added".to_owned(),
        });
    };
    Ok(DeviceRow {
        delivered: ranges_of(&row.get::<_, Vec<i64>>(0)),
        held: held_of(&row, 1),
        gaps_matter: row.get(5),
    })
}

/// Adds one refusal of each of `seqs` to the device's clashes, keeping the most recent ones.
fn note_clash_rows(
    conn: &mut Conn,
    device_id: &str,
    seqs: &[u64],
    now_ms: u64,
) -> Result<(), Error> {
    if seqs.is_empty() {
        return Ok(());
    }
    let mut tx = conn.client.transaction().map_err(db("cannot begin"))?;
    lock_device(&mut tx, &mut conn.statements, device_id)?;
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

/// A replica's instance number as the tables name it (`ferry_sockets`, `ferry_replicas`,
/// `ferry_rates`).
fn instance_name(instance: u64) -> String {
    format!("{instance:016x}")
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
