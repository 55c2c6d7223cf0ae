//! One tunnel stream, whichever transport carries it: a QUIC stream, or an HTTP/2 stream on the
//! TCP+TLS transport. Both halves offer the few operations the tunnel needs (chunks, exact
//! reads, finish, reset) and tokio's `AsyncRead`/`AsyncWrite`.
//!
//! On HTTP/2 the writer honours the peer's flow-control window: it waits for capacity and
//! never hands h2 more than it may send, so one slow reader stalls only its own stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The sending half of a tunnel stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendStream {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// An HTTP/2 stream of the TCP transport.
    H2(H2Send),
}

/// The receiving half of a tunnel stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecvStream {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// An HTTP/2 stream of the TCP transport.
    H2(H2Recv),
}

impl From<quinn::SendStream> for SendStream {
    fn from(s: quinn::SendStream) -> Self {
        SendStream::Quic(s)
    }
}

impl From<quinn::RecvStream> for RecvStream {
    fn from(s: quinn::RecvStream) -> Self {
        RecvStream::Quic(s)
    }
}

/// Why [`RecvStream::read_exact`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadExactError {
    /// The stream ended after this many of the wanted bytes.
    #[error("stream ended early, after {0} bytes")]
    FinishedEarly(usize),
    /// The stream failed (reset, connection lost).
    #[error("{0}")]
    Read(io::Error),
}

/// The sending half of an HTTP/2 stream.
#[derive(Debug)]
pub struct H2Send {
    inner: h2::SendStream<Bytes>,
    finished: bool,
}

impl H2Send {
    pub(crate) fn new(inner: h2::SendStream<Bytes>) -> Self {
        H2Send { inner, finished: false }
    }

    /// Waits until the peer's window lets at least one byte of `want` go; returns how many.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.finished {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream already finished")));
        }
        self.inner.reserve_capacity(want);
        loop {
            let cap = self.inner.capacity();
            if cap > 0 {
                return Poll::Ready(Ok(cap.min(want)));
            }
            match ready!(self.inner.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by the peer")))
                }
            }
        }
    }
}

/// The receiving half of an HTTP/2 stream: on the edge's side the response head comes first.
#[derive(Debug)]
pub struct H2Recv {
    state: H2State,
    /// What was received and not yet read.
    pending: Bytes,
    /// A failure met while taking extra frames into a read, returned by the next one.
    failed: Option<io::Error>,
}

#[derive(Debug)]
enum H2State {
    /// Waiting for the node to accept the stream (its response head).
    Opening(h2::client::ResponseFuture),
    Open(h2::RecvStream),
    Ended,
}

impl H2Recv {
    pub(crate) fn opening(f: h2::client::ResponseFuture) -> Self {
        H2Recv { state: H2State::Opening(f), pending: Bytes::new(), failed: None }
    }

    pub(crate) fn open(r: h2::RecvStream) -> Self {
        H2Recv { state: H2State::Open(r), pending: Bytes::new(), failed: None }
    }

    /// The next received bytes, at most `max`; `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Option<Bytes>>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(max);
                return Poll::Ready(Ok(Some(self.pending.split_to(n))));
            }
            match &mut self.state {
                H2State::Opening(f) => {
                    let resp = ready!(Pin::new(f).poll(cx)).map_err(h2_io)?;
                    if resp.status() != http::StatusCode::OK {
                        self.state = H2State::Ended;
                        return Poll::Ready(Err(io::Error::other(format!("stream refused: {}", resp.status()))));
                    }
                    self.state = H2State::Open(resp.into_body());
                }
                H2State::Open(r) => match ready!(r.poll_data(cx)) {
                    Some(Ok(data)) => {
                        // The window reopens as the bytes reach the reader, which asked for
                        // them: back-pressure stays with the consumer.
                        let _ = r.flow_control().release_capacity(data.len());
                        self.pending = data;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => {
                        self.state = H2State::Ended;
                        return Poll::Ready(Ok(None));
                    }
                },
                H2State::Ended => return Poll::Ready(Ok(None)),
            }
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() { io::ErrorKind::ConnectionReset } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

impl SendStream {
    /// Writes all of `buf`.
    ///
    /// # Errors
    /// The stream was reset, stopped or its connection lost.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.write_all(buf).await.map_err(io::Error::other),
            SendStream::H2(_) => self.write_chunk(Bytes::copy_from_slice(buf)).await,
        }
    }

    /// Writes `data` without copying it.
    ///
    /// # Errors
    /// As [`SendStream::write_all`].
    pub async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.write_chunk(data).await.map_err(io::Error::other),
            SendStream::H2(s) => {
                while !data.is_empty() {
                    let n = std::future::poll_fn(|cx| s.poll_capacity(cx, data.len())).await?;
                    s.inner.send_data(data.split_to(n), false).map_err(h2_io)?;
                }
                Ok(())
            }
        }
    }

    /// Ends the stream cleanly: the peer reads everything sent, then the end.
    ///
    /// # Errors
    /// The stream was already finished or reset.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(io::Error::other),
            SendStream::H2(s) => {
                if s.finished {
                    return Ok(());
                }
                s.finished = true;
                s.inner.send_data(Bytes::new(), true).map_err(h2_io)
            }
        }
    }

    /// Abandons the stream: the peer sees a reset, not an end.
    pub fn reset(&mut self) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.reset(0u32.into());
            }
            SendStream::H2(s) => {
                s.finished = true;
                s.inner.send_reset(h2::Reason::CANCEL);
            }
        }
    }
}

