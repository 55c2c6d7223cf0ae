//! The funnel agent: publishes the node's services through one or more edges.
//!
//! The agent keeps one QUIC connection to each configured edge (several edges of a cluster
//! behind one DNS name: any of them can then answer for the node, and losing one loses
//! nothing), registers the node's name and public ports with a token on each, and serves every
//! stream an edge opens as one request to the service whose mount matches
//! ([`ServiceTable::route`]). Bodies stream both ways; `101 Switching Protocols` (WebSocket)
//! becomes a raw two-way copy. The connection is re-established with jittered backoff; the
//! edge replaces the stale registration of a reconnecting node.
//!
//! ```text
//! control stream  node -> edge  Hello { ports }      edge -> node  Welcome { urls } | Refused
//!                 node -> edge  Access { generation, rules }   edge -> node  AccessSet
//!                 services change, ports differ:  Hello again on the same stream, same answers
//!                 access rules change:            Access again (before any new Hello)
//! request stream  edge -> node  Request head + body  node -> edge  Response head + body
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_common::limits::Backoff;
use warren_tunnel::{
    is_hop_by_hop, quic_client_config, read_message, respond_text, send_body, send_framed_body, te_is_trailers,
    write_message, KeepAlive, Link, LinkError, RecvStream, SendStream, StreamBody, TcpLink, Transport,
};
use warren_tunnel_proto::{Message, RequestHead, ResponseHead, VERSION};

use crate::net::{TransportMode, TransportSettings};
use crate::services::files::text;
use crate::services::origin::{no_mount, Body, ServiceTable};
use crate::services::{ServiceKind, ServiceSpec};

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
    /// The services published at start ([`Funnel::set_services`] replaces them).
    pub services: Vec<ServiceSpec>,
    /// Transport, proxy and keep-alive settings of the tunnels.
    pub transport: TransportSettings,
    /// Custom domains to be reached at too (each edge serves one once its DNS proves it).
    pub domains: Vec<String>,
}

/// One edge's tunnel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeLink {
    /// The edge's tunnel address.
    pub edge: String,
    /// Registered there now.
    pub connected: bool,
    /// `quic` or `tcp`, while connected.
    pub transport: Option<String>,
    /// The HTTP proxy a TCP tunnel goes through, if any.
    pub proxy: Option<String>,
    /// The tunnel's round-trip time (QUIC's estimate; on TCP the last keep-alive's), while
    /// connected.
    pub rtt_ms: Option<f64>,
    /// The last failure on this edge, if any.
    pub last_error: Option<String>,
    /// The generation of the node's access rules this edge enforces, while connected.
    pub access_generation: Option<u32>,
}

/// One published service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Its name (`<port><path>` unless named).
    pub id: String,
    /// `http`, `tcp` or `tls`.
    pub kind: ServiceKind,
    /// Public port.
    pub port: u16,
    /// Mount path.
    pub path: String,
    /// The target, as parsed.
    pub target: String,
    /// Requests answered.
    pub requests: u64,
    /// Who may reach it, when restricted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
}

/// A service that is configured but not served, and why.
#[derive(Debug, Clone, Serialize)]
pub struct BrokenService {
    /// Its name.
    pub id: String,
    /// Why it could not be opened.
    pub error: String,
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
    /// TCP and TLS-passthrough URLs the edges granted (`tcp://host:port`, `tls://host:port`).
    pub raw_urls: Vec<String>,
    /// TCP and TLS-passthrough ports an edge refused, with its reason.
    pub refused: Vec<String>,
    /// Answers to Publish received so far (to tell a fresh answer from an old one).
    pub publishes: u64,
    /// The services served.
    pub services: Vec<ServiceStatus>,
    /// Services configured but not served.
    pub broken: Vec<BrokenService>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Requests served.
    pub requests: u64,
    /// Access rules an edge refused (their services are closed there), with its reason.
    pub access_refused: Vec<String>,
    /// Custom domains an edge serves.
    pub domains: Vec<String>,
    /// Custom domains not served yet, with the DNS record that would prove them.
    pub domains_pending: Vec<String>,
}

/// One request the funnel answered, for `warren funnel log`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLog {
    /// When it started, in seconds since the Unix epoch.
    pub time: f64,
    /// The service that answered ("-" when no mount matched).
    pub service: String,
    /// Method.
    pub method: String,
    /// Public path and query.
    pub path: String,
    /// Status sent.
    pub status: u16,
    /// Until the response ended, in milliseconds.
    pub duration_ms: f64,
    /// The visitor's address.
    pub visitor: String,
    /// The public port.
    pub port: u16,
}

/// A running funnel agent; dropping it stops it.
#[derive(Debug)]
pub struct Funnel {
    status: watch::Receiver<FunnelStatus>,
    table: watch::Sender<Arc<ServiceTable>>,
    /// The live tunnel of each edge, for round-trip times.
    conns: Arc<Vec<Mutex<Option<Link>>>>,
    log: broadcast::Sender<RequestLog>,
    /// Services configured but not opened.
    broken: Mutex<Vec<BrokenService>>,
    cancel: CancellationToken,
    /// The edge links and the requests they serve.
    tasks: TaskTracker,
}

