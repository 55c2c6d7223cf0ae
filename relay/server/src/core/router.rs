//! The router: where a packet for a key goes.
//!
//! ```text
//! send(src, dst, packet, now)
//!   dst logged in here      -> its inbox            Delivery::Local | LocalQueueFull
//!   dst held by a sibling   -> that sibling's link  Delivery::Sibling | SiblingQueueFull
//!   neither                 ->                      Delivery::Unknown
//! ```
//!
//! A packet a sibling forwarded to us goes through [`Router::send_local`]: local clients only,
//! one hop, never onward.
//!
//! Each local client has an [`Inbox`]: a bounded packet queue and a small control queue, both
//! drained by its own connection actor. The router only ever pushes without waiting: a full
//! queue refuses the packet (the caller counts the drop), so a slow reader never blocks anyone.
//!
//! Mesh siblings *watch* the local table: [`Router::watch`] returns a snapshot of the keys and,
//! under the same lock, subscribes to every later arrival and departure, so a watcher sees each
//! change exactly once and in order. A watcher whose queue fills is dropped from the list; its
//! channel closes and its connection ends, and the sibling resyncs when it reconnects.
//!
//! The keys siblings hold come from our links to them ([`Router::sibling_present`] and
//! [`Router::sibling_gone`]); a link that drops forgets what it taught
//! ([`Router::forget_link`]).
//!
//! Everything here is synchronous and reads no clock: `now` comes in as a parameter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use warren_relay_proto::{Frame, PublicKey};

pub(crate) use super::inbox::{Control, Packet};
use super::inbox::{Inbox, PushError};

/// A packet for a client held by a sibling, queued on the link to that sibling.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) src: PublicKey,
    pub(crate) dst: PublicKey,
    pub(crate) data: Bytes,
}

impl Forward {
    /// The frame that carries this packet on the link.
    pub(crate) fn into_frame(self) -> Frame {
        Frame::ForwardPacket { src: self.src, dst: self.dst, packet: self.data }
    }
}

/// A change in the local table, as told to watchers.
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

/// Our link to one sibling relay, as the key table refers to it.
#[derive(Debug, Clone)]
pub(crate) struct SiblingLink {
    pub(crate) id: u64,
    pub(crate) tx: mpsc::Sender<Forward>,
}

/// Where a packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for a client of this relay.
    Local,
    /// The local client's queue was full: dropped.
    LocalQueueFull,
    /// Queued on the link to the sibling that holds the key.
    Sibling,
    /// That link's queue was full: dropped.
    SiblingQueueFull,
    /// Nobody here or at a sibling holds the key: dropped.
    Unknown,
}

/// The forwarding table of one relay: its own clients, the siblings watching them, and the keys
/// the siblings hold.
#[derive(Debug, Default)]
pub(crate) struct Router {
    local: RwLock<Local>,
    siblings: RwLock<HashMap<PublicKey, SiblingLink>>,
    /// Woken whenever the last local client leaves (a drain waits for it).
    emptied: Notify,
}

#[derive(Debug, Default)]
struct Local {
    map: HashMap<PublicKey, ClientHandle>,
    watchers: Vec<(u64, mpsc::Sender<Presence>)>,
}

impl Local {
    fn notify(&mut self, change: &Presence) {
        // A full queue drops the watcher: its channel closes and its connection ends.
        self.watchers.retain(|(_, tx)| tx.try_send(change.clone()).is_ok());
    }
}

/// Outcome of pushing into one local client's inbox.
enum LocalPush {
    Queued,
    Full,
    /// Not here (or its actor is exiting); the packet comes back.
    Absent(Packet),
}

impl Router {
    /// Routes a packet from a client of this relay: to a local client, else to the sibling that
    /// holds `dst`, else nowhere.
    pub(crate) fn send(&self, src: PublicKey, dst: PublicKey, data: Bytes, now: Instant) -> Delivery {
        let packet = Packet { src, data, enqueued: now };
        match self.push_local(&dst, packet) {
            LocalPush::Queued => Delivery::Local,
            LocalPush::Full => Delivery::LocalQueueFull,
            LocalPush::Absent(packet) => self.forward(src, dst, packet.data),
        }
    }

    /// Routes a packet a sibling forwarded: to a local client only (one hop, never onward).
    pub(crate) fn send_local(&self, src: PublicKey, dst: PublicKey, data: Bytes, now: Instant) -> Delivery {
        match self.push_local(&dst, Packet { src, data, enqueued: now }) {
            LocalPush::Queued => Delivery::Local,
            LocalPush::Full => Delivery::LocalQueueFull,
            LocalPush::Absent(_) => Delivery::Unknown,
        }
    }

