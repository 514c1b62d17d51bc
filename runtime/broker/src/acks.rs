//! Acks read in bulk: a filter layer under ntex-mqtt's dispatcher (on every connection,
//! above TLS and WebSocket) that takes the client's PUBACKs and PUBCOMPs out of the bytes
//! read, before they are decoded.
//!
//! In QoS 1 fan-out nearly every packet a subscriber sends is a PUBACK, and each cost a
//! decode, a turn of ntex's dispatcher, a boxed call future through the service pipeline
//! and a session lock (about a third of the broker's core). Here the acks of one read are
//! checked against the session, one lock per 64 ([`Session::complete_acks`]), and those that
//! complete their delivery are cut out of the stream; everything else passes through
//! unchanged, in order, for the dispatcher and `AckGuard` to handle as before (an ack for
//! nothing in flight, one of the wrong kind, a PUBREC, which needs a PUBREL written).
//!
//! The layer follows the packet framing from the first byte (fixed header: type, then the
//! remaining length), so it only looks at packet starts. Until the connection has a session
//! (its CONNECT accepted, [`attach`]) nothing is taken. Taking an ack early only frees its
//! window slot earlier: MQTT orders acks among themselves per direction, not against the
//! client's other packets. A malformed length stops the layer: the rest passes through and
//! ntex's decoder reports the error.
//!
//! Keepalive: ntex restarts the keepalive timer on each packet it decodes, and a client
//! that only sends PUBACKs sends no PINGREQ (any packet counts as activity). So when the
//! dispatcher has been given no packet for 100 ms, the next ack is left in the stream.

use std::{
    any::{Any, TypeId},
    cell::{Cell, OnceCell},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use ntex::io::{FilterBuf, FilterLayer};
use ntex_bytes::BytesMut;

use crate::session::{AckKind, ReadAck, Session};

/// How often, at most, an ack is left for the dispatcher (the first after this long without
/// a packet passed). A taken ack is activity the dispatcher does not see, so the layer can
/// shorten the keepalive allowance by up to this much: the broker allows keepalive × 1.5
/// rounded up (2 s at keepalive 1), so the allowance stays at least 1.9 s, above the 1.5 s
/// MQTT requires. At most ten acks a second per connection go through the decoder for it.
/// (Unit tests use a long interval so that their reads are not timed.)
const PASS_EVERY: Duration = if cfg!(test) {
    Duration::from_secs(3600)
} else {
    Duration::from_millis(100)
};

/// Acks looked up per lock of the session.
const BATCH: usize = 64;

/// The layer; one per connection.
pub(crate) struct AckFilter {
    session: SessionSlot,
    /// Bytes of the current packet still to pass through.
    skip: Cell<usize>,
    /// The framing could not be followed (bad remaining length): pass everything.
    lost: Cell<bool>,
    /// A resumed connection whose replayed bytes ended inside a fixed header: how many of
    /// its bytes those held (0: none), and the bytes. The dispatcher has them; the layer
    /// completes the header from what it reads next to know where the packet ends.
    head: Cell<(u8, [u8; 4])>,
    /// When a packet was last left for the dispatcher.
    last_passed: Cell<Option<Instant>>,
    /// A connection resumed from hibernation: the CONNACK answering its replayed CONNECT
    /// (the first bytes written) is dropped.
    drop_connack: Cell<bool>,
}

/// The connection's session, set once its CONNECT is accepted, and how many reads the
/// layer has seen (hibernation looks for a connection that read nothing for a while).
#[derive(Clone, Default)]
pub(crate) struct SessionSlot(Rc<SlotInner>);

#[derive(Default)]
pub(crate) struct SlotInner {
    session: OnceCell<Arc<Session>>,
    reads: Cell<u32>,
    /// When the layer last read something (the keepalive of a hibernating connection
    /// counts from it).
    last_read: Cell<Option<Instant>>,
    /// Set when the connection hibernates: what ntex still reads from the socket before it
    /// lets go of it goes here instead of to the dispatcher (which is ending), and is
    /// replayed to the woken connection (see [`capture_late_reads`]).
    late: OnceCell<LateReads>,
}

/// Bytes read from a hibernating connection's socket after it was handed over.
pub(crate) type LateReads = Rc<std::cell::RefCell<Vec<u8>>>;

impl std::fmt::Debug for AckFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckFilter")
            .field("attached", &self.session.0.session.get().is_some())
            .field("skip", &self.skip.get())
            .field("lost", &self.lost.get())
            .field("head", &self.head.get().0)
            .finish()
    }
}

