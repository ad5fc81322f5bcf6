//! Configuration: the TOML file read into raw serde structs, then validated into [`Config`] with real
//! types. Nothing downstream re-parses strings.
//!
//! Two stages: serde reads the file into `Raw*` structs (`raw.rs`) that reject unknown keys and already
//! parse sizes and durations ([`units`]); [`Config::parse_str`] then fills in defaults, checks ranges
//! and formats (`validate.rs`),
//! and resolves a relative `journal.dir` against the config file's directory. Every error names the file
//! and the dotted key (`uplink.batch_max_records`), says what is wrong and what is allowed.
//! [`Config::to_masked_toml`] prints the effective configuration in the same syntax, secrets masked.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use toml_error::describe_toml_error;
use units::{ByteSize, HumanDuration, format_duration, format_size};

use crate::journal::OnFull;
use raw::*;
pub use validate::validate_log_filter;
use validate::*;

pub mod edit;
mod effective;
pub mod live;
mod net;
mod raw;
mod toml_error;
pub mod units;
mod validate;

pub use net::{DownlinkConfig, TlsConfig};

/// Validated configuration of the agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (for messages).
    pub source: PathBuf,
    pub device: DeviceConfig,
    pub mqtt: MqttConfig,
    pub journal: JournalConfig,
    pub uplink: UplinkConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
    pub console: ConsoleConfig,
    /// `None`: no `[downlink]` section, the agent runs uplink-only.
    pub downlink: Option<DownlinkConfig>,
    /// Trust roots and client certificate shared by the uplink and the downlink.
    pub tls: TlsConfig,
    pub clock: ClockConfig,
    pub sparkplug: SparkplugConfig,
}

/// Sparkplug B (`[sparkplug]`, the `sparkplug` module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugConfig {
    /// On an upstream gap, ask the edge node to rebirth (an NCMD `Node Control/Rebirth`).
    pub rebirth: bool,
    /// At most one rebirth request per edge node per this period.
    pub rebirth_period: Duration,
}

/// When the wall clock is trusted (`[clock]`, the `clock` module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockConfig {
    /// Trust the wall clock only once the kernel says it is synchronised (NTP, chrony,
    /// systemd-timesyncd). `false` for a gateway with a battery-backed real-time clock and no
    /// time service: then only a clock earlier than the binary's build is distrusted.
    pub require_sync: bool,
    /// How long the uplink holds back records taken under an untrusted clock of this boot,
    /// waiting to correct their time; after that they are sent flagged `unsynced` (0: never held).
    pub hold: Duration,
}

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// `None`: generated once and stored in the journal directory.
    pub id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub topics: Vec<String>,
    /// `None`: `ferry-<device id>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keep_alive: Duration,
    pub max_packet_size: u64,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
    pub parse: Vec<ParseRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParseRule {
    pub filter: String,
    pub format: PayloadFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    Json,
    Text,
    Raw,
    /// Sparkplug B protobuf (`sparkplug` module): journaled raw, decoded to JSON on upload.
    #[serde(rename = "sparkplug_b")]
    SparkplugB,
    Auto,
}

#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub on_full: OnFull,
    /// sled's page cache (sled's own default is 1 GiB).
    pub cache_bytes: u64,
    /// Acknowledged records kept for the downlink's `replay_from`, in bytes of the log.
    pub replay_window: u64,
    /// How long the writer may wait for more messages before it commits a group (0: commit what
    /// has arrived at once). Fewer, larger commits write less to flash per message, and each
    /// PUBACK comes up to this much later. A broker that enforces `max_inflight_messages` M sends
    /// at most M per commit, so throughput is capped at M per `commit_wait`.
    pub commit_wait: Duration,
    /// Unsent records older than this are replaced by an `expired` gap (`None`: kept however
    /// old, the default).
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Validated: `http://` or `https://`, with a host.
    pub url: String,
    pub token: Option<Secret>,
    pub batch_max_records: usize,
    pub batch_max_bytes: u64,
    pub compression: Compression,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Deadline for one whole request: send body, receive and read the response.
    pub request_timeout: Duration,
    /// How long shutdown waits for an in-flight upload.
    pub shutdown_grace: Duration,
    /// Drain rate limits (0 = unlimited), so a backlog does not flatten the cloud after an outage.
    pub max_records_per_sec: u64,
    pub max_bytes_per_sec: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// The bearer token the control endpoint requires (`control.token`); without one, the agent
    /// generates a token at first start and keeps it in `journal.dir/control-token` (mode 0600),
    /// where the `ferry` CLI on the same machine reads it (`control::token`).
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// An env_logger filter: `info`, or `warn,ferry::uplink=debug`. `FERRY_LOG` overrides it at start.
    pub level: String,
}

/// The serial console (`[console]`): a configuration shell for technicians on a serial line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The serial device the agent serves the shell on; none: no console in the agent.
    pub device: Option<PathBuf>,
    pub baud: u32,
    /// SHA-256 of the access PIN, 64 lowercase hex digits; none: no PIN asked.
    pub pin_sha256: Option<Secret>,
}

/// Line speeds a serial console may use.
pub const CONSOLE_BAUDS: [u32; 8] = [9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600];

/// A string that never prints itself (shared with ferry-cloud).
pub use ferry_util::Secret;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// How a secret is shown wherever it is printed: [`Secret`]'s `Debug`, [`Config::to_masked_toml`],
/// and the edits and plans of [`edit`].
pub(crate) use ferry_util::MASK;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse_str(&text, path)
    }

    /// Validates `text` as the contents of the file `source`, which is used in messages and to resolve a
    /// relative `journal.dir` and `[tls]` files. Reads only the `[tls]` files (to parse them now).
    pub fn parse_str(text: &str, source: &Path) -> Result<Config, Error> {
        let invalid = |message| Error::Invalid {
            path: source.to_owned(),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| invalid(describe_toml_error(text, &e)))?;
        validate(raw, source).map_err(invalid)
    }
}

/// Checks an MQTT topic filter: not empty, no NUL, at most 65535 bytes, `+` only as a whole level and
/// `#` only as the whole last level. The error says what is wrong, without repeating the filter.
pub fn validate_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("a filter must not be empty".to_owned());
    }
    if f.contains('\0') {
        return Err("a filter must not contain NUL".to_owned());
    }
    if f.len() > usize::from(u16::MAX) {
        return Err(format!(
            "a filter is at most {} bytes, this one has {}",
            u16::MAX,
            f.len()
        ));
    }
    let levels = f.split('/').count();
    for (i, level) in f.split('/').enumerate() {
        if level.contains('#') && (level != "#" || i + 1 != levels) {
            return Err("'#' is allowed only as the whole last level, as in \"a/#\"".to_owned());
        }
        if level.contains('+') && level != "+" {
            return Err("'+' is allowed only as a whole level, as in \"a/+/c\"".to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
