//! A node-edge tunnel, whichever transport carries it.
//!
//! ```text
//! QUIC (UDP, the tunnel port, ALPN warren-tunnel/1)
//!     node opens the control stream; the edge opens one stream per request
//! TCP+TLS (the edge's public port, ALPN warren-tunnel-tcp/1), HTTP/2 with inverted roles
//!     the node dials and is the HTTP/2 *server*; the edge is the HTTP/2 client, so it is the
//!     one that opens streams: first the control stream, then one per request
//! ```
//!
//! The same tunnel messages travel on either; both sides only see [`SendStream`] and
//! [`RecvStream`]. HTTP/2 gives each stream its own flow-control window (so one slow visitor
//! stalls only its own stream), resets, and PING for keep-alives. QUIC's own keep-alives and
//! idle timeout do the same job there; [`KeepAlive`] sets both.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::stream::{H2Recv, H2Send, RecvStream, SendStream};

/// A stream's receive window, both transports: 4 MiB per round trip (about 80 MB/s at 50 ms).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The connection's receive window, both transports: 64 streams' worth, so visitors who stop
/// reading (each holding a full stream window unread at the edge) must be many before the
/// tunnel's other streams wait for window; what they hold is reset after
/// [`crate::STALLED_READER`].
pub const CONNECTION_WINDOW: u32 = 64 * STREAM_WINDOW;
/// Largest HTTP/2 frame either side accepts.
const MAX_FRAME: u32 = 64 << 10;
/// Streams reset by the peer before the node took them, before the peer counts as abusive.
const MAX_PENDING_RESETS: usize = 1024;

/// How often a tunnel proves it is alive, and when silence means it is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Between keep-alives.
    pub interval: Duration,
    /// Silence after which the tunnel is closed as dead.
    pub dead_after: Duration,
}

impl KeepAlive {
    /// Keep-alives four times per `dead_after`.
    pub fn dead_after(dead_after: Duration) -> Self {
        KeepAlive { interval: dead_after / 4, dead_after }
    }

    /// How long an unanswered keep-alive may wait: the idle timer restarts at the first
    /// keep-alive sent after the last sign of life, up to `interval` later, so waiting
    /// `dead_after - interval` from there keeps the whole silence within `dead_after`.
    fn answer_within(&self) -> Duration {
        self.dead_after.saturating_sub(self.interval).max(self.interval)
    }

    /// Applies the settings to a QUIC transport (keep-alive interval and idle timeout; the idle
    /// timeout in use is the smaller of the two ends').
    pub fn apply(&self, t: &mut quinn::TransportConfig) {
        t.keep_alive_interval(Some(self.interval));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.answer_within()).ok());
    }
}

/// Which transport a tunnel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 over TLS over TCP (directly or through an HTTP proxy).
    Tcp,
}

impl Transport {
    /// `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tunnel is closed or a stream could not be opened on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The QUIC connection closed or failed.
    #[error("QUIC connection: {0}")]
    Quic(#[from] quinn::ConnectionError),
    /// The TCP tunnel closed or failed.
    #[error("TCP tunnel: {0}")]
    Tcp(Arc<str>),
}

impl LinkError {
    fn tcp(reason: impl Into<Arc<str>>) -> Self {
        LinkError::Tcp(reason.into())
    }
}

/// One node-edge tunnel.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Link {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// A TCP+TLS connection carrying HTTP/2.
    Tcp(TcpLink),
}