impl Drop for Funnel {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Request log entries kept for a slow `warren funnel log` reader before it misses some.
const LOG_BUFFER: usize = 1024;

impl Funnel {
    /// Starts publishing `cfg.services` (a service that cannot be opened is reported in
    /// [`FunnelStatus::broken`]; the others are served).
    pub fn start(cfg: FunnelConfig) -> Funnel {
        let edges = cfg.edges.iter().map(|e| EdgeLink { edge: e.clone(), ..Default::default() }).collect();
        let (table, broken) = ServiceTable::open(&cfg.services);
        let (tx, status) = watch::channel(FunnelStatus { edges, ..Default::default() });
        for (id, e) in &broken {
            warn!(service = %id, error = %e, "service not published");
        }
        let broken = Mutex::new(broken_list(&broken));
        let (table, _) = watch::channel(Arc::new(table));
        let conns = Arc::new(cfg.edges.iter().map(|_| Mutex::new(None)).collect::<Vec<_>>());
        let (log, _) = broadcast::channel(LOG_BUFFER);
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let agent = Agent { cfg: Arc::new(cfg), conns: conns.clone(), log: log.clone(), tasks: tasks.clone() };
        tasks.spawn(agent.run(tx, table.subscribe(), cancel.clone()));
        Funnel { status, table, conns, log, broken, cancel, tasks }
    }

    /// Replaces the published services. Those that cannot be opened are returned (and left
    /// out); the others answer from the next request on. When the set of public ports
    /// changes, each edge is told on the open tunnel.
    pub fn set_services(&self, specs: &[ServiceSpec]) -> Vec<BrokenService> {
        let (table, broken) = ServiceTable::open(specs);
        let table = table.after(&self.table.borrow());
        table.carry_counts_from(&self.table.borrow());
        for (id, e) in &broken {
            warn!(service = %id, error = %e, "service not published");
        }
        let broken = broken_list(&broken);
        *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = broken.clone();
        self.table.send_replace(Arc::new(table));
        broken
    }

    /// The current state.
    pub fn status(&self) -> FunnelStatus {
        let mut s = self.status.borrow().clone();
        for (link, conn) in s.edges.iter_mut().zip(self.conns.iter()) {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            link.rtt_ms = conn.as_ref().filter(|_| link.connected).and_then(Link::rtt).map(|d| d.as_secs_f64() * 1e3);
        }
        s.broken = self.broken.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let table = self.table.borrow().clone();
        s.services = table
            .services()
            .iter()
            .map(|svc| ServiceStatus {
                id: svc.spec.id(),
                kind: svc.spec.kind,
                port: svc.spec.port,
                path: svc.mount.clone(),
                target: match svc.raw().is_some_and(crate::services::raw::Raw::ends_tls) {
                    true => format!("{} (TLS ends on the node)", svc.target),
                    false => svc.target.to_string(),
                },
                requests: svc.requests(),
                access: svc.spec.access.as_ref().filter(|a| !a.is_open()).map(crate::services::AccessSpec::summary),
            })
            .collect();
        let ports = table.ports();
        s.urls.retain(|u| ports.contains(&url_port(u)));
        s
    }

