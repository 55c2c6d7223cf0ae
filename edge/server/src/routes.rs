//! The route table: which node tunnel serves a funnel name, and the one way to open a request
//! stream to it.
//!
//! ```text
//! visitor Host / forwarded X-Forwarded-Host ─▶ name_in(host, domain) ─▶ Routes::open(name, head)
//!     no tunnel here          -> RouteError::Offline (the proxy then asks the cluster)
//!     port not published      -> PortNotServed (404)
//!     refused by the node's access rule or the edge's floors -> Denied::Access (see `access`)
//!     over the name's rate    -> RateLimited (429)
//!     too many streams        -> Busy (503)
//!     open_bi fails / slow    -> NodeUnreachable (502) / NodeTimeout (504)
//! ```
//!
//! Both the visitor proxy and a sibling edge's forwarded requests go through
//! [`Routes::open`], so a node's limits and access rules are applied once, on the edge that
//! holds its tunnel, wherever the visitor arrived.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warren_common::limits::TokenBucket;
use warren_tunnel::{Link, RecvStream, SendStream};
use warren_tunnel_proto::RequestHead;

use crate::access::{AccessTable, EdgeAccess, Refusal};
use crate::config::{defaults, valid_name};
pub(crate) use crate::pages::{page, Body};

/// A registered node.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// The tunnel, on whichever transport the node came in.
    pub(crate) conn: Link,
    /// The tunnel protocol version the node spoke in its Hello.
    pub(crate) version: u16,
    /// Public ports the node publishes; a later Hello on the control stream replaces them.
    pub(crate) ports: RwLock<Vec<u16>>,
    /// Public ports on which TLS for this name is passed through to the node (Publish).
    pub(crate) tls_ports: RwLock<Vec<u16>>,
    /// Requests in flight on this tunnel.
    pub(crate) streams: Arc<Semaphore>,
    /// Requests per second for this name, when limited.
    pub(crate) rate: Option<std::sync::Mutex<TokenBucket>>,
    /// The node's access rules (empty until its first Access message).
    pub(crate) access: RwLock<Arc<AccessTable>>,
    /// The signed token it registered with, if not a static one: its id and expiry.
    pub(crate) credential: Option<(String, std::time::SystemTime)>,
}

impl Tunnel {
    /// Whether the node publishes `port`.
    pub(crate) fn publishes(&self, port: u16) -> bool {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).contains(&port)
    }

    /// Whether TLS for this name on `port` is passed through to the node.
    pub(crate) fn passes_tls(&self, port: u16) -> bool {
        self.tls_ports.read().unwrap_or_else(|e| e.into_inner()).contains(&port)
    }

    /// The node's access rules now.
    pub(crate) fn access(&self) -> Arc<AccessTable> {
        self.access.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens a stream to the node within its limits (rate, streams in flight, deadline).
    ///
    /// # Errors
    /// [`RouteError::RateLimited`], [`RouteError::Busy`], [`RouteError::NodeTimeout`] or
    /// [`RouteError::NodeUnreachable`].
    pub(crate) async fn open_stream(&self) -> Result<Opened, RouteError> {
        if !self.allow_request() {
            return Err(RouteError::RateLimited);
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| RouteError::Busy)?;
        let (send, recv) = tokio::time::timeout(defaults::OPEN_TIMEOUT, self.conn.open())
            .await
            .map_err(|_| RouteError::NodeTimeout)?
            .map_err(|_| RouteError::NodeUnreachable)?;
        Ok(Opened { permit, send, recv, version: self.version })
    }

    /// Takes one request from the name's rate limit, when it has one.
    fn allow_request(&self) -> bool {
        self.rate
            .as_ref()
            .is_none_or(|r| r.lock().unwrap_or_else(|e| e.into_inner()).try_take(std::time::Instant::now(), 1.0))
    }
}

/// A request stream to a node, holding one of its stream slots until dropped.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    /// The node's tunnel protocol version.
    pub(crate) version: u16,
}

/// Why a request could not reach a node, with the status and page it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RouteError {
    /// Not a host under the funnel domain.
    #[error("unknown host")]
    UnknownHost,
    /// A funnel name with no connected node.
    #[error("offline")]
    Offline,
    /// The node does not publish this port.
    #[error("port not served")]
    PortNotServed,
    /// Too many requests in flight on the tunnel.
    #[error("busy")]
    Busy,
    /// Over the per-name request rate.
    #[error("rate limited")]
    RateLimited,
    /// The stream to the node failed.
    #[error("node unreachable")]
    NodeUnreachable,
    /// The node did not answer in time.
    #[error("node timeout")]
    NodeTimeout,
    /// The node answered with something invalid.
    #[error("bad node response")]
    BadNodeResponse,
}

/// Why a request got no stream to its node.
#[derive(Debug)]
pub(crate) enum Denied {
    /// No route, or the node's limits.
    Route(RouteError),
    /// An access rule or floor refused it.
    Access(Refusal),
}

