//! Human-readable durations (`30s`, `1m30s`, `250ms`) and sizes (`64MiB`, `1KB`, `512`),
//! parsed once at load time into typed values.

use std::{fmt, time::Duration as StdDuration};

use serde::{Deserialize, Deserializer, de};

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
