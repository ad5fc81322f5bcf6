//! How the uplink's HTTP agent finds the cloud's addresses: through [`dns::Lookups`], the lookup
//! policy it shares with the downlink, instead of ureq's own resolver. ureq resolves the host
//! before each request, even one that goes out on a pooled connection, and with a deadline set it
//! does so on a new thread each time: one thread and, on a gateway, one DNS query over the
//! cellular link per upload.
//!
//! Uses ureq's `unversioned` resolver API, which may change in a patch release of ureq
//! (`Cargo.lock` pins the version; a change shows as a build error here, nowhere else).

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

use crate::dns;

pub use crate::dns::KEEP;

/// ureq keeps at most this many addresses of a name.
const MAX_ADDRS: usize = 16;
/// The longest a lookup may take if ureq were ever to pass no deadline.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct CachingResolver {
    lookups: dns::Lookups,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let (Some(host), Some(port)) = (uri.host(), port) else {
            return Err(ureq::Error::BadUri(format!("{uri}: no host or port")));
        };
        // ureq passes what is left of the request's deadline (`uplink.request_timeout`); never
        // wait forever if it were ever to pass none.
        let deadline = (*timeout.after).min(MAX_WAIT);
        let found = self.lookups.resolve(host, port, deadline)?;
        let mut addrs = self.empty();
        for addr in found.into_iter().take(MAX_ADDRS) {
            addrs.push(addr);
        }
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
