//! Sizes as Kubernetes quantities (`1000`, `512Ki`, `64Mi`, `1.5Gi`, `1e6`): an integer or a string,
//! checked by pattern at the API server and converted to bytes here.

use std::{borrow::Cow, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The quantity syntax the API server checks for strings (Kubernetes' own `resource.Quantity` form).
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// A size in bytes written as a Kubernetes quantity, kept as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize(String);

impl ByteSize {
    /// A size as written, e.g. `"64Mi"`; checked when converted with [`ByteSize::bytes`].
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The size in whole bytes (fractions round up), or a message saying how to write a size.
    pub fn bytes(&self) -> Result<u64, String> {
        let text = self.0.trim();
        let fail =
            || format!("{text:?} is not a size: write a quantity such as 1000, 512Ki, 64Mi or 1Gi");
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        if number.is_empty() || number == "." {
            return Err(fail());
        }
        let multiplier: f64 = match suffix {
            "" => 1.0,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().map_err(|_| fail())?),
            _ => return Err(fail()),
        };
        let value: f64 = number.parse().map_err(|_| fail())?;
        let bytes = (value * multiplier).ceil();
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(fail());
        }
        Ok(bytes as u64)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a quantity such as 64Mi")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                Ok(ByteSize(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                Ok(ByteSize(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "pattern": QUANTITY_PATTERN,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Result<u64, String> {
        ByteSize::new(s).bytes()
    }

    #[test]
    fn quantities_convert_to_bytes() {
        assert_eq!(bytes("1Mi"), Ok(1_048_576));
        assert_eq!(bytes("512k"), Ok(512_000));
        assert_eq!(bytes("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(bytes("1000"), Ok(1000));
        assert_eq!(bytes("1e6"), Ok(1_000_000));
    }

    #[test]
    fn malformed_sizes_say_how_to_write_one() {
        for bad in ["1.2.3", "10 MB", "", "Mi", "-5"] {
            let err = bytes(bad).unwrap_err();
            assert!(err.contains("64Mi"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn integers_and_strings_both_deserialize() {
        let from_int: ByteSize = serde_json::from_str("1024").unwrap();
        let from_str: ByteSize = serde_json::from_str("\"1Ki\"").unwrap();
        assert_eq!(from_int.bytes(), from_str.bytes());
    }
}
