//! One DERP connection: login handshake, then an actor that forwards packets.
//!
//! The actor owns the socket and a [`Framer`]. Its loop, in priority order:
//!
//! 1. shutdown (hard stop after the drain grace period),
//! 2. control messages (peer gone, restarting, replaced),
//! 3. packets queued for this client: drained in a batch and written with one write,
//! 4. frames read from the client,
//! 5. the keep-alive timer.
//!
//! Cancel safety: every branch of the `select!` is cancel safe. [`Inbox::next`] removes an item
//! only when it returns it; `read_frame` keeps all partial input inside the framer and only
//! awaits `read_buf`, which is cancel safe; `sleep`-based ticks are re-armed each round.
//! Writes happen in branch bodies, outside the select, bounded by the write timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};
use warren_relay_proto::handshake::{ClientInfo, ServerInfo};
use warren_relay_proto::{Frame, Framer, PublicKey, Transport, PROTOCOL_VERSION};

use crate::admission::{AdmissionResult, Verdict};
use crate::config::Config;
use crate::core::inbox::{Inbox, Item};
use crate::core::router::{ClientHandle, Control, Packet};
use crate::core::session::ClientSession;
use crate::core::Next;
use crate::io::framed::{flush, read_frame, ReadError, ReadReady, ReadSize};
use crate::metrics::HandshakeFailure;
use crate::state::Shared;

/// Packets written per batch before reading from the socket again.
const MAX_BATCH: usize = 256;
/// Bytes queued per batch before flushing.
const MAX_BATCH_BYTES: usize = 256 << 10;

/// Serves one upgraded connection until it closes or the relay stops.
///
/// A plain function returning an `async move` block rather than an `async fn`: an async fn
/// keeps its by-value parameters twice in its state (the stream and framer, on every
/// connection, for its whole life); a block's captures are kept once.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn run<S>(
    shared: Arc<Shared>,
    mut io: S,
    mut framer: Framer,
    remote: SocketAddr,
    transport: Transport,
    deadline: tokio::time::Instant,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    async move {
        // The login-phase futures are boxed so that their state does not stay part of every
        // connection's future for its whole life (an idle client costs what its actor holds).
        // This connection's limits, for its whole life (a reload changes later connections').
        let config = shared.config();
        let login =
            tokio::time::timeout_at(deadline, Box::pin(handshake(&shared, &config, &mut io, &mut framer))).await;
        let (key, info) = match login {
            Ok(Ok((key, info))) if !info.mesh_key.is_empty() => {
                return Box::pin(crate::mesh_conn::run(shared, io, framer, remote, key, &info.mesh_key)).await;
            }
            Ok(Ok(v)) => v,
            Ok(Err(reason)) => {
                debug!(%remote, reason = reason.label(), "handshake failed");
                shared.metrics.handshake_failed(reason);
                return;
            }
            Err(_) => {
                debug!(%remote, "handshake timed out");
                shared.metrics.handshake_failed(HandshakeFailure::Timeout);
                return;
            }
        };
        let admission = shared.admission();
        let admitted = tokio::time::timeout_at(deadline, Box::pin(admission.check(&key, remote.ip()))).await;
        drop(admission);
        let (verdict, result) =
            admitted.unwrap_or((Verdict::Deny("admission check timed out"), AdmissionResult::CalloutError));
        shared.metrics.admission(result);
        if let Verdict::Deny(why) = verdict {
            debug!(client = %key.short(), %remote, reason = why, "login refused");
            framer.queue(&Frame::Health { problem: format!("not admitted: {why}") });
            let _ = flush(&mut io, &mut framer, config.write_timeout).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return;
        }
        let conn_id = shared.next_conn_id();
        let inbox = Arc::new(Inbox::new(config.send_queue_depth.get(), config.send_queue_bytes.get()));
        let handle = ClientHandle { conn_id, remote, inbox: inbox.clone() };
        if let Some(old) = shared.router.register(key, handle) {
            old.inbox.push_control(Control::Replaced);
            shared.metrics.replaced.increment(1);
        }
        match transport {
            Transport::Derp => shared.metrics.conns_derp.increment(1),
            Transport::WebSocket => shared.metrics.conns_ws.increment(1),
        }
        shared.metrics.clients.increment(1.0);
        info!(client = %key.short(), %remote, transport = transport.name(), version = info.version, "client connected");

        let mut actor = Actor {
            shared: shared.clone(),
            session: ClientSession::new(key, config.client_rate, Instant::now()),
            config,
            framer,
            inbox,
            batch: Vec::new(),
            read_size: ReadSize::default(),
        };
        let why = actor.run(&mut io).await;
        actor.finish(conn_id);
        // Best effort close_notify / FIN; a peer that stopped reading must not hold us here.
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        info!(client = %key.short(), %remote, reason = why, "client disconnected");
    }
}