impl RecvStream {
    /// The next received bytes (at most `max`), without copying; `None` at the end.
    ///
    /// # Errors
    /// The stream was reset or its connection lost.
    pub async fn read_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        match self {
            RecvStream::Quic(r) => r.read_chunk(max, true).await.map(|c| c.map(|c| c.bytes)).map_err(io::Error::other),
            RecvStream::H2(r) => std::future::poll_fn(|cx| r.poll_chunk(cx, max)).await,
        }
    }

    /// Everything received and not yet read, up to `max` bytes, in one buffer; waits for at
    /// least one byte; `None` at the end.
    ///
    /// A QUIC stream hands its bytes over a packet at a time (about 1.2 kB): a reader passing
    /// them on one by one (into a hyper body, a socket) pays its per-chunk costs (a task wake,
    /// a TLS record, a syscall) on every packet. This copies them into one buffer instead,
    /// which costs far less than what it saves.
    ///
    /// # Errors
    /// The stream was reset or its connection lost.
    pub async fn read_available(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        let mut buf = bytes::BytesMut::with_capacity(max);
        let n = tokio::io::AsyncReadExt::read_buf(self, &mut buf).await?;
        Ok((n > 0).then(|| buf.freeze()))
    }

    /// Fills `buf` exactly.
    ///
    /// # Errors
    /// [`ReadExactError::FinishedEarly`] when the stream ends first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        match self {
            RecvStream::Quic(r) => r.read_exact(buf).await.map_err(|e| match e {
                quinn::ReadExactError::FinishedEarly(n) => ReadExactError::FinishedEarly(n),
                quinn::ReadExactError::ReadError(e) => ReadExactError::Read(io::Error::other(e)),
            }),
            RecvStream::H2(r) => {
                let mut filled = 0;
                while filled < buf.len() {
                    let want = buf.len() - filled;
                    match std::future::poll_fn(|cx| r.poll_chunk(cx, want)).await {
                        Ok(Some(c)) => {
                            buf[filled..filled + c.len()].copy_from_slice(&c);
                            filled += c.len();
                        }
                        Ok(None) => return Err(ReadExactError::FinishedEarly(filled)),
                        Err(e) => return Err(ReadExactError::Read(e)),
                    }
                }
                Ok(())
            }
        }
    }

    /// Tells the peer nothing more will be read (QUIC's STOP_SENDING; on HTTP/2 dropping the
    /// stream's halves resets it).
    pub fn stop(&mut self) {
        if let RecvStream::Quic(r) = self {
            let _ = r.stop(0u32.into());
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(r) => Pin::new(r).poll_read(cx, buf),
            RecvStream::H2(r) => {
                if let Some(chunk) = ready!(r.poll_chunk(cx, buf.remaining()))? {
                    buf.put_slice(&chunk);
                }
                // More frames already received join this read (pending is fine: the waker is
                // set for the next one).
                while buf.remaining() > 0 {
                    match r.poll_chunk(cx, buf.remaining()) {
                        Poll::Ready(Ok(Some(chunk))) => buf.put_slice(&chunk),
                        Poll::Ready(Err(e)) => {
                            r.failed = Some(e);
                            break;
                        }
                        Poll::Ready(Ok(None)) | Poll::Pending => break,
                    }
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::other),
            SendStream::H2(s) => {
                if buf.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                let n = ready!(s.poll_capacity(cx, buf.len()))?;
                s.inner.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_flush(cx),
            SendStream::H2(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
            s @ SendStream::H2(_) => Poll::Ready(s.finish()),
        }
    }
}
