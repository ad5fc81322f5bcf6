//! Who may use the operator endpoints: everything under `/v1/devices` (the fleet, ledgers,
//! records, and the downlink's commands, which change what gateways do) and `/v1/stats`. Devices
//! use `/v1/ingest` and the downlink with the device token (`--token`); `/metrics` (fleet totals)
//! is open to a scraper.
//!
//! `--operators FILE` names the operators, one per line: `NAME TOKEN` (`#` at the start of a line
//! or after a space starts a comment).
//! A request presents `Authorization: Bearer TOKEN`; the name is what the log says sent a
//! command. The device token is never an operator's, so a gateway's token opens no operator
//! endpoint. Without the file the operator endpoints are open, which `ferry-cloud` allows only
//! while it listens on loopback (`main.rs` refuses to start otherwise).

use std::path::Path;

/// Operators and their tokens; empty: the operator endpoints are open (loopback only).
#[derive(Default, Clone)]
pub struct Operators {
    known: Vec<(String, String)>,
}

impl std::fmt::Debug for Operators {
    /// Names only: tokens never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.known.iter().map(|(name, _)| name))
            .finish()
    }
}

/// The shortest token accepted: a guessable token is no credential.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a request was refused an operator endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Wrong,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "authorization: this endpoint needs an operator's bearer token",
            Refusal::Wrong => "authorization: not an operator's token",
        }
    }
}

impl Operators {
    /// Reads `path`; `device_token` is refused as an operator's. Errors name the file and line.
    pub fn load(path: &Path, device_token: Option<&str>) -> Result<Operators, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--operators {}: {e}", path.display()))?;
        Operators::parse(&text, device_token)
            .map_err(|e| format!("--operators {}: {e}", path.display()))
    }

    fn parse(text: &str, device_token: Option<&str>) -> Result<Operators, String> {
        let mut known: Vec<(String, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            // `#` starts a comment at the start of a line or after a space, so that a token may
            // hold one.
            let line = match line.find(" #").or_else(|| line.find("\t#")) {
                Some(at) => &line[..at],
                None => line,
            }
            .trim();
            if line.starts_with('#') {
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let at = i + 1;
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {at}: NAME TOKEN expected"));
            };
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
            {
                return Err(format!(
                    "line {at}: the name may hold A-Z a-z 0-9 . _ - @ only"
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {at}: {name}'s token is shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            if device_token == Some(token) {
                return Err(format!(
                    "line {at}: {name}'s token is the device token (--token); operators need their own"
                ));
            }
            if known.iter().any(|(n, t)| n == name || t == token) {
                return Err(format!("line {at}: {name} or its token is given twice"));
            }
            known.push((name.to_owned(), token.to_owned()));
        }
        if known.is_empty() {
            return Err("no operator in it".into());
        }
        Ok(Operators { known })
    }

    /// Whether the operator endpoints are open (no operator is configured).
    pub fn is_open(&self) -> bool {
        self.known.is_empty()
    }

    /// The operator presenting `authorization` (an `Authorization` header's value): `Ok(None)`
    /// when the endpoints are open, the operator's name when the token is theirs.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Option<&str>, Refusal> {
        if self.is_open() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|v| {
                let (scheme, credentials) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(credentials.trim())
            })
            .ok_or(Refusal::Missing)?;
        // Every token is compared, whole, so the time taken tells nothing of which came close.
        let mut found = None;
        for (name, token) in &self.known {
            if same_bytes(presented.as_bytes(), token.as_bytes()) {
                found = Some(name.as_str());
            }
        }
        found.map(Some).ok_or(Refusal::Wrong)
    }
}

/// Compares without stopping at the first difference, so the time taken does not reveal how much of
/// a guessed token was right.
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_the_line() {
        for (text, says) in [
            ("alice\n", "line 1: NAME TOKEN expected"),
            ("# ops\nalice short\n", "line 2: alice's token is shorter"),
            ("al/ice 0123456789abcdef\n", "line 1: the name may hold"),
            (
                "alice devicetoken-0123456789\n",
                "line 1: alice's token is the device token",
            ),
            (
                "alice 0123456789abcdef\nbob 0123456789abcdef\n",
                "line 2: bob or its token is given twice",
            ),
            ("# nobody\n", "no operator"),
        ] {
            let e = Operators::parse(text, Some("devicetoken-0123456789")).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains(says)),
                "{text:?}: {e:?}"
            );
        }
    }

    #[test]
    fn a_token_may_hold_a_hash_and_comments_follow_a_space() {
        let ops = Operators::parse(
            "# on call\nalice 0123456789abcdef#moreentropy # alice's\n",
            None,
        )
        .unwrap_or_default();
        assert_eq!(
            ops.identify(Some("Bearer 0123456789abcdef#moreentropy")),
            Ok(Some("alice"))
        );
        assert_eq!(
            ops.identify(Some("Bearer 0123456789abcdef")),
            Err(Refusal::Wrong)
        );
    }

    #[test]
    fn tokens_identify_their_operator_and_nothing_else_does() {
        let ops = Operators::parse(
            "alice 0123456789abcdef  # on call\nbob fedcba9876543210\n",
            None,
        )
        .unwrap_or_default();
        assert_eq!(
            ops.identify(Some("Bearer fedcba9876543210")),
            Ok(Some("bob"))
        );
        assert_eq!(
            ops.identify(Some("bearer 0123456789abcdef")),
            Ok(Some("alice"))
        );
        assert_eq!(ops.identify(None), Err(Refusal::Missing));
        assert_eq!(ops.identify(Some("Basic abc")), Err(Refusal::Missing));
        assert_eq!(
            ops.identify(Some("Bearer 0123456789abcdeX")),
            Err(Refusal::Wrong)
        );
        assert_eq!(format!("{ops:?}"), r#"["alice", "bob"]"#);
        assert_eq!(Operators::default().identify(None), Ok(None));
    }
}
