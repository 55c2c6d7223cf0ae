//! Two node cores on a simulated network with simulated time: a direct link that can be cut,
//! relays that carry packets by key within a region (a node is in its home region and in each
//! region it has a link to), and STUN servers that answer after a set delay.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::OsRng;
use warren_relay_proto::{stun, PublicKey, SecretKey};

use super::testing::{map, now};
use super::*;

/// One way across the direct link.
const DIRECT_DELAY: Duration = Duration::from_millis(2);
/// One way through the relay.
const RELAY_DELAY: Duration = Duration::from_millis(10);
/// Region links close after this long unused.
const LINK_IDLE: Duration = Duration::from_secs(5);

enum Input {
    Datagram { from: SocketAddr, data: Bytes },
    Relay { link: Link, src: PublicKey, data: Bytes },
    Gone { link: Link, peer: PublicKey },
    Presence { link: Link, peer: PublicKey, present: bool },
}

struct SimNode {
    core: NodeCore<OsRng>,
    addr: SocketAddr,
    key: PublicKey,
    received: Vec<Received>,
    homes: Vec<HomeTarget>,
    pings: Vec<(u64, Path, Duration)>,
    /// Regions it has links to.
    links: BTreeSet<u32>,
    /// Every link it opened and closed, in order.
    link_events: Vec<String>,
    /// FindPeer questions it asked.
    finds: usize,
}

impl SimNode {
    /// The region its home link is in (1 until it chose one).
    fn home_region(&self) -> u32 {
        self.homes.last().map_or(1, |h| h.region_id)
    }

    /// Whether the relays of `region` deliver to it, and over which of its links.
    fn link_in(&self, region: u32) -> Option<Link> {
        if self.home_region() == region {
            Some(Link::Home)
        } else {
            self.links.contains(&region).then_some(Link::Region(region))
        }
    }
}

struct Sim {
    now: Instant,
    nodes: Vec<SimNode>,
    direct_up: bool,
    relay_up: bool,
    /// STUN server -> one-way delay of its answer.
    stun: HashMap<SocketAddr, Duration>,
    in_flight: Vec<(Instant, usize, Input)>,
}

impl Sim {
    /// Nodes on 127.0.0.11 and 127.0.0.12, both logged in to the relay, STUN servers of the map
    /// given to them.
    fn new(map: RegionMap, stun: &[(u32, Duration)]) -> Sim {
        Sim::with_maps([map.clone(), map], stun)
    }

    /// Node 0 homed in region 1 and node 1 in region 2 (each map avoids the other's region),
    /// after the short wait for a home without STUN; `regions` are the map's region ids.
    fn two_regions(regions: &[u32]) -> Sim {
        let ports: Vec<(u32, [u16; 1])> = regions.iter().map(|r| (*r, [8442 + *r as u16])).collect();
        let spec: Vec<(u32, &[u16])> = ports.iter().map(|(r, p)| (*r, &p[..])).collect();
        let maps = [1u32, 2].map(|home| {
            let mut m = map(&spec);
            for region in m.regions.values_mut() {
                region.avoid = region.region_id != home;
            }
            m
        });
        let mut sim = Sim::with_maps(maps, &[]);
        sim.run_for(Duration::from_millis(900));
        assert_eq!((sim.nodes[0].home_region(), sim.nodes[1].home_region()), (1, 2), "homes");
        sim
    }

    fn with_maps(maps: [RegionMap; 2], stun: &[(u32, Duration)]) -> Sim {
        let start = now();
        let servers: Vec<(u32, SocketAddr)> =
            stun.iter().map(|(id, _)| (*id, SocketAddr::from(([127, 0, 0, 1], 3478 + *id as u16)))).collect();
        let nodes = maps
            .into_iter()
            .enumerate()
            .map(|(i, map)| {
                let secret = SecretKey::generate(&mut OsRng);
                let settings = Settings {
                    secret: secret.clone(),
                    region_map: map.clone(),
                    stun_interval: Duration::from_secs(20),
                    rehome_interval: Duration::from_secs(30),
                    relay_only: false,
                    link_idle: LINK_IDLE,
                };
                let mut core = NodeCore::new(settings, OsRng, start);
                let addr = SocketAddr::from(([127, 0, 0, 11 + i as u8], 41641 + i as u16));
                core.set_local_endpoint(addr);
                core.set_stun_servers(servers.clone());
                core.handle_relay_connected(Link::Home);
                SimNode {
                    core,
                    addr,
                    key: secret.public_key(),
                    received: Vec::new(),
                    homes: Vec::new(),
                    pings: Vec::new(),
                    links: BTreeSet::new(),
                    link_events: Vec::new(),
                    finds: 0,
                }
            })
            .collect();
        let stun = servers.iter().zip(stun).map(|((_, addr), (_, d))| (*addr, *d)).collect();
        Sim { now: start, nodes, direct_up: true, relay_up: true, stun, in_flight: Vec::new() }
    }