impl AckFilter {
    pub fn new() -> Self {
        Self {
            session: SessionSlot::default(),
            skip: Cell::new(0),
            lost: Cell::new(false),
            head: Cell::new((0, [0; 4])),
            last_passed: Cell::new(None),
            drop_connack: Cell::new(false),
        }
    }

    /// The layer of a connection resumed from hibernation (see `drop_connack`), whose
    /// dispatcher is given `prefill` (the replayed CONNECT, then any bytes read as the
    /// connection hibernated; see [`capture_late_reads`]) without it passing through the
    /// layer. The layer starts where those end: inside a packet when the client's bytes
    /// ended in one (its rest is passed through), also when they ended inside its fixed
    /// header (kept in `head` until the layer has read the rest of it).
    pub fn resumed(prefill: &[u8]) -> Self {
        let filter = Self::new();
        filter.drop_connack.set(true);
        let mut pos = 0;
        while pos < prefill.len() {
            match fixed_header(&prefill[pos..]) {
                Ok(Some((header, remaining))) => {
                    let end = pos + header + remaining;
                    filter.skip.set(end.saturating_sub(prefill.len()));
                    pos = end;
                }
                Ok(None) => {
                    // At most 4 bytes: 5 make a whole header or a bad one.
                    let mut head = [0; 4];
                    let len = prefill.len() - pos;
                    head[..len].copy_from_slice(&prefill[pos..]);
                    filter.head.set((len as u8, head));
                    break;
                }
                Err(()) => {
                    filter.lost.set(true);
                    break;
                }
            }
        }
        filter
    }

    /// Completes a fixed header begun in a resumed connection's replayed bytes (`head`)
    /// with the first bytes of `src`: true when it is whole (its packet's rest, from the
    /// start of `src`, is to pass through: `skip`); false when `src` is still header bytes,
    /// or the header is bad (`lost`).
    fn complete_head(&self, src: &[u8]) -> bool {
        let (len, bytes) = self.head.get();
        let len = usize::from(len);
        let mut header = [0; 5];
        header[..len].copy_from_slice(&bytes[..len]);
        let more = (header.len() - len).min(src.len());
        header[len..len + more].copy_from_slice(&src[..more]);
        match fixed_header(&header[..len + more]) {
            Ok(Some((header, remaining))) => {
                self.head.set((0, [0; 4]));
                self.skip.set(header + remaining - len);
                true
            }
            Ok(None) => {
                // All of `src` belongs to the header (4 bytes at most with the old ones).
                let mut head = [0; 4];
                head[..len + more].copy_from_slice(&header[..len + more]);
                self.head.set(((len + more) as u8, head));
                false
            }
            Err(()) => {
                self.head.set((0, [0; 4]));
                self.lost.set(true);
                false
            }
        }
    }
}

/// When the connection's filter last read something (`None`: never, or no layer).
pub(crate) fn last_read(io: &ntex::io::IoRef) -> Option<Instant> {
    io.query::<SessionSlot>()
        .into_inner()
        .and_then(|slot| slot.0.last_read.get())
}

/// Carries a hibernated connection's last read over to its woken one.
pub(crate) fn set_last_read(io: &ntex::io::IoRef, at: Option<Instant>) {
    if let Some(slot) = io.query::<SessionSlot>().into_inner() {
        slot.0.last_read.set(at);
    }
}

/// From now on, what the connection's filter reads is kept in the returned buffer rather
/// than passed on (`None` without the layer). For a connection that hibernates: ntex may
/// still read from the socket between `terminate()` and letting go of it, and those bytes
/// (a client's packet sent just then) would otherwise be lost.
pub(crate) fn capture_late_reads(io: &ntex::io::IoRef) -> Option<LateReads> {
    let slot = io.query::<SessionSlot>().into_inner()?;
    Some(slot.0.late.get_or_init(LateReads::default).clone())
}

