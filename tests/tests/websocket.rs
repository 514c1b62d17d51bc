//! MQTT over WebSocket through the real binary: rumqttc's WebSocket transport (v3.1.1 and
//! v5), a byte-level client on tungstenite for what rumqttc hides (the handshake response,
//! frames, WSS through rustls), and plain TCP for what is not a WebSocket at all.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use edgegw_tests::{
    Gateway, message,
    raw::{self, CONNACK, PINGRESP, PUBLISH, Packet, Publish, Raw, SUBACK},
};
use tungstenite::{
    Message, WebSocket,
    client::IntoClientRequest,
    handshake::client::Response,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

const WAIT: Duration = Duration::from_secs(10);

/// A plain listener (the harness's first) and a WebSocket listener on any path.
fn gateway() -> Gateway {
    Gateway::start_with("", "    - bind: 127.0.0.1:0\n      websocket: true\n")
}

fn ws_url(gw: &Gateway, path: &str) -> String {
    format!(
        "ws://{}{path}",
        gw.ws.expect("the WebSocket listener is logged as ws://")
    )
}

// ---------------------------------------------------------------------------------------
// A byte-level MQTT client inside WebSocket binary frames.

struct WsClient<S: Read + Write> {
    socket: WebSocket<S>,
    buffer: Vec<u8>,
}

impl<S: Read + Write> WsClient<S> {
    fn send(&mut self, packet: &[u8]) {
        self.socket
            .send(Message::Binary(packet.to_vec()))
            .expect("send a binary frame");
    }

    /// The next MQTT packet; `None` when the connection closed or nothing came in `WAIT`
    /// (the socket's read timeout).
    fn read(&mut self) -> Option<Packet> {
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            match self.socket.read() {
                Ok(Message::Binary(bytes)) => self.buffer.extend_from_slice(&bytes),
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(other) => panic!("unexpected WebSocket message {other:?}"),
                Err(_) => return None,
            }
        }
    }

    fn read_kind(&mut self, kind: u8) -> Packet {
        let packet = self
            .read()
            .unwrap_or_else(|| panic!("no packet of kind {kind} within the wait"));
        assert_eq!(packet.kind(), kind, "{packet:?}");
        packet
    }

    /// Reads WebSocket messages until a close frame (or the connection's end); returns the
    /// close frame, or `None` when the connection ended without one.
    fn closed(&mut self) -> Option<CloseFrame<'static>> {
        loop {
            match self.socket.read() {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn take_packet(&mut self) -> Option<Packet> {
        if self.buffer.len() < 2 {
            return None;
        }
        let (len, used) = raw::read_varint(&self.buffer[1..])?;
        let total = 1 + used + len;
        if self.buffer.len() < total {
            return None;
        }
        let packet = Packet {
            header: self.buffer[0],
            body: self.buffer[1 + used..total].to_vec(),
        };
        self.buffer.drain(..total);
        Some(packet)
    }
}

/// TCP to `addr` with every read bounded by `WAIT`.
fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// A WebSocket handshake to `url` offering `subprotocols` (none when empty) over `stream`.
fn handshake<S: Read + Write>(
    url: &str,
    subprotocols: Option<&str>,
    stream: S,
) -> Result<(WsClient<S>, Response), Box<tungstenite::Error>> {
    let mut request = url.into_client_request().unwrap();
    if let Some(offered) = subprotocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", offered.parse().unwrap());
    }
    match tungstenite::client(request, stream) {
        Ok((socket, response)) => Ok((
            WsClient {
                socket,
                buffer: Vec::new(),
            },
            response,
        )),
        Err(tungstenite::HandshakeError::Failure(error)) => Err(Box::new(error)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            panic!("the handshake did not finish within the wait")
        }
    }
}

fn ws_connect(url: &str, addr: SocketAddr) -> (WsClient<TcpStream>, Response) {
    handshake(url, Some("mqtt"), tcp(addr)).expect("WebSocket handshake")
}

/// The response's selected subprotocol.
fn subprotocol(response: &Response) -> Option<&str> {
    response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap())
}

