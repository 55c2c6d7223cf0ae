//! Which path reaches a peer: direct UDP to one of its endpoints, or the relay.
//!
//! Sans-IO: the node feeds in what happened (`on_*`) with the current time and asks what to
//! do (`poll_pings`, `want_call_me_maybe`, `current`).
//!
//! Policy, in the spirit of Tailscale's magicsock:
//! - a peer's candidates are the endpoints it advertised (CallMeMaybe) plus every address a
//!   Ping from it arrived from (peer-reflexive);
//! - while the peer is active, every candidate is pinged; the first Pong makes a direct path;
//!   another candidate replaces it only when clearly faster;
//! - the direct path is used while it answered within [`TRUST`]; it is pinged every
//!   [`HEARTBEAT`], so a dead path falls back to the relay within about [`TRUST`];
//! - without a direct path, all candidates are re-probed every [`PROBE_INTERVAL`] and the peer
//!   is re-asked (CallMeMaybe through the relay) at the same pace.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;

/// How long a direct path stays trusted after its last Pong.
pub const TRUST: Duration = Duration::from_millis(2500);
/// Ping interval on the current direct path.
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// Re-probe interval of all candidates (and CallMeMaybe) while no direct path is trusted.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Re-probe interval of other candidates while a direct path is trusted.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(20);
/// A peer is active (probed) for this long after its last traffic.
pub const ACTIVE_FOR: Duration = Duration::from_secs(60);
/// Unanswered pings are forgotten after this long.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Candidates remembered per peer.
const MAX_CANDIDATES: usize = 32;
/// A new path must be this much faster (ratio) to replace the current one.
const BETTER_RATIO: f64 = 0.7;

/// The path packets to a peer take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Direct UDP to this endpoint.
    Direct(SocketAddr),
    /// Through the home relay.
    Relay,
}

#[derive(Debug, Default, Clone)]
struct Candidate {
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

/// Path state of one peer.
#[derive(Debug, Default)]
pub struct PeerPaths {
    candidates: BTreeMap<SocketAddr, Candidate>,
    best: Option<SocketAddr>,
    pending: HashMap<[u8; 12], (SocketAddr, Instant)>,
    last_activity: Option<Instant>,
    first_activity: Option<Instant>,
    first_direct: Option<Instant>,
    last_call_me_maybe: Option<Instant>,
}

impl PeerPaths {
    /// Notes traffic to or from the peer: it is probed while active.
    pub fn on_activity(&mut self, now: Instant) {
        self.last_activity = Some(now);
        self.first_activity.get_or_insert(now);
    }

    /// Whether the peer had traffic within [`ACTIVE_FOR`].
    pub fn is_active(&self, now: Instant) -> bool {
        self.last_activity.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_FOR)
    }

    /// Adds endpoints the peer advertised.
    pub fn add_candidates(&mut self, endpoints: &[SocketAddr]) {
        for ep in endpoints {
            self.add_candidate(*ep);
        }
    }

    fn add_candidate(&mut self, ep: SocketAddr) {
        if ep.port() == 0 || ep.ip().is_unspecified() || ep.ip().is_multicast() {
            return;
        }
        if self.candidates.len() >= MAX_CANDIDATES && !self.candidates.contains_key(&ep) {
            // Forget the candidate that never answered and was advertised first.
            let stale =
                self.candidates.iter().find(|(a, c)| c.last_pong.is_none() && Some(**a) != self.best).map(|(a, _)| *a);
            match stale {
                Some(a) => {
                    self.candidates.remove(&a);
                }
                None => return,
            }
        }
        self.candidates.entry(ep).or_default();
    }

    /// A Ping from the peer arrived directly from `from`: that address reaches it. Not activity
    /// of ours: the peer's heartbeats must not keep us heartbeating back once both are idle.
    pub fn on_ping_from(&mut self, from: SocketAddr) {
        self.add_candidate(from);
    }