/// Reads the connection's filter has seen (0 without the layer).
pub(crate) fn reads(io: &ntex::io::IoRef) -> u32 {
    io.query::<SessionSlot>()
        .into_inner()
        .map_or(0, |slot| slot.0.reads.get())
}

/// Lets the connection's filter take acks for `session` from now on (a no-op on a
/// connection without the layer).
pub(crate) fn attach(io: &ntex::io::IoRef, session: &Arc<Session>) {
    if let Some(slot) = io.query::<SessionSlot>().into_inner() {
        let _ = slot.0.session.set(session.clone());
    }
}

/// A packet's fixed header at the start of `bytes`: its length and the remaining length.
/// `None` when incomplete, `Err` when the remaining length is malformed.
fn fixed_header(bytes: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = bytes.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(())
}

/// The ack kind of a packet that starts with `first` and has two bytes of remaining
/// length (a packet id; MQTT 5 success without reason code).
fn ack_kind(first: u8) -> Option<AckKind> {
    match first {
        0x40 => Some(AckKind::Puback),
        0x70 => Some(AckKind::Pubcomp),
        _ => None,
    }
}

impl AckFilter {
    /// Once the connection hibernates, keeps what is read (see [`capture_late_reads`]):
    /// true when it did (nothing is passed on).
    fn take_late(&self, src: &mut BytesMut) -> bool {
        let Some(late) = self.session.0.late.get() else {
            return false;
        };
        late.borrow_mut().extend_from_slice(src);
        src.clear();
        true
    }
}

impl FilterLayer for AckFilter {
    fn query(&self, id: TypeId) -> Option<Box<dyn Any>> {
        (id == TypeId::of::<SessionSlot>()).then(|| Box::new(self.session.clone()) as Box<dyn Any>)
    }

    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> std::io::Result<()> {
        let reads = &self.session.0.reads;
        reads.set(reads.get().wrapping_add(1));
        self.session.0.last_read.set(Some(ntex::time::now()));
        buf.with_read_buffers(|src, dst| {
            let Some(src) = src else {
                return;
            };
            if src.is_empty() {
                return;
            }
            if self.take_late(src) {
                return;
            }
            if self.lost.get() {
                pass_all(src, dst);
                return;
            }
            let session = self.session.0.session.get().map(Arc::as_ref);
            let now = session.map(|_| ntex::time::now());
            let owed = now.is_some_and(|now| {
                self.last_passed
                    .get()
                    .is_none_or(|last| now.duration_since(last) >= PASS_EVERY)
            });
            if self.process(session, owed, src, dst) {
                self.last_passed.set(now);
            }
        });
        Ok(())
    }

    fn process_write_buf(&self, buf: &FilterBuf<'_>) -> std::io::Result<()> {
        // Moved as is: pages, no copies.
        buf.with_write_buffers(|src, dst| {
            if self.drop_connack.get() && !src.is_empty() {
                // The first bytes written: the CONNACK (3.1.1: `20 02 flags code`; 5: with
                // properties), encoded whole at the start of an empty buffer, so in its
                // first page.
                self.drop_connack.set(false);
                let connack = src.iter().next().and_then(|page| match fixed_header(page) {
                    Ok(Some((header, remaining)))
                        if page[0] == 0x20 && page.len() >= header + remaining =>
                    {
                        Some(header + remaining)
                    }
                    _ => None,
                });
                if let Some(len) = connack {
                    src.advance_to(len);
                }
            }
            src.move_to(dst)
        });
        Ok(())
    }
}

/// Moves all of `src` to the end of `dst`.
fn pass_all(src: &mut BytesMut, dst: &mut BytesMut) {
    if dst.is_empty() {
        std::mem::swap(src, dst);
    } else {
        dst.extend_from_slice(src);
        src.clear();
    }
}

