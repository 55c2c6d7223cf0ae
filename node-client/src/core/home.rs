//! Which relay is home: the region with the lowest STUN round trip, among regions not failing,
//! and in it the first relay of the map that has not failed lately.
//!
//! The home moves only on a clear improvement (30 % faster and 5 ms less), unless the current
//! home failed (`force`). Regions the map marks `Avoid` come after all others. A relay that
//! failed or said it is restarting is avoided for [`BAD_RELAY_FOR`]; a region is failing when
//! every relay in it is.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::regionmap::{RegionMap, RelayNode};

/// A failing relay is avoided for this long.
pub(crate) const BAD_RELAY_FOR: Duration = Duration::from_secs(30);
/// Round trip assumed for a region that never answered STUN.
const UNMEASURED: Duration = Duration::from_secs(3600);

/// The home relay the core chose, for the relay link to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeTarget {
    /// Region id.
    pub region_id: u32,
    /// Relay URL.
    pub url: String,
    /// Address to dial instead of resolving the URL's host.
    pub addr: Option<SocketAddr>,
}

impl HomeTarget {
    fn of(region_id: u32, node: &RelayNode) -> Self {
        HomeTarget { region_id, url: node.url(), addr: node.derp_addr() }
    }
}

/// What home choice knows: measured latencies and recently failed relays.
#[derive(Debug, Default)]
pub(crate) struct Home {
    /// Smoothed STUN round trip per region.
    pub(crate) region_rtt: BTreeMap<u32, Duration>,
    /// Relays (by URL) that failed or said they are restarting, and when.
    bad_nodes: HashMap<String, Instant>,
    current: Option<HomeTarget>,
}

impl Home {
    /// The relay chosen now, if any.
    pub(crate) fn current(&self) -> Option<&HomeTarget> {
        self.current.as_ref()
    }

    /// A STUN answer from `region_id` took `rtt` (smoothed, so one slow answer does not move
    /// the home).
    pub(crate) fn note_rtt(&mut self, region_id: u32, rtt: Duration) {
        let entry = self.region_rtt.entry(region_id).or_insert(rtt);
        *entry = entry.mul_f64(0.7) + rtt.mul_f64(0.3);
    }

    /// The relay at `url` failed or is restarting.
    pub(crate) fn note_failed(&mut self, url: String, now: Instant) {
        self.bad_nodes.insert(url, now);
    }

    /// The relay to use in `region`: the first of the map that has not failed lately; when all
    /// have, the one that failed longest ago. For the home and for links to other regions.
    pub(crate) fn node_in(&self, map: &RegionMap, region: u32) -> Option<HomeTarget> {
        let r = map.region(region)?;
        let node = RegionMap::derp_nodes(r).min_by_key(|n| self.bad_nodes.get(&n.url()).copied())?;
        Some(HomeTarget::of(region, node))
    }

    /// Chooses again; returns the new target when it changed.
    pub(crate) fn choose(&mut self, map: &RegionMap, force: bool, now: Instant) -> Option<HomeTarget> {
        self.bad_nodes.retain(|_, t| now.saturating_duration_since(*t) < BAD_RELAY_FOR);
        let rtt = |id: u32| self.region_rtt.get(&id).copied().unwrap_or(UNMEASURED);
        let failing = |id: u32| {
            map.region(id).is_none_or(|r| RegionMap::derp_nodes(r).all(|n| self.bad_nodes.contains_key(&n.url())))
        };
        let mut regions: Vec<u32> = map.relay_regions().map(|r| r.region_id).collect();
        let avoided = |id: u32| map.region(id).is_some_and(|r| r.avoid);
        regions.sort_by_key(|id| (failing(*id), avoided(*id), rtt(*id), *id));
        let &best = regions.first()?;
        if let Some(cur) = self.current.as_ref().map(|h| h.region_id).filter(|_| !force) {
            let (b, c) = (rtt(best), rtt(cur));
            let clearly_better =
                b.as_secs_f64() < c.as_secs_f64() * 0.7 && c.saturating_sub(b) > Duration::from_millis(5);
            if best == cur || !clearly_better {
                return None;
            }
        }
        // When every region failed recently, `best` is the first in id order, possibly the
        // current home again: the relay link keeps retrying it.
        let target = self.node_in(map, best)?;
        if self.current.as_ref() == Some(&target) {
            return None;
        }
        self.current = Some(target.clone());
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{map, now};

    #[test]
    fn the_fastest_region_wins_and_a_failed_relay_hands_over_to_its_sibling() {
        let map = map(&[(1, &[10, 11]), (2, &[20])]);
        let t = now();
        let mut home = Home::default();
        home.note_rtt(1, Duration::from_millis(40));
        home.note_rtt(2, Duration::from_millis(10));
        assert_eq!(home.choose(&map, false, t).map(|h| h.region_id), Some(2));
        // Region 2's only relay fails: region 1, its first relay.
        home.note_failed(home.current().expect("home").url.clone(), t);
        let moved = home.choose(&map, true, t).expect("moved");
        assert_eq!((moved.region_id, moved.addr.map(|a| a.port())), (1, Some(10)));
        // That relay fails too: its sibling in the same region, not the failed region 2.
        home.note_failed(moved.url.clone(), t);
        let sibling = home.choose(&map, true, t).expect("moved");
        assert_eq!((sibling.region_id, sibling.addr.map(|a| a.port())), (1, Some(11)));
    }

    #[test]
    fn the_home_moves_only_when_clearly_faster() {
        let map = map(&[(1, &[10]), (2, &[20])]);
        let t = now();
        let mut home = Home::default();
        home.note_rtt(1, Duration::from_millis(20));
        assert_eq!(home.choose(&map, false, t).map(|h| h.region_id), Some(1));
        home.note_rtt(2, Duration::from_millis(16)); // 20 % faster: not enough
        assert_eq!(home.choose(&map, false, t), None);
        for _ in 0..20 {
            home.note_rtt(2, Duration::from_millis(5));
        }
        assert_eq!(home.choose(&map, false, t).map(|h| h.region_id), Some(2));
    }

    #[test]
    fn an_avoided_region_is_home_only_when_nothing_else_works() {
        let mut map = map(&[(1, &[10]), (2, &[20])]);
        map.regions.get_mut("1").expect("region 1").avoid = true;
        let t = now();
        let mut home = Home::default();
        home.note_rtt(1, Duration::from_millis(5));
        home.note_rtt(2, Duration::from_millis(50));
        assert_eq!(home.choose(&map, false, t).map(|h| h.region_id), Some(2), "faster, but avoided");
        home.note_failed(home.current().expect("home").url.clone(), t);
        assert_eq!(home.choose(&map, true, t).map(|h| h.region_id), Some(1), "the only region left");
    }

    #[test]
    fn a_failed_relay_is_avoided_for_a_while_then_forgiven() {
        let map = map(&[(1, &[10, 11])]);
        let t = now();
        let mut home = Home::default();
        let first = home.choose(&map, false, t).expect("home");
        home.note_failed(first.url.clone(), t);
        assert_eq!(home.choose(&map, true, t).and_then(|h| h.addr).map(|a| a.port()), Some(11));
        // Once both failed and the first one's failure is older than BAD_RELAY_FOR, it is first.
        home.note_failed(home.current().expect("home").url.clone(), t + Duration::from_secs(20));
        let later = t + BAD_RELAY_FOR + Duration::from_secs(1);
        assert_eq!(home.choose(&map, true, later).and_then(|h| h.addr).map(|a| a.port()), Some(10));
    }
}
