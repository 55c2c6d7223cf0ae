//! One logged-in client's session: frames from the client in, frames for the client out.
//!
//! ```text
//! handle_frame(SendPacket{dst})  -> router.send(me, dst): local inbox | sibling link | unknown
//!                                   unknown -> PeerGone{dst, NotHere} (a burst of 3, then 1/s)
//! handle_frame(Ping)             -> Pong
//! handle_frame(FindPeer{key})    -> PeerPresence{key, here or at a sibling} (a burst of 32, then
//!                                   8/s; past that no answer)
//! handle_frame(WatchConns | ClosePeer)      -> Close (mesh frames need the mesh key)
//! handle_packet(packet)          -> RecvPacket{src}
//! handle_control(PeerGone | Restarting | Replaced | Close) -> the frame, and Close for the last two
//! finish()                       -> leaves the table; PeerGone{me, Disconnected} to every peer it
//!                                   sent to
//! ```
//!
//! The client's send budget (when the relay sets one) is a token bucket: a frame that takes it
//! into debt is still handled, and [`ClientSession::poll_timeout`] then says when the shell may
//! read again, so TCP pushes back on the client meanwhile. A packet that finds its
//! destination's queue (or the link to the sibling holding it) full is dropped and pauses
//! reading the same way, briefly: under overload the relay stops reading what it would only
//! drop.

use std::collections::HashSet;
use std::time::Instant;

use warren_common::limits::TokenBucket;
use warren_relay_proto::{Frame, PeerGoneReason, PublicKey};

use super::inbox::Inbox;
use super::router::{Control, Delivery, Packet};
use super::{Ctx, FrameSink, Next};
use crate::config::ClientRate;
use crate::metrics::{DropReason, LookupResult};

/// Peers remembered per client for PeerGone notices on disconnect.
const MAX_SENT_TO: usize = 4096;
/// PeerGone(NotHere) notices a client gets at once, and per second after that.
const PEER_GONE_BURST: f64 = 3.0;
const PEER_GONE_PER_SECOND: f64 = 1.0;
/// FindPeer questions a client gets answered at once, and per second after that. A node asks
/// once per peer it cannot find at home, per other region: a burst covers a node starting with
/// many peers; past it the question goes unanswered and the node's lookup times out.
const LOOKUP_BURST: f64 = 32.0;
const LOOKUP_PER_SECOND: f64 = 8.0;
/// How long a client is not read after one of its packets found its destination's queue
/// full. Short against the time a full queue takes to drain (a 1 MiB queue at 1 Gbit/s is
/// 8 ms), so the destination never runs dry; long enough that the sender's TCP window, not the
/// relay's CPU, absorbs the excess.
const QUEUE_FULL_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
/// What a frame other than SendPacket costs against the send budget.
const FRAME_COST: usize = 16;

/// The policy state of one logged-in client.
#[derive(Debug)]
pub(crate) struct ClientSession {
    key: PublicKey,
    /// Peers this client sent to: told PeerGone(Disconnected) when it leaves.
    sent_to: HashSet<PublicKey>,
    preferred: bool,
    peer_gone_budget: TokenBucket,
    lookup_budget: TokenBucket,
    /// The client's send budget, when the relay sets one.
    budget: Option<TokenBucket>,
    /// Over budget: no reading until then.
    resume_reading: Option<Instant>,
}

impl ClientSession {
    /// The session of `key`, logged in at `now`.
    pub(crate) fn new(key: PublicKey, budget: Option<ClientRate>, now: Instant) -> Self {
        ClientSession {
            key,
            sent_to: HashSet::new(),
            preferred: false,
            peer_gone_budget: TokenBucket::new(PEER_GONE_PER_SECOND, PEER_GONE_BURST, now),
            lookup_budget: TokenBucket::new(LOOKUP_PER_SECOND, LOOKUP_BURST, now),
            budget: budget.map(|b| TokenBucket::new(b.bytes_per_second as f64, b.burst_bytes as f64, now)),
            resume_reading: None,
        }
    }

