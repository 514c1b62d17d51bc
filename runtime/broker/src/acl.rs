//! Access control lists: which topics a client may publish to and subscribe to.
//!
//! Rules are checked in order and the first one that applies decides; when none applies
//! the list's default decides. A rule applies to a client when
//! - its `user` is absent (every client, anonymous ones included), `*` (every client with
//!   an authenticated user name, never an anonymous one) or that exact user name, and
//! - its `client_id` is absent, `*`, or that exact client id, and
//! - its action covers the operation (`all` covers both), and
//! - one of its topic filters, after substituting `%u` (user name) and `%c` (client id),
//!   fits the operation:
//!   - **publish**: the filter matches the PUBLISH topic ([`crate::topic::matches`]);
//!   - **subscribe, allow rule**: the filter *covers* the subscription filter: every topic
//!     the subscription can receive is matched by the rule (`a/#` covers `a/b/+`, `a/+`
//!     does not cover `a/#`);
//!   - **subscribe, deny rule**: the filter and the subscription filter *intersect*: some
//!     topic is matched by both (`deny test/secret` refuses `test/+` and `#`).
//!
//! So a subscription is granted only if it can never receive a topic a deny rule before
//! the granting rule names: messages are not filtered per subscriber at delivery time.
//! A shared subscription (`$share/group/filter`) is checked as its `filter`.
//!
//! Substitution is fail-closed: a rule with `%u` never applies to an anonymous client, and
//! when the substituted value contains `+`, `#` or `/` or starts with `$` (it would widen
//! the filter or leave the client's namespace) an allow rule does not apply while a deny
//! rule applies to every topic.
//!
//! A client's rules are resolved once at CONNECT into a [`ClientAcl`], so the per-message
//! check allocates nothing.

use crate::topic;

/// What a rule does when it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Allow,
    Deny,
}

/// Which operations a rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    All,
}

impl Action {
    fn covers(self, operation: Operation) -> bool {
        matches!(
            (self, operation),
            (Action::All, _)
                | (Action::Publish, Operation::Publish)
                | (Action::Subscribe, Operation::Subscribe)
        )
    }
}

/// The operation being checked; also the metric label of a denial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

impl Operation {
    pub fn label(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
        }
    }
}

/// Which user names or client ids a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// `*`: for `user`, every authenticated user; for `client_id`, every client.
    Any,
    Exact(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclRule {
    pub permission: Permission,
    pub action: Action,
    /// `None`: every client, anonymous ones included.
    pub user: Option<Selector>,
    /// `None`: every client.
    pub client_id: Option<Selector>,
    /// Topic filters, `%u` and `%c` substituted per client.
    pub topics: Vec<String>,
}

/// The broker's ACL. The default allows everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclSettings {
    /// What happens when no rule applies.
    pub default: Permission,
    pub rules: Vec<AclRule>,
}

impl Default for AclSettings {
    fn default() -> Self {
        Self {
            default: Permission::Allow,
            rules: Vec::new(),
        }
    }
}

/// A rule the broker cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ACL rule {rule}, topic `{topic}`: {message}")]
pub struct AclError {
    pub rule: usize,
    pub topic: String,
    pub message: String,
}

