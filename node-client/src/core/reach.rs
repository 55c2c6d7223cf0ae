//! Reaching peers homed in other regions.
//!
//! A relay only delivers to keys connected to it or to a mesh sibling of its region, so a peer
//! homed elsewhere is reached through a **region link**: a second relay connection, to a relay
//! of the peer's home region, opened on first use and closed after `idle` without a packet
//! either way. The home connection is never touched.
//!
//! Where a peer is homed is learnt, best source first, from the peer itself (its CallMeMaybe
//! carries its home region: [`RegionSource::Told`]), from the user (`KEY@REGION`:
//! [`RegionSource::Hint`]), from a lookup, or from a packet that came in over a region link
//! ([`RegionSource::Seen`]). A peer with no known region is sent to through the home relay.
//!
//! **Lookups.** When the relay a packet went to answers PeerGone(NotHere), the peer is looked up:
//! FindPeer goes to one relay of every other region with relays (opening links as needed), and
//! the first "present" answer names its region. Packets sent meanwhile, and the relay packets
//! sent to the peer in the last [`RECENT_FOR`] (they went where the peer was not), are held and
//! sent once it is found; a lookup unanswered for [`LOOKUP_TIMEOUT`] drops them. A peer is
//! looked up at most once per [`LOOKUP_RETRY`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use warren_relay_proto::PublicKey;

use super::home::HomeTarget;

/// A lookup unanswered for this long gives up (its held packets are dropped).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// One lookup per peer per this long.
pub const LOOKUP_RETRY: Duration = Duration::from_secs(10);
/// Packets held per peer while its lookup runs.
pub const MAX_HELD: usize = 64;
/// Relay packets to a peer kept this long, to resend when the relay said the peer is not there.
pub const RECENT_FOR: Duration = Duration::from_secs(2);
/// At most this many of them per peer.
pub const MAX_RECENT: usize = 16;

/// Which relay connection carries a relay packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Link {
    /// The home relay.
    Home,
    /// The link to a relay of this (other) region.
    Region(u32),
}

/// How the node knows where a peer is homed; a source of higher rank replaces a lower one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionSource {
    /// A packet from the peer arrived on that region's link.
    Seen,
    /// That region's relay answered FindPeer: present.
    Lookup,
    /// The user said so (`KEY@REGION`).
    Hint,
    /// The peer said so (its CallMeMaybe).
    Told,
}

/// A region link, as `warren status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// The region.
    pub region_id: u32,
    /// The relay it is connected (or connecting) to.
    pub url: String,
    /// Whether it is logged in.
    pub connected: bool,
    /// Milliseconds since a packet last went either way.
    pub idle_ms: f64,
}

#[derive(Debug)]
struct RegionLink {
    target: HomeTarget,
    last_used: Instant,
    connected: bool,
}

#[derive(Debug)]
struct Lookup {
    started: Instant,
    waiting: BTreeSet<u32>,
    held: VecDeque<Bytes>,
}

/// The links to other regions and the lookups in flight.
#[derive(Debug)]
pub(crate) struct Reach {
    idle: Duration,
    links: BTreeMap<u32, RegionLink>,
    lookups: HashMap<PublicKey, Lookup>,
    last_lookup: HashMap<PublicKey, Instant>,
    dropped: u64,
}

impl Reach {
    pub(crate) fn new(idle: Duration) -> Self {
        Reach { idle, links: BTreeMap::new(), lookups: HashMap::new(), last_lookup: HashMap::new(), dropped: 0 }
    }

    /// The open link to `region`, marked used.
    pub(crate) fn use_link(&mut self, region: u32, now: Instant) -> bool {
        let Some(l) = self.links.get_mut(&region) else { return false };
        l.last_used = now;
        true
    }

    /// Records a link the shell is told to open (or to move to another relay of its region).
    pub(crate) fn open(&mut self, target: HomeTarget, now: Instant) {
        self.links.insert(target.region_id, RegionLink { target, last_used: now, connected: false });
    }

    /// The target of the link to `region`, if open.
    pub(crate) fn target(&self, region: u32) -> Option<&HomeTarget> {
        self.links.get(&region).map(|l| &l.target)
    }

    /// A region link logged in (true) or failed.
    pub(crate) fn set_connected(&mut self, region: u32, up: bool) {
        if let Some(l) = self.links.get_mut(&region) {
            l.connected = up;
        }
    }

    /// Forgets the link to `region` (home moved there); true when there was one to close.
    pub(crate) fn remove(&mut self, region: u32) -> bool {
        self.links.remove(&region).is_some()
    }

    /// Whether a lookup of `peer` runs.
    pub(crate) fn looking_up(&self, peer: &PublicKey) -> bool {
        self.lookups.contains_key(peer)
    }

    /// Holds a sealed packet for `peer` until its lookup ends; false when none runs.
    pub(crate) fn hold(&mut self, peer: &PublicKey, payload: Bytes) -> bool {
        let Some(l) = self.lookups.get_mut(peer) else { return false };
        if l.held.len() < MAX_HELD {
            l.held.push_back(payload);
        }
        true
    }

    /// Starts a lookup of `peer` in `regions`, holding `held`, unless one ran within
    /// [`LOOKUP_RETRY`] or `regions` is empty.
    pub(crate) fn start_lookup(
        &mut self,
        peer: PublicKey,
        regions: BTreeSet<u32>,
        held: VecDeque<Bytes>,
        now: Instant,
    ) -> bool {
        if regions.is_empty()
            || self.lookups.contains_key(&peer)
            || self.last_lookup.get(&peer).is_some_and(|t| now.saturating_duration_since(*t) < LOOKUP_RETRY)
        {
            return false;
        }
        self.last_lookup.insert(peer, now);
        self.lookups.insert(peer, Lookup { started: now, waiting: regions, held });
        true
    }

