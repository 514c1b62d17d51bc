//! MQTT 3.1.1 on ntex-mqtt.

use std::{future::Future, num::NonZeroU16, pin::Pin, sync::Arc};

use edgegw_store::Ticket;
use ntex::time::Seconds;
use ntex_bytes::BytesMut;
use ntex_mqtt::{
    Control, Reason,
    error::{DispatcherError, SpecViolation},
    v3,
};

use crate::{
    BrokerError,
    auth::{ListenerAuth, LoginRequest, Refusal},
    connection::{
        Conn, ConnRef, Handled, Hibernate, Inbound, InboundAck, InboundId, Outbound, Partial,
        Passed, Qos2, Release, SendResult, Shared, Taken, spawn_writer,
    },
    message::{ByteString, Bytes, Message, QoS},
    metrics::{BrokerMetrics, Protocol},
    router::{AttachOptions, Will},
    session::AckKind,
    session::Outgoing,
    tree::SubOptions,
};

pub(crate) async fn connect(
    shared: Arc<Shared>,
    listener: ListenerAuth,
    connect: v3::Connect,
) -> Result<v3::ConnectAck<ConnRef>, BrokerError> {
    if let Some(addr) = listener.hibernate
        && let Some(state) = crate::hibernate::take_resume(addr, connect.io())
    {
        return Ok(resume(connect, state.into_state(), addr));
    }
    let packet = connect.packet();
    let limits = shared.limits.clone();
    let Some(slot) = shared.reserve_slot() else {
        BrokerMetrics::refused("max_connections");
        tracing::warn!(
            max_connections = limits.max_connections,
            "Connection refused: limit reached."
        );
        return Ok(connect.service_unavailable());
    };
    let login = LoginRequest::new(
        listener,
        connect.io(),
        &packet.client_id,
        packet.username.as_deref(),
        packet.password.as_ref(),
    );
    let login = match shared.auth.login(login).await {
        Ok(login) => login,
        Err(Refusal::BadCredentials) => return Ok(connect.bad_username_or_pwd()),
        Err(Refusal::NotAuthorized | Refusal::Banned) => return Ok(connect.not_authorized()),
    };
    let user = login.user.clone();
    let keep_alive = packet.keep_alive;
    if keep_alive > limits.max_keepalive_secs {
        // MQTT 3.1.1 cannot tell a client to use a shorter keepalive; refuse it clearly
        // rather than cut it off later.
        BrokerMetrics::refused("keepalive_too_long");
        tracing::info!(
            client_id = %packet.client_id,
            keep_alive,
            max_keepalive = limits.max_keepalive_secs,
            "Connection refused: keepalive above broker.limits.max_keepalive."
        );
        return Ok(connect.identifier_rejected());
    }
    let will = match &packet.last_will {
        None => None,
        Some(will) => {
            if crate::topic::validate_name(&will.topic).is_err() {
                BrokerMetrics::refused("bad_will");
                return Ok(connect.identifier_rejected());
            }
            Some(Will {
                message: Message::new(will.topic.clone(), will.message.clone(), will.qos.into())
                    .with_retain(will.retain),
                delay_secs: 0,
            })
        }
    };
    // The codec already refused an empty client id with clean session = 0.
    let client_id = if packet.client_id.is_empty() {
        shared.assign_client_id()
    } else {
        packet.client_id.to_string()
    };
    let acl_generation = shared.auth.generation();
    let acl = shared.auth.acl_for(user.as_deref(), &client_id);
    if !shared.auth.will_allowed(&acl, &client_id, will.as_ref()) {
        return Ok(connect.not_authorized());
    }
    let options = AttachOptions {
        client_id: client_id.as_str().into(),
        clean_start: packet.clean_session,
        session_expiry_secs: if packet.clean_session { 0 } else { u32::MAX },
        owner: user.as_deref().map(Arc::from),
        credential: login.credential,
    };
    let Some(attached) = shared.attach(options, &login) else {
        return Ok(connect.not_authorized());
    };
    let conn = Conn::new(
        shared.clone(),
        attached.session.clone(),
        attached.generation,
        Protocol::V311,
        will,
        user.as_deref().map(Arc::from),
        acl,
        acl_generation,
        connect.io().get_ref(),
        slot,
        keep_alive,
        false,
    );
    let conn = ConnRef(std::rc::Rc::new(conn));
    tracing::info!(
        client_id = %client_id,
        user = user.as_deref(),
        protocol = "3.1.1",
        clean_session = packet.clean_session,
        session_present = attached.session_present,
        keep_alive,
        "Client connected."
    );
    Ok(start(
        connect,
        conn,
        attached.session_present,
        keep_alive,
        listener.hibernate,
    ))
}

