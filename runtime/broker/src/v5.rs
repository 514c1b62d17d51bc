//! MQTT 5.0 on ntex-mqtt: CONNECT, PUBLISH, SUBSCRIBE and friends, and the outbound sink.

use std::{
    collections::HashMap,
    num::{NonZeroU16, NonZeroU32},
    sync::Arc,
    time::Instant,
};

use edgegw_store::Ticket;
use ntex_mqtt::{
    Control, Reason,
    v5::{
        self,
        codec::{
            self, ConnectAckReason, Disconnect, DisconnectReasonCode, PublishAckReason,
            SubscribeAckReason, UnsubscribeAckReason,
        },
    },
};

use crate::{
    BrokerError,
    auth::{ListenerAuth, LoginRequest, Refusal},
    connection::{
        Conn, ConnRef, Handled, Hibernate, InboundId, Outbound, Qos2, SendResult, Shared, Taken,
        spawn_writer,
    },
    message::{ByteString, Bytes, Message, Properties, QoS},
    metrics::{BrokerMetrics, Protocol},
    router::{AttachOptions, Will},
    session::Outgoing,
    tree::SubOptions,
};

pub(crate) async fn connect(
    shared: Arc<Shared>,
    listener: ListenerAuth,
    connect: v5::Connect,
) -> Result<v5::ConnectAck<ConnRef>, BrokerError> {
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
        return Ok(connect.failed(ConnectAckReason::QuotaExceeded));
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
        Err(refusal) => {
            return Ok(connect.failed(match refusal {
                Refusal::BadCredentials => ConnectAckReason::BadUserNameOrPassword,
                Refusal::NotAuthorized => ConnectAckReason::NotAuthorized,
                Refusal::Banned => ConnectAckReason::Banned,
            }));
        }
    };
    let user = login.user.clone();
    let will = match &packet.last_will {
        None => None,
        Some(will) => {
            if let Err(error) = crate::topic::validate_name(&will.topic) {
                BrokerMetrics::refused("bad_will");
                tracing::info!(client_id = %packet.client_id, %error, "Connection refused: invalid will topic.");
                return Ok(connect.failed(ConnectAckReason::TopicNameInvalid));
            }
            let properties = Properties {
                payload_format_utf8: will.is_utf8_payload.unwrap_or(false),
                content_type: will.content_type.clone(),
                response_topic: will.response_topic.clone(),
                correlation_data: will.correlation_data.clone(),
                user_properties: will.user_properties.clone(),
                message_expiry_secs: will.message_expiry_interval,
            };
            Some(Will {
                message: Message::new(will.topic.clone(), will.message.clone(), will.qos.into())
                    .with_retain(will.retain)
                    .with_properties(properties),
                delay_secs: will.will_delay_interval_sec.unwrap_or(0),
            })
        }
    };
    let (client_id, assigned) = if packet.client_id.is_empty() {
        let id = shared.assign_client_id();
        (id.clone(), Some(ByteString::from(id)))
    } else {
        (packet.client_id.to_string(), None)
    };
    let acl_generation = shared.auth.generation();
    let acl = shared.auth.acl_for(user.as_deref(), &client_id);
    if !shared.auth.will_allowed(&acl, &client_id, will.as_ref()) {
        return Ok(connect.failed(ConnectAckReason::NotAuthorized));
    }
    let requested_expiry = packet.session_expiry_interval_secs;
    let options = AttachOptions {
        client_id: client_id.as_str().into(),
        clean_start: packet.clean_start,
        session_expiry_secs: requested_expiry,
        owner: user.as_deref().map(Arc::from),
        credential: login.credential,
    };
    let Some(attached) = shared.attach(options, &login) else {
        return Ok(connect.failed(ConnectAckReason::NotAuthorized));
    };
    let granted_expiry = attached.session.expiry_secs();
    let keep_alive = packet.keep_alive;
    let requested = Requested {
        client_keep_alive: keep_alive,
        session_expiry_secs: requested_expiry,
        receive_max: packet.receive_max,
        max_packet_size: packet.max_packet_size,
        topic_alias_max: packet.topic_alias_max,
        request_problem_info: packet.request_problem_info,
    };
    let conn = Conn::new(
        shared.clone(),
        attached.session.clone(),
        attached.generation,
        Protocol::V5,
        will,
        user.as_deref().map(Arc::from),
        acl,
        acl_generation,
        connect.io().get_ref(),
        slot,
        requested.keep_alive(&limits),
        false,
    );
    let conn = ConnRef(std::rc::Rc::new(conn));
    tracing::info!(
        client_id = %client_id,
        user = user.as_deref(),
        protocol = "5",
        clean_start = packet.clean_start,
        session_present = attached.session_present,
        keep_alive,
        "Client connected."
    );
    let session_present = attached.session_present;
    Ok(start(
        connect,
        conn,
        &requested,
        HashMap::new(),
        listener.hibernate,
    )
    .with(|a| {
        a.session_present = session_present;
        a.assigned_client_id = assigned;
        if granted_expiry != requested_expiry {
            a.session_expiry_interval_secs = Some(granted_expiry);
        }
    }))
}