async fn handshake<S>(
    shared: &Shared,
    config: &Config,
    io: &mut S,
    framer: &mut Framer,
) -> Result<(PublicKey, ClientInfo), HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    framer.queue(&Frame::ServerKey { key: shared.public });
    flush(io, framer, config.write_timeout).await.map_err(|_| HandshakeFailure::Io)?;
    let frame = read_frame(io, framer, &mut ReadSize::default()).await.map_err(|e| match e {
        ReadError::Decode(_) => HandshakeFailure::BadFrame,
        ReadError::Closed | ReadError::Io => HandshakeFailure::Io,
    })?;
    let Frame::ClientInfo { key, sealed } = frame else {
        return Err(HandshakeFailure::BadFrame);
    };
    let info = ClientInfo::open(&shared.secret, &key, &sealed).map_err(|_| HandshakeFailure::BadClientInfo)?;
    let mut server_info = ServerInfo { version: PROTOCOL_VERSION, ..Default::default() };
    if let Some(rate) = config.client_rate {
        server_info.token_bucket_bytes_per_second = rate.bytes_per_second;
        server_info.token_bucket_bytes_burst = rate.burst_bytes;
    }
    framer.queue(&server_info.seal_frame(&shared.secret, &key, &mut OsRng));
    flush(io, framer, config.write_timeout).await.map_err(|_| HandshakeFailure::Io)?;
    Ok((key, info))
}

/// The shell around one client's [`ClientSession`]: it owns the socket and moves bytes.
struct Actor {
    shared: Arc<Shared>,
    /// The limits this connection started with.
    config: Arc<Config>,
    session: ClientSession,
    framer: Framer,
    inbox: Arc<Inbox>,
    /// Reused for draining the inbox.
    batch: Vec<Packet>,
    read_size: ReadSize,
}

impl Actor {
    async fn run<S: AsyncRead + AsyncWrite + ReadReady + Unpin>(&mut self, io: &mut S) -> &'static str {
        let cancel = self.shared.conns_cancel.clone();
        let interval = self.config.keepalive_interval;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let resume = self.session.poll_timeout();
            let throttled = resume.is_some();
            let resume_at = resume.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => Next::Close("relay shutting down"),
                item = self.inbox.next() => match item {
                    Item::Control(ctl) => self.session.handle_control(ctl, &mut self.framer),
                    Item::Packet(pkt) => {
                        self.on_packets(pkt);
                        Next::Continue
                    }
                },
                _ = tokio::time::sleep_until(resume_at), if throttled => {
                    self.session.handle_timeout(resume_at.into_std());
                    Next::Continue
                }
                frame = read_frame(io, &mut self.framer, &mut self.read_size), if !throttled => match frame {
                    Ok(frame) => self.session.handle_frame(frame, Instant::now(), self.shared.ctx(), &mut self.framer),
                    Err(ReadError::Closed) => Next::Close("closed by client"),
                    Err(ReadError::Io) => Next::Close("read error"),
                    Err(ReadError::Decode(e)) => {
                        self.shared.metrics.protocol_errors.increment(1);
                        debug!(client = %self.session.key().short(), error = %e, "protocol error");
                        Next::Close("protocol error")
                    }
                },
                _ = keepalive.tick() => {
                    self.framer.queue(&Frame::KeepAlive);
                    Next::Continue
                }
            };
            let flushed = flush(io, &mut self.framer, self.config.write_timeout).await;
            if let Next::Close(why) = next {
                return why;
            }
            if flushed.is_err() {
                return "write failed or timed out";
            }
        }
    }

    /// Writes `first` and whatever else is queued, up to a batch, for one flush.
    fn on_packets(&mut self, first: Packet) {
        let now = Instant::now();
        let ctx = self.shared.ctx();
        self.session.handle_packet(first, now, ctx, &mut self.framer);
        let mut written = 1;
        let mut batch = std::mem::take(&mut self.batch);
        while written < MAX_BATCH && self.framer.queued_len() < MAX_BATCH_BYTES {
            // A few at a time under the inbox lock, so the byte budget is not overshot by much.
            self.inbox.take_packets(16.min(MAX_BATCH - written), &mut batch);
            if batch.is_empty() {
                break;
            }
            written += batch.len();
            for p in batch.drain(..) {
                self.session.handle_packet(p, now, ctx, &mut self.framer);
            }
        }
        self.batch = batch;
    }

    /// Leaves the table, tells the peers this client sent to, counts packets left behind.
    fn finish(&mut self, conn_id: u64) {
        self.session.finish(conn_id, &self.inbox, self.shared.ctx());
    }
}
