//! A running node: the shell around [`crate::core::NodeCore`].
//!
//! Tasks, both on the node's [`TaskTracker`] and stopped by [`Node::shutdown`]:
//! - the **shell** owns the UDP socket: it feeds commands, datagrams, relay events and the
//!   core's timer into the core, then acts on its events and sends what it transmits (direct
//!   datagrams on the socket, relay frames to the relay link the core names);
//! - the **relay links** ([`crate::relay_link`]): the connection to the home relay the core
//!   chose, and one to a relay of each other region where peers the node talks to are homed,
//!   opened and closed as the core says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::OsRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_relay_proto::{PublicKey, SecretKey};

use crate::core::disco;
use crate::core::paths::Path;
use crate::core::{Destination, Event, HomeTarget, Link, NodeCore, Settings};
pub use crate::core::{HomeStatus, LinkStatus, PeerStatus, Received, RegionSource, Status};
use crate::regionmap::{RegionMap, UnknownRegion};
use crate::relay_link::{RelayEvent, RelayEventKind, RelayTask};
use warren_relay_proto::Frame;

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's identity.
    pub secret: SecretKey,
    /// Relays to choose a home from.
    pub region_map: RegionMap,
    /// Extra CA to trust for relays (e.g. a dev CA).
    pub ca_file: Option<PathBuf>,
    /// UDP socket for direct paths and STUN.
    pub udp_bind: SocketAddr,
    /// How often to re-run STUN (endpoints and region latency).
    pub stun_interval: Duration,
    /// How often to reconsider the home region.
    pub rehome_interval: Duration,
    /// Never use direct paths: advertise no endpoints, send no direct pings, ignore direct
    /// datagrams. Every packet goes through the relay.
    pub relay_only: bool,
    /// The HTTP proxy setting for relay connections.
    pub proxy: crate::net::ProxyChoice,
    /// A link to another region's relay unused for this long is closed.
    pub link_idle: Duration,
    /// Peers' home regions the user knows (`KEY@REGION`), until the peers say otherwise.
    pub peer_hints: Vec<(PublicKey, u32)>,
}

