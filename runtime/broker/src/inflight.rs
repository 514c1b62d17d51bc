//! Limits on the packets [`crate::connection::AckGuard`] passes on to ntex-mqtt's
//! dispatcher: how many PUBLISHes are handled at once, and how many bytes of passed
//! packets are in hand before the connection stops reading.
//!
//! ntex-mqtt puts these limits in a middleware of its own (`InFlightService`), which
//! `AckGuard` replaces (`replace_middlewares`): that middleware's readiness binding grew
//! the connection pipeline's scope table from one slot to four, and with its counter it
//! was 1.1 KiB of every connection. Here the state is a few cells in the guard itself and
//! a notifier, 0.2 KiB (idle, 5,000 connections: 10.36 KiB with ntex-mqtt's middleware,
//! 9.43 with this), with the same rules:
//!
//! - **Slots** (MQTT 3.1.1 only: `receive_maximum`): at most that many PUBLISHes are in
//!   the handler at once; one more waits in its call for a slot, in the order of arrival,
//!   while acks, pings and subscriptions go on. Payload chunks and DISCONNECT are
//!   *ordered*: they wait behind every PUBLISH waiting for a slot (a chunk after its
//!   PUBLISH, a DISCONNECT after the publishes read before it). MQTT 5 has no slots here:
//!   ntex-mqtt enforces the client's Receive Maximum with DISCONNECT 0x93.
//! - **Size** ([`MAX_RECEIVE_SIZE`]): while the packets passed on and not yet handled
//!   (waiting for a slot included) total more, the guard is not ready, so ntex stops
//!   reading from the socket. A streamed PUBLISH (payload larger than a read) is exempt
//!   until its last chunk is in, or its handler could never get the payload.
//!
//! Packets `AckGuard` takes itself (acks, pings, most 3.1.1 PUBLISHes) are outside these
//! limits, as they were outside ntex's middleware: they have limits of their own
//! ([`crate::connection::Conn::may_take_publish`]).

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::poll_fn,
    task::{Context, Poll, Waker},
};

use ntex::service::ReadyNotifier;
use ntex_mqtt::SizedRequest;

/// Bytes of passed packets in hand above which reading pauses (ntex-mqtt's default for
/// the same limit, `MqttServiceConfig::set_max_receive_size`, which nothing reads now that
/// its middleware is replaced).
pub(crate) const MAX_RECEIVE_SIZE: usize = 65_535;

/// The limits of one connection.
pub(crate) struct InFlight {
    /// PUBLISHes in the handler at once; 0: no limit.
    max_slots: u16,
    slots: Cell<u16>,
    max_size: usize,
    size: Cell<usize>,
    /// The streamed PUBLISH whose payload is still coming in.
    streaming: Cell<Option<u32>>,
    next_streaming: Cell<u32>,
    /// Calls waiting for their turn, in the order of arrival (tickets ascending).
    waiters: RefCell<VecDeque<Waiter>>,
    next_ticket: Cell<u64>,
    /// The readiness check paused on size.
    paused: Cell<Option<Waker>>,
    /// Tells ntex's pipeline that readiness changed (subscribed in `bind`): ntex keeps a
    /// service's last readiness until told.
    changed: ReadyNotifier,
}

struct Waiter {
    ticket: u64,
    /// Waits for a slot too (a PUBLISH), not only for its turn.
    limited: bool,
    granted: bool,
    waker: Waker,
}

impl InFlight {
    pub fn new(max_slots: u16, max_size: usize) -> Self {
        Self {
            max_slots,
            slots: Cell::new(0),
            max_size,
            size: Cell::new(0),
            streaming: Cell::new(None),
            next_streaming: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            next_ticket: Cell::new(0),
            paused: Cell::new(None),
            changed: ReadyNotifier::new(),
        }
    }

    /// The source to subscribe the guard's readiness to.
    pub fn changed(&self) -> &ReadyNotifier {
        &self.changed
    }

    /// Whether reading may go on.
    pub fn is_open(&self) -> bool {
        self.streaming.get().is_some() || self.max_size == 0 || self.size.get() <= self.max_size
    }

