//! A plugin stage's `config:` value, any YAML, turned into the JSON text its `init` receives.
//!
//! The JSON is written while the YAML is read rather than from a `serde_norway::Value`: a
//! value JSON cannot hold (a mapping as a key, `.nan`, a tag, a 128-bit integer) then fails
//! inside its own deserializer call, which is what gives the error its line and column, and
//! mapping keys keep the order they are written in. Scalar keys (`1:`, `true:`) become JSON
//! strings; a key written twice is an error rather than a silent overwrite.

use std::{collections::HashSet, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// Compact JSON text of one YAML value.
pub struct JsonText(pub String);

/// Any value: what JSON cannot hold (`.nan`, tags) is not visible in the JSON form the
/// schema checks.
impl schemars::JsonSchema for JsonText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JsonText".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!(true)
    }
}

impl<'de> serde::Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor).map(JsonText)
    }
}

struct ValueVisitor;

/// JSON text of a string (quoted and escaped).
fn quote<E: de::Error>(text: &str) -> Result<String, E> {
    serde_json::to_string(text).map_err(E::custom)
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value that JSON can represent")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        Err(too_large(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        Err(too_large(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        serde_json::Number::from_f64(v)
            .map(|n| n.to_string())
            .ok_or_else(|| {
                E::custom(format!(
                    "`{v}` has no JSON form (JSON numbers are finite); quote it to pass a string"
                ))
            })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        quote(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok("null".into())
    }

    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Ok("null".into())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        let mut out = String::from("[");
        while let Some(JsonText(element)) = seq.next_element()? {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&element);
        }
        out.push(']');
        Ok(out)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut seen = HashSet::new();
        let mut out = String::from("{");
        while let Some(key) = map.next_key_seed(KeySeed(&seen))? {
            let JsonText(value) = map.next_value()?;
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&quote::<A::Error>(&key)?);
            out.push(':');
            out.push_str(&value);
            seen.insert(key);
        }
        out.push('}');
        Ok(out)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<String, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!(
            "the tag `!{tag}` has no JSON form; remove it (quote the value to pass a string)"
        )))
    }
}

fn too_large<E: de::Error>(v: impl fmt::Display) -> E {
    E::custom(format!(
        "integer {v} does not fit in 64 bits; quote it to pass it as a string"
    ))
}

/// Reads one mapping key as a JSON object key, refusing keys already in the mapping.
struct KeySeed<'a>(&'a HashSet<String>);

impl KeySeed<'_> {
    fn fresh<E: de::Error>(self, key: String) -> Result<String, E> {
        if self.0.contains(&key) {
            return Err(E::custom(format!(
                "key `{key}` appears twice in this mapping (JSON object keys are strings, so `1` and \"1\" are the same key)"
            )));
        }
        Ok(key)
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a mapping key that is a string, number or boolean (JSON object keys are strings)",
        )
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.fresh(v.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        self.fresh("null".into())
    }
}
