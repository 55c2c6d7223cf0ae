//! The state every task of one relay shares, handed to the shells around the core.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warren_common::limits::{AcceptGate, LogLimiter};
use warren_relay_proto::{PublicKey, SecretKey};

use crate::admission::Admission;
use crate::config::Config;
use crate::core::router::Router;
use crate::metrics::RelayMetrics;

/// State shared by every task of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) secret: SecretKey,
    pub(crate) public: PublicKey,
    /// The configuration in force: replaced whole by a reload. A connection takes one snapshot
    /// when it starts and keeps it, so a reload changes the limits of connections made after
    /// it; tasks that must follow (STUN) subscribe.
    pub(crate) live: watch::Sender<Arc<Config>>,
    /// Where packets go: local clients, keys held by mesh siblings.
    pub(crate) router: Router,
    /// Mesh links up.
    pub(crate) mesh_links: std::sync::atomic::AtomicUsize,
    pub(crate) metrics: RelayMetrics,
    /// Who may log in (replaced by a reload that changes it).
    pub(crate) admission: RwLock<Arc<Admission>>,
    /// Accept rate and connections per source address.
    pub(crate) gate: AcceptGate,
    /// Keeps "connection rejected" logs to one line per few seconds under a flood.
    pub(crate) reject_log: LogLimiter,
    /// Fires when connections must close (end of drain).
    pub(crate) conns_cancel: CancellationToken,
    pub(crate) draining: AtomicBool,
    pub(crate) next_conn_id: AtomicU64,
}

impl Shared {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The configuration in force now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.live.borrow().clone()
    }

    /// The admission policy in force now.
    pub(crate) fn admission(&self) -> Arc<Admission> {
        self.admission.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// What a core session needs of the relay.
    pub(crate) fn ctx(&self) -> crate::core::Ctx<'_> {
        crate::core::Ctx { router: &self.router, metrics: &self.metrics }
    }
}
