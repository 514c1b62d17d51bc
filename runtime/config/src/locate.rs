//! Positions of values in the YAML text, found through `serde_norway`'s error locations.

use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

/// One step of a key path: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

impl PathSeg {
    pub fn key(name: &str) -> Self {
        Self::Key(name.to_string())
    }
}

const HERE: &str = "\u{0}edgegw-probe";

/// Line and column (1-based) of the value at `path`, or `None` when the path is not in the text.
pub fn locate(text: &str, path: &[PathSeg]) -> Option<(usize, usize)> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    match (Probe {
        path,
        at_key: false,
    })
    .deserialize(deserializer)
    {
        Err(error) if error.to_string().contains(HERE) => {
            error.location().map(|l| (l.line(), l.column()))
        }
        _ => None,
    }
}

/// Line and column of the *key* that ends `path` (for errors about the key itself).
pub fn locate_key(text: &str, path: &[PathSeg]) -> Option<(usize, usize)> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    match (Probe { path, at_key: true }).deserialize(deserializer) {
        Err(error) if error.to_string().contains(HERE) => {
            error.location().map(|l| (l.line(), l.column()))
        }
        _ => None,
    }
}

struct Probe<'p> {
    path: &'p [PathSeg],
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(ProbeVisitor(self.path, self.at_key))
    }
}

struct ProbeVisitor<'p>(&'p [PathSeg], bool);

macro_rules! stop_here {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $ty) -> Result<(), E> {
            // A value alone where a list may stand (`from: "a/#"`) is its own element 0. This
            // holds for any path: for a plain list field serde refuses a scalar before
            // validation locates anything, so only one-or-a-list fields reach it.
            if self.0.is_empty() || matches!(self.0, [PathSeg::Index(0)]) {
                Err(E::custom(HERE))
            } else {
                Ok(())
            }
        }
    )*};
}

impl<'de> Visitor<'de> for ProbeVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    stop_here!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(HERE))
        } else {
            Ok(())
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        let stop_at = match first {
            PathSeg::Key(want) if rest.is_empty() && self.1 => Some(want.as_str()),
            _ => None,
        };
        while let Some(key) = map.next_key_seed(KeySeed(stop_at))? {
            match (first, key.as_str()) {
                (PathSeg::Key(want), Some(got)) if want == got => {
                    map.next_value_seed(Probe {
                        path: rest,
                        at_key: self.1,
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        let mut index = 0;
        loop {
            if matches!(first, PathSeg::Index(i) if *i == index) {
                if seq
                    .next_element_seed(Probe {
                        path: rest,
                        at_key: self.1,
                    })?
                    .is_none()
                {
                    break;
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(())
    }
}

/// Reads a mapping key; fails (marking the key's position) when it equals the wanted one.
struct KeySeed<'p>(Option<&'p str>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = serde_norway::Value;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        let Some(want) = self.0 else {
            return <serde_norway::Value as serde::Deserialize>::deserialize(deserializer);
        };
        deserializer.deserialize_any(KeyVisitor(want))
    }
}

struct KeyVisitor<'p>(&'p str);

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = serde_norway::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v == self.0 {
            Err(E::custom(HERE))
        } else {
            Ok(serde_norway::Value::String(v.to_string()))
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(serde_norway::Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(serde_norway::Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(serde_norway::Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_norway::Value::Number(v.into()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(serde_norway::Value::Null)
    }
}

/// Deserializes the value of top-level key `name` as `T`, ignoring every other section.
/// `Ok(None)` when the section is absent or empty (`broker:` with nothing under it).
pub fn deserialize_section<T: DeserializeOwned>(
    text: &str,
    name: &'static str,
) -> Result<Option<T>, serde_norway::Error> {
    struct Section<T>(&'static str, std::marker::PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for Section<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of sections")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key::<serde_norway::Value>()? {
                if key.as_str() == Some(self.0) {
                    found = map.next_value::<Option<T>>()?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }

    use serde::Deserializer as _;
    serde_norway::Deserializer::from_str(text)
        .deserialize_any(Section::<T>(name, std::marker::PhantomData))
}