/// Starts connection `conn` (a new one or one woken from hibernation): its writer, and the
/// CONNACK with the in-flight limit and the keepalive's idle timeout.
fn start(
    connect: v3::Connect,
    conn: ConnRef,
    session_present: bool,
    keep_alive: u16,
    listener: Option<std::net::SocketAddr>,
) -> v3::ConnectAck<ConnRef> {
    let max_inflight = conn.shared.limits.max_inflight;
    let out = Sink {
        sink: connect.sink(),
        io: connect.io().get_ref(),
    };
    spawn_writer(
        out,
        conn.session.clone(),
        conn.generation,
        usize::from(max_inflight),
        conn.closed.clone(),
        conn.shared.router.metrics().clone(),
        Hibernate::of(&conn, listener),
    );
    let ack = connect
        .ack(conn, session_present)
        .max_send(Some(max_inflight));
    // Disconnect after 1.5x the keepalive; 0 means none.
    ack.idle_timeout(Seconds(crate::connection::keepalive_allowance(keep_alive)))
}

/// A connection woken from hibernation: its replayed CONNECT (`hibernate.rs`) gets the
/// connection it had back, without a login or a new session generation; the CONNACK
/// written for it is dropped before it reaches the client (`AckFilter`).
fn resume(
    connect: v3::Connect,
    state: crate::hibernate::ConnState,
    listener: std::net::SocketAddr,
) -> v3::ConnectAck<ConnRef> {
    let keep_alive = state.keep_alive;
    let (conn, _) = Conn::resumed(state, connect.io().get_ref());
    start(connect, conn, true, keep_alive, Some(listener))
}

/// A PUBLISH: handled at once when it can be (see [`Handled`]), else in a boxed future.
pub(crate) fn publish(
    session: &v3::Session<ConnRef>,
    mut publish: v3::Publish,
) -> Handled<'_, Result<(), BrokerError>> {
    let conn: &Conn = session;
    let packet = publish.packet();
    let qos: QoS = packet.qos.into();
    let (packet_id, dup) = (packet.packet_id.map(|id| id.get()), packet.dup);
    let topic = packet.topic.clone();
    let retain = packet.retain;
    let body = publish.take_payload();
    if qos == QoS::AtMostOnce && !(body.is_fixed() && conn.qos0.is_idle()) {
        // Never wait for a streamed QoS 0 payload here (see `Qos0Lane`).
        let message = Message::new(topic, Bytes::new(), qos).with_retain(retain);
        if conn.push_qos0(message, body) {
            let session = session.clone();
            ntex::rt::spawn(async move {
                let sink = session.sink().clone();
                let client_id = session.client_id().to_owned();
                session
                    .drain_qos0(
                        |_| true,
                        move |error| {
                            // As for any PUBLISH: MQTT 3.1.1 closes the connection.
                            BrokerMetrics::protocol_error("violation");
                            tracing::warn!(client_id, protocol = "3.1.1", %error, "Closing connection: invalid topic name.");
                            sink.close();
                            true
                        },
                    )
                    .await;
            });
        }
        return conn.qos0.after_room(|| Ok(()));
    }
    conn.in_order(body, move |payload| {
        // A payload cut short was never received: its id is not recorded (see `begin_qos2`).
        let payload = match payload {
            Ok(payload) => payload,
            Err(e) => return Handled::ready(Err(BrokerError::Payload(e.to_string()))),
        };
        let inbound = match conn.begin_qos2(qos, packet_id, dup) {
            Qos2::Duplicate => return Handled::ready(Ok(())),
            Qos2::New(ticket) => ticket,
        };
        accept(conn, topic, payload, qos, retain, inbound)
    })
}

