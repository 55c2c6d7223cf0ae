//! Test helpers for the core: keys, handles, a clock reading and a relay to route through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use warren_relay_proto::PublicKey;

use super::inbox::Inbox;
use super::router::{ClientHandle, Router};
use super::Ctx;
use crate::metrics::RelayMetrics;

/// A key made of one repeated byte.
pub(crate) fn key(b: u8) -> PublicKey {
    PublicKey::from_bytes([b; 32])
}

/// A starting time; tests move it forward themselves.
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// A table entry for connection `conn_id` whose inbox holds one packet.
pub(crate) fn handle(conn_id: u64) -> (ClientHandle, Arc<Inbox>) {
    let inbox = Arc::new(Inbox::new(1, 1 << 20));
    let remote = SocketAddr::from(([127, 0, 0, 1], 1000 + conn_id as u16));
    (ClientHandle { conn_id, remote, inbox: inbox.clone() }, inbox)
}

/// A router and metrics handles (no recorder: counting is a no-op).
#[derive(Debug, Default)]
pub(crate) struct Relay {
    pub(crate) router: Router,
    pub(crate) metrics: RelayMetrics,
}

impl Relay {
    pub(crate) fn ctx(&self) -> Ctx<'_> {
        Ctx { router: &self.router, metrics: &self.metrics }
    }
}
