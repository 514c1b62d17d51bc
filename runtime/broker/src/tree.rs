//! The subscription tree: one node per topic level; a node's `+` and `#` children sit beside
//! its hashed children, so matching a level costs one hash lookup, not three.
//!
//! Matching walks only the branches a topic can reach, so its cost follows the topic's depth
//! and the number of wildcard branches, not the number of subscriptions. Shared subscriptions
//! (`$share/{group}/{filter}`) live in their node as groups; a match picks one member per
//! group, round robin, preferring members that are connected.

use std::{
    collections::HashMap,
    str::Split,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{message::QoS, session::Session};

/// Options a subscriber chose for one filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    /// v5: do not deliver messages this session published itself.
    pub no_local: bool,
    /// v5: keep the publisher's retain flag on normal delivery.
    pub retain_as_published: bool,
    /// v5: 0 send retained on subscribe, 1 only if the subscription is new, 2 never.
    pub retain_handling: u8,
    /// v5 subscription identifier.
    pub subscription_id: Option<u32>,
}

impl SubOptions {
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }
}

#[derive(Clone)]
pub struct Entry {
    pub session: Arc<Session>,
    pub options: SubOptions,
}

struct Group {
    name: Box<str>,
    members: Vec<Entry>,
    next: AtomicUsize,
}

/// Topic levels are short strings hashed on every publish: foldhash is several times faster than
/// the standard SipHash there, and still seeded per process.
type Children = HashMap<Box<str>, Node, foldhash::fast::RandomState>;

#[derive(Default)]
struct Node {
    /// Children by level, wildcards excepted.
    children: Children,
    /// The `+` child.
    plus: Option<Box<Node>>,
    /// The `#` child.
    hash: Option<Box<Node>>,
    subscribers: Vec<Entry>,
    groups: Vec<Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subscribers.is_empty()
            && self.groups.is_empty()
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node {
        match level {
            "+" => self.plus.get_or_insert_default(),
            "#" => self.hash.get_or_insert_default(),
            _ => self.children.entry(level.into()).or_default(),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }
}

/// Subscriptions by filter. Not synchronised itself: the router guards it.
#[derive(Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces the subscription of `entry.session` to `filter`; returns true when
    /// it replaced an existing one.
    pub fn insert(&mut self, filter: &str, share: Option<&str>, entry: Entry) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level);
        }
        let id = entry.session.id;
        let list = match share {
            None => &mut node.subscribers,
            Some(name) => {
                let position = node.groups.iter().position(|g| &*g.name == name);
                let index = match position {
                    Some(i) => i,
                    None => {
                        node.groups.push(Group {
                            name: name.into(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.groups.len() - 1
                    }
                };
                &mut node.groups[index].members
            }
        };
        if let Some(existing) = list.iter_mut().find(|e| e.session.id == id) {
            *existing = entry;
            true
        } else {
            list.push(entry);
            self.count += 1;
            false
        }
    }

    /// Removes the subscription of session `id` to `filter`; returns whether it existed.
    pub fn remove(&mut self, filter: &str, share: Option<&str>, id: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, share, id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Calls `visit(entry, shared)` for each subscription matching `topic`; for a shared
    /// group, once with the chosen member and `shared` set.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&Entry, bool)) {
        let dollar = topic.starts_with('$');
        let mut levels = topic.split('/');
        let first = levels.next().unwrap_or("");
        walk(&self.root, first, levels, !dollar, &mut visit);
    }
}

fn remove_at(node: &mut Node, levels: &[&str], share: Option<&str>, id: u64) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match share {
            None => {
                let before = node.subscribers.len();
                node.subscribers.retain(|e| e.session.id != id);
                before != node.subscribers.len()
            }
            Some(name) => {
                let Some(index) = node.groups.iter().position(|g| &*g.name == name) else {
                    return false;
                };
                let group = &mut node.groups[index];
                let before = group.members.len();
                group.members.retain(|e| e.session.id != id);
                let removed = before != group.members.len();
                if group.members.is_empty() {
                    node.groups.swap_remove(index);
                }
                removed
            }
        };
    };
    let Some(child) = node.child_mut(first) else {
        return false;
    };
    let removed = remove_at(child, rest, share, id);
    if child.is_empty() {
        node.remove_child(first);
    }
    removed
}