    /// A Pong arrived from `from`. Returns the round-trip time if it answered our ping.
    pub fn on_pong(&mut self, tx: [u8; 12], from: SocketAddr, now: Instant) -> Option<Duration> {
        let (to, sent) = self.pending.remove(&tx)?;
        if to != from {
            // Answered from another address than pinged: not proof that `to` works.
            return None;
        }
        let rtt = now.saturating_duration_since(sent);
        let c = self.candidates.entry(from).or_default();
        c.last_pong = Some(now);
        c.rtt = Some(rtt);
        let switch = match self.best.and_then(|b| self.candidates.get(&b).map(|c| (b, c.clone()))) {
            None => true,
            Some((b, _)) if b == from => false,
            Some((_, cur)) => {
                let cur_alive = cur.last_pong.is_some_and(|t| now.saturating_duration_since(t) < TRUST);
                !cur_alive || cur.rtt.is_some_and(|r| rtt.as_secs_f64() < r.as_secs_f64() * BETTER_RATIO)
            }
        };
        if switch {
            self.best = Some(from);
        }
        self.first_direct.get_or_insert(now);
        Some(rtt)
    }

    /// The path to use now.
    pub fn current(&self, now: Instant) -> Path {
        match self.best.and_then(|b| self.candidates.get(&b).map(|c| (b, c))) {
            Some((b, c)) if c.last_pong.is_some_and(|t| now.saturating_duration_since(t) < TRUST) => Path::Direct(b),
            _ => Path::Relay,
        }
    }

    /// Round-trip time of the current direct path.
    pub fn direct_rtt(&self, now: Instant) -> Option<Duration> {
        match self.current(now) {
            Path::Direct(a) => self.candidates.get(&a).and_then(|c| c.rtt),
            Path::Relay => None,
        }
    }

    /// Time from the first traffic to the first direct path, if one was found.
    pub fn time_to_direct(&self) -> Option<Duration> {
        Some(self.first_direct?.saturating_duration_since(self.first_activity?))
    }

    /// Candidate endpoints known.
    pub fn candidates(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.candidates.keys().copied()
    }