/// MQTT 3.1.1 packets taken before ntex's service pipeline ([`crate::connection::AckGuard`]):
/// acks of deliveries, PINGREQ, PUBLISHes (payloads that arrive in chunks are collected here, see
/// [`Partial`]) and their PUBRELs. ntex would box each packet's trip through its pipeline
/// (3.5 KiB moved and allocated per packet) and keep its own packet id map beside the
/// session's. The rest goes through ntex and [`publish`]/[`protocol`]: SUBSCRIBE and the
/// like, and PUBLISHes under a publish rate limit (whose waits hold back ntex's reading),
/// beyond `receive_maximum` publishes waiting for the state file, or behind the QoS 0 lane.
/// ntex follows the packet ids of PUBLISHes passed on: their re-sends and PUBRELs go there.
impl Inbound for v3::codec::Decoded {
    type Res = Option<v3::codec::Packet>;
    type Error = DispatcherError<BrokerError>;

    fn take(self, conn: &Conn) -> Taken<'_, Self> {
        use v3::codec::{Decoded, Packet};
        let (kind, packet_id) = match self {
            Decoded::Publish(publish, payload, size) => {
                return take_publish(conn, publish, payload, size);
            }
            Decoded::PayloadChunk(_, eof) if conn.discarded_chunk(eof) => {
                return Taken::Done(Ok(None));
            }
            Decoded::PayloadChunk(chunk, eof) => {
                return match conn.partial_chunk(chunk, eof) {
                    Ok(None) => Taken::Done(Ok(None)),
                    Ok(Some(partial)) => last_chunk(conn, *partial),
                    Err(chunk) => Taken::Pass(Decoded::PayloadChunk(chunk, eof), Passed::default()),
                };
            }
            Decoded::Packet(Packet::PublishAck { packet_id }, _) => (AckKind::Puback, packet_id),
            Decoded::Packet(Packet::PublishReceived { packet_id }, _) => {
                (AckKind::Pubrec, packet_id)
            }
            Decoded::Packet(Packet::PublishComplete { packet_id }, _) => {
                (AckKind::Pubcomp, packet_id)
            }
            Decoded::Packet(Packet::PublishRelease { packet_id }, size) => {
                return match conn.take_release(packet_id.get()) {
                    Release::Ntex => Taken::Pass(
                        Decoded::Packet(Packet::PublishRelease { packet_id }, size),
                        Passed::default(),
                    ),
                    Release::Answered => Taken::Done(Ok(None)),
                    Release::BeforePubrec => Taken::Done(Err(DispatcherError::Service(
                        BrokerError::Protocol("PUBREL before PUBREC"),
                    ))),
                };
            }
            Decoded::Packet(Packet::PingRequest, _) => {
                conn.pong();
                return Taken::Done(Ok(None));
            }
            other => return Taken::Pass(other, Passed::default()),
        };
        conn.take_ack(kind, packet_id.get());
        Taken::Done(Ok(None))
    }
}

/// A taken PUBLISH handled at once: its ack written now when nothing before it is
/// outstanding ([`Conn::ack_now`]), else its call's answer.
fn respond(
    conn: &Conn,
    result: Result<Option<InboundAck>, BrokerError>,
) -> Taken<'_, v3::codec::Decoded> {
    match result {
        Ok(Some(ack)) if conn.ack_now(ack) => Taken::Done(Ok(None)),
        result => Taken::Done(answer(result)),
    }
}

/// The answer to a taken PUBLISH's call: its ack, which ntex writes in packet order
/// [MQTT-4.6.0-2], or its error, which closes the connection.
fn answer(
    result: Result<Option<InboundAck>, BrokerError>,
) -> Result<Option<v3::codec::Packet>, DispatcherError<BrokerError>> {
    use v3::codec::Packet;
    let id = |id: u16| NonZeroU16::new(id).expect("packet ids of QoS 1 and 2 are not 0");
    match result {
        Ok(None) => Ok(None),
        Ok(Some(InboundAck::Puback(packet_id))) => Ok(Some(Packet::PublishAck {
            packet_id: id(packet_id),
        })),
        Ok(Some(InboundAck::Pubrec(packet_id))) => Ok(Some(Packet::PublishReceived {
            packet_id: id(packet_id),
        })),
        Err(error) => Err(DispatcherError::Service(error)),
    }
}

