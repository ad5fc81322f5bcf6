//! What every ferry crate shares, and nothing else: an error said on one line
//! ([`error_chain`]), a log rate limit for retry loops ([`Repeats`]), the one pseudo-random
//! generator ([`rng`]) and wall-clock milliseconds ([`epoch_ms`]). No dependencies.

mod repeats;
pub mod rng;

pub use repeats::Repeats;

/// An error and its causes on one line (`what: because: because`), for the one place that reports
/// it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// `t` in milliseconds since the Unix epoch: 0 before it, `u64::MAX` past what fits.
pub fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
