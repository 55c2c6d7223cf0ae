//! A running node: the shell around [`crate::core::NodeCore`].
//!
//! Tasks, both on the node's [`TaskTracker`] and stopped by [`Node::shutdown`]:
//! - the **shell** owns the UDP socket: it feeds commands, datagrams, relay events and the
//!   core's timer into the core, then sends what the core transmits (direct datagrams on the
//!   socket, relay packets to the relay link) and acts on its events;
//! - the **relay link** ([`crate::relay_link`]) keeps the connection to the home relay the
//!   core chose.

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
use crate::core::{Destination, Event, HomeTarget, NodeCore, Settings};
pub use crate::core::{HomeStatus, PeerStatus, Received, Status};
use crate::regionmap::RegionMap;
use crate::relay_link::{RelayEvent, RelayTask};

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
}

enum Cmd {
    Send(PublicKey, Bytes),
    Status(oneshot::Sender<Status>),
    Ping(PublicKey, oneshot::Sender<(Path, Duration)>),
}

/// A running node. Dropping it stops it; [`Node::shutdown`] also waits for its tasks.
#[derive(Debug)]
pub struct Node {
    cmds: mpsc::Sender<Cmd>,
    received: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    public: PublicKey,
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
        let (relay_out_tx, relay_out) = mpsc::channel(4096);
        let public = config.secret.public_key();
        let relay = RelayTask {
            secret: config.secret.clone(),
            ca_file: config.ca_file.clone(),
            proxy: config.proxy.clone(),
            home: home_rx,
            events: relay_events_tx,
            out: relay_out,
            cancel: cancel.clone(),
        };
        let tasks = TaskTracker::new();
        tasks.spawn(relay.run());
        let settings = Settings {
            secret: config.secret,
            region_map: config.region_map,
            stun_interval: config.stun_interval,
            rehome_interval: config.rehome_interval,
            relay_only: config.relay_only,
        };
        let shell = Shell {
            core: NodeCore::new(settings, OsRng, Instant::now()),
            socket,
            home_tx,
            relay_out: relay_out_tx,
            received: received_tx,
            pings: HashMap::new(),
        };
        tasks.spawn(shell.run(cmds, relay_events, cancel.clone()));
        tasks.close();
        info!(key = %public, "node started");
        Ok(Node { cmds: cmds_tx, received: tokio::sync::Mutex::new(received), cancel, tasks, public })
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

/// The node's socket, its relay link's queues, and the core they feed.
struct Shell {
    core: NodeCore<OsRng>,
    socket: Arc<UdpSocket>,
    home_tx: watch::Sender<Option<HomeTarget>>,
    relay_out: mpsc::Sender<(PublicKey, Bytes)>,
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
        }
    }

    fn on_relay(&mut self, ev: RelayEvent) {
        let now = Instant::now();
        match ev {
            RelayEvent::Connected => self.core.handle_relay_connected(),
            RelayEvent::Lost(_region, url) => self.core.handle_relay_lost(url, now),
            RelayEvent::Packet(src, data) => self.core.handle_relay_packet(src, &data, now),
        }
    }

    /// Sends what the core transmits and acts on its events.
    async fn drive(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            match t.dst {
                Destination::Direct(to) => {
                    if let Err(e) = self.socket.send_to(&t.payload, to).await {
                        debug!(%to, error = %e, "direct send failed");
                    }
                }
                // A full relay queue drops the packet, as a congested path would.
                Destination::Relay(peer) => {
                    let _ = self.relay_out.try_send((peer, t.payload));
                }
            }
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Received(r) => {
                    let _ = self.received.try_send(r);
                }
                Event::HomeChanged(target) => {
                    self.home_tx.send_replace(Some(target));
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