/// What the client's CONNECT asked for that shapes the connection (kept while it
/// hibernates: a woken connection is set up from it again).
#[derive(Clone, Copy)]
struct Requested {
    client_keep_alive: u16,
    session_expiry_secs: u32,
    receive_max: Option<NonZeroU16>,
    max_packet_size: Option<NonZeroU32>,
    topic_alias_max: u16,
    request_problem_info: bool,
}

impl Requested {
    /// The keepalive in force: the client's, or the cap when it asked for more (Server
    /// Keep Alive); 0 means none.
    fn keep_alive(&self, limits: &crate::connection::ConnectionLimits) -> u16 {
        self.client_keep_alive.min(limits.max_keepalive_secs)
    }
}

/// Starts connection `conn` (a new one or one woken from hibernation): its writer (with the
/// topic aliases already assigned to the client), and the CONNACK with the broker's limits
/// and the keepalive.
fn start(
    connect: v5::Connect,
    conn: ConnRef,
    requested: &Requested,
    aliases: HashMap<ByteString, NonZeroU16>,
    listener: Option<std::net::SocketAddr>,
) -> v5::ConnectAck<ConnRef> {
    let limits = conn.shared.limits.clone();
    let client_receive_max = requested.receive_max.map_or(65_535, NonZeroU16::get);
    let window = usize::from(limits.max_inflight.min(client_receive_max));
    // The writer starts sending only after CONNACK: ntex encodes it before this task yields.
    let codec = codec::Codec::new();
    // The client's maximum packet size (MQTT 5.0 §3.1.2.11.4): larger deliveries are
    // dropped (counted as too large), the connection continues.
    if let Some(size) = requested.max_packet_size {
        codec.set_max_outbound_size(size.get());
    }
    let out = Sink {
        sink: connect.sink(),
        io: connect.io().get_ref(),
        codec,
        aliases,
        alias_max: requested.topic_alias_max,
        requested: *requested,
    };
    spawn_writer(
        out,
        conn.session.clone(),
        conn.generation,
        window,
        conn.closed.clone(),
        conn.shared.router.metrics().clone(),
        Hibernate::of(&conn, listener),
    );
    let ack = connect
        .ack(conn)
        .max_send(Some(limits.max_inflight))
        .with(|a| {
            a.max_qos = codec::QoS::ExactlyOnce;
            a.receive_max = NonZeroU16::new(limits.receive_maximum).unwrap_or(NonZeroU16::MIN);
            a.max_packet_size = Some(limits.max_packet_size);
            a.topic_alias_max = limits.topic_alias_maximum;
            a.retain_available = true;
            a.wildcard_subscription_available = true;
            a.shared_subscription_available = true;
            a.subscription_identifiers_available = true;
        });
    // The client must be heard from within 1.5x its keepalive; 0 means no keepalive;
    // a keepalive above the cap is lowered through Server Keep Alive.
    let keep_alive = requested.client_keep_alive;
    let max = limits.max_keepalive_secs;
    if keep_alive == 0 {
        ack.with(|a| a.server_keepalive_sec = Some(0))
    } else if keep_alive > max {
        ack.with(|a| a.server_keepalive_sec = Some(max))
    } else {
        ack.keep_alive(crate::connection::keepalive_allowance(keep_alive))
    }
}