/// A PUBLISH: handled here (at once, or after its last payload chunk) or passed on to ntex
/// (see [`Inbound`]). The checks on its packet id are those ntex makes, on this
/// connection's ids.
fn take_publish(
    conn: &Conn,
    publish: v3::codec::Publish,
    payload: Bytes,
    size: u32,
) -> Taken<'_, v3::codec::Decoded> {
    let qos = QoS::from(publish.qos);
    let whole = publish.payload_size as usize == payload.len();
    let packet_id = publish.packet_id.map(|id| id.get());
    if publish.topic.contains(['#', '+']) {
        return Taken::Done(Err(SpecViolation::Pub_3_3_2_2.into()));
    }
    if let Some(id) = packet_id {
        match conn.inbound_id(id) {
            None => {}
            // ntex follows the id; counted as passed, so that no PUBLISH read after it is
            // taken (and routed or acked) before ntex is done with it.
            Some(InboundId::Ntex) => {
                let passed = conn.pass_resend();
                return Taken::Pass(v3::codec::Decoded::Publish(publish, payload, size), passed);
            }
            // A re-send while the first is being handled: the first one's ack acks both.
            Some(InboundId::Waiting(first)) if publish.dup && first == qos => {
                if !whole {
                    conn.discard_payload();
                }
                return Taken::Done(Ok(None));
            }
            // Until PUBREL, a PUBLISH with the packet id gets PUBREC and is not routed,
            // DUP or not [MQTT-4.3.3-2].
            Some(InboundId::Received) if qos == QoS::ExactlyOnce => {
                if !whole {
                    conn.discard_payload();
                }
                return respond(conn, Ok(Some(conn.received_qos2(id))));
            }
            Some(_) => {
                return Taken::Done(Err(SpecViolation::PacketId_2_2_1_3_Pub.into()));
            }
        }
    }
    if !conn.may_take_publish() || (qos == QoS::AtMostOnce && !conn.qos0.is_idle()) {
        let passed = conn.pass_publish(qos, packet_id);
        return Taken::Pass(v3::codec::Decoded::Publish(publish, payload, size), passed);
    }
    if !whole {
        // Handled at the last chunk; this call answers it, in its place among the acks.
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        let mut collected = BytesMut::with_capacity(publish.payload_size as usize);
        collected.extend_from_slice(&payload);
        conn.begin_partial(Partial {
            topic: publish.topic,
            qos,
            retain: publish.retain,
            dup: publish.dup,
            packet_id,
            payload: collected,
            answer: answer_tx,
        });
        let pending = conn.answer_pending();
        return Taken::Later(Box::pin(async move {
            // No answer: the connection closed before the last chunk.
            let result = answer_rx.await.unwrap_or(Ok(None));
            drop(pending);
            answer(result)
        }));
    }
    match handle_publish(
        conn,
        publish.topic,
        payload,
        qos,
        publish.retain,
        publish.dup,
        packet_id,
    ) {
        Ok(result) => respond(conn, result),
        Err(later) => {
            let pending = conn.answer_pending();
            Taken::Later(Box::pin(async move {
                let result = later.await;
                drop(pending);
                answer(result)
            }))
        }
    }
}

/// The last payload chunk of a taken PUBLISH: handles it now (before any later packet) and
/// answers its PUBLISH's call with the ack. An error fails this call (the dispatcher stops
/// at once, reading nothing more) and the PUBLISH's call answers nothing.
fn last_chunk(conn: &Conn, partial: Partial) -> Taken<'_, v3::codec::Decoded> {
    let Partial {
        topic,
        qos,
        retain,
        dup,
        packet_id,
        payload,
        answer,
    } = partial;
    let finish = move |result| match result {
        Err(error) => {
            let _ = answer.send(Ok(None));
            Err(DispatcherError::Service(error))
        }
        ack => {
            let _ = answer.send(ack);
            Ok(None)
        }
    };
    match handle_publish(conn, topic, payload.freeze(), qos, retain, dup, packet_id) {
        Ok(result) => Taken::Done(finish(result)),
        Err(later) => Taken::Later(Box::pin(async move { finish(later.await) })),
    }
}

/// What handling a taken PUBLISH gives: its ack (or error) at once, or once it is durable.
type Handling<'a> = Result<
    Result<Option<InboundAck>, BrokerError>,
    Pin<Box<dyn Future<Output = Result<Option<InboundAck>, BrokerError>> + 'a>>,
