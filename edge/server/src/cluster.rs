//! Several edges behind one DNS name.
//!
//! Each edge announces the nodes whose tunnels it holds in the shared [`Store`] (route entries
//! that expire unless refreshed every third of their lifetime). A visitor may reach any edge:
//! one without the node's tunnel looks the name up (cached briefly in moka) and forwards the
//! request over a QUIC peer link to an edge that has it. The peer link authenticates with the
//! cluster key; the receiving edge splices each forwarded stream onto a stream to its node and
//! never forwards again, so a request crosses at most one extra hop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_common::limits::LogLimiter;
use warren_tunnel::{read_message, respond, respond_text, write_message, RecvStream, SendStream};
use warren_tunnel_proto::{Message, RequestHead, ResponseHead, VERSION};

use crate::access::EdgeAccess;
use crate::config::{defaults, ClusterConfig};
use crate::routes::{name_in, Denied, Opened, RouteError, Routes};
use crate::store::Store;

/// Time to set up a peer link (QUIC handshake plus PeerHello/Welcome).
const LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a forwarded stream has to deliver its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which a peer link counts as dead.
const PEER_IDLE: Duration = Duration::from_secs(3);
/// How long a sibling whose link failed is left alone.
const PEER_DOWN_FOR: Duration = Duration::from_secs(5);
/// Forwarded requests in flight on one incoming peer link.
const PEER_STREAMS: u32 = 4096;

/// This edge's part of the cluster.
pub(crate) struct Cluster {
    /// Shared state.
    pub(crate) store: Arc<dyn Store>,
    /// How siblings name this edge in routes: `<tls name>@<tunnel address>`.
    me: String,
    /// The TLS name every edge of the cluster answers to (the edges' `hostname`).
    tls_name: String,
    settings: ClusterConfig,
    client: quinn::ClientConfig,
    /// Live links to siblings, one per peer.
    links: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    /// name -> peers holding its tunnel, briefly cached.
    lookups: moka::future::Cache<String, Arc<Vec<String>>>,
    /// Peers whose link just failed: not dialled again for a few seconds, so visitors of a
    /// dead sibling's names get an answer at once while its route entries expire.
    down: moka::future::Cache<String, ()>,
    errors: LogLimiter,
    forwarded_out: metrics::Counter,
    forwarded_in: metrics::Counter,
    store_errors: metrics::Counter,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", &self.me).field("store", &self.store).finish_non_exhaustive()
    }
}

/// Why a request could not be forwarded to a sibling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardError {
    /// No sibling holds the name.
    NoRoute,
    /// Siblings hold it but none could be reached.
    Unreachable,
}

/// Why a link to a sibling edge could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum PeerLinkError {
    /// The last dial to this sibling failed a moment ago.
    #[error("sibling recently unreachable")]
    RecentlyDown,
    /// The route entry is not `<tls name>@<ip:port>`.
    #[error("malformed route entry")]
    MalformedRoute,
    /// The route names a server outside this cluster's TLS name.
    #[error("peer {0:?} is not named like this cluster")]
    ForeignName(String),
    /// The QUIC dial could not start.
    #[error("dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The greeting could not be written.
    #[error("greeting: {0}")]
    Write(std::io::Error),
    /// The answer to the greeting did not arrive whole.
    #[error("answer: {0}")]
    Read(#[from] warren_tunnel::ReadMessageError),
    /// The sibling refused the cluster key.
    #[error("refused: {0}")]
    Refused(String),
    /// The sibling answered with another message than Welcome or Refused.
    #[error("unexpected answer")]
    UnexpectedAnswer,
    /// The dial and greeting took longer than the link timeout.
    #[error("timed out")]
    Timeout,
}

/// Why the cluster part could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterSetupError {
    /// The Redis URL is unusable.
    #[error("store: {0}")]
    Store(std::io::Error),
    /// The client configuration for peer links could not be built.
    #[error("peer links: {0}")]
    PeerTls(#[from] warren_tunnel::QuicConfigError),
}