/// Status and body of a refused handshake.
fn refusal(error: &tungstenite::Error) -> (u16, String) {
    match error {
        tungstenite::Error::Http(response) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// rumqttc over WebSocket, and interop with TCP clients.

mod v3 {
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};

    use super::*;

    pub fn ws_client(url: &str, id: &str) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, url, 0);
        options.set_transport(Transport::Ws);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        AsyncClient::new(options, 100)
    }

    pub fn tcp_client(gw: &Gateway, id: &str) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", gw.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        AsyncClient::new(options, 100)
    }

    /// Polls until SUBACK (the connection is up and subscribed).
    pub async fn subscribed(events: &mut EventLoop) {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(ack)) =
                    events.poll().await.expect("connection")
                {
                    assert!(
                        ack.return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                        "{ack:?}"
                    );
                    return;
                }
            }
        })
        .await
        .expect("SUBACK within the wait");
    }

    pub async fn next_publish(events: &mut EventLoop) -> rumqttc::Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) =
                    events.poll().await.expect("connection")
                {
                    return p;
                }
            }
        })
        .await
        .expect("a PUBLISH within the wait")
    }

    pub fn drive(mut events: EventLoop) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { while events.poll().await.is_ok() {} })
    }

    pub fn qos(n: u8) -> QoS {
        match n {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publish_subscribe_over_websocket_and_with_tcp_clients() {
    let gw = gateway();
    let url = ws_url(&gw, "/mqtt");
    // rumqttc checks that the response selects the `mqtt` subprotocol.
    let (ws_sub, mut ws_sub_events) = v3::ws_client(&url, "ws-sub");
    ws_sub
        .subscribe("ws/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    v3::subscribed(&mut ws_sub_events).await;
    let (tcp_sub, mut tcp_sub_events) = v3::tcp_client(&gw, "tcp-sub");
    tcp_sub
        .subscribe("ws/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    v3::subscribed(&mut tcp_sub_events).await;

    let (ws_pub, ws_pub_events) = v3::ws_client(&url, "ws-pub");
    let ws_driver = v3::drive(ws_pub_events);
    let (tcp_pub, tcp_pub_events) = v3::tcp_client(&gw, "tcp-pub");
    let tcp_driver = v3::drive(tcp_pub_events);

    for qos in 0..=2u8 {
        // WebSocket publisher → WebSocket and TCP subscribers.
        let payload = format!("from ws, qos {qos}");
        ws_pub
            .publish("ws/a", v3::qos(qos), false, payload.clone())
            .await
            .unwrap();
        for events in [&mut ws_sub_events, &mut tcp_sub_events] {
            let p = v3::next_publish(events).await;
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("ws/a", payload.as_bytes())
            );
            assert_eq!(p.qos, v3::qos(qos));
        }
        // TCP publisher → WebSocket subscriber.
        let payload = format!("from tcp, qos {qos}");
        tcp_pub
            .publish("ws/b", v3::qos(qos), false, payload.clone())
            .await
            .unwrap();
        for events in [&mut ws_sub_events, &mut tcp_sub_events] {
            let p = v3::next_publish(events).await;
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("ws/b", payload.as_bytes())
            );
        }
    }
    // A large message crosses in several frames' worth of bytes.
    let big = vec![b'x'; 200 * 1024];
    ws_pub
        .publish("ws/big", rumqttc::QoS::AtLeastOnce, false, big.clone())
        .await
        .unwrap();
    assert_eq!(v3::next_publish(&mut tcp_sub_events).await.payload, big);
    assert_eq!(v3::next_publish(&mut ws_sub_events).await.payload, big);

    // WebSocket connections count in the same metrics as TCP ones.
    let connections = gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| {
        v == 4.0
    });
    assert_eq!(connections, 4.0);
    ws_driver.abort();
    tcp_driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_subscribe_over_websocket() {
    use rumqttc::{
        Transport,
        v5::{
            AsyncClient, Event, MqttOptions,
            mqttbytes::{QoS, v5::Packet},
        },
    };

    let gw = gateway();
    // MQTT.js asks for `/` when the URL has no path; any path is served by default.
    let url = ws_url(&gw, "/");
    let client = |id: &str| {
        let mut options = MqttOptions::new(id, url.as_str(), 0);
        options.set_transport(Transport::Ws);
        options.set_keep_alive(Duration::from_secs(30));
        AsyncClient::new(options, 100)
    };
    let (sub, mut sub_events) = client("v5-ws-sub");
    sub.subscribe("v5/+/temp", QoS::ExactlyOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match sub_events.poll().await.expect("connection") {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    assert_eq!(
                        ack.code,
                        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
                    );
                }
                Event::Incoming(Packet::SubAck(_)) => return,
                _ => {}
            }
        }
    })
    .await
    .expect("CONNACK and SUBACK");

    let (publisher, mut pub_events) = client("v5-ws-pub");
    let driver = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    // A v3.1.1 client on the TCP listener publishes too.
    let (tcp_pub, tcp_events) = v3::tcp_client(&gw, "v3-tcp-pub");
    let tcp_driver = v3::drive(tcp_events);

    for (qos, from) in [(0u8, "ws"), (1, "ws"), (2, "ws"), (1, "tcp")] {
        let payload = format!("{from} {qos}");
        match from {
            "ws" => publisher
                .publish("v5/kitchen/temp", v3_to_v5(qos), false, payload.clone())
                .await
                .unwrap(),
            _ => tcp_pub
                .publish("v5/kitchen/temp", v3::qos(qos), false, payload.clone())
                .await
                .unwrap(),
        }
        let p = tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) =
                    sub_events.poll().await.expect("connection")
                {
                    return p;
                }
            }
        })
        .await
        .expect("a PUBLISH within the wait");
        assert_eq!(&p.topic[..], b"v5/kitchen/temp");
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert_eq!(p.qos, v3_to_v5(qos));
    }
    assert_eq!(
        gw.wait_metric("edgegw_broker_connections{protocol=\"5\"}", WAIT, |v| v
            == 2.0),
        2.0
    );
    driver.abort();
    tcp_driver.abort();

    fn v3_to_v5(qos: u8) -> QoS {
        match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The handshake and frames, byte by byte.

#[test]
fn handshake_selects_the_mqtt_subprotocol_and_frames_carry_mqtt() {
    let gw = gateway();
    let addr = gw.ws.unwrap();
    let url = ws_url(&gw, "/mqtt");

    let (mut client, response) = ws_connect(&url, addr);
    assert_eq!(response.status().as_u16(), 101);
    assert_eq!(subprotocol(&response), Some("mqtt"));
    // MQTT 3.1.1 CONNECT in one binary frame; the CONNACK comes back in binary frames.
    client.send(&raw::connect_v3("frames", true, 30));
    let connack = client.read_kind(CONNACK);
    assert_eq!(connack.body, [0, 0]);
    // Several packets in one frame, and one packet split over two frames.
    let mut both = raw::subscribe_v3(1, "frames/#", 1);
    both.extend(raw::pingreq());
    client.send(&both);
    assert_eq!(client.read_kind(SUBACK).body, [0, 1, 1]);
    client.read_kind(PINGRESP);
    let publish = raw::publish_v3("frames/x", 0, 0, false, b"split");
    let (head, tail) = publish.split_at(5);
    client.send(head);
    client.send(tail);
    let p = Publish::parse(&client.read_kind(PUBLISH), false);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("frames/x", &b"split"[..])
    );
    // WebSocket pings are answered by the transport.
    client
        .socket
        .send(Message::Ping(b"are you there".to_vec()))
        .unwrap();
    match client.socket.read().expect("a pong within the wait") {
        Message::Pong(data) => assert_eq!(data, b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // A close frame is echoed and the MQTT connection ends (the session is gone).
    client
        .socket
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .unwrap();
    let echoed = client.closed().expect("the close frame is echoed");
    assert_eq!(echoed.code, CloseCode::Normal);
    assert_eq!(
        gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| v
            == 0.0),
        0.0
    );

    // Several offered subprotocols: `mqtt` is chosen; an old client's `mqttv3.1` alone
    // is accepted too; a client offering none is served without one.
    for (offered, selected) in [
        (Some("chat, mqtt"), Some("mqtt")),
        (Some("mqttv3.1"), Some("mqttv3.1")),
        (None, None),
    ] {
        let (mut client, response) = handshake(&url, offered, tcp(addr)).expect("handshake");
        assert_eq!(subprotocol(&response), selected, "offered {offered:?}");
        client.send(&raw::connect_v5("offers", true, 30, &[]));
        assert_eq!(client.read_kind(CONNACK).body[..2], [0, 0]);
    }
    // Only other subprotocols: refused with 400, saying what is needed.
    let (status, body) = refusal(&handshake(&url, Some("chat"), tcp(addr)).err().unwrap());
    assert_eq!(status, 400);
    assert!(body.contains("mqtt"), "{body}");
}

#[test]
fn text_frames_close_the_connection() {
    let gw = gateway();
    let (mut client, _) = ws_connect(&ws_url(&gw, "/mqtt"), gw.ws.unwrap());
    client.send(&raw::connect_v3("texter", true, 30));
    client.read_kind(CONNACK);
    client
        .socket
        .send(Message::Text("not MQTT".into()))
        .unwrap();
    let frame = client.closed().expect("a close frame");
    assert_eq!(frame.code, CloseCode::Unsupported);
    assert_eq!(
        gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| v
            == 0.0),
        0.0
    );
}

