//! The node's policy, without I/O: peers and their paths, home relay choice, STUN, disco.
//!
//! ```text
//! inputs                                   outputs
//! handle_send(peer, data, now)             poll_transmit() -> Transmit { Direct(addr) | Relay{link, key}
//! handle_ping(peer, now) -> id                                          | Find{link, key}, payload }
//! handle_hint(peer, region)                poll_event()    -> Received | HomeChanged | LinkOpen | LinkClosed
//! handle_datagram(from, bytes, now)                           | PingAnswered | PingExpired
//! handle_relay_packet(link, src, bytes, now)
//! handle_relay_connected(link) / handle_relay_lost(link, url, now)
//! handle_peer_gone(link, peer, now) / handle_presence(link, peer, present, now)
//! handle_timeout(now)                      poll_timeout()  -> when to call handle_timeout
//! ```
//!
//! The shell (`node.rs`) owns the UDP socket and the relay links (the home one, and one per
//! other region the core opens): it feeds in what happened with the current time, then acts on
//! every event and sends every transmit before waiting again.
//! Every message between peers is a sealed [`disco`] envelope, over direct UDP or as the opaque
//! payload of a relay packet. Randomness (ping ids, nonces) comes from the `R` the core is given.
//!
//! - [`paths`]: which path reaches one peer (pings, pongs, trust, candidates);
//! - [`home`]: which relay is home;
//! - [`reach`]: peers homed in other regions: region links and lookups;
//! - [`peers`]: per-peer state and counters, and the status snapshot;
//! - [`disco`]: the sealed peer messages.

pub mod disco;
pub(crate) mod home;
pub mod paths;
pub(crate) mod peers;
pub mod reach;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::CryptoRngCore;
use tracing::{debug, info};
use warren_relay_proto::{stun, PeerGoneReason, PublicKey, SecretKey};

use self::disco::{Message, PeerBox};
pub use self::home::HomeTarget;
use self::paths::Path;
use self::peers::Peer;
pub use self::peers::{HomeStatus, PeerStatus, Received, Status};
use self::reach::Reach;
pub use self::reach::{Link, LinkStatus, RegionSource};
use crate::regionmap::RegionMap;

/// How often the core wants [`NodeCore::handle_timeout`].
pub const TICK: Duration = Duration::from_millis(100);
/// Bounded number of outstanding explicit pings.
const MAX_EXPLICIT_PINGS: usize = 1024;
/// An explicit ping unanswered for this long is given up.
const EXPLICIT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// A STUN request unanswered for this long is forgotten.
const STUN_TIMEOUT: Duration = Duration::from_secs(5);
/// Without STUN answers, a home is chosen anyway after this long.
const HOME_WITHOUT_STUN: Duration = Duration::from_millis(700);
/// Sealing boxes kept; past this the cache starts over.
const MAX_BOXES: usize = 10_000;

/// What the core needs to know of the node's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node's identity.
    pub secret: SecretKey,
    /// Relays to choose a home from.
    pub region_map: RegionMap,
    /// How often to re-run STUN (endpoints and region latency).
    pub stun_interval: Duration,
    /// How often to reconsider the home region.
    pub rehome_interval: Duration,
    /// Never use direct paths.
    pub relay_only: bool,
    /// A link to another region's relay unused for this long is closed.
    pub link_idle: Duration,
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A UDP datagram to this address (a peer's endpoint or a STUN server).
    Direct(SocketAddr),
    /// A packet through a relay link to this key.
    Relay {
        /// Which relay connection.
        link: Link,
        /// To whom.
        peer: PublicKey,
    },
    /// A question (FindPeer) to a relay link: is this key connected to your region? The
    /// payload is empty; the answer comes to [`NodeCore::handle_presence`].
    Find {
        /// Which relay connection.
        link: Link,
        /// Whom.
        peer: PublicKey,
    },
}

/// Bytes the shell must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where.
    pub dst: Destination,
    /// What: a sealed envelope, or a STUN request.
    pub payload: Bytes,
}

/// Something the shell must act on.
#[derive(Debug)]
pub enum Event {
    /// An application packet from a peer.
    Received(Received),
    /// The home relay changed: the relay link dials it.
    HomeChanged(HomeTarget),
    /// Open a link to a relay of another region (`target.region_id`), or move the open one to
    /// this relay.
    LinkOpen(HomeTarget),
    /// Close the link to this region.
    LinkClosed(u32),
    /// An explicit ping ([`NodeCore::handle_ping`]) was answered.
    PingAnswered {
        /// The id `handle_ping` returned.
        id: u64,
        /// The path it went over.
        path: Path,
        /// Its round trip.
        rtt: Duration,
    },
    /// An explicit ping went unanswered and is given up.
    PingExpired(u64),
}

