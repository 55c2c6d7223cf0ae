//! The region mesh: relays of one region forward to each other's clients.
//!
//! ```text
//!  relay A                                   relay B
//!  link to B ── ClientInfo{meshKey} ──────▶  mesh connection (conn.rs)
//!            ── WatchConns ───────────────▶  snapshot of B's clients, then every change
//!            ◀── PeerPresent / PeerGone ───
//!            ── ForwardPacket{src,dst} ───▶  RecvPacket{src} to dst, if dst is on B
//! ```
//!
//! Every relay dials every sibling (from `[mesh] peers` and/or a DNS name) with the region's
//! mesh key and learns which keys the sibling holds. A SendPacket for a key that is not local
//! but held by a sibling goes to that sibling once, as ForwardPacket; the sibling delivers it
//! only to its own clients (one hop, never onward). A link that drops forgets everything it
//! taught and reconnects with jittered backoff; the sibling's snapshot resyncs it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_common::limits::Backoff;
use warren_common::url::RelayUrl;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::handshake::ClientInfo;
use warren_relay_proto::Frame;

use crate::config::MeshConfig;
use crate::core::router::SiblingLink;
use crate::core::sibling::{on_link_frame, LinkStep};
use crate::metrics::DropReason;
use crate::state::Shared;

/// Packets waiting for one sibling link.
const LINK_QUEUE: usize = 8192;
/// ForwardPacket frames written per batch.
const LINK_BATCH: usize = 256;
/// Deadline for dialling and logging in to a sibling.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay between attempts to reach a sibling: 100 ms doubling to 10 s, jittered.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// One sibling to dial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    url: RelayUrl,
    addr: Option<SocketAddr>,
}

/// The links this relay keeps to its siblings: one per `[mesh] peers` URL, plus the resolver
/// of the mesh DNS name with one link per address. A reload changes them in place.
#[derive(Debug, Default)]
pub(crate) struct Mesh {
    config: Option<MeshConfig>,
    links: HashMap<RelayUrl, CancellationToken>,
    resolver: Option<CancellationToken>,
    ids: Arc<AtomicU64>,
}

/// What [`Mesh::apply`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MeshChange {
    /// Links started.
    pub(crate) added: usize,
    /// Links stopped.
    pub(crate) removed: usize,
}

impl Mesh {
    /// Brings the links in line with `next`: links to siblings that left the list stop, new
    /// siblings are dialled, the others are left alone. A change of the key, TLS name, CA or
    /// DNS name restarts every link, so that each logs in with what is configured now.
    /// Everything stops when the relay's connections close.
    pub(crate) fn apply(
        &mut self,
        shared: &Arc<Shared>,
        next: Option<MeshConfig>,
        tracker: &TaskTracker,
    ) -> MeshChange {
        let mut change = MeshChange::default();
        let same_login = match (&self.config, &next) {
            (Some(a), Some(b)) => {
                (&a.key, &a.tls_name, &a.ca_file, &a.dns, a.resolve_interval)
                    == (&b.key, &b.tls_name, &b.ca_file, &b.dns, b.resolve_interval)
            }
            (None, None) => true,
            _ => false,
        };
        if !same_login {
            change.removed += self.links.len() + usize::from(self.resolver.is_some());
            self.links.drain().for_each(|(_, stop)| stop.cancel());
            if let Some(stop) = self.resolver.take() {
                stop.cancel();
            }
        }
        let Some(mesh) = next else {
            self.config = None;
            return change;
        };
        self.links.retain(|url, stop| {
            let keep = mesh.peers.contains(url);
            if !keep {
                info!(%url, "mesh sibling removed from the configuration");
                stop.cancel();
                change.removed += 1;
            }
            keep
        });
        for url in &mesh.peers {
            if self.links.contains_key(url) {
                continue;
            }
            let stop = shared.conns_cancel.child_token();
            let target = Target { url: url.clone(), addr: None };
            tracker.spawn(run_link(shared.clone(), mesh.clone(), target, self.ids.clone(), stop.clone()));
            self.links.insert(url.clone(), stop);
            change.added += 1;
        }
        if mesh.dns.is_some() && self.resolver.is_none() {
            let stop = shared.conns_cancel.child_token();
            tracker.spawn(resolve_loop(shared.clone(), mesh.clone(), self.ids.clone(), tracker.clone(), stop.clone()));
            self.resolver = Some(stop);
            change.added += 1;
        }
        self.config = Some(mesh);
        change
    }
}

