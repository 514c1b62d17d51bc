//! Every metric the gateway exports, with its help text. Dashboards and tests use only
//! these names. Naming: `edgegw_<subsystem>_<name>_<unit>`, counters end in `_total`,
//! labels are small closed sets (never a client id or a topic), except `node`: the client ids
//! of MQTT-SN nodes, capped at `NODE_SERIES_MAX` distinct values (later ones share `_other`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const BROKER_CONNECTIONS: &str = "edgegw_broker_connections";
pub const BROKER_CONNECTIONS_ACCEPTED: &str = "edgegw_broker_connections_accepted_total";
pub const BROKER_HIBERNATING: &str = "edgegw_broker_hibernating_connections";
pub const BROKER_WAKES: &str = "edgegw_broker_hibernation_wakes_total";
pub const BROKER_CONNECTIONS_REFUSED: &str = "edgegw_broker_connections_refused_total";
pub const BROKER_MESSAGES_RECEIVED: &str = "edgegw_broker_messages_received_total";
pub const BROKER_MESSAGES_SENT: &str = "edgegw_broker_messages_sent_total";
pub const BROKER_RECEIVED_BYTES: &str = "edgegw_broker_received_payload_bytes_total";
pub const BROKER_SENT_BYTES: &str = "edgegw_broker_sent_payload_bytes_total";
pub const BROKER_DROPPED: &str = "edgegw_broker_dropped_messages_total";
pub const BROKER_SUBSCRIPTIONS: &str = "edgegw_broker_subscriptions";
pub const BROKER_RETAINED: &str = "edgegw_broker_retained_messages";
pub const BROKER_SESSIONS: &str = "edgegw_broker_sessions";
pub const BROKER_QUEUED: &str = "edgegw_broker_queued_messages";
pub const BROKER_PROTOCOL_ERRORS: &str = "edgegw_broker_protocol_errors_total";
pub const BROKER_WILLS: &str = "edgegw_broker_wills_published_total";
pub const BROKER_THROTTLED: &str = "edgegw_broker_publishes_throttled_total";
pub const BROKER_AUTH_FAILURES: &str = "edgegw_broker_auth_failures_total";
pub const BROKER_ACL_DENIALS: &str = "edgegw_broker_acl_denials_total";
pub const STORE_COMMITS: &str = "edgegw_store_commits_total";
pub const STORE_OPS: &str = "edgegw_store_ops_total";
pub const STORE_COMMIT_ERRORS: &str = "edgegw_store_commit_errors_total";
pub const STORE_PENDING_OPS: &str = "edgegw_store_pending_ops";
pub const NODES_LINKS_UP: &str = "edgegw_nodes_links_up";
pub const NODES_LINK_RECONNECTS: &str = "edgegw_nodes_link_reconnects_total";
pub const NODES_CONNECTED: &str = "edgegw_nodes_connected";
pub const NODES_FRAMES_RECEIVED: &str = "edgegw_nodes_frames_received_total";
pub const NODES_FRAMES_SENT: &str = "edgegw_nodes_frames_sent_total";
pub const NODES_FRAME_ERRORS: &str = "edgegw_nodes_frame_errors_total";
pub const NODES_REJECTED: &str = "edgegw_nodes_rejected_messages_total";
pub const NODES_KEEPALIVE_TIMEOUTS: &str = "edgegw_nodes_keepalive_timeouts_total";
pub const NODES_NODE_FRAMES_RECEIVED: &str = "edgegw_nodes_node_frames_received_total";
pub const NODES_NODE_FRAMES_SENT: &str = "edgegw_nodes_node_frames_sent_total";
pub const NODES_NODE_LAST_SEEN: &str = "edgegw_nodes_node_last_seen_timestamp_seconds";
/// Distinct `node` label values; nodes beyond these are counted under `node="_other"`.
pub const NODE_SERIES_MAX: usize = 256;
pub const UPLINK_CONNECTED: &str = "edgegw_uplink_connected";
pub const UPLINK_RECONNECTS: &str = "edgegw_uplink_reconnects_total";
pub const UPLINK_CONNECT_FAILURES: &str = "edgegw_uplink_connect_failures_total";
pub const UPLINK_FORWARDED: &str = "edgegw_uplink_forwarded_messages_total";
pub const UPLINK_DROPPED: &str = "edgegw_uplink_dropped_messages_total";
pub const UPLINK_DOWNLINK: &str = "edgegw_uplink_downlink_messages_total";
pub const UPLINK_ACK_RTT: &str = "edgegw_uplink_ack_round_trip_seconds";
pub const UPLINK_OUTBOX_MESSAGES: &str = "edgegw_uplink_outbox_messages";
pub const UPLINK_OUTBOX_BYTES: &str = "edgegw_uplink_outbox_bytes";
pub const UPLINK_OUTBOX_OLDEST_AGE: &str = "edgegw_uplink_outbox_oldest_age_seconds";
pub const UPLINK_OUTBOX_COMMITS: &str = "edgegw_uplink_outbox_commits_total";
pub const UPLINK_OUTBOX_WRITE_ERRORS: &str = "edgegw_uplink_outbox_write_errors_total";
pub const PIPELINE_MESSAGES: &str = "edgegw_pipeline_messages_total";
pub const PIPELINE_OUTPUTS: &str = "edgegw_pipeline_outputs_total";
pub const PIPELINE_DROPPED: &str = "edgegw_pipeline_dropped_total";
pub const PIPELINE_DEADLETTER: &str = "edgegw_pipeline_deadletter_total";
pub const PIPELINE_QUEUE_DEPTH: &str = "edgegw_pipeline_queue_depth";
pub const PIPELINE_RELOADS: &str = "edgegw_pipeline_reloads_total";
pub const RULES_INVOCATIONS: &str = "edgegw_rules_invocations_total";
pub const RULES_CALL_DURATION: &str = "edgegw_rules_call_duration_seconds";
pub const RULES_INSTANCE_RESTARTS: &str = "edgegw_rules_instance_restarts_total";
pub const RULES_PLUGIN_LOADS: &str = "edgegw_rules_plugin_loads_total";