impl Link {
    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Quic(_) => Transport::Quic,
            Link::Tcp(_) => Transport::Tcp,
        }
    }

    /// The round-trip time: QUIC's estimate, or the last keep-alive's on TCP.
    pub fn rtt(&self) -> Option<Duration> {
        match self {
            Link::Quic(c) => Some(c.rtt()),
            Link::Tcp(t) => *t.inner.state.rtt.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Edge side: opens a request stream to the node.
    ///
    /// # Errors
    /// [`LinkError`] when the tunnel is closed.
    pub async fn open(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Link::Quic(c) => c.open_bi().await.map(|(s, r)| (s.into(), r.into())).map_err(LinkError::from),
            Link::Tcp(t) => t.open().await,
        }
    }

    /// Node side: the next request stream the edge opened.
    ///
    /// # Errors
    /// [`LinkError`] when the tunnel is closed.
    pub async fn accept(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Link::Quic(c) => c.accept_bi().await.map(|(s, r)| (s.into(), r.into())).map_err(LinkError::from),
            Link::Tcp(t) => t.accept().await,
        }
    }

    /// Node side: the control stream (QUIC: opened by the node; TCP: the edge's first stream).
    ///
    /// # Errors
    /// [`LinkError`] when the tunnel is closed.
    pub async fn open_control(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Link::Quic(_) => self.open().await,
            Link::Tcp(t) => t.accept().await,
        }
    }

    /// Edge side: the control stream (QUIC: the node's first stream; TCP: the one the edge
    /// opened when the tunnel came up).
    ///
    /// # Errors
    /// [`LinkError`] when the tunnel is closed.
    pub async fn accept_control(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Link::Quic(_) => self.accept().await,
            Link::Tcp(t) => {
                let control = t.inner.control.lock().unwrap_or_else(|e| e.into_inner()).take();
                control.ok_or_else(|| LinkError::tcp("control stream already taken"))
            }
        }
    }

    /// Closes the tunnel now; streams still open fail.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Link::Quic(c) => c.close(code.into(), reason.as_bytes()),
            Link::Tcp(t) => t.inner.state.close(format!("closed: {reason}")),
        }
    }

    /// Waits until the tunnel is closed; returns why.
    pub async fn closed(&self) -> LinkError {
        match self {
            Link::Quic(c) => c.closed().await.into(),
            Link::Tcp(t) => t.inner.state.closed().await,
        }
    }
}

/// A tunnel over TCP+TLS: an HTTP/2 connection in which the edge is the client.
#[derive(Debug, Clone)]
pub struct TcpLink {
    inner: Arc<TcpInner>,
}

#[derive(Debug)]
struct TcpInner {
    /// Edge side: opens request streams.
    opener: Option<h2::client::SendRequest<Bytes>>,
    /// Node side: the streams the edge opened, in order.
    accepted: tokio::sync::Mutex<mpsc::UnboundedReceiver<(SendStream, RecvStream)>>,
    /// Edge side: the control stream, until taken.
    control: Mutex<Option<(SendStream, RecvStream)>>,
    state: Arc<State>,
}

impl Drop for TcpInner {
    fn drop(&mut self) {
        // As with a QUIC connection, the last handle gone closes the tunnel.
        self.state.close("dropped".into());
    }
}

/// What the connection's task shares with the handles.
#[derive(Debug)]
struct State {
    rtt: Mutex<Option<Duration>>,
    /// Why the tunnel closed, once it has.
    ended: watch::Sender<Option<Arc<str>>>,
}

impl State {
    fn close(&self, reason: String) {
        self.ended.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.into());
            true
        });
    }

    fn reason(&self) -> Option<LinkError> {
        self.ended.borrow().clone().map(LinkError::Tcp)
    }

    async fn closed(&self) -> LinkError {
        let mut rx = self.ended.subscribe();
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
        LinkError::Tcp(reason.unwrap_or_else(|| "closed".into()))
    }
}

/// The head of every stream the edge opens (HTTP/2 wants one; nothing reads it).
fn stream_request(path: &str) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::try_from(format!("https://tunnel{path}")).unwrap_or_default();
    req
}