    /// Ready once reading may go on (at once when it may now).
    pub async fn open(&self) {
        poll_fn(|cx: &mut Context<'_>| {
            if self.is_open() {
                Poll::Ready(())
            } else {
                self.paused.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }

    fn notify(&self) {
        self.changed.notify();
        if let Some(waker) = self.paused.take() {
            waker.wake();
        }
    }

    /// Counts a packet passed on until the returned entry drops, and notes a streamed
    /// PUBLISH starting or ending.
    pub fn enter(&self, request: &impl SizedRequest) -> Entry<'_> {
        let limited = request.is_limited();
        let streaming = if limited && request.has_more_chunks() {
            // One payload streams at a time: a new streamed PUBLISH ends the last one.
            let id = self.next_streaming.get();
            self.next_streaming.set(id.wrapping_add(1));
            if self.streaming.replace(Some(id)).is_none() {
                self.notify();
            }
            Some(id)
        } else {
            if request.is_last_chunk() && self.streaming.take().is_some() {
                self.notify();
            }
            None
        };
        let size = if self.max_size > 0 {
            request.size() as usize
        } else {
            0
        };
        let before = self.size.get();
        self.size.set(before + size);
        if before <= self.max_size && before + size > self.max_size {
            self.notify();
        }
        Entry {
            inflight: self,
            size,
            streaming,
            limited,
            ordered: request.is_ordered(),
        }
    }

    fn has_slot(&self) -> bool {
        self.max_slots == 0 || self.slots.get() < self.max_slots
    }

    fn take_slot(&self) -> Slot<'_> {
        self.slots.set(self.slots.get() + 1);
        Slot(self)
    }

    /// Lets the first waiter go, if it may.
    fn grant(&self) {
        let waker = {
            let mut waiters = self.waiters.borrow_mut();
            match waiters.front_mut() {
                Some(first) if !first.granted && (!first.limited || self.has_slot()) => {
                    first.granted = true;
                    std::mem::replace(&mut first.waker, Waker::noop().clone())
                }
                _ => return,
            }
        };
        waker.wake();
    }

    fn position(waiters: &VecDeque<Waiter>, ticket: u64) -> usize {
        waiters
            .binary_search_by_key(&ticket, |w| w.ticket)
            .expect("a waiting call is queued")
    }

    /// Waits for the turn (and slot) of a call that could not take it at once.
    async fn wait_turn(&self, limited: bool) -> Option<Slot<'_>> {
        let mut queued = Queued(self, None);
        poll_fn(|cx: &mut Context<'_>| {
            let mut waiters = self.waiters.borrow_mut();
            if let Some(ticket) = queued.1 {
                let at = Self::position(&waiters, ticket);
                let waiter = &mut waiters[at];
                if waiter.granted {
                    return Poll::Ready(());
                }
                waiter.waker.clone_from(cx.waker());
            } else {
                let ticket = self.next_ticket.get();
                self.next_ticket.set(ticket + 1);
                waiters.push_back(Waiter {
                    ticket,
                    limited,
                    granted: false,
                    waker: cx.waker().clone(),
                });
                queued.1 = Some(ticket);
            }
            Poll::Pending
        })
        .await;
        // Granted waiters are at the front; the next one goes once this one has its slot.
        queued.1 = None;
        self.waiters.borrow_mut().pop_front();
        let slot = limited.then(|| self.take_slot());
        self.grant();
        slot
    }
}

/// A packet passed on, counted until dropped.
pub(crate) struct Entry<'a> {
    inflight: &'a InFlight,
    size: usize,
    streaming: Option<u32>,
    limited: bool,
    ordered: bool,
}

/// What an entry got: its turn (with a slot for a PUBLISH), or a wait for it.
pub(crate) enum Turn<'a> {
    Now(Option<Slot<'a>>),
    Wait,
}

impl<'a> Entry<'a> {
    /// The entry's turn, if it has it now: nothing waits before it and, for a PUBLISH, a
    /// slot is free.
    pub fn turn(&self) -> Turn<'a> {
        let inflight = self.inflight;
        if !(self.limited || self.ordered) {
            return Turn::Now(None);
        }
        if inflight.waiters.borrow().is_empty() && (!self.limited || inflight.has_slot()) {
            Turn::Now(self.limited.then(|| inflight.take_slot()))
        } else {
            Turn::Wait
        }
    }

    /// Waits for the turn [`Entry::turn`] did not give.
    pub async fn wait_turn(&self) -> Option<Slot<'a>> {
        self.inflight.wait_turn(self.limited).await
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let inflight = self.inflight;
        // The PUBLISH was handled before its last chunk came (an error, a closed stream).
        if let Some(id) = self.streaming
            && inflight.streaming.get() == Some(id)
        {
            inflight.streaming.set(None);
            inflight.notify();
        }
        let before = inflight.size.get();
        let after = before - self.size;
        inflight.size.set(after);
        if before > inflight.max_size && after <= inflight.max_size {
            inflight.notify();
        }
    }
}