    fn key(&self, i: usize) -> PublicKey {
        self.nodes[i].key
    }

    /// Moves what every core wants sent onto the simulated wires, and records its events.
    fn drain(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            while let Some(ev) = n.core.poll_event() {
                match ev {
                    Event::Received(r) => n.received.push(r),
                    Event::HomeChanged(h) => n.homes.push(h),
                    Event::LinkOpen(t) => {
                        if n.links.insert(t.region_id) {
                            n.link_events.push(format!("open {}", t.region_id));
                            n.core.handle_relay_connected(Link::Region(t.region_id));
                        }
                    }
                    Event::LinkClosed(r) => {
                        n.links.remove(&r);
                        n.link_events.push(format!("close {r}"));
                    }
                    Event::PingAnswered { id, path, rtt } => n.pings.push((id, path, rtt)),
                    Event::PingExpired(_) => {}
                }
            }
            // After the events, as the shell does: a link the core opened carries its packets.
            while let Some(t) = self.nodes[i].core.poll_transmit() {
                self.carry(i, t);
            }
        }
    }

    fn carry(&mut self, from: usize, t: Transmit) {
        let src = self.nodes[from].addr;
        match t.dst {
            Destination::Direct(to) => {
                if let Some(delay) = self.stun.get(&to) {
                    let answer = stun::binding_response(&t.payload, src).expect("a STUN request");
                    let input = Input::Datagram { from: to, data: Bytes::from(answer) };
                    self.in_flight.push((self.now + *delay * 2, from, input));
                    return;
                }
                let Some(dst) = self.nodes.iter().position(|n| n.addr == to) else { return };
                if self.direct_up {
                    let input = Input::Datagram { from: src, data: t.payload };
                    self.in_flight.push((self.now + DIRECT_DELAY, dst, input));
                }
            }
            Destination::Relay { link, peer } => {
                let Some(region) = self.region_of(from, link) else { return };
                if !self.relay_up {
                    return;
                }
                let at = self.now + RELAY_DELAY;
                match self
                    .nodes
                    .iter()
                    .position(|n| n.key == peer)
                    .and_then(|d| Some((d, self.nodes[d].link_in(region)?)))
                {
                    Some((dst, link)) => {
                        let input = Input::Relay { link, src: self.nodes[from].key, data: t.payload };
                        self.in_flight.push((at, dst, input));
                    }
                    None => self.in_flight.push((at, from, Input::Gone { link, peer })),
                }
            }
            Destination::Find { link, peer } => {
                self.nodes[from].finds += 1;
                let Some(region) = self.region_of(from, link) else { return };
                let present = self.nodes.iter().any(|n| n.key == peer && n.link_in(region).is_some());
                self.in_flight.push((self.now + RELAY_DELAY, from, Input::Presence { link, peer, present }));
            }
        }
    }

    /// The region `link` of node `i` reaches; None for a region link it does not have.
    fn region_of(&self, i: usize, link: Link) -> Option<u32> {
        match link {
            Link::Home => Some(self.nodes[i].home_region()),
            Link::Region(r) => self.nodes[i].links.contains(&r).then_some(r),
        }
    }

    /// Runs the simulation for `d`: deliveries and timers in time order.
    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            self.drain();
            let next_delivery = self.in_flight.iter().map(|(t, _, _)| *t).min();
            let next_timer = self.nodes.iter().map(|n| n.core.poll_timeout()).min().expect("nodes");
            let next = next_delivery.map_or(next_timer, |t| t.min(next_timer));
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.in_flight).into_iter().partition(|(t, _, _)| *t <= now);
            self.in_flight = later;
            for (_, i, input) in due {
                let core = &mut self.nodes[i].core;
                match input {
                    Input::Datagram { from, data } => core.handle_datagram(from, &data, now),
                    Input::Relay { link, src, data } => core.handle_relay_packet(link, src, &data, now),
                    Input::Gone { link, peer } => core.handle_peer_gone(link, peer, PeerGoneReason::NotHere, now),
                    Input::Presence { link, peer, present } => core.handle_presence(link, peer, present, now),
                }
            }
            for n in &mut self.nodes {
                if n.core.poll_timeout() <= now {
                    n.core.handle_timeout(now);
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, data: &'static [u8]) {
        let key = self.key(to);
        self.nodes[from].core.handle_send(key, Bytes::from_static(data), self.now);
    }

    fn path(&self, from: usize, to: usize) -> String {
        let key = self.key(to).to_hex();
        let status = self.nodes[from].core.status(self.now, String::new());
        status.peers.into_iter().find(|p| p.key == key).map(|p| p.path).unwrap_or_default()
    }
}