/// Label values of [`BROKER_DROPPED`]'s `reason`.
pub const DROP_REASONS: &[&str] = &[
    "queue_full",
    "expired",
    "offline_qos0",
    "session_ended",
    "too_large",
];

/// Label values of [`UPLINK_DROPPED`]'s `reason`.
pub const UPLINK_DROP_REASONS: &[&str] = &[
    "full",
    "too_large",
    "expired",
    "write_error",
    "closed",
    "unmapped",
    "refused",
];

/// Label values of [`PIPELINE_DROPPED`]'s `reason`.
pub const PIPELINE_DROP_REASONS: &[&str] = &["full", "loop", "unmapped", "uplink"];

/// Label values of [`RULES_INVOCATIONS`]'s `result`.
pub const RULE_RESULTS: &[&str] = &["ok", "error", "trap", "timeout", "limit"];

/// What a metric is; a histogram is exported as `<name>_bucket` (label `le`), `<name>_sum`
/// and `<name>_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: its name, kind and the label names the code records it with
/// (besides the `instance` and `job` labels Prometheus adds when it scrapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

impl Metric {
    const fn counter(name: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            kind: Kind::Counter,
            labels,
        }
    }

    const fn gauge(name: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            kind: Kind::Gauge,
            labels,
        }
    }

    const fn histogram(name: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            kind: Kind::Histogram,
            labels,
        }
    }
}

