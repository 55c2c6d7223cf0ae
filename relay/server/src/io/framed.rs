//! A DERP byte stream, framed: read a frame without holding a buffer while idle, flush what a
//! [`Framer`] queued under a deadline.

use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use warren_relay_proto::{DecodeError, Frame, Framer};

/// Read buffer of a quiet connection: what an idle client costs.
const READ_MIN: usize = 512;
/// Read buffer a busy connection grows to.
const READ_MAX: usize = 64 << 10;

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
