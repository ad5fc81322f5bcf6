//! Connections to the database: one pooled per thread using one at a time, made with the
//! deadlines of the store's connection settings, and run again once on a fresh connection when
//! a pooled one turns out broken.

use std::sync::{Mutex, MutexGuard, PoisonError};

use log::debug;
use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::tls;
use crate::store::Error;

/// Connections to the database, pooled (one per thread that is using one at a time); shared by
/// the store and the downlink's commands ([`super::commands`]).
pub struct Pool {
    pub(super) config: Config,
    /// Where the database is, for logs and errors (no password).
    pub(super) target: String,
    /// With `sslmode=require`: how connections are made TLS.
    pub(super) tls: Option<tls::RustlsConnect>,
    pub(super) idle: Mutex<Vec<Client>>,
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