impl Cluster {
    /// Sets up the cluster part: the store and a client configuration for peer links, which
    /// trusts the system roots plus `cluster.ca_file` (or else `dev_ca`, in dev TLS mode).
    ///
    /// # Errors
    /// [`ClusterSetupError`] when the Redis URL or the CA file is unusable.
    pub(crate) fn new(
        settings: ClusterConfig,
        hostname: &str,
        dev_ca: Option<&Path>,
    ) -> Result<Cluster, ClusterSetupError> {
        let store = crate::store::RedisStore::new(&settings.redis_url).map_err(ClusterSetupError::Store)?;
        let ca = settings.ca_file.as_deref().or(dev_ca);
        // Siblings are close: a link whose sibling died is known dead within PEER_IDLE, so a
        // request forwarded into it fails fast instead of waiting for its response deadline.
        let keep_alive = warren_tunnel::KeepAlive { interval: PEER_IDLE / 3, dead_after: PEER_IDLE };
        let client = warren_tunnel::quic_client_config(ca, 4, keep_alive)?;
        Ok(Cluster {
            store: Arc::new(store),
            me: format!("{hostname}@{}", settings.advertise),
            tls_name: hostname.to_owned(),
            client,
            links: Mutex::new(HashMap::new()),
            lookups: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(defaults::ROUTE_CACHE_TTL)
                .build(),
            down: moka::future::Cache::builder().max_capacity(10_000).time_to_live(PEER_DOWN_FOR).build(),
            errors: LogLimiter::new(Duration::from_secs(10)),
            forwarded_out: metrics::counter!("edge_forwarded_total", "direction" => "out"),
            forwarded_in: metrics::counter!("edge_forwarded_total", "direction" => "in"),
            store_errors: metrics::counter!("edge_store_errors_total"),
            settings,
        })
    }

    /// This edge's name in route entries.
    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    fn store_failed(&self, what: &str, e: &std::io::Error) {
        self.store_errors.increment(1);
        if let Some(held_back) = self.errors.allow() {
            warn!(what, error = %e, held_back, "shared store unavailable (logged at most every 10 s)");
        }
    }

    /// Announces a newly registered node at once.
    pub(crate) async fn announce(&self, name: &str) {
        if let Err(e) = self.store.advertise(&self.me, &[name.to_owned()], self.settings.route_ttl).await {
            self.store_failed("announce", &e);
        }
    }

    /// Withdraws nodes whose tunnels closed.
    pub(crate) async fn withdraw(&self, names: &[String]) {
        if let Err(e) = self.store.withdraw(&self.me, names).await {
            self.store_failed("withdraw", &e);
        }
    }

