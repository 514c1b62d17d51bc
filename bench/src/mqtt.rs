//! Hand-encoded MQTT 3.1.1 (or, with `--mqtt5`, 5.0) packets and a streaming decoder: only
//! what the load generator needs, written for speed (a PUBLISH is one template copy plus
//! three patched fields).

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::{io::AsyncReadExt, net::TcpStream};

/// Bytes of application payload in every benchmark PUBLISH.
pub const PAYLOAD_LEN: usize = 100;

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

static MQTT5: AtomicBool = AtomicBool::new(false);

/// Speak MQTT 5.0 (every packet without properties) instead of 3.1.1; set before any
/// connection is made.
pub fn set_mqtt5(on: bool) {
    MQTT5.store(on, Ordering::Relaxed);
}

pub fn is_mqtt5() -> bool {
    MQTT5.load(Ordering::Relaxed)
}

/// The protocol the load generator speaks, for reports.
pub fn protocol_name() -> &'static str {
    if is_mqtt5() { "MQTT 5.0" } else { "MQTT 3.1.1" }
}

fn put_len(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// CONNECT, protocol level 4 (3.1.1) or 5, no will, no credentials. MQTT 5: clean start
/// as asked, and a session that outlives the connection (expiry 0xFFFFFFFF) when not
/// clean, as a 3.1.1 persistent session does.
pub fn connect(buf: &mut Vec<u8>, client_id: &str, clean_session: bool, keep_alive: u16) {
    let v5 = is_mqtt5();
    let properties: &[u8] = match (v5, clean_session) {
        (false, _) => &[],
        (true, true) => &[0],
        (true, false) => &[5, 0x11, 0xFF, 0xFF, 0xFF, 0xFF],
    };
    buf.push(0x10);
    put_len(buf, 10 + properties.len() + 2 + client_id.len());
    put_str(buf, "MQTT");
    buf.push(if v5 { 5 } else { 4 });
    buf.push(if clean_session { 0x02 } else { 0x00 });
    buf.extend_from_slice(&keep_alive.to_be_bytes());
    buf.extend_from_slice(properties);
    put_str(buf, client_id);
}

pub fn subscribe(buf: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    let v5 = is_mqtt5();
    buf.push(0x82);
    put_len(buf, 2 + usize::from(v5) + 2 + filter.len() + 1);
    buf.extend_from_slice(&packet_id.to_be_bytes());
    if v5 {
        buf.push(0); // no properties
    }
    put_str(buf, filter);
    buf.push(qos);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (`kind` is the first byte).
pub fn ack(buf: &mut Vec<u8>, kind: u8, packet_id: u16) {
    let id = packet_id.to_be_bytes();
    buf.extend_from_slice(&[kind, 2, id[0], id[1]]);
}

/// What a benchmark payload carries.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u64,
    /// Nanoseconds since the load generator's epoch when the message was encoded.
    pub sent_ns: u64,
}

impl Stamp {
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        if payload.len() < 20 {
            return None;
        }
        Some(Stamp {
            publisher: u32::from_le_bytes(payload[0..4].try_into().ok()?),
            seq: u64::from_le_bytes(payload[4..12].try_into().ok()?),
            sent_ns: u64::from_le_bytes(payload[12..20].try_into().ok()?),
        })
    }
}

/// One publisher's PUBLISH, encoded once; `write` copies it and patches the packet id,
/// sequence number and timestamp.
pub struct PublishTemplate {
    bytes: Vec<u8>,
    id_at: Option<usize>,
    payload_at: usize,
}

