//! Unit tests of the config loader: every kind of mistake names its key and file.
//!
//! Why one file of this length: the configuration's error messages, one test per key or rule,
//! sharing the helpers at the top.
use super::*;

const SOURCE: &str = "/etc/ferry/ferry.toml";

const FULL: &str = r#"
[device]
id = "gw-01"

[mqtt]
host = "broker.local"
port = 8883
topics = ["sensors/#", "plant/+/status"]
client_id = "ferry-test"
username = "agent"
password = "hunter2"
keep_alive = "45s"
max_packet_size = "1MiB"
max_backoff = "2m"

[[mqtt.parse]]
filter = "sensors/#"
format = "json"

[[mqtt.parse]]
filter = "plant/+/status"
format = "text"

[journal]
dir = "/var/lib/ferry"
max_bytes = "2GiB"
on_full = "drop_oldest"
cache_bytes = 8388608
replay_window = 0

[uplink]
url = "https://cloud.example.com:8443/v1/ingest"
token = "s3cr3t-token"
batch_max_records = 1000
batch_max_bytes = "1 MiB"
compression = "none"
max_backoff = "5m"
connect_timeout = "250ms"
request_timeout = "1m"
shutdown_grace = "0s"

[control]
listen = "[::1]:9200"
"#;

fn parse(text: &str) -> Config {
    match Config::parse_str(text, Path::new(SOURCE)) {
        Ok(config) => config,
        Err(e) => panic!("rejected: {e}\n{text}"),
    }
}

