//! Durations as the API and config accept them: `"250ms"`, `"90s"`, `"15m"`, `"1h"`, `"2d"` or a
//! bare number of seconds (JSON number or digit string). Anything else is rejected.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("duration is empty")]
    Empty,
    #[error("duration {0:?} is not a number followed by ms, s, m, h or d")]
    Syntax(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
    #[error("duration must be positive")]
    Zero,
}

/// Longest duration Mayfly accepts anywhere (one year); keeps arithmetic on
/// timestamps far from overflow.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    if digits.is_empty() || digits.len() > 12 {
        return Err(if digits.len() > 12 {
            DurationError::Overflow(input.to_string())
        } else {
            DurationError::Syntax(input.to_string())
        });
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::Syntax(input.to_string()))?;
    let mult_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(DurationError::Syntax(input.to_string())),
    };
    let ms = n
        .checked_mul(mult_ms)
        .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
    if ms == 0 {
        return Err(DurationError::Zero);
    }
    let d = Duration::from_millis(ms);
    if d > MAX {
        return Err(DurationError::Overflow(input.to_string()));
    }
    Ok(d)
}

fn from_secs(secs: u64) -> Result<Duration, DurationError> {
    if secs == 0 {
        return Err(DurationError::Zero);
    }
    let d = Duration::from_secs(secs);
    if d > MAX {
        return Err(DurationError::Overflow(secs.to_string()));
    }
    Ok(d)
}

/// A duration from a JSON value: a duration string or a positive integer of seconds.
pub fn from_json(v: &serde_json::Value) -> Result<Duration, DurationError> {
    match v {
        serde_json::Value::String(s) => parse(s),
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(secs) => from_secs(secs),
            None => Err(DurationError::Syntax(n.to_string())),
        },
        other => Err(DurationError::Syntax(other.to_string())),
    }
}

/// The shortest exact form `parse` reads back: whole seconds as `"90s"`, anything
/// finer in milliseconds (`"250ms"`). (Found by fuzzing, issue #18: whole seconds only
/// wrote 250 ms as `"0s"`, which `parse` refuses.)
pub fn format(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// serde helper: accepts a duration string or a non-negative integer of seconds.
pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(de)? {
        Raw::Secs(n) => from_secs(n).map_err(serde::de::Error::custom),
        Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
    }
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fuzz finding (issue #18, target `duration`, input "250ms"): `format` wrote
    /// sub-second durations as "0s", which `parse` refuses; `serialize` used it.
    #[test]
    fn format_reads_back_exactly_also_below_a_second() {
        for text in ["250ms", "1500ms", "90s", "15m", "2d", "1ms"] {
            let d = parse(text).expect("valid");
            assert_eq!(parse(&format(d)), Ok(d), "{text} -> {}", format(d));
        }
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn units_are_seconds_minutes_hours_days() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("42"), Ok(Duration::from_secs(42)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn malformed_durations_are_rejected_with_their_reason() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("0s"), Err(DurationError::Zero));
        assert!(matches!(parse("10x"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("-5s"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("1.5h"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("h"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("5 m"), Err(DurationError::Syntax(_))));
        assert!(matches!(
            parse("99999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(parse("400d"), Err(DurationError::Overflow(_))));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = parse(&s);
        }

        #[test]
        fn formatted_durations_parse_back(secs in 1u64..=MAX.as_secs()) {
            let d = Duration::from_secs(secs);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