/// A connection woken from hibernation: its replayed CONNECT (`hibernate.rs`, with the
/// properties the client's had) gets the connection it had back, without a login or a new
/// session generation, and with the topic aliases assigned to the client; the CONNACK
/// written for it is dropped before it reaches the client (`AckFilter`).
fn resume(
    connect: v5::Connect,
    state: crate::hibernate::ConnState,
    listener: std::net::SocketAddr,
) -> v5::ConnectAck<ConnRef> {
    let (conn, v5) = Conn::resumed(state, connect.io().get_ref());
    let v5 = v5.expect("a 5.0 CONNECT is replayed for a 5.0 connection");
    let requested = Requested {
        client_keep_alive: v5.client_keep_alive,
        session_expiry_secs: v5.session_expiry_secs,
        receive_max: v5.receive_max,
        max_packet_size: v5.max_packet_size,
        topic_alias_max: v5.topic_alias_max,
        request_problem_info: v5.request_problem_info,
    };
    start(connect, conn, &requested, v5.aliases, Some(listener)).with(|a| a.session_present = true)
}

/// A PUBLISH: handled at once when it can be (see [`Handled`]), else in a boxed future.
pub(crate) fn publish(
    session: &v5::Session<ConnRef>,
    mut publish: v5::Publish,
) -> Handled<'_, Result<v5::PublishAck, BrokerError>> {
    let conn: &Conn = session;
    let packet = publish.packet();
    let qos: QoS = packet.qos.into();
    let (packet_id, dup) = (packet.packet_id.map(|id| id.get()), packet.dup);
    let topic = packet.topic.clone();
    let retain = packet.retain;
    let p = &packet.properties;
    let properties = Properties {
        payload_format_utf8: p.is_utf8_payload,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        message_expiry_secs: p.message_expiry_interval,
    };
    let body = publish.take_payload();
    if qos == QoS::AtMostOnce && !(body.is_fixed() && conn.qos0.is_idle()) {
        // Never wait for a streamed QoS 0 payload here (see `Qos0Lane`).
        let message = Message::new(topic, Bytes::new(), qos)
            .with_retain(retain)
            .with_properties(properties);
        if conn.push_qos0(message, body) {
            let session = session.clone();
            ntex::rt::spawn(async move {
                let client_id = session.client_id().to_owned();
                // QoS 0 has no PUBACK to carry a reason code: a refused message is dropped.
                session
                    .drain_qos0(
                        |message| {
                            let valid = !message.properties.payload_format_utf8
                                || std::str::from_utf8(&message.payload).is_ok();
                            if !valid {
                                tracing::debug!(client_id, topic = %message.topic, "QoS 0 PUBLISH dropped: payload is not the UTF-8 its format indicator says.");
                            }
                            valid
                        },
                        |error| {
                            tracing::debug!(client_id, %error, "QoS 0 PUBLISH dropped: invalid topic name.");
                            false
                        },
                    )
                    .await;
            });
        }
        return conn.qos0.after_room(move || Ok(publish.ack()));
    }
    let message = Message::new(topic, Bytes::new(), qos)
        .with_retain(retain)
        .with_properties(properties);
    conn.in_order(body, move |payload| {
        // A payload cut short was never received: its id is not recorded (see `begin_qos2`).
        let payload = match payload {
            Ok(payload) => payload,
            Err(e) => return Handled::ready(Err(BrokerError::Payload(e.to_string()))),
        };
        let inbound = match conn.begin_qos2(qos, packet_id, dup) {
            Qos2::Duplicate => return Handled::ready(Ok(publish.ack())),
            Qos2::New(ticket) => ticket,
        };
        accept(conn, publish, message, payload, inbound)
    })
}