/// Every metric above, exactly once, with its kind and labels. A test keeps this, the
/// name constants and [`describe`] in step.
pub const ALL: &[Metric] = &[
    Metric::gauge(BROKER_CONNECTIONS, &["protocol"]),
    Metric::counter(BROKER_CONNECTIONS_ACCEPTED, &["protocol"]),
    Metric::gauge(BROKER_HIBERNATING, &[]),
    Metric::counter(BROKER_WAKES, &[]),
    Metric::counter(BROKER_CONNECTIONS_REFUSED, &["reason"]),
    Metric::counter(BROKER_MESSAGES_RECEIVED, &["qos"]),
    Metric::counter(BROKER_MESSAGES_SENT, &["qos"]),
    Metric::counter(BROKER_RECEIVED_BYTES, &["qos"]),
    Metric::counter(BROKER_SENT_BYTES, &["qos"]),
    Metric::counter(BROKER_DROPPED, &["reason"]),
    Metric::gauge(BROKER_SUBSCRIPTIONS, &[]),
    Metric::gauge(BROKER_RETAINED, &[]),
    Metric::gauge(BROKER_SESSIONS, &[]),
    Metric::gauge(BROKER_QUEUED, &[]),
    Metric::counter(BROKER_PROTOCOL_ERRORS, &["kind"]),
    Metric::counter(BROKER_WILLS, &[]),
    Metric::counter(BROKER_THROTTLED, &[]),
    Metric::counter(BROKER_AUTH_FAILURES, &["reason"]),
    Metric::counter(BROKER_ACL_DENIALS, &["action"]),
    Metric::counter(STORE_COMMITS, &[]),
    Metric::counter(STORE_OPS, &[]),
    Metric::counter(STORE_COMMIT_ERRORS, &[]),
    Metric::gauge(STORE_PENDING_OPS, &[]),
    Metric::gauge(NODES_LINKS_UP, &[]),
    Metric::counter(NODES_LINK_RECONNECTS, &[]),
    Metric::gauge(NODES_CONNECTED, &[]),
    Metric::counter(NODES_FRAMES_RECEIVED, &[]),
    Metric::counter(NODES_FRAMES_SENT, &[]),
    Metric::counter(NODES_FRAME_ERRORS, &["kind"]),
    Metric::counter(NODES_REJECTED, &["reason"]),
    Metric::counter(NODES_KEEPALIVE_TIMEOUTS, &[]),
    Metric::counter(NODES_NODE_FRAMES_RECEIVED, &["node"]),
    Metric::counter(NODES_NODE_FRAMES_SENT, &["node"]),
    Metric::gauge(NODES_NODE_LAST_SEEN, &["node"]),
    Metric::gauge(UPLINK_CONNECTED, &["uplink"]),
    Metric::counter(UPLINK_RECONNECTS, &["uplink"]),
    Metric::counter(UPLINK_CONNECT_FAILURES, &["uplink"]),
    Metric::counter(UPLINK_FORWARDED, &["uplink"]),
    Metric::counter(UPLINK_DROPPED, &["uplink", "reason"]),
    Metric::counter(UPLINK_DOWNLINK, &["uplink"]),
    Metric::histogram(UPLINK_ACK_RTT, &["uplink"]),
    Metric::gauge(UPLINK_OUTBOX_MESSAGES, &["uplink"]),
    Metric::gauge(UPLINK_OUTBOX_BYTES, &["uplink"]),
    Metric::gauge(UPLINK_OUTBOX_OLDEST_AGE, &["uplink"]),
    Metric::counter(UPLINK_OUTBOX_COMMITS, &["uplink"]),
    Metric::counter(UPLINK_OUTBOX_WRITE_ERRORS, &["uplink"]),
    Metric::counter(PIPELINE_MESSAGES, &["pipeline"]),
    Metric::counter(PIPELINE_OUTPUTS, &["pipeline"]),
    Metric::counter(PIPELINE_DROPPED, &["pipeline", "reason"]),
    Metric::counter(PIPELINE_DEADLETTER, &["pipeline"]),
    Metric::gauge(PIPELINE_QUEUE_DEPTH, &["pipeline"]),
    Metric::counter(PIPELINE_RELOADS, &["result"]),
    Metric::counter(RULES_INVOCATIONS, &["pipeline", "plugin", "result"]),
    Metric::histogram(RULES_CALL_DURATION, &["plugin"]),
    Metric::counter(RULES_INSTANCE_RESTARTS, &["pipeline", "plugin"]),
    Metric::counter(RULES_PLUGIN_LOADS, &["source"]),
];

/// The entry of [`ALL`] named `name`.
pub fn metric(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| m.name == name)
}

/// The closed set of values of `label` on `metric`, where names.rs lists one.
pub fn label_values(metric: &str, label: &str) -> Option<&'static [&'static str]> {
    match (metric, label) {
        (BROKER_DROPPED, "reason") => Some(DROP_REASONS),
        (UPLINK_DROPPED, "reason") => Some(UPLINK_DROP_REASONS),
        (PIPELINE_DROPPED, "reason") => Some(PIPELINE_DROP_REASONS),
        (RULES_INVOCATIONS, "result") => Some(RULE_RESULTS),
        _ => None,
    }
}

