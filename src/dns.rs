//! Name lookups with a deadline: the one policy of the uplink (its HTTP agent's resolver) and the
//! downlink (its WebSocket). getaddrinfo has no deadline of its own, so a name is looked up on a
//! short-lived named thread (`dns`) and callers wait at most their own timeout; a lookup that
//! outlives it is left to finish (or hang) there alone, and the caller goes on to its backoff and
//! sees shutdown.
//!
//! Each [`Lookups`] runs one lookup at a time, so that a reconnect loop cannot leave one more hung
//! thread behind on every attempt, and keeps a name's addresses for [`KEEP`]: on a gateway every
//! lookup is a DNS query over the cellular link. A caller that finds a lookup in flight does not
//! fail: it gets the name's addresses from before if it has them (expired, but the best known),
//! else it waits for that lookup's answer within its deadline. An answer that comes after every
//! caller gave up is still kept. An IP address is taken as it is.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a name's addresses are reused: about as long as an idle pooled connection is kept,
/// so that a DNS change is seen within half a minute.
pub const KEEP: Duration = Duration::from_secs(30);

/// The lookups of one client (the uplink's, the downlink's). Cheap to share between its threads.
#[derive(Debug, Default)]
pub struct Lookups {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a lookup ends.
    ended: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The name (`host:port`) being looked up now, if any.
    in_flight: Option<String>,
    /// Lookups ended so far: a waiter knows a new answer by it.
    ended: u64,
    /// Callers waiting for the lookup in flight now.
    waiting: usize,
    /// What is known of each name asked, oldest first.
    names: Vec<Known>,
}

/// What the lookups of one name found: its last addresses, and its last failure.
#[derive(Debug)]
struct Known {
    key: String,
    addrs: Option<(Instant, Vec<SocketAddr>)>,
    failed: Option<(Instant, String)>,
}