/// A malformed first packet over WebSocket is logged and counted as one over TCP is: the
/// upgrade logs what the MQTT service failed with.
#[test]
fn a_malformed_first_packet_over_websocket_is_logged_and_counted() {
    let gw = gateway();
    let metric = "edgegw_broker_protocol_errors_total{kind=\"malformed\"}";
    let before = gw.metric(metric);
    let (mut client, _) = ws_connect(&ws_url(&gw, "/mqtt"), gw.ws.unwrap());
    client.send(b"\xff\xff\xff\xff\x7f");
    assert!(client.read().is_none(), "no CONNACK: the connection ends");
    let counted = gw.wait_metric(metric, WAIT, |v| v >= before + 1.0);
    assert_eq!(counted, before + 1.0);
    assert!(gw.wait_log(WAIT, |line| {
        message(line) == Some("Connection closed at CONNECT: protocol error.")
            && line["level"] == "WARN"
            && line["fields"]["kind"] == "malformed"
    }));
}

/// Sends `request` on a new TCP connection; returns everything the listener answered
/// before closing (panics when it does not close within the wait).
fn http_exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = tcp(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("the listener answers and closes the connection within the wait");
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn plain_http_requests_are_refused() {
    let gw = gateway();
    let addr = gw.ws.unwrap();
    let before = gw.metric("edgegw_broker_protocol_errors_total{kind=\"websocket\"}");

    let response = http_exchange(addr, "GET /mqtt HTTP/1.1\r\nHost: gateway\r\n\r\n");
    assert!(
        response.starts_with("HTTP/1.1 426 "),
        "a plain GET gets 426 Upgrade Required: {response}"
    );
    assert!(
        response.to_ascii_lowercase().contains("upgrade: websocket"),
        "{response}"
    );
    assert!(response.contains("MQTT over WebSocket"), "{response}");

    // An upgrade to something else, and a WebSocket upgrade without a key.
    let response = http_exchange(
        addr,
        "GET / HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert!(response.contains("not a WebSocket handshake"), "{response}");
    let response = http_exchange(
        addr,
        "GET / HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");

    // Raw MQTT on the WebSocket port is not HTTP: an error response, then the close.
    let mut raw = Raw::connect(addr);
    raw.send(&raw::connect_v3("lost", true, 30));
    let mut seen = Vec::new();
    assert!(raw.closed_within(WAIT, &mut seen), "raw MQTT is refused");

    let counted = gw.wait_metric(
        "edgegw_broker_protocol_errors_total{kind=\"websocket\"}",
        WAIT,
        |v| v >= before + 4.0,
    );
    assert!(counted >= before + 4.0, "{counted}");
    assert!(gw.wait_log(WAIT, |line| {
        message(line) == Some("WebSocket handshake refused: plain HTTP request.")
            && line["level"] == "INFO"
    }));
}

#[test]
fn slow_handshakes_are_cut_off() {
    let gw = gateway();
    let addr = gw.ws.unwrap();
    // One client sends nothing, one stops in the middle of the request head.
    let silent = tcp(addr);
    let mut partial = tcp(addr);
    partial
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: gateway\r\n")
        .unwrap();
    let started = Instant::now();
    for mut stream in [silent, partial] {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("the listener closes a stalled handshake");
    }
    // 5s for each phase, with one-second timer resolution.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(gw.wait_log(WAIT, |line| {
        message(line) == Some("WebSocket handshake failed.")
            && line["fields"]["reason"] == "no complete HTTP request in time"
    }));
}

