//! MQTT over WebSocket (RFC 6455; MQTT 3.1.1 and 5.0 §6): an HTTP/1.1 upgrade, then ntex's
//! `WsTransport` turns binary frames into the byte stream the MQTT service reads. The MQTT
//! service is the listener's ordinary one, so WebSocket clients get the same handlers,
//! limits, auth and metrics as TCP clients.
//!
//! - The response selects the `mqtt` subprotocol (`mqttv3.1` for old clients that offer
//!   only that; the CONNECT then decides the protocol version). A client offering neither
//!   is refused with 400; one offering no subprotocol at all (`wscat`, `websocat`) is served.
//! - Any request path is served unless the listener names one; another path gets 404.
//! - A request that is not a WebSocket upgrade gets a short 4xx and the connection closes.
//! - The request head must start arriving within [`HANDSHAKE_TIMEOUT`] and be complete
//!   within the same time again; after the upgrade MQTT's own CONNECT timeout applies.
//! - The transport answers pings and echoes close frames; text frames close the connection
//!   (1003), as MQTT data is binary.
//!
//! Refused handshakes are logged at info and counted as protocol errors of kind `websocket`.

use std::{io, net::SocketAddr, rc::Rc};

use ntex::{
    http::{
        HttpService, HttpServiceConfig, KeepAlive, Request, Response, ResponseError, StatusCode,
        body::{Body, BodySize},
        error::DispatchError,
        h1, header,
    },
    io::{Filter, Io, IoBoxed, types::PeerAddr},
    service::{Ctx, Pipeline, Service},
    time::Seconds,
    ws,
};
use ntex_mqtt::MqttError;

use crate::{BrokerError, metrics::BrokerMetrics};

/// How a listener serves WebSocket upgrades.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebSocketSettings {
    /// The one request path served (compared with the request's path as sent, without
    /// the query); `None` serves every path.
    pub path: Option<String>,
}

/// Bound on each phase of the HTTP handshake: the first byte of the request, then the
/// whole request head.
const HANDSHAKE_TIMEOUT: Seconds = Seconds(5);

/// Subprotocols served, most preferred first.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Frame payloads above this close the connection. MQTT packets are at most
/// `max_packet_size`; the headroom lets a client put small packets in the same frame.
pub(crate) fn max_frame_size(max_packet_size: u32) -> usize {
    (max_packet_size as usize).saturating_add(64 * 1024)
}

/// HTTP settings for the upgrade: no keep-alive (one request per connection), and a
/// bounded request head.
pub(crate) fn http_config() -> HttpServiceConfig {
    HttpServiceConfig::new()
        .set_keepalive(KeepAlive::Disabled)
        .set_headers_read_rate(HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT, 0)
        .set_max_headers(64)
}

/// Per-worker state shared by the connections of one WebSocket listener.
struct Upgrader {
    mqtt: Pipeline<IoBoxed, (), MqttError<BrokerError>>,
    listener: SocketAddr,
    path: Option<String>,
    max_frame: usize,
}

/// The HTTP service of one WebSocket listener (one per worker): answers plain requests,
/// upgrades WebSocket ones and runs `mqtt` on the upgraded connection.
pub(crate) fn service<F, S>(
    mqtt: S,
    listener: SocketAddr,
    settings: WebSocketSettings,
    max_frame: usize,
) -> impl Service<(), Io<F>, Res = (), Error = ()>
where
    F: Filter,
    S: Service<(), IoBoxed, Res = (), Error = MqttError<BrokerError>> + 'static,
{
    let upgrader = Rc::new(Upgrader {
        mqtt: Pipeline::new((), mqtt),
        listener,
        path: settings.path,
        max_frame,
    });
    let control = upgrader.clone();
    let http = HttpService::h1(async move |request: Request| {
        Ok::<_, io::Error>(refuse_plain_request(listener, &request))
    })
    .control(async move |event: h1::Control<F, io::Error>| {
        Ok::<_, io::Error>(match event {
            h1::Control::Upgrade(upgrade) => control.upgrade(upgrade).await,
            h1::Control::Disconnect(h1::control::Reason::ProtocolError(error)) => {
                log_http_error(control.listener, error.get_ref());
                error.ack()
            }
            other => other.ack(),
        })
    });
    WebSocketListener { http, upgrader }.map_err(move |error: DispatchError| {
        tracing::debug!(%listener, %error, "WebSocket listener: HTTP connection failed.");
    })
}

/// HTTP until the upgrade, then MQTT. Shutting it down shuts down the MQTT service and
/// leaves the connections to end with the worker, as on a TCP listener (the HTTP service's
/// own shutdown would wait for every upgraded connection until the grace period ends).
struct WebSocketListener<S> {
    http: S,
    upgrader: Rc<Upgrader>,
}

impl<F, S> Service<(), Io<F>> for WebSocketListener<S>
where
    F: Filter,
    S: Service<(), Io<F>, Res = (), Error = DispatchError>,
{
    type Res = ();
    type Error = DispatchError;

    ntex::forward_bind!((), http);
    ntex::forward_ready!((), http);

    async fn call(&self, io: Io<F>, ctx: Ctx<'_, Self, ()>) -> Result<(), DispatchError> {
        ctx.call(&self.http, io).await
    }

    async fn shutdown(&self, _: Ctx<'_, Self, ()>) {
        self.upgrader.mqtt.shutdown().await;
    }
}

