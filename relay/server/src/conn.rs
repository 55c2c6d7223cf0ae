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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};
use warren_relay_proto::handshake::{ClientInfo, ServerInfo};
use warren_relay_proto::{DecodeError, Frame, Framer, PeerGoneReason, PublicKey, Transport, PROTOCOL_VERSION};

use crate::admission::{AdmissionResult, Verdict};
use crate::clients::{ClientHandle, Control, Delivery, Packet};
use crate::inbox::{Inbox, Item};
use crate::mesh::Forwarded;
use crate::metrics::{DropReason, HandshakeFailure};
use crate::server::Shared;
use warren_common::limits::TokenBucket;

/// Packets written per batch before reading from the socket again.
const MAX_BATCH: usize = 256;
/// Bytes queued per batch before flushing.
const MAX_BATCH_BYTES: usize = 256 << 10;
/// Read buffer of a quiet connection: what an idle client costs.
const READ_MIN: usize = 512;
/// Read buffer a busy connection grows to.
const READ_MAX: usize = 64 << 10;
/// Peers remembered per client for PeerGone notices on disconnect.
const MAX_SENT_TO: usize = 4096;

/// How much a connection reads at once: doubles while reads fill the buffer, halves while they
/// use little of it, so busy clients read in large chunks and idle ones hold little memory.
#[derive(Debug)]
pub(crate) struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(READ_MIN)
    }
}

impl ReadSize {
    fn adapt(&mut self, read: usize, free: usize) {
        if read >= free {
            self.0 = (self.0 * 2).min(READ_MAX);
        } else if read < self.0 / 4 {
            self.0 = (self.0 / 2).max(READ_MIN);
        }
    }
}

/// Why reading a frame ended.
#[derive(Debug)]
pub(crate) enum ReadError {
    Closed,
    Io,
    Decode(DecodeError),
}

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
        let login = tokio::time::timeout_at(deadline, Box::pin(handshake(&shared, &mut io, &mut framer))).await;
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
        let admitted = tokio::time::timeout_at(deadline, Box::pin(shared.admission.check(&key, remote.ip()))).await;
        let (verdict, result) =
            admitted.unwrap_or((Verdict::Deny("admission check timed out"), AdmissionResult::CalloutError));
        shared.metrics.admission(result);
        if let Verdict::Deny(why) = verdict {
            debug!(client = %key.short(), %remote, reason = why, "login refused");
            framer.queue(&Frame::Health { problem: format!("not admitted: {why}") });
            let _ = flush(&mut io, &mut framer, shared.config.write_timeout).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return;
        }
        let conn_id = shared.next_conn_id();
        let inbox = Arc::new(Inbox::new(shared.config.send_queue_depth.get(), shared.config.send_queue_bytes.get()));
        let handle = ClientHandle { conn_id, remote, inbox: inbox.clone() };
        if let Some(old) = shared.clients.register(key, handle) {
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
            key,
            framer,
            inbox,
            batch: Vec::new(),
            read_size: ReadSize::default(),
            sent_to: HashSet::new(),
            preferred: false,
            peer_gone_budget: PeerGoneBudget::new(Instant::now()),
            budget: shared
                .config
                .client_rate
                .map(|r| TokenBucket::new(r.bytes_per_second as f64, r.burst_bytes as f64, Instant::now())),
            resume_reading: None,
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
    io: &mut S,
    framer: &mut Framer,
) -> Result<(PublicKey, ClientInfo), HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    framer.queue(&Frame::ServerKey { key: shared.public });
    flush(io, framer, shared.config.write_timeout).await.map_err(|_| HandshakeFailure::Io)?;
    let frame = read_frame(io, framer, &mut ReadSize::default()).await.map_err(|e| match e {
        ReadError::Decode(_) => HandshakeFailure::BadFrame,
        ReadError::Closed | ReadError::Io => HandshakeFailure::Io,
    })?;
    let Frame::ClientInfo { key, sealed } = frame else {
        return Err(HandshakeFailure::BadFrame);
    };
    let info = ClientInfo::open(&shared.secret, &key, &sealed).map_err(|_| HandshakeFailure::BadClientInfo)?;
    let mut server_info = ServerInfo { version: PROTOCOL_VERSION, ..Default::default() };
    if let Some(rate) = shared.config.client_rate {
        server_info.token_bucket_bytes_per_second = rate.bytes_per_second;
        server_info.token_bucket_bytes_burst = rate.burst_bytes;
    }
    framer.queue(&server_info.seal_frame(&shared.secret, &key, &mut OsRng));
    flush(io, framer, shared.config.write_timeout).await.map_err(|_| HandshakeFailure::Io)?;
    Ok((key, info))
}