impl NodeConfig {
    /// Defaults: UDP on an ephemeral port, STUN every 20 s, home reconsidered every 30 s.
    pub fn new(secret: SecretKey, region_map: RegionMap) -> Self {
        NodeConfig {
            secret,
            region_map,
            ca_file: None,
            udp_bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            stun_interval: Duration::from_secs(20),
            rehome_interval: Duration::from_secs(30),
            relay_only: false,
            proxy: crate::net::ProxyChoice::FromEnv,
            link_idle: Duration::from_secs(60),
            peer_hints: Vec::new(),
        }
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// The packet is larger than a peer message can carry.
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    /// No answer in time.
    #[error("no answer within the deadline")]
    Timeout,
    /// A peer address that is not `KEY` or `KEY@REGION`.
    #[error("peer must be 64 hex digits, optionally followed by @REGION")]
    BadPeer,
    /// `KEY@REGION` names a region the map does not have.
    #[error(transparent)]
    UnknownRegion(#[from] UnknownRegion),
}

enum Cmd {
    Send(PublicKey, Bytes),
    Status(oneshot::Sender<Status>),
    Ping(PublicKey, oneshot::Sender<(Path, Duration)>),
    Hint(PublicKey, u32),
}

/// A running node. Dropping it stops it; [`Node::shutdown`] also waits for its tasks.
#[derive(Debug)]
pub struct Node {
    cmds: mpsc::Sender<Cmd>,
    received: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    public: PublicKey,
    region_map: RegionMap,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Node {
    /// Binds the UDP socket and starts the node's tasks.
    ///
    /// # Errors
    /// [`NodeError::Bind`] if the socket cannot be bound.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let socket = UdpSocket::bind(config.udp_bind)
            .await
            .map_err(|source| NodeError::Bind { addr: config.udp_bind, source })?;
        let socket = Arc::new(socket);
        let cancel = CancellationToken::new();
        let (cmds_tx, cmds) = mpsc::channel(256);
        let (received_tx, received) = mpsc::channel(4096);
        let (home_tx, home_rx) = watch::channel(None);
        let (relay_events_tx, relay_events) = mpsc::channel(4096);
        let public = config.secret.public_key();
        let tasks = TaskTracker::new();
        let spawner = LinkSpawner {
            secret: config.secret.clone(),
            ca_file: config.ca_file.clone(),
            proxy: config.proxy.clone(),
            events: relay_events_tx,
            tasks: tasks.clone(),
            cancel: cancel.clone(),
        };
        let relay_out = spawner.spawn(Link::Home, 0, home_rx, cancel.clone());
        let settings = Settings {
            secret: config.secret,
            region_map: config.region_map.clone(),
            stun_interval: config.stun_interval,
            rehome_interval: config.rehome_interval,
            relay_only: config.relay_only,
            link_idle: config.link_idle,
        };
        let mut core = NodeCore::new(settings, OsRng, Instant::now());
        for (peer, region) in config.peer_hints {
            core.handle_hint(peer, region);
        }
        let shell = Shell {
            core,
            socket,
            home_tx,
            relay_out,
            links: HashMap::new(),
            next_epoch: 1,
            spawner,
            received: received_tx,
            pings: HashMap::new(),
        };
        tasks.spawn(shell.run(cmds, relay_events, cancel.clone()));
        // Region links are spawned later, while the shell (still tracked) runs.
        tasks.close();
        info!(key = %public, "node started");
        Ok(Node {
            cmds: cmds_tx,
            received: tokio::sync::Mutex::new(received),
            cancel,
            tasks,
            public,
            region_map: config.region_map,
        })
    }

    /// Parses a peer address, `KEY` or `KEY@REGION` (a region id or code of the node's map).
    ///
    /// # Errors
    /// [`NodeError::BadPeer`], or [`NodeError::UnknownRegion`] naming the regions there are.
    pub fn parse_peer(&self, s: &str) -> Result<(PublicKey, Option<u32>), NodeError> {
        parse_peer(s, &self.region_map)
    }

    /// Says where `peer` is homed (a `KEY@REGION` hint); the peer's own word replaces it.
    ///
    /// # Errors
    /// [`NodeError::Stopped`].
    pub async fn hint(&self, peer: PublicKey, region: u32) -> Result<(), NodeError> {
        self.cmds.send(Cmd::Hint(peer, region)).await.map_err(|_| NodeError::Stopped)
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Sends a packet to a peer over the best path.
    ///
    /// # Errors
    /// [`NodeError::TooLarge`] or [`NodeError::Stopped`].
    pub async fn send(&self, peer: PublicKey, data: Bytes) -> Result<(), NodeError> {
        if data.len() > disco::MAX_DATA {
            return Err(NodeError::TooLarge(data.len()));
        }
        self.cmds.send(Cmd::Send(peer, data)).await.map_err(|_| NodeError::Stopped)
    }

    /// Receives the next packet from any peer.
    ///
    /// # Errors
    /// [`NodeError::Stopped`].
    pub async fn recv(&self) -> Result<Received, NodeError> {
        self.received.lock().await.recv().await.ok_or(NodeError::Stopped)
    }

    /// The node's state now.
    ///
    /// # Errors
    /// [`NodeError::Stopped`].
    pub async fn status(&self) -> Result<Status, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Status(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Pings a peer over its current path; returns the path and round-trip time.
    ///
    /// # Errors
    /// [`NodeError::Timeout`] after `timeout`, [`NodeError::Stopped`].
    pub async fn ping(&self, peer: PublicKey, timeout: Duration) -> Result<(Path, Duration), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Ping(peer, tx)).await.map_err(|_| NodeError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    /// Stops the node (without waiting; see [`Node::shutdown`]).
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Stops the node and waits until its tasks have ended (the relay connection closed).
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.wait().await;
    }
}

/// `KEY` or `KEY@REGION`, the region by id or code of `map`.
///
/// # Errors
/// [`NodeError::BadPeer`] or [`NodeError::UnknownRegion`].
pub fn parse_peer(s: &str, map: &RegionMap) -> Result<(PublicKey, Option<u32>), NodeError> {
    let (key, region) = split_peer(s)?;
    let region = region.map(|r| map.resolve(r)).transpose()?;
    Ok((key, region))
}

/// `KEY` or `KEY@REGION`: the key, and the region as written (for a check without the map).
///
/// # Errors
/// [`NodeError::BadPeer`].
pub fn split_peer(s: &str) -> Result<(PublicKey, Option<&str>), NodeError> {
    let (key, region) = match s.split_once('@') {
        Some((k, r)) => (k, Some(r.trim())),
        None => (s, None),
    };
    let key = PublicKey::from_hex(key.trim()).map_err(|_| NodeError::BadPeer)?;
    Ok((key, region))
}

/// What a new relay link needs; the shell starts one per region link.
struct LinkSpawner {
    secret: SecretKey,
    ca_file: Option<PathBuf>,
    proxy: crate::net::ProxyChoice,
    events: mpsc::Sender<RelayEvent>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl LinkSpawner {
    /// A token cancelled with the node, or on its own.
    fn cancel_child(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// Starts the link's task; returns the queue of frames it sends.
    fn spawn(
        &self,
        link: Link,
        epoch: u64,
        target: watch::Receiver<Option<HomeTarget>>,
        cancel: CancellationToken,
    ) -> mpsc::Sender<Frame> {
        let (out_tx, out) = mpsc::channel(4096);
        let task = RelayTask {
            link,
            epoch,
            secret: self.secret.clone(),
            ca_file: self.ca_file.clone(),
            proxy: self.proxy.clone(),
            home: target,
            events: self.events.clone(),
            out,
            cancel,
        };
        self.tasks.spawn(task.run());
        out_tx
    }
}

/// A running link to another region's relay.
struct RegionLink {
    epoch: u64,
    target: watch::Sender<Option<HomeTarget>>,
    out: mpsc::Sender<Frame>,
    cancel: CancellationToken,
}

/// The node's socket, its relay links' queues, and the core they feed.
struct Shell {
    core: NodeCore<OsRng>,
    socket: Arc<UdpSocket>,
    home_tx: watch::Sender<Option<HomeTarget>>,
    relay_out: mpsc::Sender<Frame>,
    links: HashMap<u32, RegionLink>,
    /// The epoch of the next region link's task.
    next_epoch: u64,
    spawner: LinkSpawner,
    received: mpsc::Sender<Received>,
    /// Explicit pings waiting for their answer, by the core's id.
    pings: HashMap<u64, oneshot::Sender<(Path, Duration)>>,
}

impl Shell {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut relay: mpsc::Receiver<RelayEvent>,
        cancel: CancellationToken,
    ) {
        self.resolve_stun_servers().await;
        let socket = self.socket.clone();
        let mut buf = vec![0u8; 65_536];
        loop {
            let wake = tokio::time::Instant::from_std(self.core.poll_timeout());
            // Cancel safety: mpsc recv, UdpSocket::recv_from and sleep_until lose nothing when
            // another branch wins; the timer is re-armed from the core every round.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
                Some(ev) = relay.recv() => self.on_relay(ev),
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.core.handle_datagram(from, &buf[..n], Instant::now()),
                    Err(e) => debug!(error = %e, "udp receive error"),
                },
                _ = tokio::time::sleep_until(wake) => self.core.handle_timeout(Instant::now()),
            }
            self.drive().await;
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Send(peer, data) => self.core.handle_send(peer, data, now),
            Cmd::Status(reply) => {
                let udp_local = self.socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let _ = reply.send(self.core.status(now, udp_local));
            }
            Cmd::Ping(peer, reply) => {
                if let Some(id) = self.core.handle_ping(peer, now) {
                    self.pings.insert(id, reply);
                }
            }
            Cmd::Hint(peer, region) => self.core.handle_hint(peer, region),
        }
    }

    fn on_relay(&mut self, ev: RelayEvent) {
        let now = Instant::now();
        let link = ev.link;
        // A closed region link's last words are not news, even once the region has a new one.
        if let Link::Region(r) = link {
            if self.links.get(&r).is_none_or(|l| l.epoch != ev.epoch) {
                return;
            }
        }
        match ev.kind {
            RelayEventKind::Connected => self.core.handle_relay_connected(link),
            RelayEventKind::Lost(url) => self.core.handle_relay_lost(link, url, now),
            RelayEventKind::Packet(src, data) => self.core.handle_relay_packet(link, src, &data, now),
            RelayEventKind::Gone(peer, reason) => self.core.handle_peer_gone(link, peer, reason, now),
            RelayEventKind::Presence(peer, present) => self.core.handle_presence(link, peer, present, now),
        }
    }

    /// The queue of frames for `link`; None for a region link that is not open.
    fn link_out(&self, link: Link) -> Option<&mpsc::Sender<Frame>> {
        match link {
            Link::Home => Some(&self.relay_out),
            Link::Region(r) => self.links.get(&r).map(|l| &l.out),
        }
    }

    /// Acts on the core's events, then sends what it transmits (a region link the core just
    /// opened is there for its first packet).
    async fn drive(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Received(r) => {
                    let _ = self.received.try_send(r);
                }
                Event::HomeChanged(target) => {
                    self.home_tx.send_replace(Some(target));
                }
                Event::LinkOpen(target) => self.open_link(target),
                Event::LinkClosed(region) => {
                    if let Some(l) = self.links.remove(&region) {
                        l.cancel.cancel();
                    }
                }
                Event::PingAnswered { id, path, rtt } => {
                    if let Some(reply) = self.pings.remove(&id) {
                        let _ = reply.send((path, rtt));
                    }
                }
                Event::PingExpired(id) => {
                    self.pings.remove(&id);
                }
            }
        }
        while let Some(t) = self.core.poll_transmit() {
            match t.dst {
                Destination::Direct(to) => {
                    if let Err(e) = self.socket.send_to(&t.payload, to).await {
                        debug!(%to, error = %e, "direct send failed");
                    }
                }
                // A full relay queue drops the packet, as a congested path would.
                Destination::Relay { link, peer } => {
                    if let Some(out) = self.link_out(link) {
                        let _ = out.try_send(Frame::SendPacket { dst: peer, packet: t.payload });
                    }
                }
                Destination::Find { link, peer } => {
                    if let Some(out) = self.link_out(link) {
                        let _ = out.try_send(Frame::FindPeer { peer });
                    }
                }
            }
        }
    }

