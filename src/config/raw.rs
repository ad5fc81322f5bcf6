//! Stage one: the file as written, read by serde into `Raw*` structs that reject unknown keys and
//! already parse sizes and durations.

use super::*;

// Every key is optional here, so that a missing required key is reported by `validate` with its full
// dotted name rather than by serde with the name of the enclosing table.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a toml document")]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) device: RawDevice,
    #[serde(default)]
    pub(super) mqtt: RawMqtt,
    #[serde(default)]
    pub(super) journal: RawJournal,
    #[serde(default)]
    pub(super) uplink: RawUplink,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) console: RawConsole,
    pub(super) downlink: Option<net::RawDownlink>,
    #[serde(default)]
    pub(super) tls: net::RawTls,
    #[serde(default)]
    pub(super) clock: RawClock,
    #[serde(default)]
    pub(super) sparkplug: RawSparkplug,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [sparkplug]")]
pub(super) struct RawSparkplug {
    pub(super) rebirth: Option<bool>,
    pub(super) rebirth_period: Option<HumanDuration>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [clock]")]
pub(super) struct RawClock {
    pub(super) require_sync: Option<bool>,
    pub(super) hold: Option<HumanDuration>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [device]")]
pub(super) struct RawDevice {
    pub(super) id: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [mqtt]")]
pub(super) struct RawMqtt {
    pub(super) host: Option<String>,
    // i64, not u16: an out-of-range port gets the same message as every other range check.
    pub(super) port: Option<i64>,
    pub(super) topics: Option<Vec<String>>,
    pub(super) client_id: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) keep_alive: Option<HumanDuration>,
    pub(super) max_packet_size: Option<ByteSize>,
    pub(super) max_backoff: Option<HumanDuration>,
    #[serde(default)]
    pub(super) parse: Vec<RawParseRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [[mqtt.parse]]")]
pub(super) struct RawParseRule {
    pub(super) filter: String,
    pub(super) format: PayloadFormat,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [journal]")]
pub(super) struct RawJournal {
    pub(super) dir: Option<String>,
    pub(super) max_bytes: Option<ByteSize>,
    pub(super) on_full: Option<OnFull>,
    pub(super) cache_bytes: Option<ByteSize>,
    pub(super) replay_window: Option<ByteSize>,
    pub(super) commit_wait: Option<HumanDuration>,
    pub(super) max_age: Option<HumanDuration>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [uplink]")]
pub(super) struct RawUplink {
    pub(super) url: Option<String>,
    pub(super) token: Option<String>,
    pub(super) batch_max_records: Option<i64>,
    pub(super) batch_max_bytes: Option<ByteSize>,
    pub(super) compression: Option<Compression>,
    pub(super) max_backoff: Option<HumanDuration>,
    pub(super) connect_timeout: Option<HumanDuration>,
    pub(super) request_timeout: Option<HumanDuration>,
    pub(super) shutdown_grace: Option<HumanDuration>,
    pub(super) max_records_per_sec: Option<i64>,
    pub(super) max_bytes_per_sec: Option<ByteSize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [control]")]
pub(super) struct RawControl {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [log]")]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, as in [console]")]
pub(super) struct RawConsole {
    pub(super) device: Option<String>,
    pub(super) baud: Option<i64>,
    pub(super) pin_sha256: Option<String>,
}
