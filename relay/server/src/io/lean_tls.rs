//! A server-side TLS stream that holds no buffers while its connection is idle.
//!
//! rustls' buffered connection keeps a 4 KiB receive buffer for its whole life, which is most of
//! what an idle relay client costs. This stream drives rustls' unbuffered API instead and owns
//! the buffers itself:
//!
//! - received TLS bytes are read only once the socket is readable, into a buffer allocated for
//!   that read and freed as soon as every complete record in it has been processed;
//! - decrypted bytes the reader has not taken yet, and encrypted bytes not yet written, live in
//!   buffers freed when drained.
//!
//! An idle connection therefore holds the rustls connection state (keys, sequence numbers) and
//! the socket, nothing more. Every buffer is bounded: received bytes by the TLS record limit
//! (rustls refuses larger records), plaintext by what one read of the socket can decrypt to,
//! outgoing bytes by [`MAX_OUTGOING`] before a write waits for the socket.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room made for one read of the socket: a full TLS record and then some.
const READ_CHUNK: usize = 17 << 10;
/// Most received bytes kept: a record that does not fit is not a TLS record.
const MAX_INCOMING: usize = 64 << 10;
/// Encrypted bytes queued before a write waits for the socket.
const MAX_OUTGOING: usize = 256 << 10;
/// Plaintext encrypted per write call.
const MAX_WRITE: usize = 64 << 10;

/// What one round of record processing led to.
enum Step {
    /// Something changed (plaintext, outgoing bytes, state): look again.
    Again,
    /// The handshake needs more bytes from the peer.
    NeedRead,
    /// Handshake done, nothing pending: reads wait for the socket; writes may proceed.
    Idle,
    /// `n` bytes of the caller's data were encrypted.
    Wrote(usize),
    /// Both sides have closed.
    Closed,
}

/// What a round of processing may do once the connection is writable.
#[derive(Clone, Copy)]
enum Action<'a> {
    None,
    Write(&'a [u8]),
    CloseNotify,
}

/// A TLS server stream over TCP; see the module documentation.
pub(crate) struct LeanTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet processed (no allocation while empty).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read, from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes not yet written, from `out_pos`.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify (or closed TCP): reads end once `plain` is drained.
    read_closed: bool,
    close_sent: bool,
}

impl std::fmt::Debug for LeanTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanTls").field("buffered", &self.buffered_capacity()).finish_non_exhaustive()
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Why [`append`]'s filler did not fit.
enum Fill {
    /// It needs this much room.
    Need(usize),
    /// It failed.
    Failed(io::Error),
}

impl From<EncryptError> for Fill {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(need) => Fill::Need(need.required_size),
            e => Fill::Failed(invalid(e)),
        }
    }
}

/// Appends to `out` what `fill` writes into the room it is given: `room` bytes at first, then as
/// much as it asks for. On failure `out` is left as it was.
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, Fill>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Fill::Need(more)) if more > room => room = more,
            Err(Fill::Need(_)) => {
                out.truncate(start);
                return Err(invalid("TLS record does not fit the room it asked for"));
            }
            Err(Fill::Failed(e)) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
}

/// Performs the server handshake on `tcp`.
///
/// # Errors
/// Socket errors, TLS errors (as `InvalidData`), or the peer closing mid-handshake.
pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<LeanTls> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut s = LeanTls {
        tcp,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        out_pos: 0,
        read_closed: false,
        close_sent: false,
    };
    poll_fn(|cx| s.poll_handshake(cx)).await?;
    Ok(s)
}

