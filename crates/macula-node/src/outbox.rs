//! The bounded queue between the router and one connection's writer.
//!
//! Slow consumers must not stall publishers: the router only ever pushes here, never waits. A
//! queue is bounded twice, in messages (`limits.outbox_capacity`) and in bytes
//! (`limits.outbox_max_bytes`, by [`Message::approx_size`]: a client that reads nothing while
//! large events arrive holds at most that much). When a session's queue is full either way the
//! configured [`SlowConsumerPolicy`] applies:
//! - `drop_oldest` (default): the oldest queued EVENT is dropped and counted
//!   (`macula_queue_dropped_total`); if the queue holds no event at all (a session not reading its
//!   RPC traffic), the session is disconnected instead, because dropping a RESULT or INVOCATION
//!   would leave a call hanging.
//! - `disconnect`: the session is closed with GOODBYE `macula.error.slow_consumer`.
//!
//! The writer drains everything queued in one go and writes it as one batch (one flush), which is
//! what makes high message rates possible.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use macula_router::Peer;
use macula_wamp::{errors, Message};
use tokio::sync::Notify;

use crate::metrics::Metrics;

pub use crate::config::SlowConsumerPolicy;

/// Gates one outbox keeps at once (see [`Outbox::hold`]).
pub const MAX_HOLDS: usize = 1024;

/// Opens once: what a held outbox waits for (see [`Outbox::hold`]).
#[derive(Default)]
pub struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_open() {
                return;
            }
            n.await;
        }
    }
}

/// An item for the writer.
pub enum Out {
    Msg(Arc<Message>),
    /// RawSocket PONG with the PING's payload.
    Pong(Vec<u8>),
}

struct Inner {
    queue: VecDeque<Out>,
    /// What `queue` holds, by [`Message::approx_size`].
    bytes: usize,
    /// The PONG owed to the newest RawSocket PING, if not yet written. One at most: a client
    /// that sends PINGs and never reads holds one payload here, not one per PING.
    pong: Option<Vec<u8>>,
    /// No more messages are accepted; the writer flushes what is queued and closes.
    closed: bool,
    /// Nothing queued is written until these are open (a SUBSCRIBED or REGISTERED waits for
    /// the mesh to have the interest; what follows it waits too, keeping the order).
    holds: Vec<Arc<Gate>>,
}

/// One connection's outgoing queue.
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Wakes the connection's reader when the outbox closes (revocation, limits, shutdown).
    closed_notify: Notify,
    /// Mirror of `Inner::closed` for the reader's per-frame check without taking the lock.
    closed_flag: AtomicBool,
    capacity: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
    metrics: Arc<Metrics>,
    /// The session's metering, once it joined (its writer counts egress and call latency).
    meter: std::sync::OnceLock<Arc<crate::meter::SessionMeter>>,
}