    /// The client's key.
    pub(crate) fn key(&self) -> PublicKey {
        self.key
    }

    /// A frame the client sent.
    pub(crate) fn handle_frame(&mut self, frame: Frame, now: Instant, ctx: Ctx<'_>, out: &mut impl FrameSink) -> Next {
        self.charge(&frame, now, ctx);
        match frame {
            Frame::SendPacket { dst, packet } => self.send(dst, packet, now, ctx, out),
            Frame::Ping(data) => out.queue(&Frame::Pong(data)),
            Frame::NotePreferred { preferred } => self.set_preferred(preferred, ctx),
            Frame::FindPeer { peer } => self.find(peer, now, ctx, out),
            Frame::WatchConns | Frame::ClosePeer { .. } => {
                // Mesh-only frames: DERP closes connections that lack the mesh key.
                ctx.metrics.protocol_errors.increment(1);
                return Next::Close("mesh frame without mesh key");
            }
            Frame::ForwardPacket { .. } => ctx.metrics.dropped(DropReason::NotMesh, 1),
            Frame::Unknown { .. } => ctx.metrics.unknown_frames.increment(1),
            // Pong answers, keep-alives and frames only a relay sends carry nothing for us.
            _ => {}
        }
        Next::Continue
    }

    /// A packet another client (here or at a sibling) sent to this one.
    pub(crate) fn handle_packet(&mut self, p: Packet, now: Instant, ctx: Ctx<'_>, out: &mut impl FrameSink) {
        let m = ctx.metrics;
        m.forwarded.increment(1);
        m.forwarded_bytes.increment(p.data.len() as u64);
        m.queue_delay.record(now.saturating_duration_since(p.enqueued).as_secs_f64());
        out.queue(&Frame::RecvPacket { src: p.src, packet: p.data });
    }

    /// A control message from the relay for this client.
    pub(crate) fn handle_control(&mut self, ctl: Control, out: &mut impl FrameSink) -> Next {
        match ctl {
            Control::PeerGone(peer, reason) => out.queue(&Frame::PeerGone { peer, reason }),
            Control::Restarting { reconnect_in_ms, try_for_ms } => {
                out.queue(&Frame::Restarting { reconnect_in_ms, try_for_ms });
            }
            Control::Replaced => {
                out.queue(&Frame::Health { problem: "replaced by a newer connection with the same key".into() });
                return Next::Close("replaced by a newer connection");
            }
            Control::Close => return Next::Close("closed at a mesh sibling's request"),
        }
        Next::Continue
    }