impl LeanTls {
    /// Bytes of buffer capacity held now (zero for an idle connection).
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// One call into rustls, and what it asked for handled. Decrypted bytes go straight into
    /// `out` while it has room, the rest into `plain`.
    fn process(&mut self, action: Action<'_>, mut out: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        let status = self.conn.process_tls_records(&mut self.incoming);
        let mut discard = status.discard;
        let step = match status.state.map_err(invalid)? {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    let mut payload = record.payload;
                    if let Some(out) = out.as_deref_mut() {
                        let n = out.remaining().min(payload.len());
                        out.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    self.plain.extend_from_slice(payload);
                }
                Step::Again
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                append(&mut self.outgoing, 1024, |room| {
                    encode.encode(room).map_err(|e| match e {
                        EncodeError::InsufficientSize(need) => Fill::Need(need.required_size),
                        e => Fill::Failed(invalid(e)),
                    })
                })?;
                Step::Again
            }
            // The encoded bytes are queued in `outgoing`, which is written in order before
            // anything encoded later: for rustls they are as good as sent.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                Step::Again
            }
            ConnectionState::BlockedHandshake => Step::NeedRead,
            ConnectionState::PeerClosed => {
                self.read_closed = true;
                Step::Again
            }
            ConnectionState::Closed => {
                self.read_closed = true;
                Step::Closed
            }
            ConnectionState::WriteTraffic(mut traffic) => match action {
                Action::None => Step::Idle,
                Action::Write(data) => {
                    let data = &data[..data.len().min(MAX_WRITE)];
                    // Records of at most 16 KiB, each with a header, tag and padding.
                    let room = data.len() + (data.len() / 16_384 + 1) * 64;
                    append(&mut self.outgoing, room, |room| traffic.encrypt(data, room).map_err(Fill::from))?;
                    Step::Wrote(data.len())
                }
                Action::CloseNotify => {
                    append(&mut self.outgoing, 64, |room| traffic.queue_close_notify(room).map_err(Fill::from))?;
                    self.close_sent = true;
                    Step::Wrote(0)
                }
            },
            // 0-RTT is not enabled in the relay's configuration.
            _ => return Err(invalid("unexpected TLS state")),
        };
        if discard > 0 {
            self.incoming.drain(..discard);
        }
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        Ok(step)
    }

    /// Reads what the socket has into `incoming`; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if self.incoming.len() >= MAX_INCOMING {
                return Poll::Ready(Err(invalid("TLS record too large")));
            }
            // Wait for readiness before allocating, so that a quiet connection holds nothing.
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming.reserve(READ_CHUNK);
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes every queued encrypted byte to the socket, then frees the buffer.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.process(Action::None, None)? {
                Step::Again | Step::Wrote(_) => {}
                Step::Idle => return self.poll_flush_out(cx),
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Step::NeedRead => {
                    // Our flight must reach the peer before its answer can come.
                    ready!(self.poll_flush_out(cx))?;
                    if self.read_closed || ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }
}

impl super::framed::ReadReady for LeanTls {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Held bytes (plaintext, or records not yet processed) or an ended stream: a read
        // returns at once or finds out what the socket needs.
        if self.plain_pos < self.plain.len() || !self.incoming.is_empty() || self.read_closed {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }
}

impl AsyncRead for LeanTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let step = this.process(Action::None, Some(buf))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::Again | Step::Wrote(_) => {}
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedRead | Step::Idle => {
                    // Answers rustls queued on its own (session tickets, key updates) go out
                    // as the socket allows; reading does not wait for them.
                    if this.out_pos < this.outgoing.len() {
                        if let Poll::Ready(r) = this.poll_flush_out(cx) {
                            r?;
                        }
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        if !this.incoming.is_empty() {
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        // TCP closed without close_notify: the end of the stream all the same.
                        this.read_closed = true;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for LeanTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.out_pos >= MAX_OUTGOING {
            ready!(this.poll_flush_out(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match this.process(Action::Write(data), None)? {
                Step::Wrote(n) => {
                    // Sent at once as far as the socket takes it, as a buffered TLS stream
                    // does, so a write_all not followed by a flush is not lost; the rest goes
                    // with the next write or flush.
                    if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(n));
                }
                Step::Again | Step::Idle => {}
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Step::NeedRead => return Poll::Ready(Err(invalid("write before the TLS handshake completed"))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_sent {
            match this.process(Action::CloseNotify, None) {
                Ok(Step::Wrote(_)) => {}
                Ok(Step::Again | Step::Idle) => continue,
                // Nothing more can be said on this connection: just close TCP.
                Ok(Step::Closed | Step::NeedRead) | Err(_) => this.close_sent = true,
            }
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "lean_tls_tests.rs"]
mod tests;
