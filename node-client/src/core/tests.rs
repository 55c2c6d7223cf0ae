//! Two node cores on a simulated network with simulated time: a direct link that can be cut,
//! a relay that carries packets by key, and STUN servers that answer after a set delay.

use std::collections::HashMap;
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

enum Input {
    Datagram { from: SocketAddr, data: Bytes },
    Relay { src: PublicKey, data: Bytes },
}

struct SimNode {
    core: NodeCore<OsRng>,
    addr: SocketAddr,
    key: PublicKey,
    received: Vec<Received>,
    homes: Vec<HomeTarget>,
    pings: Vec<(u64, Path, Duration)>,
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
        let start = now();
        let servers: Vec<(u32, SocketAddr)> =
            stun.iter().map(|(id, _)| (*id, SocketAddr::from(([127, 0, 0, 1], 3478 + *id as u16)))).collect();
        let nodes = (0..2)
            .map(|i| {
                let secret = SecretKey::generate(&mut OsRng);
                let settings = Settings {
                    secret: secret.clone(),
                    region_map: map.clone(),
                    stun_interval: Duration::from_secs(20),
                    rehome_interval: Duration::from_secs(30),
                    relay_only: false,
                };
                let mut core = NodeCore::new(settings, OsRng, start);
                let addr = SocketAddr::from(([127, 0, 0, 11 + i as u8], 41641 + i as u16));
                core.set_local_endpoint(addr);
                core.set_stun_servers(servers.clone());
                core.handle_relay_connected();
                SimNode {
                    core,
                    addr,
                    key: secret.public_key(),
                    received: Vec::new(),
                    homes: Vec::new(),
                    pings: Vec::new(),
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
            while let Some(t) = self.nodes[i].core.poll_transmit() {
                self.carry(i, t);
            }
            let n = &mut self.nodes[i];
            while let Some(ev) = n.core.poll_event() {
                match ev {
                    Event::Received(r) => n.received.push(r),
                    Event::HomeChanged(h) => n.homes.push(h),
                    Event::PingAnswered { id, path, rtt } => n.pings.push((id, path, rtt)),
                    Event::PingExpired(_) => {}
                }
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
            Destination::Relay(key) => {
                let Some(dst) = self.nodes.iter().position(|n| n.key == key) else { return };
                if self.relay_up {
                    let input = Input::Relay { src: self.nodes[from].key, data: t.payload };
                    self.in_flight.push((self.now + RELAY_DELAY, dst, input));
                }
            }
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
                    Input::Relay { src, data } => core.handle_relay_packet(src, &data, now),
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
    sim.nodes[0].core.handle_relay_lost(lost, sim.now);
    sim.drain();
    let first = sim.nodes[0].homes.last().expect("moved").clone();
    assert_eq!((first.region_id, first.addr.map(|a| a.port())), (1, Some(8443)));
    sim.nodes[0].core.handle_relay_lost(first.url, sim.now);
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