    /// Follows the request log from now on.
    pub fn subscribe_log(&self) -> broadcast::Receiver<RequestLog> {
        self.log.subscribe()
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
/// The TCP ports and TLS-passthrough ports a table asks for.
fn raw_wish(t: &ServiceTable) -> (Vec<u16>, Vec<u16>) {
    (t.ports_of(ServiceKind::Tcp), t.ports_of(ServiceKind::Tls))
}

fn broken_list(broken: &[crate::services::origin::Broken]) -> Vec<BrokenService> {
    broken.iter().map(|(id, e)| BrokenService { id: id.clone(), error: e.to_string() }).collect()
}

/// The port of a public URL (`https://host[:port]/`, `tcp://host:port`), 443 when absent.
pub fn url_port(url: &str) -> u16 {
    url.parse::<http::Uri>().ok().and_then(|u| u.port_u16()).unwrap_or(443)
}

/// What every edge link shares.
struct Agent {
    cfg: Arc<FunnelConfig>,
    conns: Arc<Vec<Mutex<Option<Link>>>>,
    log: broadcast::Sender<RequestLog>,
    /// Where each request's task runs.
    tasks: TaskTracker,
}

impl Agent {
    async fn run(
        self,
        status: watch::Sender<FunnelStatus>,
        table: watch::Receiver<Arc<ServiceTable>>,
        cancel: CancellationToken,
    ) {
        if self.cfg.edges.is_empty() {
            status.send_modify(|s| s.last_error = Some("no edge configured".into()));
            return;
        }
        let endpoint = match client_endpoint(&self.cfg) {
            Ok(e) => e,
            Err(e) => {
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                return;
            }
        };
        let agent = Arc::new(self);
        let requests = Arc::new(AtomicU64::new(0));
        let links = TaskTracker::new();
        for index in 0..agent.cfg.edges.len() {
            let link = EdgeTunnel {
                index,
                endpoint: endpoint.clone(),
                agent: agent.clone(),
                requests: requests.clone(),
                udp_blocked: std::sync::atomic::AtomicBool::new(false),
            };
            links.spawn(link.run(status.clone(), table.clone(), cancel.clone()));
        }
        links.close();
        links.wait().await;
        endpoint.close(0u32.into(), b"funnel off");
    }
}

/// Delay between attempts to reach an edge: 200 ms doubling to 30 s, jittered.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
/// Time an edge has to answer a Hello.
const HELLO_ANSWER: Duration = Duration::from_secs(10);
/// Time a connection to an edge (QUIC handshake; TCP, proxy and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A session this long proves the edge healthy: the next reconnect starts at the shortest
/// delay again.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Longest a tunnel that was moved off keeps serving the requests it still carries.
const MOVED_DRAIN: Duration = Duration::from_secs(40);
/// How often the edge is asked again about the node's custom domains: it proves them (and
/// finds proofs gone) on its own schedule, and the answer keeps `warren funnel status` current.
const DOMAINS_ASK_AGAIN: Duration = Duration::from_secs(30);

/// The tunnel to one edge, re-established with jittered backoff, on the transport the
/// settings allow (see [`EdgeTunnel::dial`]).
struct EdgeTunnel {
    index: usize,
    endpoint: quinn::Endpoint,
    agent: Arc<Agent>,
    requests: Arc<AtomicU64>,
    /// `auto` found QUIC blocked: reconnects start with TCP (QUIC is tried in the background).
    udp_blocked: std::sync::atomic::AtomicBool,
}

/// How a session on a tunnel ended without an error.
enum SessionEnd {
    /// Nothing left to publish.
    NoServices,
    /// QUIC works again: the session goes on on this new tunnel.
    Moved(Link),
}

impl EdgeTunnel {
    fn edge(&self) -> &str {
        &self.agent.cfg.edges[self.index]
    }

    fn host(&self) -> &str {
        let edge = self.edge();
        edge.rsplit_once(':').map_or(edge, |(h, _)| h).trim_matches(['[', ']'])
    }

    fn server_name(&self) -> String {
        self.agent.cfg.edge_name.clone().unwrap_or_else(|| self.host().to_owned())
    }

    fn update(&self, status: &watch::Sender<FunnelStatus>, f: impl FnOnce(&mut FunnelStatus, &mut EdgeLink)) {
        status.send_modify(|s| {
            let mut link = std::mem::take(&mut s.edges[self.index]);
            f(s, &mut link);
            s.edges[self.index] = link;
            s.connected = s.edges.iter().any(|e| e.connected);
        });
    }

    fn set_conn(&self, conn: Option<Link>) {
        *self.agent.conns[self.index].lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    async fn run(
        self,
        status: watch::Sender<FunnelStatus>,
        mut table: watch::Receiver<Arc<ServiceTable>>,
        cancel: CancellationToken,
    ) {
        let mut failures = 0u32;
        let mut moved_to: Option<Link> = None;
        loop {
            // Nothing to publish: no tunnel until there is.
            let waited = tokio::select! {
                _ = cancel.cancelled() => break,
                r = table.wait_for(|t| !t.is_empty()) => r.is_ok(),
            };
            if !waited {
                break;
            }
            let link = match moved_to.take() {
                Some(link) => Ok(link),
                None => tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = self.dial() => r,
                },
            };
            let began = Instant::now();
            let outcome = match link {
                Ok(link) => tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = self.session(&status, table.clone(), link) => r,
                },
                Err(e) => Err(e),
            };
            self.set_conn(None);
            let err = match outcome {
                Ok(SessionEnd::Moved(link)) => {
                    moved_to = Some(link);
                    continue;
                }
                Ok(SessionEnd::NoServices) => "no services left to publish".to_owned(),
                Err(e) => e.to_string(),
            };
            warn!(edge = %self.edge(), error = %err, "funnel disconnected from an edge");
            self.update(&status, |s, link| {
                link.connected = false;
                link.transport = None;
                link.access_generation = None;
                link.last_error = Some(err.clone());
                s.last_error = Some(err);
            });
            failures = if began.elapsed() >= HEALTHY_SESSION { 1 } else { failures + 1 };
            let delay = BACKOFF.delay(failures);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.set_conn(None);
    }

    /// A tunnel to the edge on the transport the settings pick. `auto` tries QUIC first, for
    /// at most `quic_fallback_after`, then TCP; once QUIC failed that way, TCP comes first
    /// (QUIC is then retried in the background by the session).
    async fn dial(&self) -> Result<Link, FunnelError> {
        let t = &self.agent.cfg.transport;
        match t.mode {
            TransportMode::Quic => self.dial_quic(CONNECT_TIMEOUT).await,
            TransportMode::Tcp => self.dial_tcp().await,
            TransportMode::Auto if self.udp_blocked.load(Ordering::Relaxed) => match self.dial_tcp().await {
                Ok(link) => Ok(link),
                Err(tcp) => self.dial_quic(t.quic_fallback_after).await.map_err(|quic| FunnelError::both(quic, tcp)),
            },
            TransportMode::Auto => match self.dial_quic(t.quic_fallback_after).await {
                Ok(link) => Ok(link),
                Err(quic) => {
                    info!(edge = %self.edge(), error = %quic, "QUIC did not connect; trying the TCP tunnel");
                    let link = self.dial_tcp().await.map_err(|tcp| FunnelError::both(quic, tcp))?;
                    self.udp_blocked.store(true, Ordering::Relaxed);
                    Ok(link)
                }
            },
        }
    }

    /// A QUIC connection to the edge's tunnel port, within `limit`.
    async fn dial_quic(&self, limit: Duration) -> Result<Link, FunnelError> {
        let edge = self.edge();
        let addr = tokio::net::lookup_host(edge)
            .await
            .map_err(|source| FunnelError::Resolve { edge: edge.to_owned(), source })?
            .next()
            .ok_or_else(|| FunnelError::NoAddress(edge.to_owned()))?;
        let connecting = self.endpoint.connect(addr, &self.server_name())?;
        let conn = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| FunnelError::Timeout(limit))?
            .map_err(FunnelError::Connection)?;
        Ok(Link::Quic(conn))
    }

    /// A TCP+TLS tunnel to the edge's public port, through the proxy when one is set.
    async fn dial_tcp(&self) -> Result<Link, FunnelError> {
        let cfg = &self.agent.cfg;
        let (host, port) = (self.host(), cfg.transport.tcp_port);
        let target = format!("{host}:{port}");
        let proxy = cfg.transport.proxy.for_host(host)?;
        let dial = async {
            let io: Box<dyn Io> = match &proxy {
                Some(p) => Box::new(p.connect(host, port, CONNECT_TIMEOUT).await?),
                None => {
                    let tcp = tokio::net::TcpStream::connect((host, port))
                        .await
                        .map_err(|source| FunnelError::Tcp { target: target.clone(), source })?;
                    let _ = tcp.set_nodelay(true);
                    Box::new(tcp)
                }
            };
            let tls = warren_tunnel::tcp_client_config(cfg.ca_file.as_deref()).map_err(FunnelError::TlsConfig)?;
            let name = rustls_pki_types::ServerName::try_from(self.server_name())
                .map_err(|_| FunnelError::BadName(self.server_name()))?;
            let via = proxy.as_ref().map(|p| p.to_string());
            let tls = match tokio_rustls::TlsConnector::from(tls).connect(name, io).await {
                Ok(tls) => tls,
                // An edge that does not offer the TCP tunnel's ALPN refuses the handshake.
                Err(e) if refused_alpn(&e) => return Err(FunnelError::NoTcpTunnel(target.clone())),
                Err(source) => return Err(FunnelError::Tls { target: target.clone(), via: via.clone(), source }),
            };
            if tls.get_ref().1.alpn_protocol() != Some(warren_tunnel_proto::ALPN_TCP) {
                return Err(FunnelError::NoTcpTunnel(target.clone()));
            }
            let keep_alive = KeepAlive::dead_after(cfg.transport.dead_after);
            let link = TcpLink::node(tls, keep_alive, PEER_STREAMS).await.map_err(FunnelError::Closed)?;
            Ok(Link::Tcp(link))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, dial).await.map_err(|_| FunnelError::Timeout(CONNECT_TIMEOUT))?
    }

    /// Sends a Hello for `ports` and waits for the edge's answer: the public URLs.
    async fn hello(
        &self,
        send: &mut SendStream,
        recv: &mut RecvStream,
        ports: Vec<u16>,
    ) -> Result<Vec<String>, FunnelError> {
        let cfg = &self.agent.cfg;
        let hello = Message::Hello { version: VERSION, name: cfg.name.clone(), token: cfg.token.clone(), ports };
        write_message(send, &hello).await.map_err(FunnelError::Hello)?;
        let answer = tokio::time::timeout(HELLO_ANSWER, read_message(recv))
            .await
            .map_err(|_| FunnelError::Timeout(HELLO_ANSWER))?;
        match answer.map_err(FunnelError::NoWelcome)? {
            Message::Welcome { urls } => Ok(urls),
            Message::Refused { reason } => Err(FunnelError::Refused(reason)),
            _ => Err(FunnelError::UnexpectedAnswer),
        }
    }

    async fn session(
        &self,
        status: &watch::Sender<FunnelStatus>,
        mut table: watch::Receiver<Arc<ServiceTable>>,
        link: Link,
    ) -> Result<SessionEnd, FunnelError> {
        let control = tokio::time::timeout(HELLO_ANSWER, link.open_control())
            .await
            .map_err(|_| FunnelError::Timeout(HELLO_ANSWER))?;
        let (mut ctl_send, mut ctl_recv) = control.map_err(FunnelError::Closed)?;
        let (mut ports, mut raw, mut access) = {
            let t = table.borrow_and_update();
            (t.ports(), raw_wish(&t), t.access().clone())
        };
        let urls = self.hello(&mut ctl_send, &mut ctl_recv, ports.clone()).await?;
        self.registered(status, &link, urls);
        self.set_access(status, &mut ctl_send, &mut ctl_recv, &access).await?;
        if !self.agent.cfg.domains.is_empty() {
            self.ask_domains(status, &mut ctl_send, &mut ctl_recv).await?;
        }
        if raw != (Vec::new(), Vec::new()) {
            self.publish(status, &mut ctl_send, &mut ctl_recv, &raw).await?;
        }
        // On TCP in `auto`, QUIC is tried again now and then; the session moves once it works.
        let retry_quic = self.agent.cfg.transport.mode == TransportMode::Auto && link.transport() == Transport::Tcp;
        let mut quic_back = std::pin::pin!(async {
            if !retry_quic {
                return std::future::pending().await;
            }
            self.quic_again().await
        });
        let mut ask_again = tokio::time::interval(DOMAINS_ASK_AGAIN);
        ask_again.reset();
        loop {
            let (send, recv) = tokio::select! {
                r = link.accept() => r.map_err(FunnelError::Closed)?,
                quic = &mut quic_back => {
                    info!(edge = %self.edge(), "QUIC works again: moving the tunnel back to it");
                    self.udp_blocked.store(false, Ordering::Relaxed);
                    // Requests already on the TCP tunnel finish there; the edge closes it then.
                    let (requests, agent) = (self.requests.clone(), self.agent.clone());
                    let old = link.clone();
                    self.agent.tasks.spawn(drain_moved(old, table.clone(), agent, requests, status.clone()));
                    return Ok(SessionEnd::Moved(quic));
                }
                // Interval ticks are cancel-safe; a busy tunnel does not postpone them.
                _ = ask_again.tick(), if !self.agent.cfg.domains.is_empty() => {
                    self.ask_domains(status, &mut ctl_send, &mut ctl_recv).await?;
                    continue;
                }
                changed = table.changed() => {
                    if changed.is_err() {
                        return Ok(SessionEnd::NoServices);
                    }
                    let (now, now_raw, now_access, empty) = {
                        let t = table.borrow_and_update();
                        (t.ports(), raw_wish(&t), t.access().clone(), t.is_empty())
                    };
                    if empty {
                        link.close(0, "no services");
                        return Ok(SessionEnd::NoServices);
                    }
                    // New rules first, so a new port's services are guarded when it opens.
                    if now_access.generation != access.generation {
                        access = now_access;
                        self.set_access(status, &mut ctl_send, &mut ctl_recv, &access).await?;
                    }
                    if now != ports {
                        ports = now;
                        let urls = self.hello(&mut ctl_send, &mut ctl_recv, ports.clone()).await?;
                        self.registered(status, &link, urls);
                    }
                    if now_raw != raw {
                        raw = now_raw;
                        self.publish(status, &mut ctl_send, &mut ctl_recv, &raw).await?;
                    }
                    continue;
                }
            };
            serve_accepted(&self.agent, &self.requests, status, &table, send, recv);
        }
    }

    /// Tries QUIC every `quic_retry` (jittered) until a connection comes up.
    async fn quic_again(&self) -> Link {
        let t = &self.agent.cfg.transport;
        let every = Backoff::new(t.quic_retry, t.quic_retry);
        loop {
            tokio::time::sleep(every.delay(0)).await;
            match self.dial_quic(t.quic_fallback_after).await {
                Ok(link) => return link,
                Err(e) => debug!(edge = %self.edge(), error = %e, "QUIC still does not connect"),
            }
        }
    }

    /// Gives the edge the access rules of `book` and waits until it enforces them.
    async fn set_access(
        &self,
        status: &watch::Sender<FunnelStatus>,
        send: &mut SendStream,
        recv: &mut RecvStream,
        book: &crate::services::AccessBook,
    ) -> Result<(), FunnelError> {
        let msg = Message::Access { generation: book.generation, rules: book.rules.clone() };
        write_message(send, &msg).await.map_err(FunnelError::Hello)?;
        let answer = tokio::time::timeout(HELLO_ANSWER, read_message(recv))
            .await
            .map_err(|_| FunnelError::Timeout(HELLO_ANSWER))?;
        let Message::AccessSet { generation, refused } = answer.map_err(FunnelError::NoWelcome)? else {
            return Err(FunnelError::UnexpectedAnswer);
        };
        if generation != book.generation {
            return Err(FunnelError::UnexpectedAnswer);
        }
        for r in &refused {
            warn!(edge = %self.edge(), refused = %r, "the edge refused an access rule; that service is closed there");
        }
        debug!(edge = %self.edge(), generation, "access rules in force");
        self.update(status, |s, link| {
            s.access_refused = refused;
            link.access_generation = Some(generation);
        });
        Ok(())
    }

    /// Asks the edge for the custom domains; records which it serves and what the others lack.
    async fn ask_domains(
        &self,
        status: &watch::Sender<FunnelStatus>,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Result<(), FunnelError> {
        write_message(send, &Message::Domains { names: self.agent.cfg.domains.clone() })
            .await
            .map_err(FunnelError::Hello)?;
        let answer = tokio::time::timeout(HELLO_ANSWER, read_message(recv))
            .await
            .map_err(|_| FunnelError::Timeout(HELLO_ANSWER))?;
        let Message::DomainsSet { served, pending } = answer.map_err(FunnelError::NoWelcome)? else {
            return Err(FunnelError::UnexpectedAnswer);
        };
        for p in &pending {
            warn!(edge = %self.edge(), pending = %p, "custom domain not served yet");
        }
        info!(edge = %self.edge(), ?served, "custom domains");
        status.send_modify(|s| {
            s.domains = served;
            s.domains_pending = pending;
        });
        Ok(())
    }

    /// Asks the edge for the TCP and TLS-passthrough ports in `wish`; records what it grants.
    async fn publish(
        &self,
        status: &watch::Sender<FunnelStatus>,
        send: &mut SendStream,
        recv: &mut RecvStream,
        wish: &(Vec<u16>, Vec<u16>),
    ) -> Result<(), FunnelError> {
        let msg = Message::Publish { tcp: wish.0.clone(), tls: wish.1.clone() };
        write_message(send, &msg).await.map_err(FunnelError::Hello)?;
        let answer = tokio::time::timeout(HELLO_ANSWER, read_message(recv))
            .await
            .map_err(|_| FunnelError::Timeout(HELLO_ANSWER))?;
        let Message::Published { urls, refused } = answer.map_err(FunnelError::NoWelcome)? else {
            return Err(FunnelError::UnexpectedAnswer);
        };
        for r in &refused {
            warn!(edge = %self.edge(), refused = %r, "the edge refused a port");
        }
        info!(edge = %self.edge(), urls = ?urls, "raw services published");
        status.send_modify(|s| {
            s.raw_urls = urls;
            s.refused = refused;
            s.publishes += 1;
        });
        Ok(())
    }

    fn registered(&self, status: &watch::Sender<FunnelStatus>, link: &Link, urls: Vec<String>) {
        let transport = link.transport();
        let proxy = match transport {
            Transport::Tcp => {
                self.agent.cfg.transport.proxy.for_host(self.host()).ok().flatten().map(|p| p.to_string())
            }
            Transport::Quic => None,
        };
        info!(edge = %self.edge(), %transport, proxy = ?proxy, urls = ?urls, "funnel registered");
        self.set_conn(Some(link.clone()));
        self.update(status, |s, e| {
            e.connected = true;
            e.transport = Some(transport.as_str().to_owned());
            e.proxy = proxy;
            e.last_error = None;
            s.urls = urls;
            s.last_error = None;
        });
    }
}

/// Whether a TLS handshake failed because the server offers none of the client's ALPNs.
fn refused_alpn(e: &std::io::Error) -> bool {
    let no_alpn = rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol);
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) == Some(&no_alpn)
}

/// Any byte stream a TCP tunnel runs over (a TCP connection, or one through a proxy).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Streams the edge may open at once on a tunnel (the node opens only its control stream).
const PEER_STREAMS: u32 = 4096;

/// Counts a request stream the edge opened and serves it in its own task.
fn serve_accepted(
    agent: &Agent,
    requests: &AtomicU64,
    status: &watch::Sender<FunnelStatus>,
    table: &watch::Receiver<Arc<ServiceTable>>,
    send: SendStream,
    recv: RecvStream,
) {
    let n = requests.fetch_add(1, Ordering::Relaxed) + 1;
    status.send_modify(|s| s.requests = n);
    let table = table.borrow().clone();
    let log = agent.log.clone();
    agent.tasks.spawn(async move { serve_stream(send, recv, table, log).await });
}

/// Serves what the edge still sends on a tunnel the node moved off, until the edge closes it
/// (once its requests there have finished) or [`MOVED_DRAIN`] passes.
async fn drain_moved(
    old: Link,
    table: watch::Receiver<Arc<ServiceTable>>,
    agent: Arc<Agent>,
    requests: Arc<AtomicU64>,
    status: watch::Sender<FunnelStatus>,
) {
    let serve = async {
        while let Ok((send, recv)) = old.accept().await {
            serve_accepted(&agent, &requests, &status, &table, send, recv);
        }
    };
    if tokio::time::timeout(MOVED_DRAIN, serve).await.is_err() {
        old.close(0, "moved to another transport");
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
    /// The CA file is unusable (TCP tunnel).
    #[error("TLS client config: {0}")]
    TlsConfig(warren_common::tls::TlsError),
    /// No UDP socket for QUIC.
    #[error("cannot bind UDP: {0}")]
    Bind(std::io::Error),
    /// The QUIC dial could not start (e.g. an invalid server name).
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The edge did not answer in time.
    #[error("edge did not answer within {0:?}")]
    Timeout(Duration),
    /// The QUIC connection failed (handshake refused, certificate, lost).
    #[error("QUIC connection: {0}")]
    Connection(quinn::ConnectionError),
    /// No TCP connection to the edge's public port.
    #[error("cannot connect to {target}: {source}")]
    Tcp {
        /// `host:port`.
        target: String,
        /// The connect error.
        source: std::io::Error,
    },
    /// The HTTP proxy failed or refused.
    #[error(transparent)]
    Proxy(#[from] warren_common::proxy::ProxyError),
    /// The TLS handshake of the TCP tunnel failed.
    #[error("TLS with {target}{}: {source}{}", via.as_ref().map(|p| format!(" through proxy {p}")).unwrap_or_default(), if via.is_some() { " (does the proxy intercept TLS?)" } else { "" })]
    Tls {
        /// `host:port`.
        target: String,
        /// The proxy in the way, if any.
        via: Option<String>,
        /// The handshake error.
        source: std::io::Error,
    },
    /// The edge's name is not a valid TLS server name.
    #[error("invalid TLS server name {0:?}")]
    BadName(String),
    /// The edge's public port did not accept the TCP tunnel's ALPN.
    #[error("{0} does not take TCP tunnels (an older edge, or tunnel_tcp = false there)")]
    NoTcpTunnel(String),
    /// QUIC and then TCP both failed.
    #[error("QUIC: {quic}; TCP: {tcp}")]
    Both {
        /// Why QUIC failed.
        quic: Box<FunnelError>,
        /// Why TCP failed.
        tcp: Box<FunnelError>,
    },
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
    /// The tunnel closed (or did not start).
    #[error("tunnel closed: {0}")]
    Closed(LinkError),
}

impl FunnelError {
    fn both(quic: FunnelError, tcp: FunnelError) -> Self {
        FunnelError::Both { quic: Box::new(quic), tcp: Box::new(tcp) }
    }
}

fn client_endpoint(cfg: &FunnelConfig) -> Result<quinn::Endpoint, FunnelError> {
    // The edge opens one stream per request; the node opens only its control stream.
    let keep_alive = KeepAlive::dead_after(cfg.transport.dead_after);
    let client = quic_client_config(cfg.ca_file.as_deref(), PEER_STREAMS, keep_alive)?;
    let mut endpoint = warren_tunnel::endpoint(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)), None)
        .or_else(|_| warren_tunnel::endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), None))
        .map_err(FunnelError::Bind)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
