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
//! - data sent directly is held until a Pong to a later ping confirms it. Under traffic the
//!   path is pinged every [`CONFIRM_INTERVAL`], and a ping that would confirm held data but
//!   stays unanswered for [`lost_after`] gives the path up at once; what it held is handed back
//!   ([`PeerPaths::take_stranded`]) to be resent over the path used now, so a cut loses nothing
//!   (the receiver drops the copies of what had arrived after all, by the envelope's nonce);
//! - without a direct path, all candidates are re-probed every [`PROBE_INTERVAL`] and the peer
//!   is re-asked (CallMeMaybe through the relay) at the same pace.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::RngCore;

/// How long a direct path stays trusted after its last Pong.
pub const TRUST: Duration = Duration::from_millis(2500);
/// Ping interval on the current direct path.
pub const HEARTBEAT: Duration = Duration::from_millis(700);
/// Ping interval on the current direct path while data sent over it waits for confirmation.
pub const CONFIRM_INTERVAL: Duration = Duration::from_millis(100);
/// Direct data packets held for confirmation per peer, at most; past either bound the oldest
/// are let go unconfirmed (counted as unprotected).
pub const MAX_HELD: usize = 4096;
/// Bytes of held direct data per peer, at most.
pub const MAX_HELD_BYTES: usize = 4 << 20;
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
    /// The held-data sequence number when it was last pinged: data numbered from here on went
    /// out after that ping.
    last_ping_mark: u64,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

/// A ping waiting for its Pong.
#[derive(Debug, Clone, Copy)]
struct Pending {
    to: SocketAddr,
    sent: Instant,
    /// Held data numbered below this went out before the ping: its Pong confirms that data.
    mark: u64,
}

/// A data envelope sent directly, not yet confirmed.
#[derive(Debug)]
struct HeldPacket {
    seq: u64,
    to: SocketAddr,
    sent: Instant,
    payload: Bytes,
}

/// Direct data waiting for a Pong that confirms it, oldest first.
#[derive(Debug, Default)]
struct Held {
    packets: VecDeque<HeldPacket>,
    bytes: usize,
    next_seq: u64,
    /// Packets let go unconfirmed because the bounds were reached.
    unprotected: u64,
}

impl Held {
    fn push(&mut self, to: SocketAddr, payload: Bytes, now: Instant) {
        self.bytes += payload.len();
        self.packets.push_back(HeldPacket { seq: self.next_seq, to, sent: now, payload });
        self.next_seq += 1;
        while self.packets.len() > MAX_HELD || self.bytes > MAX_HELD_BYTES {
            self.pop();
            self.unprotected += 1;
        }
    }

    fn pop(&mut self) -> Option<HeldPacket> {
        let p = self.packets.pop_front()?;
        self.bytes -= p.payload.len();
        Some(p)
    }

    /// A Pong from `from` to a ping sent at `mark`: what went there before it arrived.
    fn confirm(&mut self, from: SocketAddr, mark: u64) {
        self.take_where(|p| p.seq < mark && p.to == from);
    }

    /// Removes the packets `f` picks and returns them, oldest first.
    fn take_where(&mut self, f: impl Fn(&HeldPacket) -> bool) -> VecDeque<HeldPacket> {
        let (taken, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.packets).into_iter().partition(f);
        self.packets = kept;
        self.bytes -= taken.iter().map(|p| p.payload.len()).sum::<usize>();
        taken
    }

    /// The oldest held packet sent to `to`.
    fn oldest_to(&self, to: SocketAddr) -> Option<u64> {
        self.packets.iter().find(|p| p.to == to).map(|p| p.seq)
    }
}

