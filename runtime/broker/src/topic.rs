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
    // Every routed message's topic comes here: one pass over the bytes rather than one per
    // check (NUL, `+` and `#` are ASCII, never part of a multi-byte character).
    if topic.is_empty() || topic.len() > 65535 {
        return check_common(topic);
    }
    match topic.bytes().find(|&b| matches!(b, 0 | b'+' | b'#')) {
        None => Ok(()),
        // A NUL anywhere is reported first, as `check_common` does for filters.
        Some(_) if topic.as_bytes().contains(&0) => Err(TopicError::Nul),
        Some(_) => Err(TopicError::WildcardInName),
    }
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
///
/// One pass over the bytes (no splitting): pipelines and ACLs call it for every message.
pub fn matches(filter: &str, topic: &str) -> bool {
    let (f, t) = (filter.as_bytes(), topic.as_bytes());
    if t.first() == Some(&b'$') && matches!(f.first(), Some(b'+' | b'#')) {
        return false;
    }
    // A level of the filter that is exactly `c` starts at `i`.
    let whole = |i: usize, c: u8| f[i] == c && f.get(i + 1).is_none_or(|&n| n == b'/');
    // `i` and `j`: the starts of the current levels of filter and topic.
    let (mut i, mut j) = (0, 0);
    loop {
        if i < f.len() && whole(i, b'#') {
            return true;
        }
        if i < f.len() && whole(i, b'+') {
            i += 1;
            while j < t.len() && t[j] != b'/' {
                j += 1;
            }
        } else {
            while i < f.len() && f[i] != b'/' {
                if j == t.len() || t[j] != f[i] {
                    return false;
                }
                i += 1;
                j += 1;
            }
            if j < t.len() && t[j] != b'/' {
                return false;
            }
        }
        // Both at the end of a level: at a `/` or the end.
        match (i == f.len(), j == t.len()) {
            (true, true) => return true,
            (true, false) => return false,
            // The topic ended; the filter matches only if its next level is `#`.
            (false, true) => return i + 1 < f.len() && whole(i + 1, b'#'),
            (false, false) => {
                i += 1;
                j += 1;
            }
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
        assert_eq!(validate_name("a/+/\0"), Err(TopicError::Nul));
        assert_eq!(validate_name("é/ü#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(&"a".repeat(65536)), Err(TopicError::TooLong));
        assert!(validate_name(&"a".repeat(65535)).is_ok());
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

    /// The semantics written the plain way: split into levels.
    fn matches_by_levels(filter: &str, topic: &str) -> bool {
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

    /// `matches` agrees with the split-into-levels definition on every filter and topic of up
    /// to three levels over a small alphabet (wildcards, empty levels, `$`, wildcard
    /// characters inside a level), valid or not.
    #[test]
    fn matching_agrees_with_the_definition_by_levels() {
        let levels = ["", "a", "b", "ab", "+", "#", "$s", "a+", "#a", "+#"];
        let mut strings = Vec::new();
        let mut built: Vec<Vec<&str>> = vec![Vec::new()];
        for _ in 0..3 {
            built = built
                .iter()
                .flat_map(|b| levels.iter().map(move |l| [b.as_slice(), &[*l]].concat()))
                .collect();
            strings.extend(built.iter().map(|b| b.join("/")));
        }
        strings.sort();
        strings.dedup();
        let mut checked = 0;
        for filter in &strings {
            for topic in &strings {
                assert_eq!(
                    matches(filter, topic),
                    matches_by_levels(filter, topic),
                    "filter {filter:?}, topic {topic:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 1_000_000, "{checked}");
    }
}

/// A topic template: `{topic}` is the whole topic, `{N}` its N-th level (from 1), `{N..}`
/// the levels from the N-th on; everything else is literal. Used by uplink forward and
/// downlink rules and pipeline outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Topic,
    Level(usize),
    From(usize),
}

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{template}` has a `{{` without `}}`"))?;
            let inner = &rest[open + 1..open + close];
            let level = |text: &str| match text.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!(
                    "`{template}` has `{{{inner}}}`; use {{topic}}, {{1}}, {{2}}… or {{2..}}"
                )),
            };
            parts.push(match inner {
                "topic" => TemplatePart::Topic,
                _ => match inner.strip_suffix("..") {
                    Some(n) => TemplatePart::From(level(n)?),
                    None => TemplatePart::Level(level(inner)?),
                },
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// The topic for `topic`; `None` when a level it names is missing or the result is not
    /// a valid topic name.
    pub fn render(&self, topic: &str) -> Option<String> {
        let mut out = String::with_capacity(topic.len() + 16);
        self.render_into(topic, &mut out).then_some(out)
    }

    /// [`render`](TopicTemplate::render) into `out` (cleared first), for callers that reuse
    /// one buffer; false (with `out` unspecified) where `render` gives none.
    pub fn render_into(&self, topic: &str, out: &mut String) -> bool {
        out.clear();
        if let [TemplatePart::Topic] = self.parts.as_slice() {
            out.push_str(topic);
            return true;
        }
        // Byte offset of level `n` (1-based) in `topic`; none when it has fewer levels.
        let start = |n: usize| match n {
            1 => Some(0),
            _ => topic.match_indices('/').nth(n - 2).map(|(i, _)| i + 1),
        };
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::Topic => out.push_str(topic),
                TemplatePart::Level(n) => {
                    let Some(from) = start(*n) else {
                        return false;
                    };
                    let to = topic[from..]
                        .find('/')
                        .map_or(topic.len(), |end| from + end);
                    out.push_str(&topic[from..to]);
                }
                TemplatePart::From(n) => {
                    let Some(from) = start(*n) else {
                        return false;
                    };
                    out.push_str(&topic[from..]);
                }
            }
        }
        validate_name(out).is_ok()
    }
}

#[cfg(test)]
mod template_tests {
    use super::TopicTemplate;

    #[test]
    fn renders_topic_levels_and_tails() {
        let t = |template: &str, topic: &str| TopicTemplate::parse(template).unwrap().render(topic);
        assert_eq!(t("{topic}", "a/b").as_deref(), Some("a/b"));
        assert_eq!(t("site1/{topic}", "a/b").as_deref(), Some("site1/a/b"));
        assert_eq!(t("x/{2}/y", "a/b/c").as_deref(), Some("x/b/y"));
        assert_eq!(
            t("control/{3..}", "site1/control/kitchen/led").as_deref(),
            Some("control/kitchen/led")
        );
        assert_eq!(t("x/{4}", "a/b"), None);
        assert_eq!(t("x/{3..}", "a/b"), None);
        assert_eq!(t("{1}/{2}", "a/b").as_deref(), Some("a/b"));
        assert_eq!(t("x/{2}/y", "a//c").as_deref(), Some("x//y"));
        assert_eq!(t("x/{2..}", "a/b/c").as_deref(), Some("x/b/c"));
        assert_eq!(t("x/{1..}", "a/b").as_deref(), Some("x/a/b"));
        assert_eq!(t("x/{3..}", "a/b/").as_deref(), Some("x/"));
        assert_eq!(t("x/{3}", "a/b/").as_deref(), Some("x/"));
        assert_eq!(t("x/{3}", "a/b"), None);
        assert!(TopicTemplate::parse("x/{0}").is_err());
        assert!(TopicTemplate::parse("x/{name}").is_err());
        assert!(TopicTemplate::parse("x/{1").is_err());
    }
}
