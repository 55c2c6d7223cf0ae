//! A DERP v2 client: connect, log in, send and receive packets.
//!
//! ```text
//! connect(url) -> TCP (direct, or CONNECT through an HTTP proxy) -> TLS (https) -> GET /derp Upgrade: DERP | websocket
//!              -> 101 (skipped with fast start) -> ServerKey -> ClientInfo -> ServerInfo
//! ```
//!
//! A [`DerpClient`] is owned by one task: it reads with [`DerpClient::recv`] and writes with
//! [`DerpClient::send`] (or [`DerpClient::queue`] + [`DerpClient::flush`] to batch).

use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use rand_core::{OsRng, RngCore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_common::tls::{client_config, TlsError};
use warren_common::url::{RelayUrl, UrlError};
use warren_relay_proto::handshake::{ClientInfo, ServerInfo};
use warren_relay_proto::ws::{self, Role};
use warren_relay_proto::{DecodeError, Frame, FrameDecoder, Framer, PublicKey, SecretKey, Transport};

/// Largest HTTP response head accepted from a relay.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// Why a DERP client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The relay URL is invalid.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A socket operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup failed (bad CA file).
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The relay URL's host is not a valid TLS server name.
    #[error("tls: invalid server name {0:?}")]
    ServerName(String),
    /// The relay answered the upgrade with something other than 101.
    #[error("relay refused the upgrade: {0}")]
    Upgrade(String),
    /// The relay sent bytes that do not decode.
    #[error("protocol: {0}")]
    Protocol(#[from] DecodeError),
    /// The relay sent a valid frame at the wrong time.
    #[error("unexpected {0} frame during login")]
    Unexpected(&'static str),
    /// The relay's key differs from the one its HTTP header announced.
    #[error("relay key mismatch between Derp-Public-Key header and ServerKey frame")]
    KeyMismatch,
    /// The connection closed.
    #[error("connection closed by the relay")]
    Closed,
    /// The operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The HTTP proxy in the way failed or refused.
    #[error(transparent)]
    Proxy(#[from] warren_common::proxy::ProxyError),
    /// The TLS handshake through a proxy failed: perhaps the proxy intercepts TLS.
    #[error("TLS through proxy {proxy}: {source} (does the proxy intercept TLS?)")]
    ProxiedTls {
        /// The proxy.
        proxy: String,
        /// The handshake error.
        source: std::io::Error,
    },
}

impl ClientError {
    /// A short stable name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Url(_) => "url",
            ClientError::Io(_) => "io",
            ClientError::Tls(_) | ClientError::ServerName(_) | ClientError::ProxiedTls { .. } => "tls",
            ClientError::Proxy(_) => "proxy",
            ClientError::Upgrade(_) => "upgrade",
            ClientError::Protocol(_) => "protocol",
            ClientError::Unexpected(_) => "unexpected",
            ClientError::KeyMismatch => "key_mismatch",
            ClientError::Closed => "closed",
            ClientError::Timeout => "timeout",
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Upgrade to DERP directly, or via WebSocket.
    pub transport: Transport,
    /// Send `Derp-Fast-Start: 1` and expect frames without a 101 response (DERP transport only).
    pub fast_start: bool,
    /// Extra root certificates (PEM file) to trust, e.g. a relay's dev CA.
    pub ca_file: Option<std::path::PathBuf>,
    /// What to tell the relay at login.
    pub info: ClientInfo,
    /// Deadline for TCP + TLS + login.
    pub timeout: Duration,
    /// Dial this address instead of resolving the URL's host (which still names the TLS
    /// certificate).
    pub connect_addr: Option<std::net::SocketAddr>,
    /// Local address to connect from (e.g. one of many 127.0.0.x for load tests).
    pub bind_ip: Option<std::net::IpAddr>,
    /// Reach the relay through this HTTP proxy (CONNECT to `connect_addr` when set, else to the
    /// URL's host); `bind_ip` is then unused.
    pub proxy: Option<warren_common::proxy::Proxy>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            transport: Transport::Derp,
            fast_start: false,
            ca_file: None,
            info: ClientInfo::node(),
            timeout: Duration::from_secs(10),
            connect_addr: None,
            bind_ip: None,
            proxy: None,
        }
    }
}

/// Any byte stream a client runs over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A logged-in DERP connection.
pub struct DerpClient {
    io: Box<dyn Io>,
    framer: Framer,
    server_key: PublicKey,
    server_info: ServerInfo,
    key: PublicKey,
}

impl std::fmt::Debug for DerpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerpClient")
            .field("key", &self.key)
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

impl DerpClient {
    /// Connects to `url` as `secret` and logs in.
    ///
    /// # Errors
    /// [`ClientError`] for any failure on the way; [`ClientError::Timeout`] past `opts.timeout`.
    pub async fn connect(url: &str, secret: &SecretKey, opts: &ConnectOptions) -> Result<Self, ClientError> {
        Self::connect_url(&RelayUrl::parse(url)?, secret, opts).await
    }

    /// [`DerpClient::connect`] to a URL parsed already (e.g. once, from a config file).
    ///
    /// # Errors
    /// As [`DerpClient::connect`], except for URL errors.
    pub async fn connect_url(url: &RelayUrl, secret: &SecretKey, opts: &ConnectOptions) -> Result<Self, ClientError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(url, secret, opts))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(url: &RelayUrl, secret: &SecretKey, opts: &ConnectOptions) -> Result<Self, ClientError> {
        let io: Box<dyn Io> = match &opts.proxy {
            // The proxy is asked for the address the region map gives, when it gives one.
            Some(proxy) => match opts.connect_addr {
                Some(a) => Box::new(proxy.connect(&a.ip().to_string(), a.port(), opts.timeout).await?),
                None => Box::new(proxy.connect(&url.host, url.port, opts.timeout).await?),
            },
            None => Box::new(Self::dial(url, opts).await?),
        };
        let io: Box<dyn Io> = if url.tls {
            let connector = tokio_rustls::TlsConnector::from(client_config(opts.ca_file.as_deref())?);
            let name = ServerName::try_from(url.host.clone()).map_err(|_| ClientError::ServerName(url.host.clone()))?;
            match (connector.connect(name, io).await, &opts.proxy) {
                (Ok(tls), _) => Box::new(tls),
                (Err(source), Some(p)) => return Err(ClientError::ProxiedTls { proxy: p.to_string(), source }),
                (Err(e), None) => return Err(e.into()),
            }
        } else {
            io
        };
        Self::login(io, url, secret, opts).await
    }

    /// A direct TCP connection to the relay.
    async fn dial(url: &RelayUrl, opts: &ConnectOptions) -> Result<TcpStream, ClientError> {
        let tcp = match (opts.connect_addr, opts.bind_ip) {
            (Some(addr), None) => TcpStream::connect(addr).await?,
            (None, None) => TcpStream::connect((url.host.as_str(), url.port)).await?,
            (addr, Some(ip)) => {
                let addr = match addr {
                    Some(a) => a,
                    None => tokio::net::lookup_host((url.host.as_str(), url.port))
                        .await?
                        .find(|a| a.is_ipv4() == ip.is_ipv4())
                        .ok_or_else(|| std::io::Error::other("no address of the bind address's family"))?,
                };
                let sock =
                    if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                sock.bind(std::net::SocketAddr::new(ip, 0))?;
                sock.connect(addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    async fn login(
        mut io: Box<dyn Io>,
        url: &RelayUrl,
        secret: &SecretKey,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let ws_key = base64::engine::general_purpose::STANDARD.encode({
            let mut k = [0u8; 16];
            OsRng.fill_bytes(&mut k);
            k
        });
        let fast_start = opts.fast_start && opts.transport == Transport::Derp;
        io.write_all(upgrade_request(url, opts.transport, fast_start, &ws_key).as_bytes()).await?;
        io.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        let announced =
            if fast_start { None } else { read_switching(&mut io, &mut buf, opts.transport, &ws_key).await? };
        let mut framer = Framer::new(Role::Client, opts.transport, FrameDecoder::default());
        framer.push_rx(&buf);
        let mut client = DerpClient {
            io,
            framer,
            server_key: PublicKey::from_bytes([0; 32]),
            server_info: ServerInfo::default(),
            key: secret.public_key(),
        };
        let Frame::ServerKey { key: server_key } = client.recv().await? else {
            return Err(ClientError::Unexpected("non-ServerKey"));
        };
        if announced.is_some_and(|k| k != server_key) {
            return Err(ClientError::KeyMismatch);
        }
        client.server_key = server_key;
        client.send(&opts.info.seal_frame(secret, &server_key, &mut OsRng)).await?;
        let Frame::ServerInfo { sealed } = client.recv().await? else {
            return Err(ClientError::Unexpected("non-ServerInfo"));
        };
        client.server_info = ServerInfo::open(secret, &server_key, &sealed)?;
        Ok(client)
    }

    /// The relay's public key.
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// What the relay said at login.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// This client's public key.
    pub fn public_key(&self) -> PublicKey {
        self.key
    }

    /// Queues a frame without writing it.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] for a frame over the size limits.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), ClientError> {
        frame.validate()?;
        self.framer.queue(frame);
        Ok(())
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// [`ClientError::Io`] if the write fails.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        while let Some(bytes) = self.framer.take_transmit(&mut OsRng) {
            self.io.write_all(&bytes).await?;
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Queues and writes one frame.
    ///
    /// # Errors
    /// As [`DerpClient::queue`] and [`DerpClient::flush`].
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.queue(frame)?;
        self.flush().await
    }

    /// Sends a packet to `dst` through the relay.
    ///
    /// # Errors
    /// As [`DerpClient::send`]; packets over 64 KiB are refused.
    pub async fn send_packet(&mut self, dst: PublicKey, packet: &[u8]) -> Result<(), ClientError> {
        self.send(&Frame::SendPacket { dst, packet: bytes::Bytes::copy_from_slice(packet) }).await
    }

    /// Receives the next frame, whatever its type.
    ///
    /// # Cancel safety
    /// Cancel safe: partial input stays buffered in the client.
    ///
    /// # Errors
    /// [`ClientError::Closed`] at end of stream, [`ClientError::Protocol`] on bad bytes.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(frame) = self.framer.poll_frame()? {
                return Ok(frame);
            }
            if self.framer.queued_len() > 0 {
                // WebSocket pong or close replies generated while reading.
                self.flush().await?;
            }
            if self.framer.peer_closed() {
                return Err(ClientError::Closed);
            }
            let buf = self.framer.rx_buf();
            buf.reserve(16 << 10);
            if self.io.read_buf(buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Receives frames until a packet arrives, skipping keep-alives and answering pings.
    ///
    /// # Errors
    /// As [`DerpClient::recv`].
    pub async fn recv_packet(&mut self) -> Result<(PublicKey, bytes::Bytes), ClientError> {
        loop {
            match self.recv().await? {
                Frame::RecvPacket { src, packet } => return Ok((src, packet)),
                Frame::Ping(d) => self.send(&Frame::Pong(d)).await?,
                _ => {}
            }
        }
    }

    /// Closes the connection (TLS close_notify / FIN).
    ///
    /// # Errors
    /// [`ClientError::Io`] if the shutdown fails.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

fn upgrade_request(url: &RelayUrl, transport: Transport, fast_start: bool, ws_key: &str) -> String {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: warren/{}\r\nConnection: Upgrade\r\n",
        url.path,
        url.authority(),
        env!("CARGO_PKG_VERSION")
    );
    match transport {
        Transport::Derp => {
            req.push_str("Upgrade: DERP\r\n");
            if fast_start {
                req.push_str("Derp-Fast-Start: 1\r\n");
            }
        }
        Transport::WebSocket => {
            req.push_str(&format!("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Protocol: {}\r\n", ws::SUBPROTOCOL));
        }
    }
    req.push_str("\r\n");
    req
}

/// Reads the 101 response; returns the key from `Derp-Public-Key`, if sent. Bytes after the
/// head stay in `buf`.
async fn read_switching(
    io: &mut Box<dyn Io>,
    buf: &mut BytesMut,
    transport: Transport,
    ws_key: &str,
) -> Result<Option<PublicKey>, ClientError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let status = resp.parse(buf).map_err(|e| ClientError::Upgrade(format!("bad response: {e}")))?;
        if let httparse::Status::Complete(len) = status {
            let code = resp.code.unwrap_or(0);
            if code != 101 {
                return Err(ClientError::Upgrade(format!("HTTP {code} {}", resp.reason.unwrap_or(""))));
            }
            let get = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
            };
            if transport == Transport::WebSocket && get("Sec-WebSocket-Accept") != Some(ws::accept_key(ws_key)) {
                return Err(ClientError::Upgrade("bad Sec-WebSocket-Accept".into()));
            }
            let announced = get("Derp-Public-Key").and_then(|h| PublicKey::from_hex(&h).ok());
            buf.advance(len);
            return Ok(announced);
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(ClientError::Upgrade("response head too large".into()));
        }
        buf.reserve(1024);
        if io.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}