#[test]
fn a_direct_path_is_found_and_data_then_goes_direct() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    sim.send(0, 1, b"first");
    sim.run_for(Duration::from_millis(200));
    let first = &sim.nodes[1].received[0];
    assert_eq!((&first.data[..], first.path), (&b"first"[..], Path::Relay), "the first packet waits for no path");
    assert_eq!(sim.path(0, 1), format!("direct {}", sim.nodes[1].addr));
    assert_eq!(sim.path(1, 0), format!("direct {}", sim.nodes[0].addr));
    sim.send(0, 1, b"second");
    sim.run_for(Duration::from_millis(50));
    let second = &sim.nodes[1].received[1];
    assert_eq!((&second.data[..], second.path), (&b"second"[..], Path::Direct(sim.nodes[0].addr)));
}

#[test]
fn a_cut_direct_path_falls_back_to_the_relay_within_the_trust_window() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    sim.send(0, 1, b"hello");
    sim.run_for(Duration::from_millis(200));
    assert!(sim.path(0, 1).starts_with("direct"), "direct first");
    sim.direct_up = false;
    sim.run_for(Duration::from_millis(1000));
    assert!(sim.path(0, 1).starts_with("direct"), "still trusted 1 s after the cut");
    sim.run_for(paths::TRUST);
    assert_eq!(sim.path(0, 1), "relay", "given up once nothing answered for the trust window");
    sim.send(0, 1, b"after the cut");
    sim.run_for(Duration::from_millis(50));
    let last = sim.nodes[1].received.last().expect("delivered");
    assert_eq!((&last.data[..], last.path), (&b"after the cut"[..], Path::Relay));
    // The link comes back: the re-probe finds it again.
    sim.direct_up = true;
    sim.run_for(paths::PROBE_INTERVAL + Duration::from_millis(200));
    assert!(sim.path(0, 1).starts_with("direct"), "direct again after the re-probe");
}

#[test]
fn an_explicit_ping_is_answered_over_the_current_path() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    let b = sim.key(1);
    let id = sim.nodes[0].core.handle_ping(b, sim.now).expect("room");
    sim.run_for(Duration::from_millis(100));
    let (got, path, rtt) = sim.nodes[0].pings[0];
    assert_eq!((got, path), (id, Path::Relay));
    assert_eq!(rtt, RELAY_DELAY * 2);
}

#[test]
fn the_home_is_the_region_stun_answers_fastest_and_a_lost_relay_moves_it_to_a_sibling() {
    let map = map(&[(1, &[8443, 8444]), (2, &[9443])]);
    let mut sim = Sim::new(map, &[(1, Duration::from_millis(30)), (2, Duration::from_millis(5))]);
    sim.run_for(Duration::from_millis(300));
    let homes = &sim.nodes[0].homes;
    assert_eq!(homes.iter().map(|h| h.region_id).collect::<Vec<_>>(), vec![2], "region 2 answered first and fastest");
    let status = sim.nodes[0].core.status(sim.now, String::new());
    assert_eq!(status.endpoints, vec![sim.nodes[0].addr.to_string()], "STUN saw the same address (no NAT)");
    // Region 2's relay fails: region 1, whose first relay then fails too: its sibling.
    let lost = homes[0].url.clone();
    sim.nodes[0].core.handle_relay_lost(Link::Home, lost, sim.now);
    sim.drain();
    let first = sim.nodes[0].homes.last().expect("moved").clone();
    assert_eq!((first.region_id, first.addr.map(|a| a.port())), (1, Some(8443)));
    sim.nodes[0].core.handle_relay_lost(Link::Home, first.url, sim.now);
    sim.drain();
    let sibling = sim.nodes[0].homes.last().expect("moved");
    assert_eq!((sibling.region_id, sibling.addr.map(|a| a.port())), (1, Some(8444)));
}

#[test]
fn without_stun_a_home_is_chosen_after_a_short_wait() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    sim.run_for(Duration::from_millis(600));
    assert!(sim.nodes[0].homes.is_empty(), "waits for STUN first");
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sim.nodes[0].homes.iter().map(|h| h.region_id).collect::<Vec<_>>(), vec![1]);
}

