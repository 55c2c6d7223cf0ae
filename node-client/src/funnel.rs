//! The funnel agent: publishes a local HTTP service through an edge.
//!
//! The agent keeps one QUIC connection to each configured edge (several edges of a cluster
//! behind one DNS name: any of them can then answer for the node, and losing one loses
//! nothing), registers the node's name with a token on each, and serves every stream an edge
//! opens as one request to the local target, through one pooled HTTP client. Bodies stream both ways; `101 Switching Protocols` (WebSocket) becomes a raw
//! two-way copy. The connection is re-established with jittered backoff; the edge replaces the
//! stale registration of a reconnecting node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_common::limits::Backoff;
use warren_tunnel::{
    is_hop_by_hop, quic_client_config, read_message, respond_text, send_body, write_message, QuicBody,
};
use warren_tunnel_proto::{Message, ResponseHead, VERSION};

type Body = BoxBody<Bytes, std::io::Error>;
type HttpClient = Client<HttpConnector, Body>;

/// What to publish and where.
#[derive(Debug, Clone)]
pub struct FunnelConfig {
    /// The edges' tunnel addresses, `host:port` (UDP); the node keeps a tunnel to each.
    pub edges: Vec<String>,
    /// TLS name of the edges (default: the host part of each address).
    pub edge_name: Option<String>,
    /// Extra CA to trust for the edge (e.g. its dev CA).
    pub ca_file: Option<PathBuf>,
    /// Operator-issued token.
    pub token: String,
    /// Node name: the public host is `<name>.<funnel domain>`.
    pub name: String,
    /// Local target, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Public ports to serve on.
    pub ports: Vec<u16>,
}

/// One edge's tunnel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeLink {
    /// The edge's tunnel address.
    pub edge: String,
    /// Registered there now.
    pub connected: bool,
    /// The last failure on this edge, if any.
    pub last_error: Option<String>,
}

/// The agent's state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FunnelStatus {
    /// Registered on at least one edge.
    pub connected: bool,
    /// Each edge's tunnel.
    pub edges: Vec<EdgeLink>,
    /// Public URLs, once registered.
    pub urls: Vec<String>,
    /// The local target.
    pub target: String,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Requests served.
    pub requests: u64,
}

