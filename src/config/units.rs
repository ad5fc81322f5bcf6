//! Byte sizes ("512KiB", 1024) and durations ("250ms", "5s", "2m") as written in the config file.
//!
//! Sizes are whole bytes with an optional binary unit: `B`, `KiB`, `MiB`, `GiB`, `TiB` (case-sensitive,
//! at most one space between number and unit). In TOML a size may also be a plain non-negative integer
//! of bytes. Durations are whole numbers with a unit: `ms`, `s`, `m`, `h`. In TOML a duration must be a
//! string: a bare `30` is rejected because it is ambiguous between seconds and milliseconds.
//!
//! Parsing never panics and never allocates in proportion to the number: digits are accumulated with
//! checked arithmetic and an overflow is an error. [`format_size`] and [`format_duration`] print values in
//! the same syntax, so that what `parse_*` produced prints back to something `parse_*` accepts.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error(
        "{text:?} is not a size: expected a whole number of bytes with an optional unit \
         B, KiB, MiB, GiB or TiB, e.g. \"256MiB\""
    )]
    Size { text: String },
    #[error(
        "{text:?} is not a duration: expected a whole number with a unit ms, s, m or h, e.g. \"30s\""
    )]
    Duration { text: String },
    #[error("{text:?} is too large")]
    Overflow { text: String },
}

const SIZE_UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

const DURATION_UNITS: [(&str, u64); 3] = [("h", 3600), ("m", 60), ("s", 1)];

/// Parses "512", "512B", "16KiB", "16 KiB", "256MiB", "1GiB", "1TiB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Size { text: s.to_owned() };
    let (number, unit) = split_number(s).ok_or_else(bad)?;
    let multiplier = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    let overflow = || UnitError::Overflow { text: s.to_owned() };
    parse_digits(number)
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(overflow)
}

/// Parses "250ms", "5s", "2m", "1h" (also with one space before the unit).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::Duration { text: s.to_owned() };
    let overflow = || UnitError::Overflow { text: s.to_owned() };
    let (number, unit) = split_number(s).ok_or_else(bad)?;
    if unit == "ms" {
        return parse_digits(number)
            .map(Duration::from_millis)
            .ok_or_else(overflow);
    }
    let seconds_per_unit = DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, m)| *m)
        .ok_or_else(bad)?;
    parse_digits(number)
        .and_then(|n| n.checked_mul(seconds_per_unit))
        .map(Duration::from_secs)
        .ok_or_else(overflow)
}

/// Prints `bytes` in the largest unit that represents it exactly ("256MiB", "1536B").
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".to_owned();
    }
    for (name, multiplier) in SIZE_UNITS {
        if bytes % multiplier == 0 {
            return format!("{}{name}", bytes / multiplier);
        }
    }
    // Unreachable: "B" has multiplier 1.
    format!("{bytes}B")
}

/// Prints `d` in the largest unit that represents it exactly ("30s", "2m", "250ms").
///
/// Exact for every value [`parse_duration`] returns; a part finer than a millisecond, which the config
/// syntax cannot express, is dropped.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    for (name, seconds_per_unit) in DURATION_UNITS {
        if secs % seconds_per_unit == 0 {
            return format!("{}{name}", secs / seconds_per_unit);
        }
    }
    // Unreachable: "s" has 1 second per unit.
    format!("{secs}s")
}

/// Splits "16 KiB" into ("16", "KiB"). `None` unless there is at least one ASCII digit, and the unit
/// (if any) follows the digits directly or after exactly one space.
fn split_number(s: &str) -> Option<(&str, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    // `end` is a char boundary: everything before it is ASCII.
    let (number, rest) = s.split_at(end);
    let unit = rest.strip_prefix(' ').unwrap_or(rest);
    if unit.is_empty() && !rest.is_empty() {
        return None; // "512 " has a space but no unit
    }
    Some((number, unit))
}