/// A PUBLISH's slot, freed when dropped.
pub(crate) struct Slot<'a>(&'a InFlight);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.slots.set(self.0.slots.get() - 1);
        self.0.grant();
    }
}

/// A call in the queue, taken out if its future is dropped while it waits.
struct Queued<'a>(&'a InFlight, Option<u64>);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.1 {
            let mut waiters = self.0.waiters.borrow_mut();
            let at = InFlight::position(&waiters, ticket);
            waiters.remove(at);
            drop(waiters);
            if at == 0 {
                self.0.grant();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::pin,
        rc::Rc,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use super::*;

    /// A packet: `(size, kind)`.
    #[derive(Clone, Copy)]
    enum Kind {
        /// A whole PUBLISH.
        Publish,
        /// A PUBLISH whose payload streams in chunks.
        Streamed,
        /// A payload chunk; `true`: the last.
        Chunk(bool),
        Disconnect,
        /// Anything else (an ack, SUBSCRIBE).
        Other,
    }

    struct Packet(u32, Kind);

    impl SizedRequest for Packet {
        fn size(&self) -> u32 {
            self.0
        }
        fn has_more_chunks(&self) -> bool {
            matches!(self.1, Kind::Streamed | Kind::Chunk(false))
        }
        fn is_last_chunk(&self) -> bool {
            matches!(self.1, Kind::Chunk(true))
        }
        fn is_limited(&self) -> bool {
            matches!(self.1, Kind::Publish | Kind::Streamed)
        }
        fn is_ordered(&self) -> bool {
            matches!(self.1, Kind::Chunk(_) | Kind::Disconnect)
        }
    }

    fn publish() -> Packet {
        Packet(100, Kind::Publish)
    }

    /// Counts wakes.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        (wakes.clone(), Waker::from(wakes))
    }

