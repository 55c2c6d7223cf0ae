//! The relay's policy, without I/O: where a packet goes and what each connection says.
//!
//! ```text
//!            frames in                                   frames out
//! client ──▶ ClientSession ──send(src, dst, now)──▶ Router ──▶ inbox of dst ──▶ ClientSession ──▶ client
//!                                                       └──▶ link to the sibling holding dst
//! sibling ─▶ SiblingSession ──send_local(...)──▶ Router (local clients only, one hop)
//! ```
//!
//! - [`router`]: the key table of local clients (with their inboxes), the siblings watching
//!   it, and the keys siblings hold; `send` decides local client → sibling → unknown.
//! - [`session`]: one logged-in client: frames in, frames out, its send budget and PeerGone
//!   notices, its departure.
//! - [`sibling`]: a sibling relay connected to us (WatchConns, ForwardPacket, ClosePeer), and
//!   what our link to a sibling learns from it (PeerPresent, PeerGone).
//! - [`inbox`]: one client's bounded queues.
//! - [`conversation`]: a whole conversation with these, scripted by bytes (a fuzz body).
//!
//! Everything here is synchronous, reads no clock (`now` is a parameter) and touches no
//! socket; the connection actors in `conn`, `mesh_conn` and `mesh` only move bytes.
//! `scripts/check-sans-io.py` (run by `scripts/test.sh`) refuses a clock read, a spawn, a
//! timer or a socket in this module outside its tests.

pub(crate) mod conversation;
pub(crate) mod inbox;
pub(crate) mod router;
pub(crate) mod session;
pub(crate) mod sibling;
#[cfg(test)]
pub(crate) mod testing;

use warren_relay_proto::{Frame, Framer};

use crate::metrics::RelayMetrics;

/// What a connection does after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Keep serving.
    Continue,
    /// Flush what is queued and close, for this reason.
    Close(&'static str),
}

/// What a session needs of the relay around it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub(crate) router: &'a router::Router,
    pub(crate) metrics: &'a RelayMetrics,
}

/// Where a session's outgoing frames go: the connection's [`Framer`], or a list in tests.
pub(crate) trait FrameSink {
    /// Queues one frame for the peer.
    fn queue(&mut self, frame: &Frame);
}

impl FrameSink for Framer {
    fn queue(&mut self, frame: &Frame) {
        Framer::queue(self, frame);
    }
}

impl FrameSink for Vec<Frame> {
    fn queue(&mut self, frame: &Frame) {
        self.push(frame.clone());
    }
}
