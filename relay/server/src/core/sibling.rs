//! The mesh, seen from the core: a sibling relay connected to us, and our link to a sibling.
//!
//! ```text
//!  relay A (our link)                        relay B (SiblingSession for A)
//!  ── ClientInfo{meshKey} ─────────────────▶  login checked in the shell
//!  ── WatchConns ──────────────────────────▶  PeerPresent for each client of B, then every
//!  ◀── PeerPresent / PeerGone ─────────────   arrival and departure (Router::watch)
//!      on_link_frame: Router::sibling_*
//!  ── ForwardPacket{src,dst} ──────────────▶  Router::send_local: to dst if it is on B
//!  ── ClosePeer{peer} ─────────────────────▶  that client of B closes
//! ```
//!
//! A sibling is not a client: it is not in the key table and receives no packets. Forwarded
//! packets go one hop, never onward.

use std::time::Instant;

use tokio::sync::mpsc;
use warren_relay_proto::frame::peer_present_flags;
use warren_relay_proto::{Frame, PeerGoneReason};

use super::router::{Control, Delivery, Presence, SiblingLink, WATCH_QUEUE};
use super::{Ctx, FrameSink};
use crate::metrics::DropReason;

/// A sibling relay's logged-in connection to this one.
#[derive(Debug)]
pub(crate) struct SiblingSession {
    watch_id: u64,
    /// Presence changes, once the sibling sent WatchConns.
    watching: Option<mpsc::Receiver<Presence>>,
}

/// What a frame from a sibling asked of us, for the shell to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiblingEvent {
    /// Nothing worth a log line.
    None,
    /// The sibling asked to close a client of ours, and it was here.
    ClosedPeer(warren_relay_proto::PublicKey),
}

impl SiblingSession {
    /// The session of a sibling, watching the table as watcher `watch_id` once it asks to.
    pub(crate) fn new(watch_id: u64) -> Self {
        SiblingSession { watch_id, watching: None }
    }

    /// The watcher id to end the subscription with ([`super::router::Router::unwatch`]).
    pub(crate) fn watch_id(&self) -> u64 {
        self.watch_id
    }

    /// Presence changes to tell the sibling, once it watches (the shell awaits this).
    pub(crate) fn watching(&mut self) -> Option<&mut mpsc::Receiver<Presence>> {
        self.watching.as_mut()
    }

    /// A frame the sibling sent.
    pub(crate) fn handle_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        ctx: Ctx<'_>,
        out: &mut impl FrameSink,
    ) -> SiblingEvent {
        let m = ctx.metrics;
        match frame {
            Frame::WatchConns if self.watching.is_none() => {
                let (tx, rx) = mpsc::channel(WATCH_QUEUE);
                for (peer, addr) in ctx.router.watch(self.watch_id, tx) {
                    handle_presence(Presence::Present(peer, addr), out);
                }
                self.watching = Some(rx);
            }
            Frame::ForwardPacket { src, dst, packet } => {
                m.mesh_forwarded_in.increment(1);
                match ctx.router.send_local(src, dst, packet, now) {
                    Delivery::Local => {}
                    Delivery::LocalQueueFull => m.dropped(DropReason::QueueFull, 1),
                    // One hop only: a packet for a client not here is dropped, never sent onward.
                    _ => m.dropped(DropReason::UnknownDest, 1),
                }
            }
            Frame::ClosePeer { peer } if ctx.router.send_control(&peer, Control::Close) => {
                return SiblingEvent::ClosedPeer(peer);
            }
            Frame::Ping(data) => out.queue(&Frame::Pong(data)),
            Frame::Unknown { .. } => m.unknown_frames.increment(1),
            // A second WatchConns, keep-alives, pongs: nothing to do.
            _ => {}
        }
        SiblingEvent::None
    }
}

/// The frame that tells a watching sibling about a change in our table.
pub(crate) fn handle_presence(change: Presence, out: &mut impl FrameSink) {
    let frame = match change {
        Presence::Present(peer, addr) => {
            Frame::PeerPresent { peer, endpoint: Some(addr), flags: Some(peer_present_flags::IS_REGULAR) }
        }
        Presence::Gone(peer) => Frame::PeerGone { peer, reason: PeerGoneReason::Disconnected },
    };
    out.queue(&frame);
}

/// What our link to a sibling must do after a frame from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkStep {
    /// Nothing more.
    None,
    /// Answer a ping.
    Pong([u8; 8]),
    /// The sibling is draining (its clients will move; the link will drop).
    SiblingRestarting,
}