/// A PUBLISH read by ntex's decoder: handled here, before ntex's pipeline, or passed on to
/// it and to [`publish`]. ntex moves each PUBLISH it handles through its service layers (the
/// decoded packet with its properties, and several futures of a few KiB each): with every
/// MQTT 5 PUBLISH going that way, a quarter of the broker's time went to `memmove` and
/// MQTT 5 ran at half the 3.1.1 rate.
///
/// Taken: QoS 0 and 1 with their whole payload, without a topic alias, when no PUBLISH
/// passed on is still in ntex's pipeline (so none is overtaken) and the limits of
/// [`Conn::may_take_publish`] allow it. Passed on: everything ntex must remember or check
/// (topic aliases, QoS 2 with its PUBREL, wildcards or subscription identifiers that close
/// the connection, a packet id ntex follows), streamed payloads, and the rest under a
/// publish rate limit or behind the QoS 0 lane. A taken PUBLISH gets the same handling and
/// the same PUBACK reason codes as one passed on.
pub(crate) fn take_publish(
    conn: &Conn,
    publish: codec::Publish,
    payload: Bytes,
    size: u32,
) -> Taken<'_, codec::Decoded> {
    let qos: QoS = publish.qos.into();
    let packet_id = publish.packet_id.map(|id| id.get());
    let p = &publish.properties;
    if p.topic_alias.is_some() {
        conn.client_aliases.set(true);
    }
    let plain = qos != QoS::ExactlyOnce
        && payload.len() as u32 == publish.payload_size
        && p.topic_alias.is_none()
        && p.subscription_ids.is_empty()
        && !publish.topic.is_empty()
        && !publish.topic.contains(['#', '+'])
        && !p
            .response_topic
            .as_ref()
            .is_some_and(|t| t.contains(['#', '+']));
    let id_state = packet_id.and_then(|id| conn.inbound_id(id));
    match id_state {
        // The id is a taken PUBLISH's, still waiting for the state file; ntex does not know
        // it, so it is answered here as ntex answers for its own, whatever this PUBLISH
        // carries. A streamed payload's chunks are dropped.
        Some(InboundId::Waiting(first)) => {
            if payload.len() as u32 != publish.payload_size {
                conn.discard_payload();
            }
            // A re-send: the first one's ack acks both [MQTT-4.3.2-5].
            if publish.dup && first == qos {
                return Taken::Done(Ok(None));
            }
            let ack = codec::PublishAck {
                packet_id: publish.packet_id.expect("an id in use"),
                reason_code: PublishAckReason::PacketIdentifierInUse,
                ..Default::default()
            };
            return Taken::Done(Ok(Some(if qos == QoS::ExactlyOnce {
                codec::Packet::PublishReceived(ack)
            } else {
                codec::Packet::PublishAck(ack)
            })));
        }
        None => {}
        // ntex follows the id: ntex decides.
        Some(_) => {
            let passed = conn.pass_resend();
            return Taken::Pass(codec::Decoded::Publish(publish, payload, size), passed);
        }
    }
    if !plain || !conn.may_take_publish() || (qos == QoS::AtMostOnce && !conn.qos0.is_idle()) {
        let passed = conn.pass_publish(qos, packet_id);
        return Taken::Pass(codec::Decoded::Publish(publish, payload, size), passed);
    }
    let codec::Publish {
        topic,
        retain,
        properties: p,
        ..
    } = publish;
    let properties = Properties {
        payload_format_utf8: p.is_utf8_payload,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        message_expiry_secs: p.message_expiry_interval,
    };
    let message = Message::new(topic, payload, qos)
        .with_retain(retain)
        .with_properties(properties);
    let Some(id) = packet_id else {
        // QoS 0 has no PUBACK to carry a reason code: a refused message is dropped.
        if let Some(code) = refusal(conn, &message) {
            if code == PublishAckReason::PayloadFormatInvalid {
                tracing::debug!(client_id = conn.client_id(), topic = %message.topic, "QoS 0 PUBLISH dropped: payload is not the UTF-8 its format indicator says.");
            }
            return Taken::Done(Ok(None));
        }
        if let Err(error) = conn.route(message) {
            tracing::debug!(client_id = conn.client_id(), %error, "QoS 0 PUBLISH dropped: invalid topic name.");
        }
        return Taken::Done(Ok(None));
    };
    let ack = |reason_code, reason_string: Option<ByteString>| {
        Taken::Done(Ok(Some(codec::Packet::PublishAck(codec::PublishAck {
            packet_id: NonZeroU16::new(id).expect("packet ids of QoS 1 are not 0"),
            reason_code,
            reason_string,
            ..Default::default()
        }))))
    };
    if let Some(code) = refusal(conn, &message) {
        return ack(code, None);
    }
    let routed = match conn.route(message) {
        Ok(routed) => routed,
        Err(error) => {
            return ack(
                PublishAckReason::TopicNameInvalid,
                Some(error.to_string().into()),
            );
        }
    };
    let code = routed_code(&routed);
    let Some(ticket) = routed.pending_with(None) else {
        return if conn.puback_now(id, u8::from(code)) {
            Taken::Done(Ok(None))
        } else {
            ack(code, None)
        };
    };
    conn.inbound_wait(qos, packet_id);
    let pending = conn.answer_pending();
    Taken::Later(Box::pin(async move {
        let stored = ticket.wait().await;
        // Ends the wait (the packet id is free again); the ack is MQTT 5's own.
        let _ = conn.publish_done(qos, packet_id, true, Ok(()));
        drop(pending);
        let packet_id = NonZeroU16::new(id).expect("packet ids of QoS 1 are not 0");
        let ack = match stored {
            Ok(()) => codec::PublishAck {
                packet_id,
                reason_code: code,
                ..Default::default()
            },
            Err(error) => {
                let (reason_code, reason) = store_failed(conn, &error);
                codec::PublishAck {
                    packet_id,
                    reason_code,
                    reason_string: Some(reason),
                    ..Default::default()
                }
            }
        };
        Ok(Some(codec::Packet::PublishAck(ack)))
    }))
}

