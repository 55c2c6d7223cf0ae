//! Async glue between tunnel streams, tunnel messages and hyper bodies, used by both ends of
//! the node-edge tunnel, and the tunnel's two transports ([`link`]: QUIC, or HTTP/2 over
//! TCP+TLS).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use warren_tunnel_proto::{Message, TunnelError, MAX_MESSAGE_LEN};

pub mod link;
pub mod stream;

pub use link::{KeepAlive, Link, LinkError, TcpLink, Transport};
pub use stream::{ReadExactError, RecvStream, SendStream};

/// Largest chunk read from a stream at once.
const CHUNK: usize = 64 << 10;

/// Longest a streamed body waits, by default, for its reader to take the next chunk. Past it
/// the stream is reset: its unread bytes stop holding the tunnel's connection window (nginx's
/// `send_timeout` plays the same part).
pub const STALLED_READER: Duration = Duration::from_secs(30);

/// Why a tunnel message could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadMessageError {
    /// The stream ended early or failed.
    #[error("stream: {0}")]
    Stream(#[from] ReadExactError),
    /// The bytes were not a valid message.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// Writes one message.
///
/// # Errors
/// The stream's write error, or an encoding limit.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf).map_err(std::io::Error::other)?;
    send.write_chunk(buf.freeze()).await
}

/// Reads exactly one message (no byte after it is consumed).
///
/// # Errors
/// [`ReadMessageError`] when the stream ends early or the message is invalid or oversized.
pub async fn read_message(recv: &mut RecvStream) -> Result<Message, ReadMessageError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MESSAGE_LEN {
        return Err(TunnelError::ProtocolViolation("message length over the limit").into());
    }
    let mut buf = BytesMut::with_capacity(4 + n);
    buf.extend_from_slice(&len);
    buf.resize(4 + n, 0);
    recv.read_exact(&mut buf[4..]).await?;
    Message::decode(&mut buf)?.ok_or(ReadMessageError::Tunnel(TunnelError::Malformed("incomplete message")))
}

/// A hyper body streaming the rest of a tunnel stream, chunk by chunk without copying.
/// Back-pressure: at most a few chunks are read ahead of the consumer.
#[derive(Debug)]
pub struct StreamBody {
    feed: Feed,
}

impl StreamBody {
    /// Starts streaming `recv` (a reader that stalls for [`STALLED_READER`] loses it).
    pub fn new(recv: RecvStream) -> Self {
        Self::with_guard(recv, (), STALLED_READER)
    }

    /// Starts streaming `recv`, keeping `guard` alive until the stream is done (e.g. a permit
    /// that counts the request as in flight); a reader that takes nothing for `stall` loses
    /// the stream.
    pub fn with_guard<G: Send + 'static>(recv: RecvStream, guard: G, stall: Duration) -> Self {
        StreamBody { feed: Feed::start(Raw(recv), guard, stall) }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.feed.poll(cx)
    }
}

/// A hyper body read from a framed stream: [`Message::Data`] chunks, at most one
/// [`Message::Trailers`], then the end of the stream. Like [`StreamBody`], a few frames are read
/// ahead of the consumer at most.
#[derive(Debug)]
pub struct FramedBody {
    feed: Feed,
}

impl FramedBody {
    /// Starts reading `recv`, keeping `guard` alive until the stream is done, for a reader
    /// that takes something at least every `stall`.
    pub fn with_guard<G: Send + 'static>(recv: RecvStream, guard: G, stall: Duration) -> Self {
        FramedBody { feed: Feed::start(Framed { recv, trailers_seen: false }, guard, stall) }
    }
}

impl Body for FramedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.feed.poll(cx)
    }
}

/// Where a body's frames come from.
trait Source: Send + 'static {
    /// The next frame; `None` at the end.
    fn next(&mut self) -> impl std::future::Future<Output = Option<std::io::Result<Frame<Bytes>>>> + Send;
}

/// The stream's bytes, as much as has arrived (up to [`CHUNK`]) per frame.
struct Raw(RecvStream);

