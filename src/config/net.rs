//! The `[downlink]` and `[tls]` sections: raw, validated and effective forms, kept apart from
//! `mod.rs` so that the links' settings read in one place.
//!
//! `[tls]` is shared by the uplink and the downlink: `ca_file` (PEM roots that replace the Mozilla
//! roots), `cert_file` + `key_file` (a client certificate for mTLS). The files are read and parsed
//! here, at load, so that a bad file is a configuration error naming the key and the path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, HumanDuration, format_duration, format_size};
use super::{KIB, MIB, Secret, duration_in, size_in};
use crate::tls::Material;

#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    /// Validated: `ws://` or `wss://`, with a host.
    pub url: String,
    /// `None`: the uplink token.
    pub token: Option<Secret>,
    pub ping_interval: Duration,
    /// No frame from the cloud for this long: the connection is taken as dead and replaced.
    pub dead_after: Duration,
    pub connect_timeout: Duration,
    /// Largest message (and frame) accepted from the cloud.
    pub max_message_size: u64,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The parsed files.
    pub material: Material,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [downlink]")]
pub(super) struct RawDownlink {
    url: Option<String>,
    token: Option<String>,
    ping_interval: Option<HumanDuration>,
    dead_after: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    max_message_size: Option<ByteSize>,
    max_backoff: Option<HumanDuration>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [tls]")]
pub(super) struct RawTls {
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

pub(super) fn validate_downlink(
    raw: Option<RawDownlink>,
) -> Result<Option<DownlinkConfig>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let url = raw.url.ok_or(
        "downlink.url is required in a [downlink] section: the cloud's websocket endpoint, \
         e.g. url = \"ws://127.0.0.1:8080/v1/downlink\" (leave the section out to run uplink-only)",
    )?;
    validate_ws_url(&url).map_err(|why| format!("downlink.url = {url:?} is invalid: {why}"))?;
    let token = raw.token.filter(|t| !t.is_empty());
    if token
        .as_ref()
        .is_some_and(|t| t.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(
            "downlink.token contains whitespace or control characters: allowed printable characters only"
                .to_owned(),
        );
    }
    let secs = Duration::from_secs;
    let millis = Duration::from_millis;
    let ping_interval = duration_in(
        "downlink.ping_interval",
        raw.ping_interval,
        secs(15),
        millis(100)..=secs(3600),
    )?;
    let dead_after = duration_in(
        "downlink.dead_after",
        raw.dead_after,
        secs(45),
        millis(300)..=secs(3 * 3600),
    )?;
    if dead_after <= ping_interval {
        return Err(format!(
            "downlink.dead_after = {} must be longer than downlink.ping_interval = {} (the cloud's pong \
             to a ping is what shows a quiet link is alive)",
            format_duration(dead_after),
            format_duration(ping_interval)
        ));
    }
    Ok(Some(DownlinkConfig {
        url,
        token: token.map(Secret::new),
        ping_interval,
        dead_after,
        connect_timeout: duration_in(
            "downlink.connect_timeout",
            raw.connect_timeout,
            secs(10),
            millis(100)..=secs(300),
        )?,
        max_message_size: size_in(
            "downlink.max_message_size",
            raw.max_message_size,
            256 * KIB,
            KIB..=16 * MIB,
        )?,
        max_backoff: duration_in(
            "downlink.max_backoff",
            raw.max_backoff,
            secs(60),
            millis(10)..=secs(3600),
        )?,
    }))
}

pub(super) fn validate_tls(raw: RawTls, source: &Path) -> Result<TlsConfig, String> {
    // Relative to the config file, like journal.dir.
    let resolve = |key: &str, p: Option<String>| -> Result<Option<PathBuf>, String> {
        match p {
            None => Ok(None),
            Some(p) if p.is_empty() => Err(format!("{key} is empty: allowed a file path")),
            Some(p) => Ok(Some(match source.parent() {
                Some(base) => base.join(p),
                None => PathBuf::from(p),
            })),
        }
    };
    let ca_file = resolve("tls.ca_file", raw.ca_file)?;
    let cert_file = resolve("tls.cert_file", raw.cert_file)?;
    let key_file = resolve("tls.key_file", raw.key_file)?;
    if cert_file.is_some() != key_file.is_some() {
        return Err(
            "tls.cert_file and tls.key_file go together: a client certificate needs its key"
                .to_owned(),
        );
    }
    let material = Material::load(
        ca_file.as_deref(),
        cert_file.as_deref(),
        key_file.as_deref(),
    )
    .map_err(|e| crate::error_chain(&e))?;
    Ok(TlsConfig {
        ca_file,
        cert_file,
        key_file,
        material,
    })
}

/// `ws://` or `wss://`, a host, an optional port, no whitespace, no credentials.
fn validate_ws_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or("allowed only urls starting with ws:// or wss://")?;
    // The authority rules are the uplink's.
    super::validate_url(&format!("http://{rest}"))
}