fn error(text: &str) -> String {
    match Config::parse_str(text, Path::new(SOURCE)) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// The minimal valid file with `line` added to (or replacing the same key in) `section`.
fn with(section: &str, line: &str) -> String {
    edit(
        section,
        line.split('=').next().unwrap_or_default().trim(),
        Some(line),
    )
}

/// The minimal valid file without `key` in `section`.
fn without(section: &str, key: &str) -> String {
    edit(section, key, None)
}

fn edit(section: &str, key: &str, line: Option<&str>) -> String {
    let mut sections = vec![
        ("device", vec![]),
        ("mqtt", vec![r#"topics = ["sensors/#"]"#]),
        ("journal", vec![r#"dir = "/var/lib/ferry""#]),
        ("uplink", vec![r#"url = "http://127.0.0.1:8080/v1/ingest""#]),
        ("control", vec![]),
        ("clock", vec![]),
    ];
    let mut text = String::new();
    for (name, lines) in &mut sections {
        if *name == section {
            lines.retain(|l| !l.starts_with(&format!("{key} ")));
            lines.extend(line);
        }
        text.push_str(&format!("[{name}]\n"));
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
    }
    text
}

fn assert_names(message: &str, needles: &[&str]) {
    assert!(message.contains(SOURCE), "no file in: {message}");
    for needle in needles {
        assert!(message.contains(needle), "no {needle:?} in: {message}");
    }
}

#[test]
fn drain_limits_default_to_unlimited_and_accept_sizes() {
    let c = parse(&with("uplink", "max_bytes_per_sec = \"1MiB\""));
    assert_eq!(c.uplink.max_records_per_sec, 0);
    assert_eq!(c.uplink.max_bytes_per_sec, 1 << 20);
    let err = error(&with("uplink", "max_records_per_sec = -1"));
    assert_names(&err, &["uplink.max_records_per_sec"]);
}

#[test]
fn a_full_config_sets_every_key() {
    let c = parse(FULL);
    assert_eq!(c.source, Path::new(SOURCE));
    assert_eq!(c.device.id.as_deref(), Some("gw-01"));

    assert_eq!(c.mqtt.host, "broker.local");
    assert_eq!(c.mqtt.port, 8883);
    assert_eq!(c.mqtt.topics, ["sensors/#", "plant/+/status"]);
    assert_eq!(c.mqtt.client_id.as_deref(), Some("ferry-test"));
    assert_eq!(c.mqtt.username.as_deref(), Some("agent"));
    assert_eq!(
        c.mqtt.password.as_ref().map(Secret::expose),
        Some("hunter2")
    );
    assert_eq!(c.mqtt.keep_alive, Duration::from_secs(45));
    assert_eq!(c.mqtt.max_packet_size, MIB);
    assert_eq!(c.mqtt.max_backoff, Duration::from_secs(120));
    assert_eq!(
        c.mqtt.parse,
        [
            ParseRule {
                filter: "sensors/#".to_owned(),
                format: PayloadFormat::Json
            },
            ParseRule {
                filter: "plant/+/status".to_owned(),
                format: PayloadFormat::Text
            },
        ]
    );

    assert_eq!(c.journal.dir, Path::new("/var/lib/ferry"));
    assert_eq!(c.journal.max_bytes, 2 * GIB);
    assert_eq!(c.journal.on_full, OnFull::DropOldest);
    assert_eq!(c.journal.cache_bytes, 8 * MIB);
    assert_eq!(c.journal.replay_window, 0);

    assert_eq!(c.uplink.url, "https://cloud.example.com:8443/v1/ingest");
    assert_eq!(
        c.uplink.token.as_ref().map(Secret::expose),
        Some("s3cr3t-token")
    );
    assert_eq!(c.uplink.batch_max_records, 1000);
    assert_eq!(c.uplink.batch_max_bytes, MIB);
    assert_eq!(c.uplink.compression, Compression::None);
    assert_eq!(c.uplink.max_backoff, Duration::from_secs(300));
    assert_eq!(c.uplink.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.uplink.request_timeout, Duration::from_secs(60));
    assert_eq!(c.uplink.shutdown_grace, Duration::ZERO);

    let ipv6_loopback = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9200));
    assert_eq!(c.control.listen, ipv6_loopback);
}

#[test]
fn omitted_sections_and_keys_take_their_defaults() {
    let c = parse(
        "mqtt.topics = [\"sensors/#\"]\njournal.dir = \"/var/lib/ferry\"\n\
         uplink.url = \"http://127.0.0.1:8080/v1/ingest\"\n",
    );
    assert_eq!(c.device.id, None);
    assert_eq!(c.mqtt.host, "127.0.0.1");
    assert_eq!(c.mqtt.port, 1883);
    assert_eq!(c.mqtt.client_id, None);
    assert_eq!(c.mqtt.username, None);
    assert!(c.mqtt.password.is_none());
    assert_eq!(c.mqtt.keep_alive, Duration::from_secs(30));
    assert_eq!(c.mqtt.max_packet_size, 256 * KIB);
    assert_eq!(c.mqtt.max_backoff, Duration::from_secs(30));
    assert!(c.mqtt.parse.is_empty());
    assert_eq!(c.journal.max_bytes, 256 * MIB);
    assert_eq!(c.journal.on_full, OnFull::RejectNew);
    assert_eq!(c.journal.cache_bytes, 16 * MIB);
    // 2 % of the 256 MiB journal, at most 4 MiB.
    assert_eq!(c.journal.replay_window, 4 * MIB);
    assert_eq!(c.journal.commit_wait, Duration::ZERO);
    assert!(c.uplink.token.is_none());
    assert_eq!(c.uplink.batch_max_records, 500);
    assert_eq!(c.uplink.batch_max_bytes, 512 * KIB);
    assert_eq!(c.uplink.compression, Compression::Gzip);
    assert_eq!(c.uplink.max_backoff, Duration::from_secs(60));
    assert_eq!(c.uplink.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.uplink.request_timeout, Duration::from_secs(30));
    assert_eq!(c.uplink.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.control.listen, SocketAddr::from(([127, 0, 0, 1], 9100)));
}

#[test]
fn an_unknown_top_level_key_is_named() {
    let e = error(&format!("verbose = true\n{FULL}"));
    assert_names(&e, &["verbose", "unknown field", "line 1, column 1"]);
    // After a table header the same key belongs to that table.
    let e = error(&format!("{FULL}verbose = true\n"));
    assert_names(&e, &["control.verbose", "unknown field"]);
}

#[test]
fn an_unknown_key_in_a_section_is_named_with_its_section() {
    assert_names(
        &error(&with("uplink", "batch_size = 5")),
        &["uplink.batch_size", "unknown field", "batch_max_records"],
    );
    assert_names(
        &error(&with("mqtt", "hots = \"x\"")),
        &["mqtt.hots", "expected one of"],
    );
    assert_names(
        &error(&format!(
            "{}[[mqtt.parse]]\nfilter = \"a\"\nformat = \"json\"\nfromat = 1\n",
            with("device", "")
        )),
        &["mqtt.parse[0].fromat", "unknown field"],
    );
    assert_names(&error(&with("device", "name = \"x\"")), &["device.name"]);
    assert_names(
        &error(&format!("{}[mqqt]\n", with("device", ""))),
        &["mqqt"],
    );
}

#[test]
fn a_wrong_type_names_the_key_and_the_position() {
    let cases = [
        ("mqtt", "port = \"1883\"", "mqtt.port"),
        ("mqtt", "topics = \"sensors/#\"", "mqtt.topics"),
        ("mqtt", "topics = [\"a\", 5]", "mqtt.topics[1]"),
        ("mqtt", "keep_alive = 1.5", "mqtt.keep_alive"),
        ("journal", "max_bytes = true", "journal.max_bytes"),
        ("journal", "on_full = \"drop\"", "journal.on_full"),
        ("uplink", "compression = \"zstd\"", "uplink.compression"),
        (
            "uplink",
            "batch_max_records = \"500\"",
            "uplink.batch_max_records",
        ),
        ("control", "listen = 9100", "control.listen"),
        ("device", "id = 7", "device.id"),
    ];
    for (section, line, key) in cases {
        assert_names(&error(&with(section, line)), &[key, "line "]);
    }
    assert_names(&error("mqtt = 5\n"), &["mqtt", "a table, as in [mqtt]"]);
}

#[test]
fn the_commit_wait_is_a_duration_up_to_a_second() {
    assert_eq!(
        parse(&with("journal", "commit_wait = \"50ms\""))
            .journal
            .commit_wait,
        Duration::from_millis(50)
    );
    let e = error(&with("journal", "commit_wait = \"2s\""));
    assert_names(&e, &["journal.commit_wait", "2s", "0s..=1s"]);
}

#[test]
fn the_clock_is_trusted_once_synchronised_and_records_wait_ten_minutes_by_default() {
    let c = parse(&without("clock", "hold"));
    assert_eq!(
        c.clock,
        ClockConfig {
            require_sync: true,
            hold: Duration::from_secs(600)
        }
    );
    let c = parse(&with("clock", "require_sync = false"));
    assert!(!c.clock.require_sync);
    assert_eq!(
        parse(&with("clock", "hold = \"0s\"")).clock.hold,
        Duration::ZERO
    );
    let e = error(&with("clock", "hold = \"200h\""));
    assert_names(&e, &["clock.hold", "200h", "0s..=168h"]);
    let e = error(&with("clock", "require_sync = \"yes\""));
    assert_names(&e, &["require_sync", "yes"]);
}

#[test]
fn records_expire_only_when_a_max_age_of_a_minute_or_more_is_set() {
    assert_eq!(parse(&without("journal", "max_age")).journal.max_age, None);
    assert_eq!(
        parse(&with("journal", "max_age = \"0s\"")).journal.max_age,
        None
    );
    assert_eq!(
        parse(&with("journal", "max_age = \"2h\"")).journal.max_age,
        Some(Duration::from_secs(7200))
    );
    let e = error(&with("journal", "max_age = \"30s\""));
    assert_names(&e, &["journal.max_age", "30s", "1m..="]);
}

#[test]
fn the_replay_window_is_at_most_a_quarter_of_the_journal() {
    let e = error(&with("journal", "replay_window = \"65MiB\""));
    assert_names(
        &e,
        &[
            "journal.replay_window = 65MiB",
            "a quarter of journal.max_bytes = 256MiB",
            "0B..=64MiB",
        ],
    );
    let c = parse(&with("journal", "replay_window = \"64MiB\""));
    assert_eq!(c.journal.replay_window, 64 * MIB);
}

#[test]
fn out_of_range_values_name_the_key_and_the_allowed_range() {
    let cases = [
        ("mqtt", "port = 0", "mqtt.port = 0", "1..=65535"),
        ("mqtt", "port = 70000", "mqtt.port = 70000", "1..=65535"),
        (
            "mqtt",
            "keep_alive = \"4s\"",
            "mqtt.keep_alive = 4s",
            "5s..=1h",
        ),
        ("mqtt", "keep_alive = \"61m\"", "mqtt.keep_alive", "5s..=1h"),
        (
            "mqtt",
            "max_packet_size = 1023",
            "mqtt.max_packet_size",
            "1KiB..=256MiB",
        ),
        (
            "mqtt",
            "max_backoff = \"99ms\"",
            "mqtt.max_backoff",
            "100ms..=1h",
        ),
        (
            "journal",
            "max_bytes = \"1023KiB\"",
            "journal.max_bytes",
            "1MiB..=1TiB",
        ),
        (
            "journal",
            "max_bytes = \"2TiB\"",
            "journal.max_bytes = 2TiB",
            "1MiB..=1TiB",
        ),
        (
            "journal",
            "cache_bytes = \"2GiB\"",
            "journal.cache_bytes",
            "1MiB..=1GiB",
        ),
        (
            "uplink",
            "batch_max_records = 0",
            "uplink.batch_max_records = 0",
            "1..=100000",
        ),
        (
            "uplink",
            "batch_max_records = -1",
            "uplink.batch_max_records",
            "1..=100000",
        ),
        (
            "uplink",
            "batch_max_records = 100001",
            "uplink.batch_max_records",
            "1..=100000",
        ),
        (
            "uplink",
            "batch_max_bytes = \"65MiB\"",
            "uplink.batch_max_bytes",
            "1KiB..=64MiB",
        ),
        (
            "uplink",
            "max_backoff = \"2h\"",
            "uplink.max_backoff",
            "10ms..=1h",
        ),
        (
            "uplink",
            "connect_timeout = \"6m\"",
            "uplink.connect_timeout",
            "100ms..=5m",
        ),
        (
            "uplink",
            "request_timeout = \"11m\"",
            "uplink.request_timeout",
            "100ms..=10m",
        ),
        (
            "uplink",
            "request_timeout = \"0s\"",
            "uplink.request_timeout",
            "100ms..=10m",
        ),
        (
            "uplink",
            "shutdown_grace = \"7s\"",
            "uplink.shutdown_grace",
            "0s..=6s",
        ),
    ];
    for (section, line, key, range) in cases {
        assert_names(&error(&with(section, line)), &[key, "out of range", range]);
    }
    // The bounds themselves are allowed.
    for (section, line) in [
        ("mqtt", "port = 65535"),
        ("mqtt", "keep_alive = \"5s\""),
        ("mqtt", "keep_alive = \"1h\""),
        ("journal", "max_bytes = \"1TiB\""),
        ("uplink", "batch_max_records = 100000"),
        ("uplink", "batch_max_bytes = 1024"),
        ("uplink", "shutdown_grace = \"6s\""),
    ] {
        parse(&with(section, line));
    }
}

#[test]
fn a_bad_size_string_names_the_key() {
    for bad in ["12XB", "16KB", "1.5MiB", "-1MiB", "MiB", ""] {
        let e = error(&with("journal", &format!("max_bytes = \"{bad}\"")));
        assert_names(&e, &["journal.max_bytes", "is not a size", "KiB"]);
    }
    let e = error(&with("journal", "max_bytes = -5"));
    assert_names(&e, &["journal.max_bytes", "negative"]);
}

#[test]
fn a_bad_duration_string_names_the_key() {
    for bad in ["3 days", "1.5s", "30", "s", "1H"] {
        let e = error(&with("uplink", &format!("connect_timeout = \"{bad}\"")));
        assert_names(
            &e,
            &[
                "uplink.connect_timeout",
                "is not a duration",
                "ms, s, m or h",
            ],
        );
    }
}

#[test]
fn a_duration_written_as_a_bare_integer_is_rejected_as_ambiguous() {
    let e = error(&with("mqtt", "keep_alive = 30"));
    assert_names(&e, &["mqtt.keep_alive", "needs a unit", "\"30s\""]);
}

#[test]
fn sizes_and_durations_too_large_to_represent_are_errors_not_panics() {
    let cases = [
        (
            "journal",
            "max_bytes = \"99999999999999999999TiB\"",
            "journal.max_bytes",
        ),
        (
            "journal",
            "max_bytes = \"16777216TiB\"",
            "journal.max_bytes",
        ),
        (
            "uplink",
            "max_backoff = \"99999999999999999999h\"",
            "uplink.max_backoff",
        ),
        (
            "mqtt",
            "keep_alive = \"5124095576030432h\"",
            "mqtt.keep_alive",
        ),
    ];
    for (section, line, key) in cases {
        assert_names(&error(&with(section, line)), &[key, "too large"]);
    }
    // Larger than a TOML integer can be: toml's own error, still with the key.
    let e = error(&with("journal", "max_bytes = 99999999999999999999"));
    assert_names(&e, &["journal.max_bytes", "line "]);
}

#[test]
fn a_missing_required_key_is_named() {
    let cases = [
        (without("mqtt", "topics"), "mqtt.topics is required"),
        (without("journal", "dir"), "journal.dir is required"),
        (without("uplink", "url"), "uplink.url is required"),
        (String::new(), "mqtt.topics is required"),
        (
            "[mqtt]\ntopics = [\"a\"]\n[uplink]\nurl = \"http://h/\"\n".to_owned(),
            "journal.dir is required",
        ),
        (with("mqtt", "topics = []"), "mqtt.topics is empty"),
        (with("journal", "dir = \"\""), "journal.dir is empty"),
    ];
    for (text, want) in cases {
        assert_names(&error(&text), &[want]);
    }
    let e = error(&format!(
        "{}[[mqtt.parse]]\nformat = \"json\"\n",
        with("device", "")
    ));
    assert_names(&e, &["mqtt.parse[0]", "missing field `filter`"]);
}

#[test]
fn bad_urls_are_rejected_with_the_key() {
    let bad = [
        "",
        "127.0.0.1:8080/v1/ingest",
        "ftp://h/x",
        "HTTP://h/x",
        "http://",
        "http:///x",
        "https://:8080/x",
        "http://h /x",
        "http://h/x y",
        " http://h/x",
        "http://h/x\n",
        "http://user:pw@h/x",
        "http://h:port/x",
        "http://h:0/x",
        "http://h:65536/x",
        "http://h:/x",
        "http://[::1/x",
        "http://[::1]x/",
        "http://[]:80/",
    ];
    for url in bad {
        let e = error(&with("uplink", &format!("url = {url:?}")));
        assert_names(&e, &["uplink.url", "is invalid"]);
    }
    let good = [
        "http://h",
        "http://h/",
        "https://cloud.example.com/v1/ingest?site=3#x",
        "http://127.0.0.1:8080/v1/ingest",
        "http://[::1]:8080/v1/ingest",
        "http://[::1]",
        "https://h:443",
    ];
    for url in good {
        assert_eq!(
            parse(&with("uplink", &format!("url = {url:?}"))).uplink.url,
            url
        );
    }
}

#[test]
fn mqtt_filters_follow_the_wildcard_rules() {
    let good = [
        "#",
        "+",
        "a",
        "a/b",
        "a/#",
        "a/+",
        "+/+",
        "+/#",
        "/",
        "//",
        "a//b",
        "/a",
        "a/",
        "$SYS/#",
        "sensors/+/temp",
        "é/ü",
    ];
    for f in good {
        assert_eq!(validate_filter(f), Ok(()), "{f:?}");
    }
    let bad = [
        "", "#/a", "a/#/b", "a#", "a/b#", "##", "a+", "a/+b", "++", "a/\0", "+#",
    ];
    for f in bad {
        assert!(validate_filter(f).is_err(), "{f:?}");
    }
    assert!(validate_filter(&"a".repeat(65_535)).is_ok());
    assert!(validate_filter(&"a".repeat(65_536)).is_err());
}

#[test]
fn a_bad_filter_in_topics_or_parse_rules_names_the_key() {
    let e = error(&with("mqtt", "topics = [\"a/#\", \"a/#/b\"]"));
    assert_names(&e, &["mqtt.topics[1]", "\"a/#/b\"", "'#'"]);
    let e = error(&with("mqtt", "topics = [\"\"]"));
    assert_names(&e, &["mqtt.topics[0]", "empty"]);
    let e = error(&format!(
        "{}[[mqtt.parse]]\nfilter = \"a/+b\"\nformat = \"auto\"\n",
        with("device", "")
    ));
    assert_names(&e, &["mqtt.parse[0].filter", "'+'"]);
}

#[test]
fn bad_device_ids_are_rejected_and_good_ones_kept() {
    let too_long = "a".repeat(65);
    for id in [
        "",
        "gw 01",
        "gw/01",
        "gw:01",
        "é",
        "gw\n",
        too_long.as_str(),
    ] {
        let e = error(&with("device", &format!("id = {id:?}")));
        assert_names(&e, &["device.id", "1 to 64 characters"]);
    }
    let longest = "Z".repeat(64);
    for id in ["gw-01", "a", "A.b_c-9", longest.as_str()] {
        assert_eq!(
            parse(&with("device", &format!("id = {id:?}")))
                .device
                .id
                .as_deref(),
            Some(id)
        );
    }
}

#[test]
fn other_invalid_values_name_their_key() {
    let cases = [
        ("mqtt", "host = \"\"", "mqtt.host"),
        ("mqtt", "host = \"a b\"", "mqtt.host"),
        ("mqtt", "client_id = \"\"", "mqtt.client_id"),
        (
            "mqtt",
            "password = \"pw\"",
            "mqtt.password is set but mqtt.username is not",
        ),
        ("control", "listen = \"localhost:9100\"", "control.listen"),
        ("control", "listen = \"127.0.0.1\"", "control.listen"),
    ];
    for (section, line, key) in cases {
        assert_names(&error(&with(section, line)), &[key]);
    }
    let long_id = format!("client_id = \"{}\"", "c".repeat(129));
    assert_names(
        &error(&with("mqtt", &long_id)),
        &["mqtt.client_id", "1 to 128"],
    );
}

#[test]
fn a_syntax_error_names_the_file_and_the_position() {
    let e = error("[mqtt\ntopics = [\"a\"]\n");
    assert_names(&e, &["line 1, column 6"]);
    let e = error("[uplink]\nurl = \"http://h/\n");
    assert_names(&e, &["uplink.url", "line 2"]);
    let e = error("[mqtt]\nport = 12x\n");
    assert_names(&e, &["mqtt.port", "line 2, column 8"]);
}

#[test]
fn an_empty_token_means_no_token() {
    assert!(
        parse(&with("uplink", "token = \"\""))
            .uplink
            .token
            .is_none()
    );
}

#[test]
fn a_token_with_whitespace_is_rejected_without_echoing_it() {
    let e = error(&with("uplink", "token = \"abc123\\n\""));
    assert_names(&e, &["uplink.token", "whitespace"]);
    assert!(!e.contains("abc123"), "{e}");
}

#[test]
fn a_relative_journal_dir_is_resolved_against_the_config_file() {
    let c = parse(&with("journal", "dir = \"data/journal\""));
    assert_eq!(c.journal.dir, Path::new("/etc/ferry/data/journal"));
    let c = Config::parse_str(&with("journal", "dir = \"data\""), Path::new("ferry.toml"));
    assert_eq!(c.ok().map(|c| c.journal.dir), Some(PathBuf::from("data")));
}

#[test]
fn the_masked_toml_hides_secrets() {
    let text = parse(FULL).to_masked_toml();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("s3cr3t-token"), "{text}");
    assert!(text.contains("password = \"****\""), "{text}");
    assert!(text.contains("token = \"****\""), "{text}");
    let debug = format!("{:?}", parse(FULL));
    assert!(!debug.contains("hunter2"));
    assert!(debug.contains("password: Some(\"****\")"), "{debug}");
}

#[test]
fn the_masked_toml_parses_back_to_the_same_config() {
    let minimal = with("device", "");
    for text in [FULL, minimal.as_str()] {
        let printed = parse(text).to_masked_toml();
        let reread = parse(&printed);
        assert_eq!(reread.to_masked_toml(), printed);
    }
    let printed = parse(FULL).to_masked_toml();
    let reread = parse(&printed);
    assert_eq!(
        reread.mqtt.password.as_ref().map(Secret::expose),
        Some(MASK)
    );
    assert_eq!(reread.mqtt.max_packet_size, MIB);
    assert_eq!(reread.uplink.connect_timeout, Duration::from_millis(250));
    assert_eq!(reread.mqtt.parse.len(), 2);

    let printed = parse(&minimal).to_masked_toml();
    for key in [
        "keep_alive = \"30s\"",
        "max_bytes = \"256MiB\"",
        "listen = \"127.0.0.1:9100\"",
    ] {
        assert!(printed.contains(key), "no {key} in:\n{printed}");
    }
    assert!(!printed.contains("token"), "{printed}");
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one_as_a_read_error() {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("ferry.toml");
    assert!(std::fs::write(&path, with("journal", "dir = \"j\"")).is_ok());
    match Config::load(&path) {
        Ok(c) => assert_eq!(c.journal.dir, dir.path().join("j")),
        Err(e) => panic!("{e}"),
    }
    let missing = dir.path().join("missing.toml");
    match Config::load(&missing) {
        Err(Error::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected a read error, got {other:?}"),
    }
}

/// On armv7 `usize` is 32 bits: journal sizes past 4 GiB must stay exact (they are `u64`), and
/// survive the round trip through the printed config. `make test-arm` runs this on armv7.
#[test]
fn journal_sizes_past_4_gib_are_exact_on_32_bit_targets() {
    let c = parse(&with("journal", "max_bytes = \"6GiB\""));
    assert_eq!(c.journal.max_bytes, 6 * GIB);
    assert!(c.journal.max_bytes > u64::from(u32::MAX));
    let again = parse(&c.to_masked_toml());
    assert_eq!(again.journal.max_bytes, 6 * GIB);
    let c = parse(&with("journal", "max_bytes = 5000000000"));
    assert_eq!(c.journal.max_bytes, 5_000_000_000);
}

#[test]
fn a_control_endpoint_beyond_loopback_needs_a_token() {
    let beyond = r#"listen = "0.0.0.0:9100""#;
    let e = error(&edit("control", "listen", Some(beyond)));
    assert_names(&e, &["control.listen", "0.0.0.0:9100", "control.token"]);
    let with_token = edit("control", "listen", Some(beyond)).replace(
        "[control]\n",
        "[control]\ntoken = \"0123456789abcdef0123\"\n",
    );
    let cfg = parse(&with_token);
    assert_eq!(
        cfg.control.token.as_ref().map(Secret::expose),
        Some("0123456789abcdef0123")
    );
    assert!(!cfg.to_masked_toml().contains("0123456789abcdef0123"));
    // Loopback needs none in the file: the agent generates one.
    assert!(
        parse(&with("control", r#"listen = "[::1]:9100""#))
            .control
            .token
            .is_none()
    );
    // A token too short to guard anything, or with a pasted newline, is refused.
    assert_names(
        &error(&with("control", r#"token = "short""#)),
        &["control.token", "at least 16"],
    );
    assert_names(
        &error(&with("control", "token = \"0123456789abcdef0123\\n\"")),
        &["control.token", "whitespace"],
    );
}
