//! A sibling relay's connection to this one: its login carried a mesh key.
//!
//! The key must equal this region's (compared in constant time); otherwise the login is refused
//! with a Health frame and counted as `bad_mesh_key`. A sibling is not a client: it is not in the
//! client table and receives no packets. It may send:
//!
//! - `WatchConns`: answered with a PeerPresent per client here now, then a PeerPresent or
//!   PeerGone for every later arrival and departure (see `Router::watch`);
//! - `ForwardPacket`: delivered to the destination if it is connected *here*, never onward;
//! - `ClosePeer`: closes that client's connection here;
//! - `Ping` (answered) and `KeepAlive`.
//!
//! The policy lives in [`crate::core::sibling`]; this shell reads, writes and waits.
//!
//! Cancel safety of the loop: as in [`crate::conn`]: channel `recv` and `read_frame` lose nothing
//! when dropped, and writes happen after the `select!`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};
use warren_relay_proto::{Frame, Framer, PublicKey};

use crate::core::router::Presence;
use crate::core::sibling::{handle_presence, SiblingEvent, SiblingSession};
use crate::io::framed::{flush, read_frame, ReadError, ReadReady, ReadSize};
use crate::metrics::HandshakeFailure;
use crate::state::Shared;

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
    let config = shared.config();
    let accepted = config.mesh.as_ref().is_some_and(|m| m.key.matches(offered));
    if !accepted {
        shared.metrics.handshake_failed(HandshakeFailure::BadMeshKey);
        debug!(%remote, "refused a mesh login: wrong mesh key, or this relay has no mesh");
        framer.queue(&Frame::Health { problem: "mesh key refused".into() });
        let _ = flush(&mut io, &mut framer, config.write_timeout).await;
        return;
    }
    info!(sibling = %key.short(), %remote, "mesh sibling connected");
    let mut sibling = Sibling {
        shared: shared.clone(),
        config,
        framer,
        session: SiblingSession::new(shared.next_conn_id()),
        read_size: ReadSize::default(),
    };
    let why = sibling.serve(&mut io).await;
    shared.router.unwatch(sibling.session.watch_id());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.shutdown()).await;
    info!(sibling = %key.short(), %remote, reason = why, "mesh sibling disconnected");
}

/// The shell around a [`SiblingSession`]: it owns the socket and moves bytes.
struct Sibling {
    shared: Arc<Shared>,
    /// The limits this connection started with.
    config: Arc<crate::config::Config>,
    framer: Framer,
    session: SiblingSession,
    read_size: ReadSize,
}

impl Sibling {
    async fn serve<S: AsyncRead + AsyncWrite + ReadReady + Unpin>(&mut self, io: &mut S) -> &'static str {
        let cancel = self.shared.conns_cancel.clone();
        let interval = self.config.keepalive_interval;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let watching = self.session.watching().is_some();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return "relay shutting down",
                change = recv_presence(self.session.watching()), if watching => match change {
                    Some(change) => handle_presence(change, &mut self.framer),
                    None => return "presence queue overflowed; the sibling resyncs on reconnect",
                },
                frame = read_frame(io, &mut self.framer, &mut self.read_size) => match frame {
                    Ok(frame) => {
                        let event = self.session.handle_frame(frame, Instant::now(), self.shared.ctx(), &mut self.framer);
                        if let SiblingEvent::ClosedPeer(peer) = event {
                            debug!(client = %peer.short(), "closing client at a mesh sibling's request");
                        }
                    }
                    Err(ReadError::Decode(_)) => {
                        self.shared.metrics.protocol_errors.increment(1);
                        return "protocol error";
                    }
                    Err(_) => return "closed",
                },
                _ = keepalive.tick() => self.framer.queue(&Frame::KeepAlive),
            }
            if flush(io, &mut self.framer, self.config.write_timeout).await.is_err() {
                return "write failed or timed out";
            }
        }
    }
}

/// Next presence change; `None` once the table dropped this watcher.
///
/// # Cancel safety
/// Cancel safe: `mpsc::Receiver::recv` is.
async fn recv_presence(rx: Option<&mut tokio::sync::mpsc::Receiver<Presence>>) -> Option<Presence> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