/// Parses `8080`, `127.0.0.1:8080` or `http://host:port[/base]` into a target base URL.
///
/// # Errors
/// A message for anything else (https targets are not supported yet).
pub fn parse_target(s: &str) -> Result<String, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(format!("http://127.0.0.1:{port}"));
    }
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(format!("http://{s}"));
    }
    if s.starts_with("https://") {
        return Err("https:// targets are not supported yet; use an http:// target".into());
    }
    let uri: Uri = s.parse().map_err(|_| format!("{s:?} is not a port or http:// URL"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!("{s:?} is not a port or http:// URL"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// A running funnel agent; dropping it stops it.
#[derive(Debug)]
pub struct Funnel {
    status: watch::Receiver<FunnelStatus>,
    cancel: CancellationToken,
    /// The edge links and the requests they serve.
    tasks: TaskTracker,
}

impl Drop for Funnel {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Funnel {
    /// Starts publishing.
    pub fn start(cfg: FunnelConfig) -> Funnel {
        let edges = cfg.edges.iter().map(|e| EdgeLink { edge: e.clone(), ..Default::default() }).collect();
        let (tx, status) = watch::channel(FunnelStatus { target: cfg.target.clone(), edges, ..Default::default() });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(run(cfg, tx, cancel.clone(), tasks.clone()));
        Funnel { status, cancel, tasks }
    }

    /// The current state.
    pub fn status(&self) -> FunnelStatus {
        self.status.borrow().clone()
    }

    /// Waits until registered (returns the public URLs) or `limit` passes (returns the last
    /// error).
    ///
    /// # Errors
    /// The last error, or "timed out".
    pub async fn wait_registered(&self, limit: Duration) -> Result<Vec<String>, String> {
        let mut rx = self.status.clone();
        let urls =
            tokio::time::timeout(limit, async { rx.wait_for(|s| s.connected).await.map(|s| s.urls.clone()) }).await;
        match urls {
            Ok(Ok(urls)) => Ok(urls),
            _ => Err(self.status.borrow().last_error.clone().unwrap_or_else(|| "timed out".into())),
        }
    }

    /// Stops publishing (without waiting; see [`Funnel::shutdown`]).
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Stops publishing and waits until the edge links have closed. Requests still being
    /// answered are given up to `grace` to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }
}

async fn run(cfg: FunnelConfig, status: watch::Sender<FunnelStatus>, cancel: CancellationToken, tasks: TaskTracker) {
    if cfg.edges.is_empty() {
        status.send_modify(|s| s.last_error = Some("no edge configured".into()));
        return;
    }
    let endpoint = match client_endpoint(&cfg) {
        Ok(e) => e,
        Err(e) => {
            status.send_modify(|s| s.last_error = Some(e.to_string()));
            return;
        }
    };
    let http: HttpClient =
        Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build_http();
    let requests = Arc::new(AtomicU64::new(0));
    let cfg = Arc::new(cfg);
    let links = tokio_util::task::TaskTracker::new();
    for i in 0..cfg.edges.len() {
        let link =
            Link { index: i, endpoint: endpoint.clone(), cfg: cfg.clone(), http: http.clone(), tasks: tasks.clone() };
        links.spawn(link.run(status.clone(), requests.clone(), cancel.clone()));
    }
    links.close();
    links.wait().await;
    endpoint.close(0u32.into(), b"funnel off");
}

/// Delay between attempts to reach an edge: 200 ms doubling to 30 s, jittered.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));

/// The tunnel to one edge, re-established with jittered backoff.
struct Link {
    index: usize,
    endpoint: quinn::Endpoint,
    cfg: Arc<FunnelConfig>,
    http: HttpClient,
    /// Where each request's task runs.
    tasks: TaskTracker,
}

impl Link {
    fn update(&self, status: &watch::Sender<FunnelStatus>, f: impl FnOnce(&mut FunnelStatus, &mut EdgeLink)) {
        status.send_modify(|s| {
            let mut link = std::mem::take(&mut s.edges[self.index]);
            f(s, &mut link);
            s.edges[self.index] = link;
            s.connected = s.edges.iter().any(|e| e.connected);
        });
    }

    async fn run(self, status: watch::Sender<FunnelStatus>, requests: Arc<AtomicU64>, cancel: CancellationToken) {
        let edge = &self.cfg.edges[self.index];
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.session(&status, &requests) => r,
            };
            let err = outcome.err().map_or_else(|| "connection to the edge closed".to_owned(), |e| e.to_string());
            warn!(%edge, error = %err, "funnel disconnected from an edge");
            self.update(&status, |s, link| {
                link.connected = false;
                link.last_error = Some(err.clone());
                s.last_error = Some(err);
            });
            failures += 1;
            let delay = BACKOFF.delay(failures);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(
        &self,
        status: &watch::Sender<FunnelStatus>,
        requests: &Arc<AtomicU64>,
    ) -> Result<(), FunnelError> {
        let cfg = &self.cfg;
        let edge = &cfg.edges[self.index];
        let addr = tokio::net::lookup_host(edge)
            .await
            .map_err(|source| FunnelError::Resolve { edge: edge.clone(), source })?
            .next()
            .ok_or_else(|| FunnelError::NoAddress(edge.clone()))?;
        let host = edge.rsplit_once(':').map_or(edge.as_str(), |(h, _)| h).trim_matches(['[', ']']);
        let server_name = cfg.edge_name.clone().unwrap_or_else(|| host.to_owned());
        let connecting = self.endpoint.connect(addr, &server_name)?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| FunnelError::Timeout)?
            .map_err(FunnelError::Connection)?;
        let (mut ctl_send, mut ctl_recv) = conn.open_bi().await.map_err(FunnelError::Connection)?;
        let hello = Message::Hello {
            version: VERSION,
            name: cfg.name.clone(),
            token: cfg.token.clone(),
            ports: cfg.ports.clone(),
        };
        write_message(&mut ctl_send, &hello).await.map_err(FunnelError::Hello)?;
        match read_message(&mut ctl_recv).await.map_err(FunnelError::NoWelcome)? {
            Message::Welcome { urls } => {
                info!(%edge, urls = ?urls, target = %cfg.target, "funnel registered");
                self.update(status, |s, link| {
                    link.connected = true;
                    link.last_error = None;
                    s.urls = urls;
                    s.last_error = None;
                });
            }
            Message::Refused { reason } => return Err(FunnelError::Refused(reason)),
            _ => return Err(FunnelError::UnexpectedAnswer),
        }
        loop {
            let (send, recv) = conn.accept_bi().await.map_err(FunnelError::Closed)?;
            let (http, requests, status) = (self.http.clone(), requests.clone(), status.clone());
            let cfg = self.cfg.clone();
            self.tasks.spawn(async move {
                let n = requests.fetch_add(1, Ordering::Relaxed) + 1;
                status.send_modify(|s| s.requests = n);
                serve_stream(send, recv, &cfg.target, &http).await;
            });
        }
    }
}

/// Why a tunnel to an edge could not be set up or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FunnelError {
    /// The edge's name did not resolve.
    #[error("cannot resolve {edge}: {source}")]
    Resolve {
        /// The edge as configured.
        edge: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The edge's name resolved to no address.
    #[error("{0} has no address")]
    NoAddress(String),
    /// The CA file or TLS settings are unusable.
    #[error("QUIC client config: {0}")]
    Config(#[from] warren_tunnel::QuicConfigError),
    /// No UDP socket for QUIC.
    #[error("cannot bind UDP: {0}")]
    Bind(std::io::Error),
    /// The QUIC dial could not start (e.g. an invalid server name).
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The edge did not complete the QUIC handshake in time.
    #[error("edge did not answer within 10 s")]
    Timeout,
    /// The QUIC connection failed (handshake refused, certificate, lost).
    #[error("QUIC connection: {0}")]
    Connection(quinn::ConnectionError),
    /// The Hello could not be sent.
    #[error("hello: {0}")]
    Hello(std::io::Error),
    /// No Welcome came back.
    #[error("no welcome: {0}")]
    NoWelcome(warren_tunnel::ReadMessageError),
    /// The edge refused the registration.
    #[error("edge refused: {0}")]
    Refused(String),
    /// The edge answered with another message.
    #[error("unexpected answer from the edge")]
    UnexpectedAnswer,
    /// The registered tunnel closed.
    #[error("tunnel closed: {0}")]
    Closed(quinn::ConnectionError),
}

fn client_endpoint(cfg: &FunnelConfig) -> Result<quinn::Endpoint, FunnelError> {
    // The edge opens one stream per request; the node opens only its control stream.
    let client = quic_client_config(cfg.ca_file.as_deref(), 4096)?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))
        .or_else(|_| quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))))
        .map_err(FunnelError::Bind)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