#[test]
fn a_listener_with_a_path_serves_only_that_path() {
    let gw = Gateway::start_with(
        "",
        "    - bind: 127.0.0.1:0\n      websocket:\n        path: /mqtt\n",
    );
    let addr = gw.ws.unwrap();
    // Logged with its path.
    assert!(gw.logs().iter().any(|line| {
        message(line) == Some("MQTT listening (3.1.1 and 5.0).")
            && line["fields"]["url"] == format!("ws://{addr}/mqtt").as_str()
    }));
    // The query string does not matter.
    let (mut client, _) = ws_connect(&format!("ws://{addr}/mqtt?client=dashboard"), addr);
    client.send(&raw::connect_v5("pathed", true, 30, &[]));
    assert_eq!(client.read_kind(CONNACK).body[..2], [0, 0]);

    for path in ["/", "/mqtt/", "/other"] {
        let error = handshake(&format!("ws://{addr}{path}"), Some("mqtt"), tcp(addr))
            .err()
            .unwrap_or_else(|| panic!("{path} is not served"));
        let (status, body) = refusal(&error);
        assert_eq!(status, 404, "{path}");
        assert!(body.contains("served on /mqtt"), "{body}");
    }
}

#[test]
fn gateway_stops_gracefully_with_websocket_clients_connected() {
    let gw = gateway();
    let (mut client, _) = ws_connect(&ws_url(&gw, "/mqtt"), gw.ws.unwrap());
    client.send(&raw::connect_v3("stays", true, 30));
    client.read_kind(CONNACK);
    let started = Instant::now();
    let status = gw.terminate();
    assert!(status.success(), "{status}");
    // Like TCP connections, upgraded ones do not hold the stop for the 5s grace period.
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// WebSocket inside TLS.

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA DER, cert PEM, key PEM).
fn certificates() -> (Vec<u8>, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "edgegw websocket test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    (
        ca_cert.der().to_vec(),
        server_cert.pem(),
        server_key.serialize_pem(),
    )
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_stream(addr: SocketAddr, ca_der: &[u8]) -> TlsStream {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(connection, tcp(addr))
}