/// Registers help texts and units. Call once after installing the recorder.
pub fn describe() {
    describe_gauge!(
        BROKER_CONNECTIONS,
        "Open MQTT client connections, by protocol version."
    );
    describe_counter!(
        BROKER_CONNECTIONS_ACCEPTED,
        "MQTT connections accepted (CONNACK success), by protocol version."
    );
    describe_gauge!(
        BROKER_HIBERNATING,
        "Idle MQTT connections hibernating (counted in edgegw_broker_connections too)."
    );
    describe_counter!(
        BROKER_WAKES,
        "Hibernating MQTT connections woken (a delivery, a packet other than PINGREQ)."
    );
    describe_counter!(
        BROKER_CONNECTIONS_REFUSED,
        "MQTT connections refused at CONNECT, by reason."
    );
    describe_counter!(
        BROKER_MESSAGES_RECEIVED,
        "PUBLISH messages received by the router, by QoS."
    );
    describe_counter!(
        BROKER_MESSAGES_SENT,
        "PUBLISH messages written to subscribers, by QoS."
    );
    describe_counter!(
        BROKER_RECEIVED_BYTES,
        Unit::Bytes,
        "Payload bytes received by the router, by QoS."
    );
    describe_counter!(
        BROKER_SENT_BYTES,
        Unit::Bytes,
        "Payload bytes written to subscribers, by QoS."
    );
    describe_counter!(
        BROKER_DROPPED,
        "Messages not delivered to a subscriber, by reason."
    );
    describe_gauge!(
        BROKER_SUBSCRIPTIONS,
        "Active subscriptions (filters) over all sessions."
    );
    describe_gauge!(BROKER_RETAINED, "Retained messages held by the broker.");
    describe_gauge!(BROKER_SESSIONS, "Sessions, connected or persisted offline.");
    describe_gauge!(
        BROKER_QUEUED,
        "Deliveries queued in sessions, waiting to be written."
    );
    describe_counter!(
        BROKER_PROTOCOL_ERRORS,
        "Connections closed for malformed packets or protocol violations, by kind."
    );
    describe_counter!(BROKER_WILLS, "Will messages published.");
    describe_counter!(
        BROKER_THROTTLED,
        "PUBLISH packets delayed by broker.limits.max_publish_rate."
    );
    describe_counter!(
        BROKER_AUTH_FAILURES,
        "Refused logins at CONNECT, by reason: unknown_user, wrong_password, no_password, anonymous (anonymous clients not allowed), certificate (no usable client certificate CN), banned (address refused after repeated failures)."
    );
    describe_counter!(
        BROKER_ACL_DENIALS,
        "Operations refused by the ACL, by action: publish (message dropped) or subscribe (failure return code)."
    );
    describe_counter!(
        STORE_COMMITS,
        "State file commits (each one transaction and one fsync)."
    );
    describe_counter!(STORE_OPS, "Changes written to the state file.");
    describe_counter!(
        STORE_COMMIT_ERRORS,
        "State file commits that failed (e.g. disk full); their changes are lost."
    );
    describe_gauge!(
        STORE_PENDING_OPS,
        "Changes waiting for the next state file commit."
    );
    describe_gauge!(NODES_LINKS_UP, "Node links (serial ports) open now.");
    describe_counter!(
        NODES_LINK_RECONNECTS,
        "Node link (re)opens after the port disappeared or failed to open."
    );
    describe_gauge!(
        NODES_CONNECTED,
        "MQTT-SN nodes connected over all node links."
    );
    describe_counter!(
        NODES_FRAMES_RECEIVED,
        "Good frames (CRC checked) received from nodes."
    );
    describe_counter!(NODES_FRAMES_SENT, "Frames written to node links.");
    describe_counter!(
        NODES_FRAME_ERRORS,
        "Bytes from a node link that were not a usable MQTT-SN message, by kind: oversize, cobs (truncated COBS block), too_short, crc, decode (a good frame that is no valid MQTT-SN message). Each is dropped; the link stays up."
    );
    describe_counter!(
        NODES_REJECTED,
        "Well-formed MQTT-SN messages the gateway refused, by reason: not_connected (no CONNECT yet), unknown_topic (topic id not registered or predefined), invalid_topic (bad name or filter), invalid_client_id (empty or over 64 bytes), unsupported (a message type the gateway does not take from nodes), inflight_full (too many QoS 2 in flight)."
    );
    describe_counter!(
        NODES_KEEPALIVE_TIMEOUTS,
        "Nodes dropped after 1.5 keepalive periods without a message."
    );
    describe_counter!(
        NODES_NODE_FRAMES_RECEIVED,
        "Messages received from a connected node, by node (its client id; the first 256 nodes, later ones as _other)."
    );
    describe_counter!(
        NODES_NODE_FRAMES_SENT,
        "Frames written to a connected node, by node (as for frames received)."
    );
    describe_gauge!(
        NODES_NODE_LAST_SEEN,
        Unit::Seconds,
        "When a node last sent anything, Unix time in seconds, by node (the first 256 nodes); its silence is time() minus this."
    );
    describe_gauge!(
        UPLINK_CONNECTED,
        "1 while the uplink is connected to its cloud broker, else 0; by uplink."
    );
    describe_counter!(
        UPLINK_RECONNECTS,
        "Successful connections of an uplink after the first; by uplink."
    );
    describe_counter!(
        UPLINK_CONNECT_FAILURES,
        "Failed connection attempts of an uplink (network, TLS, refused CONNACK); by uplink."
    );
    describe_counter!(
        UPLINK_FORWARDED,
        "Messages the cloud broker acknowledged (QoS 1/2) or that were sent (QoS 0); by uplink."
    );
    describe_counter!(
        UPLINK_DROPPED,
        "Messages bound for an uplink that were dropped, by uplink and reason: full (outbox bounds, on_full policy), too_large (above outbox.max_bytes or the remote maximum packet size), expired (older than outbox.max_age), write_error (the outbox cannot be written), closed (gateway stopping), unmapped (a forward template names a level the topic lacks), refused (the cloud broker refused it with a reason code)."
    );
    describe_counter!(
        UPLINK_DOWNLINK,
        "Messages received from the cloud broker on downlink subscriptions; by uplink."
    );
    describe_histogram!(
        UPLINK_ACK_RTT,
        Unit::Seconds,
        "Time from sending a message to the cloud broker to its acknowledgement; by uplink."
    );
    describe_gauge!(
        UPLINK_OUTBOX_MESSAGES,
        "Messages in the outbox (not yet acknowledged by the cloud broker); by uplink."
    );
    describe_gauge!(
        UPLINK_OUTBOX_BYTES,
        Unit::Bytes,
        "Bytes (topic, payload, properties) in the outbox; by uplink."
    );
    describe_gauge!(
        UPLINK_OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message in the outbox; by uplink."
    );
    describe_counter!(
        UPLINK_OUTBOX_COMMITS,
        "Outbox commits (one fsync each unless outbox.fsync is off); by uplink."
    );
    describe_counter!(
        UPLINK_OUTBOX_WRITE_ERRORS,
        "Failed outbox commits (e.g. disk full); the messages stay in memory and are retried; by uplink."
    );
    describe_counter!(
        PIPELINE_MESSAGES,
        "Messages taken into a pipeline's queue; by pipeline."
    );
    describe_counter!(
        PIPELINE_OUTPUTS,
        "Messages a pipeline emitted to its outputs (local topics and uplinks); by pipeline."
    );
    describe_counter!(
        PIPELINE_DROPPED,
        "Messages a pipeline dropped, by pipeline and reason: full (queue full, per queue.on_full), loop (too many pipeline hops), unmapped (a local: template names a level the topic lacks), uplink (the uplink refused it)."
    );
    describe_counter!(
        PIPELINE_DEADLETTER,
        "Messages sent to the pipeline's dead-letter topic because a rule failed on them; by pipeline."
    );
    describe_gauge!(
        PIPELINE_QUEUE_DEPTH,
        "Messages waiting in a pipeline's queue; by pipeline."
    );
    describe_counter!(
        PIPELINE_RELOADS,
        "Pipeline reloads (SIGHUP), by result: ok or failed (the running pipelines were kept)."
    );
    describe_counter!(
        RULES_INVOCATIONS,
        "Rule plugin calls, by pipeline, plugin and result: ok, error (the plugin returned an error or could not be (re)initialised), trap (panic or other fault), timeout (past limits.time), limit (past limits.memory or limits.max_outputs)."
    );
    describe_histogram!(
        RULES_CALL_DURATION,
        Unit::Seconds,
        "Time per message of one rule plugin call, one observation per call (a call with several queued messages records its time divided by their number; a fault's includes re-creating the instance); by plugin."
    );
    describe_counter!(
        RULES_INSTANCE_RESTARTS,
        "Rule plugin instances thrown away after a trap, timeout or memory limit (a fresh one serves the next message); by pipeline and plugin."
    );
    describe_counter!(
        RULES_PLUGIN_LOADS,
        "Rule plugins loaded, by source: compiled (Cranelift) or cache (compiled code from the on-disk cache)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use std::{
        collections::{BTreeMap, BTreeSet},
        sync::Mutex,
    };

    /// `(constant, metric name)` of every `pub const X: &str = "edgegw_...";` in this file.
    fn name_constants() -> Vec<(String, String)> {
        let source = include_str!("names.rs");
        let mut found = Vec::new();
        for line in source.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const ") else {
                continue;
            };
            let Some((ident, value)) = rest.split_once(": &str = \"") else {
                continue;
            };
            let value = value
                .strip_suffix("\";")
                .unwrap_or_else(|| panic!("one-line string constant expected: {line}"));
            if value.starts_with("edgegw_") {
                found.push((ident.to_owned(), value.to_owned()));
            }
        }
        found
    }

    #[test]
    fn all_lists_every_name_constant_exactly_once() {
        let constants = name_constants();
        assert!(constants.len() > 40, "parsing names.rs found {constants:?}");
        let mut values = BTreeSet::new();
        for (ident, value) in &constants {
            assert!(
                values.insert(value.as_str()),
                "{ident}: {value} is named twice"
            );
        }
        let mut listed = BTreeSet::new();
        for m in ALL {
            assert!(listed.insert(m.name), "{} is twice in ALL", m.name);
        }
        let missing: Vec<_> = values.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "constants missing from ALL: {missing:?}"
        );
        let extra: Vec<_> = listed.difference(&values).collect();
        assert!(extra.is_empty(), "ALL names without a constant: {extra:?}");
    }

    /// One `describe_*` call: name, kind, unit, help.
    type Description = (String, Kind, Option<Unit>, String);

    /// Collects `describe_*` calls.
    #[derive(Default)]
    struct Descriptions(Mutex<Vec<Description>>);

    impl Descriptions {
        fn push(&self, kind: Kind, key: KeyName, unit: Option<Unit>, help: SharedString) {
            let entry = (key.as_str().to_owned(), kind, unit, help.to_string());
            self.0.lock().unwrap().push(entry);
        }
    }

    impl Recorder for Descriptions {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(Kind::Counter, key, unit, help);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(Kind::Gauge, key, unit, help);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.push(Kind::Histogram, key, unit, help);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn describe_covers_all_with_the_same_kinds() {
        let recorder = Descriptions::default();
        metrics::with_local_recorder(&recorder, describe);
        let described = recorder.0.into_inner().unwrap();
        let mut by_name = BTreeMap::new();
        for (name, kind, unit, help) in described {
            assert!(!help.trim().is_empty(), "{name} has no help text");
            if name.ends_with("_bytes") || name.ends_with("_bytes_total") {
                assert_eq!(unit, Some(Unit::Bytes), "{name}");
            }
            if name.ends_with("_seconds") {
                assert_eq!(unit, Some(Unit::Seconds), "{name}");
            }
            assert!(
                by_name.insert(name.clone(), kind).is_none(),
                "{name} is described twice"
            );
        }
        let mut problems = Vec::new();
        for m in ALL {
            match by_name.remove(m.name) {
                None => problems.push(format!("{} is in ALL but not described", m.name)),
                Some(kind) if kind != m.kind => problems.push(format!(
                    "{} is a {:?} in ALL but described as a {kind:?}",
                    m.name, m.kind
                )),
                Some(_) => {}
            }
        }
        for name in by_name.keys() {
            problems.push(format!("{name} is described but not in ALL"));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn names_and_labels_follow_the_conventions() {
        let snake = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for m in ALL {
            assert!(m.name.starts_with("edgegw_") && snake(m.name), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
            for suffix in ["_bucket", "_sum", "_count"] {
                assert!(!m.name.ends_with(suffix), "{}: reserved suffix", m.name);
            }
            let mut seen = BTreeSet::new();
            for label in m.labels {
                assert!(snake(label), "{}: label {label:?}", m.name);
                assert!(seen.insert(label), "{}: label {label} twice", m.name);
                assert!(
                    !["le", "quantile", "instance", "job"].contains(label),
                    "{}: label {label} is reserved",
                    m.name
                );
            }
        }
    }

    #[test]
    fn label_value_lists_belong_to_declared_labels() {
        for m in ALL {
            for label in ["reason", "result"] {
                if let Some(values) = label_values(m.name, label) {
                    assert!(m.labels.contains(&label), "{}: {label}", m.name);
                    assert!(!values.is_empty());
                }
            }
        }
        assert_eq!(label_values(BROKER_DROPPED, "reason"), Some(DROP_REASONS));
        assert_eq!(label_values(BROKER_SESSIONS, "reason"), None);
        assert_eq!(
            metric(UPLINK_ACK_RTT).map(|m| m.kind),
            Some(Kind::Histogram)
        );
        assert!(metric("edgegw_nope").is_none());
    }
}
