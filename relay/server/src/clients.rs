//! The table of logged-in clients, keyed by public key.
//!
//! Each client has an [`Inbox`]: a bounded packet queue and a small control queue, both drained
//! by its own connection actor. Senders only ever `try_send`: a full queue drops the packet (and the
//! caller counts it), so a slow reader never blocks anyone else.
//!
//! Mesh siblings *watch* the table: [`Clients::watch`] returns a snapshot of the keys and, under
//! the same lock, subscribes to every later arrival and departure, so a watcher sees each change
//! exactly once and in order. A watcher whose queue fills is dropped from the list; its channel
//! closes and its connection ends, and the sibling resyncs when it reconnects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use warren_relay_proto::{PeerGoneReason, PublicKey};

use crate::inbox::{Inbox, PushError};

/// A packet waiting to be written to its destination.
#[derive(Debug)]
pub(crate) struct Packet {
    pub(crate) src: PublicKey,
    pub(crate) data: Bytes,
    pub(crate) enqueued: Instant,
}

/// A message for a connection actor other than a packet.
#[derive(Debug, Clone)]
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

/// A change in the table, as told to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Presence {
    /// `key` logged in from `remote`.
    Present(PublicKey, SocketAddr),
    /// `key` left.
    Gone(PublicKey),
}

/// Presence changes a watcher can have pending before it is dropped (and resyncs).
pub(crate) const WATCH_QUEUE: usize = 1 << 16;

/// What the table holds for one logged-in connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientHandle {
    pub(crate) conn_id: u64,
    pub(crate) remote: SocketAddr,
    pub(crate) inbox: Arc<Inbox>,
}

/// Outcome of handing a packet to the table.
#[derive(Debug)]
pub(crate) enum Delivery {
    Queued,
    QueueFull,
    /// Not connected here; the packet comes back so it can go to a mesh sibling.
    NotHere(Packet),
}

/// All logged-in clients of this relay, and the siblings watching them.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<PublicKey, ClientHandle>,
    watchers: Vec<(u64, mpsc::Sender<Presence>)>,
}

impl Inner {
    fn notify(&mut self, change: &Presence) {
        // A full queue drops the watcher: its channel closes and its connection ends.
        self.watchers.retain(|(_, tx)| tx.try_send(change.clone()).is_ok());
    }
}

impl Clients {
    /// Adds a client, returning the connection it replaces, if any.
    pub(crate) fn register(&self, key: PublicKey, handle: ClientHandle) -> Option<ClientHandle> {
        let mut inner = self.write();
        let remote = handle.remote;
        let old = inner.map.insert(key, handle);
        inner.notify(&Presence::Present(key, remote));
        old
    }

    /// Removes `key` if it still belongs to connection `conn_id`; returns whether it did.
    pub(crate) fn unregister(&self, key: &PublicKey, conn_id: u64) -> bool {
        let mut inner = self.write();
        if inner.map.get(key).is_some_and(|h| h.conn_id == conn_id) {
            inner.map.remove(key);
            inner.notify(&Presence::Gone(*key));
            return true;
        }
        false
    }

    /// Subscribes watcher `id` to arrivals and departures; returns who is here now.
    pub(crate) fn watch(&self, id: u64, tx: mpsc::Sender<Presence>) -> Vec<(PublicKey, SocketAddr)> {
        let mut inner = self.write();
        inner.watchers.retain(|(w, _)| *w != id);
        inner.watchers.push((id, tx));
        inner.map.iter().map(|(k, h)| (*k, h.remote)).collect()
    }

    /// Ends watcher `id`'s subscription.
    pub(crate) fn unwatch(&self, id: u64) {
        self.write().watchers.retain(|(w, _)| *w != id);
    }

    /// Queues a packet for `dst` without waiting.
    pub(crate) fn send_packet(&self, dst: &PublicKey, packet: Packet) -> Delivery {
        let inner = self.read();
        let Some(h) = inner.map.get(dst) else {
            return Delivery::NotHere(packet);
        };
        match h.inbox.push_packet(packet) {
            Ok(()) => Delivery::Queued,
            Err(PushError::Full) => Delivery::QueueFull,
            // The actor is exiting and has not unregistered yet.
            Err(PushError::Closed(p)) => Delivery::NotHere(p),
        }
    }

    /// Queues a control message for `dst` without waiting; false if absent or its queue is full.
    pub(crate) fn send_control(&self, dst: &PublicKey, msg: Control) -> bool {
        self.read().map.get(dst).is_some_and(|h| h.inbox.push_control(msg))
    }

    /// Queues a control message for every client.
    pub(crate) fn broadcast(&self, msg: &Control) {
        for h in self.read().map.values() {
            h.inbox.push_control(msg.clone());
        }
    }

    /// Number of logged-in clients.
    pub(crate) fn len(&self) -> usize {
        self.read().map.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(conn_id: u64) -> (ClientHandle, Arc<Inbox>) {
        let inbox = Arc::new(Inbox::new(1, 1 << 20));
        let remote = SocketAddr::from(([127, 0, 0, 1], 1000 + conn_id as u16));
        (ClientHandle { conn_id, remote, inbox: inbox.clone() }, inbox)
    }

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    #[test]
    fn watchers_get_a_snapshot_then_each_change_once() {
        let clients = Clients::default();
        let (h1, _r1) = handle(1);
        clients.register(key(1), h1.clone());
        let (tx, mut rx) = mpsc::channel(16);
        let snapshot = clients.watch(7, tx);
        assert_eq!(snapshot, vec![(key(1), h1.remote)]);
        let (h2, _r2) = handle(2);
        clients.register(key(2), h2.clone());
        assert!(!clients.unregister(&key(2), 99), "a stale connection id removes nothing");
        assert!(clients.unregister(&key(1), 1));
        assert_eq!(rx.try_recv().ok(), Some(Presence::Present(key(2), h2.remote)));
        assert_eq!(rx.try_recv().ok(), Some(Presence::Gone(key(1))));
        assert!(rx.try_recv().is_err(), "nothing else");
        clients.unwatch(7);
        clients.register(key(3), handle(3).0);
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
    }

    #[test]
    fn a_watcher_that_falls_behind_is_dropped() {
        let clients = Clients::default();
        let (tx, mut rx) = mpsc::channel(1);
        clients.watch(1, tx);
        clients.register(key(1), handle(1).0);
        clients.register(key(2), handle(2).0);
        assert!(rx.try_recv().is_ok());
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)), "closed, so it resyncs");
    }

    #[test]
    fn an_absent_destination_gives_the_packet_back() {
        let clients = Clients::default();
        let p = Packet { src: key(1), data: Bytes::from_static(b"x"), enqueued: Instant::now() };
        let Delivery::NotHere(back) = clients.send_packet(&key(2), p) else { panic!("not here") };
        assert_eq!(&back.data[..], b"x");
    }
}