impl TcpLink {
    /// Edge side: runs the tunnel on `io`, a TLS session a node opened with the TCP tunnel's
    /// ALPN, and opens the control stream.
    ///
    /// # Errors
    /// [`LinkError`] when the HTTP/2 connection cannot start.
    pub async fn edge<T>(io: T, keep_alive: KeepAlive) -> Result<TcpLink, LinkError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (opener, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| LinkError::tcp(format!("HTTP/2 handshake: {e}")))?;
        let state = new_state();
        let ping = conn.ping_pong();
        let work = async move {
            match conn.await {
                Ok(()) => "the node closed the tunnel".to_owned(),
                Err(e) => format!("connection: {e}"),
            }
        };
        tokio::spawn(drive(state.clone(), ping, keep_alive, work));
        let (_, accepted) = mpsc::unbounded_channel();
        let link = TcpLink {
            inner: Arc::new(TcpInner { opener: Some(opener), accepted: accepted.into(), control: None.into(), state }),
        };
        let control = link.open_path("/control").await?;
        *link.inner.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
        Ok(link)
    }

    /// Node side: runs the tunnel on `io`, a TLS session to the edge with the TCP tunnel's
    /// ALPN, taking up to `peer_streams` streams at once from the edge.
    ///
    /// # Errors
    /// [`LinkError`] when the HTTP/2 connection cannot start.
    pub async fn node<T>(io: T, keep_alive: KeepAlive, peer_streams: u32) -> Result<TcpLink, LinkError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(peer_streams)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| LinkError::tcp(format!("HTTP/2 handshake: {e}")))?;
        let state = new_state();
        let ping = conn.ping_pong();
        let (tx, accepted) = mpsc::unbounded_channel();
        let work = async move {
            loop {
                let (req, mut respond) = match conn.accept().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => return format!("connection: {e}"),
                    None => return "the edge closed the tunnel".to_owned(),
                };
                // Accepting the stream is answering its head at once; the tunnel messages
                // follow in the bodies.
                let Ok(send) = respond.send_response(http::Response::new(()), false) else { continue };
                let stream = (SendStream::H2(H2Send::new(send)), RecvStream::H2(H2Recv::open(req.into_body())));
                if tx.send(stream).is_err() {
                    return "dropped".to_owned();
                }
            }
        };
        tokio::spawn(drive(state.clone(), ping, keep_alive, work));
        Ok(TcpLink {
            inner: Arc::new(TcpInner { opener: None, accepted: accepted.into(), control: None.into(), state }),
        })
    }

    async fn open(&self) -> Result<(SendStream, RecvStream), LinkError> {
        self.open_path("/").await
    }

    async fn open_path(&self, path: &str) -> Result<(SendStream, RecvStream), LinkError> {
        if let Some(e) = self.inner.state.reason() {
            return Err(e);
        }
        let opener = self.inner.opener.clone().ok_or_else(|| LinkError::tcp("only the edge opens streams"))?;
        let failed = |e: h2::Error| self.inner.state.reason().unwrap_or_else(|| LinkError::tcp(e.to_string()));
        let mut opener = opener.ready().await.map_err(failed)?;
        let (response, send) = opener.send_request(stream_request(path), false).map_err(failed)?;
        Ok((SendStream::H2(H2Send::new(send)), RecvStream::H2(H2Recv::opening(response))))
    }

    async fn accept(&self) -> Result<(SendStream, RecvStream), LinkError> {
        let next = self.inner.accepted.lock().await.recv().await;
        match next {
            Some(s) => Ok(s),
            None => Err(self.inner.state.closed().await),
        }
    }
}

fn new_state() -> Arc<State> {
    Arc::new(State { rtt: Mutex::new(None), ended: watch::channel(None).0 })
}

/// Runs `work` (the HTTP/2 connection) and the keep-alives until either ends or the tunnel is
/// closed; records why. Dropping the connection closes the TCP connection.
async fn drive(
    state: Arc<State>,
    ping: Option<h2::PingPong>,
    keep_alive: KeepAlive,
    work: impl Future<Output = String>,
) {
    let mut ended = state.ended.subscribe();
    let reason = tokio::select! {
        r = work => r,
        r = keep_alives(ping, keep_alive, &state) => r,
        _ = ended.wait_for(Option::is_some) => return,
    };
    state.close(reason);
}

/// Pings the peer every `interval`; returns once an answer is overdue (nothing heard for
/// `dead_after`).
async fn keep_alives(ping: Option<h2::PingPong>, keep_alive: KeepAlive, state: &State) -> String {
    let Some(mut ping) = ping else { return std::future::pending().await };
    let wait = keep_alive.answer_within();
    loop {
        let sent = Instant::now();
        match tokio::time::timeout(wait, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => *state.rtt.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent.elapsed()),
            Ok(Err(e)) => return format!("keep-alive: {e}"),
            Err(_) => return format!("no answer to keep-alives for {:?}", keep_alive.dead_after),
        }
        tokio::time::sleep(keep_alive.interval).await;
    }
}