/// A `warren ping` waiting for its Pong.
#[derive(Debug)]
struct ExplicitPing {
    id: u64,
    sent: Instant,
    path: Path,
}

/// A STUN request waiting for its answer.
#[derive(Debug)]
struct StunProbe {
    region_id: u32,
    server: SocketAddr,
    sent: Instant,
}

/// The node's sans-IO state machine.
pub struct NodeCore<R> {
    settings: Settings,
    public: PublicKey,
    rng: R,
    peers: HashMap<PublicKey, Peer>,
    boxes: HashMap<PublicKey, PeerBox>,
    home: home::Home,
    relay_connected: bool,
    reach: Reach,
    stun_servers: Vec<(u32, SocketAddr)>,
    stun_pending: HashMap<[u8; 12], StunProbe>,
    /// STUN server -> our address as it saw us.
    mapped: HashMap<SocketAddr, SocketAddr>,
    local_endpoint: Option<SocketAddr>,
    explicit_pings: HashMap<[u8; 12], ExplicitPing>,
    next_ping_id: u64,
    started: Instant,
    last_stun: Option<Instant>,
    last_rehome: Option<Instant>,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl<R> std::fmt::Debug for NodeCore<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("public", &self.public)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<R: CryptoRngCore> NodeCore<R> {
    /// A core started at `now`.
    pub fn new(settings: Settings, rng: R, now: Instant) -> Self {
        let reach = Reach::new(settings.link_idle);
        NodeCore {
            public: settings.secret.public_key(),
            settings,
            rng,
            peers: HashMap::new(),
            boxes: HashMap::new(),
            home: home::Home::default(),
            relay_connected: false,
            reach,
            stun_servers: Vec::new(),
            stun_pending: HashMap::new(),
            mapped: HashMap::new(),
            local_endpoint: None,
            explicit_pings: HashMap::new(),
            next_ping_id: 1,
            started: now,
            last_stun: None,
            last_rehome: None,
            next_tick: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The region map the core chooses a home from (the shell resolves its STUN servers).
    pub fn region_map(&self) -> &RegionMap {
        &self.settings.region_map
    }

    /// The STUN servers the shell resolved, by region.
    pub fn set_stun_servers(&mut self, servers: Vec<(u32, SocketAddr)>) {
        self.stun_servers = servers;
    }

    /// Our LAN endpoint (the source address towards the first relay, with our UDP port).
    pub fn set_local_endpoint(&mut self, addr: SocketAddr) {
        self.local_endpoint = Some(addr);
    }

    /// The application asked to send `data` to `peer`.
    pub fn handle_send(&mut self, peer: PublicKey, data: Bytes, now: Instant) {
        let p = self.peers.entry(peer).or_default();
        let first = !p.paths.is_active(now);
        p.paths.on_activity(now);
        // What a path given up still held goes first, so the peer gets it in order.
        self.resend_stranded(peer, now);
        let Some(p) = self.peers.get_mut(&peer) else { return };
        match p.paths.current(now) {
            Path::Direct(to) => {
                p.tx_direct += 1;
                let payload = self.seal(&peer, &Message::Data(data));
                self.send_data_direct(peer, to, payload, now);
            }
            Path::Relay => {
                p.tx_relay += 1;
                if !self.send_relay(&peer, &Message::Data(data), now) {
                    debug!(peer = %peer.short(), "no path: relay not connected");
                }
            }
        }
        if first {
            self.probe_peer(peer, now);
        }
    }

    /// The application asked to ping `peer` over its current path; the answer comes as
    /// [`Event::PingAnswered`] with the returned id. `None` when too many pings are pending.
    pub fn handle_ping(&mut self, peer: PublicKey, now: Instant) -> Option<u64> {
        if self.explicit_pings.len() >= MAX_EXPLICIT_PINGS {
            return None;
        }
        let tx = self.tx_id();
        let id = self.next_ping_id;
        self.next_ping_id += 1;
        let p = self.peers.entry(peer).or_default();
        p.paths.on_activity(now);
        let path = p.paths.current(now);
        self.explicit_pings.insert(tx, ExplicitPing { id, sent: now, path });
        match path {
            Path::Direct(to) => {
                p.paths.note_ping(tx, to, now);
                self.send_direct(&peer, to, &Message::Ping { tx });
            }
            Path::Relay => {
                self.send_relay(&peer, &Message::Ping { tx }, now);
            }
        }
        Some(id)
    }

    /// The user said `peer` is homed in `region` (`KEY@REGION`); the peer's own word, when it
    /// comes, replaces this.
    pub fn handle_hint(&mut self, peer: PublicKey, region: u32) {
        self.peers.entry(peer).or_default().learn_region(region, RegionSource::Hint);
    }

    /// A UDP datagram arrived from `from`: a peer's envelope or a STUN answer.
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if disco::is_envelope(data) {
            if self.settings.relay_only {
                return;
            }
            if let Ok(sender) = disco::sender(data) {
                self.on_envelope(data, sender, Some(from), now);
            }
            return;
        }
        if let Ok((tx, mapped)) = stun::parse_binding_response(data) {
            self.on_stun(tx, mapped, from, now);
        }
    }

    /// A relay link delivered a packet from `src` (the relay vouches for the key). One coming
    /// over another region's link says the peer is connected there.
    pub fn handle_relay_packet(&mut self, link: Link, src: PublicKey, data: &[u8], now: Instant) {
        if let Link::Region(r) = link {
            if self.reach.use_link(r, now) && src != self.public {
                self.peers.entry(src).or_default().learn_region(r, RegionSource::Seen);
            }
        }
        self.on_envelope(data, src, None, now);
    }

    /// A relay connection logged in.
    pub fn handle_relay_connected(&mut self, link: Link) {
        match link {
            Link::Home => self.relay_connected = true,
            Link::Region(r) => self.reach.set_connected(r, true),
        }
    }

    /// The relay at `url` failed or said it is restarting: the home moves to another relay;
    /// a region link to the next relay of its region.
    pub fn handle_relay_lost(&mut self, link: Link, url: String, now: Instant) {
        self.home.note_failed(url, now);
        match link {
            Link::Home => {
                self.relay_connected = false;
                self.choose_home(true, now);
            }
            Link::Region(r) => {
                self.reach.set_connected(r, false);
                let next = self.home.node_in(&self.settings.region_map, r);
                if let Some(next) = next.filter(|n| self.reach.target(r).is_some_and(|cur| cur != n)) {
                    self.reach.open(next.clone(), now);
                    self.events.push_back(Event::LinkOpen(next));
                }
            }
        }
    }

    /// A relay link said `peer` is gone. NotHere, from the link we send that peer's packets
    /// over, starts a lookup in the other regions; what was sent lately is resent once found.
    pub fn handle_peer_gone(&mut self, link: Link, peer: PublicKey, reason: PeerGoneReason, now: Instant) {
        if reason != PeerGoneReason::NotHere || self.route(&peer) != link || self.reach.looking_up(&peer) {
            return;
        }
        let asked = self.link_region(link);
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if p.region.is_some_and(|(r, _)| Some(r) == asked) {
            p.region = None;
        }
        let held = p.recent.take(now);
        let regions: BTreeSet<u32> =
            self.settings.region_map.relay_regions().map(|r| r.region_id).filter(|r| Some(*r) != asked).collect();
        if !self.reach.start_lookup(peer, regions.clone(), held, now) {
            return;
        }
        debug!(peer = %peer.short(), ?asked, "peer not at the relay asked: looking it up");
        for r in regions {
            let link = self.link_to(r, now);
            self.transmits.push_back(Transmit { dst: Destination::Find { link, peer }, payload: Bytes::new() });
        }
    }

    /// A relay link answered FindPeer. The first "present" ends the lookup: the peer is homed
    /// (or at least connected) there, and what was held goes there.
    pub fn handle_presence(&mut self, link: Link, peer: PublicKey, present: bool, now: Instant) {
        let Some(region) = self.link_region(link) else { return };
        let Some(held) = self.reach.on_presence(&peer, region, present) else { return };
        info!(peer = %peer.short(), region, "peer found in another region");
        self.peers.entry(peer).or_default().learn_region(region, RegionSource::Lookup);
        for payload in held {
            self.relay_payload(peer, payload, now);
        }
    }

    /// Periodic work: STUN, home choice, probing active peers, expiring what went unanswered.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        if self.last_stun.is_none_or(|t| now.saturating_duration_since(t) >= self.settings.stun_interval) {
            self.last_stun = Some(now);
            self.send_stun(now);
        }
        if self.home.current().is_none() && now.saturating_duration_since(self.started) > HOME_WITHOUT_STUN {
            self.choose_home(false, now);
        }
        if self.last_rehome.is_none_or(|t| now.saturating_duration_since(t) >= self.settings.rehome_interval) {
            self.last_rehome = Some(now);
            if self.home.current().is_some() {
                self.choose_home(false, now);
            }
        }
        let active: Vec<PublicKey> =
            self.peers.iter().filter(|(_, p)| p.paths.is_active(now)).map(|(k, _)| *k).collect();
        for peer in active {
            self.resend_stranded(peer, now);
            self.probe_peer(peer, now);
        }
        let events = &mut self.events;
        self.explicit_pings.retain(|_, p| {
            let keep = now.saturating_duration_since(p.sent) < EXPLICIT_PING_TIMEOUT;
            if !keep {
                events.push_back(Event::PingExpired(p.id));
            }
            keep
        });
        self.stun_pending.retain(|_, p| now.saturating_duration_since(p.sent) < STUN_TIMEOUT);
        for r in self.reach.expire(now) {
            info!(region = r, "closing the idle link to another region");
            self.events.push_back(Event::LinkClosed(r));
        }
    }

