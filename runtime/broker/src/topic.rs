//! Topic names and filters: validation per MQTT 3.1.1 §4.7 / 5.0 §4.7 and matching.

use std::fmt;

/// Why a topic name or filter is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic contains U+0000")]
    Nul,
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    #[error("a topic name must not contain the wildcards `+` or `#`")]
    WildcardInName,
    #[error("`+` must occupy a whole topic level")]
    BadPlus,
    #[error("`#` must be the last character and occupy a whole topic level")]
    BadHash,
    #[error(
        "shared subscription must be `$share/<group>/<filter>` with a non-empty group free of `+`, `#` and `/`"
    )]
    BadShare,
}

/// Validates a topic name as used in PUBLISH.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Validates a topic filter as used in SUBSCRIBE (without a `$share/` prefix).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadPlus);
        }
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(TopicError::BadHash);
        }
    }
    Ok(())
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// A subscription filter, possibly shared (`$share/group/filter`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Filter {
    /// The filter that is matched against topics.
    pub filter: String,
    /// The share group, for `$share/{group}/{filter}`.
    pub share: Option<String>,
}

impl Filter {
    /// Parses and validates a filter as it appears in SUBSCRIBE.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        if let Some(rest) = text.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::BadShare);
            }
            validate_filter(filter)?;
            Ok(Self {
                filter: filter.to_string(),
                share: Some(group.to_string()),
            })
        } else {
            validate_filter(text)?;
            Ok(Self {
                filter: text.to_string(),
                share: None,
            })
        }
    }

    pub fn has_wildcard(&self) -> bool {
        self.filter.contains(['+', '#'])
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.share {
            Some(group) => write!(f, "$share/{group}/{}", self.filter),
            None => f.write_str(&self.filter),
        }
    }
}

/// Does `filter` match `topic`? The reference semantics the topic tree must agree with:
/// `+` matches one level, `#` the rest (including the parent level), and a topic starting
/// with `$` is not matched by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("/").is_ok());
        assert!(validate_name("a//b").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Nul));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/+/c", "a/#", "+/+", "/+", "$SYS/#", "a//b"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(validate_filter("a/b#"), Err(TopicError::BadHash));
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::BadHash));
        assert_eq!(validate_filter("a+/b"), Err(TopicError::BadPlus));
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared() {
        let f = Filter::parse("$share/g1/a/+").unwrap();
        assert_eq!(f.share.as_deref(), Some("g1"));
        assert_eq!(f.filter, "a/+");
        assert_eq!(Filter::parse("$share/g1"), Err(TopicError::BadShare));
        assert_eq!(Filter::parse("$share//a"), Err(TopicError::BadShare));
        assert_eq!(Filter::parse("$share/g+/a"), Err(TopicError::BadShare));
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+/+", "/a"));
        assert!(matches("a/+/c", "a//c"));
        assert!(!matches("a/b", "a/b/c"));
    }
}
