//! The subscription tree: one node per topic level, `+` and `#` as ordinary child keys.
//!
//! Matching walks only the branches a topic can reach, so its cost follows the topic's depth
//! and the number of wildcard branches, not the number of subscriptions. Shared subscriptions
//! (`$share/{group}/{filter}`) live in their node as groups; a match picks one member per
//! group, round robin, preferring members that are connected.

use std::{
    collections::HashMap,
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

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: Vec<Entry>,
    groups: Vec<Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
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
            node = node.children.entry(level.into()).or_default();
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
        let rest: Vec<&str> = levels.collect();
        walk(&self.root, first, &rest, !dollar, &mut visit);
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
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, share, id);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

/// Matches `level` (and then `rest`) below `node`. `wildcards` is false only for the first
/// level of a `$` topic.
fn walk(
    node: &Node,
    level: &str,
    rest: &[&str],
    wildcards: bool,
    visit: &mut impl FnMut(&Entry, bool),
) {
    if wildcards {
        if let Some(hash) = node.children.get("#") {
            emit(hash, visit);
        }
        if let Some(plus) = node.children.get("+") {
            descend(plus, rest, visit);
        }
    }
    if let Some(exact) = node.children.get(level) {
        descend(exact, rest, visit);
    }
}

fn descend(node: &Node, rest: &[&str], visit: &mut impl FnMut(&Entry, bool)) {
    match rest.split_first() {
        None => {
            emit(node, visit);
            // `a/#` also matches `a`.
            if let Some(hash) = node.children.get("#") {
                emit(hash, visit);
            }
        }
        Some((level, rest)) => walk(node, level, rest, true, visit),
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