impl PublishTemplate {
    pub fn new(topic: &str, qos: u8, publisher: u32) -> Self {
        let mut bytes = Vec::with_capacity(8 + topic.len() + PAYLOAD_LEN);
        bytes.push(0x30 | (qos << 1));
        let id_len = if qos > 0 { 2 } else { 0 };
        let v5 = is_mqtt5();
        put_len(
            &mut bytes,
            2 + topic.len() + id_len + usize::from(v5) + PAYLOAD_LEN,
        );
        put_str(&mut bytes, topic);
        let id_at = (qos > 0).then(|| {
            bytes.extend_from_slice(&[0, 0]);
            bytes.len() - 2
        });
        if v5 {
            bytes.push(0); // no properties
        }
        let payload_at = bytes.len();
        bytes.extend_from_slice(&publisher.to_le_bytes());
        bytes.resize(payload_at + PAYLOAD_LEN, b'.');
        Self {
            bytes,
            id_at,
            payload_at,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    #[inline]
    pub fn write(&self, buf: &mut Vec<u8>, packet_id: u16, seq: u64, sent_ns: u64) {
        let start = buf.len();
        buf.extend_from_slice(&self.bytes);
        let packet = &mut buf[start..];
        if let Some(at) = self.id_at {
            packet[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        let p = self.payload_at;
        packet[p + 4..p + 12].copy_from_slice(&seq.to_le_bytes());
        packet[p + 12..p + 20].copy_from_slice(&sent_ns.to_le_bytes());
    }
}

/// A decoded packet, borrowing from the read buffer.
#[derive(Debug)]
pub enum Packet<'a> {
    ConnAck { code: u8 },
    SubAck { codes: &'a [u8] },
    Publish { qos: u8, id: u16, payload: &'a [u8] },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Other,
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed {what}"))
}

/// MQTT 5: the length of the properties at the front of `body`, with its own bytes.
fn properties_len(body: &[u8], what: &str) -> io::Result<usize> {
    let mut len = 0usize;
    for (i, &byte) in body.iter().take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(i + 1 + len);
        }
    }
    Err(malformed(what))
}

fn id_of(body: &[u8], what: &str) -> io::Result<u16> {
    body.get(0..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| malformed(what))
}

/// Parses the packet at the front of `buf`: `None` when it is not complete yet, else the
/// packet and how many bytes it took.
pub fn parse(buf: &[u8]) -> io::Result<Option<(Packet<'_>, usize)>> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if i > 4 {
            return Err(malformed("remaining length"));
        }
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let first = buf[0];
    let body = &buf[i..total];
    let packet = match first >> 4 {
        2 => Packet::ConnAck {
            code: *body.get(1).ok_or_else(|| malformed("CONNACK"))?,
        },
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(id_of(body, "PUBLISH")?);
            let mut at = 2 + topic_len;
            let mut id = 0;
            if qos > 0 {
                id = id_of(
                    body.get(at..).ok_or_else(|| malformed("PUBLISH"))?,
                    "PUBLISH",
                )?;
                at += 2;
            }
            if is_mqtt5() {
                at += properties_len(
                    body.get(at..).ok_or_else(|| malformed("PUBLISH"))?,
                    "PUBLISH",
                )?;
            }
            let payload = body.get(at..).ok_or_else(|| malformed("PUBLISH"))?;
            Packet::Publish { qos, id, payload }
        }
        4 => Packet::PubAck(id_of(body, "PUBACK")?),
        5 => Packet::PubRec(id_of(body, "PUBREC")?),
        6 => Packet::PubRel(id_of(body, "PUBREL")?),
        7 => Packet::PubComp(id_of(body, "PUBCOMP")?),
        9 => {
            let mut at = 2;
            if is_mqtt5() {
                at += properties_len(body.get(2..).unwrap_or_default(), "SUBACK")?;
            }
            Packet::SubAck {
                codes: body.get(at..).ok_or_else(|| malformed("SUBACK"))?,
            }
        }
        _ => Packet::Other,
    };
    Ok(Some((packet, total)))
}

/// A streaming reader: reads into one buffer, hands out whole packets.
pub struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Reader {
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Moves unread bytes to the front so that a read has room.
    fn make_room(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() || self.start > self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "packet larger than the read buffer",
            ));
        }
        Ok(())
    }

    /// Reads at most `max` more bytes; 0 means the peer closed.
    pub async fn fill(&mut self, stream: &mut TcpStream, max: usize) -> io::Result<usize> {
        self.make_room()?;
        let to = self.buf.len().min(self.end.saturating_add(max));
        let n = stream.read(&mut self.buf[self.end..to]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_fill(&mut self, stream: &TcpStream) -> io::Result<usize> {
        self.make_room()?;
        let n = stream.try_read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The next complete packet, if one is buffered.
    pub fn next_packet(&mut self) -> io::Result<Option<Packet<'_>>> {
        let data = &self.buf[self.start..self.end];
        match parse(data)? {
            Some((packet, used)) => {
                self.start += used;
                Ok(Some(packet))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol is a process-wide setting: tests that change or read it take turns.
    static PROTOCOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn publish_round_trips_through_the_decoder() {
        let _turn = PROTOCOL.lock().unwrap_or_else(|e| e.into_inner());
        for (v5, qos) in [false, true]
            .into_iter()
            .flat_map(|v5| (0..=2).map(move |q| (v5, q)))
        {
            set_mqtt5(v5);
            let t = PublishTemplate::new("bench/fanin/3", qos, 3);
            let mut buf = Vec::new();
            t.write(&mut buf, 77, 123_456, 999);
            t.write(&mut buf, 78, 123_457, 1000);
            assert_eq!(buf.len(), 2 * t.len());
            let (packet, used) = parse(&buf).unwrap().unwrap();
            assert_eq!(used, t.len());
            let Packet::Publish {
                qos: q,
                id,
                payload,
            } = packet
            else {
                panic!("not a publish: {packet:?}");
            };
            assert_eq!(q, qos);
            assert_eq!(id, if qos > 0 { 77 } else { 0 });
            assert_eq!(payload.len(), PAYLOAD_LEN);
            let stamp = Stamp::parse(payload).unwrap();
            assert_eq!(
                (stamp.publisher, stamp.seq, stamp.sent_ns),
                (3, 123_456, 999)
            );
            assert!(parse(&buf[..used - 1]).unwrap().is_none());
        }
        set_mqtt5(false);
    }

    #[test]
    fn mqtt5_suback_and_publish_with_properties() {
        let _turn = PROTOCOL.lock().unwrap_or_else(|e| e.into_inner());
        set_mqtt5(true);
        // SUBACK: packet id 1, properties (a reason string "ok"), granted QoS 1.
        let suback = [0x90, 9, 0, 1, 5, 0x1F, 0, 2, b'o', b'k', 1];
        let (packet, _) = parse(&suback).unwrap().unwrap();
        assert!(
            matches!(packet, Packet::SubAck { codes: [1] }),
            "{packet:?}"
        );
        // PUBLISH QoS 1 with a subscription identifier property (0x0B, 7).
        let publish = [0x32, 9, 0, 1, b't', 0, 42, 2, 0x0B, 7, b'p'];
        let (packet, _) = parse(&publish).unwrap().unwrap();
        assert!(
            matches!(
                packet,
                Packet::Publish {
                    qos: 1,
                    id: 42,
                    payload: b"p"
                }
            ),
            "{packet:?}"
        );
        // CONNECT: protocol level 5, empty properties before the client id.
        let mut connect_v5 = Vec::new();
        connect(&mut connect_v5, "c", true, 60);
        assert_eq!(
            connect_v5,
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'c'
            ]
        );
        set_mqtt5(false);
    }

    #[test]
    fn long_remaining_length() {
        let _turn = PROTOCOL.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = Vec::new();
        put_len(&mut buf, 321);
        assert_eq!(buf, [0xC1, 0x02]);
        let mut packet = vec![0x30];
        let topic = "t".repeat(300);
        put_len(&mut packet, 2 + topic.len() + 19);
        put_str(&mut packet, &topic);
        packet.extend_from_slice(&[0; 19]);
        let (_, used) = parse(&packet).unwrap().unwrap();
        assert_eq!(used, packet.len());
    }
}
