//! Unit tests of the config editor: typed values, refusals that name the key, comments kept, atomic
//! save with a backup, and the runtime/restart split.
use super::*;

const TEXT: &str = r#"# gateway 7, hall B
[mqtt]
topics = ["sensors/#"] # what we forward

[journal]
dir = "/var/lib/ferry"

[uplink]
url = "http://cloud.local/v1/ingest"
token = "s3cr3t"
batch_max_records = 500 # tuned for the cellular link
"#;

fn draft() -> Draft {
    Draft::from_text(Path::new("/etc/ferry/ferry.toml"), TEXT).unwrap()
}

#[test]
fn set_reads_values_as_a_person_types_them() {
    let mut d = draft();
    d.set("uplink.batch_max_records", "200").unwrap();
    d.set("journal.max_bytes", "64MiB").unwrap();
    d.set("uplink.url", "https://cloud.example.com/v1/ingest")
        .unwrap();
    d.set("device.id", "12345").unwrap();
    d.set("mqtt.topics", "a/#, b/+/c").unwrap();
    d.set("log.level", "warn,ferry::uplink=debug").unwrap();
    let cfg = d.validate().unwrap();
    assert_eq!(cfg.uplink.batch_max_records, 200);
    assert_eq!(cfg.journal.max_bytes, 64 << 20);
    assert_eq!(cfg.uplink.url, "https://cloud.example.com/v1/ingest");
    assert_eq!(cfg.device.id.as_deref(), Some("12345"));
    assert_eq!(cfg.mqtt.topics, ["a/#", "b/+/c"]);
    assert_eq!(cfg.log.level, "warn,ferry::uplink=debug");
}

#[test]
fn set_keeps_comments_and_layout() {
    let mut d = draft();
    d.set("uplink.batch_max_records", "200").unwrap();
    let text = d.text();
    assert!(text.starts_with("# gateway 7, hall B\n"), "{text}");
    assert!(
        text.contains("batch_max_records = 200 # tuned for the cellular link"),
        "{text}"
    );
    assert!(text.contains("topics = [\"sensors/#\"] # what we forward"));
}

#[test]
fn a_bad_value_is_refused_naming_the_key_and_changes_nothing() {
    let mut d = draft();
    let before = d.text();
    for (key, value) in [
        ("uplink.batch_max_records", "lots"),
        ("uplink.url", "ftp://x"),
        ("journal.max_bytes", "12 parsecs"),
        ("log.level", "verbose"),
    ] {
        let err = d.set(key, value).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert_eq!(d.text(), before);
    }
    let err = d.set("uplink.urll", "http://x/").unwrap_err().to_string();
    assert!(err.contains("urll"), "{err}");
    for key in ["uplink", "Uplink.url", "mqtt.parse.filter", ""] {
        assert!(matches!(d.set(key, "1"), Err(Error::Key { .. })), "{key:?}");
    }
    assert!(d.set("uplink.url", "  ").is_err());
}

#[test]
fn a_file_with_a_missing_key_can_still_be_edited() {
    let mut d = Draft::from_text(Path::new("/etc/ferry/ferry.toml"), "").unwrap();
    assert!(d.validate().is_err());
    d.set("mqtt.host", "127.0.0.1").unwrap();
    d.set("uplink.url", "http://cloud.local/v1/ingest").unwrap();
    d.set("journal.dir", "/var/lib/ferry").unwrap();
    d.set("mqtt.topics", "sensors/#").unwrap();
    d.validate().unwrap();
}

#[test]
fn unset_diff_and_discard() {
    let mut d = draft();
    assert!(d.diff().is_empty());
    d.unset("uplink.batch_max_records").unwrap();
    d.set("uplink.token", "n3w").unwrap();
    d.set("uplink.max_records_per_sec", "100").unwrap();
    let diff: Vec<String> = d.diff().iter().map(|c| c.to_string()).collect();
    assert_eq!(
        diff,
        [
            "uplink.batch_max_records 500 -> (unset)",
            "uplink.max_records_per_sec (unset) -> 100",
            "uplink.token **** -> ****",
        ]
    );
    assert_eq!(d.get("uplink.token").as_deref(), Some("****"));
    assert_eq!(d.get("uplink.max_records_per_sec").as_deref(), Some("100"));
    d.discard();
    assert!(d.diff().is_empty());
}