async fn respond_error(send: quinn::SendStream, status: StatusCode, msg: String) {
    respond_text(send, status.as_u16(), &msg).await;
}

/// Serves one request stream from the edge.
async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, target: &str, http: &HttpClient) {
    let head = match read_message(&mut recv).await {
        Ok(Message::Request(h)) => h,
        Ok(_) | Err(_) => return respond_error(send, StatusCode::BAD_REQUEST, "bad tunnel request\n".into()).await,
    };
    let Ok(uri) = format!("{target}{}", head.uri).parse::<Uri>() else {
        return respond_error(send, StatusCode::BAD_REQUEST, "bad request URI\n".into()).await;
    };
    let mut builder = Request::builder().method(head.method.as_str()).uri(uri);
    for (n, v) in &head.headers {
        if is_hop_by_hop(n, head.upgrade) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
            builder = builder.header(n, v);
        }
    }
    let (body, recv) = if head.upgrade {
        (Empty::new().map_err(|never: std::convert::Infallible| match never {}).boxed(), Some(recv))
    } else {
        (QuicBody::new(recv).boxed(), None)
    };
    let Ok(req) = builder.body(body) else {
        return respond_error(send, StatusCode::BAD_REQUEST, "bad request head\n".into()).await;
    };
    let resp = match http.request(req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(%target, error = %e, "target unavailable");
            let msg = format!("Bad gateway: the node could not reach its local service at {target}.\n");
            return respond_error(send, StatusCode::BAD_GATEWAY, msg).await;
        }
    };
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS && head.upgrade;
    let headers = resp
        .headers()
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n.as_str(), switching))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let out = ResponseHead { status: resp.status().as_u16(), headers };
    if write_message(&mut send, &Message::Response(out)).await.is_err() {
        return;
    }
    match (switching, recv) {
        (true, Some(recv)) => {
            let Ok(upgraded) = hyper::upgrade::on(resp).await else { return };
            let mut origin = TokioIo::new(upgraded);
            let mut edge = tokio::io::join(recv, send);
            let _ = tokio::io::copy_bidirectional(&mut origin, &mut edge).await;
        }
        _ => {
            let body = resp.into_body().map_err(std::io::Error::other);
            if let Err(e) = send_body(body, &mut send).await {
                debug!(error = %e, "response body not fully sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("8080").as_deref(), Ok("http://127.0.0.1:8080"));
        assert_eq!(parse_target("10.0.0.5:80").as_deref(), Ok("http://10.0.0.5:80"));
        assert_eq!(parse_target("http://localhost:3000/").as_deref(), Ok("http://localhost:3000"));
        assert!(parse_target("https://x").is_err());
        assert!(parse_target("ftp://x").is_err());
        assert!(parse_target("not a target").is_err());
    }
}