/// Keeps one link per address of the mesh DNS name, until `cancel`.
async fn resolve_loop(
    shared: Arc<Shared>,
    mesh: MeshConfig,
    ids: Arc<AtomicU64>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let Some((name, port)) = mesh.dns.clone() else { return };
    let mut links: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(addrs) => {
                let now: HashSet<SocketAddr> = addrs.collect();
                links.retain(|addr, stop| {
                    let keep = now.contains(addr);
                    if !keep {
                        info!(%addr, "mesh sibling left the DNS name");
                        stop.cancel();
                    }
                    keep
                });
                for addr in now {
                    if links.contains_key(&addr) {
                        continue;
                    }
                    let stop = cancel.child_token();
                    let url = RelayUrl { tls: true, host: mesh.tls_name.clone(), port, path: "/derp".into() };
                    let target = Target { url, addr: Some(addr) };
                    tracker.spawn(run_link(shared.clone(), mesh.clone(), target, ids.clone(), stop.clone()));
                    links.insert(addr, stop);
                }
            }
            Err(e) => warn!(%name, error = %e, "cannot resolve the mesh DNS name; keeping current siblings"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(mesh.resolve_interval) => {}
        }
    }
}

/// Dials one sibling until the relay stops; returns early if the target is this relay.
async fn run_link(
    shared: Arc<Shared>,
    mesh: MeshConfig,
    target: Target,
    ids: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let info = ClientInfo { mesh_key: mesh.key.expose().to_owned(), ..ClientInfo::node() };
    let opts = ConnectOptions {
        ca_file: mesh.ca_file.clone(),
        connect_addr: target.addr,
        info,
        timeout: CONNECT_TIMEOUT,
        ..Default::default()
    };
    let mut failures = 0u32;
    let mut last_warning: Option<Instant> = None;
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            c = DerpClient::connect_url(&target.url, &shared.secret, &opts) => c,
        };
        match connected {
            Ok(client) if client.server_key() == shared.public => {
                debug!(url = %target.url, addr = ?target.addr, "mesh peer is this relay; not linking to it");
                return;
            }
            Ok(client) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let why = serve_link(&shared, client, id, &cancel).await;
                shared.router.forget_link(id);
                shared.metrics.mesh_remote_clients.set(shared.router.sibling_keys() as f64);
                if cancel.is_cancelled() {
                    return;
                }
                warn!(url = %target.url, addr = ?target.addr, reason = why, "mesh link lost; reconnecting");
                failures = if started.elapsed() > Duration::from_secs(10) { 0 } else { failures + 1 };
            }
            Err(e) => {
                failures += 1;
                // One warning per sibling per minute while it stays unreachable.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    warn!(url = %target.url, addr = ?target.addr, error = %e, kind = e.kind(), "cannot reach mesh sibling");
                    last_warning = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(BACKOFF.delay(failures)) => {}
        }
    }
}

/// Runs one logged-in link: watch the sibling's clients, forward packets to it.
///
/// Cancel safety of the loop: `recv` on the mpsc channel and [`DerpClient::recv`] lose nothing
/// when dropped; the ticks are re-armed each round. Writes happen in branch bodies.
async fn serve_link(shared: &Shared, mut client: DerpClient, id: u64, cancel: &CancellationToken) -> &'static str {
    let (tx, mut rx) = mpsc::channel(LINK_QUEUE);
    let link = SiblingLink { id, tx };
    if client.send(&Frame::WatchConns).await.is_err() {
        return "write failed";
    }
    let m = &shared.metrics;
    m.mesh_peers.increment(1.0);
    shared.mesh_links.fetch_add(1, Ordering::Relaxed);
    info!(sibling = %client.server_key().short(), "mesh link up");
    let config = shared.config();
    let (write_timeout, interval) = (config.write_timeout, config.keepalive_interval);
    drop(config);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last_rx = Instant::now();
    let why = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break "link stopped (relay shutting down, or sibling removed)",
            Some(first) = rx.recv() => {
                let mut n = 0u64;
                let mut next = Some(first);
                while let Some(f) = next.take() {
                    if client.queue(&f.into_frame()).is_ok() {
                        n += 1;
                    }
                    if n < LINK_BATCH as u64 {
                        next = rx.try_recv().ok();
                    }
                }
                m.mesh_forwarded_out.increment(n);
                if tokio::time::timeout(write_timeout, client.flush()).await.map_or(true, |r| r.is_err()) {
                    m.dropped(DropReason::MeshLinkDown, n);
                    break "write failed or timed out";
                }
            }
            frame = client.recv() => {
                last_rx = Instant::now();
                let Ok(frame) = frame else { break "connection closed" };
                match on_link_frame(&shared.router, &link, frame) {
                    LinkStep::None => {}
                    LinkStep::Pong(d) => {
                        if client.send(&Frame::Pong(d)).await.is_err() {
                            break "write failed";
                        }
                    }
                    LinkStep::SiblingRestarting => info!(sibling = %client.server_key().short(), "mesh sibling is draining"),
                }
                m.mesh_remote_clients.set(shared.router.sibling_keys() as f64);
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > interval * 2 {
                    break "sibling silent for two keep-alive intervals";
                }
                let mut data = [0u8; 8];
                OsRng.fill_bytes(&mut data);
                if client.send(&Frame::Ping(data)).await.is_err() {
                    break "write failed";
                }
            }
        }
    };
    m.mesh_peers.decrement(1.0);
    shared.mesh_links.fetch_sub(1, Ordering::Relaxed);
    rx.close();
    let mut left = 0;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    m.dropped(DropReason::MeshLinkDown, left);
    why
}