impl AclSettings {
    /// Checks every rule's filters (with `%u`/`%c` standing for one level).
    pub fn validate(&self) -> Result<(), AclError> {
        for (index, rule) in self.rules.iter().enumerate() {
            for filter in &rule.topics {
                let error = |message: String| AclError {
                    rule: index,
                    topic: filter.clone(),
                    message,
                };
                let probe = substitute(filter, Some("u"), "c")
                    .ok_or_else(|| error("`%` must start `%u` or `%c`".into()))?;
                topic::validate_filter(&probe).map_err(|e| error(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Resolves the rules for one client: keeps those that apply to it and substitutes
    /// `%u`/`%c`.
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let mut rules = Vec::new();
        for rule in &self.rules {
            let user_applies = match (&rule.user, user) {
                (None, _) => true,
                (Some(Selector::Any), Some(_)) => true,
                (Some(Selector::Exact(want)), Some(name)) => want == name,
                (Some(_), None) => false,
            };
            let client_applies = match &rule.client_id {
                None | Some(Selector::Any) => true,
                Some(Selector::Exact(want)) => want == client_id,
            };
            if !user_applies || !client_applies {
                continue;
            }
            let mut filters = Some(Vec::with_capacity(rule.topics.len()));
            for filter in &rule.topics {
                if filter.contains("%u") && user.is_none() {
                    // %u names no namespace for an anonymous client.
                    continue;
                }
                let unsafe_value = (filter.contains("%u") && user.is_some_and(widens))
                    || (filter.contains("%c") && widens(client_id));
                if unsafe_value {
                    match rule.permission {
                        Permission::Allow => continue,
                        Permission::Deny => {
                            filters = None;
                            break;
                        }
                    }
                }
                match substitute(filter, user, client_id) {
                    Some(resolved) => {
                        if let Some(list) = &mut filters {
                            list.push(resolved.into_boxed_str());
                        }
                    }
                    // Validation refuses these; skip rather than guess.
                    None => continue,
                }
            }
            // A rule left without filters (all need a user this client lacks) does not apply.
            if filters.as_ref().is_none_or(|list| !list.is_empty()) {
                rules.push(ClientRule {
                    permission: rule.permission,
                    action: rule.action,
                    filters,
                });
            }
        }
        ClientAcl {
            default: self.default,
            rules,
        }
    }
}

/// Would this value, substituted into a filter, widen it or leave the client's namespace?
fn widens(value: &str) -> bool {
    value.contains(['+', '#', '/', '\0']) || value.starts_with('$')
}

/// `%u` → user, `%c` → client id; `None` for another `%` sequence or `%u` without a user.
fn substitute(filter: &str, user: Option<&str>, client_id: &str) -> Option<String> {
    if !filter.contains('%') {
        return Some(filter.to_string());
    }
    let mut out = String::with_capacity(filter.len() + 16);
    let mut chars = filter.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => out.push_str(user?),
            Some('c') => out.push_str(client_id),
            _ => return None,
        }
    }
    Some(out)
}

/// One client's rules, resolved at CONNECT.
#[derive(Clone, Debug)]
pub struct ClientAcl {
    default: Permission,
    rules: Vec<ClientRule>,
}

#[derive(Clone, Debug)]
struct ClientRule {
    permission: Permission,
    action: Action,
    /// `None`: every topic (a deny rule whose substitution was unsafe).
    filters: Option<Vec<Box<str>>>,
}

impl ClientAcl {
    /// Everything allowed (no ACL configured).
    pub fn allow_all() -> Self {
        Self {
            default: Permission::Allow,
            rules: Vec::new(),
        }
    }

    /// True when no rule applies and the default allows: every check passes.
    pub fn allows_everything(&self) -> bool {
        self.rules.is_empty() && self.default == Permission::Allow
    }

    /// May the client publish to `topic` (a valid topic name)?
    pub fn may_publish(&self, topic_name: &str) -> bool {
        self.decide(Operation::Publish, |rule| match &rule.filters {
            None => true,
            Some(filters) => filters.iter().any(|f| topic::matches(f, topic_name)),
        })
    }

    /// May the client subscribe to `filter` (a valid filter without `$share/group/`)?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.decide(Operation::Subscribe, |rule| match &rule.filters {
            None => true,
            Some(filters) => filters.iter().any(|f| match rule.permission {
                Permission::Allow => covers(f, filter),
                Permission::Deny => intersects(f, filter),
            }),
        })
    }

    fn decide(&self, operation: Operation, fits: impl Fn(&ClientRule) -> bool) -> bool {
        let permission = self
            .rules
            .iter()
            .filter(|rule| rule.action.covers(operation))
            .find(|rule| fits(rule))
            .map_or(self.default, |rule| rule.permission);
        permission == Permission::Allow
    }
}

