//! How the uplink's HTTP agent finds the cloud's addresses: ureq's own resolver, but not for
//! every request. ureq resolves the host before each request, even one that goes out on a pooled
//! connection, and with a deadline set it does so on a new thread each time: one thread and, on a
//! gateway, one DNS query over the cellular link per upload. Here an IP address in the URL is
//! taken as it is, and a name's addresses are kept for [`KEEP`].
//!
//! Uses ureq's `unversioned` resolver API, which may change in a patch release of ureq
//! (`Cargo.lock` pins the version; a change shows as a build error here, nowhere else).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a name's addresses are reused: about as long as an idle pooled connection is kept,
/// so that a DNS change is seen within half a minute.
pub const KEEP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct CachingResolver {
    inner: DefaultResolver,
    /// The last name resolved (`host:port`), when, and its addresses.
    last: Mutex<Option<(String, Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'));
        let (Some(host), Some(port)) = (host, port) else {
            return self.inner.resolve(uri, config, timeout);
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            let mut addrs = self.empty();
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, at, addrs)) = last.as_ref() {
            if *k == key && now.saturating_duration_since(*at) < KEEP {
                return Ok(addrs.clone());
            }
        }
        // Not under the lock: a lookup can take up to its deadline.
        drop(last);
        let addrs = self.inner.resolve(uri, config, timeout)?;
        last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((key, now, addrs.clone()));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_address_is_taken_as_it_is() {
        let config = Config::default();
        let r = CachingResolver::default();
        let uri: Uri = "http://127.0.0.1:8080/v1/ingest".parse().unwrap();
        let timeout = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::NotHappening,
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let addrs = r.resolve(&uri, &config, timeout).unwrap();
        assert_eq!(&addrs[..], &["127.0.0.1:8080".parse().unwrap()]);
        let uri: Uri = "https://[::1]/x".parse().unwrap();
        let addrs = r.resolve(&uri, &config, timeout).unwrap();
        assert_eq!(&addrs[..], &["[::1]:443".parse().unwrap()]);
    }
}