    /// Starts the link to `target`'s region, or moves the running one to that relay.
    fn open_link(&mut self, target: HomeTarget) {
        let region = target.region_id;
        if let Some(l) = self.links.get(&region) {
            l.target.send_replace(Some(target));
            return;
        }
        let (target_tx, target_rx) = watch::channel(Some(target));
        // Closed with the node, or alone when the core closes it.
        let cancel = self.spawner.cancel_child();
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let out = self.spawner.spawn(Link::Region(region), epoch, target_rx, cancel.clone());
        self.links.insert(region, RegionLink { epoch, target: target_tx, out, cancel });
    }

    /// Resolves each region's STUN server and learns our LAN endpoint.
    async fn resolve_stun_servers(&mut self) {
        let mut servers = Vec::new();
        for region in self.core.region_map().regions() {
            let Some(node) = region.nodes.first() else { continue };
            let Some(port) = node.stun_port() else { continue };
            let addr = match node.ipv4.or(node.ipv6) {
                Some(ip) => Some(SocketAddr::new(ip, port)),
                None => tokio::net::lookup_host((node.host_name.as_str(), port)).await.ok().and_then(|mut a| a.next()),
            };
            match addr {
                Some(a) => servers.push((region.region_id, a)),
                None => warn!(region = region.region_id, host = %node.host_name, "cannot resolve STUN server"),
            }
        }
        // The source address the OS would use towards the first relay: our LAN endpoint.
        if let Some((_, server)) = servers.first() {
            let unspecified: std::net::IpAddr =
                if server.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
            let probe = UdpSocket::bind(SocketAddr::new(unspecified, 0)).await;
            if let (Ok(p), Ok(local)) = (probe, self.socket.local_addr()) {
                if p.connect(server).await.is_ok() {
                    if let Ok(src) = p.local_addr() {
                        self.core.set_local_endpoint(SocketAddr::new(src.ip(), local.port()));
                    }
                }
            }
        }
        self.core.set_stun_servers(servers);
    }
}