/// Matches `level` (and then `rest`, the levels after it) below `node`. `wildcards` is false
/// only for the first level of a `$` topic.
fn walk(
    node: &Node,
    level: &str,
    rest: Split<'_, char>,
    wildcards: bool,
    visit: &mut impl FnMut(&Entry, bool),
) {
    if wildcards {
        if let Some(hash) = &node.hash {
            emit(hash, visit);
        }
        if let Some(plus) = &node.plus {
            descend(plus, rest.clone(), visit);
        }
    }
    // A topic level is never `+` or `#` (topic names are validated), so this is the exact match.
    if let Some(exact) = node.children.get(level) {
        descend(exact, rest, visit);
    }
}

fn descend(node: &Node, mut rest: Split<'_, char>, visit: &mut impl FnMut(&Entry, bool)) {
    match rest.next() {
        None => {
            emit(node, visit);
            // `a/#` also matches `a`.
            if let Some(hash) = &node.hash {
                emit(hash, visit);
            }
        }
        Some(level) => walk(node, level, rest, true, visit),
    }
}

fn emit(node: &Node, visit: &mut impl FnMut(&Entry, bool)) {
    for entry in &node.subscribers {
        visit(entry, false);
    }
    for group in &node.groups {
        let len = group.members.len();
        if len == 0 {
            continue;
        }
        let start = group.next.fetch_add(1, Ordering::Relaxed);
        let chosen = (0..len)
            .map(|i| &group.members[(start + i) % len])
            .find(|e| e.session.is_online())
            .unwrap_or(&group.members[start % len]);
        visit(chosen, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::BrokerMetrics;

    fn entry(id: u64) -> Entry {
        let metrics = Arc::new(BrokerMetrics::new());
        Entry {
            session: Arc::new(Session::new(id, format!("c{id}").into(), 10, metrics, None)),
            options: SubOptions::qos(QoS::AtMostOnce),
        }
    }

    fn matched(tree: &SubscriptionTree, topic: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        tree.for_each_match(topic, |e, _| ids.push(e.session.id));
        ids.sort_unstable();
        ids
    }

    #[test]
    fn wildcards_match_as_the_spec_says() {
        let mut tree = SubscriptionTree::default();
        for (id, filter) in [
            (1, "a/b/c"),
            (2, "a/+/c"),
            (3, "a/#"),
            (4, "#"),
            (5, "+/+"),
            (6, "a/b/#"),
            (7, "$SYS/#"),
            (8, "+/b/+"),
        ] {
            tree.insert(filter, None, entry(id));
        }
        assert_eq!(matched(&tree, "a/b/c"), [1, 2, 3, 4, 6, 8]);
        assert_eq!(matched(&tree, "a/x/c"), [2, 3, 4]);
        // `a/#` matches its parent `a`; `a/b/#` matches `a/b`.
        assert_eq!(matched(&tree, "a"), [3, 4]);
        assert_eq!(matched(&tree, "a/b"), [3, 4, 5, 6]);
        assert_eq!(matched(&tree, "x/b/"), [4, 8]);
        assert_eq!(matched(&tree, "x/y/z/w"), [4]);
        // A `$` topic is not matched by a wildcard in the first level.
        assert_eq!(matched(&tree, "$SYS/uptime"), [7]);
        assert_eq!(matched(&tree, "$other/b/c"), Vec::<u64>::new());
        // Empty levels are levels.
        assert_eq!(matched(&tree, "/b"), [4, 5]);
    }

    #[test]
    fn removing_subscriptions_prunes_wildcard_branches() {
        let mut tree = SubscriptionTree::default();
        tree.insert("a/+/c", None, entry(1));
        tree.insert("a/#", None, entry(2));
        tree.insert("+", None, entry(3));
        assert_eq!(tree.len(), 3);
        assert!(!tree.remove("a/+/c", None, 2), "wrong session");
        assert!(tree.remove("a/+/c", None, 1));
        assert!(!tree.remove("a/+/c", None, 1), "already gone");
        assert_eq!(matched(&tree, "a/b/c"), [2]);
        assert!(tree.remove("a/#", None, 2));
        assert!(tree.remove("+", None, 3));
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "every node is pruned");
    }
}
