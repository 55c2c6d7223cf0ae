//! The table of logged-in clients, keyed by public key.
//!
//! Each client has a bounded packet queue and a small control queue, both drained by its own
//! connection actor. Senders only ever `try_send`: a full queue drops the packet (and the
//! caller counts it), so a slow reader never blocks anyone else.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use warren_relay_proto::{PeerGoneReason, PublicKey};

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
}

/// What the table holds for one logged-in connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientHandle {
    pub(crate) conn_id: u64,
    pub(crate) packets: mpsc::Sender<Packet>,
    pub(crate) control: mpsc::Sender<Control>,
}

/// Outcome of handing a packet to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Queued,
    QueueFull,
    NotHere,
}

/// All logged-in clients of this relay.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    map: RwLock<HashMap<PublicKey, ClientHandle>>,
}

impl Clients {
    /// Adds a client, returning the connection it replaces, if any.
    pub(crate) fn register(&self, key: PublicKey, handle: ClientHandle) -> Option<ClientHandle> {
        self.write().insert(key, handle)
    }

    /// Removes `key` if it still belongs to connection `conn_id`; returns whether it did.
    pub(crate) fn unregister(&self, key: &PublicKey, conn_id: u64) -> bool {
        let mut map = self.write();
        if map.get(key).is_some_and(|h| h.conn_id == conn_id) {
            map.remove(key);
            return true;
        }
        false
    }

    /// Queues a packet for `dst` without waiting.
    pub(crate) fn send_packet(&self, dst: &PublicKey, packet: Packet) -> Delivery {
        let map = self.read();
        let Some(h) = map.get(dst) else {
            return Delivery::NotHere;
        };
        match h.packets.try_send(packet) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::QueueFull,
            // The actor is exiting and has not unregistered yet.
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NotHere,
        }
    }

    /// Queues a control message for `dst` without waiting; false if absent or its queue is full.
    pub(crate) fn send_control(&self, dst: &PublicKey, msg: Control) -> bool {
        self.read().get(dst).is_some_and(|h| h.control.try_send(msg).is_ok())
    }

    /// Queues a control message for every client.
    pub(crate) fn broadcast(&self, msg: &Control) {
        for h in self.read().values() {
            let _ = h.control.try_send(msg.clone());
        }
    }

    /// Number of logged-in clients.
    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PublicKey, ClientHandle>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PublicKey, ClientHandle>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}