    /// The next datagram or relay packet to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing the shell must act on; act on all of them before sending the transmits
    /// ([`Event::LinkOpen`] comes before the first packet for that link).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// The node's state at `now`; `udp_local` is the socket's address, which only the shell
    /// knows.
    pub fn status(&self, now: Instant, udp_local: String) -> Status {
        let home = self.home.current().map(|h| HomeStatus {
            region_id: h.region_id,
            region_code: self
                .settings
                .region_map
                .region(h.region_id)
                .map(|r| r.region_code.clone())
                .unwrap_or_default(),
            url: h.url.clone(),
        });
        let distinct_ports: HashSet<u16> = self.mapped.values().map(|a| a.port()).collect();
        let mut peers: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let relay = match self.route(k) {
                    Link::Home => self.home.current().map(|h| h.url.clone()),
                    Link::Region(r) => self.reach.target(r).map(|t| t.url.clone()),
                };
                p.status(k, now, relay)
            })
            .collect();
        peers.sort_by(|a, b| a.key.cmp(&b.key));
        Status {
            public_key: self.public.to_hex(),
            udp_local,
            home,
            relay_connected: self.relay_connected,
            endpoints: self.endpoints().iter().map(|a| a.to_string()).collect(),
            mapping_varies_by_dest: (self.mapped.len() >= 2).then_some(distinct_ports.len() > 1),
            region_latency_ms: self.home.region_rtt.iter().map(|(k, v)| (*k, v.as_secs_f64() * 1e3)).collect(),
            peers,
            region_links: self.reach.status(now),
            lookup_dropped: self.reach.dropped(),
        }
    }

    fn tx_id(&mut self) -> [u8; 12] {
        let mut tx = [0u8; 12];
        self.rng.fill_bytes(&mut tx);
        tx
    }

    fn seal(&mut self, peer: &PublicKey, msg: &Message) -> Bytes {
        peer_box(&mut self.boxes, &self.settings.secret, peer).seal(&self.public, msg, &mut self.rng)
    }

    fn send_direct(&mut self, peer: &PublicKey, to: SocketAddr, msg: &Message) {
        let payload = self.seal(peer, msg);
        self.transmits.push_back(Transmit { dst: Destination::Direct(to), payload });
    }

    /// Sends a sealed data envelope directly, held until a Pong confirms it arrived.
    fn send_data_direct(&mut self, peer: PublicKey, to: SocketAddr, payload: Bytes, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.paths.sent_data(to, payload.clone(), now);
        }
        self.transmits.push_back(Transmit { dst: Destination::Direct(to), payload });
    }

    /// Resends, over the path used now, the data a given-up direct path held unconfirmed.
    fn resend_stranded(&mut self, peer: PublicKey, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let stranded = p.paths.take_stranded(now);
        if stranded.is_empty() {
            return;
        }
        p.tx_resent += stranded.len() as u64;
        let path = p.paths.current(now);
        debug!(peer = %peer.short(), packets = stranded.len(), ?path, "resending what a lost direct path held");
        for payload in stranded {
            match path {
                Path::Direct(to) => self.send_data_direct(peer, to, payload, now),
                Path::Relay => {
                    self.relay_payload(peer, payload, now);
                }
            }
        }
    }

    /// Queues `msg` for the relay link that reaches `peer` (or holds it while the peer is looked
    /// up); false when that is the home relay and it is not connected (nothing is queued).
    fn send_relay(&mut self, peer: &PublicKey, msg: &Message, now: Instant) -> bool {
        if !self.reach.looking_up(peer) && self.route(peer) == Link::Home && !self.relay_connected {
            return false;
        }
        let payload = self.seal(peer, msg);
        self.relay_payload(*peer, payload, now)
    }

    /// Sends a sealed envelope over the link for `peer`, keeping it a while in case that relay
    /// says the peer is not there.
    fn relay_payload(&mut self, peer: PublicKey, payload: Bytes, now: Instant) -> bool {
        if self.reach.hold(&peer, payload.clone()) {
            return true;
        }
        let link = match self.route(&peer) {
            Link::Region(r) => self.link_to(r, now),
            Link::Home if !self.relay_connected => return false,
            Link::Home => Link::Home,
        };
        self.peers.entry(peer).or_default().recent.push(payload.clone(), now);
        self.transmits.push_back(Transmit { dst: Destination::Relay { link, peer }, payload });
        true
    }

    /// The link that reaches `peer`: its home region's, when that is known and not ours.
    fn route(&self, peer: &PublicKey) -> Link {
        let home = self.home.current().map(|h| h.region_id);
        match self.peers.get(peer).and_then(|p| p.region) {
            Some((r, _)) if Some(r) != home && self.settings.region_map.region(r).is_some() => Link::Region(r),
            _ => Link::Home,
        }
    }

    /// The region a link's relay is in.
    fn link_region(&self, link: Link) -> Option<u32> {
        match link {
            Link::Home => self.home.current().map(|h| h.region_id),
            Link::Region(r) => Some(r),
        }
    }

    /// The link to `region` (our home's, or a region link, opened now if need be), marked used.
    fn link_to(&mut self, region: u32, now: Instant) -> Link {
        if self.home.current().is_some_and(|h| h.region_id == region) {
            return Link::Home;
        }
        if !self.reach.use_link(region, now) {
            let Some(target) = self.home.node_in(&self.settings.region_map, region) else { return Link::Home };
            info!(region, url = %target.url, "opening a link to another region");
            self.reach.open(target.clone(), now);
            self.events.push_back(Event::LinkOpen(target));
        }
        Link::Region(region)
    }

    /// Pings due candidates and, without a direct path, tells the peer our endpoints; tells it
    /// our home region once per home (also when relay-only, with no endpoints).
    fn probe_peer(&mut self, peer: PublicKey, now: Instant) {
        let relay_only = self.settings.relay_only;
        let endpoints = if relay_only { Vec::new() } else { self.endpoints() };
        let home_region = self.home.current().map(|h| h.region_id);
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let (pings, call) = if relay_only {
            (Vec::new(), false)
        } else {
            (p.paths.poll_pings(now, &mut self.rng), p.paths.want_call_me_maybe(now))
        };
        let tell = home_region.is_some() && p.told_home != home_region;
        for (to, tx) in pings {
            self.send_direct(&peer, to, &Message::Ping { tx });
        }
        if (call && !endpoints.is_empty()) || tell {
            let msg = Message::CallMeMaybe { endpoints, home_region };
            if self.send_relay(&peer, &msg, now) {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.told_home = home_region;
                }
            }
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

    /// An envelope from `sender`, directly from `from` or (None) through the relay.
    fn on_envelope(&mut self, data: &[u8], sender: PublicKey, from: Option<SocketAddr>, now: Instant) {
        if disco::sender(data).ok() != Some(sender) || sender == self.public {
            return;
        }
        let opened = peer_box(&mut self.boxes, &self.settings.secret, &sender).open(data);
        let Ok(msg) = opened else {
            debug!(peer = %sender.short(), "envelope failed to open");
            return;
        };
        match (msg, from) {
            (Message::Ping { tx }, Some(from)) => {
                let p = self.peers.entry(sender).or_default();
                p.paths.on_ping_from(from);
                // Ping back at once: the peer's ping just opened its NAT towards us.
                let back = p.paths.ping_back(from, now, &mut self.rng);
                self.send_direct(&sender, from, &Message::Pong { tx, src: from });
                if let Some(tx) = back {
                    self.send_direct(&sender, from, &Message::Ping { tx });
                }
            }
            (Message::Ping { tx }, None) => {
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                self.send_relay(&sender, &Message::Pong { tx, src: unspecified }, now);
            }
            (Message::Pong { tx, src }, from) => {
                if let Some(from) = from {
                    let p = self.peers.entry(sender).or_default();
                    if let Some(rtt) = p.paths.on_pong(tx, from, now) {
                        debug!(peer = %sender.short(), %from, ?rtt, reflexive = %src, "direct path answered");
                    }
                }
                if let Some(ping) = self.explicit_pings.remove(&tx) {
                    let rtt = now.saturating_duration_since(ping.sent);
                    self.events.push_back(Event::PingAnswered { id: ping.id, path: ping.path, rtt });
                }
            }
            (Message::CallMeMaybe { endpoints, home_region }, _) => {
                let p = self.peers.entry(sender).or_default();
                if let Some(r) = home_region {
                    if p.learn_region(r, RegionSource::Told) {
                        debug!(peer = %sender.short(), region = r, "peer's home region");
                    }
                }
                if self.settings.relay_only {
                    return;
                }
                // Ping what it named at once. A CallMeMaybe is not traffic: counting it as
                // activity kept two idle peers telling each other forever (and their links up).
                p.paths.add_candidates(&endpoints);
                let pings: Vec<_> = endpoints
                    .iter()
                    .filter_map(|ep| Some((*ep, p.paths.ping_back(*ep, now, &mut self.rng)?)))
                    .collect();
                for (to, tx) in pings {
                    self.send_direct(&sender, to, &Message::Ping { tx });
                }
                self.probe_peer(sender, now);
            }
            (Message::Data(payload), from) => {
                let p = self.peers.entry(sender).or_default();
                p.paths.on_activity(now);
                if !p.seen.insert(data) {
                    // A copy: resent over the relay after a direct path was given up, or after
                    // a relay said the peer was not there, and the first one arrived after all.
                    p.rx_duplicate += 1;
                    return;
                }
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
                self.events.push_back(Event::Received(Received { from: sender, data: payload, path }));
            }
        }
    }

    fn on_stun(&mut self, tx: [u8; 12], mapped: SocketAddr, from: SocketAddr, now: Instant) {
        let Some(probe) = self.stun_pending.remove(&tx) else { return };
        if probe.server != from {
            return;
        }
        self.home.note_rtt(probe.region_id, now.saturating_duration_since(probe.sent));
        if self.mapped.insert(probe.server, mapped) != Some(mapped) {
            info!(server = %probe.server, %mapped, "public endpoint via STUN");
        }
        if self.home.current().is_none() {
            self.choose_home(false, now);
        }
    }

    fn send_stun(&mut self, now: Instant) {
        for (region_id, server) in self.stun_servers.clone() {
            let tx = self.tx_id();
            let Ok(req) = stun::binding_request(tx) else { continue };
            self.transmits.push_back(Transmit { dst: Destination::Direct(server), payload: Bytes::from(req) });
            self.stun_pending.insert(tx, StunProbe { region_id, server, sent: now });
        }
    }

    fn choose_home(&mut self, force: bool, now: Instant) {
        if let Some(target) = self.home.choose(&self.settings.region_map, force, now) {
            let region = target.region_id;
            info!(region, latency = ?self.home.region_rtt.get(&region), "home region chosen");
            // The home connection reaches that region's peers now.
            if self.reach.remove(region) {
                self.events.push_back(Event::LinkClosed(region));
            }
            self.events.push_back(Event::HomeChanged(target));
        }
    }
}

/// The box shared with `peer`, made on first use. The cache is bounded: past [`MAX_BOXES`]
/// peers it starts over, so envelopes from many senders cannot grow it without limit.
fn peer_box<'a>(boxes: &'a mut HashMap<PublicKey, PeerBox>, secret: &SecretKey, peer: &PublicKey) -> &'a PeerBox {
    if boxes.len() > MAX_BOXES && !boxes.contains_key(peer) {
        boxes.clear();
    }
    boxes.entry(*peer).or_insert_with(|| PeerBox::new(secret, peer))
}