    fn poll<F: Future>(future: std::pin::Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(waker))
    }

    fn now<'a>(entry: &Entry<'a>) -> Option<Slot<'a>> {
        match entry.turn() {
            Turn::Now(slot) => slot,
            Turn::Wait => panic!("expected the turn at once"),
        }
    }

    #[test]
    fn a_publish_beyond_the_slots_waits_for_one_while_other_packets_go_on() {
        let inflight = InFlight::new(2, 0);
        let (a, b) = (inflight.enter(&publish()), inflight.enter(&publish()));
        let (slot_a, _slot_b) = (now(&a), now(&b));
        assert!(slot_a.is_some());
        let c = inflight.enter(&publish());
        assert!(matches!(c.turn(), Turn::Wait), "two slots, both taken");
        let (wakes, waker) = waker();
        let mut wait = pin!(c.wait_turn());
        assert!(poll(wait.as_mut(), &waker).is_pending());
        // An ack or a SUBSCRIBE does not wait behind it.
        let ack = inflight.enter(&Packet(4, Kind::Other));
        assert!(matches!(ack.turn(), Turn::Now(None)));
        drop(slot_a);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the waiter is woken");
        let Poll::Ready(slot_c) = poll(wait.as_mut(), &waker) else {
            panic!("the freed slot goes to the waiter");
        };
        assert!(slot_c.is_some());
        assert_eq!(inflight.slots.get(), 2);
        assert!(inflight.waiters.borrow().is_empty());
    }

    #[test]
    fn chunks_and_disconnect_wait_behind_waiting_publishes_in_order() {
        let inflight = InFlight::new(1, 0);
        let first = inflight.enter(&publish());
        let slot = now(&first);
        let (second, disconnect) = (
            inflight.enter(&publish()),
            inflight.enter(&Packet(2, Kind::Disconnect)),
        );
        assert!(matches!(second.turn(), Turn::Wait));
        let (_, waker) = waker();
        let mut second_wait = pin!(second.wait_turn());
        assert!(poll(second_wait.as_mut(), &waker).is_pending());
        assert!(
            matches!(disconnect.turn(), Turn::Wait),
            "a publish read before it waits"
        );
        let mut disconnect_wait = pin!(disconnect.wait_turn());
        assert!(poll(disconnect_wait.as_mut(), &waker).is_pending());
        drop(slot);
        // The DISCONNECT is behind the PUBLISH: not granted until the PUBLISH has its slot.
        assert!(poll(disconnect_wait.as_mut(), &waker).is_pending());
        let Poll::Ready(Some(_second_slot)) = poll(second_wait.as_mut(), &waker) else {
            panic!("the publish goes first");
        };
        // It needs no slot: its turn comes although the only slot is taken.
        assert!(matches!(
            poll(disconnect_wait.as_mut(), &waker),
            Poll::Ready(None)
        ));
    }

    #[test]
    fn a_waiter_dropped_leaves_the_queue_and_the_next_one_gets_its_turn() {
        let inflight = InFlight::new(1, 0);
        let first = inflight.enter(&publish());
        let slot = now(&first);
        let (second, third) = (inflight.enter(&publish()), inflight.enter(&publish()));
        let (_, waker) = waker();
        let mut second_wait = Box::pin(second.wait_turn());
        let mut third_wait = pin!(third.wait_turn());
        assert!(poll(second_wait.as_mut(), &waker).is_pending());
        assert!(poll(third_wait.as_mut(), &waker).is_pending());
        drop(slot);
        // Granted, then cancelled before it took the slot (its connection closed).
        drop(second_wait);
        assert!(matches!(
            poll(third_wait.as_mut(), &waker),
            Poll::Ready(Some(_))
        ));
        assert!(inflight.waiters.borrow().is_empty());
    }

    #[test]
    fn reading_pauses_while_the_packets_in_hand_exceed_the_size_limit() {
        let inflight = InFlight::new(0, 1000);
        let a = inflight.enter(&Packet(600, Kind::Publish));
        assert!(inflight.is_open(), "600 bytes");
        let b = inflight.enter(&Packet(600, Kind::Publish));
        assert!(!inflight.is_open(), "1,200 bytes");
        let (wakes, waker) = waker();
        let mut open = pin!(inflight.open());
        assert!(poll(open.as_mut(), &waker).is_pending());
        drop(a);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(poll(open.as_mut(), &waker).is_ready());
        drop(b);
        assert_eq!(inflight.size.get(), 0);
    }

    #[test]
    fn a_streamed_publish_keeps_reading_open_until_its_last_chunk() {
        let inflight = InFlight::new(0, 1000);
        let _big = inflight.enter(&Packet(1500, Kind::Publish));
        assert!(!inflight.is_open());
        let streamed = inflight.enter(&Packet(500, Kind::Streamed));
        assert!(inflight.is_open(), "its chunks must reach the handler");
        let chunk = inflight.enter(&Packet(0, Kind::Chunk(false)));
        assert!(inflight.is_open());
        drop(chunk);
        let last = inflight.enter(&Packet(0, Kind::Chunk(true)));
        assert!(!inflight.is_open(), "the payload is in");
        drop(last);
        drop(streamed);
        assert!(!inflight.is_open(), "1,500 bytes still in hand");

        // A streamed PUBLISH handled before its last chunk (an error) ends the exemption.
        let streamed = inflight.enter(&Packet(10, Kind::Streamed));
        assert!(inflight.is_open());
        drop(streamed);
        assert!(!inflight.is_open());
    }

    /// ntex keeps a service's readiness until a subscribed notifier invalidates it: a pipeline
    /// over the limits sees the size limit close and open again.
    #[test]
    fn the_pipeline_is_told_when_reading_pauses_and_resumes() {
        use ntex::service::{BindCtx, Ctx, Pipeline, Service};

        struct Probe(Rc<InFlight>);

        impl Service<(), ()> for Probe {
            type Res = ();
            type Error = ();

            fn bind(&self, ctx: BindCtx<'_>) {
                ctx.subscribe(self.0.changed());
            }

            async fn ready(&self, _: Ctx<'_, Self, ()>) -> Result<(), ()> {
                self.0.open().await;
                Ok(())
            }

            async fn call(&self, (): (), _: Ctx<'_, Self, ()>) -> Result<(), ()> {
                Ok(())
            }
        }

        ntex::rt::System::new("inflight-test", crate::IoDriver::Epoll).block_on(async {
            let inflight = Rc::new(InFlight::new(0, 1000));
            let pipeline = Pipeline::new((), Probe(inflight.clone()));
            pipeline.ready().await.unwrap();
            assert!(pipeline.is_ready());
            let entry = inflight.enter(&Packet(1001, Kind::Publish));
            assert!(!pipeline.is_ready(), "readiness invalidated");
            let (_, waker) = waker();
            let mut ready = pin!(pipeline.ready());
            assert!(poll(ready.as_mut(), &waker).is_pending());
            drop(entry);
            assert!(matches!(poll(ready.as_mut(), &waker), Poll::Ready(Ok(()))));
        });
    }

    /// `AckGuardService` itself, built by `AckGuard` as ntex-mqtt builds it and run in a
    /// pipeline over a real ntex-mqtt session (from a CONNECT read from an in-memory
    /// connection): its `bind` subscribes the in-flight notifier and binds the service it
    /// wraps, and its `ready` waits while reading is paused and for that service.
    #[test]
    fn the_ack_guard_tells_its_pipeline_when_reading_pauses_and_resumes() {
        use std::{
            cell::RefCell,
            sync::atomic::{AtomicU64, AtomicUsize},
        };

        use ntex::{
            io::{Io, testing::IoTest},
            service::{BindCtx, Ctx, Middleware, Pipeline, Service},
        };
        use ntex_mqtt::v3;

        use crate::{
            BrokerError,
            auth::{AuthSettings, Authenticator},
            connection::{
                AckGuard, AckGuardService, Conn, ConnRef, ConnectionLimits, Inbound, Passed,
                Shared, Taken,
            },
            metrics::Protocol,
            router::{AttachOptions, Router, RouterLimits},
            session::Credential,
        };

        /// A packet the guard passes on, of the given encoded size.
        struct Passing(u32);

        impl SizedRequest for Passing {
            fn size(&self) -> u32 {
                self.0
            }
            fn has_more_chunks(&self) -> bool {
                false
            }
        }

        impl Inbound for Passing {
            type Res = ();
            type Error = ();
            fn take(self, _: &Conn) -> Taken<'_, Self> {
                Taken::Pass(self, Passed::default())
            }
        }

        /// The handler behind the guard: holds each call until released, and has a
        /// readiness source of its own.
        struct Held {
            released: Cell<bool>,
            waker: Cell<Option<Waker>>,
            changed: ReadyNotifier,
            ready: Cell<bool>,
            ready_waker: Cell<Option<Waker>>,
        }

        struct Handler(Rc<Held>);

        impl<T> Service<ntex_mqtt::Session<T, ConnRef>, Passing> for Handler {
            type Res = ();
            type Error = ();

            fn bind(&self, ctx: BindCtx<'_>) {
                ctx.subscribe(&self.0.changed);
            }

            async fn ready(
                &self,
                _: Ctx<'_, Self, ntex_mqtt::Session<T, ConnRef>>,
            ) -> Result<(), ()> {
                until(&self.0.ready, &self.0.ready_waker).await
            }

            async fn call(
                &self,
                _: Passing,
                _: Ctx<'_, Self, ntex_mqtt::Session<T, ConnRef>>,
            ) -> Result<(), ()> {
                until(&self.0.released, &self.0.waker).await
            }
        }

        /// Ready once `flag` is set; the waker to wake then is left in `waker`.
        async fn until(flag: &Cell<bool>, waker: &Cell<Option<Waker>>) -> Result<(), ()> {
            poll_fn(|cx: &mut Context<'_>| {
                if flag.get() {
                    Poll::Ready(Ok(()))
                } else {
                    waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await
        }

        /// The `v3::Session<ConnRef>` ntex-mqtt makes for a CONNECT (it has no public
        /// constructor): from the handshake of its server over an in-memory connection.
        async fn session(client: &IoTest, server: IoTest) -> v3::Session<ConnRef> {
            let shared = Arc::new(Shared {
                router: Router::new(RouterLimits {
                    max_queued: 10,
                    max_session_expiry_secs: 0,
                }),
                limits: ConnectionLimits {
                    max_connections: 1,
                    max_packet_size: 1 << 20,
                    max_keepalive_secs: 600,
                    receive_maximum: 16,
                    max_inflight: 16,
                    topic_alias_maximum: 0,
                    max_publish_rate: 0,
                    hibernate_after: None,
                },
                auth: Authenticator::new(AuthSettings::default()),
                connections: AtomicUsize::new(0),
                next_client_number: AtomicU64::new(1),
                parking: None,
            });
            let captured: Rc<RefCell<Option<v3::Session<ConnRef>>>> = Rc::default();
            let keep = captured.clone();
            let mqtt = v3::MqttServer::new(async |_: v3::Publish| Ok::<_, BrokerError>(())).build(
                async move |connect: v3::Connect| {
                    let attached = shared.router.attach(AttachOptions {
                        client_id: "guard".into(),
                        clean_start: true,
                        session_expiry_secs: 0,
                        owner: None,
                        credential: Credential::Anonymous,
                    });
                    let conn = Conn::new(
                        shared.clone(),
                        attached.session,
                        attached.generation,
                        Protocol::V311,
                        None,
                        None,
                        shared.auth.acl_for(None, "guard"),
                        shared.auth.generation(),
                        connect.io().get_ref(),
                        shared.reserve_slot().expect("a connection slot"),
                        0,
                        false,
                    );
                    let conn = ConnRef(Rc::new(conn));
                    let (ack, session) = connect.ack_and_session(conn, false);
                    *keep.borrow_mut() = Some(session);
                    Ok::<_, BrokerError>(ack)
                },
            );
            let mqtt = Pipeline::new((), mqtt);
            let io = Io::new(server, ntex::SharedCfg::default());
            ntex::rt::spawn(async move {
                let _ = mqtt.call(io.boxed()).await;
            });
            // CONNECT: MQTT 3.1.1, clean session, keepalive 60 s, client id "guard".
            let mut connect = vec![0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5];
            connect.extend_from_slice(b"guard");
            client.write(connect);
            for _ in 0..5_000 {
                if let Some(session) = captured.borrow_mut().take() {
                    return session;
                }
                ntex::time::sleep(ntex::time::Millis(1)).await;
            }
            panic!("no session from the handshake within 5 s");
        }

        ntex::rt::System::new("ack-guard-test", crate::IoDriver::Epoll).block_on(async {
            let (client, server) = IoTest::create();
            let session = session(&client, server).await;
            let held = Rc::new(Held {
                released: Cell::new(false),
                waker: Cell::new(None),
                changed: ReadyNotifier::new(),
                ready: Cell::new(true),
                ready_waker: Cell::new(None),
            });
            let guard: AckGuardService<Handler> =
                Middleware::create(&AckGuard::v3(16), &session, Handler(held.clone()));
            let pipeline = Pipeline::new(session, guard);
            pipeline.ready().await.unwrap();
            assert!(pipeline.is_ready());
            let (wakes, waker) = waker();

            // Within the limit: reading goes on.
            let mut small = pin!(pipeline.call(Passing(MAX_RECEIVE_SIZE as u32)));
            assert!(
                poll(small.as_mut(), &waker).is_pending(),
                "held by the handler"
            );
            assert!(pipeline.is_ready(), "{MAX_RECEIVE_SIZE} bytes in hand");

            // One byte more in hand: the guard's notifier tells the pipeline (bound in
            // `bind`), and its `ready` waits.
            let mut big = pin!(pipeline.call(Passing(1)));
            assert!(
                poll(big.as_mut(), &waker).is_pending(),
                "held by the handler"
            );
            assert!(
                !pipeline.is_ready(),
                "the pipeline must learn that reading paused"
            );
            let mut ready = pin!(pipeline.ready());
            assert!(
                poll(ready.as_mut(), &waker).is_pending(),
                "not ready while {} bytes are in hand",
                MAX_RECEIVE_SIZE + 1
            );
            assert!(poll(ready.as_mut(), &waker).is_pending());

            // The handler returns: the bytes leave, reading resumes.
            let before = wakes.0.load(Ordering::SeqCst);
            held.released.set(true);
            if let Some(w) = held.waker.take() {
                w.wake();
            }
            assert!(matches!(poll(small.as_mut(), &waker), Poll::Ready(Ok(()))));
            assert!(
                wakes.0.load(Ordering::SeqCst) > before,
                "the paused readiness check is woken"
            );
            assert!(matches!(poll(ready.as_mut(), &waker), Poll::Ready(Ok(()))));
            assert!(pipeline.is_ready());
            assert!(matches!(poll(big.as_mut(), &waker), Poll::Ready(Ok(()))));

            // `bind` bound the handler too: its readiness change reaches the pipeline, and
            // the guard's `ready` waits for it.
            held.ready.set(false);
            held.changed.notify();
            assert!(!pipeline.is_ready(), "the handler's notifier is subscribed");
            let mut ready = pin!(pipeline.ready());
            assert!(
                poll(ready.as_mut(), &waker).is_pending(),
                "waits for the handler"
            );
            held.ready.set(true);
            held.changed.notify();
            if let Some(w) = held.ready_waker.take() {
                w.wake();
            }
            assert!(matches!(poll(ready.as_mut(), &waker), Poll::Ready(Ok(()))));
            drop(client);
        });
    }
}