impl From<RouteError> for Denied {
    fn from(e: RouteError) -> Self {
        Denied::Route(e)
    }
}

impl Denied {
    /// The visitor's answer.
    pub(crate) fn page(self) -> Response<Body> {
        match self {
            Denied::Route(e) => e.page(),
            Denied::Access(r) => r.page(),
        }
    }
}

impl RouteError {
    /// The HTTP status a visitor gets.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            RouteError::UnknownHost | RouteError::PortNotServed => StatusCode::NOT_FOUND,
            RouteError::Offline | RouteError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            RouteError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            RouteError::NodeUnreachable | RouteError::BadNodeResponse => StatusCode::BAD_GATEWAY,
            RouteError::NodeTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The sentence a visitor reads.
    pub(crate) fn message(self) -> &'static str {
        match self {
            RouteError::UnknownHost => "There is no funnel at this address.",
            RouteError::Offline => "This funnel is offline: its node is not connected.",
            RouteError::PortNotServed => "This funnel is not published on this port.",
            RouteError::Busy => "This funnel is busy; try again shortly.",
            RouteError::RateLimited => "Too many requests for this funnel; try again shortly.",
            RouteError::NodeUnreachable => "The funnel's node could not be reached.",
            RouteError::NodeTimeout => "The funnel's node did not answer in time.",
            RouteError::BadNodeResponse => "The funnel's node sent an invalid response.",
        }
    }

    /// The visitor's error page.
    pub(crate) fn page(self) -> Response<Body> {
        let mut page = page(self.status(), self.message());
        if self == RouteError::RateLimited {
            page.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        page
    }
}

/// The funnel name in `host` (`<name>.<domain>`), if it is one.
pub(crate) fn name_in<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    host.strip_suffix(domain).and_then(|n| n.strip_suffix('.')).filter(|n| valid_name(n))
}

/// Node name -> tunnel.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    map: RwLock<HashMap<String, Arc<Tunnel>>>,
    next_id: AtomicU64,
    /// Tunnels with TLS passthrough ports: while none, visitors' ClientHellos are not peeked.
    tls_holders: AtomicU64,
    /// Replaced tunnels still finishing their requests.
    retiring: std::sync::Mutex<Vec<std::sync::Weak<Tunnel>>>,
}

impl Routes {
    /// Opens a request stream to the node registered as `name` for the request `head` from
    /// `visitor`, once the node's access rules allow it (`head` is then marked with the rule
    /// enforced), within the node's limits.
    ///
    /// # Errors
    /// [`RouteError::Offline`] when no tunnel for `name` is here; the others as the table at
    /// the top of this module says.
    pub(crate) async fn open(
        &self,
        access: &EdgeAccess,
        name: &str,
        head: &mut RequestHead,
        visitor: IpAddr,
        host: &str,
    ) -> Result<Opened, Denied> {
        let tunnel = self.get(name).ok_or(RouteError::Offline)?;
        if !tunnel.publishes(head.port) {
            return Err(RouteError::PortNotServed.into());
        }
        let table = tunnel.access();
        let granted = access.check(&table, head, visitor, host).await.map_err(Denied::Access)?;
        granted.apply(head, tunnel.version);
        Ok(tunnel.open_stream().await?)
    }

    /// The tunnel registered as `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Tunnel>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// An id for a new tunnel.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a tunnel, returning the one it replaces.
    pub(crate) fn insert(&self, t: Arc<Tunnel>) -> Option<Arc<Tunnel>> {
        self.map.write().unwrap_or_else(|e| e.into_inner()).insert(t.name.clone(), t)
    }

