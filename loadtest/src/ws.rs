//! WebSocket echo sessions through an edge: each session upgrades one HTTPS connection and then
//! sends `messages` masked text messages of `size` bytes, one at a time, timing each echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::BytesMut;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_common::url::RelayUrl;
use warren_relay_proto::ws::{self, Role, WsDecoder};

use crate::dial::{dial, Io};
use crate::report::{histogram, lock, Latency, PROGRESS};

/// Largest upgrade response head read.
const MAX_HEAD: usize = 16 << 10;

/// One WebSocket scenario.
#[derive(Debug, Clone)]
pub struct WsScenario {
    /// `https://host[:port]/path` of an echo endpoint (or `http://` for a plain baseline).
    pub url: String,
    /// Dial this address instead of resolving the URL's host.
    pub connect_addr: Option<SocketAddr>,
    /// Extra CA to trust.
    pub ca: Option<PathBuf>,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Messages per session.
    pub messages: u64,
    /// Message size in bytes.
    pub size: usize,
    /// Give up on a session after this long.
    pub timeout: Duration,
}

/// The outcome of a WebSocket scenario.
#[derive(Debug, Clone, Serialize)]
pub struct WsReport {
    /// The URL.
    pub url: String,
    /// Sessions that upgraded.
    pub sessions_ok: u64,
    /// Messages echoed back intact.
    pub echoed: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Seconds spent.
    pub seconds: f64,
    /// Echoed messages per second.
    pub messages_per_second: f64,
    /// Round trip of one message.
    pub latency: Latency,
}

impl std::fmt::Display for WsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "websocket echo | {} sessions ok | {:.1} s | {}", self.sessions_ok, self.seconds, self.url)?;
        writeln!(f, "  echoed       {:>12.0} messages/s   total {}", self.messages_per_second, self.echoed)?;
        if !self.errors.is_empty() {
            writeln!(f, "  errors       {:?}", self.errors)?;
        }
        let l = &self.latency;
        write!(f, "  round trip us p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}", l.p50_us, l.p90_us, l.p99_us, l.max_us)
    }
}

#[derive(Default)]
struct Tally {
    sessions_ok: u64,
    echoed: u64,
    errors: BTreeMap<String, u64>,
    rtt: Option<hdrhistogram::Histogram<u64>>,
}

/// Runs the sessions concurrently.
///
/// # Errors
/// A bad URL or CA file; failures during the run are counted, not returned.
pub async fn run(s: &WsScenario) -> anyhow::Result<WsReport> {
    let url = RelayUrl::parse(&s.url)?;
    let tls = if url.tls {
        Some(tokio_rustls::TlsConnector::from(warren_common::tls::client_config(s.ca.as_deref())?))
    } else {
        None
    };
    let tally = Arc::new(Mutex::new(Tally { rtt: Some(histogram()), ..Default::default() }));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..s.sessions {
        let (s, url, tls, tally) = (s.clone(), url.clone(), tls.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = tokio::time::timeout(s.timeout, session(&s, &url, tls.as_ref(), &tally)).await;
            let kind = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(kind)) => kind,
                Err(_) => "timeout",
            };
            *lock(&tally).errors.entry(kind.into()).or_default() += 1;
            PROGRESS.failed(1);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut t = lock(&tally);
    Ok(WsReport {
        url: s.url.clone(),
        sessions_ok: t.sessions_ok,
        echoed: t.echoed,
        errors: std::mem::take(&mut t.errors),
        seconds,
        messages_per_second: t.echoed as f64 / seconds.max(1e-9),
        latency: t.rtt.take().map(|h| Latency::from_ns(&h)).unwrap_or_default(),
    })
}

/// One session of `messages` echoes of `size` bytes on a connection to `connect_addr`, as a
/// soak visitor makes it.
pub(crate) async fn echo_session(
    url: &RelayUrl,
    connect_addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    messages: u64,
    size: usize,
) -> Result<(), &'static str> {
    let s = WsScenario {
        url: String::new(),
        connect_addr: Some(connect_addr),
        ca: None,
        sessions: 1,
        messages,
        size,
        timeout: Duration::from_secs(10),
    };
    session(&s, url, Some(tls), &Mutex::default()).await
}

async fn session(
    s: &WsScenario,
    url: &RelayUrl,
    tls: Option<&tokio_rustls::TlsConnector>,
    tally: &Mutex<Tally>,
) -> Result<(), &'static str> {
    let mut io = dial(url, s.connect_addr, tls).await?;
    let mut key = [0u8; 16];
    OsRng.fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
        url.path,
        url.authority()
    );
    io.write_all(req.as_bytes()).await.map_err(|_| "io")?;
    let mut input = BytesMut::with_capacity(4096);
    let accept = read_upgrade(&mut io, &mut input).await?;
    if accept != ws::accept_key(&key) {
        return Err("bad_accept");
    }
    lock(tally).sessions_ok += 1;
    let mut decoder = WsDecoder::new(Role::Client);
    let mut data = BytesMut::new();
    let mut out = BytesMut::new();
    let payload = vec![b'e'; s.size];
    for _ in 0..s.messages {
        let mut mask = [0u8; 4];
        OsRng.fill_bytes(&mut mask);
        ws::encode_frame(&mut out, ws::opcode::TEXT, &payload, Some(mask));
        let sent = Instant::now();
        io.write_all(&out.split()).await.map_err(|_| "io")?;
        PROGRESS.sent(1);
        while data.len() < s.size {
            while let Some(_control) = decoder.decode(&mut input, &mut data).map_err(|_| "bad_frame")? {}
            if data.len() >= s.size {
                break;
            }
            input.reserve(16 << 10);
            if io.read_buf(&mut input).await.map_err(|_| "io")? == 0 {
                return Err("closed");
            }
        }
        let echo = data.split_to(s.size);
        if echo[..] != payload[..] {
            return Err("corrupt_echo");
        }
        let rtt = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
        let mut t = lock(tally);
        t.echoed += 1;
        PROGRESS.done(1);
        if let Some(h) = t.rtt.as_mut() {
            let _ = h.record(rtt);
        }
    }
    Ok(())
}

/// Reads the `101` response; returns its `Sec-WebSocket-Accept`. Later bytes stay in `input`.
async fn read_upgrade(io: &mut Box<dyn Io>, input: &mut BytesMut) -> Result<String, &'static str> {
    loop {
        if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = input.split_to(end + 4);
            let text = std::str::from_utf8(&head).map_err(|_| "bad_upgrade")?;
            if !text.starts_with("HTTP/1.1 101") {
                return Err("not_upgraded");
            }
            let accept = text
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim().eq_ignore_ascii_case("sec-websocket-accept").then(|| v.trim().to_owned())
                })
                .ok_or("bad_upgrade")?;
            return Ok(accept);
        }
        if input.len() > MAX_HEAD {
            return Err("bad_upgrade");
        }
        input.reserve(4096);
        if io.read_buf(input).await.map_err(|_| "io")? == 0 {
            return Err("closed");
        }
    }
}
