//! The broker's metric handles, registered once when the router is built so the hot path
//! only touches atomics.

use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};

use crate::message::QoS;

/// Why a message did not reach a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The session's queue held `limits.max_queued` deliveries.
    QueueFull,
    /// The message expiry interval passed before it could be sent.
    Expired,
    /// QoS 0 for a disconnected persistent session (never queued, per spec).
    OfflineQos0,
    /// The session ended while the message was on its way.
    SessionEnded,
    /// Larger than the maximum packet size the receiving client announced.
    TooLarge,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::SessionEnded => "session_ended",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// Protocol versions, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

pub struct BrokerMetrics {
    received: [Counter; 3],
    received_bytes: [Counter; 3],
    sent: [Counter; 3],
    sent_bytes: [Counter; 3],
    dropped: [Counter; 5],
    pub queued: Gauge,
    pub subscriptions: Gauge,
    pub retained: Gauge,
    pub sessions: Gauge,
    pub wills: Counter,
    connections: [Gauge; 2],
    accepted: [Counter; 2],
    hibernating: Gauge,
    wakes: Counter,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerMetrics {
    pub fn new() -> Self {
        let by_qos = |name: &'static str| {
            [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
                .map(|q| counter!(name, "qos" => q.label()))
        };
        let by_protocol_gauge = |name: &'static str| {
            [Protocol::V311, Protocol::V5].map(|p| gauge!(name, "protocol" => p.label()))
        };
        let by_protocol_counter = |name: &'static str| {
            [Protocol::V311, Protocol::V5].map(|p| counter!(name, "protocol" => p.label()))
        };
        Self {
            received: by_qos(names::BROKER_MESSAGES_RECEIVED),
            received_bytes: by_qos(names::BROKER_RECEIVED_BYTES),
            sent: by_qos(names::BROKER_MESSAGES_SENT),
            sent_bytes: by_qos(names::BROKER_SENT_BYTES),
            dropped: [
                DropReason::QueueFull,
                DropReason::Expired,
                DropReason::OfflineQos0,
                DropReason::SessionEnded,
                DropReason::TooLarge,
            ]
            .map(|r| counter!(names::BROKER_DROPPED, "reason" => r.label())),
            queued: gauge!(names::BROKER_QUEUED),
            subscriptions: gauge!(names::BROKER_SUBSCRIPTIONS),
            retained: gauge!(names::BROKER_RETAINED),
            sessions: gauge!(names::BROKER_SESSIONS),
            wills: counter!(names::BROKER_WILLS),
            connections: by_protocol_gauge(names::BROKER_CONNECTIONS),
            accepted: by_protocol_counter(names::BROKER_CONNECTIONS_ACCEPTED),
            hibernating: gauge!(names::BROKER_HIBERNATING),
            wakes: counter!(names::BROKER_WAKES),
        }
    }

    pub fn received(&self, qos: QoS, bytes: usize) {
        self.received_many(qos, 1, bytes as u64);
    }

    pub fn received_many(&self, qos: QoS, messages: u64, bytes: u64) {
        self.received[qos as usize].increment(messages);
        self.received_bytes[qos as usize].increment(bytes);
    }

    pub fn sent_many(&self, qos: QoS, messages: u64, bytes: u64) {
        self.sent[qos as usize].increment(messages);
        self.sent_bytes[qos as usize].increment(bytes);
    }

    pub fn sent(&self, qos: QoS, bytes: usize) {
        self.sent[qos as usize].increment(1);
        self.sent_bytes[qos as usize].increment(bytes as u64);
    }

    pub fn dropped(&self, reason: DropReason, count: u64) {
        let index = match reason {
            DropReason::QueueFull => 0,
            DropReason::Expired => 1,
            DropReason::OfflineQos0 => 2,
            DropReason::SessionEnded => 3,
            DropReason::TooLarge => 4,
        };
        self.dropped[index].increment(count);
    }

    pub fn connection_opened(&self, protocol: Protocol) {
        self.accepted[protocol as usize].increment(1);
        self.connections[protocol as usize].increment(1.0);
    }

    pub fn connection_closed(&self, protocol: Protocol) {
        self.connections[protocol as usize].decrement(1.0);
    }

    /// A connection started (+1) or stopped (-1) hibernating.
    pub(crate) fn hibernated(&self, delta: i8) {
        self.hibernating.increment(f64::from(delta));
    }

    /// A hibernating connection woke.
    pub(crate) fn woke(&self) {
        self.wakes.increment(1);
    }

    /// Counts a connection refused at CONNECT.
    pub fn refused(reason: &'static str) {
        counter!(names::BROKER_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    }

    /// Counts a connection closed for a protocol error.
    pub fn protocol_error(kind: &'static str) {
        counter!(names::BROKER_PROTOCOL_ERRORS, "kind" => kind).increment(1);
    }
}