#[derive(Serialize)]
pub(super) struct EffectiveDownlink<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    ping_interval: String,
    dead_after: String,
    connect_timeout: String,
    max_message_size: String,
    max_backoff: String,
}

impl<'a> EffectiveDownlink<'a> {
    pub(super) fn of(d: &'a DownlinkConfig, token: Option<String>) -> Self {
        EffectiveDownlink {
            url: &d.url,
            token,
            ping_interval: format_duration(d.ping_interval),
            dead_after: format_duration(d.dead_after),
            connect_timeout: format_duration(d.connect_timeout),
            max_message_size: format_size(d.max_message_size),
            max_backoff: format_duration(d.max_backoff),
        }
    }
}

#[derive(Serialize)]
pub(super) struct EffectiveTls {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<String>,
}

impl EffectiveTls {
    pub(super) fn of(t: &TlsConfig) -> Self {
        let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        EffectiveTls {
            ca_file: s(&t.ca_file),
            cert_file: s(&t.cert_file),
            key_file: s(&t.key_file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::path::Path;

    const BASE: &str = "[mqtt]\ntopics = [\"s/#\"]\n[journal]\ndir = \"/tmp/j\"\n[uplink]\nurl = \"http://c/v1/ingest\"\ntoken = \"up\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse_str(
            &format!("{BASE}{extra}"),
            Path::new("/etc/ferry/ferry.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn without_a_downlink_section_the_agent_is_uplink_only() {
        assert!(parse("").unwrap().downlink.is_none());
    }

    #[test]
    fn downlink_defaults_are_the_documented_ones() {
        let d = parse("[downlink]\nurl = \"wss://cloud:443/v1/downlink\"\n")
            .unwrap()
            .downlink
            .unwrap();
        assert_eq!(d.ping_interval, std::time::Duration::from_secs(15));
        assert_eq!(d.dead_after, std::time::Duration::from_secs(45));
        assert_eq!(d.max_message_size, 256 * 1024);
        assert!(d.token.is_none());
    }

    #[test]
    fn downlink_mistakes_name_their_key() {
        let e = parse("[downlink]\nping_interval = \"1s\"\n").unwrap_err();
        assert!(e.contains("downlink.url is required"), "{e}");
        let e = parse("[downlink]\nurl = \"http://c/\"\n").unwrap_err();
        assert!(e.contains("downlink.url") && e.contains("ws://"), "{e}");
        let e =
            parse("[downlink]\nurl = \"ws://c/\"\nping_interval = \"30s\"\ndead_after = \"30s\"\n")
                .unwrap_err();
        assert!(e.contains("downlink.dead_after"), "{e}");
        let e = parse("[downlink]\nurl = \"ws://c/\"\nmax_message_size = \"1GiB\"\n").unwrap_err();
        assert!(e.contains("downlink.max_message_size"), "{e}");
        let e = parse("[downlink]\nurl = \"ws://c/\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let e = parse("[tls]\ncert_file = \"gw.pem\"\n").unwrap_err();
        assert!(e.contains("tls.cert_file and tls.key_file"), "{e}");
    }

    #[test]
    fn the_downlink_token_is_masked_in_the_effective_config() {
        let cfg =
            parse("[downlink]\nurl = \"ws://c/v1/downlink\"\ntoken = \"down-secret\"\n").unwrap();
        let text = cfg.to_masked_toml();
        assert!(!text.contains("down-secret"), "{text}");
        assert!(text.contains("[downlink]"), "{text}");
        let back = Config::parse_str(
            &cfg.to_toml_with_secrets(),
            Path::new("/etc/ferry/ferry.toml"),
        )
        .unwrap();
        assert_eq!(
            back.downlink.unwrap().dead_after,
            cfg.downlink.unwrap().dead_after
        );
    }
}
