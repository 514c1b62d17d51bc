//! Encoding of broker records for the state file (the store keeps them as opaque blobs).
//!
//! Format: a version byte, then fixed-order fields; strings and byte strings are
//! length-prefixed (u16 for strings, u32 for payloads). Decoding never panics on bad input:
//! it returns `None`, and the caller skips the record with a warning.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    message::{ByteString, Bytes, Message, Origin, Properties, QoS},
    session::Delivery,
    tree::SubOptions,
};

const VERSION: u8 = 1;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
        self.u16(bytes.len() as u16);
        self.0.extend_from_slice(bytes);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt_str(&mut self, s: Option<&ByteString>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn str(&mut self) -> Option<ByteString> {
        let n = usize::from(self.u16()?);
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).ok().map(ByteString::from)
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n).map(Bytes::copy_from_slice)
    }
    fn opt_str(&mut self) -> Option<Option<ByteString>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.str()?)),
            _ => None,
        }
    }
}

fn qos(v: u8) -> Option<QoS> {
    match v {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

fn write_message(w: &mut Writer, m: &Message) {
    w.str(&m.topic);
    w.bytes(&m.payload);
    w.u8(m.qos.as_u8());
    w.u8(u8::from(m.retain));
    // Wall-clock receive time, so message expiry keeps counting across restarts.
    let age = m.received.elapsed().as_millis() as u64;
    w.u64(unix_now_ms().saturating_sub(age));
    let p = &m.properties;
    w.u8(u8::from(p.payload_format_utf8));
    match p.message_expiry_secs {
        Some(s) => {
            w.u8(1);
            w.u32(s);
        }
        None => w.u8(0),
    }
    w.opt_str(p.content_type.as_ref());
    w.opt_str(p.response_topic.as_ref());
    match &p.correlation_data {
        Some(c) => {
            w.u8(1);
            w.bytes(c);
        }
        None => w.u8(0),
    }
    w.u16(p.user_properties.len().min(usize::from(u16::MAX)) as u16);
    for (k, v) in p.user_properties.iter().take(usize::from(u16::MAX)) {
        w.str(k);
        w.str(v);
    }
}

fn read_message(r: &mut Reader<'_>) -> Option<Message> {
    let topic = r.str()?;
    let payload = r.bytes()?;
    let qos = qos(r.u8()?)?;
    let retain = r.u8()? != 0;
    let received_ms = r.u64()?;
    let payload_format_utf8 = r.u8()? != 0;
    let message_expiry_secs = match r.u8()? {
        0 => None,
        1 => Some(r.u32()?),
        _ => return None,
    };
    let content_type = r.opt_str()?;
    let response_topic = r.opt_str()?;
    let correlation_data = match r.u8()? {
        0 => None,
        1 => Some(r.bytes()?),
        _ => return None,
    };
    let count = r.u16()?;
    let mut user_properties = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        user_properties.push((r.str()?, r.str()?));
    }
    let age = Duration::from_millis(unix_now_ms().saturating_sub(received_ms));
    let now = Instant::now();
    Some(Message {
        topic,
        payload,
        qos,
        retain,
        properties: Arc::new(Properties {
            payload_format_utf8,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
            message_expiry_secs,
        }),
        origin: Origin::Broker,
        received: now.checked_sub(age).unwrap_or(now),
        hops: 0,
    })
}

pub(crate) fn encode_message(m: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(32 + m.topic.len() + m.payload.len()));
    w.u8(VERSION);
    write_message(&mut w, m);
    w.0
}

pub(crate) fn decode_message(bytes: &[u8]) -> Option<Message> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return None;
    }
    read_message(&mut r)
}

pub(crate) fn encode_delivery(d: &Delivery) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(
        48 + d.message.topic.len() + d.message.payload.len(),
    ));
    w.u8(VERSION);
    write_message(&mut w, &d.message);
    w.u8(d.qos.as_u8());
    w.u8(u8::from(d.retain));
    w.u16(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        w.u32(*id);
    }
    w.0
}

pub(crate) fn decode_delivery(bytes: &[u8]) -> Option<Delivery> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return None;
    }
    let message = read_message(&mut r)?;
    let qos = qos(r.u8()?)?;
    let retain = r.u8()? != 0;
    let count = r.u16()?;
    let mut subscription_ids = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        subscription_ids.push(r.u32()?);
    }
    Some(Delivery {
        message: Arc::new(message),
        qos,
        retain,
        subscription_ids,
        seq: 0,
    })
}

pub(crate) fn encode_options(o: &SubOptions) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(10));
    w.u8(VERSION);
    w.u8(o.qos.as_u8());
    w.u8(u8::from(o.no_local));
    w.u8(u8::from(o.retain_as_published));
    w.u8(o.retain_handling);
    match o.subscription_id {
        Some(id) => {
            w.u8(1);
            w.u32(id);
        }
        None => w.u8(0),
    }
    w.0
}

pub(crate) fn decode_options(bytes: &[u8]) -> Option<SubOptions> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return None;
    }
    Some(SubOptions {
        qos: qos(r.u8()?)?,
        no_local: r.u8()? != 0,
        retain_as_published: r.u8()? != 0,
        retain_handling: r.u8()?,
        subscription_id: match r.u8()? {
            0 => None,
            1 => Some(r.u32()?),
            _ => return None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let message = Message::new("a/b", b"payload".to_vec(), QoS::ExactlyOnce)
            .with_retain(true)
            .with_properties(Properties {
                payload_format_utf8: true,
                content_type: Some("text/plain".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                message_expiry_secs: Some(60),
            });
        let back = decode_message(&encode_message(&message)).unwrap();
        assert_eq!(back.topic, message.topic);
        assert_eq!(back.payload, message.payload);
        assert_eq!(back.qos, message.qos);
        assert!(back.retain);
        assert_eq!(back.properties, message.properties);
        assert!(back.received.elapsed() < Duration::from_secs(2));

        let delivery = Delivery {
            message: Arc::new(message),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![1, 70000],
            seq: 9,
        };
        let back = decode_delivery(&encode_delivery(&delivery)).unwrap();
        assert_eq!(back.qos, QoS::AtLeastOnce);
        assert_eq!(back.subscription_ids, vec![1, 70000]);

        let options = SubOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
            subscription_id: Some(42),
        };
        assert_eq!(decode_options(&encode_options(&options)), Some(options));
    }

    #[test]
    fn truncated_or_garbage_records_are_rejected() {
        let record = encode_message(&Message::new("t", b"x".to_vec(), QoS::AtMostOnce));
        for n in 0..record.len() {
            assert!(decode_message(&record[..n]).is_none(), "prefix {n}");
        }
        assert!(decode_message(&[9, 9, 9]).is_none());
        assert!(decode_options(&[]).is_none());
    }
}
