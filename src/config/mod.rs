//! Configuration: the TOML file read into raw serde structs, then validated into [`Config`] with real
//! types. Nothing downstream re-parses strings.
//!
//! Two stages: serde reads the file into `Raw*` structs that reject unknown keys and already parse sizes
//! and durations ([`units`]); [`Config::parse_str`] then fills in defaults, checks ranges and formats,
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

pub mod edit;
mod effective;
pub mod live;
mod net;
mod toml_error;
pub mod units;

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

/// A string that never prints itself.
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
pub(crate) const MASK: &str = "****";

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

// ---- stage one: the file as written -------------------------------------------------------------------

// Every key is optional here, so that a missing required key is reported by `validate` with its full
// dotted name rather than by serde with the name of the enclosing table.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a toml document")]
struct RawConfig {
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    uplink: RawUplink,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    console: RawConsole,
    downlink: Option<net::RawDownlink>,
    #[serde(default)]
    tls: net::RawTls,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [device]")]
struct RawDevice {
    id: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [mqtt]")]
struct RawMqtt {
    host: Option<String>,
    // i64, not u16: an out-of-range port gets the same message as every other range check.
    port: Option<i64>,
    topics: Option<Vec<String>>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    keep_alive: Option<HumanDuration>,
    max_packet_size: Option<ByteSize>,
    max_backoff: Option<HumanDuration>,
    #[serde(default)]
    parse: Vec<RawParseRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [[mqtt.parse]]")]
struct RawParseRule {
    filter: String,
    format: PayloadFormat,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [journal]")]
struct RawJournal {
    dir: Option<String>,
    max_bytes: Option<ByteSize>,
    on_full: Option<OnFull>,
    cache_bytes: Option<ByteSize>,
    replay_window: Option<ByteSize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [uplink]")]
struct RawUplink {
    url: Option<String>,
    token: Option<String>,
    batch_max_records: Option<i64>,
    batch_max_bytes: Option<ByteSize>,
    compression: Option<Compression>,
    max_backoff: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    request_timeout: Option<HumanDuration>,
    shutdown_grace: Option<HumanDuration>,
    max_records_per_sec: Option<i64>,
    max_bytes_per_sec: Option<ByteSize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [control]")]
struct RawControl {
    listen: Option<String>,
    token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [log]")]
struct RawLog {
    level: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [console]")]
struct RawConsole {
    device: Option<String>,
    baud: Option<i64>,
    pin_sha256: Option<String>,
}

// ---- stage two: defaults, ranges and formats ----------------------------------------------------------

fn validate(raw: RawConfig, source: &Path) -> Result<Config, String> {
    Ok(Config {
        source: source.to_owned(),
        device: validate_device(raw.device)?,
        mqtt: validate_mqtt(raw.mqtt)?,
        journal: validate_journal(raw.journal, source)?,
        uplink: validate_uplink(raw.uplink)?,
        control: validate_control(raw.control)?,
        log: validate_log(raw.log)?,
        downlink: net::validate_downlink(raw.downlink)?,
        tls: net::validate_tls(raw.tls, source)?,
        console: validate_console(raw.console)?,
    })
}

fn validate_console(raw: RawConsole) -> Result<ConsoleConfig, String> {
    let device = match raw.device {
        None => None,
        Some(d) if d.starts_with('/') && !d.chars().any(char::is_control) => Some(PathBuf::from(d)),
        Some(d) => {
            return Err(format!(
                "console.device = {d:?} is invalid: allowed an absolute device path, e.g. \"/dev/ttyS0\""
            ));
        }
    };
    let baud = raw.baud.unwrap_or(115_200);
    let baud = u32::try_from(baud)
        .ok()
        .filter(|b| CONSOLE_BAUDS.contains(b))
        .ok_or_else(|| format!("console.baud = {baud} is invalid: allowed {CONSOLE_BAUDS:?}"))?;
    let pin_sha256 = match raw.pin_sha256 {
        None => None,
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(Secret(h.to_ascii_lowercase()))
        }
        Some(_) => {
            return Err(
                "console.pin_sha256 is invalid: allowed the SHA-256 of the PIN as 64 hex \
                 digits, e.g. from `printf %s 1234 | sha256sum`"
                    .to_owned(),
            );
        }
    };
    Ok(ConsoleConfig {
        device,
        baud,
        pin_sha256,
    })
}

fn validate_log(raw: RawLog) -> Result<LogConfig, String> {
    let level = raw.level.unwrap_or_else(|| "info".to_owned());
    validate_log_filter(&level).map_err(|e| format!("log.level = {level:?} is invalid: {e}"))?;
    Ok(LogConfig { level })
}

/// Checks an env_logger filter of comma-separated directives `LEVEL` or `TARGET=LEVEL`, where LEVEL is
/// one of off, error, warn, info, debug, trace (env_logger itself would only print a warning for a
/// bad directive and carry on with a filter nobody asked for).
pub fn validate_log_filter(spec: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if spec.len() > 1024 {
        return Err("allowed at most 1024 characters".to_owned());
    }
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l));
    for d in spec.split(',').map(str::trim) {
        let (target, level) = match d.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, d),
        };
        if let Some(t) = target {
            if t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
            {
                return Err(format!(
                    "{d:?} is not a directive: allowed LEVEL or TARGET=LEVEL, e.g. \"info\" or \"warn,ferry::uplink=debug\""
                ));
            }
        }
        if !is_level(level) {
            return Err(format!(
                "{level:?} is not a level: allowed off, error, warn, info, debug, trace"
            ));
        }
    }
    Ok(())
}

fn validate_device(raw: RawDevice) -> Result<DeviceConfig, String> {
    if let Some(id) = &raw.id {
        if !crate::protocol::is_valid_device_id(id) {
            return Err(format!(
                "device.id = {id:?} is invalid: allowed 1 to 64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
    }
    Ok(DeviceConfig { id: raw.id })
}

fn validate_mqtt(raw: RawMqtt) -> Result<MqttConfig, String> {
    let host = raw.host.unwrap_or_else(|| "127.0.0.1".to_owned());
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "mqtt.host = {host:?} is invalid: allowed a non-empty host name or address without spaces"
        ));
    }
    let port = int_in("mqtt.port", raw.port.unwrap_or(1883), 1..=65535)?;

    let topics = raw.topics.ok_or(
        "mqtt.topics is required: the mqtt topic filters to subscribe to, e.g. topics = [\"sensors/#\"]",
    )?;
    if topics.is_empty() {
        return Err(
            "mqtt.topics is empty: list at least one mqtt topic filter, e.g. topics = [\"sensors/#\"]"
                .to_owned(),
        );
    }
    for (i, topic) in topics.iter().enumerate() {
        validate_filter(topic).map_err(|why| {
            format!("mqtt.topics[{i}] = {topic:?} is not a valid mqtt topic filter: {why}")
        })?;
    }

    if let Some(id) = &raw.client_id {
        let chars = id.chars().count();
        if chars == 0 || chars > 128 || id.contains('\0') {
            return Err(format!(
                "mqtt.client_id = {id:?} is invalid: allowed 1 to 128 characters without NUL, \
                 or leave it out for \"ferry-<device id>\""
            ));
        }
    }
    if raw.password.is_some() && raw.username.is_none() {
        return Err(
            "mqtt.password is set but mqtt.username is not: mqtt sends a password only with a username"
                .to_owned(),
        );
    }

    let mut parse = Vec::with_capacity(raw.parse.len());
    for (i, rule) in raw.parse.into_iter().enumerate() {
        validate_filter(&rule.filter).map_err(|why| {
            format!(
                "mqtt.parse[{i}].filter = {:?} is not a valid mqtt topic filter: {why}",
                rule.filter
            )
        })?;
        parse.push(ParseRule {
            filter: rule.filter,
            format: rule.format,
        });
    }

    Ok(MqttConfig {
        host,
        port,
        topics,
        client_id: raw.client_id,
        username: raw.username,
        password: raw.password.map(Secret::new),
        keep_alive: duration_in(
            "mqtt.keep_alive",
            raw.keep_alive,
            Duration::from_secs(30),
            Duration::from_secs(5)..=Duration::from_secs(3600),
        )?,
        max_packet_size: size_in(
            "mqtt.max_packet_size",
            raw.max_packet_size,
            256 * KIB,
            KIB..=256 * MIB,
        )?,
        max_backoff: duration_in(
            "mqtt.max_backoff",
            raw.max_backoff,
            Duration::from_secs(30),
            Duration::from_millis(100)..=Duration::from_secs(3600),
        )?,
        parse,
    })
}

fn validate_journal(raw: RawJournal, source: &Path) -> Result<JournalConfig, String> {
    let dir = raw.dir.ok_or(
        "journal.dir is required: the directory the journal is kept in, e.g. dir = \"/var/lib/ferry\"",
    )?;
    if dir.is_empty() {
        return Err(
            "journal.dir is empty: allowed a directory path, e.g. \"/var/lib/ferry\"".to_owned(),
        );
    }
    // Relative to the config file, not to whatever directory the agent happens to be started from.
    let dir = match source.parent() {
        Some(base) => base.join(dir),
        None => PathBuf::from(dir),
    };
    let max_bytes = size_in("journal.max_bytes", raw.max_bytes, 256 * MIB, MIB..=TIB)?;
    Ok(JournalConfig {
        dir,
        max_bytes,
        on_full: raw.on_full.unwrap_or(OnFull::RejectNew),
        cache_bytes: size_in("journal.cache_bytes", raw.cache_bytes, 16 * MIB, MIB..=GIB)?,
        replay_window: replay_window(raw.replay_window, max_bytes)?,
    })
}

/// `journal.replay_window`: by default 2 % of `max_bytes` (at most 4 MiB); at most a quarter of
/// `max_bytes`, since the window is disk the backlog cannot use.
fn replay_window(value: Option<ByteSize>, max_bytes: u64) -> Result<u64, String> {
    let window = value.map_or(crate::journal::default_replay_window(max_bytes), |v| v.0);
    if window > max_bytes / 4 {
        return Err(format!(
            "journal.replay_window = {} is more than a quarter of journal.max_bytes = {}: the window \
             is disk the backlog cannot use; allowed 0B..={}",
            format_size(window),
            format_size(max_bytes),
            format_size(max_bytes / 4)
        ));
    }
    Ok(window)
}

fn validate_uplink(raw: RawUplink) -> Result<UplinkConfig, String> {
    let url = raw.url.ok_or(
        "uplink.url is required: the http(s) endpoint batches are sent to, \
         e.g. url = \"http://127.0.0.1:8080/v1/ingest\"",
    )?;
    validate_url(&url).map_err(|why| format!("uplink.url = {url:?} is invalid: {why}"))?;

    // An empty token means "no token", so that a template can leave the key in place.
    let token = raw.token.filter(|t| !t.is_empty());
    if let Some(token) = &token {
        // A pasted trailing newline would otherwise surface as a failed request at runtime. The token
        // itself is never echoed.
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(
                "uplink.token contains whitespace or control characters: allowed printable characters only"
                    .to_owned(),
            );
        }
    }