    /// Refreshes this edge's routes every third of their lifetime until `cancel`.
    pub(crate) async fn heartbeat(self: Arc<Self>, routes: Arc<Routes>, cancel: CancellationToken) {
        let every = self.settings.route_ttl / 3;
        loop {
            let names = routes.names();
            if let Err(e) = self.store.advertise(&self.me, &names, self.settings.route_ttl).await {
                self.store_failed("heartbeat", &e);
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        // Leaving: siblings stop forwarding here at once rather than when the entries expire.
        self.withdraw(&routes.names()).await;
    }

    /// Siblings holding `name` (never this edge), from a short cache.
    async fn peers_for(&self, name: &str) -> Arc<Vec<String>> {
        let lookup = async {
            match self.store.routes(name).await {
                Ok(mut peers) => {
                    peers.retain(|p| *p != self.me);
                    Ok(Arc::new(peers))
                }
                Err(e) => Err(e),
            }
        };
        match self.lookups.try_get_with(name.to_owned(), lookup).await {
            Ok(p) => p,
            Err(e) => {
                self.store_failed("lookup", &e);
                Arc::new(Vec::new())
            }
        }
    }

    /// Opens a stream to a sibling that holds `name`'s tunnel, trying each in turn.
    pub(crate) async fn open(
        &self,
        endpoint: &quinn::Endpoint,
        name: &str,
    ) -> Result<(SendStream, RecvStream), ForwardError> {
        let peers = self.peers_for(name).await;
        if peers.is_empty() {
            return Err(ForwardError::NoRoute);
        }
        for peer in peers.iter().filter(|p| !self.down.contains_key(*p)) {
            let failure = match self.link(endpoint, peer).await {
                Ok(conn) => match conn.open_bi().await {
                    Ok((send, recv)) => {
                        self.forwarded_out.increment(1);
                        return Ok((send.into(), recv.into()));
                    }
                    Err(e) => PeerLinkError::Connection(e),
                },
                Err(e) => e,
            };
            warn!(%peer, error = %failure, "sibling edge unreachable; not tried again for {PEER_DOWN_FOR:?}");
            self.down.insert(peer.clone(), ()).await;
        }
        // The cached answer led nowhere: look again next time.
        self.lookups.invalidate(name).await;
        Err(ForwardError::Unreachable)
    }

    /// The live link to `peer`, dialled if needed.
    async fn link(&self, endpoint: &quinn::Endpoint, peer: &str) -> Result<quinn::Connection, PeerLinkError> {
        let slot = self.links.lock().unwrap_or_else(|e| e.into_inner()).entry(peer.to_owned()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        // Requests that queued behind a dial which just failed do not dial again one by one.
        if self.down.contains_key(peer) {
            return Err(PeerLinkError::RecentlyDown);
        }
        let (server_name, addr) = peer.rsplit_once('@').ok_or(PeerLinkError::MalformedRoute)?;
        let addr: SocketAddr = addr.parse().map_err(|_| PeerLinkError::MalformedRoute)?;
        // Edges of one cluster share their TLS name. A route naming another one (a Redis
        // writer's mistake, or worse) is not dialled: the cluster key goes only to a server
        // proving it holds this cluster's name.
        if server_name != self.tls_name {
            return Err(PeerLinkError::ForeignName(server_name.to_owned()));
        }
        let dial = async {
            let conn = endpoint.connect_with(self.client.clone(), addr, server_name)?.await?;
            let (send, recv) = conn.open_bi().await?;
            let (mut send, mut recv) = (SendStream::from(send), RecvStream::from(recv));
            let hello = Message::PeerHello { version: VERSION, key: self.settings.key.expose().to_owned() };
            write_message(&mut send, &hello).await.map_err(PeerLinkError::Write)?;
            match read_message(&mut recv).await? {
                Message::Welcome { .. } => Ok(conn),
                Message::Refused { reason } => Err(PeerLinkError::Refused(reason)),
                _ => Err(PeerLinkError::UnexpectedAnswer),
            }
        };
        let conn = tokio::time::timeout(LINK_TIMEOUT, dial).await.map_err(|_| PeerLinkError::Timeout)??;
        info!(%peer, "peer link up");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Whether `offered` is the cluster key.
    pub(crate) fn key_matches(&self, offered: &str) -> bool {
        self.settings.key.matches(offered)
    }
}

/// What a sibling's forwarded requests need of this edge: its own tunnels, under its domain.
#[derive(Debug, Clone)]
pub(crate) struct LocalRoutes {
    pub(crate) routes: Arc<Routes>,
    pub(crate) access: Arc<EdgeAccess>,
    pub(crate) funnel_domain: Arc<str>,
}

/// Serves an authenticated sibling's link: every stream it opens is one forwarded request.
pub(crate) async fn serve_peer(
    cluster: Arc<Cluster>,
    local: LocalRoutes,
    conn: quinn::Connection,
    remote: SocketAddr,
    tasks: TaskTracker,
) {
    conn.set_max_concurrent_bi_streams(PEER_STREAMS.into());
    info!(%remote, "sibling edge linked");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return info!(%remote, reason = %e, "sibling edge link closed"),
        };
        tasks.spawn(forwarded(cluster.clone(), local.clone(), send.into(), recv.into()));
    }
}

/// The public host a forwarded head was sent to (the sibling's `X-Forwarded-Host`).
fn host_of(head: &RequestHead) -> Option<String> {
    let host = head.headers.iter().find(|(n, _)| n == "x-forwarded-host").map(|(_, v)| v.as_slice())?;
    std::str::from_utf8(host).ok().map(str::to_owned)
}

fn name_of<'a>(head: &'a RequestHead, domain: &str) -> Option<&'a str> {
    let host = head.headers.iter().find(|(n, _)| n == "x-forwarded-host").map(|(_, v)| v.as_slice())?;
    name_in(std::str::from_utf8(host).ok()?, domain)
}

