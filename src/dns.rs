//! Name lookups with a deadline: the one policy of the uplink (its HTTP agent's resolver) and the
//! downlink (its WebSocket). getaddrinfo has no deadline of its own, so a name is looked up on a
//! short-lived named thread (`dns`) and the caller waits at most its timeout; a lookup that
//! outlives it is left to finish (or hang) there alone, and the caller goes on to its backoff and
//! sees shutdown. Each [`Lookups`] runs one lookup at a time, so that a reconnect loop cannot
//! leave one more hung thread behind on every attempt, and keeps a name's addresses for [`KEEP`]:
//! on a gateway every lookup is a DNS query over the cellular link. An IP address is taken as it
//! is.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a name's addresses are reused: about as long as an idle pooled connection is kept,
/// so that a DNS change is seen within half a minute.
pub const KEEP: Duration = Duration::from_secs(30);

/// The lookups of one client (the uplink's, the downlink's): one in flight, the last answer kept.
#[derive(Debug, Default)]
pub struct Lookups {
    in_flight: Arc<AtomicBool>,
    /// The last name looked up (`host:port`), when, and its addresses.
    last: Mutex<Option<(String, Instant, Vec<SocketAddr>)>>,
}

impl Lookups {
    /// The addresses of `host` (a name, or an IP address, with or without brackets) at `port`,
    /// within `timeout`.
    pub fn resolve(&self, host: &str, port: u16, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = format!("{host}:{port}");
        let now = Instant::now();
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((k, at, addrs)) = last.as_ref() {
                if *k == key && now.saturating_duration_since(*at) < KEEP {
                    return Ok(addrs.clone());
                }
            }
        }
        let addrs = self.look_up(host, port, timeout)?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, now, addrs.clone()));
        Ok(addrs)
    }

    fn look_up(&self, host: &str, port: u16, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
        if self.in_flight.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "an earlier name lookup has not finished yet",
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (name, in_flight) = (host.to_owned(), Arc::clone(&self.in_flight));
        let spawned = std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || {
                let found = (name.as_str(), port).to_socket_addrs().map(|a| a.collect());
                in_flight.store(false, Ordering::SeqCst);
                let _ = tx.send(found);
            });
        if let Err(e) = spawned {
            self.in_flight.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let found: io::Result<Vec<SocketAddr>> = rx.recv_timeout(timeout).unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("name lookup took longer than {timeout:?}"),
            ))
        });
        match found {
            Ok(addrs) if addrs.is_empty() => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            )),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_within_the_deadline_and_failures_say_so() {
        let (l, t) = (Lookups::default(), Duration::from_secs(5));
        assert_eq!(
            l.resolve("127.0.0.1", 8080, t).unwrap(),
            [SocketAddr::from(([127, 0, 0, 1], 8080))]
        );
        assert_eq!(
            l.resolve("[::1]", 443, t).unwrap(),
            ["[::1]:443".parse::<SocketAddr>().unwrap()]
        );
        assert!(!l.resolve("localhost", 80, t).unwrap().is_empty());
        assert!(l.resolve("no-such-host.invalid", 80, t).is_err());
    }

    #[test]
    fn a_name_is_kept_and_a_second_lookup_waits_for_none() {
        let (l, t) = (Lookups::default(), Duration::from_secs(5));
        let first = l.resolve("localhost", 80, t).unwrap();
        // A lookup still in flight makes a new one fail at once, but a kept name needs none.
        l.in_flight.store(true, Ordering::SeqCst);
        assert_eq!(l.resolve("localhost", 80, t).unwrap(), first);
        let busy = l.resolve("localhost", 81, t).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock, "{busy}");
    }
}