    /// Pings due now: `(endpoint, transaction id)` pairs, each already recorded as pending.
    pub fn poll_pings(&mut self, now: Instant, rng: &mut impl RngCore) -> Vec<(SocketAddr, [u8; 12])> {
        self.pending.retain(|_, (_, sent)| now.saturating_duration_since(*sent) < PING_TIMEOUT);
        if !self.is_active(now) {
            return Vec::new();
        }
        let direct = self.current(now);
        let mut due = Vec::new();
        for (addr, c) in &mut self.candidates {
            let interval = match direct {
                Path::Direct(b) if b == *addr => HEARTBEAT,
                Path::Direct(_) => REPROBE_INTERVAL,
                Path::Relay => PROBE_INTERVAL,
            };
            if c.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= interval) {
                c.last_ping = Some(now);
                let mut tx = [0u8; 12];
                rng.fill_bytes(&mut tx);
                due.push((*addr, tx));
            }
        }
        for (addr, tx) in &due {
            self.pending.insert(*tx, (*addr, now));
        }
        due
    }

    /// Whether to (re)send our endpoints to the peer through the relay now.
    pub fn want_call_me_maybe(&mut self, now: Instant) -> bool {
        if !self.is_active(now) || matches!(self.current(now), Path::Direct(_)) {
            return false;
        }
        if self.last_call_me_maybe.is_some_and(|t| now.saturating_duration_since(t) < PROBE_INTERVAL) {
            return false;
        }
        self.last_call_me_maybe = Some(now);
        true
    }

    /// A ping to send back to `from` right away (a Ping from the peer just arrived from it), unless
    /// that address already carries a trusted path or was pinged within the last 250 ms.
    pub fn ping_back(&mut self, from: SocketAddr, now: Instant, rng: &mut impl RngCore) -> Option<[u8; 12]> {
        if self.current(now) == Path::Direct(from) {
            return None;
        }
        let c = self.candidates.get_mut(&from)?;
        if c.last_ping.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(250)) {
            return None;
        }
        c.last_ping = Some(now);
        let mut tx = [0u8; 12];
        rng.fill_bytes(&mut tx);
        self.pending.insert(tx, (from, now));
        Some(tx)
    }

    /// Records a ping sent outside `poll_pings` (e.g. an explicit `warren ping`).
    pub fn note_ping(&mut self, tx: [u8; 12], to: SocketAddr, now: Instant) {
        self.pending.insert(tx, (to, now));
    }
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn ep(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn first_pong_makes_a_direct_path_and_silence_falls_back() {
        let t0 = Instant::now();
        let mut p = PeerPaths::default();
        p.on_activity(t0);
        assert!(p.want_call_me_maybe(t0));
        assert!(!p.want_call_me_maybe(t0 + Duration::from_millis(10)), "not again so soon");
        p.add_candidates(&[ep("192.0.2.1:4000"), ep("198.51.100.2:5000")]);
        let pings = p.poll_pings(t0, &mut OsRng);
        assert_eq!(pings.len(), 2);
        assert_eq!(p.current(t0), Path::Relay);
        let (to, tx) = pings[1];
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(p.on_pong(tx, to, t1), Some(Duration::from_millis(30)));
        assert_eq!(p.current(t1), Path::Direct(to));
        assert_eq!(p.time_to_direct(), Some(Duration::from_millis(30)));
        // A replayed pong is ignored.
        assert_eq!(p.on_pong(tx, to, t1), None);
        // The direct path is heartbeated; if it stays silent, the relay takes over.
        let hb = p.poll_pings(t1 + HEARTBEAT, &mut OsRng);
        assert!(hb.iter().any(|(a, _)| *a == to));
        p.on_activity(t1 + TRUST);
        assert_eq!(p.current(t1 + TRUST), Path::Relay);
        assert!(p.want_call_me_maybe(t1 + TRUST), "asks again once the direct path is gone");
    }

    #[test]
    fn pong_from_another_address_does_not_count() {
        let t0 = Instant::now();
        let mut p = PeerPaths::default();
        p.on_activity(t0);
        p.add_candidates(&[ep("192.0.2.1:4000")]);
        let (to, tx) = p.poll_pings(t0, &mut OsRng)[0];
        assert_eq!(p.on_pong(tx, ep("192.0.2.9:4000"), t0), None);
        assert_eq!(p.current(t0), Path::Relay);
        let _ = to;
    }

    #[test]
    fn switches_only_to_a_clearly_faster_path() {
        let t0 = Instant::now();
        let mut p = PeerPaths::default();
        p.on_activity(t0);
        p.add_candidates(&[ep("192.0.2.1:1"), ep("192.0.2.2:2"), ep("192.0.2.3:3")]);
        let pings = p.poll_pings(t0, &mut OsRng);
        let ms = Duration::from_millis;
        p.on_pong(pings[0].1, pings[0].0, t0 + ms(20));
        p.on_pong(pings[1].1, pings[1].0, t0 + ms(18)); // 18 ms vs 20 ms: not worth a switch
        assert_eq!(p.current(t0 + ms(21)), Path::Direct(pings[0].0));
        p.on_pong(pings[2].1, pings[2].0, t0 + ms(21)); // 21 ms round trip: slower
        assert_eq!(p.current(t0 + ms(22)), Path::Direct(pings[0].0));
        let again = p.poll_pings(t0 + REPROBE_INTERVAL, &mut OsRng);
        let b = again.iter().find(|(a, _)| *a == pings[1].0).expect("reprobed");
        p.on_pong(b.1, b.0, t0 + REPROBE_INTERVAL + ms(2)); // 2 ms: clearly faster
        assert_eq!(p.current(t0 + REPROBE_INTERVAL + ms(3)), Path::Direct(pings[1].0));
    }

    #[test]
    fn inactive_peers_are_not_probed_and_candidates_are_bounded() {
        let t0 = Instant::now();
        let mut p = PeerPaths::default();
        for i in 0..100u16 {
            p.on_ping_from(SocketAddr::from(([192, 0, 2, 1], 1000 + i)));
        }
        assert_eq!(p.candidates().count(), MAX_CANDIDATES);
        assert!(!p.poll_pings(t0 + ACTIVE_FOR, &mut OsRng).iter().any(|_| true));
        p.add_candidates(&[ep("0.0.0.0:1"), ep("192.0.2.1:0")]);
        assert_eq!(p.candidates().count(), MAX_CANDIDATES);
    }
}