/// A stream that can tell it is readable before a read, so that waiting needs no buffer.
pub(crate) trait ReadReady {
    /// Ready once a read would not wait (or the stream failed).
    fn poll_read_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

/// Reads until the framer yields a frame.
///
/// # Cancel safety
/// Cancel safe: partial input stays in the framer; the only await is `read_buf`.
pub(crate) async fn read_frame<S: AsyncRead + ReadReady + Unpin>(
    io: &mut S,
    framer: &mut Framer,
    size: &mut ReadSize,
) -> Result<Frame, ReadError> {
    loop {
        if let Some(frame) = framer.poll_frame().map_err(ReadError::Decode)? {
            return Ok(frame);
        }
        if framer.peer_closed() {
            return Err(ReadError::Closed);
        }
        let want = size.0;
        // A quiet client holds no read buffer: with nothing partial held, the buffer is taken
        // only once the stream is readable, and given back if the read still has to wait.
        let read = std::future::poll_fn(|cx| {
            let buf = framer.rx_buf();
            let idle = buf.is_empty();
            if idle {
                std::task::ready!(io.poll_read_ready(cx))?;
            }
            if buf.capacity() - buf.len() < want / 2 {
                buf.reserve(want);
            }
            let free = buf.capacity() - buf.len();
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *io), cx, buf) {
                std::task::Poll::Pending => {
                    if idle && buf.is_empty() {
                        *buf = bytes::BytesMut::new();
                    }
                    std::task::Poll::Pending
                }
                std::task::Poll::Ready(r) => std::task::Poll::Ready(r.map(|n| (n, free))),
            }
        });
        match read.await {
            Ok((0, _)) => return Err(ReadError::Closed),
            Ok((n, free)) => size.adapt(n, free),
            // A TLS peer that closed TCP without close_notify: an ordinary disconnect.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
            Err(_) => return Err(ReadError::Io),
        }
    }
}

/// Writes everything the framer has queued, in as few writes as it allows.
pub(crate) async fn flush<S: AsyncWrite + Unpin>(
    io: &mut S,
    framer: &mut Framer,
    limit: Duration,
) -> std::io::Result<()> {
    while let Some(bytes) = framer.take_transmit(&mut OsRng) {
        let write = async {
            io.write_all(&bytes).await?;
            io.flush().await
        };
        tokio::time::timeout(limit, write)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))??;
    }
    Ok(())
}

/// Rate limit of PeerGone(NotHere) notices: a burst of 3, then one per second.
#[derive(Debug)]
struct PeerGoneBudget {
    tokens: f64,
    last: Instant,
}

impl PeerGoneBudget {
    fn new(now: Instant) -> Self {
        PeerGoneBudget { tokens: 3.0, last: now }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + refill).min(3.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }
}

struct Actor {
    shared: Arc<Shared>,
    key: PublicKey,
    framer: Framer,
    inbox: Arc<Inbox>,
    /// Reused for draining the inbox.
    batch: Vec<Packet>,
    read_size: ReadSize,
    /// Peers this client sent to: told PeerGone(Disconnected) when it leaves.
    sent_to: HashSet<PublicKey>,
    preferred: bool,
    peer_gone_budget: PeerGoneBudget,
    /// The client's send budget, when the relay sets one.
    budget: Option<TokenBucket>,
    /// Over budget: no reading until then (TCP pushes back on the client).
    resume_reading: Option<tokio::time::Instant>,
}