/// Path state of one peer.
#[derive(Debug, Default)]
pub struct PeerPaths {
    candidates: BTreeMap<SocketAddr, Candidate>,
    best: Option<SocketAddr>,
    /// The best candidate, given up because a confirming ping went unanswered; a Pong from it
    /// restores it.
    suspect: Option<SocketAddr>,
    pending: HashMap<[u8; 12], Pending>,
    held: Held,
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
        let ping = self.pending.remove(&tx)?;
        if ping.to != from {
            // Answered from another address than pinged: not proof that `to` works.
            return None;
        }
        let rtt = now.saturating_duration_since(ping.sent);
        self.held.confirm(from, ping.mark);
        if self.suspect == Some(from) {
            self.suspect = None;
        }
        let c = self.candidates.entry(from).or_default();
        c.last_pong = Some(now);
        c.rtt = Some(rtt);
        let switch = match self.best.and_then(|b| self.candidates.get(&b).map(|c| (b, c.clone()))) {
            None => true,
            Some((b, _)) if b == from => false,
            Some((b, cur)) => {
                !self.usable(b, &cur, now)
                    || cur.rtt.is_some_and(|r| rtt.as_secs_f64() < r.as_secs_f64() * BETTER_RATIO)
            }
        };
        if switch {
            self.best = Some(from);
        }
        self.first_direct.get_or_insert(now);
        Some(rtt)
    }

    /// Whether candidate `a` carries data now: answered within [`TRUST`] and not given up.
    fn usable(&self, a: SocketAddr, c: &Candidate, now: Instant) -> bool {
        self.suspect != Some(a) && trusted(c, now)
    }

    /// The path to use now.
    pub fn current(&self, now: Instant) -> Path {
        match self.best.and_then(|b| self.candidates.get(&b).map(|c| (b, c))) {
            Some((b, c)) if self.usable(b, c, now) => Path::Direct(b),
            _ => Path::Relay,
        }
    }

    /// Holds a data envelope just sent directly to `to` until a Pong confirms it.
    pub fn sent_data(&mut self, to: SocketAddr, payload: Bytes, now: Instant) {
        self.held.push(to, payload, now);
    }

    /// Gives the direct path up if a ping that would confirm its held data went unanswered for
    /// [`lost_after`]; then returns, oldest first, the held envelopes that went over a path no
    /// longer used, to be resent over [`Self::current`]. Held data older than [`PING_TIMEOUT`]
    /// is let go: whatever could confirm it has expired.
    pub fn take_stranded(&mut self, now: Instant) -> Vec<Bytes> {
        if let Some(b) = self.best.filter(|b| self.suspect != Some(*b)) {
            if let Some(oldest) = self.held.oldest_to(b) {
                let wait = lost_after(self.candidates.get(&b).and_then(|c| c.rtt));
                let overdue = self
                    .pending
                    .values()
                    .any(|p| p.to == b && p.mark > oldest && now.saturating_duration_since(p.sent) >= wait);
                if overdue {
                    self.suspect = Some(b);
                }
            }
        }
        while self.held.packets.front().is_some_and(|p| now.saturating_duration_since(p.sent) >= PING_TIMEOUT) {
            self.held.pop();
        }
        // Every push follows a call of this, so held packets go to one path but right after a
        // switch: the oldest and the newest tell.
        let current = self.current(now);
        let on_current = |p: Option<&HeldPacket>| p.is_none_or(|p| current == Path::Direct(p.to));
        if on_current(self.held.packets.front()) && on_current(self.held.packets.back()) {
            return Vec::new();
        }
        self.held.take_where(|p| current != Path::Direct(p.to)).into_iter().map(|p| p.payload).collect()
    }

    /// Direct data let go unconfirmed because too much was held.
    pub fn unprotected(&self) -> u64 {
        self.held.unprotected
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
        self.pending.retain(|_, p| now.saturating_duration_since(p.sent) < PING_TIMEOUT);
        if !self.is_active(now) {
            return Vec::new();
        }
        let direct = self.current(now);
        let mut due = Vec::new();
        for (addr, c) in &mut self.candidates {
            let interval = if Some(*addr) == self.best && trusted(c, now) {
                // Data sent since its last ping waits for a Pong: confirm it soon.
                let unconfirmed = self.held.packets.back().is_some_and(|p| p.seq >= c.last_ping_mark);
                if unconfirmed || self.suspect == Some(*addr) {
                    CONFIRM_INTERVAL
                } else {
                    HEARTBEAT
                }
            } else if matches!(direct, Path::Direct(_)) {
                REPROBE_INTERVAL
            } else {
                PROBE_INTERVAL
            };
            if c.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= interval) {
                c.last_ping = Some(now);
                c.last_ping_mark = self.held.next_seq;
                let mut tx = [0u8; 12];
                rng.fill_bytes(&mut tx);
                due.push((*addr, tx));
            }
        }
        let mark = self.held.next_seq;
        for (to, tx) in &due {
            self.pending.insert(*tx, Pending { to: *to, sent: now, mark });
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
        c.last_ping_mark = self.held.next_seq;
        let mut tx = [0u8; 12];
        rng.fill_bytes(&mut tx);
        self.pending.insert(tx, Pending { to: from, sent: now, mark: self.held.next_seq });
        Some(tx)
    }

    /// Records a ping sent outside `poll_pings` (e.g. an explicit `warren ping`).
    pub fn note_ping(&mut self, tx: [u8; 12], to: SocketAddr, now: Instant) {
        self.pending.insert(tx, Pending { to, sent: now, mark: self.held.next_seq });
    }
}