impl AckFilter {
    /// Moves what `src` holds of whole packet starts to `dst`, without the acks `session`
    /// takes; when `owed`, the first ack is left in the stream. Returns whether any packet
    /// was left for the dispatcher.
    fn process(
        &self,
        session: Option<&Session>,
        mut owed: bool,
        src: &mut BytesMut,
        dst: &mut BytesMut,
    ) -> bool {
        if self.head.get().0 > 0 && !self.complete_head(src) {
            pass_all(src, dst);
            return false;
        }
        let bytes: &[u8] = src;
        let len = bytes.len();
        let mut acks = [ReadAck {
            kind: AckKind::Puback,
            packet_id: 0,
            at: 0,
            taken: false,
        }; BATCH];
        let mut passed_any = false;
        let mut pos = 0;
        // Everything before `copied` is in `dst` or cut out (0: nothing cut out yet).
        let mut copied = 0;
        loop {
            // One batch: scan up to BATCH acks, then take them under one lock.
            let mut found = 0;
            let mut skip = self.skip.get();
            while pos < len {
                if skip > 0 {
                    let step = skip.min(len - pos);
                    pos += step;
                    skip -= step;
                    continue;
                }
                let (header, remaining) = match fixed_header(&bytes[pos..]) {
                    Ok(Some(header)) => header,
                    Ok(None) => break,
                    Err(()) => {
                        self.lost.set(true);
                        pos = len;
                        break;
                    }
                };
                // Two bytes of remaining length in one byte of length: the four-byte form.
                // (MQTT 3.1.1 lets a length be encoded longer than needed, `40 82 00 ..`;
                // such a packet passes whole, it is not taken apart as four bytes.)
                if header == 2
                    && remaining == 2
                    && session.is_some()
                    && let Some(kind) = ack_kind(bytes[pos])
                {
                    if pos + 4 > len {
                        break; // wait for the whole ack
                    }
                    if owed {
                        // Left for the dispatcher (keepalive).
                        owed = false;
                        passed_any = true;
                    } else {
                        acks[found] = ReadAck {
                            kind,
                            packet_id: u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]),
                            at: pos,
                            taken: false,
                        };
                        found += 1;
                        pos += 4;
                        if found == BATCH {
                            break;
                        }
                        continue;
                    }
                } else {
                    passed_any = true;
                    owed = false;
                }
                skip = header + remaining;
            }
            self.skip.set(skip);
            let taken = match session {
                Some(session) if found > 0 => session.complete_acks(&mut acks[..found]),
                _ => 0,
            };
            if taken < found {
                passed_any = true;
            }
            if taken > 0 {
                for ack in acks[..found].iter().filter(|ack| ack.taken) {
                    dst.extend_from_slice(&bytes[copied..ack.at]);
                    copied = ack.at + 4;
                }
            }
            if found < BATCH || pos >= len {
                // Scanned to the end, or to an incomplete packet start.
                if copied == 0 && pos == len {
                    pass_all(src, dst);
                    return passed_any;
                }
                dst.extend_from_slice(&bytes[copied..pos]);
                copied = pos;
                break;
            }
        }
        src.advance_to(copied);
        passed_any
    }
}

/// Puts the layer on each connection before `inner` (the MQTT service) runs it, and logs
/// what the MQTT service failed with.
pub(crate) struct WithAcks<S> {
    pub inner: S,
    pub listener: std::net::SocketAddr,
}

