//! A client's inbox: the packets and control messages waiting for its connection actor.
//!
//! Two bounded queues behind one mutex and a [`Notify`], instead of two mpsc channels: an idle
//! client's inbox allocates nothing (the deques grow only when used and shrink back when
//! drained), which matters at 100k mostly idle clients. Control messages come out before
//! packets. Senders never wait: a full queue refuses, and the caller counts the drop.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;
use warren_relay_proto::{PeerGoneReason, PublicKey};

/// A packet waiting to be written to its destination.
#[derive(Debug)]
pub(crate) struct Packet {
    pub(crate) src: PublicKey,
    pub(crate) data: Bytes,
    pub(crate) enqueued: Instant,
}

/// A message for a connection actor other than a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// Tell the client a peer it talked to is gone.
    PeerGone(PublicKey, PeerGoneReason),
    /// Tell the client the relay is restarting.
    Restarting { reconnect_in_ms: u32, try_for_ms: u32 },
    /// A newer connection with the same key took over: tell the client and close.
    Replaced,
    /// A mesh sibling asked to close this client (ClosePeer).
    Close,
}

/// Control messages a client can have pending.
pub(crate) const CONTROL_DEPTH: usize = 16;
/// Capacity above which a drained packet queue gives its memory back.
const KEEP_CAPACITY: usize = 32;

/// Why a packet was not queued.
#[derive(Debug)]
pub(crate) enum PushError {
    /// The queue holds `depth` packets already.
    Full,
    /// The actor has finished; the packet comes back.
    Closed(Packet),
}

/// What the actor takes next.
#[derive(Debug)]
pub(crate) enum Item {
    Control(Control),
    Packet(Packet),
}

#[derive(Debug, Default)]
struct Queues {
    packets: VecDeque<Packet>,
    /// Payload bytes in `packets`.
    bytes: usize,
    control: VecDeque<Control>,
    closed: bool,
}

/// One client's inbox; shared by the table (senders) and the actor (the one receiver).
#[derive(Debug)]
pub(crate) struct Inbox {
    queues: Mutex<Queues>,
    notify: Notify,
    depth: usize,
    max_bytes: usize,
}

