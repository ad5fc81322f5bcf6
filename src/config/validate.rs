//! Stage two: defaults, ranges and formats. Every error names the dotted key, says what is wrong
//! and what is allowed.

use super::*;

pub(super) fn validate(raw: RawConfig, source: &Path) -> Result<Config, String> {
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
        clock: validate_clock(raw.clock)?,
        sparkplug: SparkplugConfig {
            rebirth: raw.sparkplug.rebirth.unwrap_or(false),
            rebirth_period: duration_in(
                "sparkplug.rebirth_period",
                raw.sparkplug.rebirth_period,
                Duration::from_secs(60),
                Duration::from_secs(1)..=Duration::from_secs(86_400),
            )?,
        },
    })
}

pub(super) fn validate_clock(raw: RawClock) -> Result<ClockConfig, String> {
    Ok(ClockConfig {
        require_sync: raw.require_sync.unwrap_or(true),
        hold: duration_in(
            "clock.hold",
            raw.hold,
            Duration::from_secs(600),
            Duration::ZERO..=Duration::from_secs(7 * 86_400),
        )?,
    })
}

pub(super) fn validate_console(raw: RawConsole) -> Result<ConsoleConfig, String> {
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
            Some(Secret::new(h.to_ascii_lowercase()))
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

pub(super) fn validate_log(raw: RawLog) -> Result<LogConfig, String> {
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

pub(super) fn validate_device(raw: RawDevice) -> Result<DeviceConfig, String> {
    if let Some(id) = &raw.id {
        if !crate::protocol::is_valid_device_id(id) {
            return Err(format!(
                "device.id = {id:?} is invalid: allowed 1 to 64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
    }
    Ok(DeviceConfig { id: raw.id })
}

pub(super) fn validate_mqtt(raw: RawMqtt) -> Result<MqttConfig, String> {
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

pub(super) fn validate_journal(raw: RawJournal, source: &Path) -> Result<JournalConfig, String> {
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
        commit_wait: duration_in(
            "journal.commit_wait",
            raw.commit_wait,
            Duration::ZERO,
            Duration::ZERO..=Duration::from_secs(1),
        )?,
        max_age: match raw.max_age {
            // "0s" says "off" as plainly as leaving the key out.
            Some(age) if age.0.is_zero() => None,
            age @ Some(_) => Some(duration_in(
                "journal.max_age",
                age,
                Duration::ZERO,
                Duration::from_secs(60)..=Duration::from_secs(3650 * 86_400),
            )?),
            None => None,
        },
    })
}

/// `journal.replay_window`: by default 2 % of `max_bytes` (at most 4 MiB); at most a quarter of
/// `max_bytes`, since the window is disk the backlog cannot use.
pub(super) fn replay_window(value: Option<ByteSize>, max_bytes: u64) -> Result<u64, String> {
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

pub(super) fn validate_uplink(raw: RawUplink) -> Result<UplinkConfig, String> {
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

pub(super) fn validate_control(raw: RawControl) -> Result<ControlConfig, String> {
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
pub(super) fn validate_url(url: &str) -> Result<(), String> {
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

pub(super) fn size_in(
    key: &str,
    value: Option<ByteSize>,
    default: u64,
    allowed: RangeInclusive<u64>,
) -> Result<u64, String> {
    value_in(key, value.map_or(default, |v| v.0), allowed, format_size)
}

pub(super) fn duration_in(
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
pub(super) fn value_in<T: PartialOrd + Copy>(
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
pub(super) fn int_in<T: TryFrom<i64>>(
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