impl Upgrader {
    async fn upgrade<F: Filter>(&self, upgrade: h1::control::Upgrade<F>) -> h1::ControlAck<F> {
        let request = upgrade.get_ref();
        let peer = upgrade
            .io()
            .query::<PeerAddr>()
            .get()
            .map(PeerAddr::into_inner);
        let refused = |reason: &str| {
            BrokerMetrics::protocol_error("websocket");
            tracing::info!(
                listener = %self.listener,
                peer = peer.map(tracing::field::display),
                path = request.path(),
                reason,
                "WebSocket handshake refused."
            );
        };
        if let Some(path) = &self.path
            && request.path() != path
        {
            refused("wrong path");
            return upgrade.fail_with(text_response(
                StatusCode::NOT_FOUND,
                &format!("MQTT over WebSocket is served on {path}\n"),
            ));
        }
        if let Err(error) = ws::verify_handshake(request.head()) {
            refused(&error.to_string());
            let response = error.error_response();
            let text = format!("not a WebSocket handshake: {error}\n");
            return upgrade.fail_with(with_text(response, &text));
        }
        let offered = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|value| value.to_str().ok());
        let subprotocol = match select_subprotocol(offered) {
            Ok(selected) => selected,
            Err(()) => {
                refused("no mqtt subprotocol offered");
                return upgrade.fail_with(text_response(
                    StatusCode::BAD_REQUEST,
                    "MQTT over WebSocket needs the subprotocol mqtt (Sec-WebSocket-Protocol: mqtt)\n",
                ));
            }
        };
        let mut response = ws::handshake_response(request.head());
        if let Some(subprotocol) = subprotocol {
            response.header(header::SEC_WEBSOCKET_PROTOCOL, subprotocol);
        }
        let response = response.build().drop_body();

        let (ack, io, request, codec) = upgrade.handle();
        // The request (its head and header map, 2.5 KiB) and the HTTP codec are done with:
        // held to the end of this call, they would stay as long as the MQTT connection.
        drop(request);
        let sent = io
            .send(h1::Message::Item((response, BodySize::Empty)), &codec)
            .await;
        drop(codec);
        if let Err(error) = sent {
            tracing::debug!(listener = %self.listener, ?error, "WebSocket client left during the handshake.");
            return ack;
        }
        let io = ws::WsTransport::create(io, ws::Codec::new().max_size(self.max_frame));
        let io = io.add_filter(crate::acks::AckFilter::new());
        if let Err(error) = self.mqtt.call(io.boxed()).await {
            crate::server::log_handshake_error(self.listener, &error);
        }
        ack
    }
}

/// Any request that does not ask for an upgrade: 426 with a hint, then close.
fn refuse_plain_request(listener: SocketAddr, request: &Request) -> Response {
    BrokerMetrics::protocol_error("websocket");
    tracing::info!(
        %listener,
        peer = request.peer_addr().map(tracing::field::display),
        method = %request.method(),
        path = request.path(),
        "WebSocket handshake refused: plain HTTP request."
    );
    let mut response = text_response(
        StatusCode::UPGRADE_REQUIRED,
        "This port serves MQTT over WebSocket: connect with an MQTT client (subprotocol mqtt).\n",
    );
    response.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    response
}

/// A malformed or too slow request head (the dispatcher answers it with 400 or 408).
fn log_http_error(listener: SocketAddr, error: &h1::ProtocolError) {
    let reason = match error {
        h1::ProtocolError::SlowRequestTimeout => "no complete HTTP request in time",
        h1::ProtocolError::Decode(_) => "not an HTTP request",
        _ => "HTTP error",
    };
    BrokerMetrics::protocol_error("websocket");
    tracing::info!(%listener, reason, %error, "WebSocket handshake failed.");
}

fn text_response(status: StatusCode, text: &str) -> Response {
    with_text(Response::new(status), text)
}

fn with_text(mut response: Response, text: &str) -> Response {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.set_body(Body::from(text.to_string()))
}

/// The subprotocol to answer with, from the client's `Sec-WebSocket-Protocol` values
/// (comma-separated tokens, possibly over several headers): `Ok(None)` when the client
/// offered none, `Err` when it offered only others.
fn select_subprotocol<'a>(
    offered: impl Iterator<Item = &'a str>,
) -> Result<Option<&'static str>, ()> {
    let tokens: Vec<&str> = offered
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .collect();
    if tokens.is_empty() {
        return Ok(None);
    }
    SUBPROTOCOLS
        .into_iter()
        .find(|ours| tokens.iter().any(|token| token.eq_ignore_ascii_case(ours)))
        .map(Some)
        .ok_or(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_selection() {
        let select = |values: &[&'static str]| select_subprotocol(values.iter().copied());
        assert_eq!(select(&[]), Ok(None));
        assert_eq!(select(&[""]), Ok(None));
        assert_eq!(select(&["mqtt"]), Ok(Some("mqtt")));
        assert_eq!(select(&["MQTT"]), Ok(Some("mqtt")));
        assert_eq!(select(&["mqttv3.1, mqtt"]), Ok(Some("mqtt")));
        assert_eq!(select(&["chat", "mqttv3.1"]), Ok(Some("mqttv3.1")));
        assert_eq!(select(&["graphql-ws", " mqtt "]), Ok(Some("mqtt")));
        assert_eq!(select(&["chat, superchat"]), Err(()));
    }

    #[test]
    fn frame_limit_covers_the_largest_packet() {
        assert_eq!(max_frame_size(1024 * 1024), 1024 * 1024 + 65536);
        assert_eq!(max_frame_size(u32::MAX), u32::MAX as usize + 65536);
    }
}
