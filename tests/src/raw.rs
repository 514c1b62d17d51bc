//! A byte-level MQTT client for tests: builds packets by hand and reads whole packets, so
//! tests can send what libraries refuse to (garbage, protocol violations, withheld acks)
//! and see exactly what the broker sends (DUP flags, reason codes, properties).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

pub struct Raw {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// One packet: the first byte of the fixed header and the rest after the length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub header: u8,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
}

enum Fill {
    Data,
    Closed,
    TimedOut,
}

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const UNSUBACK: u8 = 11;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

impl Raw {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends, ignoring errors (the broker may already have closed the socket).
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// The next packet, or `None` when the connection closed or nothing came in time.
    pub fn read(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Closed | Fill::TimedOut => return None,
            }
        }
    }

    /// Reads packets until one of `kind` arrives (others are returned in the second value).
    pub fn read_kind(&mut self, kind: u8, timeout: Duration) -> (Option<Packet>, Vec<Packet>) {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.read(left) {
                Some(p) if p.kind() == kind => return (Some(p), others),
                Some(p) => others.push(p),
                None => break,
            }
        }
        (None, others)
    }

    /// True when the broker closed the connection within `timeout` (packets before the
    /// close, such as a DISCONNECT, are returned through `seen`).
    pub fn closed_within(&mut self, timeout: Duration, seen: &mut Vec<Packet>) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.take_packet() {
                seen.push(p);
                continue;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Closed => return true,
                Fill::TimedOut => return false,
            }
        }
    }

    /// Reads what arrives before `deadline` into the buffer.
    fn fill(&mut self, deadline: Instant) -> Fill {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Fill::TimedOut;
        };
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Fill::Closed,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                Fill::Data
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Fill::TimedOut
            }
            Err(_) => Fill::Closed,
        }
    }

    fn take_packet(&mut self) -> Option<Packet> {
        if self.buffer.len() < 2 {
            return None;
        }
        let (len, used) = read_varint(&self.buffer[1..])?;
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

pub fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

pub fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// MQTT 3.1.1 CONNECT.
pub fn connect_v3(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0 });
    body.extend(keep_alive.to_be_bytes());
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// MQTT 5 CONNECT with raw property bytes (without their length prefix).
pub fn connect_v5(client_id: &str, clean: bool, keep_alive: u16, properties: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(if clean { 0x02 } else { 0 });
    body.extend(keep_alive.to_be_bytes());
    body.extend(varint(properties.len()));
    body.extend_from_slice(properties);
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// MQTT 3.1.1 CONNECT with a will (flags: 0x04 will, QoS in bits 3-4, 0x20 will retain).
pub fn connect_v3_will(
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    will_topic: &str,
    will_payload: &[u8],
    will_qos: u8,
    will_retain: bool,
) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(4);
    body.push(will_flags(clean, will_qos, will_retain));
    body.extend(keep_alive.to_be_bytes());
    body.extend(string(client_id));
    body.extend(string(will_topic));
    body.extend((will_payload.len() as u16).to_be_bytes());
    body.extend_from_slice(will_payload);
    packet(0x10, &body)
}

/// MQTT 5 CONNECT with a will: raw CONNECT properties and raw will properties (both
/// without their length prefix, e.g. `[0x18, 0, 0, 0, 2]` for a 2 s will delay).
#[allow(clippy::too_many_arguments)]
pub fn connect_v5_will(
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    properties: &[u8],
    will_properties: &[u8],
    will_topic: &str,
    will_payload: &[u8],
    will_qos: u8,
    will_retain: bool,
) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(5);
    body.push(will_flags(clean, will_qos, will_retain));
    body.extend(keep_alive.to_be_bytes());
    body.extend(varint(properties.len()));
    body.extend_from_slice(properties);
    body.extend(string(client_id));
    body.extend(varint(will_properties.len()));
    body.extend_from_slice(will_properties);
    body.extend(string(will_topic));
    body.extend((will_payload.len() as u16).to_be_bytes());
    body.extend_from_slice(will_payload);
    packet(0x10, &body)
}

fn will_flags(clean: bool, will_qos: u8, will_retain: bool) -> u8 {
    let mut flags = 0x04 | ((will_qos & 3) << 3);
    if clean {
        flags |= 0x02;
    }
    if will_retain {
        flags |= 0x20;
    }
    flags
}

pub fn subscribe_v3(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend(string(filter));
    body.push(qos);
    packet(0x82, &body)
}

pub fn subscribe_v5(packet_id: u16, filter: &str, options: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend(varint(properties.len()));
    body.extend_from_slice(properties);
    body.extend(string(filter));
    body.push(options);
    packet(0x82, &body)
}

pub fn publish_v3(topic: &str, qos: u8, packet_id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend(packet_id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &body)
}

pub fn publish_v5(
    topic: &str,
    qos: u8,
    packet_id: u16,
    properties: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend(packet_id.to_be_bytes());
    }
    body.extend(varint(properties.len()));
    body.extend_from_slice(properties);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

pub fn ack(kind: u8, packet_id: u16) -> Vec<u8> {
    let header = (kind << 4) | if kind == PUBREL { 0x02 } else { 0 };
    packet(header, &packet_id.to_be_bytes())
}

pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0]
}

pub fn disconnect() -> Vec<u8> {
    vec![0xe0, 0]
}

/// MQTT 5 DISCONNECT with a reason code and raw properties (without their length prefix).
pub fn disconnect_v5(reason: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = vec![reason];
    body.extend(varint(properties.len()));
    body.extend_from_slice(properties);
    packet(0xe0, &body)
}

/// A received PUBLISH, decoded.
#[derive(Debug)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub packet_id: Option<u16>,
    /// v5 only: (property id, raw value bytes) in order.
    pub properties: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Publish {
    pub fn parse(p: &Packet, v5: bool) -> Self {
        assert_eq!(p.kind(), PUBLISH, "not a PUBLISH: {p:?}");
        let qos = (p.header >> 1) & 3;
        let b = &p.body;
        let len = usize::from(u16::from_be_bytes([b[0], b[1]]));
        let topic = String::from_utf8(b[2..2 + len].to_vec()).unwrap();
        let mut at = 2 + len;
        let packet_id = (qos > 0).then(|| {
            at += 2;
            u16::from_be_bytes([b[at - 2], b[at - 1]])
        });
        let mut properties = Vec::new();
        if v5 {
            let (plen, used) = read_varint(&b[at..]).unwrap();
            at += used;
            properties = parse_properties(&b[at..at + plen]);
            at += plen;
        }
        Self {
            topic,
            qos,
            dup: p.header & 0x08 != 0,
            retain: p.header & 0x01 != 0,
            packet_id,
            properties,
            payload: b[at..].to_vec(),
        }
    }

    pub fn property(&self, id: u8) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v.as_slice())
    }
}

/// Splits v5 properties into (id, value bytes) using each property's wire type.
pub fn parse_properties(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&id, rest)) = b.split_first() {
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0b => read_varint(rest).unwrap().1,
            0x26 => {
                let k = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let v = usize::from(u16::from_be_bytes([rest[2 + k], rest[3 + k]]));
                4 + k + v
            }
            _ => 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]])),
        };
        out.push((id, rest[..len].to_vec()));
        b = &rest[len..];
    }
    out
}