    /// A relay of `region` answered FindPeer. `Some(held)` when `present` ends the lookup.
    pub(crate) fn on_presence(&mut self, peer: &PublicKey, region: u32, present: bool) -> Option<VecDeque<Bytes>> {
        let l = self.lookups.get_mut(peer)?;
        if !l.waiting.remove(&region) {
            return None;
        }
        if present {
            return self.lookups.remove(peer).map(|l| l.held);
        }
        if l.waiting.is_empty() {
            if let Some(l) = self.lookups.remove(peer) {
                self.dropped += l.held.len() as u64;
            }
        }
        None
    }

    /// Held packets dropped because a lookup found no one.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Gives up stale lookups and returns the idle links to close.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<u32> {
        let dropped = &mut self.dropped;
        self.lookups.retain(|_, l| {
            let keep = now.saturating_duration_since(l.started) < LOOKUP_TIMEOUT;
            if !keep {
                *dropped += l.held.len() as u64;
            }
            keep
        });
        self.last_lookup.retain(|_, t| now.saturating_duration_since(*t) < LOOKUP_RETRY);
        let idle: Vec<u32> = self
            .links
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.last_used) >= self.idle)
            .map(|(r, _)| *r)
            .collect();
        for r in &idle {
            self.links.remove(r);
        }
        idle
    }

    /// The region links, for `warren status`.
    pub(crate) fn status(&self, now: Instant) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|(r, l)| LinkStatus {
                region_id: *r,
                url: l.target.url.clone(),
                connected: l.connected,
                idle_ms: now.saturating_duration_since(l.last_used).as_secs_f64() * 1e3,
            })
            .collect()
    }
}

/// Relay packets recently sent to one peer (sealed), for resending after a lookup.
#[derive(Debug, Default)]
pub(crate) struct Recent(VecDeque<(Instant, Bytes)>);

impl Recent {
    pub(crate) fn push(&mut self, payload: Bytes, now: Instant) {
        self.prune(now);
        if self.0.len() == MAX_RECENT {
            self.0.pop_front();
        }
        self.0.push_back((now, payload));
    }

    pub(crate) fn prune(&mut self, now: Instant) {
        while self.0.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) >= RECENT_FOR) {
            self.0.pop_front();
        }
    }

    /// Everything kept (and forgets it).
    pub(crate) fn take(&mut self, now: Instant) -> VecDeque<Bytes> {
        self.prune(now);
        self.0.drain(..).map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::now;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn target(region: u32) -> HomeTarget {
        HomeTarget { region_id: region, url: format!("https://r{region}.test"), addr: None }
    }

    #[test]
    fn a_lookup_ends_at_the_first_present_answer_and_hands_back_what_it_held() {
        let t = now();
        let mut reach = Reach::new(Duration::from_secs(60));
        let held: VecDeque<Bytes> = [Bytes::from_static(b"a")].into();
        assert!(reach.start_lookup(key(1), [2, 3].into(), held, t));
        assert!(reach.hold(&key(1), Bytes::from_static(b"b")));
        assert_eq!(reach.on_presence(&key(1), 2, false), None);
        assert_eq!(reach.on_presence(&key(1), 9, true), None, "a region not asked is ignored");
        let got = reach.on_presence(&key(1), 3, true).expect("found");
        assert_eq!(got, VecDeque::from([Bytes::from_static(b"a"), Bytes::from_static(b"b")]));
        assert!(!reach.looking_up(&key(1)));
        assert!(!reach.start_lookup(key(1), [2].into(), VecDeque::new(), t + Duration::from_secs(1)), "retry later");
        assert!(reach.start_lookup(key(1), [2].into(), VecDeque::new(), t + LOOKUP_RETRY));
    }

    #[test]
    fn an_unanswered_lookup_drops_its_packets_and_idle_links_close() {
        let t = now();
        let mut reach = Reach::new(Duration::from_secs(60));
        reach.open(target(2), t);
        assert!(reach.start_lookup(key(1), [2].into(), VecDeque::new(), t));
        for _ in 0..MAX_HELD + 10 {
            reach.hold(&key(1), Bytes::from_static(b"x"));
        }
        assert!(reach.expire(t + Duration::from_secs(1)).is_empty());
        assert!(reach.use_link(2, t + Duration::from_secs(30)));
        assert!(reach.expire(t + LOOKUP_TIMEOUT).is_empty(), "used 30 s in");
        assert_eq!(reach.dropped(), MAX_HELD as u64, "held up to the bound, then dropped");
        assert_eq!(reach.expire(t + Duration::from_secs(90)), vec![2]);
        assert!(!reach.use_link(2, t + Duration::from_secs(91)));
    }

    #[test]
    fn recent_packets_are_bounded_in_count_and_age() {
        let t = now();
        let mut recent = Recent::default();
        for i in 0..MAX_RECENT + 4 {
            recent.push(Bytes::from(vec![i as u8]), t);
        }
        assert_eq!(recent.take(t).front().map(|b| b[0]), Some(4), "the oldest went first");
        recent.push(Bytes::from_static(b"old"), t);
        assert!(recent.take(t + RECENT_FOR).is_empty(), "too old to resend");
    }
}