/// Serves one request stream from the edge.
async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    table: Arc<ServiceTable>,
    log: broadcast::Sender<RequestLog>,
) {
    let began = Began::now();
    let head = match read_message(&mut recv).await {
        Ok(Message::Request(h)) => h,
        Ok(Message::Connect(c)) => return serve_connection(c, send, recv, &table, &log).await,
        Ok(_) | Err(_) => return respond_text(send, 400, "bad tunnel request\n").await,
    };
    let routed = table.route(head.port, &head.uri);
    let service_id = routed.as_ref().map_or_else(|| "-".to_owned(), |(s, _)| s.spec.id());
    let (status, bytes) = match routed {
        None => respond(&mut send, None, head.trailers, no_mount()).await,
        Some((service, _)) if !table.access().enforced(head.port, &service.mount, &head) => {
            // The edge checked this request against rules older than the service's (or
            // another service's): it is not let through unguarded.
            debug!(service = %service_id, "request not checked against the service's access rule");
            let mut page = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "This service's access rules are not in force yet; try again shortly.\n",
            );
            page.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            respond(&mut send, None, head.trailers, page).await
        }
        Some((service, rest)) => {
            let upgrade = head.upgrade;
            let (body, recv) = if upgrade {
                (Empty::new().map_err(|never: std::convert::Infallible| match never {}).boxed(), Some(recv))
            } else {
                (StreamBody::new(recv).boxed(), None)
            };
            let Some(req) = origin_request(&head, &rest, body) else {
                let page = text(StatusCode::BAD_REQUEST, "bad request head\n");
                respond(&mut send, None, head.trailers, page).await;
                return;
            };
            match service.serve(req, &head.uri).await {
                Ok(resp) => respond(&mut send, recv.filter(|_| upgrade), head.trailers, resp).await,
                Err(e) => {
                    debug!(service = %service_id, error = %e, "target unavailable");
                    let msg =
                        format!("Bad gateway: the node could not reach its local service at {}.\n", service.target);
                    respond(&mut send, None, head.trailers, text(StatusCode::BAD_GATEWAY, &msg)).await;
                    (502, 0)
                }
            }
        }
    };
    let (method, path, visitor, port) = (head.method, head.uri, head.visitor, head.port);
    let entry = RequestLog { service: service_id, method, path, status, visitor, port, time: 0.0, duration_ms: 0.0 };
    began.done(&log, entry, bytes);
}