impl Sim {
    fn peer(&self, from: usize, to: usize) -> PeerStatus {
        let key = self.key(to).to_hex();
        let status = self.nodes[from].core.status(self.now, String::new());
        status.peers.into_iter().find(|p| p.key == key).expect("a known peer")
    }

    fn received(&self, i: usize) -> Vec<&[u8]> {
        self.nodes[i].received.iter().map(|r| &r.data[..]).collect()
    }
}

#[test]
fn a_peer_homed_in_another_region_is_looked_up_and_what_was_sent_meanwhile_arrives() {
    let mut sim = Sim::two_regions(&[1, 2, 3]);
    sim.direct_up = false;
    sim.send(0, 1, b"one");
    sim.send(0, 1, b"two");
    sim.run_for(Duration::from_millis(100));
    // Region 1 said "not here"; regions 2 and 3 were asked; 2 had it, and both packets went there.
    assert_eq!(sim.received(1), vec![&b"one"[..], b"two"]);
    assert_eq!(sim.nodes[0].finds, 2, "one question per other region");
    sim.send(0, 1, b"three");
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.received(1), vec![&b"one"[..], b"two", b"three"], "no second lookup");
    assert_eq!(sim.nodes[0].finds, 2);
    // The answer comes back the same way; each side learnt the other's home from its CallMeMaybe.
    sim.send(1, 0, b"back");
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.received(0), vec![&b"back"[..]]);
    let (a, b) = (sim.peer(0, 1), sim.peer(1, 0));
    assert_eq!((a.home_region, a.region_source), (Some(2), Some(RegionSource::Told)));
    assert_eq!((b.home_region, b.region_source), (Some(1), Some(RegionSource::Told)));
    assert_eq!(a.relay.as_deref(), Some("https://localhost:8444"), "carried by region 2's relay");
    // Region 3's link, opened only for the question, and then the others close once idle.
    assert_eq!(sim.nodes[0].link_events[..2], ["open 2", "open 3"]);
    sim.run_for(LINK_IDLE + paths::ACTIVE_FOR + Duration::from_secs(1));
    assert!(sim.nodes[0].links.is_empty() && sim.nodes[1].links.is_empty(), "idle links closed");
    assert!(sim.nodes[0].link_events.contains(&"close 3".to_owned()));
    let status = sim.nodes[0].core.status(sim.now, String::new());
    assert!(status.region_links.is_empty());
}

#[test]
fn a_hint_sends_straight_to_the_region_and_a_wrong_one_falls_back_to_a_lookup() {
    let mut sim = Sim::two_regions(&[1, 2, 3]);
    sim.direct_up = false;
    let b = sim.key(1);
    sim.nodes[0].core.handle_hint(b, 2);
    sim.send(0, 1, b"hinted");
    sim.run_for(Duration::from_millis(100));
    assert_eq!((sim.received(1), sim.nodes[0].finds), (vec![&b"hinted"[..]], 0), "no lookup");
    assert_eq!(sim.nodes[0].link_events, ["open 2"]);

    let mut sim = Sim::two_regions(&[1, 2, 3]);
    sim.direct_up = false;
    let b = sim.key(1);
    sim.nodes[0].core.handle_hint(b, 3);
    sim.send(0, 1, b"misdirected");
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.received(1), vec![&b"misdirected"[..]], "resent where the lookup found it");
    assert_eq!(sim.nodes[0].finds, 2, "regions 1 and 2 asked, not 3 again");
}

#[test]
fn a_peer_no_region_has_is_given_up_and_its_packets_counted() {
    let mut sim = Sim::two_regions(&[1, 2]);
    let nobody = SecretKey::generate(&mut OsRng).public_key();
    sim.nodes[0].core.handle_send(nobody, Bytes::from_static(b"lost"), sim.now);
    sim.run_for(reach::LOOKUP_TIMEOUT + Duration::from_secs(1));
    let status = sim.nodes[0].core.status(sim.now, String::new());
    assert_eq!(sim.nodes[0].finds, 1);
    assert!(status.lookup_dropped >= 1, "the packet (and the CallMeMaybe) held, then dropped");
    // Asked again only after LOOKUP_RETRY, however much is sent.
    for _ in 0..20 {
        sim.nodes[0].core.handle_send(nobody, Bytes::from_static(b"lost"), sim.now);
        sim.run_for(Duration::from_millis(50));
    }
    assert_eq!(sim.nodes[0].finds, 1);
}

#[test]
fn a_direct_path_forms_between_nodes_homed_in_different_regions() {
    let mut sim = Sim::two_regions(&[1, 2]);
    sim.send(0, 1, b"first");
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sim.received(1), vec![&b"first"[..]]);
    assert_eq!(sim.path(0, 1), format!("direct {}", sim.nodes[1].addr));
    assert_eq!(sim.path(1, 0), format!("direct {}", sim.nodes[0].addr));
    sim.send(0, 1, b"second");
    sim.run_for(Duration::from_millis(50));
    assert_eq!(sim.nodes[1].received[1].path, Path::Direct(sim.nodes[0].addr));
}

