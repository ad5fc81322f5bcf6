//! Connections to the database: one pooled per thread using one at a time, made with the
//! deadlines of the store's connection settings, and run again once on a fresh connection when
//! a pooled one turns out broken. Each pooled connection keeps the statements prepared on it
//! ([`Statements`]), so that a batch's statements are parsed and planned once per connection,
//! not once per use (each costs a round trip to the server).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use log::debug;
use postgres::config::Host;
use postgres::types::ToSql;
use postgres::{Client, Config, GenericClient, NoTls, Row, Statement};

use super::{db, tls};
use crate::store::Error;

/// Connections to the database, pooled (one per thread that is using one at a time); shared by
/// the store and the downlink's commands ([`super::commands`]).
pub struct Pool {
    pub(super) config: Config,
    /// Where the database is, for logs and errors (no password).
    pub(super) target: String,
    /// With `sslmode=require`: how connections are made TLS.
    pub(super) tls: Option<tls::RustlsConnect>,
    pub(super) idle: Mutex<Vec<Conn>>,
}

/// A pooled connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    pub statements: Statements,
}

/// Statements prepared on one connection, by their SQL. A prepared statement belongs to the
/// session, not to the transaction it was prepared in, so it outlives a rollback. After any
/// database error the connection's statements are forgotten ([`Pool::run_conn`]): a statement
/// planned before another replica migrated the schema must not be used after it.
#[derive(Default)]
pub struct Statements(HashMap<&'static str, Statement>);

impl Statements {
    /// The statement for `sql`, prepared on `client`'s connection the first time it is asked for;
    /// a failure is the database error `what`.
    pub fn get(
        &mut self,
        client: &mut impl GenericClient,
        what: &'static str,
        sql: &'static str,
    ) -> Result<Statement, Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql).map_err(db(what))?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs `sql` (prepared once) with `params`: the rows it changed. A failure is `what`.
    pub fn execute(
        &mut self,
        client: &mut impl GenericClient,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let statement = self.get(client, what, sql)?;
        client.execute(&statement, params).map_err(db(what))
    }

    /// Runs `sql` (prepared once) with `params`: the rows it answered. A failure is `what`.
    pub fn query(
        &mut self,
        client: &mut impl GenericClient,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.get(client, what, sql)?;
        client.query(&statement, params).map_err(db(what))
    }
}

impl Pool {
    /// An idle pooled connection, or a new one; [`Pool::give_back`] returns it with the
    /// statements prepared on it.
    pub fn conn(&self) -> Result<Conn, Error> {
        self.take().map(|(conn, _)| conn)
    }

    /// An idle pooled connection (`true`), or a new one (`false`).
    fn take(&self) -> Result<(Conn, bool), Error> {
        loop {
            let idle = lock(&self.idle).pop();
            match idle {
                Some(conn) if conn.client.is_closed() => {}
                Some(conn) => return Ok((conn, true)),
                None => return Ok((self.connect()?, false)),
            }
        }
    }

    fn connect(&self) -> Result<Conn, Error> {
        // The callers say the error (each at its own rate); this is for a closer look.
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        let client = connected.map_err(|source| {
            debug!(
                "cannot connect to the database target={} error={}",
                self.target,
                ferry_util::error_chain(&source)
            );
            Error::Database {
                what: "cannot connect",
                source,
            }
        })?;
        Ok(Conn {
            client,
            statements: Statements::default(),
        })
    }

    /// Runs `f` on a pooled connection. A pooled connection can have been broken while idle (the
    /// database restarted): when `f` fails on one found closed, it runs once more on a new
    /// connection. So `f` must be safe to run twice (each of its transactions commits whole
    /// or not at all, and running it again after a commit changes nothing).
    pub fn run<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T, Error>) -> Result<T, Error> {
        self.run_conn(|conn| f(&mut conn.client))
    }

    /// [`Pool::run`] with the connection's prepared statements.
    pub fn run_conn<T>(
        &self,
        mut f: impl FnMut(&mut Conn) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (mut conn, pooled) = self.take()?;
        let mut result = f(&mut conn);
        if pooled && conn.client.is_closed() && matches!(result, Err(Error::Database { .. })) {
            debug!("a pooled connection was broken; running again on a new one");
            conn = self.connect()?;
            result = f(&mut conn);
        }
        if matches!(result, Err(Error::Database { .. })) {
            conn.statements = Statements::default();
        }
        self.give_back(conn);
        result
    }

    /// Returns a connection to the pool after a use that ended cleanly (an error that broke the
    /// connection leaves it closed, and it is dropped at the next take).
    pub fn give_back(&self, conn: Conn) {
        lock(&self.idle).push(conn);
    }
}
/// `user@host:port/dbname`: where the database is, without the password.
pub(super) fn describe(config: &Config) -> String {
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
