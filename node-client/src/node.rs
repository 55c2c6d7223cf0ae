//! A running node: home relay, endpoint discovery, direct paths, and the packet interface.
//!
//! Tasks:
//! - the **core** actor owns the UDP socket's receive side, the per-peer path state and the
//!   peers' keys; it handles commands, datagrams, relay events and a 100 ms tick;
//! - the **relay** task keeps the connection to the home relay the core chose, reconnecting
//!   with jittered exponential backoff and reporting Restarting and failures so the core can
//!   move home.
//!
//! Every message between peers is a sealed [`crate::disco`] envelope, whether it goes over
//! direct UDP or through the relay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_relay_proto::{stun, Frame, PublicKey, SecretKey};

use crate::disco::{self, Message, PeerBox};
use crate::paths::{Path, PeerPaths};
use crate::regionmap::{RegionMap, RelayNode};
use warren_relay_client::{ConnectOptions, DerpClient};

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
        }
    }
}

/// A packet received from a peer.
#[derive(Debug, Clone)]
pub struct Received {
    /// The sender (authenticated by the envelope's seal).
    pub from: PublicKey,
    /// The application payload.
    pub data: Bytes,
    /// How it arrived.
    pub path: Path,
}

/// A snapshot of the node's state.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This node's public key.
    pub public_key: String,
    /// Local UDP address.
    pub udp_local: String,
    /// The chosen home relay, if any.
    pub home: Option<HomeStatus>,
    /// Whether the home relay connection is up.
    pub relay_connected: bool,
    /// Endpoints peers are told to try.
    pub endpoints: Vec<String>,
    /// Whether the public mapping differs per destination (a "hard" NAT); unknown until two
    /// STUN servers answered.
    pub mapping_varies_by_dest: Option<bool>,
    /// Measured STUN round trip per region id, in ms.
    pub region_latency_ms: BTreeMap<u32, f64>,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
}

/// The home relay.
#[derive(Debug, Clone, Serialize)]
pub struct HomeStatus {
    /// Region id.
    pub region_id: u32,
    /// Region code.
    pub region_code: String,
    /// Relay URL.
    pub url: String,
}

/// One peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// The peer's key.
    pub key: String,
    /// `direct <ip:port>` or `relay`.
    pub path: String,
    /// Round trip of the direct path, in ms.
    pub rtt_ms: Option<f64>,
    /// Candidate endpoints.
    pub candidates: Vec<String>,
    /// Milliseconds from first traffic to the first direct path.
    pub time_to_direct_ms: Option<f64>,
    /// Data packets sent directly.
    pub tx_direct: u64,
    /// Data packets sent through the relay.
    pub tx_relay: u64,
    /// Data packets received directly.
    pub rx_direct: u64,
    /// Data packets received through the relay.
    pub rx_relay: u64,
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

/// A running node. Dropping it stops it.
#[derive(Debug)]
pub struct Node {
    cmds: mpsc::Sender<Cmd>,
    received: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    cancel: CancellationToken,
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
            home: home_rx,
            events: relay_events_tx,
            out: relay_out,
            cancel: cancel.clone(),
        };
        tokio::spawn(relay.run());
        let core = Core::new(config, socket, home_tx, relay_out_tx, received_tx);
        tokio::spawn(core.run(cmds, relay_events, cancel.clone()));
        info!(key = %public, "node started");
        Ok(Node { cmds: cmds_tx, received: tokio::sync::Mutex::new(received), cancel, public })
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

    /// Stops the node.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// What the relay task reports.
#[derive(Debug)]
enum RelayEvent {
    Connected,
    /// The relay said it is restarting, or the connection failed.
    Lost(u32, String),
    Packet(PublicKey, Bytes),
}

/// The home relay the core chose.
#[derive(Debug, Clone, PartialEq)]
struct HomeTarget {
    region_id: u32,
    url: String,
    addr: Option<SocketAddr>,
}

struct RelayTask {
    secret: SecretKey,
    ca_file: Option<PathBuf>,
    home: watch::Receiver<Option<HomeTarget>>,
    events: mpsc::Sender<RelayEvent>,
    out: mpsc::Receiver<(PublicKey, Bytes)>,
    cancel: CancellationToken,
}