/// When a request or connection began, for its metrics and its log entry.
struct Began {
    at: Instant,
    wall: SystemTime,
}

impl Began {
    fn now() -> Self {
        Began { at: Instant::now(), wall: SystemTime::now() }
    }

    /// Counts the answer (`bytes` of body sent) and sends its log entry, whose `time` and
    /// `duration_ms` are filled in here.
    fn done(self, log: &broadcast::Sender<RequestLog>, mut entry: RequestLog, bytes: u64) {
        let elapsed = self.at.elapsed().as_secs_f64();
        crate::metrics::request(&entry.service, entry.status, bytes, elapsed);
        entry.time = self.wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        entry.duration_ms = elapsed * 1e3;
        let _ = log.send(entry);
    }
}

/// Joins a visitor's TCP connection (or passed-through TLS session) to its service.
async fn serve_connection(
    head: warren_tunnel_proto::ConnectHead,
    mut send: SendStream,
    recv: RecvStream,
    table: &ServiceTable,
    log: &broadcast::Sender<RequestLog>,
) {
    let began = Began::now();
    let kind = match head.kind {
        warren_tunnel_proto::ConnKind::Tcp => ServiceKind::Tcp,
        warren_tunnel_proto::ConnKind::Tls => ServiceKind::Tls,
    };
    let Some(service) = table.route_conn(kind, head.port) else {
        debug!(port = head.port, "a connection for a port no service holds");
        send.reset();
        return;
    };
    let Some(raw) = service.raw() else { return };
    service.count();
    let id = service.spec.id();
    let result = raw.join(&head, tokio::io::join(recv, send)).await;
    let (status, bytes) = match result {
        Ok(n) => (200, n),
        Err(e) => {
            warn!(service = %id, error = %e, "connection not joined to its target");
            (502, 0)
        }
    };
    let method = if kind == ServiceKind::Tcp { "TCP" } else { "TLS" }.to_owned();
    let (path, visitor, port) = (head.sni, head.visitor, head.port);
    let entry = RequestLog { service: id, method, path, status, visitor, port, time: 0.0, duration_ms: 0.0 };
    began.done(log, entry, bytes);
}

