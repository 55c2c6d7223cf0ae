//! What the node keeps per peer, and the status snapshot it reports.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use warren_relay_proto::PublicKey;

use super::disco;
use super::paths::{Path, PeerPaths};
use super::reach::{LinkStatus, Recent, RegionSource};

/// One peer: its paths, where it is homed, and packet counters.
#[derive(Debug, Default)]
pub(crate) struct Peer {
    pub(crate) paths: PeerPaths,
    /// Its home region and how we know it.
    pub(crate) region: Option<(u32, RegionSource)>,
    /// Our home region when we last told the peer it (CallMeMaybe).
    pub(crate) told_home: Option<u32>,
    /// Relay packets sent lately, to resend if the relay said the peer is not there.
    pub(crate) recent: Recent,
    /// Data envelopes received lately, to drop copies.
    pub(crate) seen: SeenNonces,
    pub(crate) tx_direct: u64,
    pub(crate) tx_relay: u64,
    pub(crate) rx_direct: u64,
    pub(crate) rx_relay: u64,
    /// Data packets sent again over another path because the direct path that carried them
    /// was given up before confirming them.
    pub(crate) tx_resent: u64,
    /// Data packets received twice (the copy was dropped).
    pub(crate) rx_duplicate: u64,
}

impl Peer {
    /// Learns the peer's home region from `source`, unless a better source already said.
    /// True when it changed.
    pub(crate) fn learn_region(&mut self, region: u32, source: RegionSource) -> bool {
        if self.region.is_some_and(|(r, s)| s > source || (r == region && s == source)) {
            return false;
        }
        self.region = Some((region, source));
        true
    }

    /// This peer's line in [`Status`]; `relay` is the URL of the relay that carries it.
    pub(crate) fn status(&self, key: &PublicKey, now: Instant, relay: Option<String>) -> PeerStatus {
        PeerStatus {
            key: key.to_hex(),
            home_region: self.region.map(|(r, _)| r),
            region_source: self.region.map(|(_, s)| s),
            relay,
            path: match self.paths.current(now) {
                Path::Direct(a) => format!("direct {a}"),
                Path::Relay => "relay".into(),
            },
            rtt_ms: self.paths.direct_rtt(now).map(|d| d.as_secs_f64() * 1e3),
            candidates: self.paths.candidates().map(|a| a.to_string()).collect(),
            time_to_direct_ms: self.paths.time_to_direct().map(|d| d.as_secs_f64() * 1e3),
            tx_direct: self.tx_direct,
            tx_relay: self.tx_relay,
            rx_direct: self.rx_direct,
            rx_relay: self.rx_relay,
            tx_resent: self.tx_resent,
            tx_unprotected: self.paths.unprotected(),
            rx_duplicate: self.rx_duplicate,
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
    /// Links to relays of other regions (peers homed there).
    pub region_links: Vec<LinkStatus>,
    /// Packets held while a peer was looked up, dropped because no region had it.
    pub lookup_dropped: u64,
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
    /// The region the peer is homed in, when known.
    pub home_region: Option<u32>,
    /// How that is known: `told` (the peer said), `hint` (`KEY@REGION`), `lookup`, `seen`.
    pub region_source: Option<RegionSource>,
    /// The relay that carries its relay packets (our home, or a region link's relay).
    pub relay: Option<String>,
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
    /// Data packets resent over another path because the direct path was given up before a
    /// Pong confirmed them.
    pub tx_resent: u64,
    /// Data packets sent directly while too much was held to keep them for a resend.
    pub tx_unprotected: u64,
    /// Data packets received twice; the copies were dropped.
    pub rx_duplicate: u64,
}

/// Data envelopes seen lately from one peer, by nonce: the last [`MAX_SEEN`].
#[derive(Debug, Default)]
pub(crate) struct SeenNonces {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

/// Data envelopes remembered per peer; more than a peer can hold and resend
/// ([`super::paths::MAX_HELD`]), so every copy falls inside the window.
pub(crate) const MAX_SEEN: usize = 2 * super::paths::MAX_HELD;

impl SeenNonces {
    /// Notes an opened envelope; false if one with its nonce was seen within the window. The
    /// nonce's first 8 bytes stand for it: nonces are random, and only authenticated
    /// envelopes get here.
    pub(crate) fn insert(&mut self, envelope: &[u8]) -> bool {
        let Some(tag) = disco::nonce_tag(envelope) else { return true };
        if !self.set.insert(tag) {
            return false;
        }
        self.order.push_back(tag);
        if self.order.len() > MAX_SEEN {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_recognised_within_the_window_by_nonce() {
        let envelope = |n: u64| {
            let mut e = vec![0u8; disco::HEADER_LEN + 17];
            e[36..44].copy_from_slice(&n.to_le_bytes());
            e
        };
        let mut seen = SeenNonces::default();
        assert!(seen.insert(&envelope(1)));
        assert!(!seen.insert(&envelope(1)), "a copy");
        for n in 2..(MAX_SEEN as u64 + 2) {
            assert!(seen.insert(&envelope(n)));
        }
        assert!(seen.insert(&envelope(1)), "forgotten past the window");
        assert!(seen.insert(&[0u8; 10]), "too short to tell: kept");
        assert_eq!(seen.order.len(), MAX_SEEN);
    }
}
