//! The node link's metric handles, registered once per link so the hot path only touches
//! atomics. Labels are closed sets (never a client id or a port name).

use edgegw_protocol::FrameError;
use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};

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