>;

/// A taken PUBLISH with its whole payload.
fn handle_publish<'a>(
    conn: &'a Conn,
    topic: ByteString,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    dup: bool,
    packet_id: Option<u16>,
) -> Handling<'a> {
    let inbound = match conn.begin_qos2(qos, packet_id, dup) {
        // Only a QoS 2 PUBLISH with its packet id is a duplicate.
        Qos2::Duplicate => {
            let id = packet_id.expect("a QoS 2 duplicate has a packet id");
            return Ok(Ok(Some(conn.received_qos2(id))));
        }
        Qos2::New(ticket) => ticket,
    };
    match accept(conn, topic, payload, qos, retain, inbound).now() {
        Ok(result) => Ok(conn.publish_done(qos, packet_id, false, result)),
        Err(later) => {
            conn.inbound_wait(qos, packet_id);
            Err(Box::pin(async move {
                let result = later.await;
                conn.publish_done(qos, packet_id, true, result)
            }))
        }
    }
}

/// A PUBLISH with its whole payload.
fn accept(
    conn: &Conn,
    topic: ByteString,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    inbound: Option<Ticket>,
) -> Handled<'_, Result<(), BrokerError>> {
    if !conn.may_publish(&topic) {
        // MQTT 3.1.1 cannot refuse a PUBLISH: it is acknowledged as usual and dropped.
        return Handled::ready(Ok(()));
    }
    let message = Message::new(topic, payload, qos).with_retain(retain);
    route(conn, message, inbound)
}

/// Routes a PUBLISH; the result once it is durable. MQTT 3.1.1 has no negative PUBACK: an
/// invalid topic or a failed state write closes the connection, so the publisher re-sends
/// after reconnecting.
fn route(
    conn: &Conn,
    message: Message,
    inbound: Option<Ticket>,
) -> Handled<'_, Result<(), BrokerError>> {
    let qos = message.qos;
    let routed = match conn.route(message) {
        Ok(routed) => routed,
        Err(error) => return Handled::ready(Err(BrokerError::Topic(error))),
    };
    if qos == QoS::AtMostOnce {
        return Handled::ready(Ok(()));
    }
    match routed.pending_with(inbound) {
        None => Handled::ready(Ok(())),
        Some(ticket) => Handled::later(async move {
            ticket
                .wait()
                .await
                .map_err(|e| BrokerError::Store(e.to_string()))
        }),
    }
}

pub(crate) async fn protocol(
    session: &v3::Session<ConnRef>,
    message: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, BrokerError> {
    let conn: &Conn = session;
    Ok(match message {
        v3::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut item in &mut subscribe {
                let qos = item.qos();
                if !conn.may_subscribe(item.topic()) {
                    item.fail();
                    continue;
                }
                match conn.subscribe(item.topic(), SubOptions::qos(qos.into())) {
                    Ok(()) => item.confirm(qos),
                    Err(error) => {
                        tracing::debug!(client_id = conn.client_id(), topic = %item.topic(), %error, "Subscription refused.");
                        item.fail();
                    }
                }
            }
            conn.reply_written();
            subscribe.ack()
        }
        v3::ProtocolMessage::Unsubscribe(unsubscribe) => {
            for topic in unsubscribe.iter() {
                let _ = conn.unsubscribe(topic);
            }
            conn.reply_written();
            unsubscribe.ack()
        }
        v3::ProtocolMessage::Disconnect(disconnect) => {
            conn.graceful.set(true);
            disconnect.ack()
        }
        v3::ProtocolMessage::PublishRelease(release) => {
            conn.session.inbound_qos2_release(release.id().get());
            release.ack()
        }
        v3::ProtocolMessage::Ping(ping) => ping.ack(),
    })
}

