//! A sibling relay's connection to this one: its login carried a mesh key.
//!
//! The key must equal this region's (compared in constant time); otherwise the login is refused
//! with a Health frame and counted as `bad_mesh_key`. A sibling is not a client: it is not in the
//! client table and receives no packets. It may send:
//!
//! - `WatchConns`: answered with a PeerPresent per client here now, then a PeerPresent or
//!   PeerGone for every later arrival and departure (see [`Clients::watch`]);
//! - `ForwardPacket`: delivered to the destination if it is connected *here*, never onward;
//! - `ClosePeer`: closes that client's connection here;
//! - `Ping` (answered) and `KeepAlive`.
//!
//! Cancel safety of the loop: as in [`crate::conn`]: channel `recv` and `read_frame` lose nothing
//! when dropped, and writes happen after the `select!`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};
use warren_relay_proto::frame::peer_present_flags;
use warren_relay_proto::{Frame, Framer, PeerGoneReason, PublicKey};

use crate::clients::{Clients, Control, Delivery, Packet, Presence, WATCH_QUEUE};
use crate::conn::{flush, read_frame, ReadError, ReadReady, ReadSize};
use crate::metrics::{DropReason, HandshakeFailure};
use crate::server::Shared;

/// Serves a connection whose ClientInfo offered `offered` as the mesh key.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    mut io: S,
    mut framer: Framer,
    remote: SocketAddr,
    key: PublicKey,
    offered: &str,
) where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let accepted = shared.config.mesh.as_ref().is_some_and(|m| m.key.matches(offered));
    if !accepted {
        shared.metrics.handshake_failed(HandshakeFailure::BadMeshKey);
        debug!(%remote, "refused a mesh login: wrong mesh key, or this relay has no mesh");
        framer.queue(&Frame::Health { problem: "mesh key refused".into() });
        let _ = flush(&mut io, &mut framer, shared.config.write_timeout).await;
        return;
    }
    info!(sibling = %key.short(), %remote, "mesh sibling connected");
    let mut sibling = Sibling {
        shared: shared.clone(),
        framer,
        watch_id: shared.next_conn_id(),
        watching: None,
        read_size: ReadSize::default(),
    };
    let why = sibling.serve(&mut io).await;
    shared.clients.unwatch(sibling.watch_id);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.shutdown()).await;
    info!(sibling = %key.short(), %remote, reason = why, "mesh sibling disconnected");
}

struct Sibling {
    shared: Arc<Shared>,
    framer: Framer,
    watch_id: u64,
    /// Presence changes, once the sibling sent WatchConns.
    watching: Option<mpsc::Receiver<Presence>>,
    read_size: ReadSize,
}

impl Sibling {
    async fn serve<S: AsyncRead + AsyncWrite + ReadReady + Unpin>(&mut self, io: &mut S) -> &'static str {
        let cancel = self.shared.conns_cancel.clone();
        let interval = self.shared.config.keepalive_interval;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let watching = self.watching.is_some();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return "relay shutting down",
                change = recv_presence(&mut self.watching), if watching => match change {
                    Some(change) => self.queue_presence(change),
                    None => return "presence queue overflowed; the sibling resyncs on reconnect",
                },
                frame = read_frame(io, &mut self.framer, &mut self.read_size) => match frame {
                    Ok(frame) => self.on_frame(frame),
                    Err(ReadError::Decode(_)) => {
                        self.shared.metrics.protocol_errors.increment(1);
                        return "protocol error";
                    }
                    Err(_) => return "closed",
                },
                _ = keepalive.tick() => self.framer.queue(&Frame::KeepAlive),
            }
            if flush(io, &mut self.framer, self.shared.config.write_timeout).await.is_err() {
                return "write failed or timed out";
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let m = &self.shared.metrics;
        match frame {
            Frame::WatchConns if self.watching.is_none() => {
                let (tx, rx) = mpsc::channel(WATCH_QUEUE);
                for (peer, addr) in self.shared.clients.watch(self.watch_id, tx) {
                    self.queue_presence(Presence::Present(peer, addr));
                }
                self.watching = Some(rx);
            }
            Frame::ForwardPacket { src, dst, packet } => {
                m.mesh_forwarded_in.increment(1);
                let p = Packet { src, data: packet, enqueued: Instant::now() };
                match self.shared.clients.send_packet(&dst, p) {
                    Delivery::Queued => {}
                    Delivery::QueueFull => m.dropped(DropReason::QueueFull, 1),
                    // One hop only: a packet for a client not here is dropped, never sent onward.
                    Delivery::NotHere(_) => m.dropped(DropReason::UnknownDest, 1),
                }
            }
            Frame::ClosePeer { peer } => {
                close_peer(&self.shared.clients, &peer);
            }
            Frame::Ping(data) => self.framer.queue(&Frame::Pong(data)),
            Frame::Unknown { .. } => m.unknown_frames.increment(1),
            // A second WatchConns, keep-alives, pongs: nothing to do.
            _ => {}
        }
    }

    fn queue_presence(&mut self, change: Presence) {
        let frame = match change {
            Presence::Present(peer, addr) => {
                Frame::PeerPresent { peer, endpoint: Some(addr), flags: Some(peer_present_flags::IS_REGULAR) }
            }
            Presence::Gone(peer) => Frame::PeerGone { peer, reason: PeerGoneReason::Disconnected },
        };
        self.framer.queue(&frame);
    }
}

fn close_peer(clients: &Clients, peer: &PublicKey) {
    if clients.send_control(peer, Control::Close) {
        debug!(client = %peer.short(), "closing client at a mesh sibling's request");
    }
}

/// Next presence change; `None` once the table dropped this watcher.
///
/// # Cancel safety
/// Cancel safe: `mpsc::Receiver::recv` is.
async fn recv_presence(rx: &mut Option<mpsc::Receiver<Presence>>) -> Option<Presence> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
