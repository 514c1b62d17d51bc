//! The node link's metric handles, registered once per link (and per node) so the hot path
//! only touches atomics. Labels are closed sets, except `node` (a client id), which is capped
//! at [`names::NODE_SERIES_MAX`] distinct values.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use edgegw_protocol::FrameError;
use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};

/// The `node` label of nodes beyond [`names::NODE_SERIES_MAX`].
pub const OTHER_NODES: &str = "_other";

/// One node's series.
#[derive(Clone)]
pub struct PerNode {
    pub frames_received: Counter,
    pub frames_sent: Counter,
    /// `None` for nodes beyond the cap: one timestamp for all of them would mean nothing.
    last_seen: Option<Gauge>,
}

impl PerNode {
    /// A message from the node.
    pub fn seen(&self) {
        self.frames_received.increment(1);
        if let Some(gauge) = &self.last_seen {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            gauge.set(now);
        }
    }
}

/// Why bytes from a link were dropped before they became a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameErrorKind {
    Oversize,
    Cobs,
    TooShort,
    Crc,
    /// A good frame that holds no valid MQTT-SN message.
    Decode,
}

impl FrameErrorKind {
    const ALL: [Self; 5] = [
        Self::Oversize,
        Self::Cobs,
        Self::TooShort,
        Self::Crc,
        Self::Decode,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::Cobs => "cobs",
            Self::TooShort => "too_short",
            Self::Crc => "crc",
            Self::Decode => "decode",
        }
    }
}

impl From<&FrameError> for FrameErrorKind {
    fn from(error: &FrameError) -> Self {
        match error {
            FrameError::Oversize { .. } => Self::Oversize,
            FrameError::TruncatedCobsBlock { .. } => Self::Cobs,
            FrameError::TooShort { .. } => Self::TooShort,
            FrameError::CrcMismatch { .. } => Self::Crc,
        }
    }
}

/// Why a well-formed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    NotConnected,
    UnknownTopic,
    InvalidTopic,
    InvalidClientId,
    Unsupported,
    InflightFull,
}

impl RejectReason {
    const ALL: [Self; 6] = [
        Self::NotConnected,
        Self::UnknownTopic,
        Self::InvalidTopic,
        Self::InvalidClientId,
        Self::Unsupported,
        Self::InflightFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::UnknownTopic => "unknown_topic",
            Self::InvalidTopic => "invalid_topic",
            Self::InvalidClientId => "invalid_client_id",
            Self::Unsupported => "unsupported",
            Self::InflightFull => "inflight_full",
        }
    }
}

#[derive(Clone)]
pub struct NodeMetrics {
    pub links_up: Gauge,
    pub link_reconnects: Counter,
    pub connected: Gauge,
    pub frames_received: Counter,
    pub frames_sent: Counter,
    pub keepalive_timeouts: Counter,
    frame_errors: [Counter; 5],
    rejected: [Counter; 6],
    /// Client ids with series of their own.
    labelled: Arc<Mutex<HashSet<Arc<str>>>>,
}

impl NodeMetrics {
    pub fn new() -> Self {
        Self {
            links_up: gauge!(names::NODES_LINKS_UP),
            link_reconnects: counter!(names::NODES_LINK_RECONNECTS),
            connected: gauge!(names::NODES_CONNECTED),
            frames_received: counter!(names::NODES_FRAMES_RECEIVED),
            frames_sent: counter!(names::NODES_FRAMES_SENT),
            keepalive_timeouts: counter!(names::NODES_KEEPALIVE_TIMEOUTS),
            frame_errors: FrameErrorKind::ALL
                .map(|kind| counter!(names::NODES_FRAME_ERRORS, "kind" => kind.label())),
            rejected: RejectReason::ALL
                .map(|reason| counter!(names::NODES_REJECTED, "reason" => reason.label())),
            labelled: Arc::default(),
        }
    }

    /// The series of node `client_id`: its own while fewer than the cap have been given out,
    /// else the shared `_other` ones.
    pub fn per_node(&self, client_id: &str) -> PerNode {
        let own = {
            let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
            labelled.contains(client_id)
                || (labelled.len() < names::NODE_SERIES_MAX && labelled.insert(client_id.into()))
        };
        if own {
            let node = client_id.to_owned();
            PerNode {
                frames_received: counter!(names::NODES_NODE_FRAMES_RECEIVED, "node" => node.clone()),
                frames_sent: counter!(names::NODES_NODE_FRAMES_SENT, "node" => node.clone()),
                last_seen: Some(gauge!(names::NODES_NODE_LAST_SEEN, "node" => node)),
            }
        } else {
            PerNode {
                frames_received: counter!(names::NODES_NODE_FRAMES_RECEIVED, "node" => OTHER_NODES),
                frames_sent: counter!(names::NODES_NODE_FRAMES_SENT, "node" => OTHER_NODES),
                last_seen: None,
            }
        }
    }

    pub fn frame_error(&self, kind: FrameErrorKind) {
        self.frame_errors[kind as usize].increment(1);
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].increment(1);
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_series_are_capped() {
        let metrics = NodeMetrics::new();
        for i in 0..names::NODE_SERIES_MAX + 44 {
            let series = metrics.per_node(&format!("node-{i}"));
            assert_eq!(
                series.last_seen.is_some(),
                i < names::NODE_SERIES_MAX,
                "node {i}"
            );
        }
        // A node with series of its own keeps them when it connects again.
        assert!(metrics.per_node("node-3").last_seen.is_some());
        assert!(metrics.per_node("a-new-one").last_seen.is_none());
        assert_eq!(
            metrics.labelled.lock().unwrap().len(),
            names::NODE_SERIES_MAX
        );
    }
}