pub(crate) async fn control(
    session: &v3::Session<ConnRef>,
    control: Control<BrokerError>,
) -> Result<Option<v3::codec::Encoded>, BrokerError> {
    let conn: &Conn = session;
    match control {
        Control::WrBackpressure(_) => {}
        // It hibernated: the client is still there (`hibernate.rs`); whatever ntex reports
        // while it lets go of the connection is not the client's doing.
        Control::Stop(_) if conn.hibernated.get() => {}
        Control::Stop(Reason::Protocol(error)) => {
            let kind = crate::protocol_error_kind(error.get_ref());
            BrokerMetrics::protocol_error(kind);
            tracing::warn!(client_id = conn.client_id(), protocol = "3.1.1", kind, error = %error.get_ref(), "Closing connection: protocol error.");
            conn.finish();
        }
        Control::Stop(Reason::Error(error)) => {
            BrokerMetrics::protocol_error("violation");
            tracing::warn!(client_id = conn.client_id(), protocol = "3.1.1", error = ?error.get_ref(), "Closing connection.");
            conn.finish();
        }
        Control::Stop(Reason::PeerGone(_)) => {
            tracing::info!(
                client_id = conn.client_id(),
                protocol = "3.1.1",
                graceful = conn.graceful.get(),
                "Client disconnected."
            );
            conn.finish();
        }
    }
    Ok(None)
}

/// The writer's side of a 3.1.1 connection. Deliveries are encoded straight into the
/// connection's write buffer rather than through ntex's sink, whose per-message ack
/// bookkeeping (a map entry and an ack queue per QoS 1 delivery, a task and channels per
/// QoS 2 delivery) duplicated the session's in-flight window; their acks are taken by
/// [`crate::connection::AckGuard`]. The sink is still asked
/// for write readiness and closes the connection.
struct Sink {
    sink: v3::MqttSink,
    io: ntex::io::IoRef,
}

/// The largest remaining length MQTT's variable byte integer can express.
const MAX_REMAINING: usize = 268_435_455;

/// Payloads up to this size are copied into the write buffer, larger ones are appended as
/// a page of their own without a copy (as ntex's own `BytePages::append` decides).
const COPY_LIMIT: usize = 4096;

/// Encodes a PUBLISH of a delivery as MQTT 3.1.1 does into `buf`, straight from the
/// message: ntex's codec wants a packet that holds clones of topic and payload (two
/// reference counts up and down per delivery) and checks it again; the writer's messages
/// are already valid. False (nothing written) when it cannot be encoded: larger than a
/// packet can be, or QoS 1/2 without a packet id.
fn encode_publish(buf: &mut ntex_bytes::BytePages, outgoing: &Outgoing) -> bool {
    use ntex_bytes::BufMut;
    let delivery = &outgoing.delivery;
    let message = &delivery.message;
    let topic = message.topic.as_bytes();
    let payload = &message.payload;
    let packet_id = match (delivery.qos, outgoing.packet_id) {
        (QoS::AtMostOnce, _) => None,
        (_, Some(id)) => Some(id.get()),
        (_, None) => return false,
    };
    let Ok(topic_len) = u16::try_from(topic.len()) else {
        return false;
    };
    let remaining = 2 + topic.len() + if packet_id.is_some() { 2 } else { 0 } + payload.len();
    if remaining > MAX_REMAINING {
        return false;
    }
    let mut header = [0u8; 7];
    header[0] = 0x30
        | (u8::from(outgoing.dup) << 3)
        | (delivery.qos.as_u8() << 1)
        | u8::from(delivery.retain);
    let (length, k) = remaining_length(remaining);
    header[1..1 + k].copy_from_slice(&length[..k]);
    let n = 1 + k;
    header[n..n + 2].copy_from_slice(&topic_len.to_be_bytes());
    buf.put_slice(&header[..n + 2]);
    buf.put_slice(topic);
    if let Some(id) = packet_id {
        buf.put_slice(&id.to_be_bytes());
    }
    if payload.len() <= COPY_LIMIT {
        buf.put_slice(payload);
    } else {
        buf.append(payload.clone());
    }
    true
}

impl Outbound for Sink {
    fn is_open(&self) -> bool {
        self.sink.is_open()
    }

    fn is_ready(&self) -> bool {
        self.sink.is_ready()
    }

    async fn ready(&self) -> bool {
        self.sink.ready().await
    }

    fn encode(&mut self, buf: &mut ntex_bytes::BytePages, outgoing: &Outgoing) -> SendResult {
        if encode_publish(buf, outgoing) {
            SendResult::Sent
        } else {
            tracing::debug!(topic = %outgoing.delivery.message.topic, "Message cannot be encoded for a 3.1.1 client; dropped.");
            SendResult::Rejected
        }
    }