    fn push_local(&self, dst: &PublicKey, packet: Packet) -> LocalPush {
        let local = self.read_local();
        let Some(h) = local.map.get(dst) else {
            return LocalPush::Absent(packet);
        };
        match h.inbox.push_packet(packet) {
            Ok(()) => LocalPush::Queued,
            Err(PushError::Full) => LocalPush::Full,
            // The actor is exiting and has not unregistered yet.
            Err(PushError::Closed(p)) => LocalPush::Absent(p),
        }
    }

    fn forward(&self, src: PublicKey, dst: PublicKey, data: Bytes) -> Delivery {
        let siblings = self.read_siblings();
        let Some(link) = siblings.get(&dst) else {
            return Delivery::Unknown;
        };
        match link.tx.try_send(Forward { src, dst, data }) {
            Ok(()) => Delivery::Sibling,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::SiblingQueueFull,
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Unknown,
        }
    }

    /// Whether `key` is connected here or to a sibling of the region.
    pub(crate) fn is_present(&self, key: &PublicKey) -> bool {
        self.read_local().map.contains_key(key) || self.read_siblings().contains_key(key)
    }

    /// Adds a local client, returning the connection it replaces, if any.
    pub(crate) fn register(&self, key: PublicKey, handle: ClientHandle) -> Option<ClientHandle> {
        let mut local = self.write_local();
        let remote = handle.remote;
        let old = local.map.insert(key, handle);
        local.notify(&Presence::Present(key, remote));
        old
    }

    /// Removes `key` if it still belongs to connection `conn_id`; returns whether it did.
    pub(crate) fn unregister(&self, key: &PublicKey, conn_id: u64) -> bool {
        let mut local = self.write_local();
        if local.map.get(key).is_some_and(|h| h.conn_id == conn_id) {
            local.map.remove(key);
            local.notify(&Presence::Gone(*key));
            if local.map.is_empty() {
                self.emptied.notify_waiters();
            }
            return true;
        }
        false
    }

    /// Woken when the last local client leaves: create a `notified()` future, `enable` it,
    /// then check [`Router::len`], so that a departure in between is not missed.
    pub(crate) fn emptied(&self) -> &Notify {
        &self.emptied
    }

    /// Subscribes watcher `id` to arrivals and departures; returns who is here now.
    pub(crate) fn watch(&self, id: u64, tx: mpsc::Sender<Presence>) -> Vec<(PublicKey, SocketAddr)> {
        let mut local = self.write_local();
        local.watchers.retain(|(w, _)| *w != id);
        local.watchers.push((id, tx));
        local.map.iter().map(|(k, h)| (*k, h.remote)).collect()
    }

    /// Ends watcher `id`'s subscription.
    pub(crate) fn unwatch(&self, id: u64) {
        self.write_local().watchers.retain(|(w, _)| *w != id);
    }

    /// Queues a control message for local client `dst` without waiting; false if absent or its
    /// queue is full.
    pub(crate) fn send_control(&self, dst: &PublicKey, msg: Control) -> bool {
        self.read_local().map.get(dst).is_some_and(|h| h.inbox.push_control(msg))
    }

    /// Queues a control message for every local client.
    pub(crate) fn broadcast(&self, msg: &Control) {
        for h in self.read_local().map.values() {
            h.inbox.push_control(msg.clone());
        }
    }

    /// Number of logged-in local clients.
    pub(crate) fn len(&self) -> usize {
        self.read_local().map.len()
    }

    /// A sibling told us over `link` that it holds `key`.
    pub(crate) fn sibling_present(&self, key: PublicKey, link: &SiblingLink) {
        self.write_siblings().insert(key, link.clone());
    }

    /// A sibling told us over link `link_id` that `key` left it.
    pub(crate) fn sibling_gone(&self, key: &PublicKey, link_id: u64) {
        let mut keys = self.write_siblings();
        // The key may have moved to another sibling meanwhile: only forget this link's entry.
        if keys.get(key).is_some_and(|l| l.id == link_id) {
            keys.remove(key);
        }
    }

    /// Forgets every key link `link_id` taught (the link dropped).
    pub(crate) fn forget_link(&self, link_id: u64) {
        self.write_siblings().retain(|_, l| l.id != link_id);
    }

    /// Number of keys held by siblings.
    pub(crate) fn sibling_keys(&self) -> usize {
        self.read_siblings().len()
    }