/// Names a client keeps answers for, at most (a client talks to one or two).
const MAX_NAMES: usize = 8;
/// After a failed lookup of a name, callers get that failure (or the name's older addresses)
/// for this long instead of asking again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl State {
    fn known(&self, key: &str) -> Option<&Known> {
        self.names.iter().find(|k| k.key == key)
    }

    fn record(&mut self, key: String, at: Instant, found: Result<Vec<SocketAddr>, String>) {
        let i = match self.names.iter().position(|k| k.key == key) {
            Some(i) => i,
            None => {
                if self.names.len() >= MAX_NAMES {
                    drop(self.names.remove(0));
                }
                self.names.push(Known {
                    key,
                    addrs: None,
                    failed: None,
                });
                self.names.len() - 1
            }
        };
        match found {
            Ok(addrs) => {
                self.names[i].addrs = Some((at, addrs));
                self.names[i].failed = None;
            }
            Err(why) => self.names[i].failed = Some((at, why)),
        }
    }
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
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if let Some(k) = st.known(&key) {
                let stale = k.addrs.as_ref().map(|(_, a)| a.clone());
                if let Some((at, addrs)) = &k.addrs {
                    if now.saturating_duration_since(*at) < KEEP {
                        return Ok(addrs.clone());
                    }
                }
                // Just failed: the older addresses if any, else the failure; no new query yet.
                if let Some((at, why)) = &k.failed {
                    if now.saturating_duration_since(*at) < RETRY_AFTER_FAILURE {
                        return stale
                            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, why.clone()));
                    }
                }
                // Expired, and a lookup is on its way: the best known addresses now.
                if let (Some(addrs), Some(_)) = (stale, &st.in_flight) {
                    return Ok(addrs);
                }
            }
            if st.in_flight.is_none() {
                st.in_flight = Some(key.clone());
                if let Err(e) = self.spawn(host, port, key.clone()) {
                    st.in_flight = None;
                    return Err(e);
                }
            }
            // Wait for the lookup in flight (this name's or another's) to end.
            let seen = st.ended;
            while st.ended == seen {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("name lookup of {host} took longer than {timeout:?}"),
                    ));
                }
                st.waiting += 1;
                st = self
                    .shared
                    .ended
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.waiting -= 1;
            }
        }
    }

    /// Starts the lookup of `key` on its own thread; it records the answer and wakes the waiters.
    /// Called with the state locked: the thread takes the lock once the caller waits.
    fn spawn(&self, host: &str, port: u16, key: String) -> io::Result<()> {
        let (name, shared) = (host.to_owned(), Arc::clone(&self.shared));
        let started = std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || {
                let found: Result<Vec<SocketAddr>, String> =
                    match (name.as_str(), port).to_socket_addrs() {
                        Ok(a) => {
                            let a: Vec<SocketAddr> = a.collect();
                            if a.is_empty() {
                                Err(format!("{name} has no address"))
                            } else {
                                Ok(a)
                            }
                        }
                        Err(e) => Err(format!("cannot resolve {name}: {e}")),
                    };
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.record(key, Instant::now(), found);
                st.in_flight = None;
                st.ended += 1;
                drop(st);
                shared.ended.notify_all();
            });
        started.map(drop)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
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
    fn a_caller_that_finds_a_lookup_in_flight_gets_the_known_addresses_or_waits() {
        let (l, t) = (Lookups::default(), Duration::from_secs(5));
        let first = l.resolve("localhost", 80, t).unwrap();
        // The kept answer expires while another lookup is in flight: the known addresses, at once.
        {
            let mut st = l.lock();
            if let Some((at, _)) = st.names[0].addrs.as_mut() {
                *at -= KEEP;
            }
            st.in_flight = Some("elsewhere:1".into());
        }
        assert_eq!(l.resolve("localhost", 80, t).unwrap(), first);
        // A name never looked up waits for the lookup in flight, and then within its deadline:
        // that lookup never ends here, so the deadline says so.
        let e = l
            .resolve("localhost", 81, Duration::from_millis(100))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // Once it ends, the next caller looks its own name up.
        {
            let mut st = l.lock();
            st.in_flight = None;
            st.ended += 1;
        }
        assert!(!l.resolve("localhost", 81, t).unwrap().is_empty());
    }

    #[test]
    fn a_caller_that_finds_its_name_in_flight_waits_for_that_answer() {
        let l = Arc::new(Lookups::default());
        l.lock().in_flight = Some("localhost:80".into());
        let waiter = {
            let l = Arc::clone(&l);
            std::thread::spawn(move || l.resolve("localhost", 80, Duration::from_secs(10)))
        };
        let end = Instant::now() + Duration::from_secs(10);
        while l.lock().waiting == 0 {
            assert!(Instant::now() < end, "the caller never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The lookup in flight ends, as its thread would, with an address only it could know.
        let only_that: SocketAddr = "192.0.2.1:80".parse().unwrap();
        {
            let mut st = l.lock();
            st.record("localhost:80".into(), Instant::now(), Ok(vec![only_that]));
            st.in_flight = None;
            st.ended += 1;
        }
        l.shared.ended.notify_all();
        assert_eq!(waiter.join().unwrap().unwrap(), [only_that]);
    }

    #[test]
    fn a_failed_lookup_is_not_asked_again_at_once_and_older_addresses_stay() {
        let (l, t) = (Lookups::default(), Duration::from_secs(5));
        let e = l.resolve("no-such-host.invalid", 80, t).unwrap_err();
        // Within the second after the failure, the same answer without a new query.
        let ended = l.lock().ended;
        let again = l.resolve("no-such-host.invalid", 80, t).unwrap_err();
        assert_eq!(l.lock().ended, ended, "no new lookup");
        assert_eq!(again.to_string(), e.to_string());
        // A name whose addresses expired and whose new lookup failed keeps its addresses.
        let first = l.resolve("localhost", 80, t).unwrap();
        {
            let mut st = l.lock();
            let k = st
                .names
                .iter_mut()
                .find(|k| k.key == "localhost:80")
                .unwrap();
            if let Some((at, _)) = k.addrs.as_mut() {
                *at -= KEEP;
            }
            k.failed = Some((Instant::now(), "down".into()));
        }
        assert_eq!(l.resolve("localhost", 80, t).unwrap(), first);
    }
}