impl RelayTask {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let target = self.home.borrow_and_update().clone();
            let Some(target) = target else {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = self.home.changed() => if r.is_err() { return },
                }
                continue;
            };
            let opts =
                ConnectOptions { ca_file: self.ca_file.clone(), connect_addr: target.addr, ..Default::default() };
            let connected = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = DerpClient::connect(&target.url, &self.secret, &opts) => c,
            };
            let wait = match connected {
                Ok(mut client) => {
                    info!(region = target.region_id, url = %target.url, "home relay connected");
                    let _ = client.send(&Frame::NotePreferred { preferred: true }).await;
                    let _ = self.events.send(RelayEvent::Connected).await;
                    let (wait, healthy) = self.serve(&mut client, &target).await;
                    failures = if healthy { 0 } else { failures + 1 };
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    wait
                }
                Err(e) => {
                    warn!(region = target.region_id, url = %target.url, error = %e, "home relay connection failed");
                    failures += 1;
                    None
                }
            };
            let _ = self.events.send(RelayEvent::Lost(target.region_id, target.url.clone())).await;
            let delay = wait.unwrap_or_else(|| backoff(failures));
            // A new home (a sibling in the same region, or another region) is dialled at once.
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = self.home.changed() => {}
            }
        }
    }

    /// Serves one connection. Returns how long to wait before reconnecting (when the relay
    /// said so) and whether the connection was healthy for a while.
    async fn serve(&mut self, client: &mut DerpClient, target: &HomeTarget) -> (Option<Duration>, bool) {
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return (None, true),
                changed = self.home.changed() => {
                    if changed.is_err() || self.home.borrow().as_ref() != Some(target) {
                        info!(region = target.region_id, "moving home relay");
                        return (Some(Duration::ZERO), true);
                    }
                }
                Some((dst, data)) = self.out.recv() => {
                    let mut frame = Frame::SendPacket { dst, packet: data };
                    let mut batch = 0;
                    loop {
                        if client.queue(&frame).is_err() {
                            break;
                        }
                        batch += 1;
                        match self.out.try_recv() {
                            Ok((dst, data)) if batch < 64 => frame = Frame::SendPacket { dst, packet: data },
                            Ok((dst, data)) => {
                                // Keep the packet for the next batch.
                                let _ = client.flush().await;
                                frame = Frame::SendPacket { dst, packet: data };
                                batch = 0;
                            }
                            Err(_) => break,
                        }
                    }
                    if client.flush().await.is_err() {
                        return (None, started.elapsed() > Duration::from_secs(10));
                    }
                }
                frame = client.recv() => match frame {
                    Ok(Frame::RecvPacket { src, packet }) => {
                        let _ = self.events.send(RelayEvent::Packet(src, packet)).await;
                    }
                    Ok(Frame::Ping(d)) => {
                        let _ = client.send(&Frame::Pong(d)).await;
                    }
                    Ok(Frame::Restarting { reconnect_in_ms, .. }) => {
                        info!(region = target.region_id, reconnect_in_ms, "home relay is restarting");
                        return (Some(Duration::from_millis(u64::from(reconnect_in_ms))), true);
                    }
                    Ok(Frame::Health { problem }) if !problem.is_empty() => warn!(region = target.region_id, %problem, "relay health"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(region = target.region_id, error = %e, "home relay connection lost");
                        return (None, started.elapsed() > Duration::from_secs(10));
                    }
                },
            }
        }
    }
}

/// Jittered exponential backoff: 100 ms doubling to 10 s, then +-50 %.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(7)).min(Duration::from_secs(10));
    let jitter = f64::from(OsRng.next_u32() % 1000) / 1000.0; // 0..1
    base.mul_f64(0.5 + jitter)
}

#[derive(Default)]
struct Peer {
    paths: PeerPaths,
    tx_direct: u64,
    tx_relay: u64,
    rx_direct: u64,
    rx_relay: u64,
}

/// A `warren ping` waiting for its Pong: sent at, over which path, whom to tell.
type ExplicitPing = (Instant, Path, oneshot::Sender<(Path, Duration)>);

struct StunProbe {
    region_id: u32,
    server: SocketAddr,
    sent: Instant,
}