    // Single inserts and removes cannot leave either map inconsistent, so a lock poisoned by a
    // panic elsewhere is still usable.
    fn read_local(&self) -> std::sync::RwLockReadGuard<'_, Local> {
        self.local.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_local(&self) -> std::sync::RwLockWriteGuard<'_, Local> {
        self.local.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_siblings(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PublicKey, SiblingLink>> {
        self.siblings.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_siblings(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PublicKey, SiblingLink>> {
        self.siblings.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{handle, key, now};

    #[test]
    fn watchers_get_a_snapshot_then_each_change_once() {
        let router = Router::default();
        let (h1, _r1) = handle(1);
        router.register(key(1), h1.clone());
        let (tx, mut rx) = mpsc::channel(16);
        let snapshot = router.watch(7, tx);
        assert_eq!(snapshot, vec![(key(1), h1.remote)]);
        let (h2, _r2) = handle(2);
        router.register(key(2), h2.clone());
        assert!(!router.unregister(&key(2), 99), "a stale connection id removes nothing");
        assert!(router.unregister(&key(1), 1));
        assert_eq!(rx.try_recv().ok(), Some(Presence::Present(key(2), h2.remote)));
        assert_eq!(rx.try_recv().ok(), Some(Presence::Gone(key(1))));
        assert!(rx.try_recv().is_err(), "nothing else");
        router.unwatch(7);
        router.register(key(3), handle(3).0);
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
    }

    #[test]
    fn a_watcher_that_falls_behind_is_dropped() {
        let router = Router::default();
        let (tx, mut rx) = mpsc::channel(1);
        router.watch(1, tx);
        router.register(key(1), handle(1).0);
        router.register(key(2), handle(2).0);
        assert!(rx.try_recv().is_ok());
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)), "closed, so it resyncs");
    }

    #[test]
    fn an_absent_destination_is_unknown() {
        let router = Router::default();
        assert_eq!(router.send(key(1), key(2), Bytes::from_static(b"x"), now()), Delivery::Unknown);
        assert_eq!(router.send_local(key(1), key(2), Bytes::from_static(b"x"), now()), Delivery::Unknown);
    }

    #[test]
    fn keys_follow_the_latest_sibling_and_links_forget_only_their_own() {
        let router = Router::default();
        let (tx_a, mut rx_a) = mpsc::channel(4);
        let (tx_b, mut rx_b) = mpsc::channel(4);
        let (a, b) = (SiblingLink { id: 1, tx: tx_a }, SiblingLink { id: 2, tx: tx_b });
        router.sibling_present(key(9), &a);
        router.sibling_present(key(9), &b); // the client moved from A's relay to B's
        router.sibling_gone(&key(9), 1); // A's late departure notice must not erase B's entry
        assert_eq!(router.send(key(1), key(9), Bytes::from_static(b"p"), now()), Delivery::Sibling);
        assert!(rx_a.try_recv().is_err());
        assert_eq!(rx_b.try_recv().map(|f| f.dst).ok(), Some(key(9)));
        router.sibling_present(key(8), &a);
        router.forget_link(2);
        assert_eq!(router.send(key(1), key(9), Bytes::new(), now()), Delivery::Unknown);
        assert_eq!(router.send(key(1), key(8), Bytes::new(), now()), Delivery::Sibling);
        assert_eq!(router.sibling_keys(), 1);
    }

    #[test]
    fn a_full_link_queue_is_reported() {
        let router = Router::default();
        let (tx, _rx) = mpsc::channel(1);
        router.sibling_present(key(5), &SiblingLink { id: 1, tx });
        assert_eq!(router.send(key(1), key(5), Bytes::new(), now()), Delivery::Sibling);
        assert_eq!(router.send(key(1), key(5), Bytes::new(), now()), Delivery::SiblingQueueFull);
    }

    #[test]
    fn a_local_client_wins_over_a_sibling_and_forwarded_packets_never_go_onward() {
        let router = Router::default();
        let (tx, mut link_rx) = mpsc::channel(4);
        let link = SiblingLink { id: 1, tx };
        router.sibling_present(key(2), &link);
        router.sibling_present(key(3), &link);
        let (h, inbox) = handle(7);
        router.register(key(2), h);
        assert_eq!(router.send(key(1), key(2), Bytes::from_static(b"a"), now()), Delivery::Local);
        assert!(link_rx.try_recv().is_err(), "nothing went to the sibling");
        let mut got = Vec::new();
        inbox.take_packets(8, &mut got);
        assert_eq!((got.len(), got[0].src), (1, key(1)));
        // A packet a sibling forwarded, for a key only a sibling holds, is dropped here.
        assert_eq!(router.send_local(key(1), key(3), Bytes::new(), now()), Delivery::Unknown);
        assert!(link_rx.try_recv().is_err());
    }

    #[test]
    fn a_full_inbox_and_a_closing_client() {
        let router = Router::default();
        let (h, inbox) = handle(1);
        router.register(key(2), h);
        assert_eq!(router.send(key(1), key(2), Bytes::new(), now()), Delivery::Local);
        assert_eq!(router.send(key(1), key(2), Bytes::new(), now()), Delivery::LocalQueueFull);
        inbox.close();
        // An actor that is exiting counts as absent, so the packet may still go to a sibling.
        assert_eq!(router.send(key(1), key(2), Bytes::new(), now()), Delivery::Unknown);
    }
}