/// A PUBLISH with its whole payload (`message` still without it).
fn accept(
    conn: &Conn,
    publish: v5::Publish,
    mut message: Message,
    payload: Bytes,
    inbound: Option<Ticket>,
) -> Handled<'_, Result<v5::PublishAck, BrokerError>> {
    message.payload = payload;
    if let Some(code) = refusal(conn, &message) {
        release_refused(conn, &publish);
        return Handled::ready(Ok(publish.ack().reason_code(code)));
    }
    route(conn, publish, message, inbound)
}

/// Why a PUBLISH is refused before it is routed, as its acknowledgement's reason code: the
/// ACL does not allow its topic (0x87), or its payload is not the UTF-8 its format
/// indicator says (0x99). The same for a PUBLISH taken before ntex ([`take_publish`]) and
/// one passed on to it ([`publish`]).
fn refusal(conn: &Conn, message: &Message) -> Option<PublishAckReason> {
    if !conn.may_publish(&message.topic) {
        Some(PublishAckReason::NotAuthorized)
    } else if message.properties.payload_format_utf8
        && std::str::from_utf8(&message.payload).is_err()
    {
        Some(PublishAckReason::PayloadFormatInvalid)
    } else {
        None
    }
}

/// The reason code acknowledging a routed PUBLISH: 0x10 when no session matched.
fn routed_code(routed: &crate::router::Routed) -> PublishAckReason {
    if routed.delivered == 0 {
        PublishAckReason::NoMatchingSubscribers
    } else {
        PublishAckReason::Success
    }
}

/// A PUBLISH the state file could not store: logged; the reason code and string of its
/// acknowledgement.
fn store_failed(conn: &Conn, error: &dyn std::fmt::Display) -> (PublishAckReason, ByteString) {
    tracing::error!(client_id = conn.client_id(), %error, "Publish not acknowledged: state file write failed.");
    (
        PublishAckReason::UnspecifiedError,
        "the gateway could not store the message".into(),
    )
}

/// A QoS 2 PUBLISH answered with a PUBREC reason code of 0x80 or more: that ends the
/// exchange (no PUBREL follows, and the client may use the id again at once), so the id
/// is no longer kept as received. Kept, a later PUBLISH with it and DUP set (a re-send
/// after a reconnect) would be taken for a duplicate and dropped.
fn release_refused(conn: &Conn, publish: &v5::Publish) {
    let packet = publish.packet();
    if QoS::from(packet.qos) == QoS::ExactlyOnce
        && let Some(id) = packet.packet_id
    {
        conn.session.inbound_qos2_release(id.get());
    }
}

/// Routes a PUBLISH; its acknowledgement once it is durable (retained, queued for
/// persistent sessions).
fn route(
    conn: &Conn,
    publish: v5::Publish,
    message: Message,
    inbound: Option<Ticket>,
) -> Handled<'_, Result<v5::PublishAck, BrokerError>> {
    let qos = message.qos;
    let routed = match conn.route(message) {
        Ok(routed) => routed,
        Err(error) => {
            release_refused(conn, &publish);
            return Handled::ready(Ok(publish
                .ack()
                .reason_code(PublishAckReason::TopicNameInvalid)
                .reason(error.to_string().into())));
        }
    };
    let code = routed_code(&routed);
    let pending = if qos == QoS::AtMostOnce {
        None
    } else {
        routed.pending_with(inbound)
    };
    let Some(ticket) = pending else {
        return Handled::ready(Ok(publish.ack().reason_code(code)));
    };
    Handled::later(async move {
        if let Err(error) = ticket.wait().await {
            let (code, reason) = store_failed(conn, &error);
            release_refused(conn, &publish);
            return Ok(publish.ack().reason_code(code).reason(reason));
        }
        Ok(publish.ack().reason_code(code))
    })
}