/// A frame that arrived on our link to a sibling: its presence notices update the router.
pub(crate) fn on_link_frame(router: &super::router::Router, link: &SiblingLink, frame: Frame) -> LinkStep {
    match frame {
        Frame::PeerPresent { peer, .. } => router.sibling_present(peer, link),
        Frame::PeerGone { peer, .. } => router.sibling_gone(&peer, link.id),
        Frame::Ping(d) => return LinkStep::Pong(d),
        Frame::Restarting { .. } => return LinkStep::SiblingRestarting,
        _ => {}
    }
    LinkStep::None
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::core::inbox::Item;
    use crate::core::router::{Forward, Router};
    use crate::core::testing::{handle, key, now, Relay};

    #[test]
    fn a_watching_sibling_gets_a_snapshot_then_arrivals_and_departures() {
        let relay = Relay::default();
        let (h1, _i1) = handle(1);
        let addr1 = h1.remote;
        relay.router.register(key(1), h1);
        let mut b = SiblingSession::new(100);
        let mut out = Vec::new();
        b.handle_frame(Frame::WatchConns, now(), relay.ctx(), &mut out);
        let present =
            |k, a| Frame::PeerPresent { peer: k, endpoint: Some(a), flags: Some(peer_present_flags::IS_REGULAR) };
        assert_eq!(out, vec![present(key(1), addr1)]);
        out.clear();
        b.handle_frame(Frame::WatchConns, now(), relay.ctx(), &mut out);
        assert!(out.is_empty(), "a second WatchConns sends no second snapshot");
        let (h2, _i2) = handle(2);
        let addr2 = h2.remote;
        relay.router.register(key(2), h2);
        relay.router.unregister(&key(1), 1);
        let rx = b.watching().expect("watching");
        while let Ok(change) = rx.try_recv() {
            handle_presence(change, &mut out);
        }
        let gone = Frame::PeerGone { peer: key(1), reason: PeerGoneReason::Disconnected };
        assert_eq!(out, vec![present(key(2), addr2), gone]);
    }

    #[test]
    fn forwarded_packets_reach_local_clients_only() {
        let relay = Relay::default();
        let (tx, mut onward) = mpsc::channel(4);
        relay.router.sibling_present(key(3), &SiblingLink { id: 1, tx });
        let (h, inbox) = handle(2);
        relay.router.register(key(2), h);
        let mut b = SiblingSession::new(100);
        let fwd = |dst| Frame::ForwardPacket { src: key(1), dst: key(dst), packet: Bytes::from_static(b"p") };
        b.handle_frame(fwd(2), now(), relay.ctx(), &mut Vec::new());
        b.handle_frame(fwd(3), now(), relay.ctx(), &mut Vec::new());
        let mut got = Vec::new();
        inbox.take_packets(8, &mut got);
        assert_eq!(got.iter().map(|p| p.src).collect::<Vec<_>>(), vec![key(1)]);
        assert!(onward.try_recv().is_err(), "a packet for another sibling's client is not sent onward");
    }

    #[test]
    fn close_peer_closes_a_local_client() {
        let relay = Relay::default();
        let (h, inbox) = handle(2);
        relay.router.register(key(2), h);
        let mut b = SiblingSession::new(100);
        let ev = b.handle_frame(Frame::ClosePeer { peer: key(2) }, now(), relay.ctx(), &mut Vec::new());
        assert_eq!(ev, SiblingEvent::ClosedPeer(key(2)));
        assert!(matches!(inbox.try_next(), Some(Item::Control(Control::Close))));
        let absent = b.handle_frame(Frame::ClosePeer { peer: key(9) }, now(), relay.ctx(), &mut Vec::new());
        assert_eq!(absent, SiblingEvent::None);
    }

    #[test]
    fn a_link_learns_and_forgets_the_keys_its_sibling_holds() {
        let router = Router::default();
        let (tx, mut rx) = mpsc::channel(4);
        let link = SiblingLink { id: 5, tx };
        let present = Frame::PeerPresent { peer: key(4), endpoint: None, flags: None };
        assert_eq!(on_link_frame(&router, &link, present), LinkStep::None);
        assert_eq!(router.send(key(1), key(4), Bytes::from_static(b"q"), now()), Delivery::Sibling);
        assert_eq!(
            rx.try_recv().ok().map(Forward::into_frame),
            Some(Frame::ForwardPacket { src: key(1), dst: key(4), packet: Bytes::from_static(b"q") })
        );
        let gone = Frame::PeerGone { peer: key(4), reason: PeerGoneReason::Disconnected };
        on_link_frame(&router, &link, gone);
        assert_eq!(router.send(key(1), key(4), Bytes::new(), now()), Delivery::Unknown);
        assert_eq!(on_link_frame(&router, &link, Frame::Ping(*b"abcdefgh")), LinkStep::Pong(*b"abcdefgh"));
    }
}