/// The request for the origin: the visitor's method and headers (without hop-by-hop ones),
/// `rest` as its path.
fn origin_request(head: &RequestHead, rest: &str, body: Body) -> Option<Request<Body>> {
    let mut builder = Request::builder().method(head.method.as_str()).uri(rest);
    for (n, v) in &head.headers {
        // `te: trailers` is the one hop-by-hop header that goes on: gRPC origins need it.
        let trailers = head.trailers && n.eq_ignore_ascii_case("te") && te_is_trailers(v);
        if is_hop_by_hop(n, head.upgrade) && !trailers {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
            builder = builder.header(n, v);
        }
    }
    builder.body(body).ok()
}

/// Sends the response head and body to the edge (or, after a `101` to an upgrade request,
/// bridges the upgraded connection with the stream); returns the status and the body bytes
/// sent. `framed`: the edge asked for a framed body, which carries trailers.
async fn respond(
    send: &mut SendStream,
    upgrade_recv: Option<RecvStream>,
    framed: bool,
    resp: http::Response<Body>,
) -> (u16, u64) {
    let status = resp.status().as_u16();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade_recv.is_some();
    let mut headers: Vec<_> = resp
        .headers()
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n.as_str(), switching))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    if framed && hyper::body::Body::is_end_stream(resp.body()) {
        headers.push((warren_tunnel_proto::END_STREAM.to_owned(), Vec::new()));
    }
    if write_message(send, &Message::Response(ResponseHead { status, headers })).await.is_err() {
        return (status, 0);
    }
    match upgrade_recv {
        Some(recv) if switching => {
            let Ok(upgraded) = hyper::upgrade::on(resp).await else { return (status, 0) };
            let mut origin = TokioIo::new(upgraded);
            let mut edge = tokio::io::join(recv, send);
            let copied = tokio::io::copy_bidirectional(&mut origin, &mut edge).await;
            (status, copied.map_or(0, |(from_origin, _)| from_origin))
        }
        _ if framed => match send_framed_body(resp.into_body(), send).await {
            Ok(n) => (status, n),
            Err(e) => {
                debug!(error = %e, "response body not fully sent");
                (status, 0)
            }
        },
        _ => match send_body(resp.into_body(), send).await {
            Ok(n) => (status, n),
            Err(e) => {
                debug!(error = %e, "response body not fully sent");
                (status, 0)
            }
        },
    }
}