impl Source for Raw {
    async fn next(&mut self) -> Option<std::io::Result<Frame<Bytes>>> {
        match self.0.read_available(CHUNK).await {
            Ok(Some(b)) => Some(Ok(Frame::data(b))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Data and Trailers messages.
struct Framed {
    recv: RecvStream,
    trailers_seen: bool,
}

impl Source for Framed {
    async fn next(&mut self) -> Option<std::io::Result<Frame<Bytes>>> {
        Some(match read_message(&mut self.recv).await {
            Ok(Message::Data(d)) if !self.trailers_seen => Ok(Frame::data(Bytes::from(d))),
            Ok(Message::Trailers(h)) if !self.trailers_seen => {
                self.trailers_seen = true;
                Ok(Frame::trailers(header_map(&h)))
            }
            // The end of the stream at a message boundary is the end of the body.
            Err(ReadMessageError::Stream(ReadExactError::FinishedEarly(0))) => return None,
            Ok(_) => Err(std::io::Error::other("unexpected message in a framed body")),
            Err(e) => Err(std::io::Error::other(e)),
        })
    }
}

/// Frames a task reads ahead of a body's reader: a few at most, and none once the reader has
/// not taken one for the stall limit (the stream is dropped then, and the body ends with an
/// error rather than looking complete).
#[derive(Debug)]
struct Feed {
    rx: mpsc::Receiver<std::io::Result<Frame<Bytes>>>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Feed {
    fn start<S: Source, G: Send + 'static>(mut source: S, guard: G, stall: Duration) -> Feed {
        let (tx, rx) = mpsc::channel(4);
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            let _guard = guard;
            while let Some(item) = source.next().await {
                let failed = item.is_err();
                match tokio::time::timeout(stall, tx.send(item)).await {
                    Ok(Ok(())) if !failed => {}
                    // The reader went away, or the stream failed: stop (dropping the stream
                    // tells the peer).
                    Ok(_) => return,
                    Err(_) => return flag.store(true, std::sync::atomic::Ordering::Relaxed),
                }
            }
        });
        Feed { rx, stalled }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if self.stalled.load(std::sync::atomic::Ordering::Relaxed) => {
                Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the reader stopped reading"))))
            }
            other => other,
        }
    }
}

/// Headers as a map, skipping any a map cannot hold.
pub fn header_map(h: &[warren_tunnel_proto::Header]) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(h.len());
    for (n, v) in h {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(n.as_bytes()), http::HeaderValue::from_bytes(v)) {
            map.append(n, v);
        }
    }
    map
}

/// The body's next frame; on a body error the stream is reset (the peer must not take a
/// cut body for a whole one) and the error returned.
async fn next_frame<B>(body: &mut B, send: &mut SendStream) -> std::io::Result<Option<Frame<Bytes>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match body.frame().await.transpose() {
        Ok(f) => Ok(f),
        Err(e) => {
            send.reset();
            Err(std::io::Error::other(e.to_string()))
        }
    }
}

/// Streams `body` into `send` framed (Data chunks, then its trailers if it has any) and
/// finishes the stream. Returns the data bytes sent.
///
/// # Errors
/// A body error or a stream write error (the stream is reset then).
pub async fn send_framed_body<B>(mut body: B, send: &mut SendStream) -> std::io::Result<u64>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut sent = 0u64;
    while let Some(frame) = next_frame(&mut body, send).await? {
        match frame.into_data() {
            Ok(data) => {
                for chunk in data.chunks(warren_tunnel_proto::MAX_DATA) {
                    write_message(send, &Message::Data(chunk.to_vec())).await?;
                }
                sent += data.len() as u64;
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let h = trailers.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
                    write_message(send, &Message::Trailers(h)).await?;
                }
            }
        }
    }
    send.finish()?;
    Ok(sent)
}

/// Streams `body` into `send` and finishes the stream. Returns the bytes sent.
///
/// # Errors
/// A body error or a stream write error (the stream is reset then).
pub async fn send_body<B>(mut body: B, send: &mut SendStream) -> std::io::Result<u64>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut sent = 0u64;
    while let Some(frame) = next_frame(&mut body, send).await? {
        if let Ok(data) = frame.into_data() {
            sent += data.len() as u64;
            send.write_chunk(data).await?;
        }
    }
    send.finish()?;
    Ok(sent)
}

/// QUIC transport settings of the tunnel, both ends: large flow-control windows so one stream
/// is not capped at a few MB/s, keep-alives (which also keep NAT mappings open) and the idle
/// timeout from `keep_alive`, and `peer_streams` bidirectional streams the peer may open.
pub fn transport_config(peer_streams: u32, keep_alive: KeepAlive) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(link::STREAM_WINDOW.into());
    t.receive_window(link::CONNECTION_WINDOW.into());
    t.send_window(64 << 20);
    keep_alive.apply(&mut t);
    t
}