pub(crate) async fn protocol(
    session: &v5::Session<ConnRef>,
    message: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, BrokerError> {
    let conn: &Conn = session;
    Ok(match message {
        v5::ProtocolMessage::Subscribe(mut subscribe) => {
            let subscription_id = subscribe.packet().id.map(NonZeroU32::get);
            for mut item in &mut subscribe {
                let o = *item.options();
                let options = SubOptions {
                    qos: o.qos.into(),
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: o.retain_handling as u8,
                    subscription_id,
                };
                if !conn.may_subscribe(item.topic()) {
                    item.fail(SubscribeAckReason::NotAuthorized);
                    continue;
                }
                match conn.subscribe(item.topic(), options) {
                    Ok(()) => item.confirm(o.qos),
                    Err(error) => {
                        tracing::debug!(client_id = conn.client_id(), topic = %item.topic(), %error, "Subscription refused.");
                        item.fail(SubscribeAckReason::TopicFilterInvalid);
                    }
                }
            }
            conn.reply_written();
            subscribe.ack()
        }
        v5::ProtocolMessage::Unsubscribe(mut unsubscribe) => {
            for mut item in &mut unsubscribe {
                match conn.unsubscribe(item.topic()) {
                    Ok(true) => item.success(),
                    Ok(false) => item.fail(UnsubscribeAckReason::NoSubscriptionExisted),
                    Err(_) => item.fail(UnsubscribeAckReason::TopicFilterInvalid),
                }
            }
            conn.reply_written();
            unsubscribe.ack()
        }
        v5::ProtocolMessage::Disconnect(disconnect) => {
            let packet = disconnect.packet();
            conn.graceful
                .set(packet.reason_code != DisconnectReasonCode::DisconnectWithWillMessage);
            if let Some(secs) = packet.session_expiry_interval_secs {
                conn.router().set_session_expiry(&conn.session, secs);
            }
            disconnect.ack()
        }
        v5::ProtocolMessage::PublishRelease(release) => {
            conn.session
                .inbound_qos2_release(release.packet().packet_id.get());
            release.ack()
        }
        v5::ProtocolMessage::Ping(ping) => ping.ack(),
        message @ v5::ProtocolMessage::Auth(_) => message.disconnect_with(Disconnect::new(
            DisconnectReasonCode::BadAuthenticationMethod,
        )),
    })
}

pub(crate) async fn control(
    session: &v5::Session<ConnRef>,
    control: Control<BrokerError>,
) -> Result<Option<codec::Encoded>, BrokerError> {
    let conn: &Conn = session;
    match control {
        Control::WrBackpressure(_) => Ok(None),
        // It hibernated: the client is still there (`hibernate.rs`); whatever ntex reports
        // while it lets go of the connection is not the client's doing.
        Control::Stop(_) if conn.hibernated.get() => Ok(None),
        Control::Stop(Reason::Protocol(error)) => {
            let kind = crate::protocol_error_kind(error.get_ref());
            BrokerMetrics::protocol_error(kind);
            tracing::warn!(client_id = conn.client_id(), protocol = "5", kind, error = %error.get_ref(), "Closing connection: protocol error.");
            conn.finish();
            // ntex answers most decode errors with 0x83; say what was wrong instead.
            use ntex_mqtt::error::{DecodeError, MqttProtocolError};
            let reason = match error.get_ref() {
                MqttProtocolError::Decode(DecodeError::MaxSizeExceeded { .. }) => {
                    Some(DisconnectReasonCode::PacketTooLarge)
                }
                MqttProtocolError::Decode(_) => Some(DisconnectReasonCode::MalformedPacket),
                _ => None,
            };
            Ok(reason.map(|r| codec::Packet::from(Disconnect::new(r)).into()))
        }
        Control::Stop(Reason::Error(error)) => {
            tracing::warn!(client_id = conn.client_id(), error = ?error.get_ref(), "Closing connection: handler error.");
            conn.finish();
            Ok(None)
        }
        Control::Stop(Reason::PeerGone(_)) => {
            tracing::info!(
                client_id = conn.client_id(),
                protocol = "5",
                graceful = conn.graceful.get(),
                "Client disconnected."
            );
            conn.finish();
            Ok(None)
        }
    }
}

/// The writer's side of a 5.0 connection. Deliveries are encoded straight into the
/// connection's write buffer rather than through ntex's sink, whose per-message ack
/// bookkeeping (a map entry and an ack queue per QoS 1 delivery, a task and channels per
/// QoS 2 delivery) duplicated the session's in-flight window; their acks are taken by
/// [`crate::connection::AckGuard`]. The sink is still asked for write readiness and
/// closes the connection with a reason.
struct Sink {
    sink: v5::MqttSink,
    io: ntex::io::IoRef,
    /// Encodes deliveries within the client's maximum packet size.
    codec: codec::Codec,
    aliases: HashMap<ByteString, NonZeroU16>,
    alias_max: u16,
    /// Kept for hibernation.
    requested: Requested,
}

impl Sink {
    fn encode_into(&mut self, buf: &mut ntex_bytes::BytePages, outgoing: &Outgoing) -> SendResult {
        let qos = ntex_mqtt::QoS::from(outgoing.delivery.qos);
        if qos != ntex_mqtt::QoS::AtMostOnce && outgoing.packet_id.is_none() {
            return SendResult::Rejected;
        }
        let delivery = &outgoing.delivery;
        let message = &delivery.message;
        let payload = message.payload.clone();
        let Ok(payload_size) = u32::try_from(payload.len()) else {
            return SendResult::Rejected;
        };
        // Server-assigned topic aliases: the first message on a topic carries topic and
        // alias, later ones only the alias, while the client's alias maximum allows.
        let (topic, alias, new_alias) = match self.aliases.get(&message.topic) {
            Some(alias) if !outgoing.dup => (ByteString::default(), Some(*alias), false),
            Some(alias) => (message.topic.clone(), Some(*alias), false),
            None if self.aliases.len() < usize::from(self.alias_max) => {
                let alias = NonZeroU16::new(self.aliases.len() as u16 + 1);
                if let Some(alias) = alias {
                    self.aliases.insert(message.topic.clone(), alias);
                }
                (message.topic.clone(), alias, alias.is_some())
            }
            None => (message.topic.clone(), None, false),
        };
        let properties = &message.properties;
        let packet = codec::Publish {
            dup: outgoing.dup,
            retain: delivery.retain,
            qos,
            packet_id: outgoing.packet_id,
            topic,
            payload_size,
            properties: codec::PublishProperties {
                topic_alias: alias,
                correlation_data: properties.correlation_data.clone(),
                message_expiry_interval: message.remaining_expiry(Instant::now()),
                content_type: properties.content_type.clone(),
                user_properties: properties.user_properties.clone(),
                is_utf8_payload: properties.payload_format_utf8,
                response_topic: properties.response_topic.clone(),
                subscription_ids: delivery
                    .subscription_ids
                    .iter()
                    .filter_map(|id| NonZeroU32::new(*id))
                    .collect(),
            },
        };
        match ntex::codec::Encoder::encode(
            &self.codec,
            codec::Encoded::Publish(packet, Some(payload)),
            buf,
        ) {
            Ok(()) => SendResult::Sent,
            Err(error) => {
                // Most likely larger than the client's maximum packet size. An alias assigned
                // by this message never reached the client: forget it (it was the last one
                // assigned, so the next topic gets its number), else the next message on the
                // topic would carry only an alias the client does not know.
                if new_alias {
                    self.aliases.remove(&message.topic);
                }
                tracing::debug!(%error, topic = %message.topic, "Message not sent to a 5.0 client; dropped.");
                SendResult::Rejected
            }
        }
    }
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
        self.encode_into(buf, outgoing)
    }

    fn io(&self) -> &ntex::io::IoRef {
        &self.io
    }

    fn close_taken_over(&self) {
        self.sink
            .close_with_reason(Disconnect::new(DisconnectReasonCode::SessionTakenOver));
    }
    fn close_revoked(&self) {
        self.sink
            .close_with_reason(Disconnect::new(DisconnectReasonCode::NotAuthorized));
    }

    fn v5_state(&self) -> Option<Box<crate::hibernate::V5State>> {
        let r = &self.requested;
        Some(Box::new(crate::hibernate::V5State {
            client_keep_alive: r.client_keep_alive,
            session_expiry_secs: r.session_expiry_secs,
            receive_max: r.receive_max,
            max_packet_size: r.max_packet_size,
            topic_alias_max: r.topic_alias_max,
            request_problem_info: r.request_problem_info,
            aliases: self.aliases.clone(),
        }))
    }
}