    let millis = Duration::from_millis;
    let secs = Duration::from_secs;
    Ok(UplinkConfig {
        url,
        token: token.map(Secret::new),
        batch_max_records: int_in(
            "uplink.batch_max_records",
            raw.batch_max_records.unwrap_or(500),
            1..=100_000,
        )?,
        batch_max_bytes: size_in(
            "uplink.batch_max_bytes",
            raw.batch_max_bytes,
            512 * KIB,
            KIB..=64 * MIB,
        )?,
        compression: raw.compression.unwrap_or(Compression::Gzip),
        max_backoff: duration_in(
            "uplink.max_backoff",
            raw.max_backoff,
            secs(60),
            millis(10)..=secs(3600),
        )?,
        connect_timeout: duration_in(
            "uplink.connect_timeout",
            raw.connect_timeout,
            secs(10),
            millis(100)..=secs(300),
        )?,
        request_timeout: duration_in(
            "uplink.request_timeout",
            raw.request_timeout,
            secs(30),
            millis(100)..=secs(600),
        )?,
        shutdown_grace: duration_in(
            "uplink.shutdown_grace",
            raw.shutdown_grace,
            secs(5),
            // Shutdown must finish within 10 s: ingest gets 3 s, the in-flight upload the rest.
            secs(0)..=secs(6),
        )?,
        max_records_per_sec: int_in(
            "uplink.max_records_per_sec",
            raw.max_records_per_sec.unwrap_or(0),
            0..=10_000_000,
        )?,
        max_bytes_per_sec: size_in(
            "uplink.max_bytes_per_sec",
            raw.max_bytes_per_sec,
            0,
            0..=GIB,
        )?,
    })
}

fn validate_control(raw: RawControl) -> Result<ControlConfig, String> {
    let listen = match raw.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 9100)),
        Some(text) => text.parse().map_err(|_| {
            format!(
                "control.listen = {text:?} is invalid: allowed an ip address and port, \
                 e.g. \"127.0.0.1:9100\" or \"[::1]:9100\""
            )
        })?,
    };
    // An empty token means "no token", as for uplink.token.
    let token = raw.token.filter(|t| !t.is_empty());
    if let Some(t) = &token {
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(
                "control.token contains whitespace or control characters: allowed printable characters only"
                    .to_owned(),
            );
        }
        if t.len() < 16 {
            return Err(format!(
                "control.token is {} characters long: allowed at least 16 (it guards restart, reload and requeue)",
                t.len()
            ));
        }
    }
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "control.listen = \"{listen}\" is beyond loopback: set control.token too (anyone who \
             can reach the port could otherwise read the status and restart the agent)"
        ));
    }
    Ok(ControlConfig {
        listen,
        token: token.map(Secret::new),
    })
}