#[test]
fn websocket_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_der, cert_pem, key_pem) = certificates();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let gw = Gateway::start_with(
        "",
        &format!(
            "    - bind: 127.0.0.1:0\n      websocket: {{ path: /mqtt }}\n      tls:\n        cert: {}\n        key: {}\n",
            cert.display(),
            key.display()
        ),
    );
    let addr = gw
        .wss
        .expect("the TLS WebSocket listener is logged as wss://");
    assert!(gw.ws.is_none());
    let url = format!("wss://{addr}/mqtt");

    // MQTT 5 over WSS, then a message to itself and one from a TCP client.
    let (mut client, response) =
        handshake(&url, Some("mqtt"), tls_stream(addr, &ca_der)).expect("WSS handshake");
    assert_eq!(subprotocol(&response), Some("mqtt"));
    client.send(&raw::connect_v5("wss-client", true, 30, &[]));
    assert_eq!(client.read_kind(CONNACK).body[..2], [0, 0]);
    client.send(&raw::subscribe_v5(1, "secure/#", 1, &[]));
    client.read_kind(SUBACK);
    client.send(&raw::publish_v5("secure/self", 0, 0, &[], b"over wss"));
    let p = Publish::parse(&client.read_kind(PUBLISH), true);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("secure/self", &b"over wss"[..])
    );

    let mut tcp_client = Raw::connect(gw.mqtt);
    tcp_client.send(&raw::connect_v3("tcp-to-wss", true, 30));
    tcp_client.read_kind(CONNACK, WAIT).0.expect("CONNACK");
    tcp_client.send(&raw::publish_v3("secure/tcp", 0, 0, false, b"from tcp"));
    let p = Publish::parse(&client.read_kind(PUBLISH), true);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("secure/tcp", &b"from tcp"[..])
    );

    // Plain WebSocket (no TLS) on the WSS port fails the TLS handshake and is counted.
    assert!(handshake(&url.replace("wss://", "ws://"), Some("mqtt"), tcp(addr)).is_err());
    assert!(
        gw.wait_metric(
            "edgegw_broker_protocol_errors_total{kind=\"tls\"}",
            WAIT,
            |v| v >= 1.0
        ) >= 1.0
    );
}
