//! The state the edge's tasks share, handed to the proxy, the tunnel acceptor and the admin
//! listener (the cluster gets only what it needs: see `cluster::LocalRoutes`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tracing::warn;
use warren_common::limits::{AcceptGate, ConnSlot, LogLimiter, Rejected, TokenBucket};

use crate::access::EdgeAccess;
use crate::acme::Acme;
use crate::cluster::{Cluster, LocalRoutes};
use crate::config::Config;
use crate::metrics::{EdgeMetrics, Limited};
use crate::routes::Routes;

/// State shared by the edge's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) routes: Arc<Routes>,
    /// Access floors, forward-auth endpoints and the password checker.
    pub(crate) access: Arc<EdgeAccess>,
    pub(crate) metrics: EdgeMetrics,
    pub(crate) public_ports: Vec<u16>,
    /// Upgraded (WebSocket) connections, waited for on drain.
    pub(crate) tasks: TaskTracker,
    /// Long-lived tasks (node tunnels, visitor connections, certificate orders): tracked, and
    /// awaited briefly when the edge stops, but not what the drain waits for.
    pub(crate) background: TaskTracker,
    /// Certificates per name from ACME, when configured (not with a wildcard).
    pub(crate) acme: Option<Arc<Acme>>,
    /// Sibling edges sharing state, when configured.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The QUIC endpoint: node tunnels in, peer links in and out.
    pub(crate) endpoint: quinn::Endpoint,
    /// Visitor accept rate and connections per source address.
    pub(crate) visitor_gate: AcceptGate,
    /// Node tunnel handshakes per second.
    pub(crate) tunnel_rate: std::sync::Mutex<TokenBucket>,
    /// Keeps limit logs to one line per few seconds under a flood.
    pub(crate) limit_log: LogLimiter,
    pub(crate) draining: AtomicBool,
    /// TCP ports nodes hold.
    pub(crate) tcp_ports: crate::tcp_ports::TcpPorts,
    /// Nodes' custom domains.
    pub(crate) domains: crate::routes::CustomDomains,
    /// Ids of revoked signed tokens, as last read from the store.
    pub(crate) revoked: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl Shared {
    /// Counts what a limit turned away; logs it at most every 10 s.
    pub(crate) fn limited(&self, why: Limited) {
        self.metrics.limited(why);
        if let Some(held_back) = self.limit_log.allow() {
            warn!(reason = why.label(), held_back, "turned away by a limit (logged at most every 10 s)");
        }
    }

    /// Admits a visitor connection from `ip` (accept rate, connections per address), or counts
    /// why not.
    pub(crate) fn admit_visitor(&self, ip: std::net::IpAddr) -> Option<ConnSlot> {
        match self.visitor_gate.admit(ip, std::time::Instant::now()) {
            Ok(slot) => Some(slot),
            Err(why) => {
                self.limited(match why {
                    Rejected::AcceptRate => Limited::AcceptRate,
                    Rejected::PerIp => Limited::PerIp,
                });
                None
            }
        }
    }

    /// Takes one node tunnel handshake from the rate, or counts that it was over.
    pub(crate) fn admit_tunnel(&self) -> bool {
        let allowed =
            self.tunnel_rate.lock().unwrap_or_else(|e| e.into_inner()).try_take(std::time::Instant::now(), 1.0);
        if !allowed {
            self.limited(Limited::TunnelRate);
        }
        allowed
    }

    /// The requested ports this edge serves, in its listeners' order.
    pub(crate) fn served_ports(&self, requested: &[u16]) -> Vec<u16> {
        self.public_ports.iter().copied().filter(|p| requested.contains(p)).collect()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// What a sibling's forwarded requests need.
    pub(crate) fn local_routes(&self) -> LocalRoutes {
        LocalRoutes {
            routes: self.routes.clone(),
            access: self.access.clone(),
            funnel_domain: self.config.funnel_domain.as_str().into(),
        }
    }
}
