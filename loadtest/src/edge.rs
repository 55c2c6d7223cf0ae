//! Edge scenarios: visitors hitting a URL over HTTPS (or plain HTTP, for a direct baseline).
//!
//! `connections` TLS connections are opened, HTTP/1.1 with keep-alive or HTTP/2 (ALPN), each
//! carrying `streams` workers (one request in flight each; HTTP/1.1 allows one per
//! connection). Workers send a GET, or a POST of `body_size` bytes streamed in 64 KiB chunks, and
//! read the whole answer.
//! - **closed** loop (no `rate`): each worker sends its next request as soon as the last one is
//!   answered: the most the target sustains;
//! - **paced** (`rate` requests/s over all workers): requests are scheduled on a fixed timetable
//!   and latency is measured from the scheduled time, so a stall shows up in the latency instead
//!   of quietly lowering the offered load.
//!
//! Every answer is counted by status; failures by kind (connect, tls, status_5xx, io, ...).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use warren_common::url::RelayUrl;

use crate::dial::dial;
use crate::report::{histogram, lock, Latency, PROGRESS};

/// Largest chunk a POST body is written in.
const CHUNK: usize = 64 << 10;

/// One edge scenario.
#[derive(Debug, Clone)]
pub struct EdgeScenario {
    /// `https://host[:port]/path` (or `http://` for a plain baseline).
    pub url: String,
    /// Dial this address instead of resolving the URL's host (which still names TLS and Host).
    pub connect_addr: Option<SocketAddr>,
    /// Extra CA to trust (an edge's dev CA).
    pub ca: Option<PathBuf>,
    /// Connections.
    pub connections: usize,
    /// Workers per connection (HTTP/2 only; HTTP/1.1 uses 1).
    pub streams: usize,
    /// HTTP/2 instead of HTTP/1.1.
    pub http2: bool,
    /// Requests per second over all workers; `None` for a closed loop.
    pub rate: Option<f64>,
    /// POST body size; 0 sends GETs.
    pub body_size: usize,
    /// Sending time.
    pub duration: Duration,
    /// Stop after this many requests per worker even before `duration` (0 = no limit).
    pub max_requests_per_worker: u64,
}

/// The outcome of one edge scenario.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    /// The URL.
    pub url: String,
    /// "closed" or "paced".
    pub mode: String,
    /// "h1" or "h2".
    pub protocol: String,
    /// Connections.
    pub connections: usize,
    /// Workers over all connections.
    pub workers: usize,
    /// POST body size (0: GET).
    pub body_size: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Requests answered with 2xx or 3xx.
    pub ok: u64,
    /// Requests that failed, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Answered requests per second (any status).
    pub requests_per_second: f64,
    /// Latency of the answered requests (to the end of the response body).
    pub latency: Latency,
}

impl std::fmt::Display for EdgeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "edge {} {} | {} conns, {} workers, body {} B | {:.1} s | {}",
            self.mode, self.protocol, self.connections, self.workers, self.body_size, self.seconds, self.url
        )?;
        writeln!(f, "  answered     {:>12.0} req/s   ok {}", self.requests_per_second, self.ok)?;
        if !self.errors.is_empty() {
            writeln!(f, "  errors       {:?}", self.errors)?;
        }
        let l = &self.latency;
        write!(
            f,
            "  latency us   p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        )
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    answered: u64,
    errors: BTreeMap<String, u64>,
    latency: Option<hdrhistogram::Histogram<u64>>,
}

impl Tally {
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
}

enum Sender {
    H1(http1::SendRequest<Filler>),
    H2(http2::SendRequest<Filler>),
}