/// Bounded number of outstanding explicit pings.
const MAX_EXPLICIT_PINGS: usize = 1024;
/// A failing region is avoided for this long.
const BAD_REGION_FOR: Duration = Duration::from_secs(30);

struct Core {
    secret: SecretKey,
    public: PublicKey,
    config: NodeConfig,
    socket: Arc<UdpSocket>,
    home_tx: watch::Sender<Option<HomeTarget>>,
    relay_out: mpsc::Sender<(PublicKey, Bytes)>,
    received: mpsc::Sender<Received>,
    peers: HashMap<PublicKey, Peer>,
    boxes: HashMap<PublicKey, PeerBox>,
    relay_connected: bool,
    stun_servers: Vec<(u32, SocketAddr)>,
    stun_pending: HashMap<[u8; 12], StunProbe>,
    mapped: HashMap<SocketAddr, SocketAddr>,
    region_rtt: BTreeMap<u32, Duration>,
    /// Relays (by URL) that failed or said they are restarting, and when.
    bad_nodes: HashMap<String, Instant>,
    local_endpoint: Option<SocketAddr>,
    explicit_pings: HashMap<[u8; 12], ExplicitPing>,
    started: Instant,
    last_stun: Option<Instant>,
    last_rehome: Option<Instant>,
}