impl Inbox {
    /// An empty inbox holding at most `depth` packets and `max_bytes` of payload (one packet
    /// is always accepted into an empty queue, whatever its size).
    pub(crate) fn new(depth: usize, max_bytes: usize) -> Self {
        Inbox { queues: Mutex::default(), notify: Notify::new(), depth, max_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        // Queue operations cannot panic half-way: a poisoned lock is still consistent.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a packet without waiting.
    pub(crate) fn push_packet(&self, p: Packet) -> Result<(), PushError> {
        let mut q = self.lock();
        if q.closed {
            return Err(PushError::Closed(p));
        }
        let over_bytes = !q.packets.is_empty() && q.bytes + p.data.len() > self.max_bytes;
        if q.packets.len() >= self.depth || over_bytes {
            return Err(PushError::Full);
        }
        q.bytes += p.data.len();
        q.packets.push_back(p);
        drop(q);
        self.notify.notify_one();
        Ok(())
    }

    /// Queues a control message without waiting; false if closed or full.
    pub(crate) fn push_control(&self, c: Control) -> bool {
        let mut q = self.lock();
        if q.closed || q.control.len() >= CONTROL_DEPTH {
            return false;
        }
        q.control.push_back(c);
        drop(q);
        self.notify.notify_one();
        true
    }

    /// The next control message, else the next packet; waits while both queues are empty.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is removed only in the same poll that returns it. (A notification
    /// consumed by a cancelled wait leaves its item queued, and the next call finds it.)
    pub(crate) async fn next(&self) -> Item {
        loop {
            if let Some(item) = self.try_next() {
                return item;
            }
            // notify_one stores a permit when nobody waits, so a push between the check above
            // and this await is not missed.
            self.notify.notified().await;
        }
    }

    /// The next control message, else the next packet, if any is queued.
    pub(crate) fn try_next(&self) -> Option<Item> {
        let mut q = self.lock();
        if let Some(c) = q.control.pop_front() {
            return Some(Item::Control(c));
        }
        let p = q.packets.pop_front()?;
        q.bytes -= p.data.len();
        Some(Item::Packet(p))
    }

    /// Takes up to `max` more packets, in order, into `out`.
    pub(crate) fn take_packets(&self, max: usize, out: &mut Vec<Packet>) {
        let mut q = self.lock();
        let n = max.min(q.packets.len());
        let start = out.len();
        out.extend(q.packets.drain(..n));
        q.bytes -= out[start..].iter().map(|p| p.data.len()).sum::<usize>();
        if q.packets.is_empty() && q.packets.capacity() > KEEP_CAPACITY {
            q.packets = VecDeque::new();
        }
    }

    /// Refuses everything from now on; returns how many packets were left unsent.
    pub(crate) fn close(&self) -> usize {
        let mut q = self.lock();
        q.closed = true;
        q.control.clear();
        let left = q.packets.len();
        q.packets = VecDeque::new();
        q.bytes = 0;
        left
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use warren_relay_proto::PublicKey;

    use super::*;

    fn packet(n: u8) -> Packet {
        Packet { src: PublicKey::from_bytes([n; 32]), data: Bytes::from(vec![n]), enqueued: Instant::now() }
    }

    #[tokio::test]
    async fn control_first_then_packets_in_order_and_bounded() {
        let inbox = Inbox::new(2, 1 << 20);
        inbox.push_packet(packet(1)).expect("room");
        inbox.push_packet(packet(2)).expect("room");
        assert!(matches!(inbox.push_packet(packet(3)), Err(PushError::Full)));
        assert!(inbox.push_control(Control::Close));
        assert!(matches!(inbox.next().await, Item::Control(Control::Close)));
        let Item::Packet(p) = inbox.next().await else { panic!("a packet") };
        assert_eq!(&p.data[..], &[1]);
        let mut rest = Vec::new();
        inbox.take_packets(10, &mut rest);
        assert_eq!(rest.iter().map(|p| p.data[0]).collect::<Vec<_>>(), vec![2]);
        for _ in 0..CONTROL_DEPTH {
            assert!(inbox.push_control(Control::Replaced));
        }
        assert!(!inbox.push_control(Control::Replaced), "control is bounded too");
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_and_a_closed_inbox_refuses() {
        let inbox = std::sync::Arc::new(Inbox::new(8, 1 << 20));
        let rx = inbox.clone();
        let waiter = tokio::spawn(async move { matches!(rx.next().await, Item::Packet(_)) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        inbox.push_packet(packet(7)).expect("room");
        assert!(tokio::time::timeout(Duration::from_secs(2), waiter).await.expect("woken").expect("join"));
        inbox.push_packet(packet(8)).expect("room");
        assert_eq!(inbox.close(), 1, "one packet left behind");
        assert!(matches!(inbox.push_packet(packet(9)), Err(PushError::Closed(_))));
        assert!(!inbox.push_control(Control::Close));
    }

    #[tokio::test]
    async fn a_cancelled_wait_loses_nothing() {
        let inbox = Inbox::new(8, 1 << 20);
        assert!(tokio::time::timeout(Duration::from_millis(10), inbox.next()).await.is_err());
        inbox.push_packet(packet(5)).expect("room");
        let Item::Packet(p) = inbox.next().await else { panic!("a packet") };
        assert_eq!(&p.data[..], &[5]);
    }

    #[tokio::test]
    async fn the_byte_bound_holds_but_one_packet_always_fits() {
        let big = |n: usize| Packet {
            src: PublicKey::from_bytes([0; 32]),
            data: Bytes::from(vec![0; n]),
            enqueued: Instant::now(),
        };
        let inbox = Inbox::new(100, 1000);
        inbox.push_packet(big(5000)).expect("an empty queue takes any one packet");
        assert!(matches!(inbox.push_packet(big(1)), Err(PushError::Full)));
        let Item::Packet(_) = inbox.next().await else { panic!("a packet") };
        inbox.push_packet(big(600)).expect("room again");
        inbox.push_packet(big(400)).expect("exactly the bound");
        assert!(matches!(inbox.push_packet(big(1)), Err(PushError::Full)));
        let mut out = Vec::new();
        inbox.take_packets(10, &mut out);
        assert_eq!(inbox.lock().bytes, 0, "bytes follow what leaves the queue");
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let inbox = Inbox::new(1024, 1 << 20);
        for i in 0..200 {
            inbox.push_packet(packet(i as u8)).expect("room");
        }
        let mut out = Vec::new();
        inbox.take_packets(1000, &mut out);
        assert_eq!(out.len(), 200);
        assert_eq!(inbox.lock().packets.capacity(), 0);
    }
}