/// Whether `c` answered within [`TRUST`].
fn trusted(c: &Candidate, now: Instant) -> bool {
    c.last_pong.is_some_and(|t| now.saturating_duration_since(t) < TRUST)
}

/// How long a ping that would confirm held data may go unanswered before the path is given
/// up: four round trips, at least 300 ms (a queue or a scheduler hiccup is not a cut), at most
/// [`TRUST`].
pub fn lost_after(rtt: Option<Duration>) -> Duration {
    (rtt.unwrap_or(Duration::ZERO) * 4).clamp(Duration::from_millis(300), TRUST)
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

    #[test]
    fn held_data_is_confirmed_by_a_later_pong_bounded_and_handed_back_when_the_path_is_lost() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = PeerPaths::default();
        p.on_activity(t0);
        p.add_candidates(&[ep("192.0.2.1:4000")]);
        let (to, tx) = p.poll_pings(t0, &mut OsRng)[0];
        p.on_pong(tx, to, t0 + ms(1));
        p.sent_data(to, Bytes::from_static(b"one"), t0 + ms(2));
        // Data since the last ping: the next one is due after CONFIRM_INTERVAL, not HEARTBEAT.
        assert!(p.poll_pings(t0 + ms(50), &mut OsRng).is_empty());
        let (_, confirm) = p.poll_pings(t0 + ms(1) + CONFIRM_INTERVAL, &mut OsRng)[0];
        p.sent_data(to, Bytes::from_static(b"two"), t0 + ms(120));
        p.on_pong(confirm, to, t0 + ms(121));
        // "one" went before the confirming ping; "two" after it, so it is still held.
        assert_eq!(p.poll_pings(t0 + ms(221), &mut OsRng).len(), 1, "\"two\" waits: confirm it");
        assert!(p.take_stranded(t0 + ms(321)).is_empty(), "its ping is not overdue yet");
        let lost = t0 + ms(221) + lost_after(Some(ms(1)));
        assert_eq!(p.take_stranded(lost), vec![Bytes::from_static(b"two")], "given up: handed back");
        assert_eq!(p.current(lost), Path::Relay);
        // Bounded: past MAX_HELD the oldest go unprotected.
        let mut q = PeerPaths::default();
        for _ in 0..MAX_HELD + 10 {
            q.sent_data(to, Bytes::from_static(b"x"), t0);
        }
        assert_eq!((q.held.packets.len(), q.unprotected()), (MAX_HELD, 10));
        q.sent_data(to, Bytes::from(vec![0u8; MAX_HELD_BYTES]), t0);
        assert_eq!(q.held.packets.len(), 1, "bytes bound too");
    }
}
