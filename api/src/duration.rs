//! Durations as Kubernetes users write them (`500ms`, `30s`, `5m`, `1h30m`), checked by the schema's
//! pattern at the API server and parsed here into [`std::time::Duration`].

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the API server checks: one or more `<digits><unit>` parts, units `ms`, `s`, `m`, `h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// A duration written as a string such as `30s`, `5m`, `24h` or `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write it like 500ms, 30s, 5m, 24h or 1h30m)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// A duration of milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// The standard-library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let mut total: u128 = 0;
        let mut rest = input;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("expected a number"));
            }
            let value: u128 = rest[..digits]
                .parse()
                .map_err(|_| err("number too large"))?;
            rest = &rest[digits..];
            let (unit_ms, len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1_000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else {
                return Err(err("expected a unit (ms, s, m or h) after each number"));
            };
            rest = &rest[len..];
            total = value
                .checked_mul(unit_ms)
                .and_then(|ms| total.checked_add(ms))
                .ok_or_else(|| err("too large"))?;
        }
        let ms = u64::try_from(total).map_err(|_| err("too large"))?;
        Ok(Self(std::time::Duration::from_millis(ms)))
    }
}

impl fmt::Display for Duration {
    /// Writes the shortest exact form: `1h30m`, `45s`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1_000) {
            return write!(f, "{ms}ms");
        }
        let secs = ms / 1_000;
        let (h, m, s) = (secs / 3_600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<std::time::Duration, DurationError> {
        s.parse::<Duration>().map(Duration::get)
    }

    #[test]
    fn parses_every_unit_and_combinations() {
        assert_eq!(parse("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse("30s").unwrap().as_secs(), 30);
        assert_eq!(parse("5m").unwrap().as_secs(), 300);
        assert_eq!(parse("24h").unwrap().as_secs(), 86_400);
        assert_eq!(parse("1h30m15s").unwrap().as_secs(), 5_415);
        assert_eq!(parse("1s500ms").unwrap().as_millis(), 1_500);
    }

    #[test]
    fn refuses_what_the_schema_pattern_refuses() {
        for bad in [
            "",
            "30",
            "s",
            "1d",
            "1.5s",
            "-1s",
            "1 s",
            "99999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn displays_the_shortest_exact_form() {
        for (text, shown) in [
            ("90s", "1m30s"),
            ("1500ms", "1500ms"),
            ("2h", "2h"),
            ("0s", "0s"),
        ] {
            assert_eq!(text.parse::<Duration>().unwrap().to_string(), shown);
        }
    }

    #[test]
    fn error_says_how_to_write_a_duration() {
        let msg = parse("10 seconds").unwrap_err().to_string();
        assert!(msg.contains("1h30m"), "{msg}");
    }
}
