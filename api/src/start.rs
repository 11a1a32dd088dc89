//! Where a new Subscription starts reading its queue: `Latest` (what is published from now on),
//! `Earliest` (everything its queue's owners still keep) or an RFC 3339 time, as Kafka's
//! `auto.offset.reset` and Redis's `XGROUP CREATE … 0|$` let a consumer group choose.

use std::{borrow::Cow, fmt, str::FromStr, time::SystemTime};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the API server checks: `Latest`, `Earliest`, or an RFC 3339 time with its offset.
pub const START_AT_PATTERN: &str = r"^(Latest|Earliest|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$";

/// Where a new Subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StartAt {
    /// Only messages published after the subscription exists (the default).
    #[default]
    Latest,
    /// Every message the queue's owners still keep: unsettled ones, and acked ones inside the
    /// queue's `retention.keepAcked`.
    Earliest,
    /// Kept messages published at or after this time, and everything after.
    Time(SystemTime),
}

/// Why a `startAt` (or rewind time) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid start {input:?}: {reason} (write Latest, Earliest or an RFC 3339 time such as 2026-12-01T09:30:00Z)"
)]
pub struct StartAtError {
    input: String,
    reason: String,
}

impl StartAt {
    /// Whether this is the default, `Latest`.
    pub fn is_latest(&self) -> bool {
        *self == Self::Latest
    }

    /// Parses an RFC 3339 time (`2026-12-01T09:30:00Z`, `2026-12-01T10:30:00+01:00`).
    pub fn parse_time(input: &str) -> Result<SystemTime, StartAtError> {
        let at: jiff::Timestamp = input.parse().map_err(|e: jiff::Error| StartAtError {
            input: input.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(SystemTime::from(at))
    }
}

impl FromStr for StartAt {
    type Err = StartAtError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input {
            "Latest" => Ok(Self::Latest),
            "Earliest" => Ok(Self::Earliest),
            _ => Self::parse_time(input).map(Self::Time),
        }
    }
}

impl fmt::Display for StartAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("Latest"),
            Self::Earliest => f.write_str("Earliest"),
            Self::Time(t) => match jiff::Timestamp::try_from(*t) {
                Ok(t) => write!(f, "{t}"),
                Err(_) => f.write_str("Earliest"),
            },
        }
    }
}

impl Serialize for StartAt {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StartAt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for StartAt {
    fn schema_name() -> Cow<'static, str> {
        "StartAt".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": START_AT_PATTERN,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn parses_the_three_forms_and_round_trips() {
        assert_eq!("Latest".parse::<StartAt>().unwrap(), StartAt::Latest);
        assert_eq!("Earliest".parse::<StartAt>().unwrap(), StartAt::Earliest);
        let t: StartAt = "2026-12-01T10:30:00+01:00".parse().unwrap();
        assert_eq!(
            t,
            StartAt::Time(UNIX_EPOCH + Duration::from_secs(1_796_117_400))
        );
        assert_eq!(t.to_string(), "2026-12-01T09:30:00Z");
        let yaml: StartAt = serde_yaml::from_str("2026-12-01T09:30:00.250Z").unwrap();
        assert_eq!(
            yaml,
            StartAt::Time(UNIX_EPOCH + Duration::from_millis(1_796_117_400_250))
        );
    }

    #[test]
    fn refuses_what_is_not_a_start_with_the_forms_it_takes() {
        for bad in [
            "latest",
            "",
            "yesterday",
            "2026-12-01",
            "2026-13-01T00:00:00Z",
        ] {
            let error = bad.parse::<StartAt>().unwrap_err().to_string();
            assert!(
                error.contains("Latest, Earliest or an RFC 3339 time"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn the_schema_pattern_takes_what_parses() {
        let pattern = START_AT_PATTERN;
        assert!(pattern.contains("Earliest"));
        for good in ["2026-12-01T09:30:00Z", "2026-12-01T09:30:00.5+02:00"] {
            assert!(good.parse::<StartAt>().is_ok(), "{good}");
        }
    }
}