/// Bytes asked for each of a tunnel endpoint's UDP socket buffers. The kernel's default
/// (about 200 kB) overflows when a bulk transfer's packets arrive faster than the endpoint
/// task wakes up, and every drop halves the congestion window; Linux caps the ask at
/// `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// A QUIC endpoint on `addr` (dual-stack when it is IPv6 unspecified), its UDP socket buffers
/// raised to [`SOCKET_BUFFER`] as far as the kernel allows; a server when `server` is given.
///
/// # Errors
/// When the socket cannot be created or bound.
pub fn endpoint(addr: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it grants (its bookkeeping allowance).
    let granted = |r: std::io::Result<usize>| r.unwrap_or(0) / 2;
    let (recv, send) = (granted(socket.recv_buffer_size()), granted(socket.send_buffer_size()));
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        tracing::info!(
            receive = recv,
            send,
            wanted = SOCKET_BUFFER,
            "tunnel UDP socket buffers capped by the kernel; bulk transfers want net.core.rmem_max and wmem_max raised"
        );
    }
    socket.bind(&addr.into())?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

/// Answers a request stream with a short plain-text response (an error the answering end
/// writes itself) and finishes the stream.
pub async fn respond_text(send: SendStream, status: u16, text: &str) {
    let headers = vec![("content-type".into(), b"text/plain; charset=utf-8".to_vec())];
    respond(send, warren_tunnel_proto::ResponseHead { status, headers }, text.as_bytes()).await;
}

/// Answers a request stream with `head` and `body`, then finishes it (errors are ignored: the
/// other side has gone).
pub async fn respond(mut send: SendStream, head: warren_tunnel_proto::ResponseHead, body: &[u8]) {
    if write_message(&mut send, &Message::Response(head)).await.is_ok() && send.write_all(body).await.is_ok() {
        let _ = send.finish();
    }
}

/// A QUIC client configuration for the tunnel ALPN, trusting the system roots plus `ca_file`,
/// letting the server open `peer_streams` bidirectional streams.
///
/// # Errors
/// [`QuicConfigError`] when `ca_file` is unusable or the TLS config cannot carry QUIC.
pub fn quic_client_config(
    ca_file: Option<&std::path::Path>,
    peer_streams: u32,
    keep_alive: KeepAlive,
) -> Result<quinn::ClientConfig, QuicConfigError> {
    let mut tls = (*warren_common::tls::client_config(ca_file)?).clone();
    tls.alpn_protocols = vec![warren_tunnel_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    client.transport_config(std::sync::Arc::new(transport_config(peer_streams, keep_alive)));
    Ok(client)
}

/// A TLS client configuration for the TCP tunnel (ALPN [`warren_tunnel_proto::ALPN_TCP`]),
/// trusting the system roots plus `ca_file`.
///
/// # Errors
/// When `ca_file` is unusable.
pub fn tcp_client_config(
    ca_file: Option<&std::path::Path>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, warren_common::tls::TlsError> {
    let mut tls = (*warren_common::tls::client_config(ca_file)?).clone();
    tls.alpn_protocols = vec![warren_tunnel_proto::ALPN_TCP.to_vec()];
    Ok(std::sync::Arc::new(tls))
}

/// Why a QUIC client configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicConfigError {
    /// The CA file is unusable.
    #[error(transparent)]
    Tls(#[from] warren_common::tls::TlsError),
    /// The TLS configuration offers no cipher suite QUIC can start with.
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Whether `value` of a `te` header asks for trailers (the one TE value HTTP/2 allows, which
/// gRPC requires end to end).
pub fn te_is_trailers(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// HTTP/1.1 hop-by-hop headers, which a proxy must not forward.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Whether a header is hop-by-hop (kept only for upgrades, where `connection` and `upgrade`
/// must pass).
pub fn is_hop_by_hop(name: &str, upgrade: bool) -> bool {
    let name = name.to_ascii_lowercase();
    if upgrade && (name == "connection" || name == "upgrade") {
        return false;
    }
    HOP_BY_HOP.contains(&name.as_str())
}
