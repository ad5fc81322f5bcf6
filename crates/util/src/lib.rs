//! What every ferry crate shares, and nothing else: an error said on one line
//! ([`error_chain`]), a log rate limit for retry loops ([`Repeats`]), the one pseudo-random
//! generator ([`rng`]), wall-clock milliseconds ([`epoch_ms`]) and the one string that never
//! prints itself ([`Secret`]). No dependencies.

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

/// How a secret shows wherever it is printed: [`Secret`]'s `Debug`, and whatever else masks one
/// (the agent's masked config).
pub const MASK: &str = "****";

/// A string that never prints itself (a password, a token, a pin): its `Debug` is [`MASK`],
/// quoted as a string's would be, and it has no `Display`; [`Secret::expose`] is the one way to
/// its text. The agent's secrets and ferry-cloud's database password are this type.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{MASK:?}")
    }
}

/// `t` in milliseconds since the Unix epoch: 0 before it, `u64::MAX` past what fits.
pub fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_the_mask_alone() {
        let secret = Secret::new("hunter2".to_owned());
        let shown = format!("{secret:?} {:?} {:#?}", Some(&secret), [&secret]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(format!("{secret:?}"), "\"****\"");
        assert_eq!(secret.expose(), "hunter2");
    }
}