    /// Removes `name` if tunnel `id` still holds it; returns whether it did.
    pub(crate) fn remove(&self, name: &str, id: u64) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|t| t.id == id) {
            map.remove(name);
            return true;
        }
        false
    }

    /// Sets the TLS passthrough ports of `tunnel`.
    pub(crate) fn set_tls_ports(&self, tunnel: &Tunnel, ports: Vec<u16>) {
        let mut held = tunnel.tls_ports.write().unwrap_or_else(|e| e.into_inner());
        match (held.is_empty(), ports.is_empty()) {
            (true, false) => self.tls_holders.fetch_add(1, Ordering::Relaxed),
            (false, true) => self.tls_holders.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
        *held = ports;
    }

    /// Whether any node passes TLS through (then visitors' ClientHellos are read first).
    pub(crate) fn any_tls_passthrough(&self) -> bool {
        self.tls_holders.load(Ordering::Relaxed) > 0
    }

    /// Names of the registered nodes.
    pub(crate) fn names(&self) -> Vec<String> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Number of registered tunnels.
    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes a replaced tunnel once the `max` stream slots of its requests are all free
    /// again (they have finished), or after `limit`.
    pub(crate) async fn retire(self: Arc<Self>, old: Arc<Tunnel>, max: u32, limit: Duration) {
        self.retiring.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&old));
        let idle = old.streams.clone().acquire_many_owned(max);
        tokio::select! {
            _ = tokio::time::timeout(limit, idle) => old.conn.close(2, "replaced by a newer connection"),
            _ = old.conn.closed() => {}
        }
        let gone = Arc::as_ptr(&old);
        self.retiring.lock().unwrap_or_else(|e| e.into_inner()).retain(|t| t.strong_count() > 0 && t.as_ptr() != gone);
    }

    /// Closes the tunnels (the retiring ones too) registered with a token in `revoked`;
    /// returns how many.
    pub(crate) fn close_revoked(&self, revoked: &std::collections::HashSet<String>) -> usize {
        let is_revoked = |t: &Tunnel| t.credential.as_ref().is_some_and(|(id, _)| revoked.contains(id));
        let mut n = 0;
        for t in self.map.read().unwrap_or_else(|e| e.into_inner()).values().filter(|t| is_revoked(t)) {
            t.conn.close(3, "token revoked");
            n += 1;
        }
        for t in self.retiring.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(std::sync::Weak::upgrade) {
            if is_revoked(&t) {
                t.conn.close(3, "token revoked");
            }
        }
        n
    }

    /// Closes every tunnel, the retiring ones too (shutdown).
    pub(crate) fn close_all(&self) {
        for t in self.map.read().unwrap_or_else(|e| e.into_inner()).values() {
            t.conn.close(0, "edge shutting down");
        }
        for t in self.retiring.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(std::sync::Weak::upgrade) {
            t.conn.close(0, "edge shutting down");
        }
    }
}

/// A custom domain a node asked for, and whether its proof holds.
#[derive(Debug, Clone)]
pub(crate) struct DomainEntry {
    pub(crate) domain: String,
    pub(crate) name: String,
    pub(crate) tunnel: u64,
    pub(crate) served: bool,
}

/// Every node's custom domains on this edge (see `domains` for the proofs).
#[derive(Debug, Default)]
pub(crate) struct CustomDomains {
    entries: RwLock<Vec<DomainEntry>>,
}

impl CustomDomains {
    /// The node name a served custom domain belongs to.
    pub(crate) fn name_for(&self, host: &str) -> Option<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.iter().find(|e| e.served && e.domain == host).map(|e| e.name.clone())
    }

    /// Replaces tunnel `tunnel`'s wish (node `name`): kept domains keep their state.
    pub(crate) fn set_wish(&self, tunnel: u64, name: &str, wanted: &[String]) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let kept: HashSet<&String> = wanted.iter().collect();
        let old: Vec<DomainEntry> = entries.iter().filter(|e| e.tunnel == tunnel).cloned().collect();
        entries.retain(|e| e.tunnel != tunnel);
        for d in kept {
            let served = old.iter().any(|e| &e.domain == d && e.served);
            entries.push(DomainEntry { domain: d.clone(), name: name.to_owned(), tunnel, served });
        }
    }

    /// Forgets a closed tunnel's domains.
    pub(crate) fn remove_tunnel(&self, tunnel: u64) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).retain(|e| e.tunnel != tunnel);
    }

    pub(crate) fn set_served(&self, tunnel: u64, domain: &str, served: bool) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        for e in entries.iter_mut().filter(|e| e.tunnel == tunnel && e.domain == domain) {
            e.served = served;
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<DomainEntry> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_valid_labels_under_the_domain() {
        assert_eq!(name_in("web.funnel.example", "funnel.example"), Some("web"));
        assert_eq!(name_in("funnel.example", "funnel.example"), None);
        assert_eq!(name_in("a.b.funnel.example", "funnel.example"), None);
        assert_eq!(name_in("webfunnel.example", "funnel.example"), None);
        assert_eq!(name_in("web.other.example", "funnel.example"), None);
    }

    #[test]
    fn every_error_has_its_status_and_page() {
        let all = [
            RouteError::UnknownHost,
            RouteError::Offline,
            RouteError::PortNotServed,
            RouteError::Busy,
            RouteError::RateLimited,
            RouteError::NodeUnreachable,
            RouteError::NodeTimeout,
            RouteError::BadNodeResponse,
        ];
        for e in all {
            let page = e.page();
            assert_eq!(page.status(), e.status());
            assert_eq!(page.headers().contains_key(header::RETRY_AFTER), e == RouteError::RateLimited, "{e}");
        }
    }

    #[test]
    fn a_new_wish_keeps_the_state_of_kept_domains() {
        let d = CustomDomains::default();
        d.set_wish(1, "web", &["a.example".into(), "b.example".into()]);
        d.set_served(1, "a.example", true);
        assert_eq!(d.name_for("a.example"), Some("web".into()));
        assert_eq!(d.name_for("b.example"), None, "not proven");
        d.set_wish(1, "web", &["a.example".into()]);
        assert_eq!(d.name_for("a.example"), Some("web".into()), "kept and still served");
        d.remove_tunnel(1);
        assert_eq!(d.name_for("a.example"), None);
    }
}