/// `http://` or `https://`, a non-empty host, an optional numeric port, no whitespace, no credentials.
fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("allowed only urls starting with http:// or https://")?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a url must not contain whitespace or control characters".to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        // The url is printed in logs and in the effective config; the secret belongs in the token.
        return Err("credentials in the url are not allowed, use uplink.token".to_owned());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or("an ipv6 host lacks its closing ']'")?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or("junk after the ipv6 host")?),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("the url has no host".to_owned());
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !ok {
            return Err(format!("port {port:?} is not a number in 1..=65535"));
        }
    }
    Ok(())
}

fn size_in(
    key: &str,
    value: Option<ByteSize>,
    default: u64,
    allowed: RangeInclusive<u64>,
) -> Result<u64, String> {
    value_in(key, value.map_or(default, |v| v.0), allowed, format_size)
}

fn duration_in(
    key: &str,
    value: Option<HumanDuration>,
    default: Duration,
    allowed: RangeInclusive<Duration>,
) -> Result<Duration, String> {
    value_in(
        key,
        value.map_or(default, |v| v.0),
        allowed,
        format_duration,
    )
}

/// `value` if it is in `allowed`, else a message naming the key and the range, each value written
/// the way the config file writes it.
fn value_in<T: PartialOrd + Copy>(
    key: &str,
    value: T,
    allowed: RangeInclusive<T>,
    show: fn(T) -> String,
) -> Result<T, String> {
    if allowed.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{key} = {} is out of range, allowed {}..={}",
            show(value),
            show(*allowed.start()),
            show(*allowed.end())
        ))
    }
}

/// Checks `value` against `allowed` and converts it; `allowed` must fit in `T`.
fn int_in<T: TryFrom<i64>>(
    key: &str,
    value: i64,
    allowed: RangeInclusive<i64>,
) -> Result<T, String> {
    let out_of_range = || {
        format!(
            "{key} = {value} is out of range, allowed {}..={}",
            allowed.start(),
            allowed.end()
        )
    };
    if !allowed.contains(&value) {
        return Err(out_of_range());
    }
    T::try_from(value).map_err(|_| out_of_range())
}

#[cfg(test)]
mod tests;