    fn io(&self) -> &ntex::io::IoRef {
        &self.io
    }

    fn close_taken_over(&self) {
        self.sink.close();
    }
    fn v5_state(&self) -> Option<Box<crate::hibernate::V5State>> {
        None
    }

    fn close_revoked(&self) {
        self.sink.close();
    }
}

/// MQTT's variable-length "remaining length" of a packet: its bytes (seven bits each, the
/// top bit set on all but the last) and how many of them there are (1 to 4 for lengths up
/// to `MAX_REMAINING`).
#[inline]
pub(crate) fn remaining_length(mut len: usize) -> ([u8; 4], usize) {
    debug_assert!(
        len <= MAX_REMAINING,
        "remaining length {len} too large for MQTT"
    );
    let mut bytes = [0u8; 4];
    let mut n = 0;
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        bytes[n] = if len > 0 { byte | 0x80 } else { byte };
        n += 1;
        if len == 0 || n == bytes.len() {
            return (bytes, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU16, sync::Arc};

    use ntex::codec::Encoder;
    use ntex_bytes::BytePages;

    use super::*;
    use crate::session::Delivery;

    fn outgoing(topic: &str, payload: usize, qos: QoS, retain: bool, dup: bool) -> Outgoing {
        let payload: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        Outgoing {
            delivery: Delivery {
                message: Arc::new(Message::new(topic, payload, qos)),
                qos,
                retain,
                subscription_ids: Vec::new(),
                seq: 0,
            },
            packet_id: (qos != QoS::AtMostOnce).then(|| NonZeroU16::new(0x1234).unwrap()),
            dup,
            release_only: false,
        }
    }

    /// The bytes ntex-mqtt's own codec writes for the same PUBLISH.
    fn ntex_encoding(o: &Outgoing) -> Vec<u8> {
        let message = &o.delivery.message;
        let packet = v3::codec::Publish {
            dup: o.dup,
            retain: o.delivery.retain,
            qos: o.delivery.qos.into(),
            topic: message.topic.clone(),
            packet_id: o.packet_id,
            payload_size: message.payload.len() as u32,
        };
        let mut buf = BytePages::default();
        v3::codec::Codec::new()
            .encode(
                v3::codec::Encoded::Publish(packet, Some(message.payload.clone())),
                &mut buf,
            )
            .unwrap();
        buf.freeze().to_vec()
    }

    #[test]
    fn remaining_length_uses_seven_bits_per_byte() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (MAX_REMAINING, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for (len, want) in cases {
            let (bytes, n) = remaining_length(len);
            assert_eq!(&bytes[..n], want, "{len}");
        }
    }

    #[test]
    fn publishes_are_encoded_as_ntex_encodes_them() {
        // Remaining lengths around each step of the variable byte integer (127/128,
        // 16383/16384), payloads copied and appended (around 4096), every flag.
        let long_topic = "t/".repeat(40);
        let payloads = [
            0, 1, 100, 121, 122, 125, 126, 4095, 4096, 4097, 16_000, 16_380, 20_000,
        ];
        for topic in ["a", "sensors/x/temp", long_topic.as_str()] {
            for payload in payloads {
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    for (retain, dup) in
                        [(false, false), (true, false), (false, true), (true, true)]
                    {
                        let dup = dup && qos != QoS::AtMostOnce;
                        let o = outgoing(topic, payload, qos, retain, dup);
                        let mut buf = BytePages::default();
                        assert!(encode_publish(&mut buf, &o));
                        assert_eq!(
                            buf.freeze().to_vec(),
                            ntex_encoding(&o),
                            "topic {topic}, payload {payload}, {qos:?}, retain {retain}, dup {dup}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_publish_that_cannot_be_encoded_writes_nothing() {
        let mut o = outgoing("t", 10, QoS::AtLeastOnce, false, false);
        o.packet_id = None;
        let mut buf = BytePages::default();
        assert!(!encode_publish(&mut buf, &o));
        let o = outgoing(&"x".repeat(70_000), 10, QoS::AtMostOnce, false, false);
        assert!(!encode_publish(&mut buf, &o));
        assert!(buf.freeze().is_empty());
    }
}
