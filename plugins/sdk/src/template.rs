//! Topic templates: `alerts/{topic}`, `site/{gateway_id}/{2}/{1}`.
//!
//! `{topic}` is the whole input topic, `{1}`, `{2}`, … its levels (1-based), and other names
//! are fixed values given when the template is parsed (from the plugin's config, usually).
//! Parse once in `init`, render per message.

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Level(usize),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses `template`; `{name}` placeholders other than `topic` and level numbers are
    /// replaced by the matching value of `vars`. An unknown name, `{0}`, an empty or an
    /// unclosed `{` is an error naming the template.
    pub fn parse(template: &str, vars: &[(&str, &str)]) -> Result<Self, Error> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| Error::new(format!("topic template {template:?}: unclosed '{{'")))?;
            let name = &after[..close];
            let part = if name == "topic" {
                Part::Topic
            } else if let Ok(level) = name.parse::<usize>() {
                if level == 0 {
                    return Err(Error::new(format!(
                        "topic template {template:?}: levels count from {{1}}"
                    )));
                }
                Part::Level(level)
            } else if let Some((_, value)) = vars.iter().find(|(k, _)| *k == name) {
                text.push_str(value);
                rest = &after[close + 1..];
                continue;
            } else {
                let known: Vec<&str> = ["topic", "1", "2", "…"]
                    .into_iter()
                    .chain(vars.iter().map(|(k, _)| *k))
                    .collect();
                return Err(Error::new(format!(
                    "topic template {template:?}: unknown placeholder {{{name}}}; known: {}",
                    known.join(", ")
                )));
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &after[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if parts.is_empty() {
            return Err(Error::new("topic template is empty"));
        }
        Ok(Self { parts })
    }

    /// The topic for an input message on `topic`; an error when the template names a level
    /// the topic does not have.
    pub fn render(&self, topic: &str) -> Result<String, Error> {
        let mut out = String::with_capacity(topic.len() + 16);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Topic => out.push_str(topic),
                Part::Level(n) => {
                    let level = topic.split('/').nth(n - 1).ok_or_else(|| {
                        Error::new(format!("topic has fewer than {n} levels for the template"))
                            .or_topic(topic)
                    })?;
                    out.push_str(level);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_topic_levels_and_vars() {
        let t = TopicTemplate::parse("site/{gw}/{2}/{1}/x/{topic}", &[("gw", "pi")]).unwrap();
        assert_eq!(t.render("a/b/c").unwrap(), "site/pi/b/a/x/a/b/c");
        let plain = TopicTemplate::parse("fixed/topic", &[]).unwrap();
        assert_eq!(plain.render("a").unwrap(), "fixed/topic");
    }

    #[test]
    fn missing_level_names_the_topic() {
        let t = TopicTemplate::parse("x/{3}", &[]).unwrap();
        let e = t.render("a/b").unwrap_err();
        assert_eq!(e.topic(), Some("a/b"));
        assert!(e.message().contains("fewer than 3 levels"), "{e}");
    }

    #[test]
    fn bad_templates_are_refused() {
        for (template, why) in [
            ("a/{", "unclosed"),
            ("a/{0}", "from {1}"),
            ("a/{nope}", "unknown placeholder {nope}"),
            ("", "empty"),
        ] {
            let e = TopicTemplate::parse(template, &[("gw", "x")]).unwrap_err();
            assert!(e.message().contains(why), "{template}: {e}");
        }
    }
}