impl<F, S> ntex::service::Service<(), ntex::io::Io<F>> for WithAcks<S>
where
    F: ntex::io::Filter,
    S: ntex::service::Service<
            (),
            ntex::io::IoBoxed,
            Error = ntex_mqtt::MqttError<crate::BrokerError>,
        >,
{
    type Res = S::Res;
    type Error = S::Error;

    ntex::forward_bind!((), inner);
    ntex::forward_shutdown!((), inner);

    /// Boxed: the MQTT service's readiness future is 1.0–1.3 KiB. Each layer around a
    /// service holds that service's readiness check inline in its own call future, so
    /// unboxed it was in every connection's future for the connection's whole life,
    /// although it is only used before the call starts.
    async fn ready(&self, ctx: ntex::service::Ctx<'_, Self, ()>) -> Result<(), S::Error> {
        Box::pin(ctx.ready(&self.inner)).await
    }

    async fn call(
        &self,
        io: ntex::io::Io<F>,
        ctx: ntex::service::Ctx<'_, Self, ()>,
    ) -> Result<S::Res, S::Error> {
        // Without `ctx.call`'s readiness check, for the same reason: `ready` above checked
        // the MQTT service, whose readiness never changes (it only forwards that of the
        // CONNECT handler, a plain function). `ctx.call`, which ntex-service would have
        // instead, holds its readiness check inline in this future for the connection's life:
        // measured +0.45 KiB per awake connection (5,000 MQTT 3.1.1 connections, release).
        let prefill = crate::hibernate::take_prefill(self.listener, &io);
        let filter = match &prefill {
            Some(prefill) => AckFilter::resumed(prefill),
            None => AckFilter::new(),
        };
        let io = io.add_filter(filter);
        if let Some(prefill) = prefill {
            // The replayed CONNECT, as if read before anything the client sent: the
            // transport may already have read some of that (`add_filter` has passed it
            // through the layer, which frames it from where `prefill` ends).
            io.with_read_dst(|buf| {
                let mut replayed = BytesMut::with_capacity(prefill.len() + buf.len());
                replayed.extend_from_slice(&prefill);
                replayed.extend_from_slice(buf);
                *buf = replayed;
            });
        }
        #[allow(deprecated)]
        let result = ctx.call_nowait(&self.inner, io.boxed()).await;
        if let Err(error) = &result {
            crate::server::log_handshake_error(self.listener, error);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        message::{Message, QoS},
        router::{AttachOptions, Router, RouterLimits},
        session::Credential,
        topic::Filter,
        tree::SubOptions,
    };

    const PINGREQ: [u8; 2] = [0xc0, 0x00];

    #[test]
    fn a_resumed_layer_starts_where_the_replayed_bytes_end() {
        // CONNECT (replayed), then what the client sent as its connection hibernated: a
        // PUBLISH of 300 bytes (two bytes of remaining length), cut anywhere.
        let connect = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        let publish = publish("a/b", 300);
        let mut stream = connect.to_vec();
        stream.extend_from_slice(&publish);
        for cut in connect.len()..=stream.len() {
            let filter = AckFilter::resumed(&stream[..cut]);
            let into = cut - connect.len();
            assert!(!filter.lost.get(), "cut {into} into the PUBLISH");
            if (1..3).contains(&into) {
                // Inside the PUBLISH's fixed header: kept to be completed.
                let (len, head) = filter.head.get();
                assert_eq!(&head[..usize::from(len)], &publish[..into]);
                assert_eq!(filter.skip.get(), 0);
            } else {
                assert_eq!(filter.head.get().0, 0, "cut {into} into the PUBLISH");
                let owed = if into == 0 { 0 } else { publish.len() - into };
                assert_eq!(filter.skip.get(), owed, "cut {into} into the PUBLISH");
            }
            assert!(filter.drop_connack.get());
        }
        // Cut inside the fixed header: the layer completes it from what it reads next,
        // however that comes, passes the rest of the PUBLISH and takes the ack after it.
        for into in 1..3 {
            for chunks in [&[][..], &[1; 400][..]] {
                let router = router();
                let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 1);
                let filter = AckFilter::resumed(&stream[..connect.len() + into]);
                let rest = &stream[connect.len() + into..];
                let read = [rest, &ack(0x40, ids[0])].concat();
                let out = feed(&filter, Some(&session), &read, chunks);
                assert_eq!(out, rest, "cut {into}, chunks {:?}", chunks.first());
                assert_eq!(session.inflight_len(), 0, "cut {into}: the ack was taken");
                assert_eq!(filter.head.get().0, 0);
                assert!(!filter.lost.get());
            }
        }
        // An ack cut after its first byte is the dispatcher's (it has that byte); the next
        // one is taken.
        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 2);
        let filter = AckFilter::resumed(&[&connect[..], &[0x40]].concat());
        let read = [&ack(0x40, ids[0])[1..], &ack(0x40, ids[1])].concat();
        assert_eq!(feed(&filter, Some(&session), &read, &[]), &read[..3]);
        assert_eq!(session.inflight_len(), 2 - 1);
        // A header completed into a bad remaining length: framing is given up.
        let filter = AckFilter::resumed(&[0x30, 0xff]);
        let read = [0xff, 0xff, 0xff, 0x40, 0x02, 0, 1];
        assert_eq!(feed(&filter, None, &read, &[]), read);
        assert!(filter.lost.get());
        // What follows the cut is passed on whole, and an ack after it is still found.
        let filter = AckFilter::resumed(&stream[..connect.len() + 100]);
        let mut rest = stream[connect.len() + 100..].to_vec();
        rest.extend_from_slice(&ack(0x40, 7));
        assert_eq!(feed(&filter, None, &rest, &[]), rest);
        assert_eq!(filter.skip.get(), 0);
        assert!(!filter.lost.get());
    }

    #[test]
    fn bytes_read_after_the_hand_over_are_kept_not_passed() {
        let filter = AckFilter::new();
        let late = Rc::new(std::cell::RefCell::new(Vec::new()));
        let _ = filter.session.0.late.set(late.clone());
        let publish = publish("a/b", 10);
        let mut src = BytesMut::from(&publish[..]);
        assert!(filter.take_late(&mut src));
        assert!(src.is_empty());
        assert_eq!(*late.borrow(), publish);
    }

    fn ack(first: u8, id: u16) -> Vec<u8> {
        let [hi, lo] = id.to_be_bytes();
        vec![first, 0x02, hi, lo]
    }

    fn publish(topic: &str, payload_len: usize) -> Vec<u8> {
        let body_len = 2 + topic.len() + payload_len;
        let mut out = vec![0x30];
        let mut n = body_len;
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend((0..payload_len).map(|i| i as u8));
        out
    }

    /// Feeds `stream` in `chunks` as the transport would (appending to what the layer left
    /// in its source) and returns what reached the application side.
    fn feed(
        filter: &AckFilter,
        session: Option<&Session>,
        stream: &[u8],
        chunks: &[usize],
    ) -> Vec<u8> {
        let mut src = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0usize;
        for &size in chunks.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(size).min(stream.len());
            src.extend_from_slice(&stream[at..end]);
            at = end;
            let mut dst = BytesMut::new();
            if !src.is_empty() {
                filter.process(session, false, &mut src, &mut dst);
            }
            // The dispatcher takes everything (it keeps partial packets, but here only
            // the bytes matter).
            out.extend_from_slice(&dst);
            if at == stream.len() && size == usize::MAX {
                break;
            }
        }
        assert!(src.is_empty(), "left in the source: {src:?}");
        out
    }

    /// A session with `n` QoS `qos` deliveries in flight; returns it with their ids.
    fn in_flight(router: &Router, qos: QoS, n: usize) -> (Arc<Session>, Vec<u16>) {
        let attached = router.attach(AttachOptions {
            client_id: "acks".into(),
            clean_start: true,
            session_expiry_secs: 0,
            owner: None,
            credential: Credential::Anonymous,
        });
        router.subscribe(
            &attached.session,
            &Filter::parse("t").unwrap(),
            SubOptions::qos(qos),
        );
        for i in 0..n {
            router.publish(Message::new("t", format!("{i}").into_bytes(), qos));
        }
        let mut out = Vec::new();
        attached
            .session
            .next_outgoing(attached.generation, n, n, &mut out)
            .unwrap();
        let ids = out.iter().map(|o| o.packet_id.unwrap().get()).collect();
        (attached.session, ids)
    }

    fn router() -> Router {
        Router::new(RouterLimits {
            max_queued: 1000,
            max_session_expiry_secs: 60,
        })
    }

    #[test]
    fn reads_fixed_headers() {
        assert_eq!(fixed_header(&[0x40, 0x02]), Ok(Some((2, 2))));
        assert_eq!(fixed_header(&[0x30, 0x80, 0x01]), Ok(Some((3, 128))));
        assert_eq!(
            fixed_header(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
            Ok(Some((5, 268_435_455)))
        );
        assert_eq!(fixed_header(&[0x30]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0x80]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff]), Err(()));
    }

    #[test]
    fn without_a_session_every_byte_passes_in_order_however_it_is_split() {
        let mut stream = Vec::new();
        stream.extend(publish("a/b", 3));
        stream.extend(ack(0x40, 1));
        stream.extend(PINGREQ);
        stream.extend(publish("big", 300)); // two bytes of remaining length
        stream.extend(ack(0x70, 2));
        stream.extend(ack(0x40, 3));
        for first in 0..=stream.len() {
            let filter = AckFilter::new();
            assert_eq!(
                feed(&filter, None, &stream, &[first]),
                stream,
                "split at {first}"
            );
        }
        let filter = AckFilter::new();
        assert_eq!(
            feed(&filter, None, &stream, &[1; 400]),
            stream,
            "byte by byte"
        );
    }

    #[test]
    fn acks_that_complete_deliveries_are_taken_out_the_rest_pass_in_order() {
        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 5);
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        stream.extend(ack(0x40, ids[0]));
        stream.extend(PINGREQ);
        expected.extend(PINGREQ);
        stream.extend(ack(0x40, ids[1]));
        let big = publish("t", 200);
        stream.extend(&big);
        expected.extend(&big);
        // A payload that looks like an ack for the fifth delivery is payload.
        let mut lookalike = publish("t", 0);
        lookalike[1] += 8;
        lookalike.extend([ack(0x40, ids[4]), ack(0x40, ids[4])].concat());
        stream.extend(&lookalike);
        expected.extend(&lookalike);
        // Nothing in flight under this id: left for AckGuard (which ignores it).
        stream.extend(ack(0x40, 999));
        expected.extend(ack(0x40, 999));
        // The wrong kind for a QoS 1 delivery: left for AckGuard (which closes).
        stream.extend(ack(0x70, ids[2]));
        expected.extend(ack(0x70, ids[2]));
        stream.extend(ack(0x40, ids[2]));
        stream.extend(ack(0x40, ids[3]));
        let filter = AckFilter::new();
        assert_eq!(feed(&filter, Some(&session), &stream, &[1; 400]), expected);
        assert_eq!(
            session.inflight_len(),
            1,
            "only the fifth is still in flight"
        );

        // Split in two at every point.
        split_everywhere(5, 3, |ids| {
            let stream = [ack(0x40, ids[0]), PINGREQ.to_vec(), ack(0x40, ids[1])].concat();
            (stream, PINGREQ.to_vec())
        });
    }

    /// For each split of the stream `make` gives for a fresh session with `n` QoS 1
    /// deliveries in flight: the application side gets what `make` expects, and `left`
    /// deliveries stay in flight.
    fn split_everywhere(n: usize, left: usize, make: impl Fn(&[u16]) -> (Vec<u8>, Vec<u8>)) {
        let router = router();
        let len = make(&in_flight(&router, QoS::AtLeastOnce, n).1).0.len();
        for first in 0..=len {
            let (session, ids) = in_flight(&router, QoS::AtLeastOnce, n);
            let (stream, expected) = make(&ids);
            let filter = AckFilter::new();
            let passed = feed(&filter, Some(&session), &stream, &[first]);
            assert_eq!(passed, expected, "split at {first}");
            assert_eq!(session.inflight_len(), left, "split at {first}");
        }
    }

    #[test]
    fn more_acks_than_one_batch_in_one_read() {
        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 3 * BATCH + 5);
        let stream: Vec<u8> = ids.iter().flat_map(|&id| ack(0x40, id)).collect();
        let filter = AckFilter::new();
        assert!(feed(&filter, Some(&session), &stream, &[]).is_empty());
        assert_eq!(session.inflight_len(), 0);
    }

    #[test]
    fn pubcomp_is_taken_only_after_pubrec() {
        let router = router();
        let (session, ids) = in_flight(&router, QoS::ExactlyOnce, 2);
        // Before PUBREC: for AckGuard, which closes the connection.
        let filter = AckFilter::new();
        let stream = ack(0x70, ids[0]);
        assert_eq!(feed(&filter, Some(&session), &stream, &[]), stream);
        // A PUBACK for a QoS 2 delivery is not taken either.
        let stream = ack(0x40, ids[1]);
        assert_eq!(feed(&filter, Some(&session), &stream, &[]), stream);
        assert_eq!(
            session.take_ack(ids[0], AckKind::Pubrec),
            crate::session::AckOutcome::Done
        );
        assert!(feed(&filter, Some(&session), &ack(0x70, ids[0]), &[]).is_empty());
        assert_eq!(session.inflight_len(), 1);
    }

    #[test]
    fn an_owed_packet_leaves_the_first_ack_for_the_dispatcher() {
        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 2);
        let filter = AckFilter::new();
        let mut src = BytesMut::new();
        src.extend_from_slice(&[ack(0x40, ids[0]), ack(0x40, ids[1])].concat());
        let mut dst = BytesMut::new();
        assert!(filter.process(Some(&session), true, &mut src, &mut dst));
        assert_eq!(&dst[..], &ack(0x40, ids[0])[..]);
        assert_eq!(session.inflight_len(), 1);
        assert!(src.is_empty());

        // Not owed, all taken: nothing was passed.
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 1);
        let mut src = BytesMut::new();
        src.extend_from_slice(&ack(0x40, ids[0]));
        let mut dst = BytesMut::new();
        assert!(!filter.process(Some(&session), false, &mut src, &mut dst));
        assert!(dst.is_empty());
    }

    #[test]
    fn an_ack_with_a_longer_length_encoding_passes_whole() {
        split_everywhere(2, 1, |ids| {
            let [hi, lo] = ids[1].to_be_bytes();
            // A PUBACK for the second delivery, its length in two bytes (valid in 3.1.1).
            // Read as a four-byte ack it would be one for id 0x00hi.
            let long = vec![0x40, 0x82, 0x00, hi, lo];
            ([long.clone(), ack(0x40, ids[0])].concat(), long)
        });
    }

    /// Through ntex: the layer on an `Io`, the session attached by query, what the
    /// dispatcher's decoder gets, and the first ack left for the keepalive.
    #[test]
    fn on_a_connection_acks_are_taken_before_the_decoder() {
        use ntex::io::{Io, testing::IoTest};
        use ntex_mqtt::v3::codec::{Codec, Decoded, Packet};

        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 3);
        ntex::rt::System::new("acks-test", crate::IoDriver::Epoll).block_on(async move {
            let (client, server) = IoTest::create();
            let io = Io::new(server, ntex::SharedCfg::default()).add_filter(AckFilter::new());
            attach(&io.get_ref(), &session);
            let codec = Codec::new();
            let next = async || match io.recv(&codec).await {
                Ok(Some(Decoded::Packet(packet, _))) => packet,
                other => panic!("expected a packet, got {other:?}"),
            };
            // Nothing passed yet: the first ack is left for the dispatcher, the second taken.
            client.write([ack(0x40, ids[0]), ack(0x40, ids[1]), PINGREQ.to_vec()].concat());
            assert_eq!(
                next().await,
                Packet::PublishAck {
                    packet_id: ids[0].try_into().unwrap()
                }
            );
            assert_eq!(next().await, Packet::PingRequest);
            assert_eq!(session.inflight_len(), 2, "ids[0] is left for AckGuard");
            // Soon after a packet passed: taken.
            client.write([ack(0x40, ids[2]), PINGREQ.to_vec()].concat());
            assert_eq!(next().await, Packet::PingRequest);
            assert_eq!(session.inflight_len(), 1);
        });
    }

    #[test]
    fn a_malformed_length_stops_taking_acks() {
        let router = router();
        let (session, ids) = in_flight(&router, QoS::AtLeastOnce, 1);
        let filter = AckFilter::new();
        let stream = [vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], ack(0x40, ids[0])].concat();
        let mut src = BytesMut::new();
        src.extend_from_slice(&stream);
        let mut dst = BytesMut::new();
        filter.process(Some(&session), false, &mut src, &mut dst);
        assert_eq!(&dst[..], &stream[..]);
        assert!(filter.lost.get());
        assert_eq!(session.inflight_len(), 1);
    }
}