impl Core {
    fn new(
        config: NodeConfig,
        socket: Arc<UdpSocket>,
        home_tx: watch::Sender<Option<HomeTarget>>,
        relay_out: mpsc::Sender<(PublicKey, Bytes)>,
        received: mpsc::Sender<Received>,
    ) -> Self {
        Core {
            secret: config.secret.clone(),
            public: config.secret.public_key(),
            config,
            socket,
            home_tx,
            relay_out,
            received,
            peers: HashMap::new(),
            boxes: HashMap::new(),
            relay_connected: false,
            stun_servers: Vec::new(),
            stun_pending: HashMap::new(),
            mapped: HashMap::new(),
            region_rtt: BTreeMap::new(),
            bad_nodes: HashMap::new(),
            local_endpoint: None,
            explicit_pings: HashMap::new(),
            started: Instant::now(),
            last_stun: None,
            last_rehome: None,
        }
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut relay: mpsc::Receiver<RelayEvent>,
        cancel: CancellationToken,
    ) {
        self.resolve_stun_servers().await;
        let socket = self.socket.clone();
        let mut buf = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel safety: mpsc recv, UdpSocket::recv_from and interval ticks lose nothing
            // when another branch wins.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                Some(cmd) = cmds.recv() => self.on_cmd(cmd).await,
                Some(ev) = relay.recv() => self.on_relay(ev).await,
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.on_datagram(&buf[..n], from).await,
                    Err(e) => debug!(error = %e, "udp receive error"),
                },
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    async fn resolve_stun_servers(&mut self) {
        for region in self.config.region_map.regions() {
            let Some(node) = region.nodes.first() else { continue };
            let Some(port) = node.stun_port() else { continue };
            let addr = match node.ipv4.or(node.ipv6) {
                Some(ip) => Some(SocketAddr::new(ip, port)),
                None => tokio::net::lookup_host((node.host_name.as_str(), port)).await.ok().and_then(|mut a| a.next()),
            };
            match addr {
                Some(a) => self.stun_servers.push((region.region_id, a)),
                None => warn!(region = region.region_id, host = %node.host_name, "cannot resolve STUN server"),
            }
        }
        // The source address the OS would use towards the first relay: our LAN endpoint.
        if let Some((_, server)) = self.stun_servers.first() {
            let probe = UdpSocket::bind(SocketAddr::new(
                if server.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() },
                0,
            ))
            .await;
            if let (Ok(p), Ok(local)) = (probe, self.socket.local_addr()) {
                if p.connect(server).await.is_ok() {
                    if let Ok(src) = p.local_addr() {
                        self.local_endpoint = Some(SocketAddr::new(src.ip(), local.port()));
                    }
                }
            }
        }
    }

    fn peer_box(&mut self, peer: &PublicKey) -> &PeerBox {
        let secret = &self.secret;
        if self.boxes.len() > 10_000 && !self.boxes.contains_key(peer) {
            self.boxes.clear();
        }
        self.boxes.entry(*peer).or_insert_with(|| PeerBox::new(secret, peer))
    }

    fn seal(&mut self, peer: &PublicKey, msg: &Message) -> Bytes {
        let public = self.public;
        self.peer_box(peer).seal(&public, msg, &mut OsRng)
    }

    async fn send_direct(&mut self, peer: &PublicKey, to: SocketAddr, msg: &Message) {
        let env = self.seal(peer, msg);
        if let Err(e) = self.socket.send_to(&env, to).await {
            debug!(%to, error = %e, "direct send failed");
        }
    }

    fn send_relay(&mut self, peer: &PublicKey, msg: &Message) -> bool {
        let env = self.seal(peer, msg);
        self.relay_connected && self.relay_out.try_send((*peer, env)).is_ok()
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Send(peer, data) => {
                let p = self.peers.entry(peer).or_default();
                let first = !p.paths.is_active(now);
                p.paths.on_activity(now);
                let path = p.paths.current(now);
                match path {
                    Path::Direct(to) => {
                        p.tx_direct += 1;
                        self.send_direct(&peer, to, &Message::Data(data)).await;
                    }
                    Path::Relay => {
                        p.tx_relay += 1;
                        if !self.send_relay(&peer, &Message::Data(data)) {
                            debug!(peer = %peer.short(), "no path: relay not connected");
                        }
                    }
                }
                if first {
                    self.probe_peer(peer, now).await;
                }
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.status(now));
            }
            Cmd::Ping(peer, reply) => {
                if self.explicit_pings.len() >= MAX_EXPLICIT_PINGS {
                    return;
                }
                let mut tx = [0u8; 12];
                OsRng.fill_bytes(&mut tx);
                let p = self.peers.entry(peer).or_default();
                p.paths.on_activity(now);
                let path = p.paths.current(now);
                self.explicit_pings.insert(tx, (now, path, reply));
                match path {
                    Path::Direct(to) => {
                        p.paths.note_ping(tx, to, now);
                        self.send_direct(&peer, to, &Message::Ping { tx }).await;
                    }
                    Path::Relay => {
                        self.send_relay(&peer, &Message::Ping { tx });
                    }
                }
            }
        }
    }

    /// Pings due candidates and, without a direct path, tells the peer our endpoints.
    async fn probe_peer(&mut self, peer: PublicKey, now: Instant) {
        if self.config.relay_only {
            return;
        }
        let endpoints = self.endpoints();
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let pings = p.paths.poll_pings(now, &mut OsRng);
        let call = p.paths.want_call_me_maybe(now);
        for (to, tx) in pings {
            self.send_direct(&peer, to, &Message::Ping { tx }).await;
        }
        if call && !endpoints.is_empty() {
            self.send_relay(&peer, &Message::CallMeMaybe { endpoints });
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps: Vec<SocketAddr> = self.local_endpoint.into_iter().collect();
        let mut seen: HashSet<SocketAddr> = eps.iter().copied().collect();
        for m in self.mapped.values() {
            if seen.insert(*m) {
                eps.push(*m);
            }
        }
        eps.truncate(disco::MAX_ENDPOINTS);
        eps
    }

    async fn on_relay(&mut self, ev: RelayEvent) {
        match ev {
            RelayEvent::Connected => self.relay_connected = true,
            RelayEvent::Lost(_region, url) => {
                self.relay_connected = false;
                self.bad_nodes.insert(url, Instant::now());
                self.choose_home(true);
            }
            RelayEvent::Packet(src, data) => self.on_envelope(&data, src, None).await,
        }
    }

    async fn on_datagram(&mut self, data: &[u8], from: SocketAddr) {
        if disco::is_envelope(data) {
            if self.config.relay_only {
                return;
            }
            if let Ok(sender) = disco::sender(data) {
                self.on_envelope(data, sender, Some(from)).await;
            }
            return;
        }
        if let Ok((tx, mapped)) = stun::parse_binding_response(data) {
            self.on_stun(tx, mapped, from);
        }
    }

    /// An envelope from `sender`, directly from `from` or (None) through the relay.
    async fn on_envelope(&mut self, data: &[u8], sender: PublicKey, from: Option<SocketAddr>) {
        if disco::sender(data).ok() != Some(sender) || sender == self.public {
            return;
        }
        let Ok(msg) = self.peer_box(&sender).open(data) else {
            debug!(peer = %sender.short(), "envelope failed to open");
            return;
        };
        let now = Instant::now();
        match (msg, from) {
            (Message::Ping { tx }, Some(from)) => {
                let p = self.peers.entry(sender).or_default();
                p.paths.on_ping_from(from, now);
                // Ping back at once: the peer's ping just opened its NAT towards us.
                let back = p.paths.ping_back(from, now, &mut OsRng);
                self.send_direct(&sender, from, &Message::Pong { tx, src: from }).await;
                if let Some(tx) = back {
                    self.send_direct(&sender, from, &Message::Ping { tx }).await;
                }
            }
            (Message::Ping { tx }, None) => {
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                self.send_relay(&sender, &Message::Pong { tx, src: unspecified });
            }
            (Message::Pong { tx, src }, from) => {
                if let Some(from) = from {
                    let p = self.peers.entry(sender).or_default();
                    if let Some(rtt) = p.paths.on_pong(tx, from, now) {
                        debug!(peer = %sender.short(), %from, ?rtt, reflexive = %src, "direct path answered");
                    }
                }
                if let Some((sent, path, reply)) = self.explicit_pings.remove(&tx) {
                    let _ = reply.send((path, now.saturating_duration_since(sent)));
                }
            }
            (Message::CallMeMaybe { .. }, _) if self.config.relay_only => {}
            (Message::CallMeMaybe { endpoints }, _) => {
                let p = self.peers.entry(sender).or_default();
                p.paths.add_candidates(&endpoints);
                p.paths.on_activity(now);
                self.probe_peer(sender, now).await;
            }
            (Message::Data(payload), from) => {
                let p = self.peers.entry(sender).or_default();
                p.paths.on_activity(now);
                let path = match from {
                    Some(a) => {
                        p.rx_direct += 1;
                        Path::Direct(a)
                    }
                    None => {
                        p.rx_relay += 1;
                        Path::Relay
                    }
                };
                let _ = self.received.try_send(Received { from: sender, data: payload, path });
            }
        }
    }

    fn on_stun(&mut self, tx: [u8; 12], mapped: SocketAddr, from: SocketAddr) {
        let Some(probe) = self.stun_pending.remove(&tx) else { return };
        if probe.server != from {
            return;
        }
        let rtt = probe.sent.elapsed();
        // Smoothed, so one slow answer does not move the home region.
        let entry = self.region_rtt.entry(probe.region_id).or_insert(rtt);
        *entry = entry.mul_f64(0.7) + rtt.mul_f64(0.3);
        if self.mapped.insert(probe.server, mapped) != Some(mapped) {
            info!(server = %probe.server, %mapped, "public endpoint via STUN");
        }
        if self.home_tx.borrow().is_none() {
            self.choose_home(false);
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.last_stun.is_none_or(|t| now.saturating_duration_since(t) >= self.config.stun_interval) {
            self.last_stun = Some(now);
            self.send_stun(now).await;
        }
        // Without STUN answers, pick a home anyway after a short wait.
        if self.home_tx.borrow().is_none() && now.saturating_duration_since(self.started) > Duration::from_millis(700) {
            self.choose_home(false);
        }
        if self.last_rehome.is_none_or(|t| now.saturating_duration_since(t) >= self.config.rehome_interval) {
            self.last_rehome = Some(now);
            if self.home_tx.borrow().is_some() {
                self.choose_home(false);
            }
        }
        let active: Vec<PublicKey> =
            self.peers.iter().filter(|(_, p)| p.paths.is_active(now)).map(|(k, _)| *k).collect();
        for peer in active {
            self.probe_peer(peer, now).await;
        }
        self.explicit_pings.retain(|_, (sent, _, _)| now.saturating_duration_since(*sent) < Duration::from_secs(10));
        self.stun_pending.retain(|_, p| now.saturating_duration_since(p.sent) < Duration::from_secs(5));
    }

    async fn send_stun(&mut self, now: Instant) {
        for (region_id, server) in self.stun_servers.clone() {
            let mut tx = [0u8; 12];
            OsRng.fill_bytes(&mut tx);
            let Ok(req) = stun::binding_request(tx) else { continue };
            if self.socket.send_to(&req, server).await.is_ok() {
                self.stun_pending.insert(tx, StunProbe { region_id, server, sent: now });
            }
        }
    }

    /// Picks the home region: lowest STUN latency among regions not recently failing.
    /// Moves only on a clear improvement unless `force` (the current home failed).
    fn choose_home(&mut self, force: bool) {
        let now = Instant::now();
        self.bad_nodes.retain(|_, t| now.saturating_duration_since(*t) < BAD_REGION_FOR);
        let current = self.home_tx.borrow().as_ref().map(|h| h.region_id);
        let rtt = |id: u32| self.region_rtt.get(&id).copied().unwrap_or(Duration::from_secs(3600));
        // A region is failing when every relay in it is.
        let failing = |id: u32| {
            self.config
                .region_map
                .region(id)
                .is_none_or(|r| RegionMap::derp_nodes(r).all(|n| self.bad_nodes.contains_key(&n.url())))
        };
        let mut regions: Vec<u32> = self
            .config
            .region_map
            .regions()
            .filter(|r| RegionMap::derp_nodes(r).next().is_some())
            .map(|r| r.region_id)
            .collect();
        regions.sort_by_key(|id| (failing(*id), rtt(*id), *id));
        let Some(&best) = regions.first() else { return };
        if let Some(cur) = current.filter(|_| !force) {
            let (b, c) = (rtt(best), rtt(cur));
            let clearly_better =
                b.as_secs_f64() < c.as_secs_f64() * 0.7 && c.saturating_sub(b) > Duration::from_millis(5);
            if best == cur || !clearly_better {
                return;
            }
        }
        // When every region failed recently, `best` is the least recently failed one's peer in
        // id order, possibly the current home again: the relay task keeps retrying it.
        let Some(region) = self.config.region_map.region(best) else { return };
        // The first relay of the region that has not failed lately; when all have, the one that
        // failed longest ago.
        let Some(node) = RegionMap::derp_nodes(region).min_by_key(|n| self.bad_nodes.get(&n.url()).copied()) else {
            return;
        };
        let target = target_for(best, node);
        if self.home_tx.borrow().as_ref() != Some(&target) {
            info!(region = best, code = %region.region_code, latency = ?self.region_rtt.get(&best), "home region chosen");
            self.home_tx.send_replace(Some(target));
        }
    }

    fn status(&self, now: Instant) -> Status {
        let home = self.home_tx.borrow().as_ref().map(|h| HomeStatus {
            region_id: h.region_id,
            region_code: self.config.region_map.region(h.region_id).map(|r| r.region_code.clone()).unwrap_or_default(),
            url: h.url.clone(),
        });
        let distinct_ports: HashSet<u16> = self.mapped.values().map(|a| a.port()).collect();
        let mut peers: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(k, p)| PeerStatus {
                key: k.to_hex(),
                path: match p.paths.current(now) {
                    Path::Direct(a) => format!("direct {a}"),
                    Path::Relay => "relay".into(),
                },
                rtt_ms: p.paths.direct_rtt(now).map(|d| d.as_secs_f64() * 1e3),
                candidates: p.paths.candidates().map(|a| a.to_string()).collect(),
                time_to_direct_ms: p.paths.time_to_direct().map(|d| d.as_secs_f64() * 1e3),
                tx_direct: p.tx_direct,
                tx_relay: p.tx_relay,
                rx_direct: p.rx_direct,
                rx_relay: p.rx_relay,
            })
            .collect();
        peers.sort_by(|a, b| a.key.cmp(&b.key));
        Status {
            public_key: self.public.to_hex(),
            udp_local: self.socket.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            home,
            relay_connected: self.relay_connected,
            endpoints: self.endpoints().iter().map(|a| a.to_string()).collect(),
            mapping_varies_by_dest: (self.mapped.len() >= 2).then_some(distinct_ports.len() > 1),
            region_latency_ms: self.region_rtt.iter().map(|(k, v)| (*k, v.as_secs_f64() * 1e3)).collect(),
            peers,
        }
    }
}

fn target_for(region_id: u32, node: &RelayNode) -> HomeTarget {
    HomeTarget { region_id, url: node.url(), addr: node.derp_addr() }
}