/// Can a filter whose first level is `first` match a topic starting with `$`? Only when
/// that level is a literal starting with `$` (wildcards at the first level never match
/// `$` topics).
fn reaches_dollar(first: &str) -> bool {
    first.starts_with('$')
}

fn leading_wildcard(first: &str) -> bool {
    first == "+" || first == "#"
}

/// Does `rule` match every topic that `sub` matches? Both are valid filters.
pub fn covers(rule: &str, sub: &str) -> bool {
    let (rule_first, sub_first) = (first_level(rule), first_level(sub));
    if leading_wildcard(rule_first) && reaches_dollar(sub_first) {
        return false;
    }
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    let mut first = true;
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            // `sub` ends; `a/#` also matches `a`, so only a closing `#` covers the rest.
            (Some(_), None) => return false,
            (None, None) => return true,
            (None, Some(_)) => return false,
            // A leading `#` matches one level or more, which `+/#` matches too; further in,
            // `#` also matches its parent, which only `#` matches.
            (Some("+"), Some("#")) => return first && r.eq(["#"]),
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        first = false;
    }
}

/// Is there a topic that both filters match? Both are valid filters.
pub fn intersects(a: &str, b: &str) -> bool {
    let (a_first, b_first) = (first_level(a), first_level(b));
    if (leading_wildcard(a_first) && reaches_dollar(b_first))
        || (leading_wildcard(b_first) && reaches_dollar(a_first))
    {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            // One ends: the other matches the same topic only through a closing `#`.
            (None, Some(rest)) | (Some(rest), None) => return rest == "#",
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

fn first_level(filter: &str) -> &str {
    filter.split('/').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rule(permission: Permission, action: Action, topics: &[&str]) -> AclRule {
        AclRule {
            permission,
            action,
            user: None,
            client_id: None,
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn coverage() {
        for (rule, sub) in [
            ("#", "#"),
            ("#", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/#", "a/b/+"),
            ("a/#", "a/+/#"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/+", "a/+"),
            ("$SYS/#", "$SYS/broker/+"),
            ("a/b", "a/b"),
            ("#", "+/x"),
            ("+/#", "#"),
        ] {
            assert!(covers(rule, sub), "{rule} covers {sub}");
        }
        for (rule, sub) in [
            ("a/+", "a/#"),
            ("a/+", "a/b/c"),
            ("a/b", "a/+"),
            ("a/+/#", "a/#"),
            ("a/b", "a"),
            ("a", "a/b"),
            ("#", "$SYS/#"),
            ("+/#", "$SYS/x"),
            ("a/+", "a"),
            ("sensors/alice/#", "sensors/+/temp"),
            ("a/+/#", "a/#"),
            ("+/+/#", "#"),
        ] {
            assert!(!covers(rule, sub), "{rule} does not cover {sub}");
        }
    }

    #[test]
    fn intersection() {
        for (a, b) in [
            ("test/nosubscribe", "#"),
            ("test/nosubscribe", "test/+"),
            ("test/nosubscribe", "+/nosubscribe"),
            ("a/#", "a"),
            ("a/+", "+/b"),
            ("a/b/c", "a/#"),
            ("$SYS/x", "$SYS/#"),
            ("+/+", "a/+"),
        ] {
            assert!(intersects(a, b), "{a} meets {b}");
            assert!(intersects(b, a), "{b} meets {a}");
        }
        for (a, b) in [
            ("test/nosubscribe", "test/other"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/#"),
            ("a/b", "a/b/c"),
        ] {
            assert!(!intersects(a, b), "{a} and {b} share no topic");
            assert!(!intersects(b, a), "{b} and {a} share no topic");
        }
    }

    /// Topics over a small alphabet, so that random filters often overlap.
    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..4)
            .prop_map(|levels| levels.join("/"))
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", "", "+"]), 0..4),
            any::<bool>(),
        )
            .prop_filter_map("a filter has a level", |(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                (!levels.is_empty()).then(|| levels.join("/"))
            })
    }

    proptest! {
        /// Model check against `topic::matches` over every topic of up to 4 levels.
        #[test]
        fn coverage_and_intersection_agree_with_matching(
            a in filter_strategy(),
            b in filter_strategy(),
        ) {
            let levels = ["a", "b", "$s", "", "c"];
            let mut topics = Vec::new();
            for n in 1..=4u32 {
                for i in 0..levels.len().pow(n) {
                    let mut i = i;
                    let mut t = Vec::new();
                    for _ in 0..n {
                        t.push(levels[i % levels.len()]);
                        i /= levels.len();
                    }
                    topics.push(t.join("/"));
                }
            }
            let both = topics.iter().any(|t| topic::matches(&a, t) && topic::matches(&b, t));
            prop_assert_eq!(intersects(&a, &b), both, "intersects({}, {})", a, b);
            let covered = topics.iter().all(|t| !topic::matches(&b, t) || topic::matches(&a, t));
            prop_assert_eq!(covers(&a, &b), covered, "covers({}, {})", a, b);
        }

        #[test]
        fn publish_check_is_topic_matching(f in filter_strategy(), t in topic_strategy()) {
            let acl = AclSettings {
                default: Permission::Deny,
                rules: vec![rule(Permission::Allow, Action::Publish, &[&f])],
            };
            prop_assert_eq!(acl.for_client(None, "c").may_publish(&t), topic::matches(&f, &t));
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let acl = AclSettings {
            default: Permission::Allow,
            rules: vec![
                rule(Permission::Deny, Action::Subscribe, &["test/nosubscribe"]),
                rule(Permission::Allow, Action::All, &["test/#"]),
                rule(Permission::Deny, Action::Publish, &["test/#", "other/+"]),
            ],
        };
        let client = acl.for_client(Some("alice"), "c1");
        assert!(!client.may_subscribe("test/nosubscribe"));
        assert!(
            !client.may_subscribe("test/+"),
            "could receive the denied topic"
        );
        assert!(!client.may_subscribe("#"));
        assert!(client.may_subscribe("test/other"), "allowed by rule 2");
        assert!(
            client.may_publish("test/nosubscribe"),
            "rule 1 is subscribe only"
        );
        assert!(client.may_publish("test/x"), "rule 2 wins over rule 3");
        assert!(!client.may_publish("other/x"));
        assert!(client.may_publish("other/x/y"), "default");
        assert!(client.may_subscribe("other/#"), "rule 3 is publish only");
    }

    #[test]
    fn default_deny_needs_a_covering_allow() {
        let acl = AclSettings {
            default: Permission::Deny,
            rules: vec![rule(Permission::Allow, Action::All, &["sensors/#"])],
        };
        let client = acl.for_client(None, "c");
        assert!(client.may_subscribe("sensors/+/temp"));
        assert!(!client.may_subscribe("#"), "partly outside sensors/#");
        assert!(client.may_publish("sensors/a"));
        assert!(!client.may_publish("other"));
    }

    #[test]
    fn users_and_client_ids() {
        let mut by_user = rule(Permission::Allow, Action::All, &["alice/#"]);
        by_user.user = Some(Selector::Exact("alice".into()));
        let mut any_user = rule(Permission::Allow, Action::All, &["users/#"]);
        any_user.user = Some(Selector::Any);
        let mut by_client = rule(Permission::Allow, Action::All, &["devices/#"]);
        by_client.client_id = Some(Selector::Exact("dev-1".into()));
        let acl = AclSettings {
            default: Permission::Deny,
            rules: vec![by_user, any_user, by_client],
        };
        let alice = acl.for_client(Some("alice"), "x");
        assert!(alice.may_publish("alice/a"));
        assert!(alice.may_publish("users/a"));
        assert!(!alice.may_publish("devices/a"));
        let bob = acl.for_client(Some("bob"), "dev-1");
        assert!(!bob.may_publish("alice/a"));
        assert!(bob.may_publish("users/a"));
        assert!(bob.may_publish("devices/a"));
        let anonymous = acl.for_client(None, "y");
        assert!(
            !anonymous.may_publish("users/a"),
            "`*` means authenticated users"
        );
        assert!(!anonymous.may_publish("alice/a"));
    }

    #[test]
    fn substitution() {
        let acl = AclSettings {
            default: Permission::Deny,
            rules: vec![
                rule(Permission::Allow, Action::All, &["sensors/%u/#"]),
                rule(Permission::Allow, Action::Publish, &["clients/%c/status"]),
            ],
        };
        let alice = acl.for_client(Some("alice"), "dev-7");
        assert!(alice.may_publish("sensors/alice/temp"));
        assert!(alice.may_subscribe("sensors/alice/#"));
        assert!(!alice.may_publish("sensors/bob/temp"));
        assert!(!alice.may_subscribe("sensors/+/temp"));
        assert!(alice.may_publish("clients/dev-7/status"));
        assert!(!alice.may_publish("clients/dev-8/status"));

        let anonymous = acl.for_client(None, "dev-7");
        assert!(!anonymous.may_publish("sensors/%u/temp"));
        assert!(!anonymous.may_publish("sensors//temp"));
        assert!(
            anonymous.may_publish("clients/dev-7/status"),
            "%c still applies"
        );

        // A user name with wildcards or levels does not widen an allow rule.
        for name in ["+", "#", "a/b", "$SYS"] {
            let sneaky = acl.for_client(Some(name), "ok");
            assert!(!sneaky.may_publish("sensors/x/temp"), "{name}");
            assert!(!sneaky.may_publish("sensors/a/b/temp"), "{name}");
            assert!(!sneaky.may_subscribe("sensors/#"), "{name}");
        }
    }

    #[test]
    fn unsafe_substitution_in_a_deny_rule_denies_everything() {
        let acl = AclSettings {
            default: Permission::Allow,
            rules: vec![rule(Permission::Deny, Action::Publish, &["private/%c/#"])],
        };
        assert!(acl.for_client(None, "a").may_publish("private/b/x"));
        assert!(!acl.for_client(None, "a").may_publish("private/a/x"));
        let sneaky = acl.for_client(None, "+");
        assert!(!sneaky.may_publish("anything"));
        assert!(sneaky.may_subscribe("anything"), "publish-only rule");
        // %u in a deny rule does not apply to anonymous clients (documented).
        let acl = AclSettings {
            default: Permission::Allow,
            rules: vec![rule(Permission::Deny, Action::All, &["private/%u/#"])],
        };
        assert!(acl.for_client(None, "a").may_publish("private/x/y"));
        assert!(!acl.for_client(Some("x"), "a").may_publish("private/x/y"));
    }

    #[test]
    fn validation() {
        let ok = AclSettings {
            default: Permission::Allow,
            rules: vec![rule(Permission::Allow, Action::All, &["a/%u/%c/#", "+"])],
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in ["a/#/b", "a/%x", "a+", ""] {
            let acl = AclSettings {
                default: Permission::Allow,
                rules: vec![
                    rule(Permission::Allow, Action::All, &["fine"]),
                    rule(Permission::Allow, Action::All, &[bad]),
                ],
            };
            let error = acl.validate().unwrap_err();
            assert_eq!((error.rule, error.topic.as_str()), (1, bad));
        }
    }

    #[test]
    fn no_rules_allows_everything_and_costs_nothing() {
        let client = AclSettings::default().for_client(None, "c");
        assert!(client.rules.is_empty());
        assert!(client.allows_everything());
        let deny_by_default = AclSettings {
            default: Permission::Deny,
            rules: Vec::new(),
        };
        assert!(!deny_by_default.for_client(None, "c").allows_everything());
        assert!(!deny_by_default.for_client(None, "c").may_subscribe("a"));
        assert!(client.may_publish("$SYS/x"));
        assert!(client.may_subscribe("#"));
        assert!(ClientAcl::allow_all().may_subscribe("a/b"));
    }
}
