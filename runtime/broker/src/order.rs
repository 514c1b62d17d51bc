//! Arrival order for a connection's PUBLISHes that cannot be routed at once.
//!
//! ntex calls a connection's PUBLISH handlers one after the other, but their futures run side
//! by side: a PUBLISH whose payload is still arriving in chunks, or that waits for the publish
//! rate limit, would be routed after a whole PUBLISH read right behind it. Subscribers would
//! then see one client's messages out of order [MQTT-4.6.0-6]. A handler that must wait takes
//! a [`Ticket`] when it is called (in packet order) and routes only on its turn; a handler
//! that could route at once does so only while no ticket is out.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct Order {
    /// Tickets given out.
    issued: Cell<u64>,
    /// The ticket whose turn it is (all before it are done).
    serving: Cell<u64>,
    /// Tickets dropped before their turn (their handler was dropped: the connection closed).
    left: RefCell<BTreeSet<u64>>,
    turn: Notify,
}

impl Order {
    /// No ticket is out: a PUBLISH may be routed now without overtaking one.
    pub fn idle(&self) -> bool {
        self.issued.get() == self.serving.get()
    }

    /// The next turn, in the order handlers are called.
    pub fn ticket(&self) -> Ticket<'_> {
        let number = self.take();
        self.resume(number)
    }

    /// The next turn as a bare number, for a place kept where a [`Ticket`] cannot be (a
    /// message queued in the connection's QoS 0 lane); [`Order::resume`] makes it a ticket.
    pub fn take(&self) -> u64 {
        let number = self.issued.get();
        self.issued.set(number + 1);
        number
    }

    /// The ticket for a number from [`Order::take`]; each number is resumed exactly once.
    pub fn resume(&self, number: u64) -> Ticket<'_> {
        debug_assert!(number < self.issued.get());
        Ticket {
            order: self,
            number,
        }
    }
}

/// A place in the order; dropping it (once its PUBLISH is routed, or not) ends its turn.
pub(crate) struct Ticket<'a> {
    order: &'a Order,
    number: u64,
}

impl Ticket<'_> {
    /// Waits until every ticket before this one is dropped.
    pub async fn turn(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it even before it is polled.
            let notified = self.order.turn.notified();
            if self.order.serving.get() == self.number {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let order = self.order;
        if order.serving.get() != self.number {
            order.left.borrow_mut().insert(self.number);
            return;
        }
        let mut next = self.number + 1;
        {
            let mut left = order.left.borrow_mut();
            while left.remove(&next) {
                next += 1;
            }
        }
        order.serving.set(next);
        order.turn.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn poll<T>(future: std::pin::Pin<&mut impl Future<Output = T>>) -> Option<T> {
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => Some(value),
            Poll::Pending => None,
        }
    }

    /// Waits for the ticket's turn and gives the ticket back.
    async fn turn(ticket: Ticket<'_>) -> Ticket<'_> {
        ticket.turn().await;
        ticket
    }

    #[test]
    fn turns_follow_the_order_tickets_were_taken_in() {
        let order = Order::default();
        assert!(order.idle());
        let first = order.ticket();
        let second = order.ticket();
        let third = order.ticket();
        assert!(!order.idle());

        let mut third = pin!(turn(third));
        let mut second = pin!(turn(second));
        assert!(
            poll(third.as_mut()).is_none(),
            "the third waits for the first two"
        );
        assert!(
            poll(second.as_mut()).is_none(),
            "the second waits for the first"
        );
        let first = poll(pin!(turn(first))).expect("the first has its turn at once");

        drop(first);
        let second = poll(second.as_mut()).expect("the second's turn after the first");
        assert!(
            poll(third.as_mut()).is_none(),
            "the third still waits for the second"
        );
        drop(second);
        let third = poll(third.as_mut()).expect("the third's turn after the second");
        assert!(!order.idle());
        drop(third);
        assert!(order.idle());
    }

    #[test]
    fn a_ticket_dropped_before_its_turn_is_skipped_when_its_turn_comes() {
        let order = Order::default();
        let first = order.ticket();
        let second = order.ticket();
        let third = order.ticket();
        let fourth = order.ticket();
        // The second and third handlers are dropped while waiting (the connection closed).
        drop(third);
        drop(second);
        let mut fourth = pin!(turn(fourth));
        assert!(poll(fourth.as_mut()).is_none());
        drop(first);
        let fourth = poll(fourth.as_mut()).expect("dropped tickets do not hold the order");
        drop(fourth);
        assert!(order.idle());
    }

    /// Handlers running on one thread, as ntex runs them: each waits for its turn, then
    /// records its number; they finish in ticket order whatever order they are woken in.
    #[test]
    fn waiting_handlers_route_in_ticket_order() {
        let order = Order::default();
        let routed = RefCell::new(Vec::new());
        let tickets: Vec<Ticket<'_>> = (0..5).map(|_| order.ticket()).collect();
        let mut handlers: Vec<_> = tickets
            .into_iter()
            .enumerate()
            .map(|(i, ticket)| {
                let routed = &routed;
                Box::pin(async move {
                    ticket.turn().await;
                    routed.borrow_mut().push(i);
                })
            })
            .collect();
        // Poll the handlers back to front until all are done.
        let mut done = [false; 5];
        for _ in 0..10 {
            for i in (0..5).rev() {
                if !done[i] {
                    done[i] = poll(handlers[i].as_mut()).is_some();
                }
            }
        }
        assert!(done.iter().all(|d| *d));
        assert_eq!(*routed.borrow(), vec![0, 1, 2, 3, 4]);
        assert!(order.idle());
    }
}
