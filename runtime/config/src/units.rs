//! Human-readable durations (`30s`, `1m30s`, `250ms`) and sizes (`64MiB`, `1KB`, `512`),
//! parsed once at load time into typed values.

use std::{borrow::Cow, fmt, time::Duration as StdDuration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration written with units, e.g. `30s`, `1m30s`, `250ms`, `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }

    pub fn as_std(self) -> StdDuration {
        self.0
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hint = "write a number with a unit, e.g. `250ms`, `30s`, `5m`, `1h`, `1m30s`";
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("empty duration; {hint}"));
        }
        let mut total = StdDuration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!("invalid duration `{text}`; {hint}"));
            }
            let value: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("number too large in duration `{text}`"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let part = match unit {
                "ms" => StdDuration::from_millis(value),
                "s" => StdDuration::from_secs(value),
                "m" => StdDuration::from_secs(value.saturating_mul(60)),
                "h" => StdDuration::from_secs(value.saturating_mul(3600)),
                "d" => StdDuration::from_secs(value.saturating_mul(86400)),
                "" => return Err(format!("duration `{text}` has no unit; {hint}")),
                other => {
                    return Err(format!(
                        "unknown unit `{other}` in duration `{text}`; units are ms, s, m, h, d"
                    ));
                }
            };
            total = total.saturating_add(part);
        }
        Ok(Self(total))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, e.g. `30s`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "duration `{v}` has no unit; write e.g. `{v}s` or `{v}ms`"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "duration `{v}` has no unit; write e.g. `{v}s` or `{v}ms`"
                )))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The shortest form, `7d` rather than `604800s` (the schema's defaults show it).
impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        if ms == 0 {
            return serializer.serialize_str("0s");
        }
        let units: [(&str, u128); 5] = [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
            ("ms", 1),
        ];
        let (unit, size) = units
            .into_iter()
            .find(|(_, size)| ms.is_multiple_of(*size))
            .unwrap_or(("ms", 1));
        serializer.collect_str(&format_args!("{}{unit}", ms / size))
    }
}

/// What [`Duration::from_str`](std::str::FromStr) accepts: after trimming, one or more
/// `<digits><unit>` parts.
pub(crate) const DURATION_PATTERN: &str = r"^\s*(?:[0-9]+(?:ms|s|m|h|d))+\s*$";

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: whole numbers with units ms, s, m, h, d, e.g. `250ms`, `30s`, `1m30s`, `7d`.",
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

/// A size in bytes written with units, e.g. `512`, `64KiB`, `1MiB`, `1GB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hint = "write a number with an optional unit: B, KiB, MiB, GiB, KB, MB, GB";
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        if digits == 0 {
            return Err(format!("invalid size `{text}`; {hint}"));
        }
        let value: u64 = text[..digits]
            .parse()
            .map_err(|_| format!("number too large in size `{text}`"))?;
        let multiplier: u64 = match text[digits..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => return Err(format!("unknown unit `{other}` in size `{text}`; {hint}")),
        };
        value
            .checked_mul(multiplier)
            .map(Self)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size, e.g. `64KiB` or `1MiB`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What [`ByteSize::from_str`](std::str::FromStr) accepts as text.
pub(crate) const SIZE_PATTERN: &str = r"^\s*[0-9]+\s*(?:B|KiB|MiB|GiB|TiB|KB|kB|MB|GB|TB)?\s*$";

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size in bytes: a number, or a number with a unit B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. `64KiB`.",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": SIZE_PATTERN },
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "30s".parse::<Duration>().unwrap().0,
            StdDuration::from_secs(30)
        );
        assert_eq!(
            "250ms".parse::<Duration>().unwrap().0,
            StdDuration::from_millis(250)
        );
        assert_eq!(
            "1m30s".parse::<Duration>().unwrap().0,
            StdDuration::from_secs(90)
        );
        assert_eq!(
            "2h".parse::<Duration>().unwrap().0,
            StdDuration::from_secs(7200)
        );
        assert!("30".parse::<Duration>().unwrap_err().contains("no unit"));
        assert!(
            "3x".parse::<Duration>()
                .unwrap_err()
                .contains("unknown unit `x`")
        );
        assert!("s".parse::<Duration>().is_err());
        assert!("".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("1 MB".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert!(
            "1XB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
    }
}