#[test]
fn save_replaces_the_file_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, TEXT).unwrap();
    let mut d = Draft::load(&path).unwrap();
    d.set("uplink.batch_max_records", "42").unwrap();
    let saved = d.save().unwrap();
    assert_eq!(saved.config.uplink.batch_max_records, 42);
    assert!(!saved.rebased);
    assert!(d.diff().is_empty());
    assert_eq!(Config::load(&path).unwrap().uplink.batch_max_records, 42);
    let backup = std::fs::read_to_string(dir.path().join("ferry.toml.bak")).unwrap();
    assert_eq!(backup, TEXT);
}

/// A console session edits while the cloud's `set_config` saves the same file: the session's save
/// goes on top of the file as it is now, so the cloud's change is not silently undone.
#[test]
fn a_save_after_someone_else_saved_keeps_their_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, TEXT).unwrap();
    let mut console = Draft::load(&path).unwrap();
    let mut cloud = Draft::load(&path).unwrap();

    cloud.set("uplink.max_records_per_sec", "100").unwrap();
    cloud.set("uplink.batch_max_records", "50").unwrap();
    assert!(!cloud.save().unwrap().rebased);

    console.set("uplink.batch_max_records", "42").unwrap();
    console.set("log.level", "debug").unwrap();
    let saved = console.save().unwrap();
    assert!(saved.rebased);
    assert_eq!(saved.overridden, ["uplink.batch_max_records"]);
    let cfg = Config::load(&path).unwrap();
    assert_eq!(
        cfg.uplink.max_records_per_sec, 100,
        "the cloud's change stays"
    );
    assert_eq!(
        cfg.uplink.batch_max_records, 42,
        "the later save wins its own key"
    );
    assert_eq!(cfg.log.level, "debug");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("# tuned for the cellular link"), "{text}");
    assert!(console.diff().is_empty());
}

#[test]
fn plan_splits_runtime_changes_from_restarts() {
    let running = draft().validate().unwrap();
    let mut d = draft();
    d.set("uplink.max_records_per_sec", "100").unwrap();
    d.set("log.level", "debug").unwrap();
    let p = plan(&running, &d.validate().unwrap());
    assert_eq!(p.changes.len(), 2);
    assert!(!p.needs_restart(), "{p:?}");
    d.set("uplink.token", "other").unwrap();
    d.set("mqtt.host", "10.0.0.2").unwrap();
    let p = plan(&running, &d.validate().unwrap());
    assert_eq!(p.restart_keys, ["mqtt.host", "uplink.token"]);
    assert!(p.changes.iter().all(|c| !c.to_string().contains("other")));
}

#[test]
fn every_secret_the_config_masks_is_masked_by_name_too() {
    // `Draft::get`, `Draft::show` and `Change` mask by key name (`is_secret`); the effective TOML
    // masks the `Secret` fields. A new secret field must be caught by both.
    let text = format!(
        "{}[console]\npin_sha256 = \"{}\"\n[downlink]\nurl = \"ws://cloud.local/d\"\ntoken = \"dl\"\n",
        TEXT.replace("[mqtt]\n", "[mqtt]\nusername = \"u\"\npassword = \"pw\"\n"),
        "a".repeat(64)
    );
    let d = Draft::from_text(Path::new("/etc/ferry/ferry.toml"), &text).unwrap();
    let masked: Vec<String> = flatten(
        &d.validate()
            .unwrap()
            .to_masked_toml()
            .parse::<DocumentMut>()
            .unwrap(),
    )
    .into_iter()
    .filter(|(_, v)| *v == format!("{MASK:?}"))
    .map(|(k, _)| k)
    .collect();
    assert_eq!(
        masked,
        [
            "console.pin_sha256",
            "downlink.token",
            "mqtt.password",
            "uplink.token"
        ]
    );
    for key in &masked {
        assert!(is_secret(key), "{key}");
        assert_eq!(d.get(key).as_deref(), Some(MASK), "{key}");
    }
}