/// `None` on overflow. `digits` must be non-empty ASCII digits.
fn parse_digits(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// A size as read from TOML: a non-negative integer of bytes or a string for [`parse_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: an integer of bytes or a string like \"256MiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format_args!("a size cannot be negative, got {v}")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as read from TOML: a string for [`parse_duration`]. Integers are rejected (no unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit ms, s, m or h, like \"30s\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(E::custom(format_args!(
                    "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
                )))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Err(E::custom(format_args!(
                    "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_plain_bytes_and_binary_units() {
        let cases = [
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("16KiB", 16 * 1024),
            ("16 KiB", 16 * 1024),
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("1TiB", 1 << 40),
            ("007B", 7),
            ("18446744073709551615", u64::MAX),
            ("16777215TiB", 16_777_215 << 40),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn sizes_reject_decimal_units_fractions_signs_and_stray_spaces() {
        let cases = [
            "", " ", "B", "KiB", "-1", "+1", "1.5MiB", "1e3", "16KB", "16MB", "16GB", "16kib",
            "16k", "16 ", " 16", "16  KiB", "16KiB ", "16\tKiB", "16 B B", "16KiBB", "1_000", "½",
            "16Ki", "１６",
        ];
        for text in cases {
            assert_eq!(
                parse_size(text),
                Err(UnitError::Size {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn sizes_that_overflow_are_errors_not_panics() {
        let cases = [
            "99999999999999999999TiB",
            "99999999999999999999",
            "18446744073709551616",
            "16777216TiB",
            "17179869184GiB",
        ];
        for text in cases {
            assert_eq!(
                parse_size(text),
                Err(UnitError::Overflow {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
        let long = "9".repeat(100_000) + "TiB";
        assert!(matches!(parse_size(&long), Err(UnitError::Overflow { .. })));
    }

    #[test]
    fn durations_accept_integers_with_a_unit() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("0s", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("5 s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("18446744073709551615ms", Duration::from_millis(u64::MAX)),
            ("18446744073709551615s", Duration::from_secs(u64::MAX)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn durations_reject_missing_or_unknown_units_and_fractions() {
        let cases = [
            "", "30", "s", "1.5s", "-1s", "+1s", "1d", "1us", "1ns", "1S", "1H", "1 h ", "1  s",
            "1sec", "1hm", "1h30m", "1ms ", " 1s", "1M",
        ];
        for text in cases {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::Duration {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn durations_that_overflow_are_errors_not_panics() {
        for text in [
            "99999999999999999999h",
            "99999999999999999999ms",
            "5124095576030432h",
            "307445734561825861m",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::Overflow {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn formatted_sizes_parse_back_to_the_same_value() {
        let mut values = vec![0, 1, 1023, 1024, 1025, u64::MAX, u64::MAX - 1, 1 << 63];
        for shift in 0..64 {
            let p = 1u64 << shift;
            values.extend([
                p,
                p - 1,
                p.wrapping_add(1),
                p.wrapping_mul(3),
                p.wrapping_mul(1000),
            ]);
        }
        // A deterministic spread of values.
        let mut rng = crate::rng::Rng::new(1);
        for _ in 0..10_000 {
            let x = rng.next_u64();
            values.push(x);
            values.push(x >> (x % 64));
            values.push((x % 4096) << 30);
        }
        for v in values {
            let text = format_size(v);
            assert_eq!(parse_size(&text), Ok(v), "{v} printed as {text:?}");
        }
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(0), "0B");
    }

    #[test]
    fn formatted_durations_parse_back_to_the_same_value() {
        let mut values = vec![
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(999),
            Duration::from_millis(1500),
            Duration::from_secs(59),
            Duration::from_secs(60),
            Duration::from_secs(90),
            Duration::from_secs(3600),
            Duration::from_secs(u64::MAX),
            Duration::from_millis(u64::MAX),
        ];
        let mut rng = crate::rng::Rng::new(2);
        for _ in 0..10_000 {
            let x = rng.next_u64();
            values.push(Duration::from_millis(x));
            values.push(Duration::from_millis(x % 10_000_000));
            values.push(Duration::from_secs(x));
            values.push(Duration::from_secs((x % 1000) * 60));
            values.push(Duration::from_secs((x % 1000) * 3600));
        }
        for v in values {
            let text = format_duration(v);
            assert_eq!(parse_duration(&text), Ok(v), "{v:?} printed as {text:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn arbitrary_short_strings_never_panic() {
        let alphabet = [
            "0", "9", " ", "B", "KiB", "MiB", "TiB", "ms", "s", "m", "h", "-", ".", "é",
        ];
        let mut rng = crate::rng::Rng::new(3);
        for _ in 0..20_000 {
            let x = rng.next_u64();
            let mut text = String::new();
            let mut y = x;
            for _ in 0..(x % 8) {
                text.push_str(alphabet[(y % alphabet.len() as u64) as usize]);
                y /= alphabet.len() as u64;
            }
            if let Ok(v) = parse_size(&text) {
                assert_eq!(parse_size(&format_size(v)), Ok(v), "{text:?}");
            }
            if let Ok(v) = parse_duration(&text) {
                assert_eq!(parse_duration(&format_duration(v)), Ok(v), "{text:?}");
            }
        }
    }

    #[test]
    fn error_messages_quote_the_offending_text() {
        let err = parse_size("12XB").expect_err("12XB is not a size");
        assert!(err.to_string().contains("\"12XB\""), "{err}");
        let err = parse_duration("3 days").expect_err("3 days is not a duration");
        assert!(err.to_string().contains("\"3 days\""), "{err}");
    }
}