/// What the frame handler decided.
enum Next {
    Continue,
    Close(&'static str),
}

impl Actor {
    async fn run<S: AsyncRead + AsyncWrite + ReadReady + Unpin>(&mut self, io: &mut S) -> &'static str {
        let cancel = self.shared.conns_cancel.clone();
        let interval = self.shared.config.keepalive_interval;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let throttled = self.resume_reading.is_some();
            let resume_at = self.resume_reading.unwrap_or_else(tokio::time::Instant::now);
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => Next::Close("relay shutting down"),
                item = self.inbox.next() => match item {
                    Item::Control(ctl) => self.on_control(ctl),
                    Item::Packet(pkt) => {
                        self.on_packets(pkt);
                        Next::Continue
                    }
                },
                _ = tokio::time::sleep_until(resume_at), if throttled => {
                    self.resume_reading = None;
                    Next::Continue
                }
                frame = read_frame(io, &mut self.framer, &mut self.read_size), if !throttled => match frame {
                    Ok(frame) => self.on_frame(frame),
                    Err(ReadError::Closed) => Next::Close("closed by client"),
                    Err(ReadError::Io) => Next::Close("read error"),
                    Err(ReadError::Decode(e)) => {
                        self.shared.metrics.protocol_errors.increment(1);
                        debug!(client = %self.key.short(), error = %e, "protocol error");
                        Next::Close("protocol error")
                    }
                },
                _ = keepalive.tick() => {
                    self.framer.queue(&Frame::KeepAlive);
                    Next::Continue
                }
            };
            let flushed = flush(io, &mut self.framer, self.shared.config.write_timeout).await;
            if let Next::Close(why) = next {
                return why;
            }
            if flushed.is_err() {
                return "write failed or timed out";
            }
        }
    }

    fn on_control(&mut self, ctl: Control) -> Next {
        match ctl {
            Control::PeerGone(peer, reason) => self.framer.queue(&Frame::PeerGone { peer, reason }),
            Control::Restarting { reconnect_in_ms, try_for_ms } => {
                self.framer.queue(&Frame::Restarting { reconnect_in_ms, try_for_ms });
            }
            Control::Replaced => {
                self.framer
                    .queue(&Frame::Health { problem: "replaced by a newer connection with the same key".into() });
                return Next::Close("replaced by a newer connection");
            }
            Control::Close => return Next::Close("closed at a mesh sibling's request"),
        }
        Next::Continue
    }

    fn on_packets(&mut self, first: Packet) {
        let now = Instant::now();
        self.write_packet(first, now);
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
                self.write_packet(p, now);
            }
        }
        self.batch = batch;
    }

    fn write_packet(&mut self, p: Packet, now: Instant) {
        let m = &self.shared.metrics;
        m.forwarded.increment(1);
        m.forwarded_bytes.increment(p.data.len() as u64);
        m.queue_delay.record(now.saturating_duration_since(p.enqueued).as_secs_f64());
        self.framer.queue(&Frame::RecvPacket { src: p.src, packet: p.data });
    }

    fn on_frame(&mut self, frame: Frame) -> Next {
        if let Some(budget) = &mut self.budget {
            let cost = match &frame {
                Frame::SendPacket { packet, .. } => packet.len() + 32,
                _ => 16,
            };
            let wait = budget.take(Instant::now(), cost as f64);
            if !wait.is_zero() {
                self.shared.metrics.throttled.increment(1);
                self.resume_reading = Some(tokio::time::Instant::now() + wait);
            }
        }
        match frame {
            Frame::SendPacket { dst, packet } => self.deliver(dst, packet),
            Frame::Ping(data) => self.framer.queue(&Frame::Pong(data)),
            Frame::NotePreferred { preferred } => self.set_preferred(preferred),
            Frame::WatchConns | Frame::ClosePeer { .. } => {
                // Mesh-only frames: DERP closes connections that lack the mesh key.
                self.shared.metrics.protocol_errors.increment(1);
                return Next::Close("mesh frame without mesh key");
            }
            Frame::ForwardPacket { .. } => self.shared.metrics.dropped(DropReason::NotMesh, 1),
            Frame::Unknown { .. } => self.shared.metrics.unknown_frames.increment(1),
            // Pong answers, keep-alives and frames only a relay sends carry nothing for us.
            _ => {}
        }
        Next::Continue
    }

    fn deliver(&mut self, dst: PublicKey, data: bytes::Bytes) {
        let now = Instant::now();
        let packet = Packet { src: self.key, data, enqueued: now };
        match self.shared.clients.send_packet(&dst, packet) {
            Delivery::Queued => {
                if self.sent_to.len() < MAX_SENT_TO {
                    self.sent_to.insert(dst);
                }
            }
            Delivery::QueueFull => self.shared.metrics.dropped(DropReason::QueueFull, 1),
            Delivery::NotHere(packet) => match self.shared.mesh_remote.forward(self.key, dst, packet.data) {
                Forwarded::Queued => {}
                Forwarded::QueueFull => self.shared.metrics.dropped(DropReason::MeshQueueFull, 1),
                Forwarded::Unknown => {
                    self.shared.metrics.dropped(DropReason::UnknownDest, 1);
                    if self.peer_gone_budget.allow(now) {
                        self.framer.queue(&Frame::PeerGone { peer: dst, reason: PeerGoneReason::NotHere });
                    }
                }
            },
        }
    }

    fn set_preferred(&mut self, preferred: bool) {
        if preferred != self.preferred {
            self.preferred = preferred;
            let delta = if preferred { 1.0 } else { -1.0 };
            self.shared.metrics.clients_home.increment(delta);
        }
    }

    /// Leaves the table, tells the peers this client sent to, counts packets left behind.
    fn finish(&mut self, conn_id: u64) {
        self.set_preferred(false);
        let m = &self.shared.metrics;
        m.clients.decrement(1.0);
        if self.shared.clients.unregister(&self.key, conn_id) {
            for peer in self.sent_to.drain() {
                self.shared.clients.send_control(&peer, Control::PeerGone(self.key, PeerGoneReason::Disconnected));
            }
        }
        let left = self.inbox.close();
        if left > 0 {
            m.dropped(DropReason::Gone, left as u64);
        }
    }
}
