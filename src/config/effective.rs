//! The effective configuration printed as TOML ([`Config::to_masked_toml`]): every key with its
//! effective value, in the file's own syntax, so that the text parses back to the same
//! configuration. Also the form [`super::edit::plan`] compares.

use serde::Serialize;

use super::units::{format_duration, format_size};
use super::{Compression, Config, MASK, ParseRule, Secret, net};
use crate::journal::OnFull;

impl Config {
    /// The effective configuration as TOML, secrets masked.
    ///
    /// Every key is written out with its effective value (defaults filled in, `journal.dir` resolved),
    /// sizes and durations in the file's own syntax. The text parses back with [`Config::parse_str`] to
    /// the same configuration, except that a set password or token reads back as `"****"`.
    pub fn to_masked_toml(&self) -> String {
        self.effective_toml(true)
    }

    /// Like [`Config::to_masked_toml`], with secrets in clear: only for comparing two configurations
    /// ([`super::edit::plan`]), never for printing.
    pub fn to_toml_with_secrets(&self) -> String {
        self.effective_toml(false)
    }

    fn effective_toml(&self, mask: bool) -> String {
        let secret = |s: &Option<Secret>| -> Option<String> {
            s.as_ref().map(|s| {
                if mask {
                    MASK.to_owned()
                } else {
                    s.expose().to_owned()
                }
            })
        };
        let effective = Effective {
            device: EffectiveDevice {
                id: self.device.id.as_deref(),
            },
            mqtt: EffectiveMqtt {
                host: &self.mqtt.host,
                port: self.mqtt.port,
                topics: &self.mqtt.topics,
                client_id: self.mqtt.client_id.as_deref(),
                username: self.mqtt.username.as_deref(),
                password: secret(&self.mqtt.password),
                keep_alive: format_duration(self.mqtt.keep_alive),
                max_packet_size: format_size(self.mqtt.max_packet_size),
                max_backoff: format_duration(self.mqtt.max_backoff),
                parse: &self.mqtt.parse,
            },
            journal: EffectiveJournal {
                dir: self.journal.dir.to_string_lossy().into_owned(),
                max_bytes: format_size(self.journal.max_bytes),
                on_full: self.journal.on_full,
                cache_bytes: format_size(self.journal.cache_bytes),
                replay_window: format_size(self.journal.replay_window),
                commit_wait: format_duration(self.journal.commit_wait),
                max_age: format_duration(self.journal.max_age.unwrap_or_default()),
            },
            uplink: EffectiveUplink {
                url: &self.uplink.url,
                token: secret(&self.uplink.token),
                batch_max_records: self.uplink.batch_max_records,
                batch_max_bytes: format_size(self.uplink.batch_max_bytes),
                compression: self.uplink.compression,
                max_backoff: format_duration(self.uplink.max_backoff),
                connect_timeout: format_duration(self.uplink.connect_timeout),
                request_timeout: format_duration(self.uplink.request_timeout),
                shutdown_grace: format_duration(self.uplink.shutdown_grace),
                max_records_per_sec: self.uplink.max_records_per_sec,
                max_bytes_per_sec: format_size(self.uplink.max_bytes_per_sec),
            },
            control: EffectiveControl {
                listen: self.control.listen.to_string(),
                token: secret(&self.control.token),
            },
            log: EffectiveLog {
                level: &self.log.level,
            },
            console: EffectiveConsole {
                device: self
                    .console
                    .device
                    .as_ref()
                    .map(|d| d.to_string_lossy().into_owned()),
                baud: self.console.baud,
                pin_sha256: secret(&self.console.pin_sha256),
            },
            downlink: self
                .downlink
                .as_ref()
                .map(|d| net::EffectiveDownlink::of(d, secret(&d.token))),
            tls: net::EffectiveTls::of(&self.tls),
            clock: EffectiveClock {
                require_sync: self.clock.require_sync,
                hold: format_duration(self.clock.hold),
            },
            sparkplug: EffectiveSparkplug {
                rebirth: self.sparkplug.rebirth,
                rebirth_period: format_duration(self.sparkplug.rebirth_period),
            },
        };
        // Only strings, integers, enums and arrays of tables: serialization has nothing that can fail,
        // but a printout is not worth a panic if it ever does.
        toml::to_string(&effective)
            .unwrap_or_else(|e| format!("# cannot print the effective configuration: {e}\n"))
    }
}

#[derive(Serialize)]
struct Effective<'a> {
    device: EffectiveDevice<'a>,
    mqtt: EffectiveMqtt<'a>,
    journal: EffectiveJournal,
    uplink: EffectiveUplink<'a>,
    control: EffectiveControl,
    log: EffectiveLog<'a>,
    console: EffectiveConsole,
    #[serde(skip_serializing_if = "Option::is_none")]
    downlink: Option<net::EffectiveDownlink<'a>>,
    tls: net::EffectiveTls,
    clock: EffectiveClock,
    sparkplug: EffectiveSparkplug,
}

#[derive(Serialize)]
struct EffectiveSparkplug {
    rebirth: bool,
    rebirth_period: String,
}

#[derive(Serialize)]
struct EffectiveClock {
    require_sync: bool,
    hold: String,
}

#[derive(Serialize)]
struct EffectiveDevice<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

#[derive(Serialize)]
struct EffectiveMqtt<'a> {
    host: &'a str,
    port: u16,
    topics: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    keep_alive: String,
    max_packet_size: String,
    max_backoff: String,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    parse: &'a [ParseRule],
}

#[derive(Serialize)]
struct EffectiveJournal {
    dir: String,
    max_bytes: String,
    on_full: OnFull,
    cache_bytes: String,
    replay_window: String,
    commit_wait: String,
    max_age: String,
}

#[derive(Serialize)]
struct EffectiveUplink<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    batch_max_records: usize,
    batch_max_bytes: String,
    compression: Compression,
    max_backoff: String,
    connect_timeout: String,
    request_timeout: String,
    shutdown_grace: String,
    max_records_per_sec: u64,
    max_bytes_per_sec: String,
}

#[derive(Serialize)]
struct EffectiveControl {
    listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

#[derive(Serialize)]
struct EffectiveLog<'a> {
    level: &'a str,
}

#[derive(Serialize)]
struct EffectiveConsole {
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    baud: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pin_sha256: Option<String>,
}
