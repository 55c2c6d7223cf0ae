//! A bulk origin for transfer benchmarks: plain HTTP/1.1 that can outrun any proxy put in
//! front of it, so the proxy is what a benchmark measures.
//!
//! - `GET /bytes/N` answers N bytes (a fixed pseudo-random pattern, sent from one shared
//!   buffer without copying) with a Content-Length;
//! - any request with a body (`POST`/`PUT`) is drained and answered with the byte count and
//!   the receive rate as text;
//! - a WebSocket upgrade (any path) echoes every message back, until the visitor closes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};

/// Bytes per body frame of a download.
const FRAME: usize = 256 << 10;

/// Serves until the listener fails; every connection in its own task.
///
/// # Errors
/// When `listen` cannot be bound.
pub async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    let pattern = pattern();
    loop {
        let (tcp, _) = l.accept().await?;
        let _ = tcp.set_nodelay(true);
        let pattern = pattern.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, pattern.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .max_buf_size(1 << 20)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// A non-repeating-looking frame: xorshift output, so nothing on the path can compress it.
fn pattern() -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(FRAME);
    while v.len() < FRAME {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

type Answer = http_body_util::Either<Pattern, http_body_util::Full<Bytes>>;

async fn answer(mut req: Request<Incoming>, pattern: Bytes) -> Result<Response<Answer>, Infallible> {
    let upgrade = req.headers().get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        let head = warren_common::ws_echo::upgrade(&mut req);
        return Ok(head.map(|()| http_body_util::Either::Right(http_body_util::Full::new(Bytes::new()))));
    }
    let want = req.uri().path().strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok());
    if let (Some(n), &hyper::Method::GET) = (want, req.method()) {
        let body = Pattern { left: n, pattern };
        let resp = Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-length", n)
            .body(http_body_util::Either::Left(body));
        return Ok(resp.unwrap_or_else(|_| text(500, "response".into())));
    }
    let started = std::time::Instant::now();
    let mut body = req.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return Ok(text(400, format!("body failed after {got} bytes: {e}\n"))),
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(text(200, format!("received {got} bytes at {:.1} MB/s\n", got as f64 / secs / 1e6)))
}

fn text(status: u16, s: String) -> Response<Answer> {
    let mut r = Response::new(http_body_util::Either::Right(http_body_util::Full::new(Bytes::from(s))));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// `left` bytes of the pattern, a frame at a time.
#[derive(Debug)]
struct Pattern {
    left: u64,
    pattern: Bytes,
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.pattern.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.pattern.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}