impl Outbox {
    pub fn new(
        capacity: usize,
        max_bytes: usize,
        policy: SlowConsumerPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(Inner {
                queue: VecDeque::with_capacity(capacity.min(64)),
                bytes: 0,
                holds: Vec::new(),
                pong: None,
                closed: false,
            }),
            notify: Notify::new(),
            closed_notify: Notify::new(),
            closed_flag: AtomicBool::new(false),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            policy,
            metrics,
            meter: std::sync::OnceLock::new(),
        })
    }

    pub fn set_meter(&self, m: Arc<crate::meter::SessionMeter>) {
        let _ = self.meter.set(m);
    }

    pub fn meter(&self) -> Option<&crate::meter::SessionMeter> {
        self.meter.get().map(|m| &**m)
    }

    fn push(&self, item: Out) {
        self.push_many(std::iter::once(item));
    }

    /// Queues several items under one lock acquisition and at most one wake-up of the writer.
    fn push_many(&self, items: impl Iterator<Item = Out>) {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let was_empty = g.queue.is_empty();
        for item in items {
            if g.closed {
                break;
            }
            self.push_locked(&mut g, item);
        }
        let wake = (was_empty && !g.queue.is_empty()) || g.closed;
        let closed = g.closed;
        drop(g);
        if wake {
            self.notify.notify_one();
        }
        if closed {
            self.closed_notify.notify_waiters();
        }
    }

    fn push_locked(&self, g: &mut Inner, item: Out) {
        let size = out_size(&item);
        // Full in messages, or in bytes (a message alone in the queue always fits: its size is
        // bounded by limits.max_message_size).
        while g.queue.len() >= self.capacity
            || (!g.queue.is_empty() && g.bytes + size > self.max_bytes)
        {
            let victim = match self.policy {
                SlowConsumerPolicy::DropOldest => g
                    .queue
                    .iter()
                    .position(|o| matches!(o, Out::Msg(m) if matches!(**m, Message::Event { .. }))),
                SlowConsumerPolicy::Disconnect => None,
            };
            match victim {
                Some(i) => {
                    if let Some(dropped) = g.queue.remove(i) {
                        g.bytes -= out_size(&dropped);
                    }
                    self.metrics.queue_dropped.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    // Disconnect: replace the backlog with the reason and close.
                    g.queue.clear();
                    g.bytes = 0;
                    g.queue.push_back(Out::Msg(Arc::new(macula_router::auth::goodbye(
                        errors::SLOW_CONSUMER,
                        format!(
                            "the session's outgoing queue exceeded {} messages or {} bytes; read faster or raise limits.outbox_capacity / limits.outbox_max_bytes",
                            self.capacity, self.max_bytes
                        ),
                    ))));
                    g.closed = true;
                    self.closed_flag.store(true, Ordering::Release);
                    self.metrics
                        .slow_consumer_disconnects
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        g.bytes += size;
        g.queue.push_back(item);
    }

    /// Holds everything queued from now on (and what is queued already) until `gate` opens.
    /// At most [`MAX_HOLDS`] are kept (each opens within the mesh's bounded wait anyway): past
    /// that, a client's answers are no longer held back, rather than the node growing.
    pub fn hold(&self, gate: Arc<Gate>) {
        if gate.is_open() {
            return;
        }
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.holds.retain(|h| !h.is_open());
        if g.holds.len() < MAX_HOLDS {
            g.holds.push(gate);
        }
    }

    /// Owes the client a PONG with `payload`, replacing one not yet written (a PONG answers the
    /// newest PING; memory stays bounded whatever the client sends).
    pub fn pong(&self, payload: Vec<u8>) {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.closed {
            return;
        }
        let wake = g.queue.is_empty() && g.pong.is_none();
        g.pong = Some(payload);
        drop(g);
        if wake {
            self.notify.notify_one();
        }
    }

    /// Queues `last` (a GOODBYE or ABORT) and closes: nothing after it is sent.
    pub fn close_with(&self, last: Message) {
        self.push(Out::Msg(Arc::new(last)));
        self.close();
    }

    /// Closes without a final message.
    pub fn close(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.closed = true;
        }
        self.closed_flag.store(true, Ordering::Release);
        self.notify.notify_one();
        self.closed_notify.notify_waiters();
    }

    /// Completes once the outbox is closed: the reader stops serving the session at once, even
    /// if the client never sends another byte or its writer is stuck on a full socket.
    pub async fn closed(&self) {
        loop {
            let n = self.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed_flag.load(Ordering::Acquire)
    }

    /// Waits for queued items and moves them all into `batch`. Returns `false` when the outbox is
    /// closed and empty: the writer should close the connection.
    pub async fn next_batch(&self, batch: &mut Vec<Out>) -> bool {
        loop {
            let notified = self.notify.notified();
            // One lock per batch: holds are checked in the same critical section as the drain.
            let held = {
                let mut g = match self.inner.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if !g.holds.is_empty() {
                    g.holds.retain(|h| !h.is_open());
                    if g.closed {
                        g.holds.clear();
                    }
                }
                match g.holds.first() {
                    Some(h) => Some(h.clone()),
                    None => {
                        if !g.queue.is_empty() || g.pong.is_some() {
                            batch.extend(g.queue.drain(..));
                            g.bytes = 0;
                            batch.extend(g.pong.take().map(Out::Pong));
                            return true;
                        }
                        if g.closed {
                            return false;
                        }
                        None
                    }
                }
            };
            match held {
                // A close must not wait on the gate either.
                Some(gate) => tokio::select! {
                    _ = gate.wait() => {}
                    _ = self.closed() => {}
                },
                None => notified.await,
            }
        }
    }
}

/// What an item holds, for the byte bound.
fn out_size(o: &Out) -> usize {
    match o {
        Out::Msg(m) => m.approx_size(),
        Out::Pong(p) => p.len(),
    }
}

impl Peer for Outbox {
    fn send(&self, msg: Arc<Message>) {
        self.push(Out::Msg(msg));
    }
}

/// A delivery waiting in a [`Staging`]: the recipient's outbox and the message.
type Staged = (Arc<Outbox>, Arc<Message>);

thread_local! {
    /// Deliveries captured while a reader handles its input (see [`Staging`]).
    static STAGE: RefCell<Option<Vec<Staged>>> = const { RefCell::new(None) };
}

/// How the router reaches a session: its outbox. While a reader runs [`Staging::capture`],
/// deliveries are staged instead of pushed, so that a burst of input costs one lock and one
/// wake-up per recipient rather than one per message.
#[derive(Clone)]
pub struct SessionPeer(pub Arc<Outbox>);

impl Peer for SessionPeer {
    fn send(&self, msg: Arc<Message>) {
        let staged = STAGE.with(|s| match s.borrow_mut().as_mut() {
            Some(v) => {
                v.push((self.0.clone(), msg.clone()));
                true
            }
            None => false,
        });
        if !staged {
            self.0.push(Out::Msg(msg));
        }
    }
}

/// Deliveries produced by one connection's burst of input, flushed when the burst ends.
///
/// Invariant: staged deliveries are flushed before the reader waits for more input, so staging
/// never delays a message by more than the time to handle input that was already buffered.
#[derive(Default)]
pub struct Staging {
    items: Vec<Staged>,
}

impl Staging {
    /// Upper bound on staged deliveries before a flush is forced.
    pub const LIMIT: usize = 4096;

    /// Runs `f` (synchronous: nothing can interleave on this thread) with deliveries staged here.
    pub fn capture<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Unsets the thread-local even if `f` unwinds, so later direct sends on this thread are
        /// never swallowed by a staging area nobody flushes.
        struct Reset<'a>(&'a mut Vec<Staged>);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                *self.0 = STAGE.with(|s| s.borrow_mut().take()).unwrap_or_default();
            }
        }
        STAGE.with(|s| *s.borrow_mut() = Some(std::mem::take(&mut self.items)));
        let _reset = Reset(&mut self.items);
        f()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Pushes staged deliveries, one batch per recipient, preserving each recipient's order.
    pub fn flush(&mut self) {
        if self.items.is_empty() {
            return;
        }
        // A stable sort groups by recipient and keeps per-recipient order.
        self.items.sort_by_key(|(o, _)| Arc::as_ptr(o) as usize);
        let mut items = std::mem::take(&mut self.items).into_iter().peekable();
        while let Some((outbox, first)) = items.next() {
            let mut run = vec![Out::Msg(first)];
            while let Some((next, _)) = items.peek() {
                if !Arc::ptr_eq(next, &outbox) {
                    break;
                }
                if let Some((_, m)) = items.next() {
                    run.push(Out::Msg(m));
                }
            }
            outbox.push_many(run.into_iter());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_wamp::{Dict, Payload};

    fn event(n: u64) -> Arc<Message> {
        Arc::new(Message::Event {
            subscription: 1,
            publication: n,
            details: Dict::new(),
            payload: Payload::default(),
        })
    }

    #[tokio::test]
    async fn full_queue_drops_the_oldest_event_and_counts_it() {
        let m = Arc::new(Metrics::default());
        let o = Outbox::new(2, usize::MAX, SlowConsumerPolicy::DropOldest, m.clone());
        for n in 1..=3 {
            o.send(event(n));
        }
        let mut b = vec![];
        assert!(o.next_batch(&mut b).await);
        let pubs: Vec<u64> = b
            .iter()
            .map(|x| match x {
                Out::Msg(m) => match **m {
                    Message::Event { publication, .. } => publication,
                    _ => 0,
                },
                _ => 0,
            })
            .collect();
        assert_eq!(pubs, vec![2, 3]);
        assert_eq!(m.queue_dropped.load(Ordering::Relaxed), 1);
    }

    fn big_event(n: u64, bytes: usize) -> Arc<Message> {
        Arc::new(Message::Event {
            subscription: 1,
            publication: n,
            details: Dict::new(),
            payload: Payload::args(vec![macula_wamp::Value::Bin(vec![0; bytes])]),
        })
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_too() {
        let m = Arc::new(Metrics::default());
        // Room for 1000 messages but only ~2.5 of these.
        let o = Outbox::new(1000, 25_000, SlowConsumerPolicy::DropOldest, m.clone());
        for n in 1..=10 {
            o.send(big_event(n, 10_000));
        }
        assert_eq!(m.queue_dropped.load(Ordering::Relaxed), 8);
        let mut b = vec![];
        assert!(o.next_batch(&mut b).await);
        assert_eq!(b.len(), 2);
        // Drained: the bound applies to what is queued now, not to what went before.
        o.send(big_event(11, 10_000));
        o.send(big_event(12, 10_000));
        assert_eq!(m.queue_dropped.load(Ordering::Relaxed), 8);
        // A message larger than the bound on its own still goes (its size is capped by
        // limits.max_message_size), into an empty queue.
        let mut b = vec![];
        assert!(o.next_batch(&mut b).await);
        o.send(big_event(13, 50_000));
        let mut b = vec![];
        assert!(o.next_batch(&mut b).await);
        assert_eq!(b.len(), 1);
        // With the disconnect policy, the session is closed instead.
        let o = Outbox::new(1000, 25_000, SlowConsumerPolicy::Disconnect, m.clone());
        for n in 1..=3 {
            o.send(big_event(n, 10_000));
        }
        assert!(o.is_closed());
    }

    #[tokio::test]
    async fn disconnect_policy_closes_with_slow_consumer_goodbye() {
        let m = Arc::new(Metrics::default());
        let o = Outbox::new(1, usize::MAX, SlowConsumerPolicy::Disconnect, m.clone());
        o.send(event(1));
        o.send(event(2));
        o.send(event(3));
        let mut b = vec![];
        assert!(o.next_batch(&mut b).await);
        assert!(
            matches!(&b[..], [Out::Msg(m)] if matches!(&**m, Message::Goodbye { reason, .. } if reason == errors::SLOW_CONSUMER))
        );
        b.clear();
        assert!(!o.next_batch(&mut b).await);
        assert_eq!(m.slow_consumer_disconnects.load(Ordering::Relaxed), 1);
    }
}