    /// When the shell may read from the client again, while it is over its send budget.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.resume_reading
    }

    /// The time [`Self::poll_timeout`] named has come.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.resume_reading.is_some_and(|t| t <= now) {
            self.resume_reading = None;
        }
    }

    /// Leaves the table (if connection `conn_id` still holds the key), tells the peers this
    /// client sent to, and counts the packets left in its inbox.
    pub(crate) fn finish(&mut self, conn_id: u64, inbox: &Inbox, ctx: Ctx<'_>) {
        self.set_preferred(false, ctx);
        let m = ctx.metrics;
        m.clients.decrement(1.0);
        if ctx.router.unregister(&self.key, conn_id) {
            for peer in self.sent_to.drain() {
                ctx.router.send_control(&peer, Control::PeerGone(self.key, PeerGoneReason::Disconnected));
            }
        }
        let left = inbox.close();
        if left > 0 {
            m.dropped(DropReason::Gone, left as u64);
        }
    }

    fn charge(&mut self, frame: &Frame, now: Instant, ctx: Ctx<'_>) {
        let Some(budget) = &mut self.budget else { return };
        let cost = match frame {
            Frame::SendPacket { packet, .. } => packet.len() + 32,
            _ => FRAME_COST,
        };
        let wait = budget.take(now, cost as f64);
        if !wait.is_zero() {
            ctx.metrics.throttled.increment(1);
            self.pause_reading_until(now + wait);
        }
    }

    /// A packet dropped at a full queue. Overload: the destination is not draining as fast as
    /// this client sends. Reading on would spend the relay's CPU on decrypting and routing
    /// packets that are dropped anyway and starve the writers (goodput collapses as the offered
    /// load grows); pausing lets TCP push back on the sender instead.
    fn shed(&mut self, reason: DropReason, now: Instant, ctx: Ctx<'_>) {
        ctx.metrics.dropped(reason, 1);
        ctx.metrics.backpressure.increment(1);
        self.pause_reading_until(now + QUEUE_FULL_PAUSE);
    }

    /// No reading from the client before `until` (the later of two pauses wins).
    fn pause_reading_until(&mut self, until: Instant) {
        self.resume_reading = Some(self.resume_reading.map_or(until, |t| t.max(until)));
    }

    fn send(&mut self, dst: PublicKey, data: bytes::Bytes, now: Instant, ctx: Ctx<'_>, out: &mut impl FrameSink) {
        let m = ctx.metrics;
        match ctx.router.send(self.key, dst, data, now) {
            Delivery::Local => {
                if self.sent_to.len() < MAX_SENT_TO {
                    self.sent_to.insert(dst);
                }
            }
            Delivery::LocalQueueFull => self.shed(DropReason::QueueFull, now, ctx),
            Delivery::Sibling => {}
            // The link to the sibling is the bottleneck: the same push-back.
            Delivery::SiblingQueueFull => self.shed(DropReason::MeshQueueFull, now, ctx),
            Delivery::Unknown => {
                m.dropped(DropReason::UnknownDest, 1);
                if self.peer_gone_budget.try_take(now, 1.0) {
                    out.queue(&Frame::PeerGone { peer: dst, reason: PeerGoneReason::NotHere });
                }
            }
        }
    }

    /// Answers whether `peer` is in this relay's region, within the client's lookup budget.
    fn find(&mut self, peer: PublicKey, now: Instant, ctx: Ctx<'_>, out: &mut impl FrameSink) {
        if !self.lookup_budget.try_take(now, 1.0) {
            ctx.metrics.lookup(LookupResult::Limited);
            return;
        }
        let present = ctx.router.is_present(&peer);
        ctx.metrics.lookup(if present { LookupResult::Present } else { LookupResult::Absent });
        out.queue(&Frame::PeerPresence { peer, present });
    }

    fn set_preferred(&mut self, preferred: bool, ctx: Ctx<'_>) {
        if preferred != self.preferred {
            self.preferred = preferred;
            let delta = if preferred { 1.0 } else { -1.0 };
            ctx.metrics.clients_home.increment(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::core::inbox::Item;
    use crate::core::router::SiblingLink;
    use crate::core::testing::{handle, key, now, Relay};

    fn send(dst: u8, data: &'static [u8]) -> Frame {
        Frame::SendPacket { dst: key(dst), packet: Bytes::from_static(data) }
    }

    #[test]
    fn a_packet_for_a_key_a_sibling_holds_goes_to_that_sibling_once() {
        let relay = Relay::default();
        let (tx, mut link) = mpsc::channel(8);
        relay.router.sibling_present(key(9), &SiblingLink { id: 1, tx });
        let (t, mut a, mut out) = (now(), ClientSession::new(key(1), None, now()), Vec::new());
        assert_eq!(a.handle_frame(send(9, b"hi"), t, relay.ctx(), &mut out), Next::Continue);
        let fwd = link.try_recv().expect("one forward");
        assert_eq!(
            fwd.into_frame(),
            Frame::ForwardPacket { src: key(1), dst: key(9), packet: Bytes::from_static(b"hi") }
        );
        assert!(link.try_recv().is_err(), "exactly one");
        assert!(out.is_empty(), "nothing back to the sender");
    }

    #[test]
    fn a_packet_that_finds_a_full_queue_is_dropped_and_pauses_reading_briefly() {
        let relay = Relay::default();
        let t = now();
        let (hb, inbox_b) = handle(2); // holds one packet
        relay.router.register(key(2), hb);
        let (mut a, mut out) = (ClientSession::new(key(1), None, t), Vec::new());
        a.handle_frame(send(2, b"first"), t, relay.ctx(), &mut out);
        assert_eq!(a.poll_timeout(), None, "room in the queue: reading goes on");
        a.handle_frame(send(2, b"second"), t, relay.ctx(), &mut out);
        assert_eq!(a.poll_timeout(), Some(t + QUEUE_FULL_PAUSE), "a full queue pauses the sender");
        let mut queued = Vec::new();
        inbox_b.take_packets(8, &mut queued);
        assert_eq!(queued.iter().map(|p| &p.data[..]).collect::<Vec<_>>(), vec![&b"first"[..]], "the second dropped");
        a.handle_timeout(t + QUEUE_FULL_PAUSE - Duration::from_micros(1));
        assert!(a.poll_timeout().is_some(), "not before the pause ends");
        a.handle_timeout(t + QUEUE_FULL_PAUSE);
        assert_eq!(a.poll_timeout(), None, "reading resumes after it");
        assert!(out.is_empty(), "nothing is said to the sender");
    }

    #[test]
    fn a_full_link_to_a_sibling_pauses_the_sender_too() {
        let relay = Relay::default();
        let (tx, mut link) = mpsc::channel(1);
        relay.router.sibling_present(key(9), &SiblingLink { id: 1, tx });
        let t = now();
        let (mut a, mut out) = (ClientSession::new(key(1), None, t), Vec::new());
        a.handle_frame(send(9, b"one"), t, relay.ctx(), &mut out);
        assert_eq!(a.poll_timeout(), None, "room on the link");
        a.handle_frame(send(9, b"two"), t, relay.ctx(), &mut out);
        assert_eq!(a.poll_timeout(), Some(t + QUEUE_FULL_PAUSE), "a full link pauses the sender");
        assert!(link.try_recv().is_ok() && link.try_recv().is_err(), "one forwarded, the other dropped");
    }

    #[test]
    fn an_unknown_key_gets_peer_gone_in_a_small_burst_then_one_a_second() {
        let relay = Relay::default();
        let t = now();
        let (mut a, mut out) = (ClientSession::new(key(1), None, t), Vec::new());
        for _ in 0..10 {
            a.handle_frame(send(7, b"x"), t, relay.ctx(), &mut out);
        }
        let gone = Frame::PeerGone { peer: key(7), reason: PeerGoneReason::NotHere };
        assert_eq!(out, vec![gone.clone(); 3], "a burst of three, then quiet");
        out.clear();
        a.handle_frame(send(7, b"x"), t + Duration::from_millis(999), relay.ctx(), &mut out);
        assert!(out.is_empty(), "none within the second");
        a.handle_frame(send(7, b"x"), t + Duration::from_millis(1001), relay.ctx(), &mut out);
        assert_eq!(out, vec![gone], "one more after a second");
    }

    #[test]
    fn find_peer_answers_for_local_and_sibling_keys_within_a_budget() {
        let relay = Relay::default();
        let t = now();
        let (h, _inbox) = handle(2);
        relay.router.register(key(2), h);
        let (tx, _link) = mpsc::channel(1);
        relay.router.sibling_present(key(9), &SiblingLink { id: 1, tx });
        let (mut a, mut out) = (ClientSession::new(key(1), None, t), Vec::new());
        for k in [2, 9, 7] {
            assert_eq!(a.handle_frame(Frame::FindPeer { peer: key(k) }, t, relay.ctx(), &mut out), Next::Continue);
        }
        let answer = |k, present| Frame::PeerPresence { peer: key(k), present };
        assert_eq!(out, vec![answer(2, true), answer(9, true), answer(7, false)], "here, at a sibling, nowhere");
        out.clear();
        for _ in 0..100 {
            a.handle_frame(Frame::FindPeer { peer: key(2) }, t, relay.ctx(), &mut out);
        }
        assert_eq!(out.len(), LOOKUP_BURST as usize - 3, "the rest of the burst, then no answers");
        out.clear();
        a.handle_frame(Frame::FindPeer { peer: key(2) }, t + Duration::from_millis(200), relay.ctx(), &mut out);
        assert_eq!(out, vec![answer(2, true)], "the budget refills at 8/s");
    }

    #[test]
    fn a_local_packet_reaches_the_peer_and_a_departure_is_told_to_it() {
        let relay = Relay::default();
        let t = now();
        let (hb, inbox_b) = handle(2);
        relay.router.register(key(2), hb);
        let (ha, inbox_a) = handle(1);
        relay.router.register(key(1), ha);
        let (mut a, mut b) = (ClientSession::new(key(1), None, t), ClientSession::new(key(2), None, t));
        let mut out_a = Vec::new();
        a.handle_frame(send(2, b"hello"), t, relay.ctx(), &mut out_a);
        let mut packets = Vec::new();
        inbox_b.take_packets(8, &mut packets);
        let mut out_b = Vec::new();
        for p in packets {
            b.handle_packet(p, t, relay.ctx(), &mut out_b);
        }
        assert_eq!(out_b, vec![Frame::RecvPacket { src: key(1), packet: Bytes::from_static(b"hello") }]);
        a.finish(1, &inbox_a, relay.ctx());
        assert_eq!(relay.router.len(), 1, "A left the table, B is still here");
        let Some(Item::Control(ctl)) = inbox_b.try_next() else { panic!("a control message for B") };
        let mut out = Vec::new();
        assert_eq!(b.handle_control(ctl, &mut out), Next::Continue);
        assert_eq!(out, vec![Frame::PeerGone { peer: key(1), reason: PeerGoneReason::Disconnected }]);
        assert!(inbox_b.try_next().is_none(), "told once");
    }

    #[test]
    fn mesh_frames_without_the_mesh_key_close_the_connection() {
        let relay = Relay::default();
        let mut a = ClientSession::new(key(1), None, now());
        let next = a.handle_frame(Frame::WatchConns, now(), relay.ctx(), &mut Vec::new());
        assert_eq!(next, Next::Close("mesh frame without mesh key"));
        let mut out = Vec::new();
        let ping = a.handle_frame(Frame::Ping(*b"12345678"), now(), relay.ctx(), &mut out);
        assert_eq!((ping, out), (Next::Continue, vec![Frame::Pong(*b"12345678")]));
    }

    #[test]
    fn replaced_says_why_and_closes() {
        let mut a = ClientSession::new(key(1), None, now());
        let mut out = Vec::new();
        assert_eq!(a.handle_control(Control::Replaced, &mut out), Next::Close("replaced by a newer connection"));
        assert!(matches!(&out[..], [Frame::Health { .. }]));
        assert_eq!(
            a.handle_control(Control::Close, &mut Vec::new()),
            Next::Close("closed at a mesh sibling's request")
        );
    }

    #[test]
    fn a_client_over_its_budget_is_read_again_once_the_debt_is_repaid() {
        let relay = Relay::default();
        let t = now();
        let budget = ClientRate { bytes_per_second: 1000, burst_bytes: 1000 };
        let mut a = ClientSession::new(key(1), Some(budget), t);
        a.handle_frame(send(2, &[0; 900]), t, relay.ctx(), &mut Vec::new());
        assert_eq!(a.poll_timeout(), None, "within the burst");
        a.handle_frame(send(2, &[0; 500]), t, relay.ctx(), &mut Vec::new());
        // 900 + 32 + 500 + 32 = 1464 bytes against 1000: 464 ms of debt.
        let resume = a.poll_timeout().expect("throttled");
        let debt = resume - t;
        assert!(debt > Duration::from_millis(463) && debt < Duration::from_millis(465), "{debt:?}");
        a.handle_timeout(t + Duration::from_millis(100));
        assert_eq!(a.poll_timeout(), Some(resume), "too early");
        a.handle_timeout(resume);
        assert_eq!(a.poll_timeout(), None);
    }
}