#[test]
fn the_home_moving_into_a_linked_region_closes_that_link() {
    let mut sim = Sim::two_regions(&[1, 2]);
    sim.direct_up = false;
    sim.send(0, 1, b"one");
    sim.run_for(Duration::from_millis(100));
    assert!(sim.nodes[0].links.contains(&2));
    // Region 1's relay fails: node 0's home moves to region 2, where it already had a link.
    let lost = sim.nodes[0].homes.last().expect("home").url.clone();
    sim.nodes[0].core.handle_relay_lost(Link::Home, lost, sim.now);
    sim.nodes[0].core.handle_relay_connected(Link::Home);
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[0].home_region(), 2);
    assert!(sim.nodes[0].links.is_empty(), "the home carries region 2 now");
    sim.send(0, 1, b"two");
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.received(1), vec![&b"one"[..], b"two"]);
}

impl Sim {
    /// Sends `count` numbered packets from node 0 to node 1, one every 10 ms, calling `at(i)`
    /// before the `i`th; returns what was sent.
    fn stream(&mut self, count: u32, mut at: impl FnMut(&mut Sim, u32)) -> Vec<Vec<u8>> {
        let b = self.key(1);
        let mut sent = Vec::new();
        for i in 0..count {
            at(self, i);
            let data = format!("packet {i}").into_bytes();
            self.nodes[0].core.handle_send(b, Bytes::from(data.clone()), self.now);
            sent.push(data);
            self.run_for(Duration::from_millis(10));
        }
        self.run_for(Duration::from_millis(200));
        sent
    }

    /// What node `i` received after its first packet, as owned bytes.
    fn received_after_first(&self, i: usize) -> Vec<Vec<u8>> {
        self.nodes[i].received.iter().skip(1).map(|r| r.data.to_vec()).collect()
    }
}

#[test]
fn a_cut_direct_path_under_traffic_loses_nothing() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    sim.send(0, 1, b"hello");
    sim.run_for(Duration::from_millis(200));
    assert!(sim.path(0, 1).starts_with("direct"), "direct first");
    let mut cut = None;
    let mut switched = None;
    let sent = sim.stream(300, |sim, i| {
        if i == 50 {
            sim.direct_up = false;
            cut = Some(sim.now);
        }
        if let Some(c) = cut.filter(|_| switched.is_none() && sim.path(0, 1) == "relay") {
            switched = Some(sim.now - c);
        }
    });
    // Every packet arrives once, in order: what the dead path held went over the relay first.
    assert_eq!(sim.received_after_first(1), sent);
    let switched = switched.expect("fell back to the relay");
    let bound = paths::CONFIRM_INTERVAL + paths::lost_after(None) + 2 * TICK;
    assert!(switched <= bound, "gave the path up after {switched:?}, long before the trust window");
    let (a, b) = (sim.peer(0, 1), sim.peer(1, 0));
    assert!(a.tx_resent > 0 && a.tx_unprotected == 0, "{a:?}");
    assert!(b.rx_duplicate < a.tx_resent, "only what had arrived after all is a copy: {b:?}");
}

#[test]
fn confirmed_data_is_never_resent_and_a_short_outage_returns_to_the_direct_path() {
    let mut sim = Sim::new(map(&[(1, &[8443])]), &[]);
    sim.send(0, 1, b"hello");
    sim.run_for(Duration::from_millis(200));
    let sent = sim.stream(100, |_, _| {});
    assert_eq!(sim.received_after_first(1), sent);
    let (a, b) = (sim.peer(0, 1), sim.peer(1, 0));
    assert_eq!((a.tx_resent, b.rx_duplicate, a.tx_direct), (0, 0, 100), "a live path confirms everything");
    // 400 ms without the direct link: given up, then found again once it answers.
    let sent = sim.stream(100, |sim, i| match i {
        10 => sim.direct_up = false,
        50 => sim.direct_up = true,
        _ => {}
    });
    assert_eq!(sim.received_after_first(1)[100..], sent[..]);
    assert!(sim.peer(0, 1).tx_resent > 0);
    assert!(sim.path(0, 1).starts_with("direct"), "direct again: {}", sim.path(0, 1));
    let last = sim.nodes[1].received.last().expect("delivered");
    assert!(matches!(last.path, Path::Direct(_)), "the last packets went direct");
}