/// Runs the scenario.
///
/// # Errors
/// A bad URL or CA file; failures during the run are counted, not returned.
pub async fn run(s: &EdgeScenario) -> anyhow::Result<EdgeReport> {
    let url = RelayUrl::parse(&s.url)?;
    // HTTP/2 is negotiated with ALPN; a plain http:// URL (a direct baseline) speaks HTTP/1.1.
    let s = &EdgeScenario { http2: s.http2 && url.tls, ..s.clone() };
    let tls = if url.tls {
        let mut cfg = (*warren_common::tls::client_config(s.ca.as_deref())?).clone();
        cfg.alpn_protocols = vec![if s.http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    } else {
        None
    };
    let streams = if s.http2 { s.streams.max(1) } else { 1 };
    let workers = s.connections * streams;
    let tally = Arc::new(Mutex::new(Tally { latency: Some(histogram()), ..Default::default() }));
    let chunk = Bytes::from(vec![b'w'; CHUNK]);
    let start = Instant::now();
    let deadline = start + s.duration;
    let interval = s.rate.map(|r| Duration::from_secs_f64(workers as f64 / r.max(1e-3)));
    let mut tasks = Vec::new();
    for c in 0..s.connections {
        let sender = match connect(s, &url, tls.as_ref()).await {
            Ok(x) => x,
            Err(kind) => {
                lock(&tally).error(kind);
                continue;
            }
        };
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        for k in 0..streams {
            let w = Worker {
                scenario: s.clone(),
                tls: tls.clone(),
                sender: sender.clone(),
                url: url.clone(),
                body_size: s.body_size,
                chunk: chunk.clone(),
                tally: tally.clone(),
                deadline,
                max: s.max_requests_per_worker,
                // Spread the workers' timetables evenly over one interval.
                schedule: interval.map(|i| (start + i.mul_f64((c * streams + k) as f64 / workers as f64), i)),
            };
            tasks.push(tokio::spawn(w.run()));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut t = lock(&tally);
    let latency = t.latency.take().map(|h| Latency::from_ns(&h)).unwrap_or_default();
    Ok(EdgeReport {
        url: s.url.clone(),
        mode: if s.rate.is_some() { "paced" } else { "closed" }.into(),
        protocol: if s.http2 { "h2" } else { "h1" }.into(),
        connections: s.connections,
        workers,
        body_size: s.body_size,
        seconds,
        ok: t.ok,
        errors: std::mem::take(&mut t.errors),
        requests_per_second: t.answered as f64 / seconds.max(1e-9),
        latency,
    })
}

async fn connect(
    s: &EdgeScenario,
    url: &RelayUrl,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Sender, &'static str> {
    let io = dial(url, s.connect_addr, tls).await?;
    handshake(TokioIo::new(io), s.http2).await
}

async fn handshake<I>(io: I, h2: bool) -> Result<Sender, &'static str>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.map_err(|_| "handshake")?;
        tokio::spawn(conn);
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await.map_err(|_| "handshake")?;
        tokio::spawn(conn);
        Ok(Sender::H1(send))
    }
}

struct Worker {
    scenario: EdgeScenario,
    tls: Option<tokio_rustls::TlsConnector>,
    sender: Arc<tokio::sync::Mutex<Sender>>,
    url: RelayUrl,
    body_size: usize,
    chunk: Bytes,
    tally: Arc<Mutex<Tally>>,
    deadline: Instant,
    max: u64,
    schedule: Option<(Instant, Duration)>,
}

impl Worker {
    async fn run(self) {
        let mut n = 0u64;
        let mut next = self.schedule.map(|(first, _)| first);
        while Instant::now() < self.deadline && (self.max == 0 || n < self.max) {
            let began = match (next, self.schedule) {
                (Some(at), Some((_, every))) => {
                    tokio::time::sleep_until(at.into()).await;
                    next = Some(at + every);
                    at
                }
                _ => Instant::now(),
            };
            n += 1;
            PROGRESS.sent(1);
            match self.one().await {
                Ok(status) => {
                    let elapsed = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let mut t = lock(&self.tally);
                    t.answered += 1;
                    if status < 400 {
                        t.ok += 1;
                        PROGRESS.done(1);
                    } else {
                        t.error(format!("status_{status}"));
                        PROGRESS.failed(1);
                    }
                    if let Some(h) = t.latency.as_mut() {
                        let _ = h.record(elapsed.max(1));
                    }
                }
                Err(kind) => {
                    lock(&self.tally).error(kind);
                    PROGRESS.failed(1);
                    // The connection broke (or the server closed it): dial a new one, as a
                    // browser would, and go on.
                    match connect(&self.scenario, &self.url, self.tls.as_ref()).await {
                        Ok(fresh) => *self.sender.lock().await = fresh,
                        Err(kind) => {
                            lock(&self.tally).error(kind);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }
    }

    async fn one(&self) -> Result<u16, &'static str> {
        let method = if self.body_size == 0 { "GET" } else { "POST" };
        let req = http::Request::builder()
            .method(method)
            .uri(&self.url.path)
            .header(http::header::HOST, self.url.authority())
            .body(Filler { left: self.body_size, chunk: self.chunk.clone() })
            .map_err(|_| "request")?;
        let resp = {
            let mut s = self.sender.lock().await;
            match &mut *s {
                Sender::H1(h) => {
                    h.ready().await.map_err(|_| "io")?;
                    h.send_request(req)
                }
                Sender::H2(h) => {
                    let mut h = h.clone();
                    drop(s);
                    h.ready().await.map_err(|_| "io")?;
                    return finish(h.send_request(req).await).await;
                }
            }
        };
        finish(resp.await).await
    }
}

async fn finish(resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>) -> Result<u16, &'static str> {
    let resp = resp.map_err(|_| "io")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|_| "body")?;
    }
    Ok(status)
}

/// A request body of `left` bytes, produced in chunks of one shared buffer (never held whole).
struct Filler {
    left: usize,
    chunk: Bytes,
}

impl hyper::body::Body for Filler {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn filler_produces_exactly_its_size_in_bounded_chunks() {
        let chunk = Bytes::from(vec![b'w'; CHUNK]);
        for size in [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let mut body = Filler { left: size, chunk: chunk.clone() };
            let mut total = 0;
            while let Some(frame) = body.frame().await {
                let data = frame.expect("infallible").into_data().expect("data");
                assert!(!data.is_empty() && data.len() <= CHUNK);
                total += data.len();
            }
            assert_eq!(total, size);
        }
    }
}