/// One forwarded request: its head names the node; the rest of the stream is spliced onto a
/// new stream to that node, both ways, until both directions end.
async fn forwarded(cluster: Arc<Cluster>, local: LocalRoutes, peer_send: SendStream, mut peer_recv: RecvStream) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_message(&mut peer_recv)).await {
        Ok(Ok(Message::Request(h))) => h,
        _ => return respond_text(peer_send, 400, "bad forwarded request\n").await,
    };
    cluster.forwarded_in.increment(1);
    let Some(name) = name_of(&head, &local.funnel_domain).map(str::to_owned) else {
        return refuse(peer_send, RouteError::Offline.into()).await;
    };
    let host = host_of(&head).unwrap_or_default();
    let mut head = head;
    // The sibling is trusted for the visitor's address (it is what its socket saw); one it
    // cannot state is not let past the access rules.
    let Ok(visitor) = head.visitor.parse::<std::net::SocketAddr>() else {
        return respond_text(peer_send, 400, "bad forwarded request: no visitor address\n").await;
    };
    let opened = local.routes.open(&local.access, &name, &mut head, visitor.ip(), &host).await;
    let (_permit, mut node_send, node_recv) = match opened {
        Ok(Opened { permit, send, recv, .. }) => (permit, send, recv),
        Err(e) => return refuse(peer_send, e).await,
    };
    if write_message(&mut node_send, &Message::Request(head)).await.is_err() {
        return refuse(peer_send, RouteError::NodeUnreachable.into()).await;
    }
    tokio::join!(splice(peer_recv, node_send), splice(node_recv, peer_send));
}

/// Answers a forwarded request that cannot reach its node, with what a visitor of this edge
/// would get (status, sentence, and an access refusal's headers).
async fn refuse(peer_send: SendStream, e: Denied) {
    match e {
        Denied::Route(e) => respond_text(peer_send, e.status().as_u16(), &format!("{}\n", e.message())).await,
        Denied::Access(r) => {
            let (status, headers, body) = r.into_parts();
            respond(peer_send, ResponseHead { status, headers }, &body).await;
        }
    }
}

/// Copies `from` into `to`; a clean end is passed on as a finish, a failure as a reset (and a
/// stop of the reading side), so neither end mistakes a cut stream for a complete one.
async fn splice(mut from: RecvStream, mut to: SendStream) {
    loop {
        match from.read_chunk(64 << 10).await {
            Ok(Some(chunk)) => {
                if to.write_chunk(chunk).await.is_err() {
                    from.stop();
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(_) => {
                to.reset();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_heads_name_their_node() {
        let head = |host: &str| RequestHead {
            headers: vec![("x-forwarded-host".into(), host.as_bytes().to_vec())],
            ..RequestHead::default()
        };
        assert_eq!(name_of(&head("web.funnel.test"), "funnel.test"), Some("web"));
        assert_eq!(name_of(&head("a.b.funnel.test"), "funnel.test"), None);
        assert_eq!(name_of(&head("funnel.test"), "funnel.test"), None);
        assert_eq!(name_of(&head("web.other.test"), "funnel.test"), None);
        assert_eq!(name_of(&RequestHead::default(), "funnel.test"), None);
    }
}
