//! Payload formats: which parser a topic asks for (`[[mqtt.parse]]`, first match wins) and what a
//! payload becomes on the wire. Pure functions, no I/O.
//!
//! A payload that fails the parser its topic asked for is still journaled and delivered, as raw bytes
//! flagged `parse_error`; nothing is ever dropped for its content.

use crate::config::{ParseRule, PayloadFormat};
use crate::journal::StoredFormat;

/// The outcome of classifying one payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub format: StoredFormat,
    /// The topic asked for a format the payload is not.
    pub parse_error: bool,
}

/// The format configured for `topic`: the first rule whose filter matches, else `auto`.
pub fn format_for(rules: &[ParseRule], topic: &str) -> PayloadFormat {
    rules
        .iter()
        .find(|r| topic_matches(&r.filter, topic))
        .map(|r| r.format)
        .unwrap_or(PayloadFormat::Auto)
}

/// Decides how `payload`, published on `topic`, is stored and sent, given the format its topic
/// asks for. `auto` takes a payload in the Sparkplug B namespace that decodes for Sparkplug B.
pub fn classify(wanted: PayloadFormat, topic: &str, payload: &[u8]) -> Classified {
    let ok = |format| Classified {
        format,
        parse_error: false,
    };
    let failed = Classified {
        format: StoredFormat::Raw,
        parse_error: true,
    };
    match wanted {
        PayloadFormat::Json if is_json(payload) => ok(StoredFormat::Json),
        PayloadFormat::Json => failed,
        PayloadFormat::Text if std::str::from_utf8(payload).is_ok() => ok(StoredFormat::Text),
        PayloadFormat::Text => failed,
        PayloadFormat::Raw => ok(StoredFormat::Raw),
        PayloadFormat::SparkplugB if is_sparkplug(payload) => ok(StoredFormat::SparkplugB),
        PayloadFormat::SparkplugB => failed,
        PayloadFormat::Auto
            if crate::sparkplug::is_sparkplug_topic(topic) && is_sparkplug(payload) =>
        {
            ok(StoredFormat::SparkplugB)
        }
        PayloadFormat::Auto if is_json(payload) => ok(StoredFormat::Json),
        PayloadFormat::Auto if std::str::from_utf8(payload).is_ok() => ok(StoredFormat::Text),
        PayloadFormat::Auto => ok(StoredFormat::Raw),
    }
}

/// Whether `payload` decodes as a Sparkplug B payload.
pub fn is_sparkplug(payload: &[u8]) -> bool {
    crate::sparkplug::decode::payload(payload).is_ok()
}

/// Whether `payload` is one complete JSON value (serde_json bounds nesting depth, so hostile input
/// gives `false`, not a stack overflow).
pub fn is_json(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// MQTT topic filter matching (`+` one level, `#` the rest, including the parent level). Topics that
/// start with `$` are not matched by a filter starting with a wildcard, as in MQTT 3.1.1 4.7.2.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(filter: &str, format: PayloadFormat) -> ParseRule {
        ParseRule {
            filter: filter.into(),
            format,
        }
    }

    #[test]
    fn first_matching_rule_wins_and_auto_is_the_default() {
        let rules = vec![
            rule("sensors/raw/#", PayloadFormat::Raw),
            rule("sensors/#", PayloadFormat::Json),
        ];
        assert_eq!(format_for(&rules, "sensors/raw/a"), PayloadFormat::Raw);
        assert_eq!(format_for(&rules, "sensors/t1"), PayloadFormat::Json);
        assert_eq!(format_for(&rules, "other"), PayloadFormat::Auto);
    }

    #[test]
    fn a_payload_that_fails_its_parser_is_kept_as_flagged_raw() {
        let c = classify(PayloadFormat::Json, "t", b"not json");
        assert_eq!(c.format, StoredFormat::Raw);
        assert!(c.parse_error);
        let c = classify(PayloadFormat::Text, "t", &[0xff, 0xfe]);
        assert_eq!(c.format, StoredFormat::Raw);
        assert!(c.parse_error);
    }

    #[test]
    fn auto_picks_json_then_text_then_raw_and_never_flags() {
        assert_eq!(
            classify(PayloadFormat::Auto, "t", br#"{"t":1}"#).format,
            StoredFormat::Json
        );
        assert_eq!(
            classify(PayloadFormat::Auto, "t", b"21.5").format,
            StoredFormat::Json
        );
        assert_eq!(
            classify(PayloadFormat::Auto, "t", b"hello").format,
            StoredFormat::Text
        );
        assert_eq!(
            classify(PayloadFormat::Auto, "t", b"").format,
            StoredFormat::Text
        );
        let c = classify(PayloadFormat::Auto, "t", &[0, 159, 146, 150]);
        assert_eq!(c.format, StoredFormat::Raw);
        assert!(!c.parse_error);
    }

    #[test]
    fn deeply_nested_json_is_rejected_without_overflowing_the_stack() {
        let deep = "[".repeat(100_000);
        assert!(!is_json(deep.as_bytes()));
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(topic_matches("sensors/+/t", "sensors/x/t"));
        assert!(!topic_matches("sensors/+/t", "sensors/x/y/t"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(topic_matches("+/+", "/x"));
        assert!(topic_matches("ü/🌡", "ü/🌡"));
    }
}
